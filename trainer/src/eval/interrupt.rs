//! Ctrl-C (SIGINT) or SIGTERM during an evaluation (or `infer --questions`): every prediction is
//! on disk once its line is written, so what was answered is kept and a rerun of the same command resumes from it. The
//! process still ends as the signal ends it (exit 130 / 143, at once: a batch may take minutes),
//! after one line on stderr saying so, written by the handler itself (`write(2)` is
//! async-signal-safe; the text is made before the handler is installed).
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static NOTE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static NOTE_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_interrupt(sig: libc::c_int) {
    let (ptr, len) = (NOTE.load(Ordering::SeqCst), NOTE_LEN.load(Ordering::SeqCst));
    // SAFETY: write, signal and raise are async-signal-safe; `ptr` is a leaked buffer of `len`
    // bytes (or null); the default action then ends the process as the signal would have.
    unsafe {
        if !ptr.is_null() {
            libc::write(2, ptr as *const libc::c_void, len);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The line printed when `command` is interrupted: what it made so far (`kept`, e.g.
/// "predictions") is in `file`, a line each.
pub fn note(command: &str, kept: &str, file: &std::path::Path) -> String {
    format!(
        "\n{command}: interrupted; the {kept} made so far are kept in {} (a line each): run the same command again to resume from them\n",
        file.display()
    )
}

/// Prints `note` before SIGINT or SIGTERM end the process (a signal ignored at start, as SIGINT
/// in a background job, stays ignored), until the returned guard is dropped.
#[must_use = "the handlers are removed when the guard is dropped"]
pub fn install(note: String) -> Installed {
    let bytes: &'static mut [u8] = Box::leak(note.into_bytes().into_boxed_slice());
    NOTE_LEN.store(bytes.len(), Ordering::SeqCst);
    NOTE.store(bytes.as_mut_ptr(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        crate::train::signal::install_unless_ignored(sig, on_interrupt);
    }
    Installed
}

/// While alive, an interrupted evaluation says what it kept.
pub struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        uninstall();
    }
}

/// The signals' actions as they were before [`install`] (the default's, or ignored).
fn uninstall() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: replaces our handler only (an ignored signal was left as it was).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == on_interrupt as *const () as libc::sighandler_t
            {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}
