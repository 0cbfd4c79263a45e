//! The NCCL backend (cudarc's NCCL bindings, loaded at run time).
//!
//! Stream ordering without host syncs (the pattern of llm.c's zero.cuh): at submission the caller
//! records an event on libtorch's *current* stream (after the work that produced the inputs); the
//! communication thread makes its own stream wait on it, enqueues the NCCL call, and records a done
//! event; `Work::wait()` makes the caller's current stream wait on that event, so later libtorch work
//! sees the results. libtorch's current stream comes from the C shim
//! `aoti_torch_get_current_cuda_stream` (see `kernels::runtime::torch_current_stream`).
//! The tensors of an op are kept alive until `wait()`, so the caching allocator cannot hand their
//! memory to other work while NCCL still uses it. `Comm` stays on its thread (it is not Send).
//!
//! Not built yet: detection of a dead peer *inside* an NCCL call (needs ncclCommGetAsyncError
//! polling and ncclCommAbort); a peer that dies before init is caught by the init timeout.
use std::ffi::c_void;
use std::sync::mpsc;
use std::time::Duration;

use cudarc::driver::result as drv;
use cudarc::driver::sys as dsys;
use cudarc::nccl::{result as nccl, sys as nsys};
use launcher::env::RankEnv;
use launcher::store::StoreClient;
use tch::Tensor;

use super::elem::Elem;
use super::{expect_device, DistError, Engine, Finish, Op, ReduceOp, Result};

/// CUDA visible to libtorch, the driver present, and libnccl loadable (without cudarc panicking).
pub fn available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    tch::Cuda::is_available()
        && kernels::cuda_libs::ensure_driver().is_ok()
        && unsafe { nsys::is_culib_present() }
}

struct Job {
    op: Op,
    ready: usize, // CUevent recorded on the caller's stream
    done_event: usize,
    done: mpsc::Sender<Result<()>>,
}

pub struct NcclEngine {
    jobs: mpsc::Sender<Job>,
    device: i32,
    world: usize,
}

fn nccl_err(what: &str) -> impl Fn(nccl::NcclError) -> DistError + '_ {
    move |e| DistError::Nccl(format!("{what}: {e:?}"))
}
fn drv_err(what: &str) -> impl Fn(drv::DriverError) -> DistError + '_ {
    move |e| DistError::Nccl(format!("{what}: {e:?}"))
}

impl NcclEngine {
    pub fn start(
        env: &RankEnv,
        store: Option<StoreClient>,
        timeout: Duration,
    ) -> Result<NcclEngine> {
        if !tch::Cuda::is_available() {
            return Err(DistError::Unavailable {
                backend: "nccl",
                what: "libtorch sees no CUDA device (use fsdp.backend: cpu)".into(),
            });
        }
        kernels::cuda_libs::ensure_driver().map_err(|e| DistError::Unavailable {
            backend: "nccl",
            what: e.to_string(),
        })?;
        // SAFETY: as in `available`.
        if !unsafe { nsys::is_culib_present() } {
            return Err(DistError::Unavailable {
                backend: "nccl",
                what: "libnccl was not found (searched: libnccl.so on this binary's rpath .venv/nccl and LD_LIBRARY_PATH; the NCCL wheel ships only libnccl.so.2, so run `make setup` or put a libnccl.so link to it on LD_LIBRARY_PATH)".into(),
            });
        }
        let devices = tch::Cuda::device_count() as usize;
        if env.local_rank >= devices {
            return Err(DistError::Invalid(format!("LOCAL_RANK {} but only {devices} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES); start at most {devices} ranks per node", env.local_rank)));
        }
        let device = env.local_rank as i32;
        let id = unique_id(env, store, timeout)?;
        let (rank, world) = (env.rank as i32, env.world_size as i32);
        let (tx, rx) = mpsc::channel::<Job>();
        let (init_tx, init_rx) = mpsc::channel::<Result<()>>();
        std::thread::Builder::new()
            .name("dist-nccl".into())
            .spawn(move || worker(device, rank, world, id, init_tx, rx))
            .map_err(|e| DistError::Invalid(format!("cannot start the NCCL thread: {e}")))?;
        match init_rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                return Err(DistError::Timeout {
                    op: "ncclCommInitRank".into(),
                    secs: timeout.as_secs(),
                    ranks: vec![],
                })
            }
        }
        Ok(NcclEngine {
            jobs: tx,
            device,
            world: env.world_size,
        })
    }
}

