//! One rank's process: spawned in its own process group (so a signal reaches the rank and every
//! child it starts) with `PR_SET_PDEATHSIG` (so it dies with the launcher, even a SIGKILLed one).
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::output::{OutputOptions, RankOutput};
use crate::env::RankEnv;
use crate::outcome::FailureKind;

/// What every rank runs.
#[derive(Debug, Clone)]
pub struct RankCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra variables for every rank (e.g. a defaulted OMP_NUM_THREADS).
    pub extra_env: Vec<(String, String)>,
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankExit {
    Code(i32),
    Signal(i32),
}

impl RankExit {
    pub fn success(self) -> bool {
        self == RankExit::Code(0)
    }

    pub fn failure_kind(self) -> FailureKind {
        match self {
            RankExit::Code(c) => FailureKind::Exited(c),
            RankExit::Signal(s) => FailureKind::Signaled(s),
        }
    }
}

/// A running (or finished) rank.
pub struct RankProcess {
    pub env: RankEnv,
    child: Child,
    /// Process group id (= the rank's pid).
    pub pgid: i32,
    pub exit: Option<RankExit>,
    pub exited_at: Option<Instant>,
    pub output: RankOutput,
    /// The rank's `TORCHELASTIC_ERROR_FILE` (none when its folder could not be made).
    pub error_file: Option<PathBuf>,
}

impl RankProcess {
    /// Starts one rank. Must be called from a thread that outlives the rank (the main thread):
    /// Linux delivers PDEATHSIG when the *thread* that forked exits.
    pub fn spawn(
        command: &RankCommand,
        env: RankEnv,
        output: &OutputOptions,
        log_dir: Option<&Path>,
        error_file: Option<&Path>,
    ) -> io::Result<Self> {
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .envs(
                command
                    .extra_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .envs(env.to_env_vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // (removed otherwise: a value this launcher inherited must not reach a log file)
        match super::output::stderr_terminal_columns()
            .filter(|_| output.console(env.local_rank, env.rank, output.tee_stderr) == Some(None))
        {
            Some(columns) => cmd.env(crate::env::STDERR_TERMINAL_VAR, columns.to_string()),
            None => cmd.env_remove(crate::env::STDERR_TERMINAL_VAR),
        };
        // a missing error file costs the summary its traceback, never the run
        let error_file = error_file.filter(|path| match crate::error_file::prepare(path) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(
                    "cannot prepare rank {}'s error file {}: {err}; its failure will be reported without it",
                    env.rank,
                    path.display()
                );
                false
            }
        });
        match error_file {
            Some(path) => cmd.env(crate::error_file::ERROR_FILE_VAR, path),
            None => cmd.env_remove(crate::error_file::ERROR_FILE_VAR),
        };
        if output.tee_stderr {
            // the console lines of this rank's stderr already carry `[rank r]`: tell the trainer's
            // logger not to add its own
            cmd.env(crate::env::PREFIXED_STDERR_VAR, "1");
        }
        dies_with_launcher(&mut cmd);
        let mut child = cmd.spawn()?;
        let pgid = child.id() as i32;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(io::Error::other("rank pipes missing"));
        };
        let output =
            match RankOutput::start(output, log_dir, env.local_rank, env.rank, stdout, stderr) {
                Ok(output) => output,
                Err(err) => {
                    signal_group(pgid, libc::SIGKILL);
                    let _ = child.wait();
                    return Err(err);
                }
            };
        Ok(RankProcess {
            env,
            child,
            pgid,
            exit: None,
            exited_at: None,
            output,
            error_file: error_file.map(Path::to_path_buf),
        })
    }

    /// Returns the rank's exit when it happened just now. The rank is not reaped (`reap`, at the
    /// end of the attempt): while it is a zombie its pid, which is its process group's id, cannot
    /// be given to another process, so the end-of-attempt SIGKILL to the group (for children it
    /// left behind) can never reach another job's group that was handed the same number.
    pub fn poll(&mut self) -> Option<RankExit> {
        if self.exit.is_some() {
            return None;
        }
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid only writes it. The
        // accessors read the fields waitid set for a CLD_* event (si_pid 0: nothing exited yet).
        let exit = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            if libc::waitid(libc::P_PID, self.pgid as libc::id_t, &mut info, flags) != 0 {
                // ECHILD cannot happen for our own child; treat any error as "lost", not a loop
                RankExit::Signal(libc::SIGKILL)
            } else if info.si_pid() == 0 {
                return None;
            } else if info.si_code == libc::CLD_EXITED {
                RankExit::Code(info.si_status())
            } else {
                RankExit::Signal(info.si_status())
            }
        };
        self.exit = Some(exit);
        self.exited_at = Some(Instant::now());
        Some(exit)
    }

    /// Reaps the exited rank (after the last signal to its group).
    pub fn reap(&mut self) {
        if self.exit.is_some() {
            let _ = self.child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.exit.is_none()
    }

    /// Sends `sig` to the rank's whole process group.
    pub fn signal(&self, sig: i32) {
        signal_group(self.pgid, sig);
    }
}

/// `killpg`, ignoring "no such group" (it already ended).
pub fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: plain syscall; pgid > 1 never addresses init or our own group by accident.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}

/// Makes the process `cmd` starts die (SIGKILL) when the thread of the launcher that starts it
/// exits, a SIGKILLed launcher included (`PR_SET_PDEATHSIG`): no rank, nor the config check,
/// outlives it.
pub fn dies_with_launcher(cmd: &mut Command) {
    let launcher_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect: then no signal will come.
            if libc::getppid() != launcher_pid {
                libc::_exit(137);
            }
            Ok(())
        });
    }
}
