//! `trainer bench ...`: measurements, never timed tests. Each prints a table, or with `--json`
//! one JSON object per measurement on stdout.
pub mod checkpoint;
pub mod collectives;
pub mod data;
pub mod decode;
pub mod step;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How long a peer may run: `LLAVA_SCO_PEER_TIMEOUT` seconds, else an hour (the slowest peer,
/// FSDP2 at world 2 on a 2-core machine, takes minutes).
fn peer_timeout() -> Result<Duration> {
    match std::env::var("LLAVA_SCO_PEER_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(3600)),
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(seconds) => Ok(Duration::from_secs(seconds)),
            Err(_) => {
                bail!("LLAVA_SCO_PEER_TIMEOUT={s:?}: expected whole seconds (3600 is an hour)")
            }
        },
    }
}

/// Runs a Python peer benchmark (`cmd`, running `script`) and returns the last JSON line it
/// printed; a failed run or no JSON is an error carrying the peer's stderr or stdout, and so is a
/// peer still running after [`peer_timeout`] (killed with its child processes: a hung rendezvous
/// of a world-2 peer must not hang the benchmark).
pub(crate) fn peer_json(cmd: Command, script: &Path) -> Result<Value> {
    peer_json_within(cmd, script, peer_timeout()?)
}

/// Reads `pipe` to its end on a thread of its own (a full pipe would block the peer); the bytes
/// come through the channel returned, so a wait for them can have a deadline (a process the peer
/// left behind may hold the pipe open after the peer exits).
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

fn peer_json_within(mut cmd: Command, script: &Path, limit: Duration) -> Result<Value> {
    // (in the terminal's process group: a Ctrl-C reaches the peer as it reaches this process;
    // no stdin, as `output()` gave it: a peer that asks must not wait on the terminal)
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            kill_tree(child.id());
            let _ = child.wait();
            bail!(
                "{} did not finish within {} s and was killed (hung? set LLAVA_SCO_PEER_TIMEOUT=SECONDS to allow longer, or pass --no-peer)",
                script.display(),
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left.max(Duration::from_secs(1)))
            .with_context(|| {
                format!(
                    "{} exited, but a process it left behind still holds its output open",
                    script.display()
                )
            })
    };
    let out = std::process::Output {
        status,
        stdout: read(stdout)?,
        stderr: read(stderr)?,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("ModuleNotFoundError") {
            "\nthe peer's packages are missing: `make bench-peers` installs the pinned transformers, \
             peft and Pillow into .venv (or pass --no-peer, or --python for another interpreter)"
        } else {
            ""
        };
        bail!("{} failed:\n{stderr}{hint}", script.display());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("{} printed no JSON line:\n{stdout}", script.display()))
}

/// SIGKILLs process `pid` and its descendants (a peer's `torch.multiprocessing` ranks), found
/// through /proc: each is stopped first, so it forks no child between the listing and its end
/// (and, not yet dead, its children are not handed to init, whose pids could be reused).
fn kill_tree(pid: u32) {
    // SAFETY: a plain syscall; the pid is this process's child (or one of its descendants)
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "PID (COMM) STATE PPID ...": the fields after the last ')'
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect();
    // SAFETY: a plain syscall; the pid is this process's child (or one of its descendants)
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    for child in children {
        kill_tree(child);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// A peer that fails names its script and its stderr; a missing Python package also gets
    /// the command that installs the pinned ones.
    #[test]
    fn a_failed_peer_says_why_and_how_to_install_its_packages() {
        let run = |stderr: &str| {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", &format!("echo '{stderr}' >&2; exit 1")]);
            super::peer_json(cmd, std::path::Path::new("scripts/peer.py"))
                .unwrap_err()
                .to_string()
        };
        let missing = run("ModuleNotFoundError: No module named PIL");
        assert!(missing.contains("scripts/peer.py failed"), "{missing}");
        assert!(missing.contains("No module named PIL"), "{missing}");
        assert!(missing.contains("make bench-peers"), "{missing}");
        let other = run("ValueError: bad size");
        assert!(other.contains("ValueError: bad size"), "{other}");
        assert!(!other.contains("bench-peers"), "{other}");
    }

    /// A peer that hangs is killed at the limit, with what to do, and the bench goes on (it
    /// waited forever).
    #[test]
    fn a_hung_peer_is_killed_at_the_limit() {
        let dir = std::env::temp_dir().join(format!("hung-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("child.pid");
        let mut cmd = std::process::Command::new("sh");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        cmd.args(["-c", &script]);
        let started = std::time::Instant::now();
        let limit = std::time::Duration::from_millis(500);
        let e = super::peer_json_within(cmd, std::path::Path::new("scripts/peer.py"), limit)
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(
            e.contains("scripts/peer.py did not finish within 0 s and was killed")
                && e.contains("LLAVA_SCO_PEER_TIMEOUT"),
            "{e}"
        );
        // its child went too
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: signal 0 only asks whether the process exists
        let alive = unsafe { libc::kill(child, 0) } == 0;
        let zombie = std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        });
        assert!(!alive || zombie, "the peer's child {child} still runs");
        let _ = std::fs::remove_dir_all(&dir);
        // a peer that finishes in time is read as before
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo '{\"x\": 1}'"]);
        let v = super::peer_json_within(cmd, std::path::Path::new("p.py"), limit * 20).unwrap();
        assert_eq!(v["x"], 1);
    }

    /// Every bench's `--json` objects carry DESIGN's fields: name, figure and unit, the peer
    /// (null where it runs in a process of its own) and the ratio.
    #[test]
    fn every_json_line_has_the_common_fields() {
        let collectives = super::collectives::Measurement {
            op: "all_reduce",
            bytes: 1 << 20,
            seconds: 0.01,
            busbw_gbps: 0.2,
        };
        let checkpoint = super::checkpoint::Measurement {
            op: "save",
            bytes: 1 << 20,
            seconds: 0.01,
        };
        let data = super::data::Measurement {
            workers: 2,
            samples: 10,
            seconds: 1.0,
            cpu_seconds: 2.0,
            peer_seconds: Some(2.0),
            peer_cpu_seconds: Some(2.0),
        };
        let lines: Vec<Value> = [
            super::collectives::json_line(&collectives, "cpu", "shm-cma", 2),
            checkpoint.json_line(1, 3),
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .chain([data.json(), super::data::Stages::default().json()])
        .collect();
        for line in &lines {
            for key in ["name", "figure", "unit", "peer", "ratio"] {
                assert!(line.get(key).is_some(), "{key} missing: {line}");
            }
            assert!(
                line["name"].is_string() && line["unit"].is_string(),
                "{line}"
            );
        }
        assert_eq!(lines[2]["peer"], 5.0, "data: the peer's samples/s");
        assert_eq!(lines[2]["ratio"], 2.0, "data: figure / peer");
    }
}
