//! The store client: what ranks (the trainer's collective layer) and the launchers of other nodes
//! use. One TCP connection, blocking calls, every call bounded in time: a dead or silent server
//! gives a typed [`StoreError`], never a hang or a panic. The client is `Send` (move it to the
//! thread that needs it); calls take `&mut self`, so share it behind a `Mutex` if you must.
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::protocol::{
    read_frame, write_frame, ProtocolError, Request, Response, MAX_KEY, MAX_VALUE, VERSION,
};
use super::StoreError;
use crate::env::RankEnv;

/// How long a rank keeps trying to reach the store before giving up.
pub const RANK_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound of blocking calls (`get`, `wait`, `barrier`), like torch's TCPStore.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Extra time allowed for an answer beyond the operation's own timeout (network, a busy server).
const REPLY_SLACK: Duration = Duration::from_secs(10);
/// Bound for the reply to a non-blocking request.
const QUICK_REPLY: Duration = Duration::from_secs(30);

/// Result of [`StoreClient::compare_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareSet {
    /// The expected value was there and is now replaced.
    Swapped,
    /// Nothing changed; this is what the key holds (None: absent).
    Mismatch(Option<Vec<u8>>),
}

/// A connection to the rendezvous store.
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    endpoint: String,
    timeout: Duration,
    prefix: String,
    /// How many times each barrier name was used: the n-th call of `barrier(name)` meets the n-th
    /// call of every other participant, so names can be reused (all call them in the same order).
    barrier_uses: HashMap<String, u64>,
    /// Set after an I/O error or a missed answer: the byte stream may be out of step.
    broken: bool,
}

