//! `launcher-testrank`: a scriptable rank for the launcher's end-to-end tests. It records what it
//! saw (environment, pid, process group, signals, store results) as files in `--out DIR`, then
//! behaves as asked (fail, kill itself, sleep, hang on to a child process).
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use launcher::env::RankEnv;
use launcher::error_file::Cause;
use launcher::store::StoreClient;

#[derive(Parser)]
#[command(
    name = "launcher-testrank",
    about = "test helper rank for the launcher's tests"
)]
struct Args {
    /// Folder for the record files
    #[arg(long)]
    out: PathBuf,
    /// Exit with this code (on --rank, or every rank)
    #[arg(long)]
    exit_code: Option<u8>,
    /// SIGKILL itself (on --rank, or every rank)
    #[arg(long)]
    kill_self: bool,
    /// Only this global rank fails (--exit-code / --kill-self)
    #[arg(long)]
    rank: Option<usize>,
    /// Only fail on this attempt (TORCHELASTIC_RESTART_COUNT)
    #[arg(long)]
    attempt: Option<u32>,
    /// Sleep this many seconds before exiting 0 (failing ranks do not sleep)
    #[arg(long, default_value_t = 0.0)]
    sleep: f64,
    /// Only this rank sleeps
    #[arg(long)]
    sleep_rank: Option<usize>,
    /// Only this attempt (TORCHELASTIC_RESTART_COUNT) sleeps
    #[arg(long)]
    sleep_attempt: Option<u32>,
    /// Record SIGTERM/SIGINT/SIGHUP/SIGQUIT in `signal-RANK` and exit 128+sig
    #[arg(long)]
    trap: bool,
    /// Start a `sleep 1000` child in the rank's process group (to test that none survives)
    #[arg(long)]
    child: bool,
    /// Use the rendezvous store: add to a counter, barrier over the world, record the total
    #[arg(long)]
    store: bool,
    /// Print this line on stderr before failing
    #[arg(long)]
    stderr: Option<String>,
    /// Record this message (and a two-line traceback) in TORCHELASTIC_ERROR_FILE before failing
    #[arg(long)]
    record_error: Option<String>,
    /// The exit code on SIGUSR1 (with --trap): 0, or e.g. 143 as the trainer (a stop on a notice)
    #[arg(long, default_value_t = 0)]
    notice_exit: u8,
    /// The other ranks report the --rank's failure at once (an error file marked as caused by
    /// that rank, exit 1), as the trainer's ranks do after an agreed check fails on one rank
    #[arg(long)]
    messengers: bool,
    /// The failing --rank ignores SIGTERM and fails this many seconds late (it was on its way
    /// out when its messengers exited)
    #[arg(long, default_value_t = 0.0)]
    fail_delay: f64,
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Waits (at most 10 s) until `ready-R-ATTEMPT` exists for every rank R in this folder.
fn wait_for_peers(dir: &Path, world_size: usize, attempt: u32) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let all_ready = (0..world_size).all(|r| dir.join(format!("ready-{r}-{attempt}")).exists());
        if all_ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write then rename, so a test polling for the file never reads half of it.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write record");
    std::fs::rename(&tmp, dir.join(name)).expect("rename record");
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env = match RankEnv::from_env() {
        Ok(env) => env,
        Err(err) => {
            eprintln!("testrank: {err}");
            return ExitCode::from(3);
        }
    };
    let tag = format!("{}-{}", env.rank, env.restart_count);
    let pid = std::process::id();
    // SAFETY: plain syscall.
    let pgid = unsafe { libc::getpgid(0) };
    let mut record = String::new();
    for var in [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "ROLE_NAME",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID",
        "LLAVA_SCO_STORE_TOKEN",
        "LLAVA_SCO_LAUNCH_ID",
        "OMP_NUM_THREADS",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "PYTHONUNBUFFERED",
        "TORCHELASTIC_ERROR_FILE",
    ] {
        record.push_str(&format!(
            "{var}={}\n",
            std::env::var(var).unwrap_or_default()
        ));
    }
    record.push_str(&format!("PID={pid}\nPGID={pgid}\n"));

    if args.trap {
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
        ] {
            // SAFETY: the handler only stores an atomic.
            unsafe {
                libc::signal(
                    sig,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
        }
    }
    if args.child {
        let child = Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        record.push_str(&format!("CHILD={}\n", child.id()));
        std::mem::forget(child);
    }
    write(&args.out, &format!("env-{tag}"), &record);

    if args.store {
        let result = (|| -> Result<i64, launcher::StoreError> {
            let mut client = StoreClient::from_rank_env(&env)?;
            client.add("counter", 1)?;
            client.barrier("all", env.world_size, Duration::from_secs(20))?;
            let total = client.get("counter")?;
            Ok(String::from_utf8_lossy(&total).parse().unwrap_or(-1))
        })();
        match result {
            Ok(total) => write(&args.out, &format!("store-{tag}"), &total.to_string()),
            Err(err) => {
                eprintln!("testrank: store: {err}");
                return ExitCode::from(4);
            }
        }
    }
    let chosen = args.rank.is_none_or(|r| r == env.rank)
        && args.attempt.is_none_or(|a| a == env.restart_count);
    let late = chosen && (args.kill_self || args.exit_code.is_some()) && args.fail_delay > 0.0;
    if late {
        // before this rank is ready: a messenger peer fails as soon as every rank is, and the
        // launcher's SIGTERM may come before this rank would get past waiting for its peers
        // SAFETY: plain syscall.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    write(&args.out, &format!("ready-{tag}"), "");

    if chosen && (args.kill_self || args.exit_code.is_some()) {
        // Fail only once every peer of this attempt is ready (its signal handlers are
        // installed): otherwise, on a loaded machine, the launcher's SIGTERM can reach a
        // peer before its trap exists and the test sees no `signal-*` file.
        wait_for_peers(&args.out, env.world_size, env.restart_count);
        if let Some(line) = &args.stderr {
            eprintln!("{line}");
        }
        if late {
            std::thread::sleep(Duration::from_secs_f64(args.fail_delay));
        }
        if let Some(message) = &args.record_error {
            let traceback = format!("Traceback (most recent call last):\n{message}");
            launcher::error_file::record(message, &traceback, Cause::ThisRank);
        }
        if args.kill_self {
            // SAFETY: plain syscall.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
        return ExitCode::from(args.exit_code.unwrap_or(0));
    }

    if let (true, Some(failing)) = (args.messengers, args.rank) {
        wait_for_peers(&args.out, env.world_size, env.restart_count);
        let message =
            format!("the data file is missing on another rank (rank {failing}'s error says why)");
        launcher::error_file::record(&message, &message, Cause::AnotherRank(Some(failing)));
        return ExitCode::from(1);
    }

    let sleeps = args.sleep_rank.is_none_or(|r| r == env.rank)
        && args.sleep_attempt.is_none_or(|a| a == env.restart_count);
    if sleeps && args.sleep > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(args.sleep);
        while Instant::now() < until {
            let sig = SIGNAL.load(Ordering::SeqCst);
            if sig == libc::SIGUSR1 {
                // a notice (e.g. a scheduler's before its time limit): finish now
                write(&args.out, &format!("notice-{tag}"), "");
                return ExitCode::from(args.notice_exit);
            }
            if sig != 0 {
                write(&args.out, &format!("signal-{tag}"), &sig.to_string());
                return ExitCode::from(128 + sig as u8);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    ExitCode::SUCCESS
}
