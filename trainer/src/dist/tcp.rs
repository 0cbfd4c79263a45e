//! The CPU backend's TCP transport, for ranks on several hosts (a host = a launcher node).
//!
//! Setup: every rank listens on the interface that routes to MASTER_ADDR, publishes `ip:port`
//! through the launcher's store, connects to every lower rank and accepts every higher one (a full
//! mesh; each connection starts with a handshake carrying the rank and the store token).
//!
//! Ops, in chunks of at most `chunk` bytes, each message framed by a 16-byte header (op, length) so
//! ranks that call different collectives get an error instead of garbage:
//! - all_gather: a ring. At step s rank r sends block r-s to r+1 and receives block r-s-1 from
//!   r-1; a block received is forwarded chunk by chunk as soon as it arrived (pipelined: a sender
//!   thread and the receiving thread run at once).
//! - reduce_scatter: direct. For chunk k, at step s rank r sends its contribution to piece r+s to
//!   rank r+s and receives rank r-s's contribution to piece r; once all W contributions of a chunk
//!   are there they are reduced *in rank order* 0..W-1 by `reduce_into`, the function the shared
//!   memory path uses. A ring reduce-scatter would add the contributions in a rank-dependent order
//!   (piece c starts at rank c+1); this schedule sends and receives the same (W-1)/W of the data
//!   per rank and gives bitwise the results of the shm path. Its cost: with several ranks per node,
//!   more bytes cross the node boundary than in a ring.
//! - all_reduce: reduce_scatter of W near-equal pieces in place, then the ring all_gather.
//! - broadcast: a pipelined chain root, root+1, ..., root-1. barrier: a ring all_gather of nothing.
//!
//! Errors: a closed or reset connection names the peer; a peer silent for the timeout is a
//! timeout naming it. The first rank to see a failure records the rank it blames under
//! `dist/tcp/a{attempt}/lost` in the store *before* it closes its own connections, so a rank that
//! then sees *its* connection close reports the rank that really stopped answering.
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use launcher::env::RankEnv;
use launcher::store::{CompareSet, StoreClient};

use super::elem::{reduce_into, Elem};
use super::{DistError, ReduceOp, Result};

const MAGIC: &[u8; 8] = b"LSCOTCP1";
/// How often a blocked read or write wakes to check the abort flag and the timeout.
const POLL: Duration = Duration::from_millis(100);

/// What a message belongs to (checked by the receiver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    AllGather = 1,
    ReduceScatter = 2,
    AllReduce = 3,
    Broadcast = 4,
    Barrier = 5,
}

impl Code {
    fn name(b: u8) -> &'static str {
        match b {
            1 => "all_gather",
            2 => "reduce_scatter",
            3 => "all_reduce",
            4 => "broadcast",
            5 => "barrier",
            _ => "garbage",
        }
    }
}

/// A pointer that may cross into the sender thread of one op (the op's tensors outlive it).
#[derive(Clone, Copy)]
pub struct Ptr(pub *mut u8);
// SAFETY: the threads of one op touch disjoint ranges, or hand ranges over through a channel.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// `len` bytes at `p + off` (empty for a zero length, whatever the pointer).
///
/// # Safety
/// The range must lie in a live buffer that no other thread writes meanwhile.
unsafe fn bytes<'a>(p: Ptr, off: usize, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(p.0.add(off), len)
}

/// The chunks (offset, length) of a block of `len` bytes: at least one, possibly empty, so that
/// every step of every op sends a message (a barrier is made of empty messages).
fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = len.div_ceil(chunk).max(1);
    (0..n).map(move |i| (i * chunk, chunk.min(len - i * chunk)))
}

pub struct Mesh {
    pub rank: usize,
    pub world: usize,
    /// Connection to every other rank (None at this rank's index).
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
    store: Mutex<StoreClient>,
    lost_key: String,
    chunk: usize,
    /// W chunks: received contributions of one chunk (u64 for alignment of every dtype).
    staging: Vec<u64>,
    /// The dtype and the reduction (or broadcast root) of the op about to run
    /// ([`Mesh::set_signature`]), sent in every message header: ranks that call one op with other
    /// dtypes, reductions or roots of the same byte size get an error, not each other's bytes
    /// reinterpreted (or, for two roots, no data at all and the next op's read as theirs).
    signature: [u8; 3],
}

