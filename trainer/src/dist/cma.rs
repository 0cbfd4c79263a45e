//! Single-copy transfers between the ranks of one host with Linux cross-memory attach (CMA):
//! a rank reads a peer's tensor straight out of the peer's address space with `process_vm_readv`
//! (and all_reduce writes results into peers with `process_vm_writev`), as Open MPI's vader BTL and
//! MPICH do. Every byte crosses memory once, where the segment copy
//! path (`cpu::run_copy`) writes it into the shared segment and copies it out again.
//!
//! Setup (`Cma::setup`, once per group, on the segment's header lines):
//! 1. every rank allows peers to read it (`prctl(PR_SET_PTRACER, ANY)`: needed where Yama's
//!    ptrace_scope is 1, harmless where Yama is absent) and publishes the address of a probe word
//!    holding a value derived from its rank and pid; barrier;
//! 2. every rank reads (and writes back) every peer's probe and publishes its vote (yes, off by `LLAVA_SCO_CPU_SHM_CMA=0`,
//!    or failed with the errno and the peer); barrier;
//! 3. every rank reads all votes: CMA is used only when every rank voted yes. All ranks see the
//!    same votes, so they all take the same path (ranks on different paths would deadlock).
//!    `LLAVA_SCO_CPU_SHM_CMA=1` makes a failed vote an error instead of a fallback.
//!
//! Per op, each rank publishes its tensor's address, byte length and a tag (op, dtype, reduction,
//! sequence number), waits at a barrier, checks that every rank called the same op on the same
//! size (a mismatch is the same error on every rank, before anyone reads), then reads:
//! - all_gather: peer q's input straight into out[q]; its own piece by memcpy.
//! - reduce_scatter: rank r reduces piece r in blocks of `block` bytes (L2-sized): each peer's
//!   block is read into that peer's scratch buffer, then `reduce_into` combines the blocks in rank
//!   order (its own block straight from its input) into out.
//! - all_reduce: the tensor is split in W near-equal pieces of whole elements (as the TCP path
//!   does). Rank r reduces piece r block by block as above, in place into its own tensor, and
//!   while each reduced block is in cache writes it into piece r of every peer's tensor
//!   (`process_vm_writev`). Only rank r reads or writes piece r of any tensor, and it reads each
//!   block before writing it, so no second phase or extra barrier is needed.
//! - broadcast: non-roots read the root's tensor.
//! - barrier: the tag alone (checked like every op's), then the closing barrier.
//!
//! Every op ends with a barrier: a rank must not return (and let its caller free or change the
//! tensor) while a peer may still read it. The header words an op publishes are reused by the
//! next op only after that barrier, so no rank reads a stale or a future address. Every element is
//! reduced exactly once, in rank order, by `reduce_into`, so the results are bitwise those of the
//! segment copy path and of the TCP path.
//!
//! Errors: a peer that dies mid-op makes `process_vm_readv` fail with ESRCH (or EFAULT while its
//! memory is torn down): `DistError::PeerLost` naming the rank; a peer that dies before or after
//! the transfers is caught by the barriers (they watch peers' pids and time out). Large tensors
//! are backed by 2 MiB huge pages first where the kernel allows (`thp.rs`; fewer pages to pin per
//! transfer; `LLAVA_SCO_CPU_SHM_HUGE=0` turns it off).
//!
//! Permissions: CMA needs ptrace-level access to the peer (same user, and Yama's ptrace_scope 0, or
//! 1 with the `PR_SET_PTRACER_ANY` above, which lets any process of this user attach to this rank,
//! as Open MPI does; no seccomp filter denying `process_vm_readv`). Where it is refused, the probe
//! fails and the group copies through the segment.
//!
//! Speed: the kernel pins the peer's pages and copies page by page, which on the 2-core VM of
//! BENCHMARKS.md runs at about 0.6-0.8x of a user-space memcpy (per-page pinning costs ~0.5 us), so
//! one CMA copy beats the copy path's two memcpys, but not by 2x.
use std::io;

use super::elem::{reduce_into, Elem};
use super::shm::Segment;
use super::thp::HugePages;
use super::{DistError, ReduceOp, Result};

