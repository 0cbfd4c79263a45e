//! Rank output: every rank's stdout and stderr come through a pipe to a relay thread that writes
//! the per-rank log file (`--log-dir`), echoes to the console (optionally `[rank r]`-prefixed),
//! and keeps the last lines of stderr for the root-cause summary.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines of stderr kept per rank for the summary.
pub const TAIL_LINES: usize = 20;
/// Longest line kept in a report (a progress bar without newlines must not fill it).
const REPORT_LINE_CHARS: usize = 400;

/// `line` cut to [`REPORT_LINE_CHARS`] characters for a report (the stderr tail, an error file's
/// lines).
pub(crate) fn clip_line(line: &str) -> String {
    clip_to(line, REPORT_LINE_CHARS)
}

/// `line` cut to `max` characters, marked ` ...` when cut.
pub(crate) fn clip_to(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{} ...", &line[..cut]),
        None => line.to_string(),
    }
}

/// Where rank output goes.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    /// Root of per-attempt log folders: `<log_dir>/<run_id>/attempt_N/[node<G>/]<local_rank>/{stdout,stderr}.log`
    /// (`node<G>` when the run spans nodes: they may share the folder).
    pub log_dir: Option<PathBuf>,
    /// Echo stdout / stderr to the console with a `[rank r]` prefix (torchrun's `--tee`).
    pub tee_stdout: bool,
    pub tee_stderr: bool,
    /// Local ranks whose output reaches the console (None: all).
    pub local_ranks_filter: Option<Vec<usize>>,
}

impl OutputOptions {
    /// Log folder of one rank in one attempt; `node`: this node's rank when the run spans nodes
    /// (their launchers may write to one shared folder).
    pub fn rank_dir(
        &self,
        run_id: &str,
        attempt: u32,
        node: Option<usize>,
        local_rank: usize,
    ) -> Option<PathBuf> {
        self.log_dir
            .as_ref()
            .map(|d| rank_dir_in(d, run_id, attempt, node, local_rank))
    }

    /// How one stream of one rank reaches the console: `None` (silent), or with an optional prefix.
    pub(crate) fn console(
        &self,
        local_rank: usize,
        rank: usize,
        tee: bool,
    ) -> Option<Option<String>> {
        if let Some(filter) = &self.local_ranks_filter {
            if !filter.contains(&local_rank) {
                return None;
            }
        }
        match (self.log_dir.is_some(), tee) {
            // Logging to files: the console sees the stream only when teed.
            (true, false) => None,
            (_, true) => Some(Some(format!("[rank {rank}] "))),
            (false, false) => Some(None),
        }
    }
}

/// `root/RUN_ID/attempt_N/[node<G>/]LOCAL_RANK`: one rank's folder of one attempt (logs, error file).
pub fn rank_dir_in(
    root: &Path,
    run_id: &str,
    attempt: u32,
    node: Option<usize>,
    local_rank: usize,
) -> PathBuf {
    let attempt_dir = root.join(run_id).join(format!("attempt_{attempt}"));
    match node {
        Some(n) => attempt_dir.join(format!("node{n}")),
        None => attempt_dir,
    }
    .join(local_rank.to_string())
}

/// The width of the launcher's terminal when its stderr is one (a rank whose stderr is relayed
/// there unchanged may draw progress bars), else None.
pub(crate) fn stderr_terminal_columns() -> Option<u16> {
    use std::io::IsTerminal;
    if !io::stderr().is_terminal() {
        return None;
    }
    // SAFETY: TIOCGWINSZ fills a winsize for a terminal file descriptor; fd 2 is one.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) } == 0;
    Some(if ok && ws.ws_col > 0 { ws.ws_col } else { 80 })
}

/// Last lines of a stream.
#[derive(Debug, Default)]
pub struct Tail(VecDeque<String>);

