//! The CPU backend: ranks on one host exchange data through a shared memory segment (`shm`);
//! ranks on several hosts (launcher nodes: GROUP_WORLD_SIZE > 1) over TCP (`tcp`, see there).
//! `LLAVA_SCO_CPU_TRANSPORT=shm|tcp|auto` forces one (auto: tcp when there are several nodes);
//! `Backend::Tcp` (`--backend tcp`) forces tcp. Both reduce in rank order with `reduce_into`, so
//! they give bitwise the same results.
//!
//! The shared memory path reads peers' tensors directly with cross-memory attach (`cma`, one copy
//! per byte) where every rank can; otherwise, or with `LLAVA_SCO_CPU_SHM_CMA=0`, it copies through
//! the segment (`run_copy`, below), which stays as the fallback and as the reference in tests.
//!
//! The segment copy path: every op runs in rounds over chunks of at most `chunk` bytes per rank
//! slot (W slots and a result area of `chunk` bytes each):
//! - all_gather: each rank writes its chunk to its slot; barrier; everyone copies all slots out.
//! - reduce_scatter: each rank writes the W pieces of its input for this round to its slot;
//!   barrier; rank r reduces piece r of every slot straight into its output.
//! - all_reduce: each rank writes its chunk; barrier; rank r reduces part r of the chunk into the
//!   shared result area; barrier; everyone copies the result out.
//!
//! A reduction happens exactly once per element, in rank order, so all ranks get bitwise equal
//! results. The segment holds two such areas and consecutive rounds (across ops too) alternate
//! between them: a rank that writes area A in round k+2 has passed the barrier of round k+1, so
//! every rank is done reading A from round k. That saves the trailing "done reading" barrier of
//! every round (on a busy 2-core machine each barrier can cost a scheduler time slice).
use std::sync::mpsc;
use std::time::Duration;

use launcher::env::RankEnv;
use launcher::store::StoreClient;
use tch::Tensor;

use super::cma::{self, Cma};
use super::elem::{reduce_into, Elem};
use super::shm::Segment;
use super::tcp::{Code, Mesh, Ptr};
use super::{expect_device, DistError, Engine, Finish, Op, Result};

/// Environment variable that picks the CPU backend's transport: shm, tcp or auto.
pub const TRANSPORT_VAR: &str = "LLAVA_SCO_CPU_TRANSPORT";

/// Candidate bytes per rank slot and round, largest first: up to 16 MiB (fewer rounds, so fewer
/// barriers, which are what a busy machine makes expensive), less for large groups so that the
/// segment (two areas of W + 1 slots) stays within 128 MiB, and less again when /dev/shm is small.
/// Multiples of 4 KiB (so of every dtype's size). `LLAVA_SCO_CPU_SHM_SLOT=BYTES` fixes it (tests
/// use it to force many rounds on small tensors).
fn slot_sizes(world: usize) -> Vec<usize> {
    if let Some(bytes) = std::env::var("LLAVA_SCO_CPU_SHM_SLOT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return vec![(bytes & !4095).max(4096)];
    }
    let top = ((64usize << 20) / (world + 1)).clamp(256 << 10, 16 << 20) & !4095;
    let mut sizes = vec![top];
    while *sizes.last().expect("one size") > 256 << 10 {
        sizes.push((sizes.last().expect("one size") / 4).max(256 << 10) & !4095);
    }
    sizes
}

/// The shared memory transport: the segment, its slot size, the round counter that picks the
/// area of each round (copy path), and the single-copy reads when every rank can use them.
struct Shm {
    seg: Segment,
    chunk: usize,
    round: u64,
    cma: Option<Cma>,
    /// Collectives run on the copy path so far (`check_same_op`).
    ops: u64,
}

impl Shm {
    /// Starts a round: the offset of the area it uses (alternating, see the module doc).
    fn next_area(&mut self) -> usize {
        self.round += 1;
        (self.round % 2) as usize * (self.seg.world + 1) * self.chunk
    }
}

type Job = (Op, mpsc::Sender<Result<()>>);

pub struct CpuEngine {
    jobs: mpsc::Sender<Job>,
    name: &'static str,
    transport: &'static str,
}

/// How the ranks of this group reach each other.
enum Transport {
    /// World size 1.
    Alone,
    Shm(Shm),
    Tcp(Mesh),
}