impl StoreClient {
    /// Connects to `host:port`, retrying with backoff for up to `connect_timeout` (node 0 may
    /// still be starting), and presents `token`.
    pub fn connect(
        host: &str,
        port: u16,
        token: &str,
        connect_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let endpoint = format!("{host}:{port}");
        if token.is_empty() {
            return Err(StoreError::NoToken);
        }
        let start = Instant::now();
        let deadline = start + connect_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let last = match Self::try_connect(host, port, token, deadline) {
                Ok(stream) => {
                    return Ok(StoreClient {
                        stream,
                        endpoint,
                        timeout: DEFAULT_TIMEOUT,
                        prefix: String::new(),
                        barrier_uses: HashMap::new(),
                        broken: false,
                    })
                }
                Err(Attempt::Refused(reason)) => {
                    return Err(StoreError::Refused { endpoint, reason })
                }
                Err(Attempt::Retry(last)) => last,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Unreachable {
                    endpoint,
                    waited: now - start,
                    last,
                });
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Connects as a rank: the store at `MASTER_ADDR:MASTER_PORT` with the launcher's token, keys
    /// scoped to this attempt (`TORCHELASTIC_RESTART_COUNT`) so a restarted group starts clean.
    pub fn from_rank_env(env: &RankEnv) -> Result<Self, StoreError> {
        let token = env.store_token.as_deref().ok_or(StoreError::NoToken)?;
        let client = Self::connect(
            &env.master_addr,
            env.master_port,
            token,
            RANK_CONNECT_TIMEOUT,
        )?;
        Ok(client.with_prefix(&format!("ranks/attempt{}/", env.restart_count)))
    }

    fn try_connect(
        host: &str,
        port: u16,
        token: &str,
        deadline: Instant,
    ) -> Result<TcpStream, Attempt> {
        // Resolve every time: the master's DNS name may appear only once its node is up.
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| Attempt::Retry(format!("cannot resolve {host}: {e}")))?
            .collect();
        let mut last = format!("{host} resolves to no address");
        for addr in addrs {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(50));
            match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
                Ok(stream) => {
                    // A listener that never answers must not hold us past the connect deadline.
                    let left = deadline.saturating_duration_since(Instant::now());
                    return Self::handshake(
                        stream,
                        token,
                        left.clamp(Duration::from_millis(500), QUICK_REPLY),
                    );
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(Attempt::Retry(last))
    }

    fn handshake(
        mut stream: TcpStream,
        token: &str,
        reply_within: Duration,
    ) -> Result<TcpStream, Attempt> {
        let io_err = |e: io::Error| Attempt::Retry(format!("handshake failed: {e}"));
        stream.set_nodelay(true).map_err(io_err)?;
        stream
            .set_read_timeout(Some(reply_within))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(QUICK_REPLY))
            .map_err(io_err)?;
        let hello = Request::Hello {
            version: VERSION,
            token: token.as_bytes().to_vec(),
        };
        write_frame(&mut stream, &hello.encode()).map_err(io_err)?;
        let silent = |e: &ProtocolError| {
            let kind = match e {
                ProtocolError::Io(io) => io.kind(),
                _ => io::ErrorKind::Other,
            };
            matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        };
        let body = read_frame(&mut stream).map_err(|e| match silent(&e) {
            // (something listens there but says nothing: not a store)
            true => Attempt::Retry(format!(
                "handshake failed: no answer within {} ms (is another program listening on that \
                 port, not a launcher's store?)",
                reply_within.as_millis()
            )),
            false => match e {
                // (read_exact's "failed to fill whole buffer")
                ProtocolError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                    Attempt::Retry(
                        "handshake failed: the other end closed the connection without an answer (a store shutting down, or another program on that port)"
                            .into(),
                    )
                }
                e => Attempt::Retry(format!("handshake failed: {e}")),
            },
        })?;
        match Response::decode(&body) {
            Ok(Response::Ok) => Ok(stream),
            Ok(Response::Error(reason)) => Err(Attempt::Refused(reason)),
            Ok(other) => Err(Attempt::Refused(format!(
                "unexpected answer to hello: {other:?}"
            ))),
            Err(e) => Err(Attempt::Refused(format!(
                "unreadable answer to hello: {e} (not a rendezvous store?)"
            ))),
        }
    }

    /// Prepends `prefix` to every key this client uses (namespaces; see [`Self::from_rank_env`]).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Appends `more` to this client's key prefix (a namespace inside its namespace).
    pub fn scoped(mut self, more: &str) -> Self {
        self.prefix.push_str(more);
        self
    }

    /// Sets the bound of blocking calls that take no explicit timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The bound of blocking calls that take no explicit timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `host:port` of the server.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stores `value` at `key` (replacing any value) and wakes everyone waiting for it.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_value("value", value)?;
        let key = self.key(key)?;
        match self.call(
            Request::Set {
                key,
                value: value.to_vec(),
            },
            QUICK_REPLY,
        )? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// The value at `key`, waiting for it to appear for up to [`Self::timeout`].
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.get_timeout(key, self.timeout)
    }

    /// The value at `key`, waiting for it to appear for up to `timeout`.
    pub fn get_timeout(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let full = self.key(key)?;
        let timeout_ms = (timeout.as_millis() as u64).max(1);
        match self.call(
            Request::Get {
                key: full,
                timeout_ms,
            },
            timeout,
        )? {
            Response::Value(v) => Ok(v),
            Response::Timeout => Err(self.timed_out(format!("key '{key}'"), timeout)),
            other => Err(self.unexpected(other)),
        }
    }

    /// The value at `key` if it exists now (never waits).
    pub fn try_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(key)?;
        match self.call(Request::Get { key, timeout_ms: 0 }, QUICK_REPLY)? {
            Response::Value(v) => Ok(Some(v)),
            Response::Missing => Ok(None),
            other => Err(self.unexpected(other)),
        }
    }

    /// Atomically adds `delta` to the integer at `key` (absent counts as 0); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let key = self.key(key)?;
        match self.call(Request::Add { key, delta }, QUICK_REPLY)? {
            Response::Int(n) => Ok(n),
            other => Err(self.unexpected(other)),
        }
    }

    /// Atomically sets `key` to `new` if it holds `expected` (`None`: if it is absent).
    pub fn compare_set(
        &mut self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<CompareSet, StoreError> {
        check_value("value", new)?;
        let key = self.key(key)?;
        let request = Request::CompareSet {
            key,
            expected: expected.map(<[u8]>::to_vec),
            new: new.to_vec(),
        };
        match self.call(request, QUICK_REPLY)? {
            Response::Swapped { swapped: true, .. } => Ok(CompareSet::Swapped),
            Response::Swapped {
                swapped: false,
                current,
            } => Ok(CompareSet::Mismatch(current)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Waits until every key exists, for up to `timeout`.
    pub fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        let full = keys
            .iter()
            .map(|k| self.key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout_ms = (timeout.as_millis() as u64).max(1);
        match self.call(
            Request::Wait {
                keys: full,
                timeout_ms,
            },
            timeout,
        )? {
            Response::Ok => Ok(()),
            Response::Timeout => Err(self.timed_out(format!("keys {keys:?}"), timeout)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let key = self.key(key)?;
        match self.call(Request::Delete { key }, QUICK_REPLY)? {
            Response::Bool(existed) => Ok(existed),
            other => Err(self.unexpected(other)),
        }
    }

    /// Checks that the server answers.
    pub fn ping(&mut self) -> Result<(), StoreError> {
        match self.call(Request::Ping, QUICK_REPLY)? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// Blocks until `n` participants have called `barrier(name, n, ..)`, for up to `timeout`.
    ///
    /// Reusable: the k-th call with a given name on each participant meets the k-th call of the
    /// others. On timeout the error says how many arrived.
    pub fn barrier(&mut self, name: &str, n: usize, timeout: Duration) -> Result<(), StoreError> {
        if n == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "barrier '{name}' needs at least 1 participant"
            )));
        }
        let uses = self.barrier_uses.entry(name.to_string()).or_insert(0);
        let base = format!("barrier/{name}/{uses}");
        *uses += 1;
        let arrived_key = format!("{base}/arrived");
        let open_key = format!("{base}/open");
        let arrived = self.add(&arrived_key, 1)?;
        if arrived == n as i64 {
            self.set(&open_key, b"1")?;
        } else if arrived > n as i64 {
            return Err(StoreError::BarrierOverflow {
                name: name.to_string(),
                arrived,
                expected: n,
            });
        }
        match self.wait(&[&open_key], timeout) {
            Err(StoreError::Timeout { waited, .. }) => {
                let arrived = self
                    .try_get(&arrived_key)
                    .ok()
                    .flatten()
                    .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(arrived);
                Err(StoreError::BarrierTimeout {
                    name: name.to_string(),
                    arrived,
                    expected: n,
                    waited,
                })
            }
            other => other,
        }
    }

    fn key(&self, key: &str) -> Result<String, StoreError> {
        let full = format!("{}{}", self.prefix, key);
        if full.len() > MAX_KEY {
            return Err(StoreError::TooLarge {
                what: "key",
                len: full.len(),
                max: MAX_KEY,
            });
        }
        Ok(full)
    }

    /// Sends one request and reads its answer, allowing `op_time` plus slack for the answer.
    fn call(&mut self, request: Request, op_time: Duration) -> Result<Response, StoreError> {
        if self.broken {
            return Err(StoreError::Disconnected {
                endpoint: self.endpoint.clone(),
                error: io::Error::new(
                    io::ErrorKind::NotConnected,
                    "an earlier call failed; reconnect",
                ),
            });
        }
        let reply_within = op_time.saturating_add(REPLY_SLACK);
        let result = self
            .stream
            .set_read_timeout(Some(reply_within))
            .and_then(|()| write_frame(&mut self.stream, &request.encode()));
        if let Err(source) = result {
            self.broken = true;
            return Err(self.disconnected(source));
        }
        let body = match read_frame(&mut self.stream) {
            Ok(body) => body,
            Err(err) => {
                self.broken = true;
                return Err(match err {
                    ProtocolError::Io(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        StoreError::NoReply {
                            endpoint: self.endpoint.clone(),
                            waited: reply_within,
                        }
                    }
                    ProtocolError::Io(e) => self.disconnected(e),
                    other => StoreError::Protocol {
                        endpoint: self.endpoint.clone(),
                        detail: other.to_string(),
                    },
                });
            }
        };
        match Response::decode(&body) {
            Ok(Response::Error(reason)) => Err(StoreError::Rejected {
                endpoint: self.endpoint.clone(),
                reason,
            }),
            Ok(response) => Ok(response),
            Err(err) => {
                self.broken = true;
                Err(StoreError::Protocol {
                    endpoint: self.endpoint.clone(),
                    detail: err.to_string(),
                })
            }
        }
    }

    fn disconnected(&self, source: io::Error) -> StoreError {
        StoreError::Disconnected {
            endpoint: self.endpoint.clone(),
            error: source,
        }
    }

    fn timed_out(&self, what: String, waited: Duration) -> StoreError {
        StoreError::Timeout {
            endpoint: self.endpoint.clone(),
            what,
            waited,
        }
    }

    fn unexpected(&mut self, response: Response) -> StoreError {
        self.broken = true;
        StoreError::Protocol {
            endpoint: self.endpoint.clone(),
            detail: format!("unexpected answer {response:?}"),
        }
    }
}

/// Outcome of one connection attempt.
enum Attempt {
    /// Worth trying again (nothing listening yet, connection reset, DNS not ready).
    Retry(String),
    /// The server said no (wrong token, version): retrying cannot help.
    Refused(String),
}

fn check_value(what: &'static str, value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE {
        return Err(StoreError::TooLarge {
            what,
            len: value.len(),
            max: MAX_VALUE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<StoreClient>();
        assert_send::<StoreError>();
    }
}
