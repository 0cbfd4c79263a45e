//! A launcher's claim on its log folder (`--log-dir DIR/RUN_ID`): two launches with the same run
//! id and log folder (two sruns of one SLURM job given their layout by flags, whose run id is the
//! job id; a reused `--run-id`) would interleave their ranks' lines in one `stdout.log`, and each
//! start clears the other's `error.json`. torchrun avoids it with a fresh folder per launch; the
//! layout here is fixed by the run id, so the second launch is refused instead.
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use crate::flock::Flock;

/// Held for the launch: `flock` on `RUN_DIR/.launcher-node<G>.lock` (one per node: nodes may
/// share the folder). The kernel releases it when the launcher exits, however it ends.
pub struct LogDirLock {
    _file: Option<File>,
}

impl LogDirLock {
    /// Takes the lock of node `node` in `run_dir` (created); `Err` names the holder when another
    /// launcher has it. A filesystem without flock gets a warning and no lock.
    pub fn acquire(run_dir: &Path, node: usize) -> Result<Self, String> {
        let path = run_dir.join(format!(".launcher-node{node}.lock"));
        let opened = std::fs::create_dir_all(run_dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
        });
        let mut file = opened.map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        match crate::flock::try_exclusive(&file) {
            Ok(Flock::Held) => {}
            Ok(Flock::Busy) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(format!(
                    "--log-dir {} is in use by another launch with this run id ({}: {}); give this launch its own --run-id or --log-dir",
                    run_dir.display(),
                    path.display(),
                    holder.trim()
                ));
            }
            Ok(Flock::Unsupported(e)) => {
                tracing::warn!(
                    "{}: flock is not supported here ({e}); a second launch with this run id and --log-dir would mix its logs into these",
                    path.display()
                );
                return Ok(Self { _file: None });
            }
            Err(e) => return Err(format!("locking {}: {e}", path.display())),
        }
        let me = format!("{} pid {}\n", super::hostname(), std::process::id());
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()));
        Ok(Self { _file: Some(file) })
    }
}
