//! Wire format of the rendezvous store.
//!
//! Every message is a frame: a little-endian `u32` body length, then the body. A body starts with
//! an opcode byte; strings and byte strings inside it are a `u32` length plus the bytes. The length
//! is checked against [`MAX_FRAME`] *before* anything is allocated, so a hostile or corrupt prefix
//! (say 2 GiB) costs nothing. The first frame of a connection must be [`Request::Hello`] with the
//! run's token; the server answers every request with exactly one [`Response`].
use std::io::{self, Read, Write};

use thiserror::Error;

/// Identifies our protocol in `Hello` (so random bytes are told apart from an old client).
pub const MAGIC: [u8; 4] = *b"LSCO";
/// Bumped on any incompatible change of the wire format.
pub const VERSION: u16 = 1;
/// Largest frame body either side accepts.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest key (keys are short names such as `barrier/step/3`).
pub const MAX_KEY: usize = 4096;
/// Largest value (rendezvous data: NCCL ids, addresses; never tensors).
pub const MAX_VALUE: usize = 32 << 20;
/// Largest token.
pub const MAX_TOKEN: usize = 1024;
/// Most keys in one `wait`.
pub const MAX_WAIT_KEYS: usize = 4096;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First frame of every connection.
    Hello {
        version: u16,
        token: Vec<u8>,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// Waits up to `timeout_ms` for the key; `0` answers at once ([`Response::Missing`] if absent).
    Get {
        key: String,
        timeout_ms: u64,
    },
    /// Adds `delta` to the decimal integer stored at `key` (absent = 0) and answers the new value.
    Add {
        key: String,
        delta: i64,
    },
    /// Sets `key` to `new` if its current value is `expected` (`None`: the key must be absent).
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    },
    /// Waits up to `timeout_ms` until every key exists.
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Delete {
        key: String,
    },
    Ping,
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Value(Vec<u8>),
    Int(i64),
    Bool(bool),
    /// Answer to `CompareSet`: whether it swapped, and the value now stored.
    Swapped {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    /// A `Get` with timeout 0 found nothing.
    Missing,
    /// A blocking `Get`/`Wait` ran out of time.
    Timeout,
    /// The request was refused; the text says why.
    Error(String),
}

/// A frame or body that cannot be decoded.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("truncated message: {0}")]
    Truncated(&'static str),
    #[error("unknown opcode {0:#04x}")]
    BadOpcode(u8),
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    FieldTooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("bad hello (not a rendezvous store client, or another protocol)")]
    BadMagic,
    #[error(transparent)]
    Io(#[from] io::Error),
}

mod op {
    pub const HELLO: u8 = 0x01;
    pub const SET: u8 = 0x02;
    pub const GET: u8 = 0x03;
    pub const ADD: u8 = 0x04;
    pub const COMPARE_SET: u8 = 0x05;
    pub const WAIT: u8 = 0x06;
    pub const DELETE: u8 = 0x07;
    pub const PING: u8 = 0x08;

    pub const OK: u8 = 0x80;
    pub const VALUE: u8 = 0x81;
    pub const INT: u8 = 0x82;
    pub const BOOL: u8 = 0x83;
    pub const SWAPPED: u8 = 0x84;
    pub const MISSING: u8 = 0x85;
    pub const TIMEOUT: u8 = 0x86;
    pub const ERROR: u8 = 0x87;
}

/// Appends body fields.
struct Encoder(Vec<u8>);

impl Encoder {
    fn new(opcode: u8) -> Self {
        Encoder(vec![opcode])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        // Callers keep fields under MAX_FRAME, so the length fits in u32.
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn opt_bytes(self, v: Option<&[u8]>) -> Self {
        match v {
            None => self.u8(0),
            Some(v) => self.u8(1).bytes(v),
        }
    }
}

/// Reads body fields, never past the end and never allocating more than the body holds.
struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, ProtocolError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(ProtocolError::FieldTooLarge { what, len, max });
        }
        Ok(self.take(len, what)?.to_vec())
    }
    fn opt_bytes(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(None),
            _ => self.bytes(what, max).map(Some),
        }
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes(what, max)?).map_err(|_| ProtocolError::BadUtf8(what))
    }
    fn finish(self) -> Result<(), ProtocolError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(ProtocolError::Trailing(n)),
        }
    }
}