/// TCP when forced, or by `LLAVA_SCO_CPU_TRANSPORT`, or (auto) when the ranks span several nodes.
fn wants_tcp(env: &RankEnv, force_tcp: bool) -> Result<bool> {
    if force_tcp {
        return Ok(true);
    }
    match std::env::var(TRANSPORT_VAR).as_deref() {
        Ok("tcp") => Ok(true),
        Ok("shm") => Ok(false),
        Ok("auto") | Ok("") | Err(_) => Ok(env.group_world_size > 1),
        Ok(other) => Err(DistError::Invalid(format!(
            "{TRANSPORT_VAR}={other:?}: expected shm, tcp or auto"
        ))),
    }
}

impl CpuEngine {
    pub fn start(
        env: &RankEnv,
        store: Option<StoreClient>,
        timeout: Duration,
        force_tcp: bool,
        segment: &str,
    ) -> Result<CpuEngine> {
        let transport = match (env.world_size, store) {
            (1, _) => Transport::Alone,
            (_, None) => {
                return Err(DistError::Invalid(
                    "world size > 1 needs the launcher's store".into(),
                ))
            }
            (_, Some(store)) if wants_tcp(env, force_tcp)? => {
                Transport::Tcp(Mesh::connect(env, store, timeout)?)
            }
            (w, Some(mut store)) => {
                let mode = cma::Mode::from_env()?;
                same_host(env, &mut store, timeout)?;
                let sizes: Vec<usize> = slot_sizes(w).iter().map(|c| 2 * (w + 1) * c).collect();
                let mut seg = Segment::open(env, &mut store, segment, &sizes, timeout)?;
                let chunk = (seg.data_len() / (2 * (w + 1))) & !4095;
                let cma = Cma::setup(&mut seg, mode)?;
                Transport::Shm(Shm {
                    seg,
                    chunk,
                    round: 0,
                    cma,
                    ops: 0,
                })
            }
        };
        let (name, transport_name) = match &transport {
            Transport::Alone => ("cpu", "single"),
            Transport::Shm(Shm { cma: Some(_), .. }) => ("cpu", "shm-cma"),
            Transport::Shm(_) => ("cpu", "shm-copy"),
            Transport::Tcp(_) => ("tcp", "tcp"),
        };
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dist-cpu".into())
            .spawn(move || worker(transport, rx))
            .map_err(|e| {
                DistError::Invalid(format!("cannot start the communication thread: {e}"))
            })?;
        Ok(CpuEngine {
            jobs: tx,
            name,
            transport: transport_name,
        })
    }
}

impl Engine for CpuEngine {
    fn submit(&self, op: Op, done: mpsc::Sender<Result<()>>) -> Result<Option<Finish>> {
        self.jobs
            .send((op, done))
            .map_err(|_| DistError::WorkerGone)?;
        Ok(None)
    }
    fn name(&self) -> &'static str {
        self.name
    }
    fn transport(&self) -> &'static str {
        self.transport
    }
}

/// The shared memory path needs every rank on this host; across hosts the TCP path is required.
fn same_host(env: &RankEnv, store: &mut StoreClient, timeout: Duration) -> Result<()> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let key = format!("dist/host/a{}", env.restart_count);
    store.set(&format!("{key}/{}", env.rank), host.as_bytes())?;
    for r in 0..env.world_size {
        let other = store.get_timeout(&format!("{key}/{r}"), timeout)?;
        if other != host.as_bytes() {
            return Err(DistError::Unavailable {
                backend: "cpu",
                what: format!("rank {r} runs on host {:?} and this rank on {host:?}: the shared memory transport needs one host (do not force {TRANSPORT_VAR}=shm here; start one launcher per host with --nnodes, which picks the tcp transport)", String::from_utf8_lossy(&other)),
            });
        }
    }
    Ok(())
}