/// `0`/`off`: copy through the segment; `1`/`on`: single-copy reads, an error where they do not
/// work; `auto` (default): single-copy reads where every rank can use them.
pub const CMA_VAR: &str = "LLAVA_SCO_CPU_SHM_CMA";
/// Testing only: the rank with this number votes as if reading its peers had been refused.
const DENY_VAR: &str = "LLAVA_SCO_CPU_SHM_CMA_DENY_RANK";
/// Bytes per reduction block (default: L2-sized, see `block_size`); tests use small odd blocks.
const BLOCK_VAR: &str = "LLAVA_SCO_CPU_SHM_CMA_BLOCK";

// Words of each rank's header line (Segment::FREE_WORD..Segment::WORDS). Per op: the tensor's
// address, its byte length, and the op's tag. Setup: the probe's address, the vote and its reason.
// Setup words are never reused, so a slow rank reading votes cannot see a fast rank's first op.
const W_ADDR: usize = 2;
const W_LEN: usize = 3;
const W_TAG: usize = 4;
const W_PROBE: usize = 5;
const W_VOTE: usize = 6;
const W_WHY: usize = 7;
/// Setup only (W_ADDR's first use is after setup's last barrier): the inbox peers write to.
const W_INBOX: usize = W_ADDR;

const VOTE_YES: u64 = 1;
const VOTE_OFF: u64 = 2;
const VOTE_FAILED: u64 = 3;
const VOTE_DENIED: u64 = 4;

/// What `LLAVA_SCO_CPU_SHM_CMA` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    On,
    Auto,
}

impl Mode {
    pub fn from_env() -> Result<Mode> {
        match std::env::var(CMA_VAR).as_deref() {
            Ok("0") | Ok("off") => Ok(Mode::Off),
            Ok("1") | Ok("on") => Ok(Mode::On),
            Ok("auto") | Ok("") | Err(_) => Ok(Mode::Auto),
            Ok(other) => Err(DistError::Invalid(format!(
                "{CMA_VAR}={other:?}: expected 0, 1 or auto"
            ))),
        }
    }
}

/// The single-copy transport of one group (the segment still carries the barriers).
pub struct Cma {
    rank: usize,
    world: usize,
    pids: Vec<i32>,
    /// Per peer, one block of its data for the reduction (empty for this rank); u64 storage keeps
    /// every dtype aligned.
    scratch: Vec<Vec<u64>>,
    /// Bytes per reduction block: a multiple of 8, so of every dtype's size.
    block: usize,
    /// Which tensors that peers access get huge pages first (see `thp`).
    huge: HugePages,
    /// Collectives run so far (part of the tag: ranks out of step are an error, not garbage).
    seq: u64,
}

/// The probe word's expected value for a rank: a wrong pid (another PID namespace) reads
/// something else or nothing.
fn probe_value(rank: usize, pid: i32) -> u64 {
    0x434d_4150_524f_4245 ^ ((rank as u64) << 32) ^ pid as u32 as u64
}

/// Reduction block bytes: about half an L2 (512 KiB) across the W blocks a step touches (W - 1
/// scratch blocks and this rank's own), at least 16 KiB; `LLAVA_SCO_CPU_SHM_CMA_BLOCK` overrides.
fn block_size(world: usize) -> usize {
    if let Some(b) = std::env::var(BLOCK_VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return (b & !7).max(8);
    }
    ((512usize << 10) / world.max(1)).clamp(16 << 10, 256 << 10) & !4095
}

/// Which way `transfer` copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// peer -> this process (`process_vm_readv`)
    Read,
    /// this process -> peer (`process_vm_writev`)
    Write,
}