/// Rank 0 creates the NCCL unique id and publishes it through the launcher's store.
fn unique_id(
    env: &RankEnv,
    store: Option<StoreClient>,
    timeout: Duration,
) -> Result<nsys::ncclUniqueId> {
    let key = format!("dist/nccl/a{}/unique_id", env.restart_count);
    let mut id = if env.rank == 0 {
        nccl::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?
    } else {
        nsys::ncclUniqueId { internal: [0; 128] }
    };
    if env.world_size > 1 {
        let mut store = store.ok_or_else(|| {
            DistError::Invalid("world size > 1 needs the launcher's store".into())
        })?;
        if env.rank == 0 {
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
        } else {
            let bytes = store.get_timeout(&key, timeout)?;
            if bytes.len() != 128 {
                return Err(DistError::Nccl(format!(
                    "unique id from the store has {} bytes, expected 128",
                    bytes.len()
                )));
            }
            for (dst, b) in id.internal.iter_mut().zip(bytes) {
                *dst = b as std::ffi::c_char;
            }
        }
    }
    Ok(id)
}

fn dtype(elem: Elem) -> nsys::ncclDataType_t {
    match elem {
        Elem::F32 => nsys::ncclDataType_t::ncclFloat32,
        Elem::F64 => nsys::ncclDataType_t::ncclFloat64,
        Elem::BF16 => nsys::ncclDataType_t::ncclBfloat16,
        Elem::F16 => nsys::ncclDataType_t::ncclFloat16,
        Elem::I64 => nsys::ncclDataType_t::ncclInt64,
    }
}

fn red_op(op: ReduceOp) -> nsys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nsys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => nsys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => nsys::ncclRedOp_t::ncclMax,
    }
}

fn buffer(t: &Tensor) -> Result<(*mut c_void, usize, Elem)> {
    expect_device(t, true, "nccl collective")?;
    let elem =
        Elem::of(t.kind()).ok_or_else(|| DistError::Invalid(format!("dtype {:?}", t.kind())))?;
    Ok((t.data_ptr(), t.numel(), elem))
}

