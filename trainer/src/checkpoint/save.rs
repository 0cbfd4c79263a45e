//! Atomic sharded save (docs/checkpoint-format.md, "Save protocol"). One [`Checkpointer`] per rank
//! runs a training run's saves, at most one in flight:
//! - `save` / `save_states`: rank 0 creates `step-N.partial/` (barrier); every rank snapshots its
//!   state and a writer thread writes and fsyncs its rank file. A background save copies the
//!   state into host buffers that are kept and reused from one save to the next (a fresh
//!   allocation is page-faulted in during the copy, which cost more than the copy); a synchronous
//!   save of CPU fp32 state writes from the state's own memory.
//! - `finish` (training thread: collectives): waits for the file, all-gathers (size, sha256) of
//!   every rank's file (also the barrier after the data files); rank 0 writes and fsyncs
//!   `manifest.json` and its checksum file, renames the folder to `step-N`, fsyncs the parent and
//!   broadcasts whether all that worked (so the other ranks fail with the cause). Then
//!   retention (`keep_last`, leftover `.partial` folders) runs on rank 0's background "janitor"
//!   thread: deleting a 1 GiB checkpoint took ~1 s of training time on a busy disk.
//! - `close` (end of training, SIGTERM included): finishes the save in flight and waits for the
//!   janitor. A write failure on any rank fails every rank, at the latest there; a deletion that
//!   failed (retention) is a warning after the next save and again there, never a failure.
//!
//! A crash at any point leaves earlier checkpoints intact.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::manifest::{
    DataPosition, FileEntry, Manifest, ShardEntry, TensorEntry, FORMAT, STATES, VERSION,
};
use super::retention::{
    aside_name, beyond_keep, move_aside_and_publish, replace_dir, retention, unused_name, Janitor,
};
use super::{
    flat_states, fsync_dir, identity, identity_hash, rank_file_name, run_of, write_synced,
    Progress, RunOf, StatesFor,
};
use crate::config::Config;
use crate::dist::ProcessGroup;
use crate::fsdp::Trainable;
use crate::optim::{AdamW, LrSchedule};

/// Test hook: `TRAINER_CHECKPOINT_CRASH_AT=N` exits the process (code 86, every rank) after the
/// data files of step N's checkpoint are written and before its manifest, on the first attempt
/// only (`TORCHELASTIC_RESTART_COUNT` unset or 0), so that a launcher restart gets past it.
pub const CRASH_ENV: &str = "TRAINER_CHECKPOINT_CRASH_AT";

/// Test hook: `TRAINER_CHECKPOINT_FAIL_WRITE_AT=N` makes the writer thread of step N's save write
/// to `/dev/full` instead of its rank file: a real ENOSPC through the real write path, to check
/// how a failed (background) write is reported.
pub const FAIL_WRITE_ENV: &str = "TRAINER_CHECKPOINT_FAIL_WRITE_AT";

/// Test hook: `TRAINER_CHECKPOINT_FAIL_MANIFEST_AT=N` makes rank 0 write step N's manifest to
/// `/dev/full`: a publish that fails on rank 0 only, to check that the other ranks report it.
pub const FAIL_MANIFEST_ENV: &str = "TRAINER_CHECKPOINT_FAIL_MANIFEST_AT";

/// The step number in environment variable `var`, if set.
fn env_step(var: &str) -> Option<u64> {
    std::env::var(var).ok().and_then(|s| s.parse().ok())
}

/// One rank's saves over a run: the save in flight, the reusable snapshot buffers and rank 0's
/// retention thread. Every method that takes `pg` must be called by every rank.
pub struct Checkpointer {
    pending: Option<PendingSave>,
    /// Snapshot buffers (1-D fp32 CPU tensors) free for the next save; a save takes the ones it
    /// needs (by length) and `finish` gives them back.
    pool: Vec<Tensor>,
    janitor: Janitor,
    /// Buffers being allocated ahead of the first background save (`reserve`).
    reserving: Option<JoinHandle<Vec<Tensor>>>,
    /// [`FAIL_WRITE_ENV`]
    fail_write_at: Option<u64>,
    /// Rank 0: the training run's id across resumes (`Manifest::lineage`), drawn at the first save
    /// of a fresh run or taken over from the checkpoint resumed ([`Checkpointer::continue_lineage`]).
    lineage: Option<String>,
    /// Resumed from a checkpoint of an older trainer (no lineage): its run's other checkpoints,
    /// unmarked too, count as this run's for retention. Otherwise unmarked ones are kept.
    resumed_unmarked: bool,
    /// The step of the best validated epoch: its checkpoint is kept by retention, besides the
    /// newest `keep_last` (as HF's Trainer keeps `best_model_checkpoint`).
    protected: Option<u64>,
    /// Entries added to every manifest's `prompt` (what the run found in its data).
    prompt_notes: serde_json::Map<String, Value>,
}

impl Default for Checkpointer {
    fn default() -> Self {
        Self::new()
    }
}

impl Checkpointer {
    pub fn new() -> Self {
        Self {
            pending: None,
            pool: vec![],
            janitor: Janitor::default(),
            reserving: None,
            fail_write_at: env_step(FAIL_WRITE_ENV),
            lineage: None,
            resumed_unmarked: false,
            protected: None,
            prompt_notes: serde_json::Map::new(),
        }
    }

    /// Records `key: value` in the `prompt` section of every manifest saved from now on.
    pub fn note_prompt(&mut self, key: &str, value: Value) {
        self.prompt_notes.insert(key.to_string(), value);
    }

    /// Keeps the checkpoint of step `step` from retention from now on (the best epoch's).
    pub fn protect(&mut self, step: Option<u64>) {
        self.protected = step;
    }

    /// Rank 0, after a validation moved the protection to a new best step: retention again over
    /// this run's complete checkpoints in `root` (on the retention thread). It ran when the new
    /// best was saved, before its validation, and kept the old best then; without this pass that
    /// one would stay until the next save, and after the last save for good (`keep_last: 1`
    /// leaving two checkpoints where the best is the newest).
    pub fn retire_unprotected(&mut self, root: &Path, keep_last: usize) {
        let (lineage, claim) = (self.lineage.as_deref(), self.resumed_unmarked);
        let ours: Vec<(u64, PathBuf)> = match super::list_dir(root) {
            Ok((complete, _)) => complete
                .into_iter()
                .filter(|(_, p)| run_of(p, lineage, claim) == RunOf::Ours)
                .collect(),
            // (a listing that fails leaves them to the next save's retention)
            Err(_) => return,
        };
        let protected = self.protected.map(|s| root.join(super::step_dir_name(s)));
        let doomed = beyond_keep(&ours, keep_last, protected.as_deref());
        if let Err(e) = self.janitor.start(doomed) {
            let e = e.context("starting the checkpoint retention thread");
            self.janitor.failed.get_or_insert(e);
        }
    }

