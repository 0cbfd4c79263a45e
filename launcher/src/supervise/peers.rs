//! Coordination between the launchers of a multi-node run, through node 0's store.
//!
//! Keys (all under `launcher/`, per attempt `a<k>/`):
//! - `run_id`                 node 0's run id (the others adopt it)
//! - `a<k>/node/<r>`          "host pid nproc" of node r; compare-set, so a duplicate node rank is caught
//! - `a<k>/joined`            join counter
//! - `a<k>/gate`              compare-set once: `open` by the last node to join, or `abandoned WHY`
//!   by a node that stopped waiting (or ended the run); whichever came first holds for every node
//! - `a<k>/failed`            the first failure of the attempt (compare-set: exactly one root cause)
//! - `a<k>/done`              nodes whose ranks all exited 0 (and `a<k>/done/<r>` for each)
//! - `a<k>/acks`              nodes that learned the attempt's outcome (node 0 waits for them before
//!   its store goes away)
//! - `a<k>/hb/<r>`            heartbeat counter of node r (node 0 notices a node that vanished)
use std::time::{Duration, Instant};

use super::signals;
use crate::outcome::{Failure, FailureKind};
use crate::store::{CompareSet, StoreClient, StoreError};

/// An attempt's gate (`a<k>/gate`): every node starts its ranks, or none does.
const GATE_OPEN: &str = "open";
/// Prefix of a gate that a node closed for good; the rest is why.
const GATE_ABANDONED: &str = "abandoned ";

/// How often a node bumps its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Node 0 declares a node lost after this long without a heartbeat, or 3 monitor intervals when
/// that is longer (heartbeats are sent when the supervisor polls, every `--monitor-interval`).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long node 0 waits for a heartbeat before declaring a node lost.
pub fn heartbeat_timeout(monitor_interval: Duration) -> Duration {
    HEARTBEAT_TIMEOUT.max(monitor_interval.saturating_mul(3))
}
/// How long node 0 keeps its store up for the other nodes to learn the outcome, at least; longer
/// with a long monitor interval ([`ack_wait`]).
const ACK_WAIT: Duration = Duration::from_secs(10);

/// How long node 0 keeps its store up for the others: they look at it every monitor interval
/// while their ranks run, so two intervals and a margin at least (else a node would find the
/// store gone and report lost contact instead of the outcome).
pub fn ack_wait(monitor_interval: Duration) -> Duration {
    ACK_WAIT.max(monitor_interval.saturating_mul(2) + Duration::from_secs(2))
}

/// Where this node's ranks sit in the world of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLayout {
    /// Global rank of this node's local rank 0.
    pub rank_offset: usize,
    pub world_size: usize,
}

/// Why joining an attempt did not work.
#[derive(Debug)]
pub enum JoinError {
    /// The launcher got a signal while waiting.
    Interrupted(i32),
    Store(StoreError),
    Rendezvous(String),
    /// This node's launcher was started again in place of a lost one after the attempt began:
    /// it joins the attempt the others restart into (the number given).
    Later(u32),
}

impl From<StoreError> for JoinError {
    fn from(e: StoreError) -> Self {
        JoinError::Store(e)
    }
}

/// The other nodes, as seen from this one.
pub enum Peers {
    /// Single-node run: nothing to coordinate.
    Single,
    Multi(Box<MultiNode>),
}

pub struct MultiNode {
    client: StoreClient,
    node_rank: usize,
    nnodes: usize,
    last_heartbeat: Instant,
    /// [`heartbeat_timeout`] of the run's monitor interval.
    heartbeat_timeout: Duration,
    /// Node 0's view of every node's heartbeat: (last value, when it last changed).
    heartbeats: Vec<(i64, Instant)>,
    /// The attempt whose outcome this node has acknowledged.
    acked: Option<u32>,
    /// [`ack_wait`] of the run's monitor interval.
    ack_wait: Duration,
    /// (attempt, node) of the nodes node 0 found without heartbeats in an attempt: not waited
    /// for at its end.
    lost: Vec<(u32, usize)>,
    /// This node's --max-restarts (`agree_run_id`), named when it ends the run.
    max_restarts: u32,
}