/// The IP of the interface that routes to MASTER_ADDR (no packet is sent), so peers on other
/// hosts can reach this rank; LLAVA_SCO_CPU_TCP_ADDR overrides it.
fn local_ip(env: &RankEnv) -> Result<IpAddr> {
    if let Ok(v) = std::env::var("LLAVA_SCO_CPU_TCP_ADDR") {
        return v.parse().map_err(|e| {
            DistError::Invalid(format!(
                "LLAVA_SCO_CPU_TCP_ADDR={v:?} is not an IP address: {e}"
            ))
        });
    }
    let probe = || -> std::io::Result<IpAddr> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((env.master_addr.as_str(), env.master_port))?;
        Ok(s.local_addr()?.ip())
    };
    let ip = probe().map_err(|e| {
        DistError::Invalid(format!(
            "cpu backend (tcp): cannot find the interface that reaches MASTER_ADDR {}: {e} (set LLAVA_SCO_CPU_TCP_ADDR to this host's address)",
            env.master_addr
        ))
    })?;
    check_reachable(ip, env)
}

/// A loopback address cannot be reached from the other nodes' ranks (they would dial their own
/// host until the timeout): an error when the group spans nodes. This happens on the master node
/// when MASTER_ADDR is 127.0.0.1 or a host name that resolves to 127.0.1.1.
fn check_reachable(ip: IpAddr, env: &RankEnv) -> Result<IpAddr> {
    if ip.is_loopback() && env.group_world_size > 1 {
        return Err(DistError::Invalid(format!(
            "cpu backend (tcp): this rank would listen on the loopback address {ip} (the interface that reaches MASTER_ADDR {}), which ranks on the other {} node(s) cannot reach; give the launcher this node's network address with --master-addr, or set LLAVA_SCO_CPU_TCP_ADDR to it (LLAVA_SCO_CPU_TCP_ADDR=127.0.0.1 when every \"node\" is this host)",
            env.master_addr,
            env.group_world_size - 1
        )));
    }
    Ok(ip)
}

fn io_err(peer: usize, op: &str, what: &str, e: std::io::Error) -> DistError {
    DistError::PeerLost {
        rank: peer,
        op: op.to_string(),
        detail: format!("{what}: {e}"),
    }
}

