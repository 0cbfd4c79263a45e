//! Retention (docs/checkpoint-format.md, "Save protocol"): which checkpoint folders rank 0 removes
//! after a save and its background "janitor" thread that removes them, and the renames that keep
//! another run's or an abandoned branch's checkpoints out of the way (`.of-run-L`,
//! `.abandoned-at-S`, `.replaced.partial`).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use super::{list_dir, run_of, RunOf};

/// Rank 0's background deletions (retention), one batch at a time; a failure is kept until
/// `take_failure` reports it (a warning after a save), and its message until `final_failure`
/// (the end of training, a warning again).
#[derive(Default)]
pub(super) struct Janitor {
    running: Option<(Vec<PathBuf>, JoinHandle<Result<()>>)>,
    pub(super) failed: Option<anyhow::Error>,
    /// The first failure `take_failure` reported.
    reported: Option<String>,
    /// Tests: the thread waits for a message (or a hang-up) before deleting.
    #[cfg(test)]
    pub(super) gate: Option<std::sync::mpsc::Receiver<()>>,
}

impl Janitor {
    /// Deletes `paths` (folders) on a background thread, after the previous batch.
    pub(super) fn start(&mut self, paths: Vec<PathBuf>) -> Result<()> {
        self.wait();
        if paths.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        let gate = self.gate.take();
        let list = paths.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint-retention".into())
            .spawn(move || -> Result<()> {
                #[cfg(test)]
                if let Some(g) = gate {
                    let _ = g.recv_timeout(std::time::Duration::from_secs(60));
                }
                let t = Instant::now();
                // every folder is tried: one that cannot go (a busy file on NFS, no permission)
                // must not keep the others, listed after it at every save, on disk
                let failed: Vec<String> = list
                    .iter()
                    .filter_map(|p| {
                        // renamed first (to a `.partial` name, which later saves clean up): a
                        // removal cut short must not leave a step folder that still has its
                        // manifest but lacks rank files, which would list as complete
                        let doomed = match p.to_string_lossy().ends_with(".partial") {
                            true => p.clone(),
                            false => {
                                let to = PathBuf::from(format!("{}.deleting.partial", p.display()));
                                match std::fs::rename(p, &to) {
                                    Ok(()) => to,
                                    Err(_) => p.clone(),
                                }
                            }
                        };
                        let e = std::fs::remove_dir_all(&doomed).err()?;
                        Some(format!("removing {}: {e}", doomed.display()))
                    })
                    .collect();
                tracing::debug!(
                    "removed {} of {} old checkpoint folder(s) in {:.3} s",
                    list.len() - failed.len(),
                    list.len(),
                    t.elapsed().as_secs_f64()
                );
                match failed.is_empty() {
                    true => Ok(()),
                    false => Err(anyhow!("{}", failed.join("; "))),
                }
            })?;
        self.running = Some((paths, thread));
        Ok(())
    }

