//! The supervisor: serve the store (node 0), meet the other nodes, start this node's ranks,
//! watch them, stop them all on the first failure or signal, restart the group while restarts
//! are left, and return the [`Outcome`].
//!
//! - [`process`]: one rank's process (own process group, dies with the launcher).
//! - [`output`]: relaying rank output to log files and the console; stderr tails.
//! - [`peers`]: coordination with the other nodes' launchers through the store.
//! - [`signals`]: the launcher's own SIGINT/SIGTERM/SIGHUP/SIGQUIT handling.
//! - [`watchdog`]: kills the ranks' process groups if the launcher itself is SIGKILLed.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::env::RankEnv;
use crate::outcome::{Failure, FailureKind, Outcome};
use crate::store::{StoreClient, StoreError, StoreServer};

mod log_lock;
pub mod output;
pub mod peers;
pub mod process;
pub mod signals;
pub mod watchdog;

pub use output::OutputOptions;
pub use process::RankCommand;

use peers::{JoinError, NodeLayout, Peers};
use process::{RankExit, RankProcess};
use watchdog::Watchdog;

/// Everything one launcher needs to run its node's share of the job. (No `Debug`: it holds the
/// store's secret.)
#[derive(Clone)]
pub struct LaunchSpec {
    pub command: RankCommand,
    /// Ranks on this node (`--nproc-per-node`).
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// 0 on node 0 of a single-node run picks a free port (`--standalone`).
    pub master_port: u16,
    pub max_restarts: u32,
    /// How often the other nodes are polled (local ranks are checked every 10 ms).
    pub monitor_interval: Duration,
    /// Time between the polite signal and SIGKILL.
    pub grace_period: Duration,
    /// Bound on how long ranks may run after another rank (or node) finished successfully.
    pub finish_timeout: Option<Duration>,
    /// Bound on reaching the store and on all nodes joining.
    pub rdzv_timeout: Duration,
    /// The ranks' `ROLE_NAME` (`--role`).
    pub role: String,
    /// Whether `run_id` was given (--run-id, SLURM's job id) rather than drawn at random: a
    /// node with an explicit one that differs from node 0's is refused, not renamed.
    pub run_id_explicit: bool,
    pub run_id: String,
    pub token: String,
    pub output: OutputOptions,
}

/// Failures of the launcher itself (as opposed to its ranks).
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("cannot install the launcher's signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    LogDir(String),
}

/// The any-interface address of `host`'s address family: "::" for an IPv6 master (an IPv4
/// wildcard would refuse the other nodes' connections), else "0.0.0.0".
fn wildcard_for(host: &str, port: u16) -> &'static str {
    use std::net::ToSocketAddrs;
    let v6 = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| a.is_ipv6());
    if v6 {
        "::"
    } else {
        "0.0.0.0"
    }
}

/// Whether `addr` reaches this host's store on `port`: one of its addresses is this host's (it
/// can be bound), or a connection gets through within 3 s (an address forwarded here, as a
/// container's published port).
fn reaches_this_host(addr: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(resolved) = (addr, port).to_socket_addrs() else {
        return true; // (an unresolvable name is the connection's error to report)
    };
    let resolved: Vec<_> = resolved.collect();
    let local = |a: &std::net::SocketAddr| std::net::UdpSocket::bind((a.ip(), 0)).is_ok();
    resolved.iter().any(local)
        || resolved
            .iter()
            .any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok())
}

