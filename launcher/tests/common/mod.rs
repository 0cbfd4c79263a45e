//! Helpers shared by the launcher's end-to-end tests: scratch folders, free ports, running the
//! real `launcher` binary with a deadline, reading `launcher-testrank` records, and checking that
//! no process outlived a test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_launcher");
pub const TESTRANK: &str = env!("CARGO_BIN_EXE_launcher-testrank");

/// A scratch folder under the target dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "launcher-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nobody listens on right now (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The launcher binary with a clean environment (no SLURM, no inherited token) in its own
/// process group, so a test can signal it alone.
pub fn launcher(args: &[&str]) -> Command {
    let mut cmd = Command::new(LAUNCHER);
    // The launcher keeps a signal ignored at its start (nohup): the tests start it with the
    // forwarded signals at their defaults, whatever the test runner ignores (`nohup make test`).
    // SAFETY: only async-signal-safe calls (signal) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    cmd.args(args)
        .env_remove("OMP_NUM_THREADS")
        .env_remove("LLAVA_SCO_STORE_TOKEN")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("PYTHONUNBUFFERED")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (key, _) in std::env::vars() {
        // (torchrun's PET_<OPTION> variables are options too)
        if key.starts_with("SLURM_") || key.starts_with("PET_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `launcher [args] -- launcher-testrank --out DIR [rank_args]`.
pub fn launch_testrank(args: &[&str], out: &Path, rank_args: &[&str]) -> Command {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", TESTRANK, "--out", out.to_str().unwrap()]);
    all.extend(rank_args);
    launcher(&all)
}

/// Finished launcher run.
pub struct Run {
    /// The launcher's pid = its process group.
    pub pgid: i32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.code
            .unwrap_or_else(|| panic!("launcher died by signal {:?}\n{}", self.signal, self.stderr))
    }
}

/// Waits for `child` with a deadline; on timeout kills its process group and panics.
pub fn wait(child: Child, started: Instant, limit: Duration) -> Run {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: plain syscall on the group we created.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
            panic!("launcher did not finish within {limit:?}");
        }
    };
    Run {
        pgid: pid,
        code: output.status.code(),
        signal: output.status.signal(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Runs to completion with a deadline.
pub fn run(mut cmd: Command, limit: Duration) -> Run {
    let started = Instant::now();
    let child = cmd.spawn().expect("start launcher");
    wait(child, started, limit)
}

/// The `env-RANK-ATTEMPT` record of a testrank.
pub fn read_env(dir: &Path, rank: usize, attempt: u32) -> HashMap<String, String> {
    let path = dir.join(format!("env-{rank}-{attempt}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until `dir/name` exists.
pub fn wait_for_file(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Process groups of the ranks (and their children) recorded in `dir`.
pub fn recorded_groups(dir: &Path) -> Vec<i32> {
    let mut groups = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("env-") {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            for line in text.lines() {
                if let Some(pgid) = line.strip_prefix("PGID=") {
                    groups.push(pgid.parse().unwrap());
                }
            }
        }
    }
    groups
}

/// Live (non-zombie) processes whose process group is one of `groups`.
fn live_members(groups: &[i32]) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 || fields[0] == "Z" || fields[0] == "X" {
            continue;
        }
        if let Ok(pgrp) = fields[2].parse::<i32>() {
            if groups.contains(&pgrp) {
                found.push((pid, stat.trim().to_string()));
            }
        }
    }
    found
}

/// Asserts that every recorded rank group is empty (allowing a moment for the kernel to reap).
pub fn assert_no_survivors(groups: &[i32]) {
    assert!(!groups.is_empty(), "no process groups recorded");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let live = live_members(groups);
        if live.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for (pid, _) in &live {
                // SAFETY: cleaning up after a failed test.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            panic!("processes survived the launcher: {live:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
