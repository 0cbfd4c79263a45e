//! Preemption: SIGTERM, or SIGUSR1 / SIGUSR2 (a scheduler's notice before the time limit,
//! SLURM's `--signal=USR1@90`, which the launcher passes on), records its number; after each step
//! (and each validation micro-batch) the ranks all-reduce it, so every rank stops after the same
//! step (then a checkpoint is written and the process exits 143). SIGINT (Ctrl-C, forwarded by the launcher) and SIGHUP stop the
//! same way (exit 130, 129); a second SIGINT kills at once, as the launcher's second Ctrl-C does,
//! also after another signal came first. A signal ignored at start (`nohup`'s SIGHUP, SIGINT in a
//! background job) stays ignored.
//! `TRAINER_STOP_AFTER_STEP=N` acts as a SIGTERM received during step N (0: during start-up), and
//! `TRAINER_STOP_DURING_VALIDATION=N` as one received during the first eval micro-batch of step
//! N's validation (tests; with one micro-batch, during the validation's last).
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use anyhow::Result;
use tch::{Device, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};

/// The stop signal received (0: none).
static STOP: AtomicI32 = AtomicI32::new(0);
/// The lowest rank that received the stop signal the ranks agreed on (usize::MAX: none yet).
static SIGNALLED_RANK: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Ranks below 2^20 fit beside the signal number in one all-reduced value.
const RANK_BITS: u32 = 20;

/// A SIGINT came (the next one kills at once, whatever signal stopped the run first).
static SAW_SIGINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // async-signal-safe: lock-free atomics (the first signal is kept), and for a second SIGINT
    // signal() and raise() (a Ctrl-C after a scheduler's notice is a first one)
    if sig == libc::SIGINT && SAW_SIGINT.swap(true, Ordering::SeqCst) {
        // SAFETY: both are async-signal-safe; the default action ends the process.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::raise(libc::SIGINT);
        }
    }
    let _ = STOP.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// SIGUSR1 and SIGUSR2, from the very start: a scheduler's notice during the rendezvous (which
/// may wait minutes for the other ranks) must not kill the rank; it stops after the first step.
pub(super) fn install_notice_handlers() {
    install(&[libc::SIGUSR1, libc::SIGUSR2]);
}

/// SIGTERM, once the ranks have met: a stop during set-up stops after the first step, with its
/// checkpoint (during the rendezvous, the launcher's SIGTERM for a peer that failed to start
/// still ends the rank at once).
pub(super) fn install_stop_handlers() {
    install(&[libc::SIGTERM]);
}

/// SIGINT and SIGHUP, once the steps begin: during set-up (minutes of loading for an 11B model)
/// Ctrl-C still ends the process at once, as nothing is lost there.
pub(super) fn install_interrupt_handlers() {
    install(&[libc::SIGINT, libc::SIGHUP]);
}

fn install(signals: &[libc::c_int]) {
    for &sig in signals {
        install_unless_ignored(sig, on_stop_signal);
    }
}

/// Makes `handler` (which must do only async-signal-safe work) handle `sig`, unless `sig` was
/// ignored when the process started (`nohup`'s SIGHUP, SIGINT in a background job): that stays.
pub(crate) fn install_unless_ignored(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: the query passes a null new action; the caller's handler is async-signal-safe.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
        {
            return;
        }
        libc::signal(sig, handler as *const () as libc::sighandler_t);
    }
}

/// The exit code of a run stopped by `sig` after a step: 128 + it, as a shell reports a process
/// that signal killed; SIGUSR1's and SIGUSR2's notice (a scheduler's, before SIGTERM) counts as
/// SIGTERM: 143.
pub fn stop_exit_code(sig: i32) -> u8 {
    match sig {
        libc::SIGINT | libc::SIGHUP => 128 + sig as u8,
        _ => 143,
    }
}

/// The name a stop signal is logged under.
pub(super) fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "SIGTERM",
    }
}

/// The step after which the `TRAINER_STOP_AFTER_STEP` hook simulates a SIGTERM.
pub(super) fn stop_after_step() -> Option<u64> {
    step_hook("TRAINER_STOP_AFTER_STEP")
}

/// The step whose validation the `TRAINER_STOP_DURING_VALIDATION` hook interrupts.
pub(super) fn stop_during_validation() -> Option<u64> {
    step_hook("TRAINER_STOP_DURING_VALIDATION")
}

fn step_hook(var: &str) -> Option<u64> {
    std::env::var(var).ok().and_then(|s| s.parse::<u64>().ok())
}

/// The stop signal any rank received (or SIGTERM where the hook fired at `step`; the highest
/// number where ranks received different ones), the same on every rank; every rank must call it.
/// The lowest rank that received it is kept for [`stop_note`].
pub(super) fn stop_requested(
    pg: &ProcessGroup,
    device: Device,
    step: u64,
    stop_after: Option<u64>,
) -> Result<Option<i32>> {
    if stop_after == Some(step) {
        let _ = STOP.compare_exchange(0, libc::SIGTERM, Ordering::SeqCst, Ordering::SeqCst);
    }
    // (signal << RANK_BITS | (mask - rank): the max is the highest signal's lowest rank)
    let mask = (1i64 << RANK_BITS) - 1;
    let mine = match STOP.load(Ordering::SeqCst) as i64 {
        0 => 0,
        sig => (sig << RANK_BITS) | (mask - (pg.rank() as i64).min(mask)),
    };
    let t = Tensor::from_slice(&[mine]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Max)?;
    Ok(match t.int64_value(&[0]) {
        0 => None,
        v => {
            SIGNALLED_RANK.store((mask - (v & mask)) as usize, Ordering::SeqCst);
            Some((v >> RANK_BITS) as i32)
        }
    })
}

/// What this rank's stop by `sig` was, for the launcher's error file: (message, the rank that
/// received the signal when it is another one). Under a launcher that forwards its own signal
/// every rank received it (rank 0 is named); a signal sent to one rank names that rank, and the
/// others, which stopped with it, are its messengers.
/// `(start, step)`: the step the run started at and the one it stopped after (the same when
/// it stopped before training).
pub(super) fn stop_note(
    sig: i32,
    (start, step): (u64, u64),
    rank: usize,
) -> (String, Option<usize>) {
    let name = name(sig);
    let stopped = match start == step {
        true => format!("stopped before training (at step {step}; nothing new to save)"),
        false => format!("stopped after step {step}, with its checkpoint"),
    };
    match SIGNALLED_RANK.load(Ordering::SeqCst) {
        r if r == rank || r == usize::MAX => {
            (format!("{name} received by this rank: {stopped}"), None)
        }
        r => (format!("{stopped}: rank {r} received {name}"), Some(r)),
    }
}