impl Peers {
    pub fn multi(
        client: StoreClient,
        node_rank: usize,
        nnodes: usize,
        monitor_interval: Duration,
    ) -> Self {
        let now = Instant::now();
        Peers::Multi(Box::new(MultiNode {
            client,
            node_rank,
            nnodes,
            last_heartbeat: now - HEARTBEAT_EVERY,
            heartbeat_timeout: heartbeat_timeout(monitor_interval),
            heartbeats: vec![(-1, now); nnodes],
            acked: None,
            ack_wait: ack_wait(monitor_interval),
            lost: vec![],
            max_restarts: 0,
        }))
    }

    /// Node 0 publishes its run id and `launch_id`; the others adopt them (so TORCHELASTIC_RUN_ID
    /// and LLAVA_SCO_LAUNCH_ID agree everywhere), unless their run id was given (`explicit`) and
    /// differs: then two runs met at one store (a shared exported token lets them in), which is an
    /// error. Node 0's `--nnodes` is checked too: nodes that disagree would each wait for a node
    /// count the others never reach, until the rendezvous timeout; and its `--max-restarts`, with a
    /// warning: a node with fewer ends the run where the others would restart it. Returns (run
    /// id, launch id).
    pub fn agree_run_id(
        &mut self,
        run_id: &str,
        launch_id: &str,
        explicit: bool,
        max_restarts: u32,
        timeout: Duration,
    ) -> Result<(String, String), JoinError> {
        let Peers::Multi(m) = self else {
            return Ok((run_id.to_string(), launch_id.to_string()));
        };
        m.max_restarts = max_restarts;
        if m.node_rank == 0 {
            // (the launch id and node count first: a node that reads the run id finds them)
            m.client
                .set("launcher/nnodes", m.nnodes.to_string().as_bytes())?;
            m.client
                .set("launcher/max_restarts", max_restarts.to_string().as_bytes())?;
            m.client.set("launcher/launch_id", launch_id.as_bytes())?;
            m.client.set("launcher/run_id", run_id.as_bytes())?;
            return Ok((run_id.to_string(), launch_id.to_string()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match m
                .client
                .get_timeout("launcher/run_id", Duration::from_secs(1))
            {
                Ok(v) => {
                    let theirs = String::from_utf8_lossy(&v).into_owned();
                    if explicit && theirs != run_id {
                        return Err(JoinError::Rendezvous(format!(
                            "this node's run id {run_id:?} differs from node 0's {theirs:?}: two runs met at one store; pass the same --run-id to every node of a run (and another --master-port per run)"
                        )));
                    }
                    let mut node0s = |key: &str| -> Result<String, StoreError> {
                        Ok(
                            String::from_utf8_lossy(&m.client.get(&format!("launcher/{key}"))?)
                                .into_owned(),
                        )
                    };
                    let (nnodes, restarts) = (node0s("nnodes")?, node0s("max_restarts")?);
                    // (each node decides its restarts, as torchrun's agents do: one with fewer
                    // ends the run where the others would restart it)
                    if restarts != max_restarts.to_string() {
                        tracing::warn!(
                            "node {}'s --max-restarts {max_restarts} differs from node 0's {restarts}: the node with fewer ends the run when its restarts run out; give every node the same --max-restarts",
                            m.node_rank
                        );
                    }
                    if nnodes != m.nnodes.to_string() {
                        let why = format!(
                            "node {}'s --nnodes {} differs from node 0's {nnodes}: give every node the same --nnodes",
                            m.node_rank, m.nnodes
                        );
                        // (node 0 and the others, waiting for the first attempt, stop at once)
                        let abandon = format!("{GATE_ABANDONED}{why}");
                        let _ = m
                            .client
                            .compare_set("launcher/a0/gate", None, abandon.as_bytes());
                        return Err(JoinError::Rendezvous(why));
                    }
                    let launch = m.client.get("launcher/launch_id")?;
                    return Ok((theirs, String::from_utf8_lossy(&launch).into_owned()));
                }
                Err(StoreError::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            check_signal_and_deadline(deadline, || "node 0 to publish the run id".to_string())?;
        }
    }

    /// Waits until every node has joined attempt `attempt`; returns this node's place in the world.
    pub fn join(
        &mut self,
        attempt: u32,
        nproc: usize,
        host: &str,
        timeout: Duration,
    ) -> Result<NodeLayout, JoinError> {
        let Peers::Multi(m) = self else {
            return Ok(NodeLayout {
                rank_offset: 0,
                world_size: nproc,
            });
        };
        let a = format!("launcher/a{attempt}");
        let me = format!("{host} {} {nproc}", std::process::id());
        let entry = format!("{a}/node/{}", m.node_rank);
        let mut replaced = false;
        if let CompareSet::Mismatch(Some(other)) =
            m.client.compare_set(&entry, None, me.as_bytes())?
        {
            // a launcher started again in place of this node's lost one: it takes its place in
            // a rendezvous still open, or joins the attempt the others restart into
            match m.in_place_of(attempt, &other, host, timeout)? {
                InPlaceOf::Later(next) => return Err(JoinError::Later(next)),
                InPlaceOf::Rendezvous
                    if m.client.compare_set(&entry, Some(&other), me.as_bytes())?
                        == CompareSet::Swapped =>
                {
                    tracing::warn!(
                        "node rank {}'s earlier launcher (pid {}) on this host is gone: this launcher takes its place in the rendezvous of attempt {attempt}",
                        m.node_rank,
                        registered_pid(&other).unwrap_or(0)
                    );
                    replaced = true;
                }
                place => {
                    let other_host = registered_host(&other);
                    // (a running attempt goes on without this launcher: if the one registered
                    // is gone, a launcher started again once node 0 found it lost joins)
                    let hint = match place {
                        InPlaceOf::Neither { running: true } => format!(
                            "; if that launcher is gone, node 0 finds it lost within {} s and, with --max-restarts, the nodes restart: start this node again then",
                            m.heartbeat_timeout.as_secs()
                        ),
                        _ => String::new(),
                    };
                    let why = format!(
                        "node rank {} is already taken by a launcher on {other_host} (give every node a distinct --node-rank{hint})",
                        m.node_rank
                    );
                    // the other nodes stop now, told why, instead of waiting out --rdzv-timeout
                    // for the node rank this launcher leaves missing (a gate already open keeps
                    // the run going)
                    let _ = m.abandon_gate(&a, &format!("a second launcher on {host}: {why}"));
                    return Err(JoinError::Rendezvous(why));
                }
            }
        }
        // (the launcher this one replaced was counted)
        let joined = match replaced {
            true => m.count(&format!("{a}/joined"))?,
            false => m.client.add(&format!("{a}/joined"), 1)?,
        };
        tracing::info!(
            "node {} joined the rendezvous of attempt {attempt} ({joined} of {} nodes so far)",
            m.node_rank,
            m.nnodes
        );
        let gate = format!("{a}/gate");
        if joined == m.nnodes as i64 {
            m.settle_gate(&a, attempt, GATE_OPEN)?;
        } else if joined > m.nnodes as i64 {
            return Err(JoinError::Rendezvous(format!(
                "more than {} launchers joined (is --nnodes the same on every node?)",
                m.nnodes
            )));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match m.client.wait(&[&gate], Duration::from_secs(1)) {
                Ok(()) => {
                    m.settle_gate(&a, attempt, GATE_OPEN)?;
                    break;
                }
                Err(StoreError::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if let Err(err) = check_signal_and_deadline(deadline, String::new) {
                let err = match err {
                    JoinError::Rendezvous(_) => {
                        let missing = m.missing_nodes(&a);
                        JoinError::Rendezvous(format!(
                            "only {} of {} nodes joined within {} s; missing node ranks {missing:?} \
                             (start one launcher per node with the same --nnodes, --master-addr and --master-port)",
                            m.nnodes - missing.len(),
                            m.nnodes,
                            timeout.as_secs()
                        ))
                    }
                    err => err,
                };
                // This node counts as joined: the others (and a late node, which would complete
                // the count and start ranks in a world without this node's) stop at once,
                // told why, instead of waiting for it.
                let why = match &err {
                    JoinError::Interrupted(sig) => format!("node {} ({host}) was stopped by signal {sig} while waiting for the other nodes", m.node_rank),
                    JoinError::Rendezvous(msg) => format!("node {} ({host}) gave up waiting: {msg}", m.node_rank),
                    JoinError::Store(e) => format!("node {} ({host}): {e}", m.node_rank),
                    JoinError::Later(next) => format!("node {} ({host}) went on to attempt {next}", m.node_rank),
                };
                if !m.abandon_gate(&a, &why) {
                    return Err(err);
                }
                // the last node opened the gate just before: the others start their ranks, so
                // this node does too, or (stopped by a signal) fails the attempt they started,
                // which stops them at once
                if let JoinError::Interrupted(sig) = err {
                    let failure = Failure::of_node(
                        FailureKind::LauncherSignal(sig),
                        m.node_rank,
                        host,
                        attempt,
                    );
                    let _ = m
                        .client
                        .compare_set(&format!("{a}/failed"), None, &failure.encode());
                    // node 0 serves the store: it stays until the others have read why (as
                    // `give_up` and `finish` do), or they would only see it vanish
                    m.ack(attempt);
                    if m.node_rank == 0 {
                        let all = m.nnodes as i64;
                        m.wait_count(&format!("{a}/acks"), all);
                    }
                    return Err(err);
                }
                break;
            }
        }
        // Ranks are numbered node by node; nodes may run different numbers of ranks.
        let mut layout = NodeLayout {
            rank_offset: 0,
            world_size: 0,
        };
        for node in 0..m.nnodes {
            let value = m
                .client
                .get_timeout(&format!("{a}/node/{node}"), Duration::from_secs(10))?;
            let text = String::from_utf8_lossy(&value);
            let n: usize = text
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    JoinError::Rendezvous(format!(
                        "node {node} registered an unreadable entry {text:?}"
                    ))
                })?;
            if node < m.node_rank {
                layout.rank_offset += n;
            }
            layout.world_size += n;
        }
        m.heartbeats = vec![(-1, Instant::now()); m.nnodes];
        Ok(layout)
    }

    /// Records `failure` as the attempt's root cause unless another node was first; returns the
    /// root cause that won.
    pub fn report_failure(&mut self, attempt: u32, failure: Failure) -> Failure {
        let Peers::Multi(m) = self else {
            return failure;
        };
        let key = failed_key(attempt);
        let winner = match m.client.compare_set(&key, None, &failure.encode()) {
            Ok(CompareSet::Mismatch(Some(first))) => Failure::decode(&first).unwrap_or(failure),
            Ok(_) => failure,
            Err(err) => {
                tracing::warn!("cannot tell the other nodes about the failure: {err}");
                failure
            }
        };
        m.ack(attempt);
        winner
    }

    /// Records `real`, the failure of a rank that another rank's report named as the one that
    /// failed (`RankError::failed_rank`), as the attempt's root cause in place of that report
    /// when the report is what the store holds (another node's messenger may have been first);
    /// returns `real`.
    pub fn correct_failure(&mut self, attempt: u32, real: Failure) -> Failure {
        let Peers::Multi(m) = self else {
            return real;
        };
        let key = failed_key(attempt);
        let recorded = m.client.try_get(&key).ok().flatten();
        let names_real = |bytes: &[u8]| {
            Failure::decode(bytes)
                .and_then(|f| f.blamed_rank())
                .is_some_and(|r| Some(r) == real.rank)
        };
        let swapped = match &recorded {
            Some(bytes) if names_real(bytes) => {
                m.client.compare_set(&key, Some(bytes), &real.encode())
            }
            Some(_) => return real,
            None => m.client.compare_set(&key, None, &real.encode()),
        };
        if let Err(err) = swapped {
            tracing::warn!("cannot tell the other nodes which rank failed first-hand: {err}");
        }
        real
    }

    /// `root`, a rank's report of another rank's failure, or that rank's own failure once its
    /// node records it (`correct_failure`), waiting at most `wait` for it.
    pub fn corrected_failure(&mut self, attempt: u32, root: Failure, wait: Duration) -> Failure {
        let Peers::Multi(m) = self else {
            return root;
        };
        let Some(blamed) = root.blamed_rank() else {
            return root;
        };
        let key = failed_key(attempt);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let recorded = m.client.try_get(&key).ok().flatten();
            let corrected = recorded
                .and_then(|bytes| Failure::decode(&bytes))
                .filter(|f| f.rank == Some(blamed) && !f.reports_another_rank());
            if let Some(f) = corrected {
                return f;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        root
    }

    /// Checks for a failure reported by another node, keeps the heartbeat going, and (node 0)
    /// watches the other nodes' heartbeats. A lost store is itself a failure.
    pub fn poll_failure(&mut self, attempt: u32) -> Option<Failure> {
        let Peers::Multi(m) = self else {
            return None;
        };
        match m.poll(attempt) {
            Ok(found) => found,
            Err(err) => Some(m.lost(attempt, format!("lost contact with the other nodes: {err}"))),
        }
    }

    /// This node's heartbeat (at most one a second; an error is left to the next poll): while it
    /// drains its ranks' output it polls nothing else.
    pub fn keep_alive(&mut self, attempt: u32) {
        if let Peers::Multi(m) = self {
            let _ = m.beat(attempt);
        }
    }

    /// Marks this node's ranks as all successful.
    pub fn report_done(&mut self, attempt: u32) -> Result<(), StoreError> {
        match self {
            Peers::Single => Ok(()),
            Peers::Multi(m) => {
                let done = format!("launcher/a{attempt}/done");
                m.client.set(&format!("{done}/{}", m.node_rank), b"1")?;
                m.client.add(&done, 1).map(|_| ())
            }
        }
    }

    /// The nodes whose ranks have not all finished in `attempt`, with their hosts.
    pub fn running_nodes(&mut self, attempt: u32) -> Vec<(usize, String)> {
        let Peers::Multi(m) = self else {
            return vec![];
        };
        let a = format!("launcher/a{attempt}");
        let mut running = vec![];
        for n in 0..m.nnodes {
            if matches!(m.client.try_get(&format!("{a}/done/{n}")), Ok(Some(_))) {
                continue;
            }
            running.push((n, m.node_host(attempt, n)));
        }
        running
    }

    /// Whether every node reported done.
    pub fn all_done(&mut self, attempt: u32) -> Result<bool, StoreError> {
        match self {
            Peers::Single => Ok(true),
            Peers::Multi(m) => {
                Ok(m.count(&format!("launcher/a{attempt}/done"))? >= m.nnodes as i64)
            }
        }
    }

    /// Acknowledges the final outcome; node 0 waits (briefly) for every other node's ack so its
    /// store stays up until they have read the outcome.
    /// This node ends the run after attempt `attempt` failed (no restarts left, a signal of its
    /// own, a failure that is not restartable): nodes that would restart learn it when they join
    /// attempt `attempt + 1` instead of waiting out the rendezvous timeout.
    /// Node 0 serves the store, so it stays (at most `ack_wait`) until every other node has ended
    /// too or read why (`{a}/ended` counts both): else a restarting node would only see the store
    /// vanish.
    pub fn give_up(&mut self, attempt: u32, failure: &Failure) {
        let Peers::Multi(m) = self else {
            return;
        };
        let next = format!("launcher/a{}", attempt + 1);
        // (the failed node's: a lost node's failure is reported by node 0; and why this node
        // does not restart it, when the others may)
        let mut why = format!(
            "node {} ({}): {}",
            failure.node_rank,
            failure.host,
            failure.kind.describe()
        );
        if failure.restartable() {
            why.push_str(&format!(
                "; node {} stopped after attempt {attempt} with --max-restarts {}",
                m.node_rank, m.max_restarts
            ));
        }
        // (the first node's cause is kept; the gate of the attempt this node never joins cannot
        // be open)
        let abandon = format!("{GATE_ABANDONED}{why}");
        let told = m
            .client
            .compare_set(&format!("{next}/gate"), None, abandon.as_bytes())
            .map(|_| ());
        if let Err(err) = told {
            tracing::warn!("cannot tell the other nodes that this one stops: {err}");
            return;
        }
        let ended = format!("{next}/ended");
        if m.node_rank != 0 {
            let _ = m.client.add(&ended, 1);
            return;
        }
        let others = (m.nnodes - 1 - m.lost_in(attempt)) as i64;
        m.wait_count(&ended, others);
    }

    pub fn finish(&mut self, attempt: u32) {
        let Peers::Multi(m) = self else {
            return;
        };
        m.ack(attempt);
        if m.node_rank != 0 {
            return;
        }
        let acks = format!("launcher/a{attempt}/acks");
        let all = (m.nnodes - m.lost_in(attempt)) as i64;
        if m.wait_count(&acks, all) {
            return;
        }
        tracing::warn!(
            "not every node acknowledged the end of the run within {} s",
            m.ack_wait.as_secs()
        );
    }
}

impl MultiNode {
    /// Sets attempt `a`'s gate to `state` unless it is set; an error when another node abandoned
    /// the attempt (`{a}/gate`: `abandoned WHY`), counted in `{a}/ended`, which node 0 may wait for.
    fn settle_gate(&mut self, a: &str, attempt: u32, state: &str) -> Result<(), JoinError> {
        let gate = format!("{a}/gate");
        let held = match self.client.compare_set(&gate, None, state.as_bytes())? {
            CompareSet::Mismatch(Some(v)) => v,
            _ => state.as_bytes().to_vec(),
        };
        let Some(why) = held.strip_prefix(GATE_ABANDONED.as_bytes()) else {
            return Ok(());
        };
        let _ = self.client.add(&format!("{a}/ended"), 1);
        Err(JoinError::Rendezvous(format!(
            "another node ended the run (attempt {attempt} will not start): {}",
            String::from_utf8_lossy(why)
        )))
    }

    /// Closes attempt `a`'s gate for good, saying `why`, unless the last node has opened it
    /// already: then (true) this node must go on with the attempt like the others. A store error
    /// counts as closed: this node stops either way.
    fn abandon_gate(&mut self, a: &str, why: &str) -> bool {
        let abandon = format!("{GATE_ABANDONED}{why}");
        matches!(
            self.client.compare_set(&format!("{a}/gate"), None, abandon.as_bytes()),
            Ok(CompareSet::Mismatch(Some(v))) if v == GATE_OPEN.as_bytes()
        )
    }

    /// The counter `key` (0 before its first `add`).
    fn count(&mut self, key: &str) -> Result<i64, StoreError> {
        let value = self.client.try_get(key)?;
        Ok(value
            .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// The host node `node` registered for attempt `attempt` ("?" when it cannot be read).
    fn node_host(&mut self, attempt: u32, node: usize) -> String {
        match self
            .client
            .try_get(&format!("launcher/a{attempt}/node/{node}"))
        {
            Ok(Some(v)) => registered_host(&v),
            _ => "?".into(),
        }
    }

    /// Waits (at most `ack_wait`) until the counter `key` reaches `want`; whether it did.
    fn wait_count(&mut self, key: &str, want: i64) -> bool {
        let deadline = Instant::now() + self.ack_wait;
        let mut said = false;
        while Instant::now() < deadline {
            // (a wait the user sees: node 0 stays until the others read the outcome)
            if !said
                && deadline - Instant::now() < self.ack_wait.saturating_sub(Duration::from_secs(1))
            {
                tracing::info!(
                    "keeping the rendezvous store up (at most {} s more) until the other nodes have read the outcome",
                    deadline.saturating_duration_since(Instant::now()).as_secs()
                );
                said = true;
            }
            if self.count(key).unwrap_or(0) >= want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Bumps this node's heartbeat unless it did less than `HEARTBEAT_EVERY` ago; whether it did.
    fn beat(&mut self, attempt: u32) -> Result<bool, StoreError> {
        if self.last_heartbeat.elapsed() < HEARTBEAT_EVERY {
            return Ok(false);
        }
        self.last_heartbeat = Instant::now();
        let key = format!("launcher/a{attempt}/hb/{}", self.node_rank);
        self.client.add(&key, 1).map(|_| true)
    }

    /// Counts this node once per attempt in `a<k>/acks`.
    fn ack(&mut self, attempt: u32) {
        if self.acked != Some(attempt)
            && self
                .client
                .add(&format!("launcher/a{attempt}/acks"), 1)
                .is_ok()
        {
            self.acked = Some(attempt);
        }
    }

    fn poll(&mut self, attempt: u32) -> Result<Option<Failure>, StoreError> {
        if let Some(first) = self.client.try_get(&failed_key(attempt))? {
            self.ack(attempt);
            return Ok(Some(Failure::decode(&first).unwrap_or_else(|| {
                let why = FailureKind::PeerLost("another node failed (unreadable report)".into());
                Failure::of_node(why, 0, "?", attempt)
            })));
        }
        if !self.beat(attempt)? {
            return Ok(None);
        }
        if self.node_rank != 0 {
            return Ok(None);
        }
        let now = Instant::now();
        let mut silent = vec![];
        for node in 1..self.nnodes {
            let beat = self.count(&format!("launcher/a{attempt}/hb/{node}"))?;
            let (last, since) = &mut self.heartbeats[node];
            if beat != *last {
                *last = beat;
                *since = now;
            } else if now.duration_since(*since) > self.heartbeat_timeout {
                silent.push(node);
            }
        }
        let Some(&node) = silent.first() else {
            return Ok(None);
        };
        let others = match &silent[1..] {
            [] => String::new(),
            more => format!(
                "; so did node(s) {}",
                more.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let reason = format!(
            "it stopped sending heartbeats for {} s (its launcher was killed, or the network is down){others}",
            self.heartbeat_timeout.as_secs()
        );
        // (the lost node's failure, on its host as it registered: node 0 only reports it)
        let host = self.node_host(attempt, node);
        let failure = Failure::of_node(FailureKind::PeerLost(reason), node, &host, attempt);
        self.lost.extend(silent.iter().map(|n| (attempt, *n)));
        let _ = self
            .client
            .compare_set(&failed_key(attempt), None, &failure.encode());
        Ok(Some(failure))
    }

    /// What a launcher whose node rank attempt `attempt` holds for `other` ("HOST PID NPROC")
    /// may do: join a later attempt (this one is over, or runs without `other`, a launcher of
    /// this host that is gone: node 0 finds it lost and the nodes restart), take its place (the
    /// rendezvous is open and `other` is gone), or neither (a second launcher for one node rank,
    /// or one on another host this launcher cannot look at).
    fn in_place_of(
        &mut self,
        attempt: u32,
        other: &[u8],
        host: &str,
        timeout: Duration,
    ) -> Result<InPlaceOf, JoinError> {
        let gate = self.client.try_get(&format!("launcher/a{attempt}/gate"))?;
        let over = self.client.try_get(&failed_key(attempt))?.is_some();
        let gone = registered_host(other) == host
            // (an entry with this launcher's own pid is a predecessor's in another pid namespace:
            // a container started again, whose pids repeat)
            && registered_pid(other).is_some_and(|pid| pid == std::process::id() || !alive(pid));
        match (gate.as_deref(), over, gone) {
            (Some(g), true, _) if g == GATE_OPEN.as_bytes() => Ok(InPlaceOf::Later(attempt + 1)),
            (Some(g), false, true) if g == GATE_OPEN.as_bytes() => {
                tracing::warn!(
                    "attempt {attempt} runs with node {}'s earlier launcher, which is gone: waiting for node 0 to find it lost (within {} s) and the nodes to restart",
                    self.node_rank,
                    self.heartbeat_timeout.as_secs()
                );
                let deadline = Instant::now() + self.heartbeat_timeout + timeout;
                loop {
                    if self.client.try_get(&failed_key(attempt))?.is_some() {
                        return Ok(InPlaceOf::Later(attempt + 1));
                    }
                    check_signal_and_deadline(deadline, || format!("attempt {attempt} to end"))?;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            (None, _, true) => Ok(InPlaceOf::Rendezvous),
            (gate, ..) => Ok(InPlaceOf::Neither {
                running: gate == Some(GATE_OPEN.as_bytes()),
            }),
        }
    }

    /// How many nodes were lost in `attempt`.
    fn lost_in(&self, attempt: u32) -> usize {
        self.lost.iter().filter(|(a, _)| *a == attempt).count()
    }

    /// The store (node 0's) stopped answering: the failure is node 0's, the root cause the
    /// summary names, not this node's, which only noticed.
    fn lost(&self, attempt: u32, reason: String) -> Failure {
        let host = match self.node_rank {
            0 => super::hostname(),
            _ => store_host(self.client.endpoint()),
        };
        Failure::of_node(FailureKind::PeerLost(reason), 0, &host, attempt)
    }

    fn missing_nodes(&mut self, a: &str) -> Vec<usize> {
        (0..self.nnodes)
            .filter(|n| !matches!(self.client.try_get(&format!("{a}/node/{n}")), Ok(Some(_))))
            .collect()
    }
}

/// The host of a store endpoint "HOST:PORT" ("[::1]:29500" too).
fn store_host(endpoint: &str) -> String {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// What a launcher finding its node rank taken may do (`MultiNode::in_place_of`).
enum InPlaceOf {
    Later(u32),
    Rendezvous,
    /// `running`: the attempt's ranks started (its gate is open).
    Neither {
        running: bool,
    },
}

/// The launcher pid of a node's rendezvous entry ("HOST PID NPROC").
fn registered_pid(entry: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(entry)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Whether process `pid` of this host is running (one of another user counts).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled
    let sent = unsafe { libc::kill(pid, 0) } == 0;
    sent || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The host of a node's rendezvous entry (`{a}/node/{n}`: "HOST PID NPROC").
fn registered_host(entry: &[u8]) -> String {
    let text = String::from_utf8_lossy(entry);
    text.split(' ').next().unwrap_or("?").to_string()
}

/// Interrupts a wait on a signal (the launcher should react to Ctrl-C at once) or at the deadline.
fn check_signal_and_deadline(
    deadline: Instant,
    what: impl Fn() -> String,
) -> Result<(), JoinError> {
    if let Some(sig) = signals::take() {
        return Err(JoinError::Interrupted(sig));
    }
    if Instant::now() >= deadline {
        return Err(JoinError::Rendezvous(format!(
            "timed out waiting for {}",
            what()
        )));
    }
    Ok(())
}

/// The store key of attempt `attempt`'s root cause (the first failure any node recorded).
fn failed_key(attempt: u32) -> String {
    format!("launcher/a{attempt}/failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_timeout_outlasts_three_monitor_intervals() {
        assert_eq!(heartbeat_timeout(Duration::from_secs(5)), HEARTBEAT_TIMEOUT);
        assert_eq!(
            heartbeat_timeout(Duration::from_secs(20)),
            Duration::from_secs(60)
        );
        assert_eq!(heartbeat_timeout(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn store_hosts_of_endpoints() {
        assert_eq!(store_host("10.0.0.1:29500"), "10.0.0.1");
        assert_eq!(store_host("node-a.cluster:29500"), "node-a.cluster");
        assert_eq!(store_host("::1:29500"), "::1");
        assert_eq!(store_host("[::1]:29500"), "::1");
    }

    fn node(port: u16, rank: usize) -> MultiNode {
        let client =
            StoreClient::connect("127.0.0.1", port, "gate-test", Duration::from_secs(5)).unwrap();
        match Peers::multi(client, rank, 2, Duration::from_secs(1)) {
            Peers::Multi(m) => *m,
            Peers::Single => unreachable!(),
        }
    }

    /// The gate is one compare-set key, so a node giving up and the last node joining at the same
    /// moment cannot disagree: whichever wrote first holds for both.
    #[test]
    fn the_gate_is_decided_once_for_every_node() {
        let server = crate::store::StoreServer::bind(("127.0.0.1", 0), "gate-test").unwrap();
        let port = server.local_addr().port();
        let (mut n0, mut n1) = (node(port, 0), node(port, 1));
        // opened first: the node that times out a moment later goes on with the attempt
        n0.settle_gate("launcher/a0", 0, GATE_OPEN).unwrap();
        assert!(n1.abandon_gate("launcher/a0", "node 1 gave up"));
        n1.settle_gate("launcher/a0", 0, GATE_OPEN).unwrap();
        // abandoned first: the last node to join (and every waiter) refuses to start, told why
        assert!(!n1.abandon_gate("launcher/a1", "node 1 gave up"));
        let err = n0.settle_gate("launcher/a1", 1, GATE_OPEN).unwrap_err();
        let JoinError::Rendezvous(msg) = err else {
            panic!("{err:?}")
        };
        assert!(
            msg.contains("attempt 1 will not start): node 1 gave up"),
            "{msg}"
        );
        assert!(
            !n0.abandon_gate("launcher/a1", "node 0 too"),
            "first cause kept"
        );
    }
}