impl Mesh {
    /// Connects every pair of ranks (see the module doc).
    pub fn connect(env: &RankEnv, mut store: StoreClient, timeout: Duration) -> Result<Mesh> {
        let (rank, world) = (env.rank, env.world_size);
        let token = env.store_token.clone().unwrap_or_default();
        let ip = local_ip(env)?;
        let listener = TcpListener::bind((ip, 0)).map_err(|e| {
            DistError::Invalid(format!("cpu backend (tcp): cannot listen on {ip}: {e}"))
        })?;
        let me = listener
            .local_addr()
            .map_err(|e| DistError::Invalid(format!("cpu backend (tcp): {e}")))?;
        let key = format!("dist/tcp/a{}", env.restart_count);
        store.set(&format!("{key}/addr/{rank}"), me.to_string().as_bytes())?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (q, slot) in peers.iter_mut().enumerate().take(rank) {
            let addr = store.get_timeout(&format!("{key}/addr/{q}"), timeout)?;
            let addr: SocketAddr = String::from_utf8_lossy(&addr).parse().map_err(|e| {
                DistError::Invalid(format!("rank {q} published a bad address: {e}"))
            })?;
            *slot = Some(dial(addr, rank, q, &token, deadline, timeout)?);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| DistError::Invalid(format!("cpu backend (tcp): {e}")))?;
        while let Some(missing) = (rank + 1..world).find(|&q| peers[q].is_none()) {
            match listener.accept() {
                Ok((s, _)) => {
                    // a stray or bad connection is dropped, not fatal
                    if let Some(q) = greet(s.try_clone().ok(), rank, world, &token) {
                        if peers[q].is_none() {
                            peers[q] = Some(s);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(DistError::Timeout {
                            op: "tcp connect".into(),
                            secs: timeout.as_secs(),
                            ranks: (missing..world).filter(|&q| peers[q].is_none()).collect(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    return Err(DistError::Invalid(format!(
                        "cpu backend (tcp): accept: {e}"
                    )))
                }
            }
        }
        for (q, s) in peers.iter().enumerate() {
            if let Some(s) = s {
                let setup = s
                    .set_nodelay(true)
                    .and(s.set_read_timeout(Some(POLL)))
                    .and(s.set_write_timeout(Some(POLL)));
                setup.map_err(|e| io_err(q, "tcp connect", "socket options", e))?;
            }
        }
        let chunk = ((16usize << 20) / world).clamp(64 << 10, 1 << 20) & !7;
        Ok(Mesh {
            rank,
            world,
            peers,
            timeout,
            store: Mutex::new(store),
            lost_key: format!("{key}/lost"),
            chunk,
            staging: vec![0u64; world * chunk / 8],
            signature: [0; 3],
        })
    }

    /// The dtype and reduction the next op's messages carry (0: none).
    pub fn set_signature(
        &mut self,
        elem: Option<Elem>,
        reduce: Option<ReduceOp>,
        root: Option<usize>,
    ) {
        // (a root above 65535 would alias another; no run has that many ranks)
        let [lo, hi] = match (reduce, root) {
            (Some(r), _) => [r as u8 + 1, 0],
            (None, Some(root)) => (root as u16).to_le_bytes(),
            (None, None) => [0, 0],
        };
        self.signature = [elem.map_or(0, |e| e as u8 + 1), lo, hi];
    }

    fn link(&self, q: usize) -> &TcpStream {
        self.peers[q]
            .as_ref()
            .expect("a connection to every other rank")
    }

    /// Gives every peer the message that this rank is done: closes every connection.
    fn close_all(&self) {
        for s in self.peers.iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// all_gather: `pieces[q]` = (offset, length) of rank q's block in `buf`; this rank's block
    /// is already in place.
    pub fn all_gather(&self, buf: Ptr, pieces: &[(usize, usize)], code: Code) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let op = OpRun::new(self, code);
        let chunk = self.chunk;
        std::thread::scope(|scope| {
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            let op = &op;
            scope.spawn(move || {
                let send = || -> Result<()> {
                    for s in 0..w - 1 {
                        let (start, len) = pieces[(r + w - s) % w];
                        for (o, l) in chunks(len, chunk) {
                            if s > 0 {
                                // block r-s arrived at step s-1: forward each chunk once it is here
                                ready_rx.recv().map_err(|_| DistError::WorkerGone)?;
                            }
                            // SAFETY: this block is complete (own block, or announced by `ready`).
                            op.send(next, unsafe { bytes(buf, start + o, l) })?;
                        }
                    }
                    Ok(())
                };
                if let Err(e) = send() {
                    op.fail(e);
                }
            });
            let recv = || -> Result<()> {
                for s in 0..w - 1 {
                    let (start, len) = pieces[(r + 2 * w - s - 1) % w];
                    for (o, l) in chunks(len, chunk) {
                        // SAFETY: only this thread writes block r-s-1, and the sender reads it
                        // only after the `ready` below.
                        op.recv(prev, unsafe { bytes(buf, start + o, l) })?;
                        if s < w - 2 {
                            let _ = ready_tx.send(());
                        }
                    }
                }
                Ok(())
            };
            if let Err(e) = recv() {
                op.fail(e);
            }
            drop(ready_tx);
        });
        op.result()
    }

    /// reduce_scatter: rank q's contribution to piece p is `input[pieces[p]]` on rank q; this rank
    /// writes the reduction of piece `rank` to `out` (which may be `input + pieces[rank].0`).
    pub fn reduce_scatter(
        &mut self,
        input: Ptr,
        pieces: &[(usize, usize)],
        out: Ptr,
        elem: Elem,
        reduce: ReduceOp,
        code: Code,
    ) -> Result<()> {
        let (r, w, chunk) = (self.rank, self.world, self.chunk);
        let es = elem.size();
        let stage = Ptr(self.staging.as_mut_ptr() as *mut u8);
        let max_chunks = pieces
            .iter()
            .map(|&(_, l)| l.div_ceil(chunk).max(1))
            .max()
            .unwrap_or(1);
        let this = &*self;
        let op = OpRun::new(this, code);
        std::thread::scope(|scope| {
            let op = &op;
            scope.spawn(move || {
                let send = || -> Result<()> {
                    for k in 0..max_chunks {
                        for s in 1..w {
                            let p = (r + s) % w;
                            let (start, len) = pieces[p];
                            if let Some((o, l)) = chunks(len, chunk).nth(k) {
                                // SAFETY: pieces other than this rank's are only read here.
                                op.send(p, unsafe { bytes(input, start + o, l) })?;
                            }
                        }
                    }
                    Ok(())
                };
                if let Err(e) = send() {
                    op.fail(e);
                }
            });
            let recv = || -> Result<()> {
                let (start, len) = pieces[r];
                for (o, l) in chunks(len, chunk) {
                    for s in 1..w {
                        let q = (r + w - s) % w;
                        // SAFETY: slot q of the staging area is this thread's alone.
                        op.recv(q, unsafe { bytes(stage, q * chunk, l) })?;
                    }
                    if l == 0 {
                        continue; // an empty tensor's pointer may be null
                    }
                    let srcs: Vec<*const u8> = (0..w)
                        .map(|q| match q == r {
                            true => input.0.wrapping_add(start + o) as *const u8,
                            false => stage.0.wrapping_add(q * chunk) as *const u8,
                        })
                        .collect();
                    // SAFETY: W sources and the output hold l / es elements each; the output may
                    // alias this rank's own contribution (allowed by reduce_into).
                    unsafe { reduce_into(elem, reduce, &srcs, out.0.wrapping_add(o), l / es) };
                }
                Ok(())
            };
            if let Err(e) = recv() {
                op.fail(e);
            }
        });
        op.result()
    }

    /// broadcast along the chain root, root+1, ..., root-1, chunk by chunk.
    pub fn broadcast(&self, buf: Ptr, len: usize, root: usize) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let op = OpRun::new(self, Code::Broadcast);
        let run = || -> Result<()> {
            for (o, l) in chunks(len, self.chunk) {
                // SAFETY: the tensor is this op's alone.
                let data = unsafe { bytes(buf, o, l) };
                if r != root {
                    op.recv(prev, data)?;
                }
                if next != root {
                    op.send(next, data)?;
                }
            }
            // the chain's last rank acknowledges to the root (an empty message): ranks that
            // named other roots would otherwise each only send, return Ok, and leave their data
            // for the next op to read as its own; now a root reads a peer's data where it expects
            // the ack (the header carries the root and the length), an error. (With 3+ ranks a
            // rank in the middle of a chain may still return Ok; the closed connections of the
            // failing ones make its next op fail.)
            if next == root {
                op.send(next, &[])?;
            }
            if r == root {
                op.recv(prev, &mut [])?;
            }
            Ok(())
        };
        if let Err(e) = run() {
            op.fail(e);
        }
        op.result()
    }

    pub fn barrier(&self) -> Result<()> {
        let none = vec![(0, 0); self.world];
        self.all_gather(
            Ptr(std::ptr::NonNull::dangling().as_ptr()),
            &none,
            Code::Barrier,
        )
    }
}

/// Connects to rank `q` at `addr` (retrying until `deadline`: it may not listen yet) and
/// introduces this rank.
fn dial(
    addr: SocketAddr,
    rank: usize,
    q: usize,
    token: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                let mut hello = MAGIC.to_vec();
                hello.extend((rank as u32).to_le_bytes());
                hello.extend((token.len() as u32).to_le_bytes());
                hello.extend(token.as_bytes());
                let mut ack = [0u8; 4];
                let talk = s
                    .set_read_timeout(Some(timeout.min(Duration::from_secs(30))))
                    .and_then(|_| s.write_all(&hello))
                    .and_then(|_| s.read_exact(&mut ack));
                return match talk {
                    Ok(()) if u32::from_le_bytes(ack) as usize == q => Ok(s),
                    Ok(()) => Err(DistError::Invalid(format!(
                        "rank {q}'s address {addr} answered as rank {} (two runs sharing a store?)",
                        u32::from_le_bytes(ack)
                    ))),
                    Err(e) => Err(io_err(
                        q,
                        "tcp connect",
                        &format!("handshake with {addr} (wrong token?)"),
                        e,
                    )),
                };
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Err(DistError::PeerLost {
        rank: q,
        op: "tcp connect".into(),
        detail: format!(
            "cannot connect to {addr} within {} s: {last}",
            timeout.as_secs()
        ),
    })
}

/// Reads a connecting rank's handshake; Some(its rank) when it is a higher rank of this run.
fn greet(s: Option<TcpStream>, rank: usize, world: usize, token: &str) -> Option<usize> {
    let mut s = s?;
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = [0u8; 16];
    s.read_exact(&mut head).ok()?;
    let q = u32::from_le_bytes(head[8..12].try_into().ok()?) as usize;
    let n = u32::from_le_bytes(head[12..16].try_into().ok()?) as usize;
    if &head[..8] != MAGIC || n != token.len() || q <= rank || q >= world {
        return None;
    }
    let mut theirs = vec![0u8; n];
    s.read_exact(&mut theirs).ok()?;
    if theirs != token.as_bytes() {
        return None;
    }
    s.write_all(&(rank as u32).to_le_bytes()).ok()?;
    Some(q)
}

/// One op in flight: its message I/O with timeouts, and its first error.
struct OpRun<'m> {
    mesh: &'m Mesh,
    code: Code,
    aborted: AtomicBool,
    first: Mutex<Option<DistError>>,
}

impl<'m> OpRun<'m> {
    fn new(mesh: &'m Mesh, code: Code) -> Self {
        OpRun {
            mesh,
            code,
            aborted: AtomicBool::new(false),
            first: Mutex::new(None),
        }
    }

    fn name(&self) -> &'static str {
        Code::name(self.code as u8)
    }

    /// Records the op's first error (blaming the right rank through the store), then closes every
    /// connection so the other thread and the peers stop waiting. Later errors are consequences.
    fn fail(&self, e: DistError) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(self.blame(e));
            self.aborted.store(true, Ordering::Release);
            self.mesh.close_all();
        }
    }