fn worker(mut transport: Transport, jobs: mpsc::Receiver<Job>) {
    // After a failed collective the ranks are out of step: every later op fails with the first error.
    let mut broken: Option<String> = None;
    while let Ok((op, done)) = jobs.recv() {
        // (peers reach into this rank's tensors only in an op that ran on the single-copy path)
        let peers_reach_in =
            broken.is_none() && matches!(&transport, Transport::Shm(Shm { cma: Some(_), .. }));
        let result = match (&broken, &mut transport) {
            (Some(first), _) => Err(DistError::Invalid(format!(
                "{} after an earlier collective failed: {first}",
                op.name()
            ))),
            (None, Transport::Alone) => run_single(&op),
            (None, Transport::Shm(shm)) => match &mut shm.cma {
                Some(cma) => run_cma(cma, &mut shm.seg, &op),
                None => run_copy(shm, &op),
            },
            (None, Transport::Tcp(mesh)) => run_tcp(mesh, &op),
        };
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.to_string());
            if peers_reach_in {
                // Peers read this rank's tensors and write into them (all_reduce's
                // process_vm_writev) until they pass the op's closing barrier, which a failed op
                // may not have waited for (a timeout there, a dead third rank): the caller frees
                // its tensors once the error reaches it, and a live peer's late write would land
                // in reused memory. The op's references keep the memory alive for good (a leak,
                // on the way out of a failed run), as the NCCL path keeps a failed op's tensors.
                std::mem::forget(op);
            }
        }
        let _ = done.send(result);
    }
}

fn bytes_of(t: &Tensor) -> Result<(*mut u8, usize, Elem)> {
    expect_device(t, tch::Device::Cpu, "cpu collective")?;
    let elem =
        Elem::of(t.kind()).ok_or_else(|| DistError::Invalid(format!("dtype {:?}", t.kind())))?;
    Ok((t.data_ptr() as *mut u8, t.numel() * elem.size(), elem))
}

/// World size 1: the collectives are copies (or nothing).
fn run_single(op: &Op) -> Result<()> {
    match op {
        Op::AllGather { out, input } | Op::ReduceScatter { out, input, .. } => {
            // (as bytes: the shapes may differ, as at W > 1, where only the counts must agree)
            let (dst, _, _) = bytes_of(out)?;
            let (src, n, _) = bytes_of(input)?;
            copy(src, dst, n);
            Ok(())
        }
        Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => bytes_of(tensor).map(|_| ()),
        Op::Barrier => Ok(()),
    }
}