impl Tail {
    fn push(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        let text = clip_line(text);
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        self.0.push_back(text);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

#[derive(Clone, Copy)]
enum Console {
    Stdout,
    Stderr,
}

/// What a relay thread is doing, for `RankOutput::finish`.
#[derive(Default)]
struct Activity {
    /// Pieces relayed so far.
    pieces: AtomicU64,
    /// Writing a piece out (to a console that may read slowly).
    writing: AtomicBool,
}

/// A relay thread and what it is doing.
struct Relay {
    thread: JoinHandle<()>,
    activity: Arc<Activity>,
}

/// How long past its deadline `finish` keeps waiting for relays that still move output.
const DRAIN_MORE: Duration = Duration::from_secs(60);
/// A relay that moved nothing for this long past the deadline is waiting on a pipe held open.
const QUIET: Duration = Duration::from_millis(100);

/// The relay threads of one rank.
pub struct RankOutput {
    threads: Vec<Relay>,
    pub stderr_tail: Arc<Mutex<Tail>>,
    pub stderr_log: Option<PathBuf>,
}

impl RankOutput {
    /// Starts relaying `stdout`/`stderr` of a rank. Log files are created here, so a bad
    /// `--log-dir` fails before the rank does any work.
    pub fn start(
        options: &OutputOptions,
        dir: Option<&Path>,
        local_rank: usize,
        rank: usize,
        stdout: impl Read + Send + 'static,
        stderr: impl Read + Send + 'static,
    ) -> io::Result<Self> {
        let (out_file, err_file, stderr_log) = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let err_path = dir.join("stderr.log");
                (
                    Some(open_log(&dir.join("stdout.log"), rank)?),
                    Some(open_log(&err_path, rank)?),
                    Some(err_path),
                )
            }
            None => (None, None, None),
        };
        let stderr_tail = Arc::new(Mutex::new(Tail::default()));
        let out_console = options.console(local_rank, rank, options.tee_stdout);
        let err_console = options.console(local_rank, rank, options.tee_stderr);
        let threads = vec![
            spawn_relay(
                stdout,
                out_file,
                out_console.map(|p| (Console::Stdout, p)),
                None,
            )?,
            spawn_relay(
                stderr,
                err_file,
                err_console.map(|p| (Console::Stderr, p)),
                Some(stderr_tail.clone()),
            )?,
        ];
        Ok(RankOutput {
            threads,
            stderr_tail,
            stderr_log,
        })
    }

    /// Waits for the relays to drain. Until `deadline` whatever they do; after it, only while
    /// they still move output (writing to a console that reads slowly, `| less`, or reading what
    /// a rank left in its pipe), up to [`DRAIN_MORE`] longer: a grandchild that escaped the
    /// process group may hold the pipe open forever, and must not hang the launcher.
    /// `keep_alive` is called while it waits (the node's heartbeat: a drain of a minute must not
    /// get a node that succeeded declared lost by node 0).
    pub fn finish(&mut self, deadline: Instant, keep_alive: &mut dyn FnMut()) {
        let moved = |relays: &[Relay]| -> u64 {
            relays
                .iter()
                .map(|r| r.activity.pieces.load(Ordering::Relaxed))
                .sum()
        };
        let (mut last, mut last_move) = (moved(&self.threads), Instant::now());
        loop {
            let running: Vec<&Relay> = self
                .threads
                .iter()
                .filter(|r| !r.thread.is_finished())
                .collect();
            let now = Instant::now();
            if running.is_empty() || now >= deadline + DRAIN_MORE {
                break;
            }
            let pieces = moved(&self.threads);
            if pieces != last {
                (last, last_move) = (pieces, now);
            }
            let writing = running
                .iter()
                .any(|r| r.activity.writing.load(Ordering::Relaxed));
            if now >= deadline && !writing && now - last_move >= QUIET {
                break;
            }
            keep_alive();
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in std::mem::take(&mut self.threads) {
            if r.thread.is_finished() {
                let _ = r.thread.join();
            }
        }
    }

    /// Gives the stderr relay up to `limit` to reach the end of a rank that just exited, so the
    /// failure report carries its last words (a child still holding the pipe can delay EOF).
    pub fn settle_stderr(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.threads.get(1).is_some_and(|r| !r.thread.is_finished())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .map(|t| t.lines())
            .unwrap_or_default()
    }
}

fn spawn_relay(
    source: impl Read + Send + 'static,
    mut file: Option<File>,
    console: Option<(Console, Option<String>)>,
    tail: Option<Arc<Mutex<Tail>>>,
) -> io::Result<Relay> {
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let thread = std::thread::Builder::new()
        .name("rank-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(source);
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                match read_piece(&mut reader, &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                seen.writing.store(true, Ordering::Relaxed);
                if let Some(f) = file.as_mut() {
                    // A full disk must not stop the rank: drop the file, keep relaying.
                    if f.write_all(&line).is_err() {
                        file = None;
                    }
                }
                if let Some((which, prefix)) = &console {
                    let mut buf = Vec::with_capacity(line.len() + 16);
                    if let Some(p) = prefix {
                        buf.extend_from_slice(p.as_bytes());
                    }
                    buf.extend_from_slice(&line);
                    // ('\r' ends a progress bar's redraw: shown as it comes, not on a new line)
                    if !buf.ends_with(b"\n") && !buf.ends_with(b"\r") {
                        buf.push(b'\n');
                    }
                    // One write per line under the lock, so ranks' lines never interleave mid-line;
                    // a redraw is flushed at once (stdout is line-buffered: it waited for a '\n')
                    let _ = match which {
                        Console::Stdout => {
                            let mut out = io::stdout().lock();
                            out.write_all(&buf)
                                .and_then(|()| match buf.ends_with(b"\r") {
                                    true => out.flush(),
                                    false => Ok(()),
                                })
                        }
                        Console::Stderr => io::stderr().lock().write_all(&buf),
                    };
                }
                seen.writing.store(false, Ordering::Relaxed);
                seen.pieces.fetch_add(1, Ordering::Relaxed);
                // (redraws would push the last real lines out of the failure report's tail)
                if let Some(t) = tail.as_ref().filter(|_| !line.ends_with(b"\r")) {
                    if let Ok(mut t) = t.lock() {
                        t.push(&line);
                    }
                }
            }
        })?;
    Ok(Relay { thread, activity })
}

