//! The store server: an accept thread plus one thread per connection, all state behind one mutex
//! with a condition variable for blocking `get`/`wait`.
//!
//! Robustness rules (each one is tested): a connection must say `Hello` with the right token within
//! the handshake timeout; a frame, once started, must arrive within the frame timeout; lengths are
//! checked before allocation; anything malformed closes that connection with a logged reason and an
//! `Error` answer. No input can panic the server or stall other connections.
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{
    check_frame_len, write_frame, ProtocolError, Request, Response, MAX_TOKEN, VERSION,
};
use super::StoreError;

/// How often blocked threads look at the shutdown flag.
const POLL: Duration = Duration::from_millis(200);
/// Longest blocking `get`/`wait` a client may ask for (keeps `Instant` arithmetic finite).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Total bytes of keys and values the store holds.
const MAX_STORE_BYTES: usize = 1 << 30;
/// Largest frame accepted before the token is checked (a `Hello` is tiny).
const MAX_HELLO_FRAME: usize = 64 + MAX_TOKEN;

/// Tunables (the defaults suit production; tests shorten the timeouts).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time a new connection has to present its token.
    pub handshake_timeout: Duration,
    /// Time the rest of a frame has to arrive once its first byte did.
    pub frame_timeout: Duration,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// Counters for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections that passed the token check.
    pub accepted: u64,
    /// Connections closed for a protocol or token violation.
    pub rejected: u64,
    /// Connections open now.
    pub live: usize,
}

/// A running store. Dropping it stops the server (open connections close within ~0.2 s).
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    token: Vec<u8>,
    options: ServerOptions,
    state: Mutex<State>,
    changed: Condvar,
    shutdown: AtomicBool,
    live: AtomicUsize,
    accepted: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Default)]
struct State {
    kv: HashMap<String, Vec<u8>>,
    bytes: usize,
}

impl StoreServer {
    /// Listens on `addr` (port 0 picks a free port; see [`StoreServer::local_addr`]).
    pub fn bind(addr: impl ToSocketAddrs, token: &str) -> Result<Self, StoreError> {
        Self::bind_with(addr, token, ServerOptions::default())
    }

