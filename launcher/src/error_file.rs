//! torchelastic's error files: every rank gets `TORCHELASTIC_ERROR_FILE`, the path where a
//! program records why it failed. Python scripts write it with
//! `torch.distributed.elastic.multiprocessing.errors.record`; our binaries with [`record`]. When a
//! rank fails, the launcher reads the file and puts its message and traceback in the root-cause
//! summary, as torchrun does (`error_file:`, `traceback:`).
//!
//! The file is torchelastic's JSON:
//! `{"message": {"message": "ValueError: ...", "extraInfo": {"py_callstack": "Traceback ...",
//! "timestamp": "1700000000"}}}`; an older form has `"message"` as a plain string.
use std::path::{Path, PathBuf};

use crate::supervise::output::{clip_line, clip_to};

/// Longest error message kept for the summary: the trainer's errors end with their fix (which
/// setting to change, which folder to resume from), often past the 400 characters a log line is
/// cut to.
const MESSAGE_CHARS: usize = 2000;

/// The variable naming the rank's error file (torchrun's name).
pub const ERROR_FILE_VAR: &str = "TORCHELASTIC_ERROR_FILE";

/// The error file's name inside a rank's folder (torchrun's).
pub const FILE_NAME: &str = "error.json";

/// Lines of the traceback kept for the summary (the innermost frames, where the error is).
pub const TRACEBACK_LINES: usize = 40;
/// The most of a file read (the summary travels to the other nodes through the store; its lines
/// are clipped as the stderr tail's).
const MAX_BYTES: u64 = 1 << 20;

/// What a failed rank recorded about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankError {
    /// Where the rank wrote it (on the rank's own node).
    pub file: PathBuf,
    /// One line: "ValueError: bad value", or why the file could not be read.
    pub message: String,
    /// The traceback's last [`TRACEBACK_LINES`] lines (empty when the file has none).
    pub traceback: Vec<String>,
    /// The rank failed because another rank did (it says so in `extraInfo`'s
    /// `caused_by_another_rank`, which our binaries write): not the root cause.
    pub elsewhere: bool,
    /// The global rank that failed first-hand, when the rank knew it (`failed_rank`).
    pub failed_rank: Option<usize>,
}

/// Reads the error file a rank left at `path`; `None` when it wrote none. A file that is not
/// torchelastic's JSON is still reported (its path, and why it could not be read): a crash while
/// writing it must not hide that one was written.
pub fn read(path: &Path) -> Option<RankError> {
    let text = match read_at_most(path, MAX_BYTES) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => return Some(unreadable(path, &err.to_string())),
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(json) => json,
        Err(err) => return Some(unreadable(path, &format!("not JSON: {err}"))),
    };
    let (message, traceback, elsewhere, failed_rank) = match json.get("message") {
        // {"message": {"message": "...", "extraInfo": {"py_callstack": "..."}}}
        Some(serde_json::Value::Object(m)) => {
            let extra = |key: &str| m.get("extraInfo").and_then(|e| e.get(key));
            (
                m.get("message").and_then(|v| v.as_str()).unwrap_or(""),
                extra("py_callstack").and_then(|v| v.as_str()).unwrap_or(""),
                extra(CAUSED_ELSEWHERE).and_then(|v| v.as_bool()) == Some(true),
                extra(FAILED_RANK)
                    .and_then(|v| v.as_u64())
                    .map(|r| r as usize),
            )
        }
        // {"message": "...", "timestamp": ...}
        Some(serde_json::Value::String(s)) => (s.as_str(), "", false, None),
        _ => return Some(unreadable(path, "no \"message\" field")),
    };
    let lines: Vec<&str> = traceback.lines().collect();
    let first_message_line = message.lines().next().unwrap_or("").trim();
    Some(RankError {
        file: path.to_path_buf(),
        message: if first_message_line.is_empty() {
            "(empty message)".to_string()
        } else {
            clip_to(first_message_line, MESSAGE_CHARS)
        },
        traceback: lines[lines.len().saturating_sub(TRACEBACK_LINES)..]
            .iter()
            .map(|l| clip_line(l))
            .collect(),
        elsewhere: elsewhere || failed_rank.is_some(),
        failed_rank,
    })
}

