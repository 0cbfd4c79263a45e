//! The launcher's own signal handling: SIGINT, SIGTERM, SIGHUP and SIGQUIT are caught (not
//! fatal) and recorded, so the supervisor can forward them to every rank and escalate after the
//! grace period. SIGUSR1 and SIGUSR2 are caught and passed on to the ranks without stopping
//! anything. The handlers only store the number: everything else happens in the main loop.
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// The signals forwarded to ranks, like torchrun.
pub const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Signals passed on to every running rank without a stop: a scheduler's notice (SLURM's
/// `--signal=USR1@90` before the time limit) for programs that checkpoint on it. Uncaught they
/// killed the launcher, and with it (PR_SET_PDEATHSIG) every rank at once, without a summary.
pub const PASSED_ON: [i32; 2] = [libc::SIGUSR1, libc::SIGUSR2];

static PENDING: AtomicI32 = AtomicI32::new(0);
/// Bit `sig` set for each `PASSED_ON` signal received since the last `take_notices`.
static NOTICES: AtomicU64 = AtomicU64::new(0);
/// Whether a `PASSED_ON` signal went to the ranks since the last `take_passed`.
static PASSED: AtomicBool = AtomicBool::new(false);

/// Records that a `PASSED_ON` signal went to the ranks.
pub fn note_passed() {
    PASSED.store(true, Ordering::SeqCst);
}

/// Whether a `PASSED_ON` signal went to the ranks since the last call: a failure after it is
/// the ranks' answer to the notice (a program stopping on it, or dying of it), and a notice
/// usually announces the end of the allocation, so the run is not restarted.
pub fn take_passed() -> bool {
    PASSED.swap(false, Ordering::SeqCst)
}

extern "C" fn record(sig: libc::c_int) {
    // Async-signal-safe: a single atomic store.
    PENDING.store(sig, Ordering::SeqCst);
}

extern "C" fn record_notice(sig: libc::c_int) {
    // Async-signal-safe: a single atomic operation.
    NOTICES.fetch_or(1 << (sig as u64 & 63), Ordering::SeqCst);
}

/// Installs the handlers (process-wide; call once, from the launcher binary). A signal ignored
/// when the launcher starts stays ignored, as the convention for daemons and shells goes:
/// `nohup launcher ... &` (SIGHUP) must survive a logout, and a job started with `&` from a
/// script (SIGINT, SIGQUIT ignored) must not be stopped by them; the ranks inherit the ignoring.
pub fn install() -> io::Result<()> {
    let handled = FORWARDED
        .iter()
        .map(|&s| (s, record as extern "C" fn(libc::c_int)))
        .chain(
            PASSED_ON
                .iter()
                .map(|&s| (s, record_notice as extern "C" fn(libc::c_int))),
        );
    for (sig, handler) in handled {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument;
        // the handler itself only performs an atomic store; the query passes a null new action.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                return Err(io::Error::last_os_error());
            }
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The `PASSED_ON` signals received since the last call.
pub fn take_notices() -> Vec<i32> {
    let bits = NOTICES.swap(0, Ordering::SeqCst);
    PASSED_ON
        .into_iter()
        .filter(|&s| bits & (1 << s) != 0)
        .collect()
}

/// The most recent signal received since the last call, if any.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}