    /// [`StoreServer::bind`] with explicit options.
    pub fn bind_with(
        addr: impl ToSocketAddrs,
        token: &str,
        options: ServerOptions,
    ) -> Result<Self, StoreError> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(StoreError::InvalidArgument(format!(
                "the store token must be 1 to {MAX_TOKEN} bytes long"
            )));
        }
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|error| StoreError::Resolve { error })?
            .collect();
        let shown = addrs
            .first()
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        let listener = TcpListener::bind(&addrs[..]).map_err(|error| match error.kind() {
            io::ErrorKind::AddrInUse => StoreError::AddrInUse {
                addr: shown.clone(),
            },
            _ => StoreError::Bind {
                addr: shown.clone(),
                error,
            },
        })?;
        let local = listener
            .local_addr()
            .map_err(|error| StoreError::Bind { addr: shown, error })?;
        let shared = Arc::new(Shared {
            token: token.as_bytes().to_vec(),
            options,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        let accept_shared = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|error| StoreError::Bind {
                addr: local.to_string(),
                error,
            })?;
        Ok(StoreServer {
            addr: local,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connection counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
            live: self.shared.live.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and tells every connection thread to finish.
    pub fn shutdown(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(thread) = self.accept_thread.take() {
            // `accept` only returns on a connection: make one to ourselves.
            let ip = match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let woke = TcpStream::connect_timeout(
                &SocketAddr::new(ip, self.addr.port()),
                Duration::from_secs(1),
            );
            if woke.is_ok() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(stream) => stream,
            Err(err) => {
                // E.g. EMFILE: back off instead of spinning, keep serving existing connections.
                tracing::warn!("rendezvous store: accept failed: {err}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.live.load(Ordering::SeqCst) >= shared.options.max_connections {
            let mut stream = stream;
            shared.reject(&mut stream, "too many connections");
            continue;
        }
        shared.live.fetch_add(1, Ordering::SeqCst);
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("store-conn".into())
            .spawn(move || {
                serve_connection(stream, &conn_shared);
                conn_shared.live.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(err) = spawned {
            shared.live.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("rendezvous store: cannot start a connection thread: {err}");
        }
    }
}

/// Why reading a frame stopped.
enum ReadError {
    /// The peer closed cleanly between frames.
    Closed,
    Shutdown,
    TimedOut,
    Truncated,
    Protocol(ProtocolError),
    Io(io::Error),
}

impl ReadError {
    fn describe(&self) -> String {
        match self {
            ReadError::Closed => "closed the connection".into(),
            ReadError::Shutdown => "server shutting down".into(),
            ReadError::TimedOut => {
                "timed out in the middle of a message (or before saying hello)".into()
            }
            ReadError::Truncated => {
                "closed the connection in the middle of a message (truncated frame)".into()
            }
            ReadError::Protocol(err) => err.to_string(),
            ReadError::Io(err) => err.to_string(),
        }
    }
}

/// Reads frames from a socket whose read timeout is [`POLL`], so shutdown and deadlines are seen.
struct FrameReader<'a> {
    stream: &'a mut TcpStream,
    shared: &'a Shared,
}

impl FrameReader<'_> {
    /// One frame body. `deadline` bounds the wait for the frame to begin (None: wait while the
    /// server runs); once it has begun the rest must come within the frame timeout.
    fn read(&mut self, deadline: Option<Instant>, max_len: usize) -> Result<Vec<u8>, ReadError> {
        let mut deadline = deadline;
        let mut started = false;
        let mut prefix = [0u8; 4];
        self.fill(&mut prefix, &mut deadline, &mut started)?;
        let len = check_frame_len(prefix).map_err(ReadError::Protocol)?;
        if len > max_len {
            return Err(ReadError::Protocol(ProtocolError::TooLarge {
                len: len as u64,
                max: max_len,
            }));
        }
        // Grow with the data actually received, so a large claimed length costs nothing up front.
        let mut body = Vec::new();
        while body.len() < len {
            let start = body.len();
            body.resize(start + (len - start).min(64 << 10), 0);
            self.fill(&mut body[start..], &mut deadline, &mut started)?;
        }
        Ok(body)
    }

    fn fill(
        &mut self,
        buf: &mut [u8],
        deadline: &mut Option<Instant>,
        started: &mut bool,
    ) -> Result<(), ReadError> {
        let mut got = 0;
        while got < buf.len() {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Err(ReadError::Shutdown);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ReadError::TimedOut);
            }
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if *started => return Err(ReadError::Truncated),
                Ok(0) => return Err(ReadError::Closed),
                Ok(n) => {
                    got += n;
                    if !*started {
                        *started = true;
                        let frame_deadline = Instant::now() + self.shared.options.frame_timeout;
                        *deadline =
                            Some(deadline.map_or(frame_deadline, |d| d.min(frame_deadline)));
                    }
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(err) => return Err(ReadError::Io(err)),
            }
        }
        Ok(())
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    if stream.set_read_timeout(Some(POLL)).is_err()
        || stream
            .set_write_timeout(Some(shared.options.frame_timeout))
            .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);

    // Handshake: the first frame must be a Hello with our version and token.
    let deadline = Some(Instant::now() + shared.options.handshake_timeout);
    let hello = FrameReader {
        stream: &mut stream,
        shared,
    }
    .read(deadline, MAX_HELLO_FRAME);
    let verdict = match hello {
        Ok(body) => match Request::decode(&body) {
            Ok(Request::Hello { version, .. }) if version != VERSION => Err(format!(
                "protocol version {version}, this server speaks {VERSION} (use the same launcher build on every node)"
            )),
            Ok(Request::Hello { token, .. }) if !constant_time_eq(&token, &shared.token) => Err(format!(
                "wrong token (every node must share the run's secret: the same --run-id or {})",
                crate::env::STORE_TOKEN_VAR
            )),
            Ok(Request::Hello { .. }) => Ok(()),
            Ok(_) => Err("the first message must be a hello with the run's token".into()),
            Err(err) => Err(format!("bad hello: {err}")),
        },
        // The shutdown wake-up (and port scanners) connect and close without a word.
        Err(ReadError::Closed | ReadError::Shutdown) => return,
        Err(err) => Err(format!("bad hello: {}", err.describe())),
    };
    if let Err(reason) = verdict {
        tracing::warn!("rendezvous store: rejected connection from {peer}: {reason}");
        shared.reject(&mut stream, &reason);
        return;
    }
    if write_frame(&mut stream, &Response::Ok.encode()).is_err() {
        return;
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);

    loop {
        let body = match (FrameReader {
            stream: &mut stream,
            shared,
        })
        .read(None, super::protocol::MAX_FRAME)
        {
            Ok(body) => body,
            Err(ReadError::Closed | ReadError::Shutdown) => return,
            Err(err) => {
                let reason = err.describe();
                tracing::warn!("rendezvous store: closing connection from {peer}: {reason}");
                shared.reject(&mut stream, &reason);
                return;
            }
        };
        let response = match Request::decode(&body) {
            Ok(request) => shared.handle(request),
            Err(err) => {
                // The byte stream can no longer be trusted to be in step: answer and close.
                let reason = format!("malformed request: {err}");
                tracing::warn!("rendezvous store: closing connection from {peer}: {reason}");
                shared.reject(&mut stream, &reason);
                return;
            }
        };
        if write_frame(&mut stream, &response.encode()).is_err() {
            return;
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// Counts a rejection and tells the peer why (best effort; it may be gone).
    fn reject(&self, stream: &mut TcpStream, reason: &str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let _ = write_frame(stream, &Response::Error(reason.to_string()).encode());
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the map half-updated (every update is one statement), so
        // a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn handle(&self, request: Request) -> Response {
        match request {
            Request::Hello { .. } => Response::Error("hello sent twice".into()),
            Request::Ping => Response::Ok,
            Request::Set { key, value } => {
                let mut state = self.lock();
                match state.insert(key, value) {
                    Ok(()) => {
                        self.changed.notify_all();
                        Response::Ok
                    }
                    Err(full) => full,
                }
            }
            Request::Get { key, timeout_ms } => {
                let state = self.lock();
                if timeout_ms == 0 {
                    return state
                        .kv
                        .get(&key)
                        .cloned()
                        .map_or(Response::Missing, Response::Value);
                }
                let (state, found) =
                    self.wait_until(state, timeout_ms, |s| s.kv.contains_key(&key));
                match found {
                    Some(true) => state
                        .kv
                        .get(&key)
                        .cloned()
                        .map_or(Response::Timeout, Response::Value),
                    Some(false) => Response::Timeout,
                    None => Response::Error("server shutting down".into()),
                }
            }
            Request::Wait { keys, timeout_ms } => {
                let state = self.lock();
                let (state, found) = self.wait_until(state, timeout_ms, |s| {
                    keys.iter().all(|k| s.kv.contains_key(k))
                });
                drop(state);
                match found {
                    Some(true) => Response::Ok,
                    Some(false) => Response::Timeout,
                    None => Response::Error("server shutting down".into()),
                }
            }
            Request::Add { key, delta } => {
                let mut state = self.lock();
                let current = match state.kv.get(&key) {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                    {
                        Some(n) => n,
                        None => {
                            return Response::Error(format!(
                                "the value at '{key}' is not an integer"
                            ))
                        }
                    },
                };
                let Some(next) = current.checked_add(delta) else {
                    return Response::Error(format!("adding {delta} to '{key}' overflows"));
                };
                match state.insert(key, next.to_string().into_bytes()) {
                    Ok(()) => {
                        self.changed.notify_all();
                        Response::Int(next)
                    }
                    Err(full) => full,
                }
            }
            Request::CompareSet { key, expected, new } => {
                let mut state = self.lock();
                let matches = match (&expected, state.kv.get(&key)) {
                    (None, None) => true,
                    (Some(e), Some(c)) => e == c,
                    _ => false,
                };
                if matches {
                    if let Err(full) = state.insert(key.clone(), new) {
                        return full;
                    }
                    self.changed.notify_all();
                }
                Response::Swapped {
                    swapped: matches,
                    current: state.kv.get(&key).cloned(),
                }
            }
            Request::Delete { key } => {
                let mut state = self.lock();
                let existed = state.remove(&key);
                Response::Bool(existed)
            }
        }
    }

    /// Waits until `ready(state)` or the timeout: `Some(ready)`, or `None` if the server stops.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout_ms: u64,
        ready: impl Fn(&State) -> bool,
    ) -> (MutexGuard<'a, State>, Option<bool>) {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms).min(MAX_WAIT);
        loop {
            if ready(&state) {
                return (state, Some(true));
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return (state, None);
            }
            let now = Instant::now();
            if now >= deadline {
                return (state, Some(false));
            }
            state = match self.changed.wait_timeout(state, (deadline - now).min(POLL)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl State {
    fn insert(&mut self, key: String, value: Vec<u8>) -> Result<(), Response> {
        let old = self.kv.get(&key).map_or(0, |v| key.len() + v.len());
        let bytes = self.bytes - old + key.len() + value.len();
        if bytes > MAX_STORE_BYTES {
            return Err(Response::Error(format!(
                "the store is full ({MAX_STORE_BYTES} bytes); it is meant for small rendezvous values"
            )));
        }
        self.bytes = bytes;
        self.kv.insert(key, value);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(v) => {
                self.bytes -= key.len() + v.len();
                true
            }
            None => false,
        }
    }
}
