//! The collective layer: one `ProcessGroup` API over two backends (DESIGN.md decisions 2, 4, 5).
//!
//! - `cpu`:  ranks on one host share a memory segment; ranks on several launcher nodes use TCP
//!   (`LLAVA_SCO_CPU_TRANSPORT=tcp` forces it on one host). Either way reductions are done once per
//!   element in rank order, so every rank gets bitwise the same result, run after run.
//! - `nccl`: NCCL through cudarc on CUDA tensors, ordered with libtorch's stream by events.
//!
//! Ops take contiguous tensors of f32, f64, bf16, f16 or i64. Every op has an async form returning
//! a `Work` whose `wait()` returns the op's error, so FSDP can prefetch while it computes. A dead
//! peer or a timeout is an error that names the rank, never a hang or a panic.
//!
//! `new_group` makes a group of some of the ranks (`torch.distributed.new_group`, the shard and
//! replica groups of HSDP): its own backend instance, rendezvous keys and shared memory segment,
//! shared memory when its ranks are on one node and TCP across nodes on the CPU backend.
mod cma;
mod cpu;
mod elem;
mod nccl;
mod nccl_lib;
mod shm;
mod tcp;
pub(crate) mod thp;

pub use cma::CMA_VAR as CPU_SHM_CMA_VAR;
pub use cpu::TRANSPORT_VAR as CPU_TRANSPORT_VAR;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use launcher::env::RankEnv;
use launcher::store::StoreClient;
use tch::{Device, Kind, Tensor};

pub use elem::Elem;

/// The reduction applied by all_reduce and reduce_scatter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size (floating-point dtypes only).
    Avg,
    /// Element-wise maximum (f32, f64, i64).
    Max,
}

/// Which backend `from_env` sets up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// NCCL when CUDA and NCCL are present, else CPU.
    Auto,
    Nccl,
    /// Shared memory on one host, TCP across nodes (or as `LLAVA_SCO_CPU_TRANSPORT` says).
    Cpu,
    /// The CPU backend forced onto its TCP transport (benchmarks, tests).
    Tcp,
}

