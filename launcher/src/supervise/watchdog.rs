//! The orphan watchdog: a tiny `sh` process that outlives a SIGKILLed launcher just long enough
//! to SIGKILL the ranks' process groups.
//!
//! PR_SET_PDEATHSIG kills each rank when the launcher dies, but not the children a rank started
//! (data-loader workers, shells, ...). The watchdog learns the rank groups over a pipe; when the
//! pipe reaches EOF without a `done` line (the launcher died), it kills those groups and exits.
//! It ignores the terminal's signals and lives in its own process group, so a Ctrl-C reaches the
//! launcher (which stops ranks gracefully), not the watchdog.
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};

/// Reads `pgid` / `clear` / `done` lines; on EOF kills what it holds. (No `--` after `kill`: dash
/// rejects it.)
const SCRIPT: &str = r#"trap '' INT TERM HUP QUIT
groups=""
while read -r line; do
  case "$line" in
    done) exit 0 ;;
    clear) groups="" ;;
    *) groups="$groups $line" ;;
  esac
done
for g in $groups; do kill -KILL "-$g" 2>/dev/null; done
exit 0"#;

pub struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts the watchdog. Failure is not fatal (the ranks still die with the launcher); the
    /// caller logs it.
    pub fn start() -> std::io::Result<Self> {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take();
        Ok(Watchdog { child, pipe })
    }

    /// Adds a rank's process group to the set killed if the launcher dies.
    pub fn watch(&mut self, pgid: i32) {
        self.send(&format!("{pgid}\n"));
    }

    /// Forgets every group (after an attempt's ranks are gone: their ids may be reused later).
    pub fn clear(&mut self) {
        self.send("clear\n");
    }

    fn send(&mut self, line: &str) {
        if let Some(pipe) = self.pipe.as_mut() {
            if pipe
                .write_all(line.as_bytes())
                .and_then(|()| pipe.flush())
                .is_err()
            {
                // The watchdog is gone; nothing more to tell it.
                self.pipe = None;
            }
        }
    }
}

impl Drop for Watchdog {
    /// A normal end: tell the watchdog to leave everything alone, and reap it.
    fn drop(&mut self) {
        self.send("done\n");
        self.pipe = None;
        let _ = self.child.wait();
    }
}