    /// Saves continue the training run of a resumed checkpoint (`None`: one of an older trainer:
    /// the saves start a lineage, and retention may remove that trainer's unmarked checkpoints).
    pub fn continue_lineage(&mut self, lineage: Option<String>) {
        self.resumed_unmarked = lineage.is_none();
        self.lineage = lineage;
    }

    /// Whether `dir` holds a checkpoint of this training run ([`super::run_of`]).
    pub fn saved_by_this_run(&self, dir: &Path) -> bool {
        run_of(dir, self.lineage.as_deref(), self.resumed_unmarked) == RunOf::Ours
    }

    /// This run's lineage, drawn on first use (rank 0 only: it cannot fail, as rank 0 alone
    /// failing here would leave the other ranks waiting in the next collective).
    fn lineage(&mut self) -> String {
        self.lineage
            .get_or_insert_with(|| {
                launcher::token::random_hex(8).unwrap_or_else(|_| {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    format!("{:x}{:x}", t, std::process::id())
                })
            })
            .clone()
    }

    /// Allocates and page-faults in the snapshot buffers of a background save of this state on a
    /// background thread (training goes on), so that not even the first background save pays
    /// for fresh memory on the training thread. The buffers stay for the whole run.
    pub fn reserve(&mut self, trainable: &Trainable, opt: &AdamW) {
        self.reserve_states(&flat_states(trainable, opt, StatesFor::Save));
    }

    /// Waits for `reserve`'s buffers (if any are coming) and puts them in the pool.
    pub(crate) fn wait_reserved(&mut self) {
        if let Some(r) = self.reserving.take() {
            self.pool.extend(r.join().unwrap_or_default());
        }
    }

    /// `reserve` for these flat states.
    pub(crate) fn reserve_states(&mut self, states: &[super::FlatState]) {
        if self.reserving.is_some() || !self.pool.is_empty() {
            return;
        }
        let sizes: Vec<i64> = states
            .iter()
            .filter(|s| s.end > s.start)
            .flat_map(|s| [s.end - s.start; 3])
            .collect();
        let thread = std::thread::Builder::new()
            .name("checkpoint-reserve".into())
            .spawn(move || {
                // zeros writes every page: they are faulted in here, not during the first copy
                let t = Instant::now();
                let bufs: Vec<Tensor> = sizes
                    .iter()
                    .filter_map(|&n| Tensor::f_zeros([n], (Kind::Float, Device::Cpu)).ok())
                    .collect();
                tracing::debug!(
                    "checkpoint snapshot buffers reserved in {:.3} s",
                    t.elapsed().as_secs_f64()
                );
                bufs
            });
        // without a thread the first save allocates, as it would without `reserve`
        self.reserving = thread.ok();
    }