/// The error a rank reports because another rank failed an agreed check (every rank stops when
/// one fails, rather than leave the others waiting in their next collective): `what` failed,
/// and `rank`'s own error (when known) says why. `trainer` marks it in its error file, so the
/// launcher's summary names the rank that failed first-hand, whichever exited first.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({})", match rank {
    Some(r) => format!("rank {r}'s error says why"),
    None => "that rank's own error says why".to_string(),
})]
pub struct FailedElsewhere {
    pub what: String,
    pub rank: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank environment: {0}")]
    Env(#[from] launcher::env::EnvError),
    #[error("rendezvous store: {0}")]
    Store(#[from] launcher::store::StoreError),
    #[error("rank {rank} stopped answering during {op}: {detail}")]
    PeerLost {
        rank: usize,
        op: String,
        detail: String,
    },
    #[error("{op} timed out after {secs} s waiting for rank(s) {ranks:?} (raise the timeout or check those ranks' logs)")]
    Timeout {
        op: String,
        secs: u64,
        ranks: Vec<usize>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("backend {backend} requested but {what}")]
    Unavailable { backend: &'static str, what: String },
    #[error("shared memory segment {path}: {detail}")]
    Shm { path: String, detail: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("the communication thread is gone (an earlier error or panic closed it)")]
    WorkerGone,
}

pub type Result<T> = std::result::Result<T, DistError>;

/// One collective, as queued to a backend's communication thread.
pub(crate) enum Op {
    AllGather {
        out: Tensor,
        input: Tensor,
    },
    ReduceScatter {
        out: Tensor,
        input: Tensor,
        op: ReduceOp,
    },
    AllReduce {
        tensor: Tensor,
        op: ReduceOp,
    },
    Broadcast {
        tensor: Tensor,
        root: usize,
    },
    Barrier,
}

impl Op {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::AllGather { .. } => "all_gather",
            Op::ReduceScatter { .. } => "reduce_scatter",
            Op::AllReduce { .. } => "all_reduce",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// A queued collective; `wait()` blocks until it completed (CPU) or until libtorch's current stream
/// is ordered after it (NCCL), and returns its error if it failed.
#[must_use = "a collective's result is only known after wait()"]
pub struct Work {
    done: mpsc::Receiver<Result<()>>,
    op: &'static str,
    finish: Option<Finish>,
    /// `wait` ran (else `Drop` waits).
    waited: bool,
    /// The sub-group it ran in (its errors name global ranks).
    group: Option<Arc<Members>>,
}

/// A Work dropped without `wait` (an error unwound past an in-flight prefetch) still waits for
/// its collective: NCCL may be writing into tensors that only the finish step keeps alive, and
/// the caching allocator would hand their memory out again under it. Errors are dropped (the
/// error being unwound is the one reported).
impl Drop for Work {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        let done = matches!(self.done.recv(), Ok(Ok(())));
        if let (true, Some(f)) = (done, self.finish.take()) {
            let _ = f();
        }
    }
}

/// Runs on the waiting thread once the backend reported success (NCCL: order libtorch's stream).
pub(crate) type Finish = Box<dyn FnOnce() -> Result<()> + Send>;

impl Work {
    /// A Work that is already done (an operation that needed no collective).
    pub fn ready() -> Work {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Ok(()));
        Work {
            done: rx,
            op: "none",
            finish: None,
            waited: false,
            group: None,
        }
    }

    pub fn wait(mut self) -> Result<()> {
        self.waited = true;
        let result = match self.done.recv() {
            Ok(Ok(())) => self.finish.take().map_or(Ok(()), |f| f()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DistError::Invalid(format!(
                "{}: the communication thread ended before answering",
                self.op
            ))),
        };
        match &self.group {
            Some(g) => result.map_err(|e| g.name_global_ranks(e)),
            None => result,
        }
    }
}

/// A sub-group's members (see [`ProcessGroup::new_group`]).
#[derive(Debug)]
struct Members {
    name: String,
    /// Global rank of each group rank.
    ranks: Vec<usize>,
}

impl Members {
    /// `e` with the ranks it names (group ranks) as global ranks, and the group named in its op.
    fn name_global_ranks(&self, e: DistError) -> DistError {
        let global = |r: usize| self.ranks.get(r).copied().unwrap_or(r);
        let within = |op: String| {
            format!(
                "{op} in group {} of global ranks {:?} (ranks in the detail count within the group)",
                self.name, self.ranks
            )
        };
        match e {
            DistError::PeerLost { rank, op, detail } => DistError::PeerLost {
                rank: global(rank),
                op: within(op),
                detail,
            },
            DistError::Timeout { op, secs, ranks } => DistError::Timeout {
                op: within(op),
                secs,
                ranks: ranks.into_iter().map(global).collect(),
            },
            // messages written by the backends, which know only group ranks
            DistError::Invalid(what) => DistError::Invalid(within(what)),
            DistError::Unavailable { backend, what } => DistError::Unavailable {
                backend,
                what: within(what),
            },
            other => other,
        }
    }
}

/// A backend runs ops in submission order on its own thread and reports each result.
pub(crate) trait Engine: Send {
    fn submit(&self, op: Op, done: mpsc::Sender<Result<()>>) -> Result<Option<Finish>>;
    fn name(&self) -> &'static str;
    /// How the ranks reach each other (the CPU backend: single, shm-cma, shm-copy or tcp).
    fn transport(&self) -> &'static str {
        self.name()
    }
}

/// The process group of all ranks of the run, or of some of them ([`ProcessGroup::new_group`]).
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    engine: Box<dyn Engine>,
    /// The run's rank environment and the settings this group was set up with (for sub-groups).
    env: RankEnv,
    backend: Backend,
    timeout: Duration,
    /// A sub-group's members (None: every rank of the run).
    group: Option<Arc<Members>>,
}

impl ProcessGroup {
    /// Reads torchrun's environment (world size 1 without a launcher), connects to the launcher's
    /// store, and sets up the backend. `timeout` bounds every wait on a peer.
    pub fn from_env(backend: Backend, timeout: Duration) -> Result<ProcessGroup> {
        let env = RankEnv::from_env()?;
        let store = if env.is_single() {
            None
        } else {
            Some(StoreClient::from_rank_env(&env)?)
        };
        Self::new(&env, store, backend, timeout)
    }

    pub(crate) fn new(
        env: &RankEnv,
        store: Option<StoreClient>,
        backend: Backend,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let engine = Self::engine(env, store, backend, timeout, "cpu-pg")?;
        // (sub-groups use the backend this group resolved to)
        let backend = match (backend, engine.name()) {
            (Backend::Auto, "nccl") => Backend::Nccl,
            (Backend::Auto, _) => Backend::Cpu,
            (b, _) => b,
        };
        Ok(ProcessGroup {
            rank: env.rank,
            world: env.world_size,
            engine,
            env: env.clone(),
            backend,
            timeout,
            group: None,
        })
    }