/// Runs the job on this node until it succeeds or gives up. Call it from the main thread: ranks
/// die with the thread that started them (PR_SET_PDEATHSIG).
pub fn run(spec: &LaunchSpec) -> Result<Outcome, LaunchError> {
    signals::install().map_err(LaunchError::Signals)?;
    // before the rendezvous: a second launch with this run id must not join the first one's
    // store before it is refused (a random run id is this launch's own folder)
    let _log_lock = match (&spec.output.log_dir, spec.run_id_explicit) {
        (Some(dir), true) => Some(
            log_lock::LogDirLock::acquire(&dir.join(&spec.run_id), spec.node_rank)
                .map_err(LaunchError::LogDir)?,
        ),
        _ => None,
    };
    let host = hostname();
    // Node 0 serves the store: on every interface for a multi-node run (the master address may be
    // any of them) in the master address's family (IPv6 when it resolves to one), only on the
    // master address for a single node.
    let server = if spec.node_rank == 0 {
        let bind_host = if spec.nnodes > 1 {
            wildcard_for(&spec.master_addr, spec.master_port)
        } else {
            spec.master_addr.as_str()
        };
        Some(StoreServer::bind(
            (bind_host, spec.master_port),
            &spec.token,
        )?)
    } else {
        None
    };
    let port = server
        .as_ref()
        .map_or(spec.master_port, |s| s.local_addr().port());
    // node 0 given another host's address (or the node ranks swapped) would wait out
    // --rdzv-timeout for its own store, then suggest checking node 0
    // (a warning: an address forwarded here may only work later, as a service's)
    if spec.node_rank == 0 && spec.nnodes > 1 && !reaches_this_host(&spec.master_addr, port) {
        tracing::warn!(
            "--master-addr {} is not an address of this host ({host}) and does not lead here yet, but this is node 0 (--node-rank 0), which serves the rendezvous store: every node (and this node's ranks) connects to --master-addr, so unless it comes to lead here the rendezvous times out; give node 0's own address on every node, or run node rank 0 on {}",
            spec.master_addr, spec.master_addr
        );
    }
    let mut peers = if spec.nnodes > 1 {
        if spec.node_rank != 0 {
            tracing::info!(
                "node {} of {}: joining the rendezvous store at {}:{port}",
                spec.node_rank,
                spec.nnodes,
                spec.master_addr
            );
        }
        match connect_interruptible(&spec.master_addr, port, &spec.token, spec.rdzv_timeout)? {
            Ok(client) => Peers::multi(client, spec.node_rank, spec.nnodes, spec.monitor_interval),
            Err(sig) => return Ok(interrupted(spec, &host, 0, sig)),
        }
    } else {
        Peers::Single
    };
    // this invocation's id (checkpoints tell its own saves apart from another launch's, which
    // may share the run id: SLURM's job id, a reused --run-id)
    let launch_id = crate::token::random_hex(8).map_err(|e| {
        LaunchError::Rendezvous(format!("cannot read /dev/urandom for a launch id: {e}"))
    })?;
    let (run_id, launch_id) = match peers.agree_run_id(
        &spec.run_id,
        &launch_id,
        spec.run_id_explicit,
        spec.max_restarts,
        spec.rdzv_timeout,
    ) {
        Ok(ids) => ids,
        Err(err) => return join_failed(spec, &host, 0, err),
    };

    let error_files = ErrorFiles::new(&spec.output)?;
    let outcome = supervise(
        spec,
        &host,
        port,
        &mut peers,
        &run_id,
        &launch_id,
        &error_files,
    );
    // (every failure that recorded an error file passed `keep_for` in `supervise`)
    match (outcome, server.map(|s| s.stats().rejected)) {
        // a node that never joined may be the one the store turned away
        (Err(LaunchError::Rendezvous(msg)), Some(rejected @ 1..)) => Err(LaunchError::Rendezvous(format!(
            "{msg}; meanwhile the store rejected {rejected} connection(s) (the warnings above say why: a node started with another --run-id or {}?)",
            crate::env::STORE_TOKEN_VAR
        ))),
        (outcome, _) => outcome,
    }
}

/// Where the ranks' error files go (`TORCHELASTIC_ERROR_FILE`): beside their logs with
/// `--log-dir`, else in a folder of this launcher's own under the temp dir (torchrun's
/// `torchelastic_*`; a random name, as pids repeat across containers and nodes), removed at the
/// end unless a failure recorded a file in it (a restarted attempt's too).
struct ErrorFiles {
    root: PathBuf,
    temporary: bool,
    keep: std::cell::Cell<bool>,
}

impl ErrorFiles {
    fn new(output: &OutputOptions) -> Result<Self, LaunchError> {
        Ok(match &output.log_dir {
            Some(dir) => ErrorFiles {
                root: dir.clone(),
                temporary: false,
                keep: true.into(),
            },
            None => {
                let id = crate::token::random_hex(6).map_err(|e| {
                    LaunchError::Rendezvous(format!("cannot read /dev/urandom: {e}"))
                })?;
                ErrorFiles {
                    // (absolute: a rank that changes directory still finds its error file)
                    root: std::path::absolute(std::env::temp_dir())
                        .unwrap_or_else(|_| std::env::temp_dir())
                        .join(format!("launcher-errors-{id}")),
                    temporary: true,
                    keep: false.into(),
                }
            }
        })
    }

    fn path(&self, run_id: &str, attempt: u32, node: Option<usize>, local_rank: usize) -> PathBuf {
        output::rank_dir_in(&self.root, run_id, attempt, node, local_rank)
            .join(crate::error_file::FILE_NAME)
    }

    /// Keeps the folder when `failure` (of any attempt) names a file in it.
    fn keep_for(&self, failure: &Failure) {
        if failure
            .error
            .as_ref()
            .is_some_and(|e| e.file.starts_with(&self.root))
        {
            self.keep.set(true);
        }
    }
}