impl Request {
    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Hello { version, token } => Encoder::new(op::HELLO)
                .bytes(&MAGIC)
                .u16(*version)
                .bytes(token),
            Request::Set { key, value } => Encoder::new(op::SET).bytes(key.as_bytes()).bytes(value),
            Request::Get { key, timeout_ms } => {
                Encoder::new(op::GET).bytes(key.as_bytes()).u64(*timeout_ms)
            }
            Request::Add { key, delta } => Encoder::new(op::ADD)
                .bytes(key.as_bytes())
                .u64(*delta as u64),
            Request::CompareSet { key, expected, new } => Encoder::new(op::COMPARE_SET)
                .bytes(key.as_bytes())
                .opt_bytes(expected.as_deref())
                .bytes(new),
            Request::Wait { keys, timeout_ms } => {
                let mut enc = Encoder::new(op::WAIT).u64(*timeout_ms);
                enc.0.extend_from_slice(&(keys.len() as u32).to_le_bytes());
                keys.iter().fold(enc, |enc, k| enc.bytes(k.as_bytes()))
            }
            Request::Delete { key } => Encoder::new(op::DELETE).bytes(key.as_bytes()),
            Request::Ping => Encoder::new(op::PING),
        }
        .0
    }

    /// Parses a frame body; any malformation is an error, never a panic.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder { buf: body };
        let req = match d.u8("opcode").map_err(|_| ProtocolError::Empty)? {
            op::HELLO => {
                let magic = d.take(4, "magic length").ok();
                // The magic is itself a length-prefixed field: `[4,0,0,0]` then `LSCO`.
                if magic != Some(&4u32.to_le_bytes()[..]) || d.take(4, "magic")? != MAGIC {
                    return Err(ProtocolError::BadMagic);
                }
                Request::Hello {
                    version: d.u16("version")?,
                    token: d.bytes("token", MAX_TOKEN)?,
                }
            }
            op::SET => Request::Set {
                key: d.string("key", MAX_KEY)?,
                value: d.bytes("value", MAX_VALUE)?,
            },
            op::GET => Request::Get {
                key: d.string("key", MAX_KEY)?,
                timeout_ms: d.u64("timeout")?,
            },
            op::ADD => Request::Add {
                key: d.string("key", MAX_KEY)?,
                delta: d.u64("delta")? as i64,
            },
            op::COMPARE_SET => Request::CompareSet {
                key: d.string("key", MAX_KEY)?,
                expected: d.opt_bytes("expected value", MAX_VALUE)?,
                new: d.bytes("new value", MAX_VALUE)?,
            },
            op::WAIT => {
                let timeout_ms = d.u64("timeout")?;
                let n = d.u32("key count")? as usize;
                if n > MAX_WAIT_KEYS {
                    return Err(ProtocolError::FieldTooLarge {
                        what: "key count",
                        len: n,
                        max: MAX_WAIT_KEYS,
                    });
                }
                let keys = (0..n)
                    .map(|_| d.string("key", MAX_KEY))
                    .collect::<Result<_, _>>()?;
                Request::Wait { keys, timeout_ms }
            }
            op::DELETE => Request::Delete {
                key: d.string("key", MAX_KEY)?,
            },
            op::PING => Request::Ping,
            other => return Err(ProtocolError::BadOpcode(other)),
        };
        d.finish()?;
        Ok(req)
    }
}