/// Copies `len` bytes between `local` in this process and `remote` in process `pid` (direction
/// `dir`), looping on partial transfers.
fn transfer(pid: i32, remote: u64, local: *mut u8, len: usize, dir: Dir) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(1 << 30);
        let local_iov = libc::iovec {
            iov_base: local.wrapping_add(done) as *mut libc::c_void,
            iov_len: n,
        };
        let remote_iov = libc::iovec {
            iov_base: (remote as usize).wrapping_add(done) as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: the local range lies in a live tensor or buffer of this process that nothing
        // else touches during the call; the remote range is a peer's tensor range that, by the
        // protocol of the op (module doc), only this rank accesses during the call.
        let r = unsafe {
            match dir {
                Dir::Read => libc::process_vm_readv(pid, &local_iov, 1, &remote_iov, 1, 0),
                Dir::Write => libc::process_vm_writev(pid, &local_iov, 1, &remote_iov, 1, 0),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            // no progress: the remote range is not (or no longer) mapped
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        done += r as usize;
    }
    Ok(())
}

/// Whether `pid` is a live process (not gone, not a zombie). When /proc cannot be read for
/// another reason (no file descriptors left, /proc restricted), `kill(pid, 0)` decides: only "no
/// such process" is gone.
pub(crate) fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // the state is the first field after the command name in parentheses
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
            .unwrap_or(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => {
            // SAFETY: kill with signal 0 only checks that the process exists.
            let r = unsafe { libc::kill(pid, 0) };
            r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        }
    }
}

/// An op's tag bits below the sequence number (which `exchange` adds from bit 24): op kind,
/// dtype, and reduction (or root).
fn tag(kind: u64, elem: Elem, extra: u64) -> u64 {
    let e = match elem {
        Elem::F32 => 1,
        Elem::F64 => 2,
        Elem::BF16 => 3,
        Elem::F16 => 4,
        Elem::I64 => 5,
    };
    ((extra & 0xffff) << 8) | (kind << 4) | e
}

fn op_name(tag: u64) -> &'static str {
    match (tag >> 4) & 0xf {
        1 => "all_gather",
        2 => "reduce_scatter",
        3 => "all_reduce",
        4 => "broadcast",
        5 => "barrier",
        _ => "an unknown collective",
    }
}

fn reduce_code(op: ReduceOp) -> u64 {
    match op {
        ReduceOp::Sum => 1,
        ReduceOp::Avg => 2,
        ReduceOp::Max => 3,
    }
}

impl Cma {
    /// Decides together with every rank of `seg` whether the ops read peers directly (see the
    /// module doc): Some(Cma) when every rank can, None for the segment copy path.
    pub fn setup(seg: &mut Segment, mode: Mode) -> Result<Option<Cma>> {
        let (rank, world) = (seg.rank, seg.world);
        let what = "cpu backend setup";
        if mode != Mode::Off {
            // SAFETY: prctl with integer arguments; fails harmlessly (EINVAL) without Yama.
            unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
        }
        let pids: Vec<i32> = (0..world).map(|r| seg.pid(r)).collect();
        // the probe and the inbox live until after the second barrier, when every peer has read
        // the one and written its slot of the other
        let probe = Box::new(probe_value(rank, pids[rank]));
        let inbox = vec![0u64; world];
        seg.publish(W_PROBE, &*probe as *const u64 as u64);
        seg.publish(W_INBOX, inbox.as_ptr() as u64);
        seg.barrier(what)?;
        let denied = std::env::var(DENY_VAR)
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        let (vote, why) = match mode {
            Mode::Off => (VOTE_OFF, 0),
            _ if denied == Some(rank) => (VOTE_DENIED, 0),
            _ => match probe_peers(seg, &pids) {
                Ok(()) => (VOTE_YES, 0),
                Err((q, errno)) => (VOTE_FAILED, ((q as u64) << 32) | errno as u32 as u64),
            },
        };
        seg.publish(W_WHY, why);
        seg.publish(W_VOTE, vote);
        seg.barrier(what)?;
        drop((probe, inbox));
        let refusal = (0..world).find_map(|r| {
            let (vote, why) = (seg.peer_word(r, W_VOTE), seg.peer_word(r, W_WHY));
            let (q, errno) = ((why >> 32) as usize, (why & 0xffff_ffff) as i32);
            match vote {
                VOTE_YES => None,
                VOTE_OFF => Some(format!("rank {r} has {CMA_VAR}=0")),
                VOTE_DENIED => Some(format!("rank {r} was told to refuse by {DENY_VAR} (testing)")),
                VOTE_FAILED if errno == 0 => Some(format!(
                    "rank {r} read a wrong value from rank {q}'s memory (process {}): are the ranks in different PID namespaces (containers)?",
                    pids.get(q).copied().unwrap_or(0)
                )),
                VOTE_FAILED => Some(format!(
                    "rank {r} cannot read rank {q}'s memory (process {}): process_vm_readv: {}",
                    pids.get(q).copied().unwrap_or(0),
                    io::Error::from_raw_os_error(errno)
                )),
                other => Some(format!("rank {r} published vote {other} (a different build?)")),
            }
        });
        match refusal {
            None => {
                if rank == 0 {
                    tracing::debug!("cpu backend: shared memory with single-copy reads (cross-memory attach)");
                }
                let block = block_size(world);
                let scratch = (0..world)
                    .map(|q| if q == rank { Vec::new() } else { vec![0u64; block / 8] })
                    .collect();
                Ok(Some(Cma {
                    rank,
                    world,
                    pids,
                    scratch,
                    block,
                    huge: HugePages::from_env(),
                    seq: 0,
                }))
            }
            Some(why) if mode == Mode::On => Err(DistError::Unavailable {
                backend: "cpu",
                what: format!("cross-memory attach ({CMA_VAR}=1) does not work here: {why} (processes of one user may read each other unless ptrace is restricted: check /proc/sys/kernel/yama/ptrace_scope (<= 1), seccomp profiles (docker: --cap-add SYS_PTRACE), or unset {CMA_VAR} to fall back to copying through the segment)"),
            }),
            Some(why) => {
                if rank == 0 {
                    tracing::info!("cpu backend: cross-memory attach unavailable ({why}); copying through the shared segment");
                }
                Ok(None)
            }
        }
    }