    /// Saves the trainable state at `progress` into `checkpoint.dir/step-<N>/`, after completing
    /// the save in flight (if any). `background`: returns once the state is copied (training may
    /// change it right away) with `None`; else returns the published folder.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        pg: &ProcessGroup,
        device: Device,
        config: &Config,
        trainable: &Trainable,
        opt: &AdamW,
        schedule: &LrSchedule,
        progress: &Progress,
        background: bool,
    ) -> Result<Option<PathBuf>> {
        let states = flat_states(trainable, opt, StatesFor::Save);
        let step = opt.step;
        self.save_states(
            pg, device, config, states, step, schedule, progress, background,
        )
    }

    /// `save` over this rank's flat states (`trainable` + optimizer moments, or synthetic ones in
    /// `trainer bench checkpoint`); `optimizer_step`: AdamW's step count.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn save_states(
        &mut self,
        pg: &ProcessGroup,
        device: Device,
        config: &Config,
        states: Vec<super::FlatState>,
        optimizer_step: u64,
        schedule: &LrSchedule,
        progress: &Progress,
        background: bool,
    ) -> Result<Option<PathBuf>> {
        // at most one save in flight: the next one waits
        self.finish(pg, device)?;
        let p = self.begin(
            pg,
            device,
            config,
            &states,
            optimizer_step,
            schedule,
            progress,
            background,
        )?;
        self.pending = Some(p);
        if background {
            Ok(None)
        } else {
            self.finish(pg, device)
        }
    }

    /// Whether a save is in flight (begun, not yet published).
    pub fn in_flight(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether this rank's file of the save in flight is written, so that `finish` would not wait
    /// for the disk (true when none is in flight).
    pub fn is_written(&self) -> bool {
        self.pending
            .as_ref()
            .is_none_or(|p| p.writer.as_ref().is_none_or(|w| w.is_finished()))
    }

    /// Waits for this rank's file of the save in flight and publishes it (manifest, rename, then
    /// retention in the background). Returns its folder, `None` when none was in flight.
    pub fn finish(&mut self, pg: &ProcessGroup, device: Device) -> Result<Option<PathBuf>> {
        match self.pending.take() {
            Some(p) => self.publish(p, pg, device).map(Some),
            None => Ok(None),
        }
    }

    /// End of training (SIGTERM included): finishes the save in flight (its failure on any rank
    /// fails every rank) and waits for retention (whose failure is a warning).
    pub fn close(&mut self, pg: &ProcessGroup, device: Device) -> Result<()> {
        self.finish(pg, device)?;
        // (rank 0 alone: the janitor is its thread; no collective follows)
        if let Some(e) = self.janitor.final_failure() {
            tracing::warn!(
                "removing old checkpoints (checkpoint.keep_last) failed during the run; these stay on disk, remove them by hand: {e:#}"
            );
        }
        Ok(())
    }

    /// Creates `step-N.partial/` (rank 0; barrier), snapshots this rank's state and starts the
    /// writer thread. `background: false`: the caller must not change the state before `finish`
    /// returns (CPU fp32 state is then written from its own memory, without a copy).
    #[allow(clippy::too_many_arguments)]
    fn begin(
        &mut self,
        pg: &ProcessGroup,
        device: Device,
        config: &Config,
        states: &[super::FlatState],
        optimizer_step: u64,
        schedule: &LrSchedule,
        progress: &Progress,
        background: bool,
    ) -> Result<PendingSave> {
        let started = Instant::now();
        let (rank, world) = (pg.rank(), pg.world_size());
        let root = config.checkpoint.dir.clone();
        let name = super::step_dir_name(progress.step);
        let final_dir = root.join(&name);
        let partial = root.join(format!("{name}.partial"));
        let mut made = Ok(());
        if rank == 0 {
            // a leftover of this step (a crash) may be on the janitor's list: let it go first
            self.janitor.wait_if_deleting(&partial);
            made = std::fs::create_dir_all(&root)
                .with_context(|| format!("creating checkpoint.dir {}", root.display()))
                .and_then(|()| match partial.exists() {
                    true => std::fs::remove_dir_all(&partial)
                        .with_context(|| format!("removing stale {}", partial.display())),
                    false => Ok(()),
                })
                .and_then(|()| {
                    std::fs::create_dir(&partial)
                        .with_context(|| format!("creating {}", partial.display()))
                });
        }
        // (also the barrier: no rank writes into the folder before it exists; a failure on one
        // rank, here or in the snapshot, stops every rank now, not at a collective timeout)
        super::agree(pg, device, made, || {
            format!("rank 0 could not create {}", partial.display())
        })?;
        let snapshot_start = Instant::now();
        let snapshot = self.snapshot(states, background);
        let snapshot = super::agree(pg, device, snapshot, || {
            format!(
                "another rank could not copy its state for checkpoint step {}",
                progress.step
            )
        })?;
        let snapshot_s = snapshot_start.elapsed().as_secs_f64();
        tracing::debug!("rank {rank}: state copied to host memory in {snapshot_s:.3} s");
        let manifest = match rank {
            0 => {
                let mut m = build_manifest(
                    config,
                    states,
                    schedule,
                    optimizer_step,
                    progress,
                    world,
                    vec![],
                );
                m.lineage = Some(self.lineage());
                if let Value::Object(p) = &mut m.prompt {
                    p.extend(self.prompt_notes.clone());
                }
                Some(m)
            }
            _ => None,
        };
        let path = partial.join(rank_file_name(rank, world));
        let step = progress.step;
        let target = if self.fail_write_at == Some(step) {
            tracing::warn!("{FAIL_WRITE_ENV}={step}: writing step {step}'s file to /dev/full");
            PathBuf::from("/dev/full")
        } else {
            path.clone()
        };
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                let t = Instant::now();
                let r = write_rank_file(&target, &snapshot, rank, world, step)
                    .with_context(|| format!("writing {}", path.display()));
                tracing::debug!(
                    "rank {rank}: checkpoint file written in {:.3} s",
                    t.elapsed().as_secs_f64()
                );
                (r, snapshot)
            })?;
        Ok(PendingSave {
            started,
            step,
            root,
            partial,
            final_dir,
            keep_last: config.checkpoint.keep_last,
            claim_unmarked: self.resumed_unmarked,
            manifest,
            writer: Some(writer),
            blocked_s: started.elapsed().as_secs_f64(),
            snapshot_s,
            background,
        })
    }

    /// This rank's ranges of every state tensor, in file order, as contiguous CPU fp32 tensors.
    /// A synchronous save of CPU fp32 state uses the state itself (the caller waits in `finish`
    /// before touching it again); otherwise the values are copied into pooled buffers (torch's
    /// copy: intra-op threads, device-to-host and dtype conversion in one pass).
    fn snapshot(&mut self, states: &[super::FlatState], background: bool) -> Result<Vec<Snap>> {
        self.wait_reserved();
        let mut out = vec![];
        tch::no_grad(|| -> Result<()> {
            for s in states.iter().filter(|s| s.end > s.start) {
                let n = s.end - s.start;
                for (state, t) in STATES.iter().zip(&s.tensors) {
                    let t = t.narrow(0, 0, n).detach(); // (n,)
                    let name = format!("{}/{state}", s.group);
                    if !background
                        && t.device() == Device::Cpu
                        && t.kind() == Kind::Float
                        && t.is_contiguous()
                    {
                        out.push(Snap {
                            name,
                            values: t,
                            pooled: false,
                        });
                        continue;
                    }
                    let mut buf = match self.pool.iter().position(|b| b.numel() == n as usize) {
                        Some(i) => self.pool.swap_remove(i),
                        None => Tensor::f_empty([n], (Kind::Float, Device::Cpu))?,
                    };
                    buf.f_copy_(&t)?;
                    out.push(Snap {
                        name,
                        values: buf,
                        pooled: true,
                    });
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Waits for the writer, exchanges sizes and checksums (an all-gather, which is also the
    /// barrier after the data files), and on rank 0 writes the manifest, renames the folder and
    /// starts retention; rank 0 then broadcasts whether that worked.
    fn publish(&mut self, p: PendingSave, pg: &ProcessGroup, device: Device) -> Result<PathBuf> {
        let partial = p.partial.clone();
        let mut gathered = false;
        let published = self.publish_gathered(p, pg, device, &mut gathered);
        // a failed save's files go (a full disk may be why it failed, and the next save at
        // another step would need the room): once every rank's writer has finished, which the
        // all-gather after each joined its own says
        if published.is_err() && gathered && pg.rank() == 0 && partial.exists() {
            if let Err(e) = std::fs::remove_dir_all(&partial) {
                tracing::warn!("removing the failed save {}: {e}", partial.display());
            }
        }
        published
    }

    fn publish_gathered(
        &mut self,
        mut p: PendingSave,
        pg: &ProcessGroup,
        device: Device,
        gathered: &mut bool,
    ) -> Result<PathBuf> {
        let publish_start = Instant::now();
        let (rank, world) = (pg.rank(), pg.world_size());
        let (written, snapshot) = p
            .writer
            .take()
            .expect("a pending save has a writer")
            .join()
            .unwrap_or_else(|_| {
                let e = anyhow!("the checkpoint writer thread panicked");
                (Err(e), vec![])
            });
        // the buffers serve the next save
        self.pool
            .extend(snapshot.into_iter().filter(|s| s.pooled).map(|s| s.values));
        let write_wait_s = publish_start.elapsed().as_secs_f64();
        let janitor_failed = if rank == 0 {
            self.janitor.take_failure()
        } else {
            None
        };
        // (bytes or -1 on failure, sha256 as 4 x i64); a failed retention is rank 0's warning only
        const ROW: usize = 5;
        let mut mine = vec![-1i64, 0, 0, 0, 0];
        if let Ok((bytes, digest)) = &written {
            mine[0] = *bytes as i64;
            for (i, c) in digest.chunks(8).enumerate() {
                mine[1 + i] = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        let input = Tensor::from_slice(&mine).to_device(device); // (ROW,)
        let all = Tensor::zeros([(ROW * world) as i64], (Kind::Int64, device)); // (W*ROW,)
        pg.all_gather_into(&all, &input)?;
        *gathered = true;
        let all: Vec<i64> = Vec::try_from(&all.to_device(Device::Cpu))?;
        written?;
        if let Some(r) = (0..world).find(|r| all[r * ROW] < 0) {
            return Err(crate::dist::FailedElsewhere {
                what: format!(
                    "rank {r} could not write its file of checkpoint step {}",
                    p.step
                ),
                rank: Some(r),
            }
            .into());
        }
        // an old checkpoint that could not be removed (e.g. busy on NFS) stays on disk; this
        // save goes on (failing it would lose its progress for a cleanup)
        if let Some(e) = janitor_failed {
            tracing::warn!(
                "removing old checkpoints (checkpoint.keep_last) failed, they stay on disk: {e:#}"
            );
        }
        let first_attempt = std::env::var("TORCHELASTIC_RESTART_COUNT").map_or(true, |c| c == "0");
        if first_attempt && env_step(CRASH_ENV) == Some(p.step) {
            tracing::warn!("{CRASH_ENV}={}: exiting before the manifest", p.step);
            std::process::exit(86);
        }
        // Rank 0 publishes (manifest, rename, retention) and then tells every rank whether that
        // worked: with a plain barrier, a rank 0 that failed here left the others to time out and
        // report a dead peer instead of the cause.
        let published = if rank == 0 {
            let mut write_and_rename = || -> Result<()> {
                let mut manifest = p.manifest.take().expect("rank 0 builds the manifest");
                manifest.files = (0..world)
                    .map(|r| {
                        let row = &all[r * ROW..r * ROW + ROW];
                        let digest: Vec<u8> =
                            row[1..5].iter().flat_map(|v| v.to_le_bytes()).collect();
                        FileEntry {
                            file: rank_file_name(r, world),
                            bytes: row[0] as u64,
                            sha256: super::hex(&digest),
                        }
                    })
                    .collect();
                let (partial, final_dir, root) = (&p.partial, &p.final_dir, &p.root);
                let text = serde_json::to_string_pretty(&manifest)?;
                let mpath = if env_step(FAIL_MANIFEST_ENV) == Some(p.step) {
                    tracing::warn!(
                        "{FAIL_MANIFEST_ENV}={}: writing the manifest to /dev/full",
                        p.step
                    );
                    PathBuf::from("/dev/full")
                } else {
                    partial.join("manifest.json")
                };
                write_synced(&mpath, text.as_bytes())?;
                write_synced(
                    &partial.join(super::manifest::CHECKSUM_FILE),
                    super::manifest::checksum_line(text.as_bytes()).as_bytes(),
                )?;
                fsync_dir(partial)?;
                let lineage = manifest.lineage.as_deref();
                if let RunOf::Other(l) = run_of(final_dir, lineage, p.claim_unmarked) {
                    // another run's checkpoint of this step (one started over in the same folder):
                    // kept under another name (which listing and retention ignore), not replaced
                    let aside = aside_name(final_dir, &l);
                    tracing::warn!(
                        "{} holds another run's checkpoint (lineage {l}): moved to {} instead of being replaced",
                        final_dir.display(),
                        aside.display()
                    );
                    move_aside_and_publish(final_dir, &aside, partial)?;
                } else if final_dir.exists() && !final_dir.join("manifest.json").exists() {
                    // a step folder damaged after it was saved (no manifest; `list_dir` leaves
                    // it alone): kept under another name, not replaced into a `.partial` name
                    // that retention would delete
                    let aside = unused_name(&format!("{}.damaged", final_dir.display()));
                    tracing::warn!(
                        "{} has no manifest.json: moved to {} before this step is saved again",
                        final_dir.display(),
                        aside.display()
                    );
                    move_aside_and_publish(final_dir, &aside, partial)?;
                } else if final_dir.exists() {
                    // the same step saved again: never a moment without a complete step folder
                    replace_dir(partial, final_dir)?;
                } else {
                    std::fs::rename(partial, final_dir).with_context(|| {
                        format!("renaming {} to {}", partial.display(), final_dir.display())
                    })?;
                }
                // (published: a folder sync that fails now is a warning, like what follows)
                if let Err(e) = fsync_dir(root) {
                    tracing::warn!("checkpoint {} is published, but {e}", final_dir.display());
                }
                // The checkpoint is complete and durable; old ones go in the background. From
                // here on an error is a warning (kept, reported after the next save and at the
                // end), never a failure: the step folder is committed, and a listing that fails
                // on a flaky mount must neither stop the run nor tell every rank it was not saved.
                let kept = self.protected.map(|s| root.join(super::step_dir_name(s)));
                let doomed = retention(
                    root,
                    (p.keep_last, kept.as_deref()),
                    final_dir,
                    manifest.lineage.as_deref(),
                    p.claim_unmarked,
                )
                .unwrap_or_else(|e| {
                    let e = e.context("checkpoint retention");
                    self.janitor.failed.get_or_insert(e);
                    Vec::new()
                });
                let n_doomed = doomed.len();
                if let Err(e) = self.janitor.start(doomed) {
                    let e = e.context("starting the checkpoint retention thread");
                    self.janitor.failed.get_or_insert(e);
                }
                let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
                let how = if p.background {
                    format!(
                        "in the background, {:.3} s blocking training",
                        p.blocked_s + publish_start.elapsed().as_secs_f64()
                    )
                } else {
                    "synchronously".into()
                };
                tracing::info!(
                    "checkpoint {} saved: {:.1} MB in {:.2} s ({how})",
                    final_dir.display(),
                    total as f64 / 1e6,
                    p.started.elapsed().as_secs_f64(),
                );
                tracing::debug!(
                    "checkpoint step {}: begin {:.3} s (snapshot {:.3} s), waited {write_wait_s:.3} s for the file, published in {:.3} s; removing {n_doomed} folder(s) in the background",
                    p.step,
                    p.blocked_s,
                    p.snapshot_s,
                    publish_start.elapsed().as_secs_f64() - write_wait_s
                );
                Ok(())
            };
            write_and_rename()
        } else {
            Ok(())
        };
        super::agree(pg, device, published, || {
            format!(
                "rank 0 could not publish checkpoint step {} (manifest or rename; its error is in rank 0's log); the earlier checkpoints are intact",
                p.step
            )
        })?;
        Ok(p.final_dir.clone())
    }
}

/// What the writer thread returns: (bytes, sha256) of the file, and the snapshot (its buffers go
/// back to the pool).
type Written = (Result<(u64, Vec<u8>)>, Vec<Snap>);

/// A save whose rank file is being written by a background thread.
struct PendingSave {
    started: Instant,
    step: u64,
    root: PathBuf,
    partial: PathBuf,
    final_dir: PathBuf,
    keep_last: usize,
    /// Whether retention may remove checkpoints without a lineage ([`Checkpointer::continue_lineage`]).
    claim_unmarked: bool,
    /// Rank 0: the manifest without `files`.
    manifest: Option<Manifest>,
    writer: Option<JoinHandle<Written>>,
    /// Seconds the training thread spent in `begin` (barrier, snapshot to host memory).
    blocked_s: f64,
    snapshot_s: f64,
    background: bool,
}

/// Bytes between writeback starts (`write_with_writeback`).
const WRITEBACK_CHUNK: usize = 64 << 20;

/// Writes `parts` one after the other, asking the kernel after every [`WRITEBACK_CHUNK`] bytes
/// to start writing them to disk (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`, a hint that
/// does not wait): with plenty of free memory nothing would reach the disk before the final
/// fsync, which would then write everything while nothing else happens.
fn write_with_writeback(file: &mut std::fs::File, parts: &[&[u8]]) -> std::io::Result<()> {
    let (mut flushed, mut pending) = (0u64, 0usize);
    for p in parts {
        for c in p.chunks(WRITEBACK_CHUNK) {
            file.write_all(c)?;
            pending += c.len();
            if pending >= WRITEBACK_CHUNK {
                start_writeback(file, flushed, pending);
                flushed += pending as u64;
                pending = 0;
            }
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; its result is only a hint's (ignored: the
    // fsync that follows reports real write errors).
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: usize) {}

/// One state tensor's values for the writer thread: `values` is a contiguous CPU fp32 tensor
/// (n,): a pooled copy (`pooled`), or the state itself during a synchronous save.
struct Snap {
    name: String,
    values: Tensor,
    pooled: bool,
}

impl Snap {
    fn bytes(&self) -> &[u8] {
        #[cfg(not(target_endian = "little"))]
        compile_error!(
            "checkpoint files are little-endian: add a byte-swapping path for this target"
        );
        // SAFETY: a contiguous CPU fp32 tensor of numel() elements starts at data_ptr() (a
        // narrowed view's offset included) and is kept alive by `self`; pooled buffers belong to
        // this save alone, and nothing writes to the state of a synchronous save before `finish`
        // returns (see `Checkpointer::snapshot`).
        unsafe {
            std::slice::from_raw_parts(self.values.data_ptr() as *const u8, self.values.numel() * 4)
        }
    }
}

/// Writes the safetensors file of this rank's ranges (`tensors` in file order); returns
/// (bytes, sha256).
fn write_rank_file(
    path: &Path,
    tensors: &[Snap],
    rank: usize,
    world: usize,
    step: u64,
) -> Result<(u64, Vec<u8>)> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": FORMAT, "version": VERSION.to_string(), "rank": rank.to_string(),
               "world_size": world.to_string(), "step": step.to_string()}),
    );
    let mut offset = 0usize;
    for s in tensors {
        let n = s.values.numel();
        header.insert(
            s.name.clone(),
            json!({"dtype": "F32", "shape": [n], "data_offsets": [offset * 4, (offset + n) * 4]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let len = (head.len() as u64).to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![&len, &head];
    parts.extend(tensors.iter().map(Snap::bytes));
    let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut file = std::fs::File::create(path)?;
    // The sha256 runs on a second thread over the same memory while this one writes: the
    // checksum costs max(hash, write) instead of their sum. The data is written straight from the
    // snapshot (no staging buffer), then fsynced once, as `dd conv=fdatasync` does; the disk
    // starts on each chunk while the next one is copied into the page cache.
    let digest = std::thread::scope(|s| -> Result<Vec<u8>> {
        let hasher = s.spawn(|| {
            let mut h = Sha256::new();
            for p in &parts {
                h.update(p);
            }
            h.finalize().to_vec()
        });
        let written = write_with_writeback(&mut file, &parts).and_then(|()| file.sync_all());
        let digest = hasher
            .join()
            .map_err(|_| anyhow::anyhow!("the checksum thread panicked"))?;
        written?;
        Ok(digest)
    })?;
    Ok((bytes, digest))
}

fn build_manifest(
    config: &Config,
    states: &[super::FlatState],
    schedule: &LrSchedule,
    optimizer_step: u64,
    p: &Progress,
    world: usize,
    files: Vec<FileEntry>,
) -> Manifest {
    let mut tensors = vec![];
    for s in states {
        let mut shards: Vec<ShardEntry> = (0..world)
            .map(|r| (r, s.range_of(r)))
            .filter(|(_, (a, b))| b > a)
            .map(|(r, (start, end))| ShardEntry {
                file: rank_file_name(r, world),
                start,
                end,
            })
            .collect();
        // in element order (hybrid_shard's ranks write pieces out of rank order)
        shards.sort_by_key(|s| s.start);
        for state in STATES {
            tensors.push(TensorEntry {
                name: format!("{}/{state}", s.group),
                group: s.group.clone(),
                state: state.into(),
                dtype: "F32".into(),
                shape: vec![s.numel],
                params: s.params.clone(),
                shards: shards.clone(),
            });
        }
    }
    // tensors whose own AdamW step count differs from the global one, by parameter name (so any
    // layout of the loading run can find them)
    let optimizer_steps = states
        .iter()
        .filter_map(|s| Some(s.params.iter().zip(s.optimizer_steps.as_ref()?)))
        .flatten()
        .filter(|(_, &n)| n != optimizer_step)
        .map(|(p, &n)| (p.name.clone(), n))
        .collect();
    let id = identity(config);
    let t = &config.train;
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        step: p.step,
        optimizer_step,
        optimizer_steps,
        epoch: p.epoch,
        data: DataPosition {
            epoch: p.data_epoch,
            batch: p.data_batch,
            global_batch: t.global_batch(world),
            micro_batch: Some(t.batch_size),
            drop_last: Some(t.drop_last),
            samples: p.samples,
            lengths_hash: p.lengths_hash,
        },
        world_size: world,
        seed: t.seed,
        skipped_nonfinite: p.skipped_nonfinite,
        loss: p.loss.filter(|l| l.is_finite()),
        scheduler: schedule.to_json(),
        optimizer: crate::optim::AdamWConfig::for_training(config).to_json(),
        rng: "dropout is reseeded from train.seed and the step number each step; no other random state".into(),
        // absolute: an exported adapter's base_model_name_or_path and `infer --checkpoint` read
        // it from other working directories (a relative one would be taken for a Hub repo id)
        model_path: std::fs::canonicalize(&config.model.path)
            .unwrap_or_else(|_| config.model.path.clone())
            .display()
            .to_string(),
        config_hash: identity_hash(&id),
        config: id,
        peft: serde_json::to_value(&config.peft).unwrap_or(Value::Null),
        model_config: std::fs::read(config.model.path.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null),
        // (computed once per run: the base does not change under it)
        model_tensors_sampled: super::fingerprint::base_tensors(&config.model.path)
            .unwrap_or_default(),
        prompt: serde_json::json!({
            "double_bos": config.data.double_bos,
            "image_placeholder": config.data.image_placeholder,
            // (the training objective's turns; a resume with another is noted)
            "supervise": config.data.supervise,
        }),
        tensors,
        files,
        launch_id: launch_id(),
        output_dir_from_checkpoint_dir: Some(super::output_dir_from_checkpoint_dir(config)),
        lineage: None,
        best_eval: p.best_eval,
        template_clock: Some(crate::data::template::template_clock()),
    }
}

/// This launcher invocation's id (`LLAVA_SCO_LAUNCH_ID`); under another launcher (torchrun)
/// its run id (`TORCHELASTIC_RUN_ID`, which two launches may share), if any.
pub(crate) fn launch_id() -> Option<String> {
    // (torchrun's default --rdzv-id is "none", shared by every launch that does not set one)
    [launcher::env::LAUNCH_ID_VAR, "TORCHELASTIC_RUN_ID"]
        .iter()
        .find_map(|v| {
            std::env::var(v)
                .ok()
                .filter(|id| !id.is_empty() && id != "none")
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::retention::set_aside_later;
    use crate::checkpoint::{list_dir, load, manifest::ParamEntry, FlatState};

    /// A world-1 process group and the config of a run checkpointing into a fresh `name` folder.
    pub(crate) fn setup(name: &str, keep_last: usize) -> (ProcessGroup, Config, LrSchedule) {
        let dir = std::env::temp_dir().join(format!("ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let yaml = format!(
            "model: {{path: unit-test-model, dtype: fp32}}\n\
             peft: {{method: none}}\n\
             data: {{train: none.jsonl, image_root: .}}\n\
             train: {{batch_size: 1}}\n\
             checkpoint: {{dir: {}, keep_last: {keep_last}, resume: never}}\n",
            dir.display()
        );
        let config = crate::config::parse(&yaml, &[]).unwrap();
        let pg = ProcessGroup::from_env(
            crate::dist::Backend::Cpu,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let schedule = LrSchedule::new(config.train.lr, &config.train.schedule, 100);
        (pg, config, schedule)
    }

    /// Two flat groups of two parameters each (shapes [3, 5] + [7] and [4] + [2, 2]), the
    /// element range [start, end) of each (None: all), values `base + index` per state.
    pub(crate) fn states(base: f32, range: impl Fn(i64) -> (i64, i64)) -> Vec<FlatState> {
        let groups = [
            ("a/0", vec![("a.w", vec![3i64, 5]), ("a.b", vec![7])]),
            ("b/1", vec![("b.w", vec![4]), ("b.v", vec![2, 2])]),
        ];
        groups
            .iter()
            .map(|(group, params)| {
                let mut offset = 0;
                let params: Vec<ParamEntry> = params
                    .iter()
                    .map(|(name, shape)| {
                        let p = ParamEntry {
                            name: name.to_string(),
                            shape: shape.clone(),
                            offset,
                        };
                        offset += p.numel();
                        p
                    })
                    .collect();
                let (start, end) = range(offset);
                let t = |k: f32| {
                    Tensor::arange_start(start, end, (Kind::Float, Device::Cpu))
                        + f64::from(base + k)
                };
                FlatState {
                    group: group.to_string(),
                    numel: offset,
                    shard_len: end - start,
                    shard_world: 1,
                    replicas: 1,
                    params,
                    start,
                    end,
                    tensors: [t(0.0), t(100.0), t(200.0)],
                    optimizer_steps: None,
                }
            })
            .collect()
    }

    pub(crate) fn progress(step: u64) -> Progress {
        Progress {
            step,
            ..Default::default()
        }
    }

    fn whole(n: i64) -> (i64, i64) {
        (0, n)
    }

    /// The state tensors `dir` holds, loaded into fresh ones.
    fn loaded(dir: &Path) -> Vec<FlatState> {
        let target = states(-1000.0, whole);
        let m = load::read_manifest(dir).unwrap();
        load::fill_states(dir, &m, &target).unwrap();
        target
    }

    fn assert_states_eq(a: &[FlatState], b: &[FlatState]) {
        for (x, y) in a.iter().zip(b) {
            for (u, v) in x.tensors.iter().zip(&y.tensors) {
                assert!(u.equal(v), "{}: {u} vs {v}", x.group);
            }
        }
    }

    fn folders(config: &Config) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&config.checkpoint.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A parameter that missed AdamW steps (no gradient) keeps its own count through a save and
    /// load, by name; the others (and every parameter of a manifest without the map) take the
    /// global count.
    #[test]
    fn per_parameter_optimizer_steps_round_trip() {
        let (pg, config, schedule) = setup("param-steps", 0);
        let mut saves = Checkpointer::new();
        let mut live = states(1.0, whole);
        live[0].optimizer_steps = Some(vec![7, 9]);
        let dir = saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                live,
                9,
                &schedule,
                &progress(9),
                false,
            )
            .unwrap()
            .unwrap();
        let mut m = load::read_manifest(&dir).unwrap();
        assert_eq!(m.optimizer_steps, [("a.w".to_string(), 7)].into());
        let target = states(0.0, whole);
        assert_eq!(load::param_steps(&m, &target), [vec![7, 9], vec![9, 9]]);
        m.optimizer_steps.clear(); // an older trainer's manifest
        assert_eq!(load::param_steps(&m, &target), [vec![9, 9], vec![9, 9]]);
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        assert!(text.contains("\"optimizer_steps\""), "{text}");
    }

    #[test]
    fn background_save_writes_the_snapshot_and_reuses_its_buffers() {
        let (pg, config, schedule) = setup("background", 0);
        let mut saves = Checkpointer::new();
        let live = states(1.0, whole);
        let copy = |s: &[FlatState]| {
            states(0.0, whole)
                .into_iter()
                .zip(s)
                .map(|(mut f, g)| {
                    f.tensors = [
                        g.tensors[0].shallow_clone(),
                        g.tensors[1].shallow_clone(),
                        g.tensors[2].shallow_clone(),
                    ];
                    f
                })
                .collect::<Vec<_>>()
        };
        let r = saves.save_states(
            &pg,
            Device::Cpu,
            &config,
            copy(&live),
            1,
            &schedule,
            &progress(1),
            true,
        );
        assert_eq!(
            r.unwrap(),
            None,
            "a background save returns before publishing"
        );
        assert!(saves.in_flight());
        // training changes the state right away: the checkpoint holds the values at the save
        for s in &live {
            for t in &s.tensors {
                let mut t = t.shallow_clone();
                let _ = t.fill_(-5.0);
            }
        }
        let dir = saves.finish(&pg, Device::Cpu).unwrap().unwrap();
        assert!(!saves.in_flight());
        assert_states_eq(&loaded(&dir), &states(1.0, whole));
        let ptrs = |s: &Checkpointer| {
            let mut v: Vec<usize> = s.pool.iter().map(|t| t.data_ptr() as usize).collect();
            v.sort();
            v
        };
        let first = ptrs(&saves);
        assert_eq!(first.len(), 6, "2 groups x 3 states");
        // the next save copies into the same buffers, and completes the one in flight first
        saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                copy(&live),
                2,
                &schedule,
                &progress(2),
                true,
            )
            .unwrap();
        assert!(
            saves.pool.is_empty(),
            "the save in flight holds the buffers"
        );
        saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                copy(&live),
                3,
                &schedule,
                &progress(3),
                true,
            )
            .unwrap();
        assert!(
            config
                .checkpoint
                .dir
                .join("step-00000002/manifest.json")
                .exists(),
            "at most one save in flight: the second was published when the third began"
        );
        saves.close(&pg, Device::Cpu).unwrap();
        assert_eq!(ptrs(&saves), first, "snapshot buffers are reused");
        let dir = config.checkpoint.dir.join("step-00000003");
        assert_states_eq(&loaded(&dir), &live);
        std::fs::remove_dir_all(&config.checkpoint.dir).unwrap();
    }

    /// A fresh folder `ckpt-<name>-<pid>` with a `step-N` folder holding `manifest` per entry.
    fn step_folders(name: &str, steps: &[(u64, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for &(n, manifest) in steps {
            let d = root.join(super::super::step_dir_name(n));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("manifest.json"), manifest).unwrap();
        }
        root
    }

    /// A resume from step 100 of run L moves L's later checkpoints aside (kept, out of listing
    /// and retention); another run's and earlier ones stay.
    #[test]
    fn a_resume_from_an_older_step_sets_the_later_ones_of_its_run_aside() {
        let l = r#"{"lineage": "L"}"#;
        let root = step_folders(
            "abandon",
            &[(100, l), (150, l), (200, l), (180, r#"{"lineage": "M"}"#)],
        );
        let moved = set_aside_later(&root, 100, "L");
        let names: Vec<String> = moved
            .iter()
            .map(|(_, to)| to.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "step-00000150.abandoned-at-100",
                "step-00000200.abandoned-at-100"
            ]
        );
        let (complete, partial) = list_dir(&root).unwrap();
        let steps: Vec<u64> = complete.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [100, 180]);
        assert!(partial.is_empty());
        assert!(root
            .join("step-00000200.abandoned-at-100/manifest.json")
            .is_file());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn retention_keeps_the_checkpoint_just_saved_even_when_newer_ones_exist() {
        // resumed from step 100 while an abandoned step 200 is still there, keep_last 1
        let root = step_folders("keep", &[(100, "{}"), (150, "{}"), (200, "{}")]);
        let just_saved = root.join("step-00000150");
        let doomed = retention(&root, (1, None), &just_saved, None, true).unwrap();
        assert_eq!(doomed, [root.join("step-00000100")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// When a validation moves the protection to a newer best, the old best goes unless it is
    /// among the newest `keep_last` of the run (another run's is never touched).
    #[test]
    fn the_old_best_goes_once_a_newer_best_is_protected() {
        for (keep, gone) in [(1, true), (2, false)] {
            let root = step_folders(&format!("retire-{keep}"), &[(100, "{}"), (200, "{}")]);
            let mut saves = Checkpointer::new();
            saves.continue_lineage(None); // (unmarked folders count as this run's)
            saves.protect(Some(200));
            saves.retire_unprotected(&root, keep);
            saves.janitor.wait();
            assert_eq!(
                !root.join("step-00000100").exists(),
                gone,
                "keep_last {keep}"
            );
            assert!(root.join("step-00000200").exists());
            std::fs::remove_dir_all(&root).unwrap();
        }
        let other = r#"{"lineage": "M"}"#;
        let root = step_folders("retire-other", &[(100, other), (200, "{}")]);
        let mut saves = Checkpointer::new();
        saves.continue_lineage(None);
        saves.protect(Some(200));
        saves.retire_unprotected(&root, 1);
        saves.janitor.wait();
        assert!(root.join("step-00000100").exists(), "another run's");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The protected checkpoint (the best epoch's) is kept besides the newest `keep_last`.
    #[test]
    fn retention_keeps_the_protected_checkpoint_besides_the_newest() {
        let root = step_folders("protect", &[(100, "{}"), (150, "{}"), (200, "{}")]);
        let (best, newest) = (root.join("step-00000100"), root.join("step-00000200"));
        let doomed = retention(&root, (1, Some(&best)), &newest, None, true).unwrap();
        assert_eq!(doomed, [root.join("step-00000150")]);
        let doomed = retention(&root, (1, None), &newest, None, true).unwrap();
        assert_eq!(doomed, [best, root.join("step-00000150")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Retention removes only this training run's old checkpoints: another run's in the same
    /// folder, or one whose manifest cannot be read, stay; so do an older trainer's (no lineage)
    /// unless this run resumed from one of them.
    #[test]
    fn retention_keeps_other_runs_checkpoints() {
        let root = step_folders(
            "lineage",
            &[
                (100, r#"{"lineage": "other"}"#),
                (120, "not json"),
                (150, r#"{"lineage": "ours"}"#),
                (180, "{}"),
                (200, r#"{"lineage": "ours"}"#),
                (300, r#"{"lineage": "other"}"#),
            ],
        );
        let just_saved = root.join("step-00000200");
        let doomed = retention(&root, (1, None), &just_saved, Some("ours"), false).unwrap();
        assert_eq!(doomed, [root.join("step-00000150")]);
        let doomed = retention(&root, (1, None), &just_saved, Some("ours"), true).unwrap();
        assert_eq!(
            doomed,
            [root.join("step-00000150"), root.join("step-00000180")]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Retention removes `.partial` folders and this run's old checkpoints only: a step folder
    /// without a manifest (damaged by something else; its rank files may be all that is left of
    /// a step), the folder just saved whatever it looks like, and one whose manifest cannot be
    /// looked at (here ENOTDIR, standing for EIO or a stale NFS handle) are left alone.
    #[test]
    fn retention_removes_only_folders_known_to_be_incomplete() {
        let root = std::env::temp_dir().join(format!("ckpt-uncertain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("step-00000100")).unwrap(); // no manifest
        std::fs::create_dir_all(root.join("step-00000200")).unwrap(); // just saved, manifest gone
        std::fs::write(
            root.join("step-00000300"),
            "a file: its manifest cannot be stat'ed",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("step-00000400.partial")).unwrap();
        let doomed = retention(&root, (1, None), &root.join("step-00000200"), None, true).unwrap();
        assert_eq!(doomed, [root.join("step-00000400.partial")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn replacing_a_step_folder_puts_the_new_one_in_place() {
        let root = std::env::temp_dir().join(format!("ckpt-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (new, dest) = (
            root.join("step-00000005.partial"),
            root.join("step-00000005"),
        );
        for (d, text) in [(&new, "new"), (&dest, "old")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("manifest.json"), text).unwrap();
        }
        replace_dir(&new, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("manifest.json")).unwrap(),
            "new"
        );
        // the old folder, if still there, carries a `.partial` name (retention removes it)
        let (complete, _) = list_dir(&root).unwrap();
        assert_eq!(complete, [(5, dest.clone())]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A synchronous save of step `step` (state `states(step, whole)`).
    fn save_whole(
        saves: &mut Checkpointer,
        pg: &ProcessGroup,
        config: &Config,
        schedule: &LrSchedule,
        step: u64,
    ) {
        let st = states(step as f32, whole);
        saves
            .save_states(
                pg,
                Device::Cpu,
                config,
                st,
                step,
                schedule,
                &progress(step),
                false,
            )
            .unwrap();
    }

    /// A leftover that cannot be removed (here a file with a `.partial` name: remove_dir_all
    /// fails on it, also as root) neither keeps the old checkpoints listed after it on disk nor
    /// goes unreported: the end of training warns again, naming it, though a save reported it
    /// already; the run does not fail for it.
    #[test]
    fn retention_removes_what_it_can_and_reports_the_rest_at_the_end() {
        let (pg, config, schedule) = setup("retention-stuck", 1);
        let root = config.checkpoint.dir.clone();
        std::fs::create_dir_all(&root).unwrap();
        let stuck = root.join("step-00000000.partial");
        std::fs::write(&stuck, "not a folder").unwrap();
        let mut saves = Checkpointer::new();
        for step in [1, 2, 3] {
            save_whole(&mut saves, &pg, &config, &schedule, step);
        }
        let err = format!("{:#}", saves.janitor.final_failure().unwrap());
        assert!(err.contains("step-00000000.partial"), "{err}");
        saves.close(&pg, Device::Cpu).unwrap();
        assert_eq!(folders(&config), ["step-00000000.partial", "step-00000003"]);
        assert!(stuck.is_file());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn retention_runs_in_the_background_and_keeps_the_newest() {
        let (pg, config, schedule) = setup("retention", 1);
        let root = config.checkpoint.dir.clone();
        let mut saves = Checkpointer::new();
        let (open, gate) = std::sync::mpsc::channel();
        saves.janitor.gate = Some(gate);
        for step in [1, 2] {
            save_whole(&mut saves, &pg, &config, &schedule, step);
        }
        // the second save returned while its retention (step 1) waits at the gate: deletion is
        // not on the training thread
        assert_eq!(folders(&config), ["step-00000001", "step-00000002"]);
        drop(open);
        // a crash's leftover; the next save lists it, step 2 but not step 3 (the newest)
        std::fs::create_dir_all(root.join("step-00000007.partial")).unwrap();
        saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                states(3.0, whole),
                3,
                &schedule,
                &progress(3),
                false,
            )
            .unwrap();
        saves.close(&pg, Device::Cpu).unwrap();
        assert_eq!(folders(&config), ["step-00000003"]);
        assert_states_eq(&loaded(&root.join("step-00000003")), &states(3.0, whole));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_background_write_is_reported_at_the_next_save() {
        let (pg, config, schedule) = setup("fail-next", 2);
        let mut saves = Checkpointer::new();
        saves.fail_write_at = Some(2);
        let save = |saves: &mut Checkpointer, step: u64| {
            saves.save_states(
                &pg,
                Device::Cpu,
                &config,
                states(step as f32, whole),
                step,
                &schedule,
                &progress(step),
                true,
            )
        };
        save(&mut saves, 1).unwrap();
        save(&mut saves, 2).unwrap();
        let e = format!("{:#}", save(&mut saves, 3).unwrap_err());
        assert!(
            e.contains("writing") && e.contains("step-00000002.partial/rank-0-of-1.safetensors"),
            "{e}"
        );
        assert!(e.contains("No space left on device"), "{e}");
        // the earlier checkpoint is intact; the failed one's folder is removed
        assert_eq!(folders(&config), ["step-00000001"]);
        assert_states_eq(
            &loaded(&config.checkpoint.dir.join("step-00000001")),
            &states(1.0, whole),
        );
        std::fs::remove_dir_all(&config.checkpoint.dir).unwrap();
    }

    #[test]
    fn a_failed_background_write_is_reported_at_the_end() {
        let (pg, config, schedule) = setup("fail-end", 2);
        let mut saves = Checkpointer::new();
        saves.fail_write_at = Some(5);
        saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                states(5.0, whole),
                5,
                &schedule,
                &progress(5),
                true,
            )
            .unwrap();
        let e = format!("{:#}", saves.close(&pg, Device::Cpu).unwrap_err());
        assert!(e.contains("No space left on device"), "{e}");
        assert!(folders(&config).is_empty());
        std::fs::remove_dir_all(&config.checkpoint.dir).unwrap();
    }

    #[test]
    fn direct_and_buffered_loads_agree_at_any_range() {
        let (pg, config, schedule) = setup("fill", 0);
        let mut saves = Checkpointer::new();
        let dir = saves
            .save_states(
                &pg,
                Device::Cpu,
                &config,
                states(0.5, whole),
                1,
                &schedule,
                &progress(1),
                false,
            )
            .unwrap()
            .unwrap();
        let m = load::read_manifest(&dir).unwrap();
        // every rank's range at world 3 (resharding a world-1 checkpoint), both copy paths
        for r in 0..3 {
            let range = |n: i64| {
                let s = (n + 2) / 3;
                ((s * r).min(n), (s * (r + 1)).min(n))
            };
            let direct = states(-1.0, range);
            let buffered = states(-2.0, range);
            load::fill_states_with(&dir, &m, &direct, load::Fill::Direct).unwrap();
            load::fill_states_with(&dir, &m, &buffered, load::Fill::Buffered).unwrap();
            assert_states_eq(&direct, &states(0.5, range));
            assert_states_eq(&buffered, &direct);
        }
        std::fs::remove_dir_all(&config.checkpoint.dir).unwrap();
    }
}
