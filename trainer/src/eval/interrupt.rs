//! Ctrl-C (SIGINT) or SIGTERM during an evaluation (or `infer --questions`): every prediction is
//! on disk once its line is written, so what was answered is kept and a rerun of the same
//! command resumes from it. The process still ends as the signal ends it (exit 130 / 143, at
//! once: a batch may take minutes), after one line on stderr saying so, written by the handler
//! itself (`write(2)` is async-signal-safe; the text is made before the handler is installed).
use std::sync::atomic::{AtomicPtr, Ordering};

/// The line the handler writes: one leaked allocation, published with one atomic store, so a
/// signal never pairs one note's length with another's bytes.
struct Note {
    bytes: &'static [u8],
}

static NOTE: AtomicPtr<Note> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_interrupt(sig: libc::c_int) {
    let note = NOTE.load(Ordering::SeqCst);
    // SAFETY: write, signal and raise are async-signal-safe; `note` is null or a leaked `Note`
    // that is never freed; the default action then ends the process as the signal would have.
    unsafe {
        if let Some(note) = note.as_ref() {
            libc::write(
                2,
                note.bytes.as_ptr() as *const libc::c_void,
                note.bytes.len(),
            );
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

const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Prints `note` before SIGINT or SIGTERM end the process (a signal ignored at start, as SIGINT
/// in a background job, stays ignored), until the returned guard is dropped, which puts back the
/// actions the signals had.
#[must_use = "the handlers are removed when the guard is dropped"]
pub fn install(note: String) -> Installed {
    let bytes: &'static [u8] = Box::leak(note.into_bytes().into_boxed_slice());
    NOTE.store(Box::into_raw(Box::new(Note { bytes })), Ordering::SeqCst);
    let before = SIGNALS.map(|sig| {
        // SAFETY: a query (null new action) into a zeroed struct.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            old
        }
    });
    for sig in SIGNALS {
        crate::train::signal::install_unless_ignored(sig, on_interrupt);
    }
    Installed { before }
}

/// While alive, an interrupted evaluation says what it kept.
pub struct Installed {
    before: [libc::sigaction; 2],
}

impl Drop for Installed {
    fn drop(&mut self) {
        for (sig, old) in SIGNALS.iter().zip(&self.before) {
            // SAFETY: puts back the action read at `install` (ours only: another one set since
            // stays).
            unsafe {
                let mut now: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(*sig, std::ptr::null(), &mut now) == 0
                    && now.sa_sigaction == on_interrupt as *const () as libc::sighandler_t
                {
                    libc::sigaction(*sig, old, std::ptr::null_mut());
                }
            }
        }
    }
}