/// The file's text, or its first `max` bytes (a file past that is not torchelastic's JSON).
fn read_at_most(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn unreadable(path: &Path, why: &str) -> RankError {
    RankError {
        file: path.to_path_buf(),
        message: format!("(the error file could not be read: {why})"),
        traceback: Vec::new(),
        elsewhere: false,
        failed_rank: None,
    }
}

/// Prepares a rank's error file before it starts: its folder exists and no file from an earlier
/// run with the same log folder is left to be mistaken for this run's.
pub fn prepare(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// The `extraInfo` key that marks an error caused by another rank's failure (torchelastic's
/// readers ignore keys they do not know).
const CAUSED_ELSEWHERE: &str = "caused_by_another_rank";
/// The `extraInfo` key naming the rank that failed first-hand (when the reporting rank knows it).
const FAILED_RANK: &str = "failed_rank";

/// Whether the error being recorded is the rank's own or one it reports because another rank
/// failed (an agreed check: "the data file is missing on another rank").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    ThisRank,
    /// Another rank failed: which one (its global rank), when this rank knows.
    AnotherRank(Option<usize>),
}

/// For a program run by the launcher (or torchrun): records `message` (one line) and `detail`
/// (e.g. the error's cause chain) in `TORCHELASTIC_ERROR_FILE`, when that is set. Written through
/// a temporary name, so the launcher never reads half a file. Best effort: the program is failing
/// already, and its stderr says the same. An error of [`Cause::AnotherRank`] is marked: the
/// launcher names the rank that failed first-hand as the root cause, whichever exited first.
pub fn record(message: &str, detail: &str, cause: Cause) {
    let Some(path) = std::env::var_os(ERROR_FILE_VAR).filter(|p| !p.is_empty()) else {
        return;
    };
    let _ = write(Path::new(&path), message, detail, cause);
}

fn write(path: &Path, message: &str, detail: &str, cause: Cause) -> std::io::Result<()> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": detail,
                "timestamp": timestamp.to_string(),
                CAUSED_ELSEWHERE: cause != Cause::ThisRank,
                FAILED_RANK: match cause {
                    Cause::AnotherRank(rank) => rank,
                    Cause::ThisRank => None,
                },
            },
        }
    });
    // unique per writer (process, call): two threads failing at once never share a file
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}.{n}", std::process::id()));
    std::fs::write(&tmp, json.to_string())?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of one test's own, removed when the test ends (also when it fails).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> (Scratch, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("launcher-error-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(FILE_NAME);
        (Scratch(dir), file)
    }

    #[test]
    fn reads_what_torch_record_writes() {
        let (_dir, path) = scratch("torch");
        // byte for byte what torch 2.x's ErrorHandler.record_exception writes
        std::fs::write(
            &path,
            r#"{"message": {"message": "ValueError: bad lr", "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  File \"train.py\", line 3, in main\n    raise ValueError(\"bad lr\")\nValueError: bad lr\n", "timestamp": "1732700000"}}}"#,
        )
        .unwrap();
        let err = read(&path).unwrap();
        assert_eq!(err.message, "ValueError: bad lr");
        assert_eq!(err.traceback.len(), 4);
        assert_eq!(err.traceback[0], "Traceback (most recent call last):");
        assert_eq!(err.traceback[3], "ValueError: bad lr");
        assert!(!err.elsewhere);
        // the older form: a plain string
        std::fs::write(&path, r#"{"message": "RuntimeError: x", "timestamp": 1}"#).unwrap();
        let err = read(&path).unwrap();
        assert_eq!(
            (err.message.as_str(), err.traceback.len()),
            ("RuntimeError: x", 0)
        );
    }

    #[test]
    fn long_lines_are_clipped() {
        let (_dir, path) = scratch("long");
        // (a message to 2000 characters: an error's fix comes last; traceback lines to 400)
        let long = "x".repeat(1500);
        write(&path, &long, &"y".repeat(900), Cause::ThisRank).unwrap();
        let err = read(&path).unwrap();
        assert_eq!(err.message, long);
        assert_eq!(err.traceback[0].len(), 400 + 4);
        write(&path, &"x".repeat(5000), "short\n", Cause::ThisRank).unwrap();
        let err = read(&path).unwrap();
        assert_eq!(err.message.len(), 2000 + 4);
        assert!(err.message.ends_with(" ..."));
    }

    #[test]
    fn missing_is_none_and_broken_is_reported() {
        let (_dir, path) = scratch("broken");
        assert_eq!(read(&path), None);
        std::fs::write(&path, "{\"message\": {\"mess").unwrap();
        let err = read(&path).unwrap();
        assert!(
            err.message.contains("could not be read: not JSON"),
            "{err:?}"
        );
        std::fs::write(&path, "{}").unwrap();
        assert!(read(&path).unwrap().message.contains("no \"message\""));
    }

    #[test]
    fn our_record_round_trips_and_keeps_the_last_traceback_lines() {
        let (_dir, path) = scratch("ours");
        let detail: Vec<String> = (0..100).map(|i| format!("frame {i}")).collect();
        write(
            &path,
            "loading the config failed: bad key",
            &detail.join("\n"),
            Cause::ThisRank,
        )
        .unwrap();
        let err = read(&path).unwrap();
        assert_eq!(err.message, "loading the config failed: bad key");
        assert_eq!(err.traceback.len(), TRACEBACK_LINES);
        assert_eq!(err.traceback.last().unwrap(), "frame 99");
        assert_eq!((err.elsewhere, err.failed_rank), (false, None));
        // an error reported because another rank failed is marked as such
        write(
            &path,
            "failed on another rank",
            "",
            Cause::AnotherRank(None),
        )
        .unwrap();
        let err = read(&path).unwrap();
        assert_eq!((err.elsewhere, err.failed_rank), (true, None));
        write(&path, "failed on rank 3", "", Cause::AnotherRank(Some(3))).unwrap();
        let err = read(&path).unwrap();
        assert_eq!((err.elsewhere, err.failed_rank), (true, Some(3)));
        // prepare removes a stale file and keeps the folder
        prepare(&path).unwrap();
        assert_eq!(read(&path), None);
        assert!(path.parent().unwrap().is_dir());
    }
}