impl Response {
    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Ok => Encoder::new(op::OK),
            Response::Value(v) => Encoder::new(op::VALUE).bytes(v),
            Response::Int(i) => Encoder::new(op::INT).u64(*i as u64),
            Response::Bool(b) => Encoder::new(op::BOOL).u8(*b as u8),
            Response::Swapped { swapped, current } => Encoder::new(op::SWAPPED)
                .u8(*swapped as u8)
                .opt_bytes(current.as_deref()),
            Response::Missing => Encoder::new(op::MISSING),
            Response::Timeout => Encoder::new(op::TIMEOUT),
            Response::Error(msg) => Encoder::new(op::ERROR).bytes(msg.as_bytes()),
        }
        .0
    }

    /// Parses a frame body.
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder { buf: body };
        let resp = match d.u8("opcode").map_err(|_| ProtocolError::Empty)? {
            op::OK => Response::Ok,
            op::VALUE => Response::Value(d.bytes("value", MAX_VALUE)?),
            op::INT => Response::Int(d.u64("integer")? as i64),
            op::BOOL => Response::Bool(d.u8("bool")? != 0),
            op::SWAPPED => Response::Swapped {
                swapped: d.u8("swapped")? != 0,
                current: d.opt_bytes("current value", MAX_VALUE)?,
            },
            op::MISSING => Response::Missing,
            op::TIMEOUT => Response::Timeout,
            op::ERROR => {
                Response::Error(String::from_utf8_lossy(&d.bytes("error", MAX_FRAME)?).into_owned())
            }
            other => return Err(ProtocolError::BadOpcode(other)),
        };
        d.finish()?;
        Ok(resp)
    }
}

/// Writes one frame (length prefix + body) in a single `write_all`.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()
}

/// Checks a frame's length prefix before the body is read or allocated.
pub fn check_frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(ProtocolError::Empty);
    }
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Reads one frame body from a blocking reader (the client side; the server has its own
/// deadline-aware reader).
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ProtocolError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = check_frame_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                version: VERSION,
                token: b"tok".to_vec(),
            },
            Request::Set {
                key: "k".into(),
                value: vec![0, 1, 2],
            },
            Request::Get {
                key: "k".into(),
                timeout_ms: 1500,
            },
            Request::Add {
                key: "n".into(),
                delta: -3,
            },
            Request::CompareSet {
                key: "k".into(),
                expected: None,
                new: b"v".to_vec(),
            },
            Request::CompareSet {
                key: "k".into(),
                expected: Some(vec![]),
                new: b"v".to_vec(),
            },
            Request::Wait {
                keys: vec!["a".into(), "b".into()],
                timeout_ms: 10,
            },
            Request::Delete { key: "k".into() },
            Request::Ping,
        ]
    }

    #[test]
    fn requests_round_trip() {
        for req in all_requests() {
            assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }
    }

    #[test]
    fn responses_round_trip() {
        for resp in [
            Response::Ok,
            Response::Value(b"abc".to_vec()),
            Response::Int(-42),
            Response::Bool(true),
            Response::Swapped {
                swapped: false,
                current: Some(b"x".to_vec()),
            },
            Response::Swapped {
                swapped: true,
                current: None,
            },
            Response::Missing,
            Response::Timeout,
            Response::Error("nope".into()),
        ] {
            assert_eq!(Response::decode(&resp.encode()).unwrap(), resp);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for req in all_requests() {
            let body = req.encode();
            for cut in 0..body.len() {
                assert!(
                    Request::decode(&body[..cut]).is_err(),
                    "{req:?} cut at {cut}"
                );
            }
            let mut long = body.clone();
            long.push(0);
            assert!(matches!(
                Request::decode(&long),
                Err(ProtocolError::Trailing(1))
            ));
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocation() {
        assert!(matches!(
            check_frame_len((2u32 << 30).to_le_bytes()),
            Err(ProtocolError::TooLarge { .. })
        ));
        // A field claiming 4 GiB inside a small body.
        let mut body = vec![op::SET];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Request::decode(&body),
            Err(ProtocolError::FieldTooLarge { .. })
        ));
    }

    #[test]
    fn hello_needs_the_magic() {
        let mut body = Request::Hello {
            version: VERSION,
            token: vec![],
        }
        .encode();
        body[5] = b'X';
        assert!(matches!(
            Request::decode(&body),
            Err(ProtocolError::BadMagic)
        ));
    }
}