impl Drop for ErrorFiles {
    fn drop(&mut self) {
        if self.temporary && !self.keep.get() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The attempts, from the first rendezvous to the outcome.
fn supervise(
    spec: &LaunchSpec,
    host: &str,
    port: u16,
    peers: &mut Peers,
    run_id: &str,
    launch_id: &str,
    error_files: &ErrorFiles,
) -> Result<Outcome, LaunchError> {
    let mut watchdog = match Watchdog::start() {
        Ok(w) => Some(w),
        Err(err) => {
            tracing::warn!("cannot start the orphan watchdog (/bin/sh): {err}; ranks still die with the launcher");
            None
        }
    };
    let mut attempt = 0u32;
    // (this launcher's first attempt: 0, or a later one for a launcher started again)
    let mut first = true;
    loop {
        let layout = match peers.join(attempt, spec.nproc, host, spec.rdzv_timeout) {
            Ok(layout) => layout,
            // (a launcher started again in place of a lost one: the attempt the others run next)
            Err(JoinError::Later(next)) => {
                attempt = next;
                continue;
            }
            Err(err) => return join_failed(spec, host, attempt, err),
        };
        if std::mem::take(&mut first) {
            tracing::info!(
                "starting {} rank(s) on {host} (ranks {}..{} of world size {}), run id {run_id}, store {}:{port}",
                spec.nproc,
                layout.rank_offset,
                layout.rank_offset + spec.nproc - 1,
                layout.world_size,
                spec.master_addr
            );
        }
        let attempt_run = Attempt {
            spec,
            run_id,
            launch_id,
            host,
            port,
            attempt,
            layout,
            error_files,
        };
        let ran = attempt_run.run(peers, watchdog.as_mut());
        // shared-memory segments of ranks killed before they unlinked them
        let leftovers = crate::shm::remove_leftovers(run_id, port, attempt);
        if leftovers > 0 {
            tracing::debug!(
                "removed {leftovers} shared-memory segment(s) attempt {attempt} left in {}",
                crate::shm::dir().display()
            );
        }
        // (a notice that came after the ranks ended, not passed on, counts too)
        let pending = signals::take_notices();
        let noticed = signals::take_passed() || !pending.is_empty();
        match ran {
            Ok(()) => {
                peers.finish(attempt);
                return Ok(Outcome::Success { restarts: attempt });
            }
            Err(mut failure) => {
                error_files.keep_for(&failure);
                let mut restart = failure.restartable() && attempt < spec.max_restarts;
                if restart && noticed {
                    tracing::warn!(
                        "{} {} after a SIGUSR1/SIGUSR2 notice was passed on to the ranks: not restarting (such a notice announces the end of the allocation)",
                        who(&failure),
                        failure.kind.describe()
                    );
                    restart = false;
                }
                // a signal that reached the launcher after its ranks had stopped (a scheduler's
                // SIGTERM to every process of the job: a rank's death by it may be seen first)
                // ends the run instead
                if let Some(sig) = signals::take().filter(|_| restart) {
                    tracing::warn!(
                        "received {} after {} {}: not restarting",
                        crate::outcome::signal_name(sig),
                        who(&failure),
                        failure.kind.describe()
                    );
                    *failure = Failure::of_node(
                        FailureKind::LauncherSignal(sig),
                        failure.node_rank,
                        &failure.host,
                        failure.attempt,
                    );
                } else if restart {
                    // (what the rank recorded stays on disk: its file is named here, as no
                    // summary will name it if a later attempt succeeds)
                    let recorded = failure.error.as_ref().map_or(String::new(), |e| {
                        format!(": {} (error file {})", e.message, e.file.display())
                    });
                    // (a lost node comes back as its launcher started again, same flags)
                    let lost = match &failure.kind {
                        FailureKind::PeerLost(_) => format!(
                            "; attempt {} waits up to --rdzv-timeout ({} s) for node {}: start its launcher again",
                            attempt + 1,
                            spec.rdzv_timeout.as_secs(),
                            failure.node_rank
                        ),
                        _ => String::new(),
                    };
                    tracing::warn!(
                        "{} {} on attempt {attempt}{recorded}; restarting every rank (restart {} of {}){lost}",
                        who(&failure),
                        failure.kind.describe(),
                        attempt + 1,
                        spec.max_restarts
                    );
                    attempt += 1;
                    continue;
                }
                peers.give_up(attempt, &failure);
                peers.finish(attempt);
                return Ok(Outcome::Failed(*failure));
            }
        }
    }
}

fn who(f: &Failure) -> String {
    match f.rank {
        Some(rank) => format!("rank {rank} (node {}, {})", f.node_rank, f.host),
        None => format!("node {} ({})", f.node_rank, f.host),
    }
}

/// Connects to the store, giving up at the timeout or when the launcher gets a signal
/// (`Ok(Err(sig))`).
fn connect_interruptible(
    host: &str,
    port: u16,
    token: &str,
    timeout: Duration,
) -> Result<Result<StoreClient, i32>, StoreError> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match StoreClient::connect(host, port, token, left.min(Duration::from_millis(500))) {
            Ok(client) => return Ok(Ok(client)),
            Err(StoreError::Unreachable { endpoint, last, .. }) => {
                if let Some(sig) = signals::take() {
                    return Ok(Err(sig));
                }
                if start.elapsed() >= timeout {
                    return Err(StoreError::Unreachable {
                        endpoint,
                        waited: start.elapsed(),
                        last,
                    });
                }
            }
            Err(other) => return Err(other),
        }
    }
}

