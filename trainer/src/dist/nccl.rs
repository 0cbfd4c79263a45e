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
//!
//! A dead peer: an NCCL collective waiting for a rank that is gone spins forever. So `Work::wait()`
//! (and the barrier) do not hand the wait to the GPU blindly: they poll the op's done event on the
//! host (cuEventQuery) together with `ncclCommGetAsyncError`, for at most the group's timeout. On
//! an async error or the timeout the communicator is aborted (`ncclCommAbort`, on a helper thread
//! so even an abort that blocks cannot hang the rank) and the rank holds a *roll call* through the
//! launcher's store: every rank that got here sets `dist/nccl/a{attempt}/rollcall/{op#}/{rank}`,
//! and after a grace period (timeout / 2, 2..30 s) the ranks that did not answer are named as the
//! ones that stopped answering (dead, or stuck somewhere else). Every later op fails with the first
//! error. The price: `wait()` blocks the host until the collective finished (the GPU-side ordering
//! with libtorch's stream is kept as well), so a rank can run at most one wait ahead of the GPU.
//! A peer that dies before init is caught by the init timeout.
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::result as drv;
use cudarc::driver::sys as dsys;
use cudarc::nccl::sys as nsys;
use launcher::env::RankEnv;
use launcher::store::StoreClient;
use tch::{Kind, Tensor};

use super::elem::Elem;
use super::nccl_lib::{self, check};
use super::{expect_device, DistError, Engine, Finish, Op, ReduceOp, Result};

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
    shared: Arc<Shared>,
    /// Number of ops submitted: the op number every rank agrees on (for the roll call).
    submitted: AtomicU64,
}

/// What the communication thread and the waiting threads share: the communicator (0 once
/// aborted or destroyed), the first failure, and the store for the roll call.
pub(crate) struct Shared {
    comm: AtomicUsize,
    failed: Mutex<Option<String>>,
    store: Mutex<Option<StoreClient>>,
    rank: usize,
    world: usize,
    attempt: u32,
    timeout: Duration,
}

/// An NCCL call's result as this module's error.
fn nccl_ok(r: nsys::ncclResult_t, what: &str) -> Result<()> {
    check(r, what).map_err(DistError::Nccl)
}

/// The loaded library; loaded (or refused) once by `NcclEngine::start` before any use.
fn lib() -> Result<&'static nccl_lib::Nccl> {
    nccl_lib::nccl().map_err(|what| DistError::Unavailable {
        backend: "nccl",
        what,
    })
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
        let l = lib()?;
        let mut version = 0;
        // SAFETY: out-parameter.
        if check(unsafe { (l.get_version)(&mut version) }, "ncclGetVersion").is_ok() {
            tracing::debug!("NCCL {version} from {}", l.path);
        }
        let devices = tch::Cuda::device_count() as usize;
        if env.local_rank >= devices {
            return Err(DistError::Invalid(format!("LOCAL_RANK {} but only {devices} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES); start at most {devices} ranks per node", env.local_rank)));
        }
        let device = env.local_rank as i32;
        let mut store = store;
        let id = unique_id(env, store.as_mut(), timeout)?;
        // (each rank says it reached the communicator's init: a timeout there names the others)
        let arrived = |r: usize| format!("dist/nccl/a{}/init/{r}", env.restart_count);
        if let Some(s) = store.as_mut() {
            let _ = s.set(&arrived(env.rank), b"here");
        }
        let shared = Arc::new(Shared::new(env, store, timeout));
        let (rank, world) = (env.rank as i32, env.world_size as i32);
        let (tx, rx) = mpsc::channel::<Job>();
        let (init_tx, init_rx) = mpsc::channel::<Result<()>>();
        let worker_shared = shared.clone();
        std::thread::Builder::new()
            .name("dist-nccl".into())
            .spawn(move || worker(device, rank, world, id, init_tx, rx, worker_shared))
            .map_err(|e| DistError::Invalid(format!("cannot start the NCCL thread: {e}")))?;
        match init_rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                let mut store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
                // (a rank whose mark cannot be read is not named: the store, not it, failed)
                let marks: Vec<_> = match store.as_mut() {
                    Some(s) => (0..env.world_size)
                        .map(|r| s.try_get(&arrived(r)))
                        .collect(),
                    None => vec![],
                };
                let missing: Vec<usize> = (0..marks.len())
                    .filter(|&r| matches!(marks[r], Ok(None)))
                    .collect();
                if missing.is_empty() && (marks.is_empty() || marks.iter().any(|m| m.is_err())) {
                    return Err(DistError::Nccl(format!(
                        "ncclCommInitRank timed out after {} s; which ranks reached it is unknown (the launcher's store could not be read)",
                        timeout.as_secs()
                    )));
                }
                if missing.is_empty() {
                    return Err(DistError::Nccl(format!(
                        "ncclCommInitRank timed out after {} s although every rank reached it: NCCL cannot connect the ranks (network interfaces, firewalls; rerun with NCCL_DEBUG=INFO)",
                        timeout.as_secs()
                    )));
                }
                return Err(DistError::Timeout {
                    op: "ncclCommInitRank".into(),
                    secs: timeout.as_secs(),
                    ranks: missing,
                });
            }
        }
        Ok(NcclEngine {
            jobs: tx,
            device,
            world: env.world_size,
            shared,
            submitted: AtomicU64::new(0),
        })
    }
}