/// The longest piece of rank output relayed at once (a line without an end is cut there).
const MAX_PIECE: usize = 64 * 1024;

/// Reads the next piece of a rank's output into `piece` (empty): up to and including a '\n' or
/// '\r' (tqdm redraws its bar with '\r': it must show as it happens, not when the bar ends), or
/// `MAX_PIECE` bytes. Returns the piece's length, 0 at the end.
fn read_piece(reader: &mut impl BufRead, piece: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        let (done, used) = {
            let buf = match reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Ok(piece.len());
            }
            let room = &buf[..buf.len().min(MAX_PIECE - piece.len())];
            match room.iter().position(|&c| c == b'\n' || c == b'\r') {
                Some(i) => {
                    piece.extend_from_slice(&room[..=i]);
                    (true, i + 1)
                }
                None => {
                    piece.extend_from_slice(room);
                    (piece.len() >= MAX_PIECE, room.len())
                }
            }
        };
        reader.consume(used);
        if done {
            return Ok(piece.len());
        }
    }
}

/// Opens a rank's log for appending, after a line that says which start of the rank follows: a
/// rerun with the same run id (a requeued batch job, `--run-id exp1` again) adds to the logs
/// instead of wiping the earlier run's.
fn open_log(path: &Path, rank: usize) -> io::Result<File> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if f.metadata()?.len() > 0 {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        writeln!(
            f,
            "==== launcher: rank {rank} started again (unix time {since_epoch}); the lines above are an earlier run's"
        )?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_end_at_newlines_carriage_returns_or_the_cap() {
        let pieces = |input: &[u8]| {
            let mut r = BufReader::with_capacity(7, input);
            let mut out = vec![];
            loop {
                let mut p = vec![];
                if read_piece(&mut r, &mut p).unwrap() == 0 {
                    return out;
                }
                out.push(p);
            }
        };
        assert_eq!(
            pieces(b" 10%\r 20%\r100%\ndone\nno end"),
            [&b" 10%\r"[..], b" 20%\r", b"100%\n", b"done\n", b"no end"]
        );
        let long = vec![b'x'; MAX_PIECE + 5];
        let got = pieces(&long);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].len(), got[1].len()), (MAX_PIECE, 5));
    }

    #[test]
    fn nodes_of_one_run_get_their_own_log_folders() {
        let o = OutputOptions {
            log_dir: Some("/logs".into()),
            tee_stdout: false,
            tee_stderr: false,
            local_ranks_filter: None,
        };
        assert_eq!(
            o.rank_dir("r", 2, None, 1).unwrap(),
            PathBuf::from("/logs/r/attempt_2/1")
        );
        assert_eq!(
            o.rank_dir("r", 2, Some(3), 1).unwrap(),
            PathBuf::from("/logs/r/attempt_2/node3/1")
        );
    }

    #[test]
    fn tail_keeps_the_last_lines_and_cuts_long_ones() {
        let mut t = Tail::default();
        for i in 0..30 {
            t.push(format!("line {i}\n").as_bytes());
        }
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 10");
        t.push("x".repeat(1000).as_bytes());
        assert!(t.lines().last().unwrap().len() < 500);
    }

    /// A rank's output that keeps coming after its deadline is drained while it moves, and the
    /// node's heartbeat goes on meanwhile.
    #[test]
    fn a_long_drain_keeps_the_node_alive() {
        struct Slow(u32);
        impl Read for Slow {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Ok(0);
                }
                self.0 -= 1;
                std::thread::sleep(Duration::from_millis(30));
                buf[0] = b'\n';
                Ok(1)
            }
        }
        let options = OutputOptions {
            local_ranks_filter: Some(vec![]),
            ..OutputOptions::default()
        };
        let mut out = RankOutput::start(&options, None, 0, 0, Slow(20), io::empty()).unwrap();
        let (started, mut beats) = (Instant::now(), 0);
        out.finish(Instant::now(), &mut || beats += 1);
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "drained whole"
        );
        assert!(beats > 10, "{beats}");
    }

    #[test]
    fn console_routing() {
        let mut o = OutputOptions::default();
        assert_eq!(o.console(0, 0, false), Some(None));
        assert_eq!(o.console(1, 5, true), Some(Some("[rank 5] ".into())));
        o.log_dir = Some("/tmp/x".into());
        assert_eq!(o.console(0, 0, false), None);
        o.local_ranks_filter = Some(vec![0]);
        assert_eq!(o.console(1, 1, true), None);
        assert_eq!(o.console(0, 0, true), Some(Some("[rank 0] ".into())));
    }
}