fn copy(src: *const u8, dst: *mut u8, n: usize) {
    if n == 0 || std::ptr::eq(src, dst) {
        return; // an empty tensor's pointer may be null; in place (all_gather into out's slot)
    }
    // SAFETY: callers pass ranges inside live tensors or the segment, either the same range (an
    // in-place all_gather's input is its own slot of the output) or disjoint ones.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

/// `n` bytes of `elem` split in `world` near-equal pieces of whole elements, as (byte offset,
/// byte length); the last pieces may be shorter or empty.
fn pieces(n: usize, elem: Elem, world: usize) -> Vec<(usize, usize)> {
    let (es, count) = (elem.size(), n / elem.size());
    let per = count.div_ceil(world);
    (0..world)
        .map(|q| {
            let (lo, hi) = ((q * per).min(count), ((q + 1) * per).min(count));
            (lo * es, (hi - lo) * es)
        })
        .collect()
}

/// The single-copy shared memory transport (see `cma`).
fn run_cma(cma: &mut Cma, seg: &mut Segment, op: &Op) -> Result<()> {
    match op {
        Op::Barrier => cma.barrier(seg),
        Op::AllGather { out, input } => {
            let (dst, _, _) = bytes_of(out)?;
            let (src, n, elem) = bytes_of(input)?;
            cma.all_gather(seg, src, dst, n, elem)
        }
        Op::ReduceScatter { out, input, op } => {
            let (dst, n, elem) = bytes_of(out)?;
            let (src, _, _) = bytes_of(input)?;
            cma.reduce_scatter(seg, src, dst, n, elem, *op)
        }
        Op::AllReduce { tensor, op } => {
            let (ptr, n, elem) = bytes_of(tensor)?;
            cma.all_reduce(seg, ptr, &pieces(n, elem, seg.world), elem, *op)
        }
        Op::Broadcast { tensor, root } => {
            let (ptr, n, elem) = bytes_of(tensor)?;
            cma.broadcast(seg, ptr, n, elem, *root)
        }
    }
}

/// The TCP transport (see `tcp`): pieces are (byte offset, byte length) per rank.
fn run_tcp(mesh: &mut Mesh, op: &Op) -> Result<()> {
    let (rank, world) = (mesh.rank, mesh.world);
    let (elem, reduce, root) = match op {
        Op::Barrier => (None, None, None),
        Op::AllGather { input: t, .. } => (Elem::of(t.kind()), None, None),
        Op::Broadcast { tensor: t, root } => (Elem::of(t.kind()), None, Some(*root)),
        Op::ReduceScatter { input: t, op, .. } | Op::AllReduce { tensor: t, op } => {
            (Elem::of(t.kind()), Some(*op), None)
        }
    };
    mesh.set_signature(elem, reduce, root);
    match op {
        Op::Barrier => mesh.barrier(),
        Op::AllGather { out, input } => {
            let (dst, _, _) = bytes_of(out)?;
            let (src, n, _) = bytes_of(input)?;
            copy(src, dst.wrapping_add(rank * n), n);
            let pieces: Vec<(usize, usize)> = (0..world).map(|q| (q * n, n)).collect();
            mesh.all_gather(Ptr(dst), &pieces, Code::AllGather)
        }
        Op::ReduceScatter { out, input, op } => {
            let (dst, n, elem) = bytes_of(out)?;
            let (src, _, _) = bytes_of(input)?;
            let pieces: Vec<(usize, usize)> = (0..world).map(|q| (q * n, n)).collect();
            mesh.reduce_scatter(Ptr(src), &pieces, Ptr(dst), elem, *op, Code::ReduceScatter)
        }
        Op::AllReduce { tensor, op } => {
            // W near-equal pieces in whole elements: reduce_scatter in place, then all_gather
            let (ptr, n, elem) = bytes_of(tensor)?;
            let pieces = pieces(n, elem, world);
            let mine = Ptr(ptr.wrapping_add(pieces[rank].0));
            mesh.reduce_scatter(Ptr(ptr), &pieces, mine, elem, *op, Code::AllReduce)?;
            mesh.all_gather(Ptr(ptr), &pieces, Code::AllReduce)
        }
        Op::Broadcast { tensor, root } => {
            let (ptr, n, _) = bytes_of(tensor)?;
            mesh.broadcast(Ptr(ptr), n, *root)
        }
    }
}

/// Header words of the copy path's op signatures, by op parity: a rank may publish the next
/// op's while a slower one still reads this one's, never two ahead (each op has a barrier).
const W_SIG: [usize; 2] = [Segment::FREE_WORD, Segment::FREE_WORD + 1];

/// Before any data moves: every rank must be in the same collective with the same size, dtype,
/// reduction and root (the copy path would otherwise pair mismatched ops and return wrong data
/// without an error). One barrier.
fn check_same_op(shm: &mut Shm, op: &Op) -> Result<()> {
    let describe = |t: &Tensor| {
        format!(
            "{} bytes of {:?}",
            t.numel() * t.kind().elt_size_in_bytes(),
            t.kind()
        )
    };
    let what = match op {
        Op::Barrier => "barrier".to_string(),
        Op::AllGather { out, input } => {
            format!("all_gather {} -> {}", describe(input), describe(out))
        }
        Op::ReduceScatter { out, input, op } => {
            format!(
                "reduce_scatter {:?} {} -> {}",
                op,
                describe(input),
                describe(out)
            )
        }
        Op::AllReduce { tensor, op } => format!("all_reduce {:?} {}", op, describe(tensor)),
        Op::Broadcast { tensor, root } => format!("broadcast from {root} {}", describe(tensor)),
    };
    let sig = launcher::token::fnv1a(what.as_bytes());
    shm.ops += 1;
    let word = W_SIG[(shm.ops % 2) as usize];
    shm.seg.publish(word, sig);
    shm.seg.barrier(op.name())?;
    let rank = shm.seg.rank;
    match (0..shm.seg.world).find(|&q| shm.seg.peer_word(q, word) != sig) {
        Some(q) => Err(DistError::Invalid(format!(
            "{}: rank {q} called another collective, size, dtype, reduction or root than rank {rank} ({what}) as its collective #{}: every rank must call the same collectives in the same order",
            op.name(),
            shm.ops
        ))),
        None => Ok(()),
    }
}

/// The segment copy path (see the module doc).
fn run_copy(shm: &mut Shm, op: &Op) -> Result<()> {
    check_same_op(shm, op)?;
    let (rank, world, chunk) = (shm.seg.rank, shm.seg.world, shm.chunk);
    let name = op.name();
    match op {
        Op::Barrier => Ok(()), // (the check's barrier)
        Op::AllGather { out, input } => {
            let (dst, _, _) = bytes_of(out)?;
            let (src, n, _) = bytes_of(input)?;
            let mut off = 0;
            while off < n {
                let c = chunk.min(n - off);
                let area = shm.next_area();
                let seg = &mut shm.seg;
                copy(src.wrapping_add(off), seg.data(area + rank * chunk), c);
                seg.barrier(name)?;
                for r in 0..world {
                    copy(seg.data(area + r * chunk), dst.wrapping_add(r * n + off), c);
                }
                off += c;
            }
            Ok(())
        }
        Op::Broadcast { tensor, root } => {
            let (ptr, n, _) = bytes_of(tensor)?;
            let mut off = 0;
            while off < n {
                let c = chunk.min(n - off);
                let area = shm.next_area();
                let seg = &mut shm.seg;
                if rank == *root {
                    copy(ptr.wrapping_add(off), seg.data(area), c);
                }
                seg.barrier(name)?;
                if rank != *root {
                    copy(seg.data(area), ptr.wrapping_add(off), c);
                }
                off += c;
            }
            Ok(())
        }
        Op::ReduceScatter { out, input, op } => {
            let (dst, n, elem) = bytes_of(out)?;
            let (src, _, _) = bytes_of(input)?;
            let es = elem.size();
            // per round, `c` bytes of each of the W pieces fit one slot
            let c_max = (chunk / world) / es * es;
            let mut off = 0;
            while off < n {
                let c = c_max.min(n - off);
                let area = shm.next_area();
                let seg = &mut shm.seg;
                for j in 0..world {
                    copy(
                        src.wrapping_add(j * n + off),
                        seg.data(area + rank * chunk + j * c),
                        c,
                    );
                }
                seg.barrier(name)?;
                let srcs: Vec<*const u8> = (0..world)
                    .map(|s| seg.data(area + s * chunk + rank * c) as *const u8)
                    .collect();
                // SAFETY: W slot pieces and the output range each hold c / es elements.
                unsafe { reduce_into(elem, *op, &srcs, dst.wrapping_add(off), c / es) };
                off += c;
            }
            Ok(())
        }
        Op::AllReduce { tensor, op } if world <= 3 => {
            // small groups: every rank reduces the whole chunk itself (the same function in the
            // same rank order, so the same bits): one barrier per round instead of two, and no
            // result area to copy through; it reads W chunks instead of 1 + 1/W, so only for W <= 3
            let (ptr, n, elem) = bytes_of(tensor)?;
            let es = elem.size();
            let mut off = 0;
            while off < n {
                let c = chunk.min(n - off);
                let area = shm.next_area();
                let seg = &mut shm.seg;
                copy(ptr.wrapping_add(off), seg.data(area + rank * chunk), c);
                seg.barrier(name)?;
                let srcs: Vec<*const u8> = (0..world)
                    .map(|s| seg.data(area + s * chunk) as *const u8)
                    .collect();
                // SAFETY: c / es elements in every slot and in the tensor's range.
                unsafe { reduce_into(elem, *op, &srcs, ptr.wrapping_add(off), c / es) };
                off += c;
            }
            Ok(())
        }
        Op::AllReduce { tensor, op } => {
            let (ptr, n, elem) = bytes_of(tensor)?;
            let es = elem.size();
            let mut off = 0;
            while off < n {
                let c = chunk.min(n - off);
                let area = shm.next_area();
                let result = area + world * chunk;
                let seg = &mut shm.seg;
                copy(ptr.wrapping_add(off), seg.data(area + rank * chunk), c);
                seg.barrier(name)?;
                // this rank's part of the chunk, in whole elements
                let per = (c / es).div_ceil(world);
                let lo = (rank * per).min(c / es);
                let hi = ((rank + 1) * per).min(c / es);
                if hi > lo {
                    let srcs: Vec<*const u8> = (0..world)
                        .map(|s| seg.data(area + s * chunk + lo * es) as *const u8)
                        .collect();
                    // SAFETY: hi - lo elements in every slot and in the result area.
                    unsafe { reduce_into(elem, *op, &srcs, seg.data(result + lo * es), hi - lo) };
                }
                seg.barrier(name)?;
                copy(seg.data(result), ptr.wrapping_add(off), c);
                off += c;
            }
            Ok(())
        }
    }
}
