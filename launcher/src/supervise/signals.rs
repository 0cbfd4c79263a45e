//! The launcher's own signal handling: SIGINT, SIGTERM, SIGHUP and SIGQUIT are caught (not
//! fatal) and recorded, so the supervisor can forward them to every rank and escalate after the
//! grace period. The handler only stores the number: everything else happens in the main loop.
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals forwarded to ranks, like torchrun.
pub const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(sig: libc::c_int) {
    // Async-signal-safe: a single atomic store.
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs the handlers (process-wide; call once, from the launcher binary). A signal ignored
/// when the launcher starts stays ignored, as the convention for daemons and shells goes:
/// `nohup launcher ... &` (SIGHUP) must survive a logout, and a job started with `&` from a
/// script (SIGINT, SIGQUIT ignored) must not be stopped by them; the ranks inherit the ignoring.
pub fn install() -> io::Result<()> {
    for sig in FORWARDED {
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
            action.sa_sigaction = record as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The most recent signal received since the last call, if any.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}