    /// The other ranks, starting after this one (so that with W > 2 not every rank reads rank 0
    /// first).
    fn others(&self) -> impl Iterator<Item = usize> {
        let (rank, world) = (self.rank, self.world);
        (1..world).map(move |i| (rank + i) % world)
    }

    fn access_err(&self, q: usize, op: &str, e: io::Error) -> DistError {
        let pid = self.pids[q];
        match e.raw_os_error() {
            Some(libc::ESRCH) => DistError::PeerLost {
                rank: q,
                op: op.to_string(),
                detail: format!("process {pid} is gone (process_vm_readv: {e})"),
            },
            Some(libc::EFAULT) if !alive(pid) => DistError::PeerLost {
                rank: q,
                op: op.to_string(),
                detail: format!("process {pid} exited while this rank accessed its tensor"),
            },
            Some(libc::EPERM) => DistError::Invalid(format!(
                "{op}: accessing rank {q}'s tensor (process {pid}) was refused: {e} (did a rank change its credentials after setup? {CMA_VAR}=0 copies through the segment instead)"
            )),
            _ => DistError::Invalid(format!(
                "{op}: accessing rank {q}'s tensor (process {pid}) failed: {e} (did rank {q} free or resize the tensor during the collective? {CMA_VAR}=0 copies through the segment instead)"
            )),
        }
    }

    fn read(&self, q: usize, op: &str, remote: u64, local: *mut u8, len: usize) -> Result<()> {
        transfer(self.pids[q], remote, local, len, Dir::Read).map_err(|e| self.access_err(q, op, e))
    }

    /// Writes `len` bytes from `local` to `remote` in rank q's tensor.
    fn write(&self, q: usize, op: &str, remote: u64, local: *const u8, len: usize) -> Result<()> {
        transfer(self.pids[q], remote, local as *mut u8, len, Dir::Write)
            .map_err(|e| self.access_err(q, op, e))
    }