    /// The backend of a group of `env.world_size` ranks (`env.rank` this one); `segment` names
    /// the CPU backend's shared memory segment (one per group on a host).
    fn engine(
        env: &RankEnv,
        store: Option<StoreClient>,
        backend: Backend,
        timeout: Duration,
        segment: &str,
    ) -> Result<Box<dyn Engine>> {
        // auto: NCCL wherever libtorch sees CUDA. A GPU host whose driver or libnccl cannot be
        // loaded is an error, not a silent fallback that would train on the CPU.
        let use_nccl = match backend {
            Backend::Cpu | Backend::Tcp => false,
            Backend::Nccl => true,
            Backend::Auto => tch::Cuda::is_available(),
        };
        Ok(if use_nccl {
            let started = nccl::NcclEngine::start(env, store, timeout);
            Box::new(match (started, backend) {
                (Err(DistError::Unavailable { what, .. }), Backend::Auto) => {
                    return Err(DistError::Unavailable {
                        backend: "nccl",
                        what: format!(
                            "{what} (fsdp.backend: auto picks nccl because libtorch sees a CUDA GPU; set fsdp.backend: cpu to train on the CPU instead)"
                        ),
                    })
                }
                (started, _) => started?,
            })
        } else {
            let force_tcp = backend == Backend::Tcp;
            Box::new(cpu::CpuEngine::start(
                env, store, timeout, force_tcp, segment,
            )?)
        })
    }

    /// A process group of the global ranks `ranks` (ascending, this rank among them), as
    /// `torch.distributed.new_group`: every member calls it with the same `ranks` and `name`, and
    /// `name` differs between the groups of a run (it namespaces their rendezvous and, on the
    /// CPU backend, their shared memory). Ranks are numbered within the group, in the order of
    /// `ranks`; errors name global ranks. Same backend and timeout as this group.
    pub fn new_group(&self, ranks: &[usize], name: &str) -> Result<ProcessGroup> {
        let parent: Vec<usize> = match &self.group {
            Some(g) => g.ranks.clone(),
            None => (0..self.world).collect(),
        };
        let me = parent[self.rank];
        let ascending = ranks.windows(2).all(|w| w[0] < w[1]);
        if ranks.is_empty() || !ascending || ranks.iter().any(|r| !parent.contains(r)) {
            return Err(DistError::Invalid(format!(
                "new_group {name:?}: ranks {ranks:?} must be ascending ranks of this group ({parent:?})"
            )));
        }
        let Some(rank) = ranks.iter().position(|&r| r == me) else {
            return Err(DistError::Invalid(format!(
                "new_group {name:?}: this rank ({me}) is not among {ranks:?}"
            )));
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(DistError::Invalid(format!(
                "new_group {name:?}: name it with letters, digits and '-'"
            )));
        }
        let mut env = self.env.clone();
        env.rank = rank;
        env.world_size = ranks.len();
        // the nodes it spans (the launcher numbers ranks node by node): one node takes shared
        // memory on the CPU backend, several TCP
        let per_node = self.env.local_world_size.max(1);
        let mut nodes: Vec<usize> = ranks.iter().map(|r| r / per_node).collect();
        nodes.dedup();
        env.group_world_size = nodes.len();
        let store = match ranks.len() {
            1 => None,
            _ => Some(StoreClient::from_rank_env(&self.env)?.scoped(&format!("group/{name}/"))),
        };
        let engine = Self::engine(
            &env,
            store,
            self.backend,
            self.timeout,
            &format!("cpu-pg-{name}"),
        )?;
        Ok(ProcessGroup {
            rank,
            world: ranks.len(),
            engine,
            env: self.env.clone(),
            backend: self.backend,
            timeout: self.timeout,
            group: Some(Arc::new(Members {
                name: name.to_string(),
                ranks: ranks.to_vec(),
            })),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    pub fn backend_name(&self) -> &'static str {
        self.engine.name()
    }
    /// The backend's transport: for the CPU backend `single` (world 1), `shm-cma` (shared memory,
    /// single-copy reads), `shm-copy` (copies through the segment) or `tcp`; else the backend name.
    pub fn transport(&self) -> &'static str {
        self.engine.transport()
    }

    fn submit(&self, op: Op) -> Result<Work> {
        let name = op.name();
        let (tx, rx) = mpsc::channel();
        let finish = self.engine.submit(op, tx)?;
        Ok(Work {
            done: rx,
            op: name,
            finish,
            waited: false,
            group: self.group.clone(),
        })
    }

    /// out (W * n) = concat over ranks of input (n), in rank order.
    pub fn all_gather_into_async(&self, out: &Tensor, input: &Tensor) -> Result<Work> {
        check_pair(out, input, self.world, "all_gather_into", "out", "input")?;
        self.submit(Op::AllGather {
            out: out.shallow_clone(),
            input: input.shallow_clone(),
        })
    }
    pub fn all_gather_into(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        self.all_gather_into_async(out, input)?.wait()
    }

    /// out (n) on rank r = reduction over ranks of input[r*n .. (r+1)*n] (input has W * n elements).
    pub fn reduce_scatter_async(&self, out: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work> {
        check_pair(input, out, self.world, "reduce_scatter", "input", "out")?;
        check_op(input.kind(), op)?;
        self.submit(Op::ReduceScatter {
            out: out.shallow_clone(),
            input: input.shallow_clone(),
            op,
        })
    }
    pub fn reduce_scatter(&self, out: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_async(out, input, op)?.wait()
    }

    /// In place: every rank's tensor becomes the reduction over ranks.
    pub fn all_reduce_async(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        check_tensor(tensor, "all_reduce")?;
        check_op(tensor.kind(), op)?;
        self.submit(Op::AllReduce {
            tensor: tensor.shallow_clone(),
            op,
        })
    }
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_async(tensor, op)?.wait()
    }

    /// In place: every rank's tensor becomes `root`'s.
    pub fn broadcast_async(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        check_tensor(tensor, "broadcast")?;
        if root >= self.world {
            return Err(DistError::Invalid(format!(
                "broadcast root {root} is not a rank of a world of {}",
                self.world
            )));
        }
        self.submit(Op::Broadcast {
            tensor: tensor.shallow_clone(),
            root,
        })
    }
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        self.broadcast_async(tensor, root)?.wait()
    }

