//! Preemption: SIGTERM sets a flag; after each step the ranks all-reduce it, so every rank stops
//! after the same step (then a checkpoint is written and the process exits 143).
//! `TRAINER_STOP_AFTER_STEP=N` acts as a SIGTERM received during step N, and
//! `TRAINER_STOP_DURING_VALIDATION=N` as one received while validating step N's checkpoint
//! (tests).
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use tch::{Device, Tensor};

use crate::dist::{ProcessGroup, ReduceOp};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub(super) fn install_sigterm_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
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

/// Whether any rank received SIGTERM (or the hook fired at `step`); every rank must call it.
pub(super) fn stop_requested(
    pg: &ProcessGroup,
    device: Device,
    step: u64,
    stop_after: Option<u64>,
) -> Result<bool> {
    if stop_after == Some(step) {
        STOP.store(true, Ordering::SeqCst);
    }
    let t = Tensor::from_slice(&[STOP.load(Ordering::SeqCst) as i64]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Max)?;
    Ok(t.int64_value(&[0]) > 0)
}