    /// Publishes this rank's tensor (address, byte length) and the op's tag, waits for every rank,
    /// checks that all called the same op on the same size, and returns every rank's address.
    fn exchange(
        &mut self,
        seg: &mut Segment,
        op: &str,
        tag_bits: u64,
        addr: *const u8,
        len: usize,
    ) -> Result<Vec<u64>> {
        self.seq += 1;
        let mine = (self.seq << 24) | tag_bits;
        self.huge.prepare(addr, len);
        seg.publish(W_ADDR, addr as u64);
        seg.publish(W_LEN, len as u64);
        seg.publish(W_TAG, mine);
        seg.barrier(op)?;
        for q in 0..self.world {
            let (theirs, qlen) = (seg.peer_word(q, W_TAG), seg.peer_word(q, W_LEN));
            if theirs != mine {
                return Err(DistError::Invalid(format!(
                    "{op}: rank {q} is in collective #{} ({}) and rank {} in collective #{} ({op}), or they differ in dtype or reduction: every rank must call the same collectives in the same order",
                    theirs >> 24,
                    op_name(theirs),
                    self.rank,
                    self.seq
                )));
            }
            if qlen != len as u64 {
                return Err(DistError::Invalid(format!(
                    "{op}: rank {q} passed a tensor of {qlen} bytes and rank {} one of {len}: every rank must pass the same size",
                    self.rank
                )));
            }
        }
        Ok((0..self.world).map(|q| seg.peer_word(q, W_ADDR)).collect())
    }

    /// dst[..len] = reduction in rank order over the ranks' bytes `offset..offset + len` of their
    /// tensors, block by block: peers' blocks are read into the scratch buffers, this rank's comes
    /// straight from `own` (its bytes at `offset`). `dst` may be `own` (in place). With `push`,
    /// each reduced block is then written to the same bytes of every peer's tensor, while it is
    /// still in this core's cache (all_reduce).
    #[allow(clippy::too_many_arguments)]
    fn reduce_piece(
        &mut self,
        op_name: &str,
        peers: &[u64],
        offset: usize,
        own: *const u8,
        dst: *mut u8,
        len: usize,
        elem: Elem,
        op: ReduceOp,
        push: bool,
    ) -> Result<()> {
        let es = elem.size();
        let mut srcs: Vec<*const u8> = vec![std::ptr::null(); self.world];
        let mut off = 0;
        while off < len {
            let c = self.block.min(len - off);
            for q in self.others() {
                let buf = self.scratch[q].as_mut_ptr() as *mut u8;
                self.read(q, op_name, peers[q] + (offset + off) as u64, buf, c)?;
                srcs[q] = buf;
            }
            srcs[self.rank] = own.wrapping_add(off);
            // SAFETY: c / es elements in every scratch block, in `own` and in `dst` from `off`;
            // dst aliases `own` exactly or not at all.
            unsafe { reduce_into(elem, op, &srcs, dst.wrapping_add(off), c / es) };
            if push {
                for q in self.others() {
                    let at = peers[q] + (offset + off) as u64;
                    self.write(q, op_name, at, dst.wrapping_add(off), c)?;
                }
            }
            off += c;
        }
        Ok(())
    }

    /// A barrier that checks, as every op does, that every rank called it: a rank that meets
    /// the others while they are in another collective gets the same error they do, instead of
    /// passing a barrier its peers never entered.
    pub fn barrier(&mut self, seg: &mut Segment) -> Result<()> {
        let name = "barrier";
        self.exchange(seg, name, 5 << 4, std::ptr::null(), 0)?;
        // (peers may still compare the words just published: the next op waits for them)
        seg.barrier(name)
    }

    /// out (W * n bytes) = every rank's input (n bytes), in rank order.
    pub fn all_gather(
        &mut self,
        seg: &mut Segment,
        input: *const u8,
        out: *mut u8,
        n: usize,
        elem: Elem,
    ) -> Result<()> {
        let name = "all_gather";
        // (exchanged even when empty: a rank with nothing to do must still be checked against
        // the others and keep its collective count in step with theirs)
        let peers = self.exchange(seg, name, tag(1, elem, 0), input, n)?;
        if n == 0 {
            // every rank has nothing to do (and null pointers); the barrier keeps a rank from
            // publishing its next op's words while a peer still compares these
            return seg.barrier(name);
        }
        let mine = out.wrapping_add(self.rank * n);
        if !std::ptr::eq(input, mine) {
            // SAFETY: n bytes of the input and of this rank's piece of out, either the same
            // range (in place, skipped) or distinct tensors.
            unsafe { std::ptr::copy_nonoverlapping(input, mine, n) };
        }
        for q in self.others() {
            self.read(q, name, peers[q], out.wrapping_add(q * n), n)?;
        }
        seg.barrier(name)
    }

