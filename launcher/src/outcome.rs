//! How a run ends: the exit code (decided here and nowhere else) and the root-cause summary.
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::error_file::RankError;

/// Exit codes of the launcher.
pub mod exit {
    /// Every rank on every node exited 0.
    pub const SUCCESS: u8 = 0;
    /// The launcher could not start the run, or lost contact with node 0.
    pub const LAUNCH_ERROR: u8 = 1;
    /// Bad command line (clap's code).
    pub const USAGE: u8 = 2;
    /// A rank was still running `--finish-timeout` seconds after the others finished (as `timeout(1)`).
    pub const FINISH_TIMEOUT: u8 = 124;

    /// A process killed by (or a launcher stopped on) signal `sig`: 128 + sig, the shell's convention.
    pub fn for_signal(sig: i32) -> u8 {
        (128 + sig.clamp(1, 127)) as u8
    }

    /// A rank's own non-zero exit code (0 cannot be a failure; it maps to 1).
    pub fn for_rank_exit(code: i32) -> u8 {
        match u8::try_from(code) {
            Ok(0) | Err(_) => LAUNCH_ERROR,
            Ok(c) => c,
        }
    }
}

/// Writes `text` to stderr, ignoring a failed write: `eprint!` panics when stderr is closed or
/// broken (`2>&1 | head`, a full disk, a hung-up terminal), and the panic's 101 would replace the
/// exit code decided here.
pub fn to_stderr(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// What went wrong first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A rank exited with a non-zero code.
    Exited(i32),
    /// A rank was killed by a signal.
    Signaled(i32),
    /// A rank could not be started.
    SpawnFailed(String),
    /// The launcher itself got a signal (SIGINT/SIGTERM/SIGHUP/SIGQUIT) and stopped the ranks.
    LauncherSignal(i32),
    /// Ranks kept running `--finish-timeout` after others finished.
    FinishTimeout(String),
    /// Contact with the other nodes was lost (store unreachable, heartbeats stopped).
    PeerLost(String),
}

impl FailureKind {
    /// The launcher's exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            FailureKind::Exited(code) => exit::for_rank_exit(*code),
            FailureKind::Signaled(sig) | FailureKind::LauncherSignal(sig) => exit::for_signal(*sig),
            FailureKind::SpawnFailed(_) | FailureKind::PeerLost(_) => exit::LAUNCH_ERROR,
            FailureKind::FinishTimeout(_) => exit::FINISH_TIMEOUT,
        }
    }

    /// Whether a group restart may help: crashed ranks yes; a user's Ctrl-C, a program that cannot
    /// start, a hang after the others finished, or a lost node no.
    pub fn restartable(&self) -> bool {
        matches!(self, FailureKind::Exited(_) | FailureKind::Signaled(_))
    }

    /// One phrase: "exited with code 7", "was killed by signal 9 (SIGKILL)", ...
    pub fn describe(&self) -> String {
        match self {
            FailureKind::Exited(code) => format!("exited with code {code}"),
            FailureKind::Signaled(sig) => {
                format!("was killed by signal {sig} ({})", signal_name(*sig))
            }
            FailureKind::SpawnFailed(why) => format!("could not be started: {why}"),
            FailureKind::LauncherSignal(sig) => {
                format!(
                    "launcher received {} and stopped every rank",
                    signal_name(*sig)
                )
            }
            FailureKind::FinishTimeout(what) => what.clone(),
            FailureKind::PeerLost(what) => what.clone(),
        }
    }
}

/// The root cause of a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// Global and local rank, when one rank is to blame.
    pub rank: Option<usize>,
    pub local_rank: Option<usize>,
    pub node_rank: usize,
    pub host: String,
    /// 0-based attempt (= TORCHELASTIC_RESTART_COUNT of the failed group).
    pub attempt: u32,
    /// The rank's stderr log file, when `--log-dir` was given.
    pub log: Option<PathBuf>,
    /// Last lines of the rank's stderr.
    pub stderr_tail: Vec<String>,
    /// What the rank recorded in its `TORCHELASTIC_ERROR_FILE`, if anything.
    pub error: Option<Box<RankError>>,
    /// The other ranks of this node that recorded an error, one line each (torchrun's "Other
    /// Failures"): "rank 1 (local rank 1): exit code 1: message".
    pub others: Vec<String>,
}

