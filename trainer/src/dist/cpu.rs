//! The CPU backend: ranks on one host exchange data through a shared memory segment (`shm`).
//!
//! Every op runs in rounds over chunks of at most `CHUNK` bytes per rank slot:
//! - all_gather: each rank writes its chunk to its slot; barrier; everyone copies all slots out.
//! - reduce_scatter: each rank writes the W pieces of its input for this round to its slot;
//!   barrier; rank r reduces piece r of every slot straight into its output.
//! - all_reduce: each rank writes its chunk; barrier; rank r reduces part r of the chunk into the
//!   shared result area; barrier; everyone copies the result out.
//!
//! A reduction happens exactly once per element, in rank order, so all ranks get bitwise equal
//! results; a final barrier per round keeps slots from being overwritten early.
use std::sync::mpsc;
use std::time::Duration;

use launcher::env::RankEnv;
use launcher::store::StoreClient;
use tch::Tensor;

use super::elem::{reduce_into, Elem};
use super::shm::Segment;
use super::{expect_device, DistError, Engine, Finish, Op, Result};

/// Bytes per rank slot and per round.
const CHUNK: usize = 4 << 20;

type Job = (Op, mpsc::Sender<Result<()>>);

pub struct CpuEngine {
    jobs: mpsc::Sender<Job>,
}

impl CpuEngine {
    pub fn start(
        env: &RankEnv,
        store: Option<StoreClient>,
        timeout: Duration,
    ) -> Result<CpuEngine> {
        let segment = match (env.world_size, store) {
            (1, _) => None,
            (_, None) => {
                return Err(DistError::Invalid(
                    "world size > 1 needs the launcher's store".into(),
                ))
            }
            (w, Some(mut store)) => {
                same_host(env, &mut store, timeout)?;
                Some(Segment::open(
                    env,
                    &mut store,
                    "cpu-pg",
                    w * CHUNK + CHUNK,
                    timeout,
                )?)
            }
        };
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dist-cpu".into())
            .spawn(move || worker(segment, rx))
            .map_err(|e| {
                DistError::Invalid(format!("cannot start the communication thread: {e}"))
            })?;
        Ok(CpuEngine { jobs: tx })
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
        "cpu"
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
                what: format!("rank {r} runs on host {:?} and this rank on {host:?}: the cpu backend's TCP path for several hosts is not built yet (use nccl, or one host)", String::from_utf8_lossy(&other)),
            });
        }
    }
    Ok(())
}

fn worker(mut segment: Option<Segment>, jobs: mpsc::Receiver<Job>) {
    // After a failed collective the ranks are out of step: every later op fails with the first error.
    let mut broken: Option<String> = None;
    while let Ok((op, done)) = jobs.recv() {
        let result = match (&broken, segment.as_mut()) {
            (Some(first), _) => Err(DistError::Invalid(format!(
                "{} after an earlier collective failed: {first}",
                op.name()
            ))),
            (None, None) => run_single(&op),
            (None, Some(seg)) => run(seg, &op),
        };
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.to_string());
        }
        let _ = done.send(result);
    }
}

fn bytes_of(t: &Tensor) -> Result<(*mut u8, usize, Elem)> {
    expect_device(t, false, "cpu collective")?;
    let elem =
        Elem::of(t.kind()).ok_or_else(|| DistError::Invalid(format!("dtype {:?}", t.kind())))?;
    Ok((t.data_ptr() as *mut u8, t.numel() * elem.size(), elem))
}

/// World size 1: the collectives are copies (or nothing).
fn run_single(op: &Op) -> Result<()> {
    match op {
        Op::AllGather { out, input } | Op::ReduceScatter { out, input, .. } => {
            bytes_of(out)?;
            bytes_of(input)?;
            let mut out = out.shallow_clone();
            out.copy_(input);
            Ok(())
        }
        Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => bytes_of(tensor).map(|_| ()),
        Op::Barrier => Ok(()),
    }
}

fn copy(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: callers pass ranges inside live tensors or the segment, which never overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

fn run(seg: &mut Segment, op: &Op) -> Result<()> {
    let (rank, world) = (seg.rank, seg.world);
    let name = op.name();
    match op {
        Op::Barrier => seg.barrier(name),
        Op::AllGather { out, input } => {
            let (dst, _, _) = bytes_of(out)?;
            let (src, n, _) = bytes_of(input)?;
            let mut off = 0;
            while off < n {
                let c = CHUNK.min(n - off);
                copy(src.wrapping_add(off), seg.data(rank * CHUNK), c);
                seg.barrier(name)?;
                for r in 0..world {
                    copy(seg.data(r * CHUNK), dst.wrapping_add(r * n + off), c);
                }
                seg.barrier(name)?;
                off += c;
            }
            Ok(())
        }
        Op::Broadcast { tensor, root } => {
            let (ptr, n, _) = bytes_of(tensor)?;
            let mut off = 0;
            while off < n {
                let c = CHUNK.min(n - off);
                if rank == *root {
                    copy(ptr.wrapping_add(off), seg.data(0), c);
                }
                seg.barrier(name)?;
                if rank != *root {
                    copy(seg.data(0), ptr.wrapping_add(off), c);
                }
                seg.barrier(name)?;
                off += c;
            }
            Ok(())
        }
        Op::ReduceScatter { out, input, op } => {
            let (dst, n, elem) = bytes_of(out)?;
            let (src, _, _) = bytes_of(input)?;
            let es = elem.size();
            // per round, `c` bytes of each of the W pieces fit one slot
            let c_max = (CHUNK / world) / es * es;
            let mut off = 0;
            while off < n {
                let c = c_max.min(n - off);
                for j in 0..world {
                    copy(
                        src.wrapping_add(j * n + off),
                        seg.data(rank * CHUNK + j * c),
                        c,
                    );
                }
                seg.barrier(name)?;
                let srcs: Vec<*const u8> = (0..world)
                    .map(|s| seg.data(s * CHUNK + rank * c) as *const u8)
                    .collect();
                // SAFETY: W slot pieces and the output range each hold c / es elements.
                unsafe { reduce_into(elem, *op, &srcs, dst.wrapping_add(off), c / es) };
                seg.barrier(name)?;
                off += c;
            }
            Ok(())
        }
        Op::AllReduce { tensor, op } => {
            let (ptr, n, elem) = bytes_of(tensor)?;
            let es = elem.size();
            let result = world * CHUNK;
            let mut off = 0;
            while off < n {
                let c = CHUNK.min(n - off);
                copy(ptr.wrapping_add(off), seg.data(rank * CHUNK), c);
                seg.barrier(name)?;
                // this rank's part of the chunk, in whole elements
                let per = (c / es).div_ceil(world);
                let lo = (rank * per).min(c / es);
                let hi = ((rank + 1) * per).min(c / es);
                if hi > lo {
                    let srcs: Vec<*const u8> = (0..world)
                        .map(|s| seg.data(s * CHUNK + lo * es) as *const u8)
                        .collect();
                    // SAFETY: hi - lo elements in every slot and in the result area.
                    unsafe { reduce_into(elem, *op, &srcs, seg.data(result + lo * es), hi - lo) };
                }
                seg.barrier(name)?;
                copy(seg.data(result), ptr.wrapping_add(off), c);
                seg.barrier(name)?;
                off += c;
            }
            Ok(())
        }
    }
}
