//! An exclusive, non-blocking `flock` on an open file, with the outcomes every lock of this
//! workspace tells apart (the launcher's log folder, the trainer's export and run locks). The
//! kernel releases the lock when the descriptor closes, however the process ends.
use std::fs::File;
use std::os::fd::AsRawFd;

/// What `try_exclusive` found.
#[derive(Debug)]
pub enum Flock {
    /// This descriptor holds the lock.
    Held,
    /// Another open file description holds it.
    Busy,
    /// The filesystem has no flock (NFSv3 without lockd: ENOLCK; Lustre without the flock mount
    /// option: ENOSYS; EOPNOTSUPP, EINVAL): the caller goes on unlocked, with a warning.
    Unsupported(std::io::Error),
}

/// Tries to take `file`'s exclusive lock without waiting; other errors are errors.
pub fn try_exclusive(file: &File) -> std::io::Result<Flock> {
    // SAFETY: flock on a descriptor the caller keeps open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Flock::Held);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(Flock::Busy),
        Some(libc::ENOLCK | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
            Ok(Flock::Unsupported(e))
        }
        _ => Err(e),
    }
}