    /// out (n bytes) on rank r = reduction over ranks of bytes r*n .. (r+1)*n of their inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_scatter(
        &mut self,
        seg: &mut Segment,
        input: *const u8,
        out: *mut u8,
        n: usize,
        elem: Elem,
        op: ReduceOp,
    ) -> Result<()> {
        let name = "reduce_scatter";
        let tag_bits = tag(2, elem, reduce_code(op));
        let peers = self.exchange(seg, name, tag_bits, input, n * self.world)?;
        if n == 0 {
            return seg.barrier(name); // (see all_gather)
        }
        let at = self.rank * n;
        self.reduce_piece(
            name,
            &peers,
            at,
            input.wrapping_add(at),
            out,
            n,
            elem,
            op,
            false,
        )?;
        seg.barrier(name)
    }

    /// In place: the tensor (pieces given as (byte offset, byte length) per rank, whole elements)
    /// becomes the reduction over ranks.
    pub fn all_reduce(
        &mut self,
        seg: &mut Segment,
        tensor: *mut u8,
        pieces: &[(usize, usize)],
        elem: Elem,
        op: ReduceOp,
    ) -> Result<()> {
        let name = "all_reduce";
        let n: usize = pieces.iter().map(|p| p.1).sum();
        let tag_bits = tag(3, elem, reduce_code(op));
        let peers = self.exchange(seg, name, tag_bits, tensor, n)?;
        if n == 0 {
            return seg.barrier(name); // (see all_gather)
        }
        let (lo, len) = pieces[self.rank];
        let mine = tensor.wrapping_add(lo);
        // piece r, in place, each reduced block pushed into piece r of every peer's tensor (which
        // only this rank reads, and only before it writes it); meanwhile the peers do the same
        // with the other pieces of this rank's tensor
        self.reduce_piece(name, &peers, lo, mine, mine, len, elem, op, true)?;
        seg.barrier(name)
    }

    /// In place: every rank's tensor (n bytes) becomes `root`'s.
    pub fn broadcast(
        &mut self,
        seg: &mut Segment,
        tensor: *mut u8,
        n: usize,
        elem: Elem,
        root: usize,
    ) -> Result<()> {
        let name = "broadcast";
        let peers = self.exchange(seg, name, tag(4, elem, root as u64), tensor, n)?;
        if n == 0 {
            return seg.barrier(name); // (see all_gather)
        }
        if self.rank != root {
            self.read(root, name, peers[root], tensor, n)?;
        }
        seg.barrier(name)
    }
}

/// Reads every peer's probe word and writes this rank's probe value into its slot of the peer's
/// inbox (all_reduce writes into peers' tensors): Err((peer, errno)) for the first that fails
/// (errno 0: the read worked but found another value).
fn probe_peers(seg: &Segment, pids: &[i32]) -> std::result::Result<(), (usize, i32)> {
    let errno = |q: usize| move |e: io::Error| (q, e.raw_os_error().unwrap_or(libc::EIO));
    for q in (0..seg.world).filter(|&q| q != seg.rank) {
        let mut got = 0u64;
        let local = &mut got as *mut u64 as *mut u8;
        transfer(pids[q], seg.peer_word(q, W_PROBE), local, 8, Dir::Read).map_err(errno(q))?;
        if got != probe_value(q, pids[q]) {
            return Err((q, 0));
        }
        let mine = probe_value(seg.rank, pids[seg.rank]);
        let slot = seg.peer_word(q, W_INBOX) + 8 * seg.rank as u64;
        let local = &mine as *const u64 as *mut u8;
        transfer(pids[q], slot, local, 8, Dir::Write).map_err(errno(q))?;
    }
    Ok(())
}