fn interrupted(spec: &LaunchSpec, host: &str, attempt: u32, sig: i32) -> Outcome {
    Outcome::Failed(Failure::of_node(
        FailureKind::LauncherSignal(sig),
        spec.node_rank,
        host,
        attempt,
    ))
}

fn join_failed(
    spec: &LaunchSpec,
    host: &str,
    attempt: u32,
    err: JoinError,
) -> Result<Outcome, LaunchError> {
    match err {
        JoinError::Interrupted(sig) => Ok(interrupted(spec, host, attempt, sig)),
        JoinError::Store(e) => Err(e.into()),
        JoinError::Rendezvous(msg) => Err(LaunchError::Rendezvous(msg)),
        JoinError::Later(next) => Err(LaunchError::Rendezvous(format!(
            "attempt {attempt} was over before this node joined, and attempt {next} is not joined by the caller"
        ))),
    }
}

/// One attempt: this node's ranks from start to the last exit.
struct Attempt<'a> {
    spec: &'a LaunchSpec,
    run_id: &'a str,
    launch_id: &'a str,
    host: &'a str,
    port: u16,
    attempt: u32,
    layout: NodeLayout,
    error_files: &'a ErrorFiles,
}

/// The stop in progress: ranks were signalled and get SIGKILL at `deadline`.
struct Stop {
    deadline: Instant,
    killed: bool,
}

/// How often local ranks and the launcher's signals are checked: `waitpid(WNOHANG)` per rank is
/// cheap, and a short tick means an exit is acted on within milliseconds. The other nodes (a
/// network round trip) are polled every `--monitor-interval`.
const TICK: Duration = Duration::from_millis(10);

/// How long a node whose root cause is a rank reporting another node's rank's failure waits for
/// that node to record the failure itself (`Peers::corrected_failure`): that node's attempt
/// ends once its ranks are gone, within the grace period (plus this slack), and at most this.
const CORRECTION_WAIT: Duration = Duration::from_secs(10);
const CORRECTION_SLACK: Duration = Duration::from_secs(2);

/// How long to wait for SIGKILLed ranks to be reaped before giving up on them (a process stuck in
/// uninterruptible I/O cannot die until the I/O ends; the launcher must still end).
const REAP_TIMEOUT: Duration = Duration::from_secs(30);