    pub fn barrier(&self) -> Result<()> {
        self.submit(Op::Barrier)?.wait()
    }
}

fn check_tensor(t: &Tensor, what: &str) -> Result<()> {
    Elem::of(t.kind()).ok_or_else(|| {
        DistError::Invalid(format!(
            "{what}: dtype {:?} is not supported (f32, f64, bf16, f16, i64)",
            t.kind()
        ))
    })?;
    if !t.is_contiguous() {
        return Err(DistError::Invalid(format!(
            "{what}: tensor must be contiguous (call .contiguous())"
        )));
    }
    Ok(())
}

/// `big` must hold W times the elements of `small`, same dtype and device.
fn check_pair(
    big: &Tensor,
    small: &Tensor,
    world: usize,
    what: &str,
    big_name: &str,
    small_name: &str,
) -> Result<()> {
    check_tensor(big, what)?;
    check_tensor(small, what)?;
    if big.kind() != small.kind() || big.device() != small.device() {
        return Err(DistError::Invalid(format!("{what}: {big_name} and {small_name} differ in dtype or device ({:?} {:?} vs {:?} {:?})", big.kind(), big.device(), small.kind(), small.device())));
    }
    if big.numel() != small.numel() * world {
        return Err(DistError::Invalid(format!(
            "{what}: {big_name} has {} elements, expected world size {world} x {} = {}",
            big.numel(),
            small.numel(),
            small.numel() * world
        )));
    }
    Ok(())
}

fn check_op(kind: Kind, op: ReduceOp) -> Result<()> {
    let ok = match op {
        ReduceOp::Sum => true,
        ReduceOp::Avg => kind != Kind::Int64,
        ReduceOp::Max => matches!(kind, Kind::Float | Kind::Double | Kind::Int64),
    };
    if ok {
        Ok(())
    } else {
        Err(DistError::Invalid(format!("reduction {op:?} is not supported for {kind:?} (Avg: floating point; Max: f32, f64, i64)")))
    }
}

/// The device a backend expects: CPU tensors for `cpu`, tensors on its communicator's GPU for
/// `nccl` (another GPU's memory would reach NCCL as an invalid pointer).
pub(crate) fn expect_device(t: &Tensor, expected: Device, what: &str) -> Result<()> {
    match t.device() {
        d if d == expected => Ok(()),
        d => Err(DistError::Invalid(format!(
            "{what}: the {} backend of this rank takes tensors on {expected:?}, got one on {d:?}",
            if expected.is_cuda() { "nccl" } else { "cpu" },
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sub-group's errors say which group they come from and which global ranks it holds, the
    /// backends' own messages (which count ranks within the group) included.
    #[test]
    fn sub_group_errors_name_the_group_and_its_global_ranks() {
        let m = Members {
            name: "hsdp0-replicate-1".into(),
            ranks: vec![1, 3],
        };
        let group = "in group hsdp0-replicate-1 of global ranks [1, 3] (ranks in the detail count within the group)";
        let e = m.name_global_ranks(DistError::Invalid(
            "all_reduce: rank 1 passed a tensor of 8 bytes".into(),
        ));
        assert_eq!(
            e.to_string(),
            format!("all_reduce: rank 1 passed a tensor of 8 bytes {group}")
        );
        let e = m.name_global_ranks(DistError::Unavailable {
            backend: "cpu",
            what: "rank 1 runs on host b".into(),
        });
        assert!(e.to_string().ends_with(group), "{e}");
        let e = m.name_global_ranks(DistError::PeerLost {
            rank: 1,
            op: "all_reduce".into(),
            detail: "gone".into(),
        });
        assert_eq!(
            e.to_string(),
            format!("rank 3 stopped answering during all_reduce {group}: gone")
        );
    }
}
