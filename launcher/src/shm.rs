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

/// The file-name prefix of every segment of attempt `attempt` of run `run_id` whose store is at
/// `port` (two runs on one host may share a run id, e.g. a sweep in one SLURM allocation: their
/// stores' ports differ). The run id is spelled readably (other characters as `_`) and by a hash
/// of its exact bytes; `.` separates the fields and appears in none, so no run's or attempt's
/// prefix is a prefix of another's.
pub fn prefix(run_id: &str, port: u16, attempt: u32) -> String {
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
    let hash = crate::token::fnv1a(run_id.as_bytes());
    format!("llava-sco.{safe_run}.{hash:016x}.p{port}.a{attempt}.")
}

/// The segment file `name` of attempt `attempt` of run `run_id` with its store at `port`.
pub fn path(run_id: &str, port: u16, attempt: u32, name: &str) -> PathBuf {
    dir().join(format!("{}{name}", prefix(run_id, port, attempt)))
}

/// Removes the segment files attempt `attempt` of run `run_id` (store at `port`) left behind on
/// this host; returns how many there were.
pub fn remove_leftovers(run_id: &str, port: u16, attempt: u32) -> usize {
    let prefix = prefix(run_id, port, attempt);
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
        let mine = path(&run, 29500, 0, "cpu");
        let other_attempt = path(&run, 29500, 1, "cpu");
        let other_port = path(&run, 29501, 0, "cpu");
        let unrelated = dir().join(format!("{}cpu", prefix("other-run", 29500, 0)));
        // a run id that ends like an attempt suffix, and one that differs only in `.` vs `_`
        let lookalike = path(&format!("{run}-a0"), 29500, 0, "cpu");
        let other_spelling = path(&run.replace('/', "_"), 29500, 0, "cpu");
        let others = [
            &other_attempt,
            &other_port,
            &unrelated,
            &lookalike,
            &other_spelling,
        ];
        for p in std::iter::once(&mine).chain(others) {
            std::fs::write(p, b"x").unwrap();
        }
        assert!(mine
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("shm-test_"));
        assert_eq!(remove_leftovers(&run, 29500, 0), 1);
        assert!(!mine.exists());
        for p in others {
            assert!(p.exists(), "{} removed too", p.display());
            std::fs::remove_file(p).unwrap();
        }
    }
}