impl Attempt<'_> {
    fn rank_env(&self, local_rank: usize) -> RankEnv {
        let spec = self.spec;
        let rank = self.layout.rank_offset + local_rank;
        RankEnv {
            rank,
            local_rank,
            world_size: self.layout.world_size,
            local_world_size: spec.nproc,
            group_rank: spec.node_rank,
            group_world_size: spec.nnodes,
            role_rank: rank,
            role_world_size: self.layout.world_size,
            role_name: spec.role.clone(),
            master_addr: spec.master_addr.clone(),
            master_port: self.port,
            restart_count: self.attempt,
            max_restarts: spec.max_restarts,
            run_id: self.run_id.to_string(),
            store_token: Some(spec.token.clone()),
            launch_id: Some(self.launch_id.to_string()),
        }
    }

    fn failure(&self, kind: FailureKind, rank: Option<&RankProcess>) -> Failure {
        Failure {
            kind,
            rank: rank.map(|r| r.env.rank),
            local_rank: rank.map(|r| r.env.local_rank),
            node_rank: self.spec.node_rank,
            host: self.host.to_string(),
            attempt: self.attempt,
            log: rank.and_then(|r| r.output.stderr_log.clone()),
            stderr_tail: rank.map(|r| r.output.tail()).unwrap_or_default(),
            error: rank
                .and_then(|r| r.error_file.as_deref())
                .and_then(crate::error_file::read)
                .map(Box::new),
            others: Vec::new(),
        }
    }

    /// Runs the attempt; `Err` carries the root cause.
    // (see `first_failed` for the choice among ranks that failed in the same poll pass)
    fn run(
        &self,
        peers: &mut Peers,
        mut watchdog: Option<&mut Watchdog>,
    ) -> Result<(), Box<Failure>> {
        let spec = self.spec;
        let mut ranks: Vec<RankProcess> = Vec::with_capacity(spec.nproc);
        let mut root: Option<Failure> = None;
        // Local rank whose failure is the root cause (its stderr tail is refreshed at the end).
        let mut root_local: Option<usize> = None;
        let mut stop: Option<Stop> = None;
        for sig in signals::take_notices() {
            // (received while no rank of this attempt ran: not for these ranks)
            tracing::warn!(
                "received {} before the ranks started: not passed on",
                crate::outcome::signal_name(sig)
            );
        }

        for local_rank in 0..spec.nproc {
            let env = self.rank_env(local_rank);
            let node = (spec.nnodes > 1).then_some(spec.node_rank);
            let dir = spec
                .output
                .rank_dir(self.run_id, self.attempt, node, local_rank);
            let error_file = self
                .error_files
                .path(self.run_id, self.attempt, node, local_rank);
            match RankProcess::spawn(
                &spec.command,
                env.clone(),
                &spec.output,
                dir.as_deref(),
                Some(&error_file),
            ) {
                Ok(rank) => {
                    if let Some(w) = watchdog.as_deref_mut() {
                        w.watch(rank.pgid);
                    }
                    ranks.push(rank)
                }
                Err(err) => {
                    let mut failure = self.failure(
                        FailureKind::SpawnFailed(format!(
                            "{}: {err}",
                            spec.command.program.display()
                        )),
                        None,
                    );
                    failure.rank = Some(env.rank);
                    failure.local_rank = Some(local_rank);
                    root = Some(peers.report_failure(self.attempt, failure));
                    stop = Some(self.begin_stop(&ranks, libc::SIGTERM));
                    break;
                }
            }
        }

        let mut first_success: Option<Instant> = None;
        let mut last_peer_poll = Instant::now();
        loop {
            // A scheduler's notice (SIGUSR1, SIGUSR2): passed on, nothing stops.
            for sig in signals::take_notices() {
                tracing::warn!(
                    "received {}: passing it on to every running rank",
                    crate::outcome::signal_name(sig)
                );
                for rank in ranks.iter().filter(|r| r.running()) {
                    rank.signal(sig);
                }
                signals::note_passed();
            }
            // The launcher's own signals: forward the same signal; a second one kills at once.
            if let Some(sig) = signals::take() {
                if stop.is_some() {
                    tracing::warn!(
                        "received {} while stopping: killing every rank now",
                        crate::outcome::signal_name(sig)
                    );
                    kill_running(&ranks);
                    if let Some(s) = stop.as_mut() {
                        s.killed = true;
                        s.deadline = s.deadline.min(Instant::now());
                    }
                    // the first signal of the launcher's own decides the outcome (128+sig, no
                    // restart) even when a rank's failure started the stop: a Ctrl-C or a
                    // scheduler's SIGTERM during the grace period ends the run
                    if !root
                        .as_ref()
                        .is_some_and(|f| matches!(f.kind, FailureKind::LauncherSignal(_)))
                    {
                        let failure = self.failure(FailureKind::LauncherSignal(sig), None);
                        peers.report_failure(self.attempt, failure.clone());
                        root = Some(failure);
                        root_local = None;
                    }
                } else {
                    tracing::warn!(
                        "received {}: forwarding it to every rank (again to kill them at once)",
                        crate::outcome::signal_name(sig)
                    );
                    // Our own signal decides our exit code (128+sig) even if a peer failed first.
                    let failure = self.failure(FailureKind::LauncherSignal(sig), None);
                    peers.report_failure(self.attempt, failure.clone());
                    root = Some(failure);
                    stop = Some(self.begin_stop(&ranks, sig));
                }
            }

            // the ranks that failed since the last pass (several when one rank's failure made
            // its peers fail within the poll interval)
            let mut failed = Vec::new();
            for (i, rank) in ranks.iter_mut().enumerate() {
                let Some(exit) = rank.poll() else { continue };
                if exit.success() {
                    first_success.get_or_insert_with(Instant::now);
                } else if stop.is_none() && root.is_none() {
                    failed.push((i, exit));
                }
            }
            if let Some((i, exit)) = first_failed(failed, |i| error_file_written(&ranks[i])) {
                let rank = &mut ranks[i];
                rank.output.settle_stderr(Duration::from_millis(250));
                let failure = self.failure(exit.failure_kind(), Some(rank));
                root_local = Some(i);
                root = Some(peers.report_failure(self.attempt, failure));
            }
            if root.is_some() && stop.is_none() {
                stop = Some(self.begin_stop(&ranks, libc::SIGTERM));
            }
            if ranks.iter().all(|r| !r.running()) {
                break;
            }

            if stop.is_none() && last_peer_poll.elapsed() >= spec.monitor_interval {
                last_peer_poll = Instant::now();
                if let Some(failure) = peers.poll_failure(self.attempt) {
                    tracing::warn!("stopping: {} {}", who(&failure), failure.kind.describe());
                    root = Some(failure);
                    stop = Some(self.begin_stop(&ranks, libc::SIGTERM));
                }
            }

            if let (None, Some(t), Some(since)) = (&stop, spec.finish_timeout, first_success) {
                if since.elapsed() >= t {
                    let stuck: Vec<usize> = ranks
                        .iter()
                        .filter(|r| r.running())
                        .map(|r| r.env.rank)
                        .collect();
                    let what = format!(
                        "rank(s) {stuck:?} still running {} s after other ranks finished \
                         (hung? raise --finish-timeout, or 0 to wait forever)",
                        t.as_secs()
                    );
                    let first_stuck = ranks.iter().find(|r| r.running());
                    let failure = self.failure(FailureKind::FinishTimeout(what), first_stuck);
                    root = Some(peers.report_failure(self.attempt, failure));
                    stop = Some(self.begin_stop(&ranks, libc::SIGTERM));
                }
            }

            if let Some(s) = stop.as_mut() {
                if s.killed && Instant::now() >= s.deadline + REAP_TIMEOUT {
                    let stuck: Vec<usize> = ranks
                        .iter()
                        .filter(|r| r.running())
                        .map(|r| r.env.rank)
                        .collect();
                    tracing::error!(
                        "rank(s) {stuck:?} survived SIGKILL for {} s (stuck in the kernel, e.g. on a dead \
                         filesystem or GPU driver); giving up on them",
                        REAP_TIMEOUT.as_secs()
                    );
                    break;
                }
                if !s.killed && Instant::now() >= s.deadline {
                    let stuck: Vec<usize> = ranks
                        .iter()
                        .filter(|r| r.running())
                        .map(|r| r.env.rank)
                        .collect();
                    tracing::warn!(
                        "rank(s) {stuck:?} still running after the {} s grace period: sending SIGKILL",
                        spec.grace_period.as_secs_f64()
                    );
                    kill_running(&ranks);
                    s.killed = true;
                }
            }
            std::thread::sleep(TICK.min(spec.monitor_interval));
        }

        // Children the ranks left behind in their groups go too: no orphans. (The ranks are
        // reaped only now: their pids, the groups' ids, stayed reserved until this signal.)
        for rank in &mut ranks {
            rank.signal(libc::SIGKILL);
            rank.reap();
        }
        if let Some(w) = watchdog {
            w.clear();
        }
        let drain_deadline = Instant::now() + Duration::from_secs(2);
        let attempt = self.attempt;
        for rank in &mut ranks {
            rank.output
                .finish(drain_deadline, &mut || peers.keep_alive(attempt));
        }

        if let Some(mut failure) = root {
            let here = root_local.filter(|&i| {
                failure.rank == Some(ranks[i].env.rank) && failure.node_rank == spec.node_rank
            });
            // A root cause that only reports another rank's failure ("the data file is missing
            // on another rank") gives way to that rank: the two exit within moments, and the
            // messenger may have been seen first, here or on another node. The node of the
            // rank it names records that rank's failure for every node instead; the others
            // wait a moment for that correction.
            let blamed = failure.blamed_rank();
            let failed = |r: &RankProcess| r.exit.filter(|e| !e.success());
            let named = ranks
                .iter()
                .position(|r| Some(r.env.rank) == blamed && failed(r).is_some());
            let shown = match named {
                Some(j) if Some(j) != here => {
                    let exit = failed(&ranks[j]).expect("a failed rank");
                    let real = self.failure(exit.failure_kind(), Some(&ranks[j]));
                    failure = peers.correct_failure(self.attempt, real);
                    Some(j)
                }
                Some(_) => here,
                None if blamed.is_some() => {
                    let before = failure.rank;
                    let wait = (spec.grace_period + CORRECTION_SLACK).min(CORRECTION_WAIT);
                    failure = peers.corrected_failure(self.attempt, failure, wait);
                    here.filter(|_| failure.rank == before)
                }
                None => here,
            };
            if let Some(i) = shown {
                failure.stderr_tail = ranks[i].output.tail();
                failure.others = other_failures(&ranks, i);
            } else if let Some(i) = root_local {
                // this node's failure lost the race to another node's (both failed within a
                // poll): listed first among the others, not dropped
                let own = self.failure(
                    ranks[i]
                        .exit
                        .map_or(FailureKind::Exited(1), |e| e.failure_kind()),
                    Some(&ranks[i]),
                );
                let why = own
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .or_else(|| own.stderr_tail.last().cloned());
                let line = format!(
                    "rank {} (local rank {} on node {}, {}): {}{}",
                    ranks[i].env.rank,
                    ranks[i].env.local_rank,
                    spec.node_rank,
                    self.host,
                    own.kind.describe(),
                    why.map_or(String::new(), |w| format!(": {w}"))
                );
                failure.others = [vec![line], other_failures(&ranks, i)].concat();
            }
            return Err(Box::new(failure));
        }
        self.wait_for_other_nodes(peers)
    }

    /// Sends `sig` to every running rank and starts the grace period.
    fn begin_stop(&self, ranks: &[RankProcess], sig: i32) -> Stop {
        for rank in ranks.iter().filter(|r| r.running()) {
            rank.signal(sig);
        }
        Stop {
            deadline: Instant::now() + self.spec.grace_period,
            killed: false,
        }
    }

    /// Node 0's loss (its store is gone): the failure is node 0's, as `MultiNode::lost` names
    /// it, not this node's, which only noticed (and not a lost node a restart would wait for).
    fn lost_node0(&self, err: StoreError) -> Box<Failure> {
        let kind = FailureKind::PeerLost(format!("lost contact with node 0: {err}"));
        let host = &self.spec.master_addr;
        Box::new(Failure::of_node(kind, 0, host, self.attempt))
    }

    /// After this node's ranks all succeeded: wait until every node's did, or a failure appears.
    fn wait_for_other_nodes(&self, peers: &mut Peers) -> Result<(), Box<Failure>> {
        if let Err(err) = peers.report_done(self.attempt) {
            return Err(self.lost_node0(err));
        }
        let since = Instant::now();
        loop {
            match peers.all_done(self.attempt) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(err) => return Err(self.lost_node0(err)),
            }
            if let Some(failure) = peers.poll_failure(self.attempt) {
                return Err(Box::new(failure));
            }
            if let Some(sig) = signals::take() {
                let failure = self.failure(FailureKind::LauncherSignal(sig), None);
                peers.report_failure(self.attempt, failure.clone());
                return Err(Box::new(failure));
            }
            if let Some(t) = self.spec.finish_timeout {
                if since.elapsed() >= t {
                    // (the failure is the first node still running: the hung one, not this one)
                    let running = peers.running_nodes(self.attempt);
                    let nodes: Vec<usize> = running.iter().map(|(n, _)| *n).collect();
                    let what = format!(
                        "node(s) {nodes:?} still running {} s after node {}'s ranks finished \
                         (hung? raise --finish-timeout, or 0 to wait forever)",
                        t.as_secs(),
                        self.spec.node_rank
                    );
                    let kind = FailureKind::FinishTimeout(what);
                    let failure = match running.first() {
                        Some((node, host)) => Failure::of_node(kind, *node, host, self.attempt),
                        None => self.failure(kind, None),
                    };
                    return Err(Box::new(peers.report_failure(self.attempt, failure)));
                }
            }
            // (at most 1 s: once every node is done, node 0 keeps its store up for only
            // `peers::ack_wait` for the others to read it; a longer --monitor-interval would find
            // it gone and report a successful run as lost contact)
            std::thread::sleep(self.spec.monitor_interval.min(Duration::from_secs(1)));
        }
    }
}

