//! Names of the ranks' shared-memory segment files (the trainer's CPU collectives create them,
//! trainer/src/dist/shm.rs), in one place so that the launcher can remove the ones an attempt
//! leaked: rank 0 unlinks a segment once every rank has mapped it, but a rank killed before that
//! (Ctrl-C, a peer that died during startup) leaves the file, and its reserved memory, behind.
use std::path::PathBuf;

/// Where segments live: /dev/shm, else the temporary directory.
pub fn dir() -> PathBuf {
    let dev_shm = PathBuf::from("/dev/shm");
    if dev_shm.is_dir() {
        dev_shm
    } else {
        std::env::temp_dir()
    }
}

/// The file-name prefix of every segment of attempt `attempt` of run `run_id`.
pub fn prefix(run_id: &str, attempt: u32) -> String {
    let safe_run: String = run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("llava-sco-{safe_run}-a{attempt}-")
}

/// The segment file `name` of attempt `attempt` of run `run_id`.
pub fn path(run_id: &str, attempt: u32, name: &str) -> PathBuf {
    dir().join(format!("{}{name}", prefix(run_id, attempt)))
}

/// Removes the segment files attempt `attempt` of run `run_id` left behind on this host; returns
/// how many there were.
pub fn remove_leftovers(run_id: &str, attempt: u32) -> usize {
    let prefix = prefix(run_id, attempt);
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_one_attempt_are_removed_and_nothing_else() {
        let run = format!("shm-test/{}", std::process::id());
        let mine = path(&run, 0, "cpu");
        let other_attempt = path(&run, 1, "cpu");
        let unrelated = dir().join(format!("{}cpu", prefix("other-run", 0)));
        for p in [&mine, &other_attempt, &unrelated] {
            std::fs::write(p, b"x").unwrap();
        }
        assert!(mine
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("shm-test_"));
        assert_eq!(remove_leftovers(&run, 0), 1);
        assert!(!mine.exists());
        assert!(other_attempt.exists() && unrelated.exists());
        for p in [&other_attempt, &unrelated] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