fn worker(
    device: i32,
    rank: i32,
    world: i32,
    id: nsys::ncclUniqueId,
    init: mpsc::Sender<Result<()>>,
    jobs: mpsc::Receiver<Job>,
) {
    let setup = || -> Result<(nsys::ncclComm_t, dsys::CUstream)> {
        let gpu = kernels::runtime::gpu(device).map_err(|e| DistError::Nccl(e.to_string()))?;
        gpu.make_current()
            .map_err(|e| DistError::Nccl(e.to_string()))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(drv_err("cuStreamCreate"))?;
        let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: out-pointer for the communicator; collective over all ranks with the same id.
        unsafe { nccl::comm_init_rank(&mut comm, world, id, rank) }
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok((comm, stream))
    };
    let (comm, stream) = match setup() {
        Ok(v) => {
            let _ = init.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = init.send(Err(e));
            return;
        }
    };
    let nstream = stream as nsys::cudaStream_t;
    while let Ok(job) = jobs.recv() {
        // SAFETY: events were created by the submitter; pointers come from live CUDA tensors kept
        // alive by the submitter until wait(); counts match the checked shapes.
        let result = unsafe {
            (|| -> Result<()> {
                drv::stream::wait_event(
                    stream,
                    job.ready as dsys::CUevent,
                    dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(drv_err("cuStreamWaitEvent"))?;
                match &job.op {
                    Op::AllGather { out, input } => {
                        let (dst, _, _) = buffer(out)?;
                        let (src, n, elem) = buffer(input)?;
                        nccl::all_gather(src, dst, n, dtype(elem), comm, nstream)
                            .map_err(nccl_err("ncclAllGather"))?;
                    }
                    Op::ReduceScatter { out, input, op } => {
                        let (dst, n, elem) = buffer(out)?;
                        let (src, _, _) = buffer(input)?;
                        nccl::reduce_scatter(src, dst, n, dtype(elem), red_op(*op), comm, nstream)
                            .map_err(nccl_err("ncclReduceScatter"))?;
                    }
                    Op::AllReduce { tensor, op } => {
                        let (p, n, elem) = buffer(tensor)?;
                        nccl::all_reduce(p, p, n, dtype(elem), red_op(*op), comm, nstream)
                            .map_err(nccl_err("ncclAllReduce"))?;
                    }
                    Op::Broadcast { tensor, root } => {
                        let (p, n, elem) = buffer(tensor)?;
                        nccl::broadcast(p, p, n, dtype(elem), *root as i32, comm, nstream)
                            .map_err(nccl_err("ncclBroadcast"))?;
                    }
                    Op::Barrier => {
                        // an all_reduce of nothing orders every rank's stream; then wait on the host
                        nccl::all_reduce(
                            std::ptr::null(),
                            std::ptr::null_mut(),
                            0,
                            nsys::ncclDataType_t::ncclFloat32,
                            nsys::ncclRedOp_t::ncclSum,
                            comm,
                            nstream,
                        )
                        .map_err(nccl_err("ncclAllReduce (barrier)"))?;
                        drv::stream::synchronize(stream).map_err(drv_err("cuStreamSynchronize"))?;
                    }
                }
                let _ = drv::event::destroy(job.ready as dsys::CUevent);
                drv::event::record(job.done_event as dsys::CUevent, stream)
                    .map_err(drv_err("cuEventRecord"))
            })()
        };
        let _ = job.done.send(result);
    }
    // SAFETY: no op is in flight once the queue is closed.
    unsafe {
        let _ = nccl::comm_destroy(comm);
    }
}

impl Engine for NcclEngine {
    fn submit(&self, op: Op, done: mpsc::Sender<Result<()>>) -> Result<Option<Finish>> {
        let gpu = kernels::runtime::gpu(self.device).map_err(|e| DistError::Nccl(e.to_string()))?;
        gpu.make_current()
            .map_err(|e| DistError::Nccl(e.to_string()))?;
        let flags = dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ready = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        let done_event = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        // SAFETY: fresh event, recorded on the caller's current stream of this device.
        unsafe { drv::event::record(ready, kernels::runtime::torch_current_stream(self.device)) }
            .map_err(drv_err("cuEventRecord"))?;
        // Avg runs as Sum, then a division on the caller's stream: with ncclAvg, one element of an
        // odd-sized (4097) f32 reduce_scatter came back wrong on one rank (NCCL 2.28, H200, 2026-11-26).
        let (op, average) = match op {
            Op::AllReduce {
                tensor,
                op: ReduceOp::Avg,
            } => (
                Op::AllReduce {
                    tensor: tensor.shallow_clone(),
                    op: ReduceOp::Sum,
                },
                Some(tensor),
            ),
            Op::ReduceScatter {
                out,
                input,
                op: ReduceOp::Avg,
            } => (
                Op::ReduceScatter {
                    out: out.shallow_clone(),
                    input,
                    op: ReduceOp::Sum,
                },
                Some(out),
            ),
            other => (other, None),
        };
        let world = self.world as f64;
        let keep = op_tensors(&op);
        self.jobs
            .send(Job {
                op,
                ready: ready as usize,
                done_event: done_event as usize,
                done,
            })
            .map_err(|_| DistError::WorkerGone)?;
        let (device, done_event) = (self.device, done_event as usize);
        // On the waiting thread: its current stream waits for the collective; the tensors live until now.
        Ok(Some(Box::new(move || {
            let stream = kernels::runtime::torch_current_stream(device);
            // SAFETY: the worker recorded the event before reporting success.
            let r = unsafe {
                drv::stream::wait_event(
                    stream,
                    done_event as dsys::CUevent,
                    dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .map_err(drv_err("cuStreamWaitEvent"));
            if let (Ok(()), Some(mut t)) = (&r, average) {
                let _ = t.g_mul_scalar_(1.0 / world);
            }
            // SAFETY: destroying an event with pending waits is allowed (released on completion).
            unsafe {
                let _ = drv::event::destroy(done_event as dsys::CUevent);
            }
            drop(keep);
            r
        })))
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

fn op_tensors(op: &Op) -> Vec<Tensor> {
    match op {
        Op::AllGather { out, input } | Op::ReduceScatter { out, input, .. } => {
            vec![out.shallow_clone(), input.shallow_clone()]
        }
        Op::AllReduce { tensor, .. } | Op::Broadcast { tensor, .. } => vec![tensor.shallow_clone()],
        Op::Barrier => vec![],
    }
}