/// The root cause among ranks that failed in the same poll pass (`failed`: local rank, exit). A
/// rank whose failure made its peers fail within the pass (its sockets closed: "peer
/// disconnected" on the others) failed first, so: a rank killed by a crash signal without an
/// error file (out of memory, a segfault: it could write none, while its peers write theirs about
/// it), then the one whose error file was written first (`written`: its modification time;
/// torchrun's rule, finer than the file's own timestamp in seconds, and whether the file says the
/// error was caused by another rank), then the others (an exit before the handler was installed)
/// in local-rank order, and last the ranks whose error files say another rank failed.
fn first_failed(
    failed: Vec<(usize, RankExit)>,
    written: impl Fn(usize) -> Option<(std::time::SystemTime, bool)>,
) -> Option<(usize, RankExit)> {
    const CRASHES: [i32; 6] = [
        libc::SIGKILL,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
    ];
    failed.into_iter().min_by_key(|&(i, exit)| {
        let at = written(i);
        let class = match (at, exit) {
            (None, RankExit::Signal(s)) if CRASHES.contains(&s) => 0,
            (Some((_, false)), _) => 1,
            (None, _) => 2,
            (Some((_, true)), _) => 3,
        };
        (class, at.map(|(t, _)| t), i)
    })
}

/// When `rank`'s error file was last written, if it was, and whether it says another rank's
/// failure caused the error.
fn error_file_written(rank: &RankProcess) -> Option<(std::time::SystemTime, bool)> {
    let file = rank.error_file.as_deref()?;
    let at = std::fs::metadata(file).ok()?.modified().ok()?;
    let elsewhere = crate::error_file::read(file).is_some_and(|e| e.elsewhere);
    Some((at, elsewhere))
}