impl Shared {
    pub(crate) fn new(env: &RankEnv, store: Option<StoreClient>, timeout: Duration) -> Shared {
        Shared {
            comm: AtomicUsize::new(0),
            failed: Mutex::new(None),
            store: Mutex::new(store),
            rank: env.rank,
            world: env.world_size,
            attempt: env.restart_count,
            timeout,
        }
    }

    /// The error every op after the first failure gets.
    fn check(&self, op: &str) -> Result<()> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(first) => Err(DistError::Invalid(format!(
                "{op} after an earlier collective failed: {first}"
            ))),
            None => Ok(()),
        }
    }

    /// Waits on the host until `event` (recorded after op number `seq`) completed, watching NCCL's
    /// async error and the timeout; see the module doc.
    fn wait_done(&self, event: dsys::CUevent, op: &str, seq: u64) -> Result<()> {
        let started = Instant::now();
        let mut polls = 0u64;
        loop {
            // (checked before the query: after another thread's failure no CUDA call is made)
            self.check(op)?;
            // SAFETY: the event is alive until the caller destroys it after this returns.
            match unsafe { drv::event::query(event) } {
                Ok(()) => return Ok(()),
                Err(drv::DriverError(dsys::cudaError_enum::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => return Err(DistError::Nccl(format!("{op}: cuEventQuery: {e:?}"))),
            }
            polls += 1;
            if polls.is_multiple_of(64) {
                let comm = self.comm.load(Ordering::Acquire);
                if comm != 0 {
                    let mut async_err = nsys::ncclResult_t::ncclSuccess;
                    // SAFETY: a live communicator (0 once aborted); thread-safe per NCCL's docs.
                    if let Ok(l) = lib() {
                        unsafe {
                            (l.comm_get_async_error)(comm as nsys::ncclComm_t, &mut async_err)
                        };
                    }
                    if !matches!(
                        async_err,
                        nsys::ncclResult_t::ncclSuccess | nsys::ncclResult_t::ncclInProgress
                    ) {
                        return Err(self.fail(op, seq, format!("NCCL reported {async_err:?}")));
                    }
                }
                if started.elapsed() > self.timeout {
                    let why = format!("no progress for {} s", self.timeout.as_secs());
                    return Err(self.fail(op, seq, why));
                }
            }
            if polls < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// The first failure: abort the communicator, hold the roll call, remember the error.
    fn fail(&self, op: &str, seq: u64, why: String) -> DistError {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = &*failed {
            return DistError::Invalid(format!("{op} after an earlier collective failed: {first}"));
        }
        let comm = self.comm.swap(0, Ordering::AcqRel);
        let aborted = if comm != 0 {
            abort(comm)
        } else {
            String::new()
        };
        let grace = (self.timeout / 2).clamp(Duration::from_secs(2), Duration::from_secs(30));
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let missing = match store.as_mut() {
            Some(store) => roll_call(store, self.attempt, seq, self.rank, self.world, grace),
            None => Ok(vec![]),
        };
        let err = match missing {
            Ok(missing) if !missing.is_empty() => DistError::PeerLost {
                rank: missing[0],
                op: op.to_string(),
                detail: format!("{why} in collective #{seq}; rank(s) {missing:?} did not answer the roll call through the store within {} s (dead, or stuck elsewhere); NCCL communicator aborted{aborted}", grace.as_secs()),
            },
            Ok(_) => DistError::Nccl(format!("{op}: {why} in collective #{seq}, but every rank answered the roll call (did the ranks call different collectives?); NCCL communicator aborted{aborted}")),
            Err(e) => DistError::Nccl(format!("{op}: {why} in collective #{seq}; the roll call failed too ({e}), so the silent rank is unknown; NCCL communicator aborted{aborted}")),
        };
        *failed = Some(err.to_string());
        err
    }

    /// A failure in this rank's worker before or while handing op `seq` to NCCL (a tensor on
    /// another GPU, an NCCL call returning an error): this rank skipped the op, so its next one
    /// would pair with the peers' this one (wrong data, or a hang). As after `fail`, every later
    /// op fails with the first error and the communicator is aborted; the peers' wait for this op
    /// ends with NCCL's error or at their timeout, whose roll call then names this rank.
    fn fail_local(&self, op: &str, seq: u64, e: &DistError) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_some() {
            return;
        }
        let comm = self.comm.swap(0, Ordering::AcqRel);
        let aborted = if comm != 0 {
            abort(comm)
        } else {
            String::new()
        };
        *failed = Some(format!(
            "{op} (collective #{seq}) failed on this rank: {e}; NCCL communicator aborted{aborted}"
        ));
    }
}

/// After a failed collective the rank makes no more CUDA calls for it: an abort stuck behind a
/// hung kernel can hold a driver lock that every later call (even cuEventDestroy) waits on.
/// The event's few bytes stay allocated until the process, which is failing anyway, exits.
fn leak_after_failure(_event: usize) {}

/// ncclCommAbort on a helper thread, waited for at most 10 s (an abort stuck behind a hung kernel
/// must not hang the rank); returns a note for the error when it did not finish.
fn abort(comm: usize) -> String {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("nccl-abort".into())
        .spawn(move || {
            // SAFETY: the communicator is no longer handed to new ops (Shared::comm is 0).
            let r = lib().and_then(|l| {
                nccl_ok(
                    unsafe { (l.comm_abort)(comm as nsys::ncclComm_t) },
                    "ncclCommAbort",
                )
            });
            let _ = tx.send(r);
        });
    match (spawned, rx.recv_timeout(Duration::from_secs(10))) {
        (Ok(_), Ok(Ok(()))) => String::new(),
        (Ok(_), Ok(Err(e))) => format!(" ({e})"),
        (Ok(_), Err(_)) => " (ncclCommAbort did not return within 10 s)".into(),
        (Err(e), _) => format!(" (could not start the abort thread: {e})"),
    }
}

/// Every rank that reaches a failure of op `seq` says so in the store; after `grace` the ranks
/// that did not are the ones that stopped answering (sorted).
pub(crate) fn roll_call(
    store: &mut StoreClient,
    attempt: u32,
    seq: u64,
    rank: usize,
    world: usize,
    grace: Duration,
) -> std::result::Result<Vec<usize>, launcher::store::StoreError> {
    let key = |r: usize| format!("dist/nccl/a{attempt}/rollcall/{seq}/{r}");
    store.set(&key(rank), b"here")?;
    let deadline = Instant::now() + grace;
    loop {
        let mut missing = Vec::new();
        for r in 0..world {
            if store.try_get(&key(r))?.is_none() {
                missing.push(r);
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            return Ok(missing);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rank 0 creates the NCCL unique id and publishes it through the launcher's store.
fn unique_id(
    env: &RankEnv,
    store: Option<&mut StoreClient>,
    timeout: Duration,
) -> Result<nsys::ncclUniqueId> {
    let key = format!("dist/nccl/a{}/unique_id", env.restart_count);
    let mut id = if env.rank == 0 {
        let mut id = nsys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: out-parameter.
        nccl_ok(
            unsafe { (lib()?.get_unique_id)(&mut id) },
            "ncclGetUniqueId",
        )?;
        id
    } else {
        nsys::ncclUniqueId { internal: [0; 128] }
    };
    if env.world_size > 1 {
        let store = store.ok_or_else(|| {
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

fn buffer(t: &Tensor, device: i32) -> Result<(*mut c_void, usize, Elem)> {
    expect_device(t, tch::Device::Cuda(device as usize), "nccl collective")?;
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
    shared: Arc<Shared>,
) {
    let setup = || -> Result<(nsys::ncclComm_t, dsys::CUstream, dsys::CUdeviceptr)> {
        let gpu = kernels::runtime::gpu(device).map_err(|e| DistError::Nccl(e.to_string()))?;
        gpu.make_current()
            .map_err(|e| DistError::Nccl(e.to_string()))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(drv_err("cuStreamCreate"))?;
        // the barrier's one f32 (zero, and a sum of zeros stays zero): NCCL drops a collective of
        // 0 elements without communicating, so a barrier must move at least one
        // SAFETY: a 4-byte allocation in the current context, zeroed before any use.
        let flag = unsafe {
            let p = drv::malloc_sync(4).map_err(drv_err("cuMemAlloc"))?;
            drv::memset_d8_sync(p, 0, 4).map_err(drv_err("cuMemsetD8"))?;
            p
        };
        let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: out-pointer for the communicator; collective over all ranks with the same id.
        nccl_ok(
            unsafe { (lib()?.comm_init_rank)(&mut comm, world, id, rank) },
            "ncclCommInitRank",
        )?;
        Ok((comm, stream, flag))
    };
    let (comm, stream, barrier_flag) = match setup() {
        Ok(v) => {
            shared.comm.store(v.0 as usize, Ordering::Release);
            let _ = init.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = init.send(Err(e));
            return;
        }
    };
    let nstream = stream as nsys::cudaStream_t;
    let mut seq = 0u64;
    while let Ok(job) = jobs.recv() {
        seq += 1;
        if let Err(e) = shared.check(job.op.name()) {
            // The events are leaked on purpose: after a failure the abort may still hold the
            // driver's lock (see `leak_after_failure`), and a rank that failed is on its way out.
            let _ = job.done.send(Err(e));
            continue;
        }
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
                let l = lib()?;
                match &job.op {
                    Op::AllGather { out, input } => {
                        let (dst, _, _) = buffer(out, device)?;
                        let (src, n, elem) = buffer(input, device)?;
                        nccl_ok(
                            (l.all_gather)(src, dst, n, dtype(elem), comm, nstream),
                            "ncclAllGather",
                        )?;
                    }
                    Op::ReduceScatter { out, input, op } => {
                        let (dst, n, elem) = buffer(out, device)?;
                        let (src, _, _) = buffer(input, device)?;
                        nccl_ok(
                            (l.reduce_scatter)(
                                src,
                                dst,
                                n,
                                dtype(elem),
                                red_op(*op),
                                comm,
                                nstream,
                            ),
                            "ncclReduceScatter",
                        )?;
                    }
                    Op::AllReduce { tensor, op } => {
                        let (p, n, elem) = buffer(tensor, device)?;
                        nccl_ok(
                            (l.all_reduce)(p, p, n, dtype(elem), red_op(*op), comm, nstream),
                            "ncclAllReduce",
                        )?;
                    }
                    Op::Broadcast { tensor, root } => {
                        let (p, n, elem) = buffer(tensor, device)?;
                        nccl_ok(
                            (l.broadcast)(p, p, n, dtype(elem), *root as i32, comm, nstream),
                            "ncclBroadcast",
                        )?;
                    }
                    Op::Barrier => {
                        // an all_reduce of one element every rank must join; then wait on the host
                        let flag = barrier_flag as *mut std::ffi::c_void;
                        nccl_ok(
                            (l.all_reduce)(
                                flag,
                                flag,
                                1,
                                nsys::ncclDataType_t::ncclFloat32,
                                nsys::ncclRedOp_t::ncclSum,
                                comm,
                                nstream,
                            ),
                            "ncclAllReduce (barrier)",
                        )?;
                    }
                }
                let _ = drv::event::destroy(job.ready as dsys::CUevent);
                drv::event::record(job.done_event as dsys::CUevent, stream)
                    .map_err(drv_err("cuEventRecord"))?;
                if matches!(job.op, Op::Barrier) {
                    // the host waits for the barrier, watching for a dead peer
                    shared.wait_done(job.done_event as dsys::CUevent, "barrier", seq)?;
                }
                Ok(())
            })()
        };
        if let Err(e) = &result {
            shared.fail_local(job.op.name(), seq, e);
        }
        let _ = job.done.send(result);
    }
    // SAFETY: no op is in flight once the queue is closed; an aborted communicator is not freed twice.
    // (after a failure no CUDA call at all, see `leak_after_failure`: the flag's 4 bytes stay)
    if shared.comm.swap(0, Ordering::AcqRel) == comm as usize {
        unsafe {
            if let Ok(l) = lib() {
                let _ = (l.comm_destroy)(comm);
            }
            let _ = drv::free_sync(barrier_flag);
        }
    }
}

impl Engine for NcclEngine {
    fn submit(&self, op: Op, done: mpsc::Sender<Result<()>>) -> Result<Option<Finish>> {
        // after a failure, no CUDA call at all: it could block behind the hung abort
        self.shared.check(op.name())?;
        let gpu = kernels::runtime::gpu(self.device).map_err(|e| DistError::Nccl(e.to_string()))?;
        gpu.make_current()
            .map_err(|e| DistError::Nccl(e.to_string()))?;
        // Avg runs as Sum, then a division on the caller's stream: with ncclAvg, one element of an
        // odd-sized (4097) f32 reduce_scatter came back wrong on one rank (NCCL 2.28, H200, 2026-11-26).
        // float16 is divided before the sum instead, as ncclAvg does for floats (PreMulSum): W
        // values near its 65504 limit would overflow the sum (the CPU backend sums in f32). Ops on
        // the caller's stream, before `ready` is recorded behind them.
        let nccl = |e: tch::TchError| DistError::Nccl(e.to_string());
        let premul = 1.0 / self.world as f64;
        let (op, average) = match op {
            Op::AllReduce {
                mut tensor,
                op: ReduceOp::Avg,
            } if tensor.kind() == Kind::Half => {
                let _ = tensor.f_mul_scalar_(premul).map_err(nccl)?;
                (
                    Op::AllReduce {
                        tensor,
                        op: ReduceOp::Sum,
                    },
                    None,
                )
            }
            Op::ReduceScatter {
                out,
                input,
                op: ReduceOp::Avg,
            } if input.kind() == Kind::Half => (
                Op::ReduceScatter {
                    out,
                    // (a scaled copy: the caller's input stays as it was)
                    input: input.f_mul_scalar(premul).map_err(nccl)?,
                    op: ReduceOp::Sum,
                },
                None,
            ),
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
        let flags = dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ready = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        let done_event = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        // SAFETY: fresh event, recorded on the caller's current stream of this device.
        unsafe { drv::event::record(ready, kernels::runtime::torch_current_stream(self.device)) }
            .map_err(drv_err("cuEventRecord"))?;
        let world = self.world as f64;
        let keep = op_tensors(&op);
        let seq = self.submitted.fetch_add(1, Ordering::Relaxed) + 1;
        let (shared, name) = (self.shared.clone(), op.name());
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
            // after a failure (of this op or an earlier one, e.g. a prefetch dropped while an
            // error unwinds: `dist::Work`'s Drop) no CUDA call at all, see `leak_after_failure`;
            // and the tensors are not freed: a hung kernel may still write into them
            if let Err(e) = shared.check(name) {
                leak_after_failure(done_event);
                std::mem::forget(keep);
                return Err(e);
            }
            // the host watches the collective finish (dead peer, timeout); see the module doc.
            // wait() may run on another thread than submit(): make the device's context current.
            let current = kernels::runtime::gpu(device)
                .and_then(|gpu| gpu.make_current())
                .map_err(|e| DistError::Nccl(e.to_string()));
            if let Err(e) =
                current.and_then(|()| shared.wait_done(done_event as dsys::CUevent, name, seq))
            {
                // The event is leaked (see `leak_after_failure`): cuEventDestroy here blocked
                // forever on an H200 while ncclCommAbort's cudaFreeHost, stuck behind the stalled
                // stream, held the driver's lock (2026-11-26, gpu-check nccl-timeout).
                leak_after_failure(done_event);
                std::mem::forget(keep);
                return Err(e);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use launcher::store::StoreServer;

    fn client(server: &StoreServer) -> StoreClient {
        let port = server.local_addr().port();
        StoreClient::connect("127.0.0.1", port, "secret", Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn roll_call_names_the_ranks_that_do_not_answer() {
        let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
        // ranks 0 and 2 of 4 reach the failure of op 7; rank 3 answers a little later; 1 is gone
        let mut late = client(&server);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            late.set("dist/nccl/a0/rollcall/7/3", b"here").unwrap();
        });
        let mut other = client(&server);
        other.set("dist/nccl/a0/rollcall/7/2", b"here").unwrap();
        let mut me = client(&server);
        let started = Instant::now();
        let missing = roll_call(&mut me, 0, 7, 0, 4, Duration::from_secs(2)).unwrap();
        t.join().unwrap();
        assert_eq!(missing, vec![1]);
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "waits the grace period"
        );
        // everyone here: returns at once
        other.set("dist/nccl/a0/rollcall/7/1", b"here").unwrap();
        let started = Instant::now();
        assert!(roll_call(&mut me, 0, 7, 0, 4, Duration::from_secs(5))
            .unwrap()
            .is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
        // another op number is another roll call
        assert_eq!(
            roll_call(&mut me, 0, 8, 0, 2, Duration::from_millis(200)).unwrap(),
            vec![1]
        );
    }

    #[test]
    fn a_failure_is_remembered_and_fails_every_later_op() {
        let shared = Shared::new(&RankEnv::single(), None, Duration::from_secs(1));
        assert!(shared.check("all_reduce").is_ok());
        let first = shared.fail("all_reduce", 3, "no progress for 1 s".into());
        let text = first.to_string();
        assert!(
            text.contains("no progress for 1 s in collective #3"),
            "{text}"
        );
        assert!(text.contains("every rank answered the roll call"), "{text}");
        let later = shared.check("broadcast").unwrap_err().to_string();
        assert!(
            later.contains("broadcast after an earlier collective failed") && later.contains("#3"),
            "{later}"
        );
        let again = shared.fail("barrier", 4, "x".into()).to_string();
        assert!(
            again.contains("barrier after an earlier collective failed"),
            "{again}"
        );
    }
}