impl Failure {
    /// A failure of a whole node, no rank to blame (a signal, a lost peer).
    pub fn of_node(kind: FailureKind, node_rank: usize, host: &str, attempt: u32) -> Self {
        Failure {
            kind,
            rank: None,
            local_rank: None,
            node_rank,
            host: host.to_string(),
            attempt,
            log: None,
            stderr_tail: Vec::new(),
            error: None,
            others: Vec::new(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }

    /// The rank whose failure this one reports, when it is a messenger's ("the data file is
    /// missing on another rank": `RankError::failed_rank`).
    pub fn blamed_rank(&self) -> Option<usize> {
        self.error.as_ref().and_then(|e| e.failed_rank)
    }

    /// Whether a group restart may help: a rank that crashed, or a node other than node 0 that
    /// node 0 lost (as torchrun's agents re-rendezvous: the next attempt waits, up to
    /// --rdzv-timeout, for that node's launcher started again); not node 0's loss (its store
    /// went with it).
    pub fn restartable(&self) -> bool {
        match &self.kind {
            FailureKind::PeerLost(_) => self.node_rank != 0 && self.rank.is_none(),
            kind => kind.restartable(),
        }
    }

    /// Whether the failed rank said it failed because another one did (`RankError::elsewhere`).
    pub fn reports_another_rank(&self) -> bool {
        self.error.as_ref().is_some_and(|e| e.elsewhere)
    }

    /// The multi-line report printed when the run gives up, modelled on torchrun's
    /// "Root Cause (first observed failure)" table.
    /// `local_node` is the node printing it (a remote rank's log lives on its own node).
    pub fn summary(&self, max_restarts: u32, local_node: usize) -> String {
        let mut s = String::new();
        let restarts = match max_restarts {
            0 => "no restarts allowed with --max-restarts 0".to_string(),
            // (the one failure with restarts left that is not restarted: the supervisor's rule)
            n if self.restartable() && self.attempt < n => format!(
                "{} of {n} restarts left, not used after a SIGUSR1/SIGUSR2 notice: the end of \
                 the allocation",
                n - self.attempt
            ),
            n if self.restartable() => format!("all {n} restarts used"),
            _ => "not restartable".to_string(),
        };
        let _ = writeln!(
            s,
            "launcher: run failed on attempt {} ({restarts})",
            self.attempt
        );
        let _ = writeln!(s, "  root cause (first observed failure):");
        match (self.rank, self.local_rank) {
            (Some(rank), Some(local)) => {
                let _ = writeln!(
                    s,
                    "    rank       : {rank} (local rank {local} on node {})",
                    self.node_rank
                );
            }
            _ => {
                let _ = writeln!(s, "    node       : {}", self.node_rank);
            }
        }
        let _ = writeln!(s, "    host       : {}", self.host);
        let what = match &self.kind {
            FailureKind::Exited(code) => format!("exit code {code}"),
            FailureKind::Signaled(sig) => format!("signal {sig} ({})", signal_name(*sig)),
            other => other.describe(),
        };
        let _ = writeln!(s, "    error      : {what}");
        if let Some(error) = &self.error {
            let _ = writeln!(s, "    message    : {}", error.message);
            let _ = writeln!(s, "    error file : {}", error.file.display());
        }
        // (a messenger left as the root cause: the rank it names recorded nothing, in time)
        if self.reports_another_rank() {
            let named = self
                .blamed_rank()
                .map_or("another rank".to_string(), |r| format!("rank {r}"));
            let _ = writeln!(
                s,
                "    note       : this rank stopped because {named} failed, which recorded no error of its own in time (on another node: that node may have been lost, its launcher's log says more)"
            );
        }
        let _ = writeln!(s, "    exit code  : {} (the launcher's)", self.exit_code());
        match &self.log {
            Some(path) => {
                let _ = writeln!(s, "    stderr log : {}", path.display());
            }
            None if self.rank.is_some() && self.node_rank != local_node => {
                let _ = writeln!(s, "    stderr log : (on node {}'s console)", self.node_rank);
            }
            None if self.rank.is_some() => {
                let _ = writeln!(
                    s,
                    "    stderr log : (console only; pass --log-dir DIR to keep per-rank logs)"
                );
            }
            None => {}
        }
        // the recorded traceback, as torchrun prints it; else the end of stderr (which, for a
        // Python rank, holds the same traceback after whatever the program logged)
        if let Some(error) = self.error.as_ref().filter(|e| !e.traceback.is_empty()) {
            let _ = writeln!(s, "    traceback (from the error file):");
            for line in &error.traceback {
                let _ = writeln!(s, "      | {line}");
            }
        } else if !self.stderr_tail.is_empty() {
            let _ = writeln!(s, "    last stderr lines:");
            for line in &self.stderr_tail {
                let _ = writeln!(s, "      | {line}");
            }
        }
        if !self.others.is_empty() {
            let _ = writeln!(s, "  other failures:");
            for line in &self.others {
                let _ = writeln!(s, "    {line}");
            }
        }
        s
    }

    /// Compact form stored in the rendezvous store so the other nodes can report the same cause.
    pub fn encode(&self) -> Vec<u8> {
        let kind = match &self.kind {
            FailureKind::Exited(c) => format!("exited {c}"),
            FailureKind::Signaled(s) => format!("signaled {s}"),
            FailureKind::SpawnFailed(w) => format!("spawn {w}"),
            FailureKind::LauncherSignal(s) => format!("launcher-signal {s}"),
            FailureKind::FinishTimeout(w) => format!("finish-timeout {w}"),
            FailureKind::PeerLost(w) => format!("peer-lost {w}"),
        };
        let mut s = String::new();
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(s, "kind={}", one_line(&kind));
        let _ = writeln!(s, "rank={}", opt(self.rank));
        let _ = writeln!(s, "local_rank={}", opt(self.local_rank));
        let _ = writeln!(s, "node={}", self.node_rank);
        let _ = writeln!(s, "host={}", one_line(&self.host));
        let _ = writeln!(s, "attempt={}", self.attempt);
        if let Some(log) = &self.log {
            let _ = writeln!(s, "log={}", one_line(&log.display().to_string()));
        }
        for line in &self.stderr_tail {
            let _ = writeln!(s, "tail={}", one_line(line));
        }
        if let Some(error) = &self.error {
            let _ = writeln!(
                s,
                "error_file={}",
                one_line(&error.file.display().to_string())
            );
            let _ = writeln!(s, "message={}", one_line(&error.message));
            for line in &error.traceback {
                let _ = writeln!(s, "trace={}", one_line(line));
            }
            if error.elsewhere {
                let _ = writeln!(s, "elsewhere={}", opt(error.failed_rank));
            }
        }
        for line in &self.others {
            let _ = writeln!(s, "other={}", one_line(line));
        }
        s.into_bytes()
    }

    /// Inverse of [`Failure::encode`]; `None` for anything unreadable.
    pub fn decode(bytes: &[u8]) -> Option<Failure> {
        let text = String::from_utf8_lossy(bytes);
        let mut f = Failure::of_node(FailureKind::PeerLost(String::new()), 0, "", 0);
        let mut have_kind = false;
        for line in text.lines() {
            let (key, value) = line.split_once('=')?;
            match key {
                "kind" => {
                    let (k, rest) = value.split_once(' ').unwrap_or((value, ""));
                    f.kind = match k {
                        "exited" => FailureKind::Exited(rest.parse().ok()?),
                        "signaled" => FailureKind::Signaled(rest.parse().ok()?),
                        "spawn" => FailureKind::SpawnFailed(rest.into()),
                        "launcher-signal" => FailureKind::LauncherSignal(rest.parse().ok()?),
                        "finish-timeout" => FailureKind::FinishTimeout(rest.into()),
                        "peer-lost" => FailureKind::PeerLost(rest.into()),
                        _ => return None,
                    };
                    have_kind = true;
                }
                "rank" => f.rank = value.parse().ok(),
                "local_rank" => f.local_rank = value.parse().ok(),
                "node" => f.node_rank = value.parse().ok()?,
                "host" => f.host = value.into(),
                "attempt" => f.attempt = value.parse().ok()?,
                "log" => f.log = Some(value.into()),
                "tail" => f.stderr_tail.push(value.into()),
                "error_file" | "message" | "trace" | "elsewhere" => {
                    let error = f.error.get_or_insert_with(|| {
                        Box::new(RankError {
                            file: PathBuf::new(),
                            message: String::new(),
                            traceback: Vec::new(),
                            elsewhere: false,
                            failed_rank: None,
                        })
                    });
                    match key {
                        "error_file" => error.file = value.into(),
                        "message" => error.message = value.into(),
                        "elsewhere" => {
                            error.elsewhere = true;
                            error.failed_rank = value.parse().ok();
                        }
                        _ => error.traceback.push(value.into()),
                    }
                }
                "other" => f.others.push(value.into()),
                _ => {}
            }
        }
        have_kind.then_some(f)
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// How a whole run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All ranks exited 0 (after `restarts` group restarts).
    Success { restarts: u32 },
    /// The run gave up; the failure is the root cause of the last attempt.
    Failed(Failure),
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Success { .. } => exit::SUCCESS,
            Outcome::Failed(failure) => failure.exit_code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(FailureKind::Exited(7).exit_code(), 7);
        assert_eq!(FailureKind::Exited(256).exit_code(), 1);
        assert_eq!(FailureKind::Signaled(libc::SIGKILL).exit_code(), 137);
        assert_eq!(FailureKind::LauncherSignal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(FailureKind::FinishTimeout(String::new()).exit_code(), 124);
    }

    #[test]
    fn failure_round_trips_through_the_store_encoding() {
        let f = Failure {
            kind: FailureKind::Signaled(9),
            rank: Some(3),
            local_rank: Some(1),
            node_rank: 1,
            host: "gpu02".into(),
            attempt: 2,
            log: Some("/logs/r/attempt_2/1/stderr.log".into()),
            stderr_tail: vec!["Traceback".into(), "boom=1".into()],
            error: None,
            others: Vec::new(),
        };
        assert_eq!(Failure::decode(&f.encode()), Some(f.clone()));
        let text = f.summary(2, 0);
        assert!(text.contains("(all 2 restarts used)"), "{text}");
        let noticed = f.summary(4, 0);
        assert!(
            noticed.contains("(2 of 4 restarts left, not used after a SIGUSR1/SIGUSR2 notice"),
            "{noticed}"
        );
        assert!(
            text.contains("rank       : 3")
                && text.contains("SIGKILL")
                && text.contains("| boom=1"),
            "{text}"
        );
        assert_eq!(Failure::decode(b"garbage"), None);

        // with an error file: its message and traceback travel to the other nodes and replace
        // the stderr tail in the summary
        let with_file = Failure {
            kind: FailureKind::Exited(1),
            error: Some(Box::new(RankError {
                file: "/logs/r/attempt_2/1/error.json".into(),
                message: "ValueError: bad lr".into(),
                traceback: vec![
                    "Traceback (most recent call last):".into(),
                    "ValueError: bad lr".into(),
                ],
                elsewhere: false,
                failed_rank: None,
            })),
            others: vec![
                "rank 0 (local rank 0): exit code 1: data.train is missing on rank 3".into(),
            ],
            ..f
        };
        assert_eq!(
            Failure::decode(&with_file.encode()),
            Some(with_file.clone())
        );
        let text = with_file.summary(0, 0);
        assert!(
            text.contains("message    : ValueError: bad lr")
                && text.contains("error file : /logs/r/attempt_2/1/error.json")
                && text
                    .contains("traceback (from the error file):\n      | Traceback (most recent")
                && !text.contains("| boom=1")
                && text.contains("other failures:\n    rank 0 (local rank 0): exit code 1"),
            "{text}"
        );
        // an error caused by another rank's failure keeps its mark (and the rank it names)
        for failed_rank in [None, Some(5)] {
            let mut marked = with_file.clone();
            let error = marked.error.as_mut().unwrap();
            (error.elsewhere, error.failed_rank) = (true, failed_rank);
            assert_eq!(Failure::decode(&marked.encode()), Some(marked.clone()));
            // left as the root cause (the rank it names recorded nothing): said so
            let named = failed_rank.map_or("another rank".into(), |r| format!("rank {r}"));
            let text = marked.summary(0, 0);
            assert!(
                text.contains(&format!("note       : this rank stopped because {named} failed, which recorded no error of its own in time")),
                "{text}"
            );
        }
        assert!(!with_file.summary(0, 0).contains("note       :"));
    }
}