/// One line for each rank of this node but `root` that failed and recorded an error (torchrun's
/// "Other Failures"), in local-rank order.
fn other_failures(ranks: &[RankProcess], root: usize) -> Vec<String> {
    let recorded =
        |r: &RankProcess| Some((r.exit?, crate::error_file::read(r.error_file.as_deref()?)?));
    ranks
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != root)
        .filter_map(|(_, r)| {
            let (exit, error) = recorded(r).filter(|(exit, _)| !exit.success())?;
            Some(format!(
                "rank {} (local rank {}): {}: {}",
                r.env.rank,
                r.env.local_rank,
                exit.failure_kind().describe(),
                error.message
            ))
        })
        .collect()
}

fn kill_running(ranks: &[RankProcess]) {
    for rank in ranks.iter().filter(|r| r.running()) {
        rank.signal(libc::SIGKILL);
    }
}

/// This machine's host name (for reports).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match ok {
        true if end > 0 => String::from_utf8_lossy(&buf[..end]).into_owned(),
        _ => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{first_failed, wildcard_for, RankExit};

    #[test]
    fn the_store_listens_in_the_master_addresss_family() {
        assert_eq!(wildcard_for("::1", 29500), "::");
        assert_eq!(wildcard_for("fe80::1", 29500), "::");
        assert_eq!(wildcard_for("127.0.0.1", 29500), "0.0.0.0");
        assert_eq!(wildcard_for("no-such-host.invalid", 29500), "0.0.0.0");
    }

    /// Ranks that failed in the same poll pass: a rank killed by a crash signal without an error
    /// file, else the one whose error file was written first, is the root cause; the others come
    /// after, in local-rank order.
    #[test]
    fn the_first_error_file_written_names_the_root_cause() {
        use std::time::{Duration, SystemTime};
        let t = |ms: u64| Some((SystemTime::UNIX_EPOCH + Duration::from_millis(ms), false));
        let exits = vec![
            (0, RankExit::Code(1)),
            (1, RankExit::Code(3)),
            (2, RankExit::Signal(15)),
        ];
        // rank 1 panicked first; rank 0 failed on the closed connection 4 ms later
        let written = |i: usize| [t(1004), t(1000), None][i];
        assert_eq!(
            first_failed(exits.clone(), written),
            Some((1, RankExit::Code(3)))
        );
        // no error files, no crash: local-rank order, as before
        assert_eq!(
            first_failed(exits.clone(), |_| None),
            Some((0, RankExit::Code(1)))
        );
        let written = |i: usize| [None, None, t(5)][i];
        assert_eq!(
            first_failed(exits, written),
            Some((2, RankExit::Signal(15)))
        );
        // rank 2 was SIGKILLed (out of memory): it wrote no file, its peers wrote theirs about it
        let killed = vec![
            (0, RankExit::Code(1)),
            (1, RankExit::Code(1)),
            (2, RankExit::Signal(libc::SIGKILL)),
        ];
        let written = |i: usize| [t(1004), t(1000), None][i];
        assert_eq!(
            first_failed(killed, written),
            Some((2, RankExit::Signal(libc::SIGKILL)))
        );
        assert_eq!(first_failed(vec![], |_| None), None);
        // rank 0 wrote first, but its file says another rank's failure caused its error: the
        // rank with an error of its own is the root cause, even one that wrote no file
        let elsewhere = |ms: u64| t(ms).map(|(at, _)| (at, true));
        let exits = vec![(0, RankExit::Code(1)), (1, RankExit::Code(1))];
        let written = |i: usize| [elsewhere(1000), t(1004)][i];
        assert_eq!(
            first_failed(exits.clone(), written),
            Some((1, RankExit::Code(1)))
        );
        let written = |i: usize| [elsewhere(1000), None][i];
        assert_eq!(first_failed(exits, written), Some((1, RankExit::Code(1))));
    }
}