    /// Waits for the batch in progress (keeping its failure).
    pub(super) fn wait(&mut self) {
        if let Some((_, thread)) = self.running.take() {
            let r = thread
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the checkpoint retention thread panicked")));
            if let Err(e) = r {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// Waits for the batch in progress if it deletes `path`.
    pub(super) fn wait_if_deleting(&mut self, path: &Path) {
        if let Some((paths, _)) = &self.running {
            if paths.iter().any(|p| p == path) {
                self.wait();
            }
        }
    }

    /// Waits for the batch in progress; the first failure since the last call.
    pub(super) fn take_failure(&mut self) -> Option<anyhow::Error> {
        self.wait();
        let e = self.failed.take()?;
        self.reported.get_or_insert_with(|| format!("{e:#}"));
        Some(e)
    }

    /// Waits for the batch in progress; its failure, else the first one reported before.
    pub(super) fn final_failure(&mut self) -> Option<anyhow::Error> {
        self.wait();
        self.failed
            .take()
            .or_else(|| self.reported.take().map(|m| anyhow!("{m}")))
    }
}

/// Puts the complete folder `new` in place of the existing `dest`. Linux: one atomic exchange
/// (renameat2 RENAME_EXCHANGE), the old folder then lies at `new`'s `.partial` name for retention.
/// Where the filesystem cannot exchange: `dest` is first renamed aside to `<dest>.replaced.partial`;
/// a crash between the two renames leaves it there, and `list_dir` counts it as step N's complete
/// checkpoint while no `<dest>` exists.
pub(super) fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        if let (Ok(a), Ok(b)) = (c(new), c(dest)) {
            // SAFETY: two NUL-terminated paths, relative to the working directory
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            if r == 0 {
                return Ok(());
            }
        }
    }
    let mut aside = dest.as_os_str().to_owned();
    aside.push(".replaced.partial");
    let aside = PathBuf::from(aside);
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::rename(dest, &aside)
        .and_then(|_| std::fs::rename(new, dest))
        .with_context(|| format!("replacing {} with {}", dest.display(), new.display()))
}

/// The folders retention deletes right after a save: every `.partial` folder, and all but the
/// newest `keep` complete checkpoints of this training run (0: keep all), so the newest complete
/// one never is, nor `just_saved` (it may be older than others when a run resumed from an earlier
/// step). A checkpoint of this run is one whose manifest has `lineage` (or none, an older
/// trainer's, when `claim_unmarked`: this run resumed from one); another run's (e.g. one started
/// over with `checkpoint.resume: never` in the same folder), or one whose manifest cannot be
/// read, is kept.
/// (No fsync of `root` after deleting: a removal lost in a crash only leaves an older checkpoint
/// behind, removed by the next save.)
pub(super) fn retention(
    root: &Path,
    (keep, protected): (usize, Option<&Path>),
    just_saved: &Path,
    lineage: Option<&str>,
    claim_unmarked: bool,
) -> Result<Vec<PathBuf>> {
    let (all, partial) = list_dir(root).with_context(|| format!("listing {}", root.display()))?;
    let ours: Vec<(u64, PathBuf)> = (all.iter())
        .filter(|(_, p)| run_of(p, lineage, claim_unmarked) == RunOf::Ours)
        .cloned()
        .collect();
    // (the folder just published is complete: should it look otherwise now, keep it anyway)
    let mut doomed: Vec<PathBuf> = partial.into_iter().filter(|p| p != just_saved).collect();
    for p in &doomed {
        tracing::info!("removing incomplete checkpoint {}", p.display());
    }
    let older: Vec<PathBuf> = (beyond_keep(&ours, keep, protected).into_iter())
        .filter(|p| p != just_saved)
        .collect();
    // (as HF's Trainer says "Deleting older checkpoint [...] due to args.save_total_limit")
    for p in &older {
        tracing::info!(
            "deleting older checkpoint {} (checkpoint.keep_last {keep})",
            p.display()
        );
    }
    doomed.extend(older);
    // (once per folder: it stays newer for many saves)
    static WARNED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let newer = all.last().filter(|(_, p)| p != just_saved);
    let first_time = |p: &PathBuf| {
        WARNED
            .lock()
            .map(|mut w| w.insert(p.clone()))
            .unwrap_or(true)
    };
    if let Some((step, newer)) = newer.filter(|(_, p)| first_time(p)) {
        tracing::warn!(
            "{} (step {step}) is newer than the checkpoint just saved ({}): `checkpoint.resume: \
             auto` would continue from it; move it away if this run replaces it",
            newer.display(),
            just_saved.display()
        );
    }
    Ok(doomed)
}

/// Of a run's complete checkpoints `ours` (by step), the ones retention removes: all but the
/// newest `keep` (0: none removed) and the `protected` one, the best validated step's, kept
/// besides them when it is not among them (HF's Trainer's rule for `best_model_checkpoint`).
pub(super) fn beyond_keep(
    ours: &[(u64, PathBuf)],
    keep: usize,
    protected: Option<&Path>,
) -> Vec<PathBuf> {
    match keep {
        0 => vec![],
        _ => ours[..ours.len().saturating_sub(keep)]
            .iter()
            .map(|(_, p)| p.clone())
            .filter(|p| Some(p.as_path()) != protected)
            .collect(),
    }
}

/// After a resume from step `step` of run `lineage`, that run's later checkpoints in `root` (the
/// branch a user went back from, e.g. after a loss spike) are renamed `step-N.abandoned-at-S`,
/// which listing and retention ignore: `resume: auto` would otherwise continue the abandoned
/// branch, and retention, ranking by step, would delete the checkpoint resumed from first.
/// Returns the renames made (from, to); one that fails is logged and skipped.
pub(crate) fn set_aside_later(root: &Path, step: u64, lineage: &str) -> Vec<(PathBuf, PathBuf)> {
    let Ok((complete, _)) = list_dir(root) else {
        return vec![];
    };
    complete
        .into_iter()
        .filter(|(n, dir)| *n > step && run_of(dir, Some(lineage), false) == RunOf::Ours)
        .filter_map(|(_, dir)| {
            let to = unused_name(&format!("{}.abandoned-at-{step}", dir.display()));
            match std::fs::rename(&dir, &to) {
                Ok(()) => Some((dir, to)),
                Err(e) => {
                    tracing::warn!("could not move {} aside ({e})", dir.display());
                    None
                }
            }
        })
        .collect()
}

/// `base`, or `base-2`, `base-3`, ...: the first name not taken.
pub(super) fn unused_name(base: &str) -> PathBuf {
    (1..)
        .map(|k| match k {
            1 => PathBuf::from(base),
            k => PathBuf::from(format!("{base}-{k}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name")
}

/// Renames the step folder `final_dir` to `aside`, then the finished `partial` to `final_dir`.
pub(super) fn move_aside_and_publish(final_dir: &Path, aside: &Path, partial: &Path) -> Result<()> {
    std::fs::rename(final_dir, aside)
        .with_context(|| format!("renaming {} to {}", final_dir.display(), aside.display()))?;
    std::fs::rename(partial, final_dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), final_dir.display()))
}

/// A free name beside `dir` for another run's checkpoint of the same step: `step-N.of-run-L`
/// (then `-2`, `-3`, ...), which `list_dir` neither lists nor removes.
pub(super) fn aside_name(dir: &Path, lineage: &str) -> PathBuf {
    unused_name(&format!("{}.of-run-{lineage}", dir.display()))
}