    fn result(self) -> Result<()> {
        match self.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Which rank to name: the one the store already names (another rank saw it first), else
    /// `peer` of this error, recorded for the others.
    fn blame(&self, e: DistError) -> DistError {
        let (peer, detail) = match &e {
            DistError::PeerLost { rank, detail, .. } => (*rank, detail.clone()),
            DistError::Timeout { ranks, .. } if !ranks.is_empty() => {
                (ranks[0], "timed out".to_string())
            }
            _ => return e,
        };
        let me = self.mesh.rank;
        let mine = format!("{peer} {me}");
        let mut store = self.mesh.store.lock().unwrap_or_else(|p| p.into_inner());
        let known = match store.compare_set(&self.mesh.lost_key, None, mine.as_bytes()) {
            Ok(CompareSet::Swapped) => return e,
            Ok(CompareSet::Mismatch(Some(v))) => v,
            _ => return e,
        };
        let text = String::from_utf8_lossy(&known);
        let mut it = text.split(' ').map(|s| s.parse::<usize>().ok());
        match (it.next().flatten(), it.next().flatten()) {
            (Some(lost), Some(seen_by)) if lost != peer => DistError::PeerLost {
                rank: lost,
                op: self.name().to_string(),
                detail: format!("rank {seen_by} lost it first; here rank {peer}: {detail}"),
            },
            _ => e,
        }
    }

    fn check_wait(&self, peer: usize, since: Instant, what: &str) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(DistError::WorkerGone);
        }
        if since.elapsed() > self.mesh.timeout {
            return Err(DistError::Timeout {
                op: format!("{} ({what} rank {peer})", self.name()),
                secs: self.mesh.timeout.as_secs(),
                ranks: vec![peer],
            });
        }
        Ok(())
    }

    fn write_all(&self, peer: usize, mut data: &[u8]) -> Result<()> {
        let mut s = self.mesh.link(peer);
        let mut since = Instant::now();
        while !data.is_empty() {
            match s.write(data) {
                Ok(0) => return Err(self.lost(peer, "connection closed")),
                Ok(n) => {
                    data = &data[n..];
                    since = Instant::now();
                }
                Err(e) if is_wait(&e) => self.check_wait(peer, since, "sending to")?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(peer, self.name(), "send", e)),
            }
        }
        Ok(())
    }

    fn read_exact(&self, peer: usize, mut data: &mut [u8]) -> Result<()> {
        let mut s = self.mesh.link(peer);
        let mut since = Instant::now();
        while !data.is_empty() {
            match s.read(data) {
                Ok(0) => return Err(self.lost(peer, "connection closed")),
                Ok(n) => {
                    data = &mut std::mem::take(&mut data)[n..];
                    since = Instant::now();
                }
                Err(e) if is_wait(&e) => self.check_wait(peer, since, "waiting for")?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(peer, self.name(), "receive", e)),
            }
        }
        Ok(())
    }

    fn lost(&self, peer: usize, what: &str) -> DistError {
        if self.aborted.load(Ordering::Acquire) {
            return DistError::WorkerGone; // our own close_all, not the peer
        }
        DistError::PeerLost {
            rank: peer,
            op: self.name().to_string(),
            detail: what.to_string(),
        }
    }

    fn header(&self, len: usize) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(b"LSCM");
        h[4] = self.code as u8;
        h[5..8].copy_from_slice(&self.mesh.signature);
        h[8..].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    fn send(&self, peer: usize, data: &[u8]) -> Result<()> {
        self.write_all(peer, &self.header(data.len()))?;
        self.write_all(peer, data)
    }

    fn recv(&self, peer: usize, data: &mut [u8]) -> Result<()> {
        let mut h = [0u8; 16];
        self.read_exact(peer, &mut h)?;
        if h != self.header(data.len()) {
            let len = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
            let what = |code: u8, sig: &[u8]| {
                let param = u16::from_le_bytes([sig[1], sig[2]]);
                format!(
                    "{} [dtype {}, reduce/root {param}]",
                    Code::name(code),
                    sig[0]
                )
            };
            return Err(DistError::Invalid(format!(
                "rank {peer} sent {} data of {len} bytes while this rank expected {} data of {} bytes: the ranks called different collectives, dtypes, reductions, roots or sizes",
                what(h[4], &h[5..8]),
                what(self.code as u8, &self.mesh.signature),
                data.len()
            )));
        }
        self.read_exact(peer, data)
    }
}

fn is_wait(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_block_and_an_empty_block_has_one_message() {
        assert_eq!(chunks(0, 8).collect::<Vec<_>>(), vec![(0, 0)]);
        assert_eq!(chunks(8, 8).collect::<Vec<_>>(), vec![(0, 8)]);
        assert_eq!(
            chunks(20, 8).collect::<Vec<_>>(),
            vec![(0, 8), (8, 8), (16, 4)]
        );
    }

    #[test]
    fn loopback_is_refused_only_when_the_group_spans_nodes() {
        let mut env = RankEnv::single();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(check_reachable(lo, &env).unwrap(), lo);
        env.group_world_size = 2;
        let err = check_reachable(lo, &env).unwrap_err().to_string();
        assert!(
            err.contains("LLAVA_SCO_CPU_TCP_ADDR") && err.contains("--master-addr"),
            "{err}"
        );
        assert_eq!(check_reachable(lan, &env).unwrap(), lan);
    }
}
