//! Finding and loading checkpoints. Every rank reads `manifest.json`, checks the format version,
//! the model/LoRA identity and that every file exists with its recorded size; then, for each of
//! its trainable flat tensors, it fills its own element range parameter by parameter from
//! wherever the manifest says those elements live (any saved world size), reading only those
//! byte ranges of the memory-mapped rank files. Every file it reads is verified against its
//! sha256 on other threads while the ranges are copied (straight into CPU fp32 state, without a
//! staging buffer); a mismatch fails the load before the state is used. A failure on any rank
//! fails every rank (a flag is all-reduced), so no rank waits forever.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::manifest::{FileEntry, Manifest, FORMAT, STATES, VERSION};
use super::reader::Reader;
pub use super::reader::{read_full, TrainedParams};
use super::{flat_states, identity, list_dir, DataPlan, Progress, StatesFor};
use crate::config::{Config, Resume};
use crate::dist::{ProcessGroup, ReduceOp};
use crate::fsdp::Trainable;
use crate::optim::AdamW;

const FIX: &str =
    "start over with `--set checkpoint.resume=never` (or point checkpoint.dir elsewhere)";

/// A checkpoint folder whose files are missing, truncated, corrupt or not what its manifest says,
/// in words that fit every reader: each caller adds its own way on (`resume_advice` for a
/// training run's resume, `for_reading` for infer, eval and export).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Damaged(pub String);

/// A checkpoint of another format version (every step folder of its run has it): the message
/// names the trainer to use; a resume adds starting over.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OtherVersion(pub String);

pub(super) fn damaged(what: String) -> anyhow::Error {
    anyhow::Error::new(Damaged(what))
}

fn is_damaged(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Damaged>())
}

/// A resume's error with its ways on when the checkpoint is damaged: another step folder (the
/// complete one before it, named) or starting over.
fn resume_advice(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if e.chain().any(|c| c.is::<OtherVersion>()) {
        return anyhow!("{e:#}, or {FIX}");
    }
    if !is_damaged(&e) {
        return e;
    }
    let another = match older_checkpoint(dir) {
        Some(older) => format!(
            "resume from another `step-N` folder, e.g. the one before it: \
             `--set checkpoint.resume={}`",
            older.display()
        ),
        None => "resume from another `step-N` folder with `--set checkpoint.resume=DIR`".into(),
    };
    anyhow!("{e:#}; {another}, or {FIX}")
}

/// What `resume` restored.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub dir: PathBuf,
    pub progress: Progress,
    pub world_size: usize,
    /// `train.batch_size` when saved (None from older trainers).
    pub micro_batch: Option<usize>,
    /// `data.supervise` when saved ("all" for older trainers, which had no other).
    pub supervise: serde_json::Value,
    /// The learning-rate schedule the checkpoint was trained with (`LrSchedule::to_json`).
    pub scheduler: serde_json::Value,
    /// Its peft section as written (`Manifest::peft`).
    pub peft: serde_json::Value,
    /// AdamW's settings it was trained with (`AdamWConfig::to_json`; null from older trainers).
    pub optimizer: serde_json::Value,
    /// Its training run (`Manifest::lineage`), which this run's saves continue.
    pub lineage: Option<String>,
    /// The chat template's clock it was trained with (`Manifest::template_clock`).
    pub template_clock: Option<i64>,
    /// Whether the folder holds the validation record of its own step (`validation.json`).
    pub validated: bool,
}

/// The newest complete checkpoint in `dir` as rank 0 sees it, on every rank: ranks may see the
/// folder differently (a node's cached view of shared storage right after a restart), and two
/// ranks loading different steps, or one starting fresh, would train on out of step.
/// With `launch_id`, the newest one that launcher invocation saved (its manifest's `launch_id`).
fn latest_on_rank0(
    pg: &ProcessGroup,
    device: Device,
    dir: &Path,
    launch_id: Option<&str>,
) -> Result<Option<PathBuf>> {
    // rank 0's answer as one number (the step, -1: none, -2: an error), the others' below any
    let mine = if pg.rank() == 0 {
        newest_complete(dir, launch_id).and_then(|newest| match newest {
            Some((step, path)) => {
                put_back(dir, step, &path)?;
                Ok(Some(step))
            }
            None => Ok(None),
        })
    } else {
        Ok(None)
    };
    let code = match (&mine, pg.rank()) {
        (_, r) if r != 0 => -3,
        (Err(_), _) => -2,
        (Ok(None), _) => -1,
        (Ok(Some(step)), _) => *step as i64,
    };
    let t = Tensor::from_slice(&[code]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Max)?;
    mine?;
    match t.to_device(Device::Cpu).int64_value(&[0]) {
        -2 => Err(crate::dist::FailedElsewhere {
            what: "rank 0 could not list checkpoint.dir".into(),
            rank: Some(0),
        }
        .into()),
        -1 => Ok(None),
        step => Ok(Some(dir.join(super::step_dir_name(step as u64)))),
    }
}

/// The newest complete checkpoint in `dir` (with `launch_id`, the newest that launcher invocation
/// saved): its step and the folder it is in now (`put_back` gives a moved-aside one its name).
fn newest_complete(dir: &Path, launch_id: Option<&str>) -> Result<Option<(u64, PathBuf)>> {
    let saved_by_run = |path: &Path| match launch_id {
        None => true,
        Some(id) => super::manifest_field(path, "launch_id").is_ok_and(|v| v.as_str() == Some(id)),
    };
    let (complete, _) =
        list_dir(dir).with_context(|| format!("listing checkpoint.dir {}", dir.display()))?;
    Ok(complete.into_iter().rev().find(|(_, p)| saved_by_run(p)))
}

/// The chat template's clock (`Manifest::template_clock`) of the checkpoint `resume` is going to
/// load, as this process finds the folders now, before the data is read: rank 0's is every
/// rank's (`data::template::agree_template_clock`), so only rank 0 needs to call it, and nothing
/// is agreed or repaired here (`resume` picks the folder again, with every rank). None when the
/// run starts over, or the checkpoint has no clock (older trainers).
pub fn resumed_template_clock(config: &Config) -> Option<i64> {
    let launch = super::save::launch_id();
    template_clock_to_resume(config, restart_attempt().is_some(), launch.as_deref())
}

/// `resumed_template_clock` for a process that is a launcher's restart (`restarted`) of launch
/// `launch_id`, or not.
fn template_clock_to_resume(
    config: &Config,
    restarted: bool,
    launch_id: Option<&str>,
) -> Option<i64> {
    let dir = &config.checkpoint.dir;
    let newest = |launch: Option<&str>| Ok(newest_complete(dir, launch)?.map(|(_, p)| p));
    let folder = resume_from(config, restarted, launch_id, newest)
        .ok()?
        .folder()?;
    super::manifest_field(&folder, "template_clock")
        .ok()?
        .as_i64()
}

/// The checkpoint a start resumes from (`resume_from`).
enum ResumeFrom {
    /// A launcher restart of a run that was not `auto`: the newest checkpoint its own launch
    /// saved (torchrun's convention: a restarted script resumes from its own latest checkpoint).
    OwnLaunch(PathBuf),
    /// `checkpoint.resume: FOLDER`.
    Given(PathBuf),
    /// `auto`: the newest complete checkpoint in `checkpoint.dir`.
    Newest(PathBuf),
    /// `never`, or `auto` with nothing saved.
    Fresh,
}

impl ResumeFrom {
    fn folder(self) -> Option<PathBuf> {
        match self {
            Self::OwnLaunch(p) | Self::Given(p) | Self::Newest(p) => Some(p),
            Self::Fresh => None,
        }
    }
}

/// Where a start resumes from, by `checkpoint.resume` and, for a launcher's restart
/// (`restarted`) of launch `launch_id`, what that launch saved: the rule `resume` follows and
/// `resumed_template_clock` looks ahead with. `newest(launch)`: the newest complete checkpoint in
/// `checkpoint.dir` (that launch's, when given).
fn resume_from(
    config: &Config,
    restarted: bool,
    launch_id: Option<&str>,
    mut newest: impl FnMut(Option<&str>) -> Result<Option<PathBuf>>,
) -> Result<ResumeFrom> {
    let resume = &config.checkpoint.resume;
    if let (true, false, Some(id)) = (restarted, matches!(resume, Resume::Auto), launch_id) {
        if let Some(p) = newest(Some(id))? {
            return Ok(ResumeFrom::OwnLaunch(p));
        }
    }
    Ok(match resume {
        Resume::Never => ResumeFrom::Fresh,
        Resume::From(p) => ResumeFrom::Given(p.clone()),
        Resume::Auto => newest(None)?.map_or(ResumeFrom::Fresh, ResumeFrom::Newest),
    })
}

/// A step's checkpoint that `list_dir` found moved aside (`step-N.replaced.partial`: a crash in
/// `replace_dir`'s fallback) goes back to its name, `step-N`, where every rank looks for it.
fn put_back(dir: &Path, step: u64, path: &Path) -> Result<()> {
    let name = dir.join(super::step_dir_name(step));
    if path == name {
        return Ok(());
    }
    tracing::warn!(
        "{} was moved aside for a replacement that never came (a crash while saving): renaming it back to {}",
        path.display(),
        name.display()
    );
    std::fs::rename(path, &name)
        .with_context(|| format!("renaming {} to {}", path.display(), name.display()))?;
    super::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))
}

/// Restores the trainable state and optimizer from the checkpoint `checkpoint.resume` selects
/// (none: `Ok(None)`); every rank must call it. `plan`: this run's epoch plan (a checkpoint of
/// other data is refused).
pub fn resume(
    pg: &ProcessGroup,
    device: Device,
    config: &Config,
    plan: DataPlan,
    trainable: &mut Trainable,
    opt: &mut AdamW,
) -> Result<Option<Resumed>> {
    let (attempt, launch) = (restart_attempt(), super::save::launch_id());
    let auto = matches!(config.checkpoint.resume, Resume::Auto);
    if let (Some(attempt), false, None, 0) = (attempt, auto, &launch, pg.rank()) {
        tracing::warn!(
            "restart {attempt}: without a launch id (this launcher's LLAVA_SCO_LAUNCH_ID, or torchrun's --rdzv-id other than 'none') this restart cannot tell its own checkpoints from others', so checkpoint.resume applies as on the first start; use checkpoint.resume: auto to continue"
        );
    }
    let dir = &config.checkpoint.dir;
    let newest = |launch: Option<&str>| latest_on_rank0(pg, device, dir, launch);
    let folder = match resume_from(config, attempt.is_some(), launch.as_deref(), newest)? {
        ResumeFrom::OwnLaunch(p) => {
            if pg.rank() == 0 {
                tracing::info!(
                    "restart {} of launch {}: continuing from {}, which this launch saved before the restart (checkpoint.resume: {} applies to its first start)",
                    attempt.unwrap_or_default(),
                    launch.as_deref().unwrap_or_default(),
                    p.display(),
                    match &config.checkpoint.resume {
                        Resume::From(f) => f.display().to_string(),
                        _ => "never".into(),
                    }
                );
            }
            p
        }
        ResumeFrom::Given(p) => {
            check_folder(pg, device, &p, dir)?;
            p
        }
        ResumeFrom::Newest(p) => {
            // (output_dir is rank 0's folder: it alone checks, the others learn its verdict)
            let named = named_for_its_step(&p)
                .map_err(|e| resume_advice(e, &p))
                .and_then(|()| match pg.rank() {
                    0 => same_output_dir(&p, config),
                    _ => Ok(()),
                });
            super::agree(pg, device, named, || {
                format!("checkpoint {}: another rank refused it", p.display())
            })?;
            p
        }
        ResumeFrom::Fresh => {
            if !auto {
                warn_if_not_empty(pg, dir);
            }
            return Ok(None);
        }
    };
    load_resumed(pg, device, config, plan, trainable, opt, folder).map(Some)
}

/// `checkpoint.resume: FOLDER` on a first start, checked before the model loads (a typo would
/// otherwise cost every rank a model load); every rank must call it. (A restart may resume from
/// what its launch saved instead: `resume` checks the folder then, if it is still the one used.)
pub fn check_resume_folder(pg: &ProcessGroup, device: Device, config: &Config) -> Result<()> {
    match &config.checkpoint.resume {
        Resume::From(p) if restart_attempt().is_none() => {
            check_folder(pg, device, p, &config.checkpoint.dir)
        }
        _ => Ok(()),
    }
}

/// This process's attempt when a launcher restarted the group (`TORCHELASTIC_RESTART_COUNT` > 0).
pub(crate) fn restart_attempt() -> Option<u64> {
    std::env::var("TORCHELASTIC_RESTART_COUNT")
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
        .filter(|&c| c > 0)
}

/// `checkpoint.resume: FOLDER` checked by `trainer config check` (the launcher runs it before
/// starting any rank): an error when the folder is not a checkpoint.
pub fn check_resume_setting(config: &Config) -> Result<()> {
    match &config.checkpoint.resume {
        Resume::From(p) => is_checkpoint_folder(p, &config.checkpoint.dir),
        _ => Ok(()),
    }
}

/// Whether `p` is a checkpoint folder (has its manifest.json); the error's hint looks at
/// `checkpoint.dir` (`dir`) too.
fn is_checkpoint_folder(p: &Path, dir: &Path) -> Result<()> {
    if p.join("manifest.json").exists() {
        return Ok(());
    }
    let text = p.to_string_lossy();
    let newest = |d: &Path| {
        list_dir(d)
            .ok()
            .and_then(|(complete, _)| complete.last().cloned())
    };
    let hint = match (crate::config::suggest(&text, &["auto", "never"]), newest(p)) {
        // "auot", "nevr": a keyword misspelt, most likely
        (Some(word), _) if !text.contains('/') => format!(" (did you mean {word}?)"),
        // the folder of a run's checkpoints, not one of them
        (_, Some((step, newest))) => format!(
            " (it holds step-N folders: give one, e.g. the newest, {} of step {step}, or `auto` with checkpoint.dir {})",
            newest.display(),
            p.display()
        ),
        // a step folder's name, read against the working directory, not checkpoint.dir
        _ if p.is_relative() && dir.join(p).join("manifest.json").is_file() => format!(
            " (relative paths are read from the working directory: did you mean {}?)",
            dir.join(p).display()
        ),
        _ => String::new(),
    };
    let what = match (p.is_file(), p.exists()) {
        (true, _) => return Err(anyhow::anyhow!("checkpoint.resume: {}", file_not_folder(p))),
        (_, true) => "is not a checkpoint folder (no manifest.json)",
        _ => "does not exist",
    };
    Err(anyhow::anyhow!(
        "checkpoint.resume: {} {what}{hint}; give a `step-N` folder (on storage every node sees), or {FIX}",
        p.display()
    ))
}

/// Whether `p` is a checkpoint folder on every rank (agreed: a folder only one node sees must stop
/// every rank, not leave the others waiting in the load's collectives).
fn check_folder(pg: &ProcessGroup, device: Device, p: &Path, dir: &Path) -> Result<()> {
    let found = is_checkpoint_folder(p, dir);
    super::agree(pg, device, found, || {
        format!(
            "checkpoint.resume: another rank finds no checkpoint at {}",
            p.display()
        )
    })
}

/// Rank 0's note when `checkpoint.resume: never` starts over in a folder holding checkpoints.
fn warn_if_not_empty(pg: &ProcessGroup, dir: &Path) {
    if pg.rank() != 0 {
        return;
    }
    if let Ok((complete, _)) = list_dir(dir) {
        if let Some((step, newest)) = complete.last() {
            tracing::warn!(
                "checkpoint.resume: never starts over, but {} already holds {} checkpoint(s) of an earlier run (newest {}, step {step}): they are kept (retention removes only this run's), and a later `checkpoint.resume: auto` continues from whichever is newest by step; give this run its own checkpoint.dir to keep the runs apart",
                dir.display(),
                complete.len(),
                newest.display()
            );
        }
    }
}

/// Loads `dir` on every rank (an error on any is one on all).
fn load_resumed(
    pg: &ProcessGroup,
    device: Device,
    config: &Config,
    plan: DataPlan,
    trainable: &mut Trainable,
    opt: &mut AdamW,
    dir: PathBuf,
) -> Result<Resumed> {
    // (with the folder's validation record, added after it was published: rank 0's, as every
    // rank must then take the same branches; another node may not see the file yet)
    let rank0 = pg.rank() == 0;
    let local = load_into(&dir, pg.world_size(), plan, config, trainable, opt)
        .map_err(|e| resume_advice(e, &dir))
        .and_then(|m| {
            let record = match rank0 {
                true => super::validation::read_record(&dir, m.step)?,
                false => None,
            };
            Ok((record, m))
        });
    let (record, m) = super::agree(pg, device, local, || {
        format!(
            "loading checkpoint {} failed on another rank",
            dir.display()
        )
    })?;
    let validated = super::validation::from_rank0(pg, device, record)?;
    trainable.after_update();
    Ok(Resumed {
        dir,
        world_size: m.world_size,
        micro_batch: m.data.micro_batch,
        supervise: match m.prompt.get("supervise") {
            Some(v) => v.clone(),
            None => serde_json::json!("all"),
        },
        scheduler: m.scheduler.clone(),
        peft: m.peft.clone(),
        optimizer: m.optimizer.clone(),
        progress: Progress {
            step: m.step,
            epoch: m.epoch,
            data_epoch: m.data.epoch,
            data_batch: m.data.batch,
            skipped_nonfinite: m.skipped_nonfinite,
            loss: m.loss,
            samples: m.data.samples,
            lengths_hash: m.data.lengths_hash,
            best_eval: super::validation::best_of(m.best_eval, validated),
        },
        lineage: m.lineage.clone(),
        template_clock: m.template_clock,
        validated: validated.is_some(),
    })
}

fn load_into(
    dir: &Path,
    world: usize,
    plan: DataPlan,
    config: &Config,
    trainable: &mut Trainable,
    opt: &mut AdamW,
) -> Result<Manifest> {
    // (a damaged manifest's error gets its ways on from the caller, `resume_advice`)
    let m = read_manifest(dir)?;
    check_identity(dir, &m, config)?;
    super::check_base_tensors(&m, &config.model.path).map_err(|e| {
        anyhow::anyhow!(
            "checkpoint {}: model.path {e}; set model.path to the run's base (or a copy of it); to \
             go on from these weights on another base, export the checkpoint (`trainer export`) \
             and start a new run from the export (a LoRA adapter with peft.init_from), or {FIX}",
            dir.display()
        )
    })?;
    let global = config.train.global_batch(world);
    if m.data.global_batch == 0 {
        return Err(damaged(format!(
            "checkpoint manifest {}: data.global_batch is 0",
            dir.join("manifest.json").display()
        )));
    }
    if m.data.global_batch != global {
        // (batch_size x world x grad_accum = the checkpoint's global batch only where the world
        // size divides it)
        let fix = match m.data.global_batch % world {
            0 => format!(
                "set train.batch_size / grad_accum so that batch_size x grad_accum is {}",
                m.data.global_batch / world
            ),
            _ => {
                // (its divisors, found up to the square root: a damaged manifest's huge number
                // must not keep every rank counting)
                let g = m.data.global_batch;
                let small: Vec<usize> = (1..)
                    .take_while(|w| w * w <= g)
                    .filter(|w| g % w == 0)
                    .collect();
                let mut worlds: Vec<usize> = small.iter().flat_map(|&w| [w, g / w]).collect();
                worlds.sort_unstable();
                worlds.dedup();
                let worlds: Vec<String> = worlds.iter().map(|w| w.to_string()).collect();
                format!(
                    "{} samples do not split over {world} ranks: resume it at {} rank(s)",
                    m.data.global_batch,
                    worlds.join(", ")
                )
            }
        };
        bail!(
            "checkpoint {} was trained with a global batch of {} samples, this run has {global} (train.batch_size {} x world {world} x grad_accum {}); {fix}, or {FIX}",
            dir.display(),
            m.data.global_batch,
            config.train.batch_size,
            config.train.grad_accum,
        );
    }
    if m.seed != config.train.seed {
        bail!(
            "checkpoint {} was trained with train.seed {}, this run has {} (the data order and dropout continue from the seed); set train.seed={}, or {FIX}",
            dir.display(),
            m.seed,
            config.train.seed,
            m.seed
        );
    }
    let samples = plan.samples;
    if let Some(saved) = m.data.samples.filter(|&n| n != samples) {
        bail!(
            "checkpoint {} was trained on {saved} samples of data.train (after skipped records), this run has {samples}: the data changed, so its position (epoch {} batch {}) would point at other samples; resume on the same data (and data.* settings), or {FIX}",
            dir.display(),
            m.data.epoch,
            m.data.batch
        );
    }
    if m.data.lengths_hash.is_some_and(|h| h != plan.lengths_hash) {
        bail!(
            "checkpoint {} was trained on data.train samples of other token lengths (same count, {samples}): the file's contents, data.max_seq_len / data.max_seq_len_policy, the tokenizer or the chat template changed, and the epoch plan sorts by length, so its position (epoch {} batch {}) would point at other samples; resume with the data settings it was trained with, or {FIX}",
            dir.display(),
            m.data.epoch,
            m.data.batch
        );
    }
    // (an older trainer's checkpoint records none: those left the samples out)
    let saved_drop_last = m.data.drop_last.unwrap_or(true);
    let left_over = samples % global.max(1) as u64;
    if saved_drop_last != config.train.drop_last && left_over > 0 {
        let (then, now) = match saved_drop_last {
            true => ("left out", "end with a partial step of them"),
            false => ("trained in a last, partial step", "leave them out"),
        };
        bail!(
            "checkpoint {} was trained with train.drop_last {saved_drop_last}{}: its epochs {then} the {left_over} samples that do not fill a global batch, this run's would {now}, so the run's step count and learning-rate schedule would not continue the checkpoint's; set train.drop_last={saved_drop_last} to resume, or {FIX}",
            dir.display(),
            if m.data.drop_last.is_none() { " (an older trainer's checkpoint, which records none)" } else { "" },
        );
    }
    let states = flat_states(trainable, opt, StatesFor::Load);
    // no_shard / hybrid_shard: the ranks holding the same shard (every rank / a replica group)
    // read the same files, so each checks the sha256 of its share of them (a mismatch on any rank
    // fails every rank: `load_resumed` agrees on the outcome)
    let share = match trainable {
        Trainable::Fsdp(f) if f.world > f.shard_world => {
            Some((f.rank / f.shard_world, f.world / f.shard_world))
        }
        _ => None,
    };
    fill(dir, &m, &states, Fill::Direct, share)?;
    opt.step = m.optimizer_step;
    opt.steps = param_steps(&m, &states);
    Ok(m)
}

/// AdamW's step count of every parameter of `states` (`AdamW::steps` layout), by name from the
/// manifest: `optimizer_steps` where a parameter missed steps, else `optimizer_step`.
pub(crate) fn param_steps(m: &Manifest, states: &[super::FlatState]) -> Vec<Vec<u64>> {
    states
        .iter()
        .map(|s| {
            s.params
                .iter()
                .map(|p| {
                    m.optimizer_steps
                        .get(&p.name)
                        .copied()
                        .unwrap_or(m.optimizer_step)
                })
                .collect()
        })
        .collect()
}

/// Fills this rank's flat states (master, exp_avg, exp_avg_sq ranges) from checkpoint `dir`
/// with manifest `m`, whatever world size wrote it. The files it reads are hashed on other
/// threads while their ranges are copied; a checksum mismatch is the error reported first.
pub(crate) fn fill_states(dir: &Path, m: &Manifest, states: &[super::FlatState]) -> Result<()> {
    fill_states_with(dir, m, states, Fill::Direct)
}

/// How `fill_states` puts the values into the state tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Contiguous CPU fp32 tensors are written in place, other ones through a buffer.
    Direct,
    /// Always through a host buffer and `Tensor::copy_` (the reference; GPU and other dtypes).
    #[cfg_attr(not(test), allow(dead_code))]
    Buffered,
}

pub(crate) fn fill_states_with(
    dir: &Path,
    m: &Manifest,
    states: &[super::FlatState],
    how: Fill,
) -> Result<()> {
    fill(dir, m, states, how, None)
}

/// `fill_states_with`, checking only share `(index, count)` of the files read (every `count`-th
/// of them in name order) when `count` ranks read the same files.
fn fill(
    dir: &Path,
    m: &Manifest,
    states: &[super::FlatState],
    how: Fill,
    share: Option<(usize, usize)>,
) -> Result<()> {
    let mut reader = Reader::new(dir, m)?;
    check_params(dir, &reader, states)?;
    let mut needed = reader.files_for(states);
    if let Some((index, count)) = share {
        let all = needed.len();
        needed = every_nth(needed, index, count);
        tracing::info!(
            "checking the sha256 of {} of the {all} checkpoint files this rank reads (share {index} of {count}: the {count} ranks that read the same files split the check)",
            needed.len()
        );
    }
    // the files are verified below, concurrently with the copy
    reader.verify_on_open = false;
    std::thread::scope(|s| {
        let verifier = s.spawn(|| verify_files(dir, m, &needed));
        let copied = copy_states(dir, &mut reader, states, how);
        let verified = verifier
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the checkpoint checksum thread panicked")));
        // a corrupt file explains whatever else went wrong while reading it
        verified.and(copied)
    })
}

/// Every model parameter must be in the checkpoint and vice versa.
fn check_params(dir: &Path, reader: &Reader, states: &[super::FlatState]) -> Result<()> {
    let ours: std::collections::HashSet<&str> = states
        .iter()
        .flat_map(|s| s.params.iter().map(|p| p.name.as_str()))
        .collect();
    let missing: Vec<&str> = states
        .iter()
        .flat_map(|s| s.params.iter())
        .filter(|p| !reader.params.contains_key(&p.name))
        .map(|p| p.name.as_str())
        .collect();
    let extra: Vec<&String> = reader
        .params
        .keys()
        .filter(|n| !ours.contains(n.as_str()))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        bail!(
            "checkpoint {} does not hold this model's trainable parameters: missing {:?}, unexpected {:?}; resume with the config it was trained with, or {FIX}",
            dir.display(),
            &missing[..missing.len().min(5)],
            &extra[..extra.len().min(5)]
        );
    }
    Ok(())
}

/// Copies every state's range from the files (see `fill_states_with`).
fn copy_states(
    dir: &Path,
    reader: &mut Reader,
    states: &[super::FlatState],
    how: Fill,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for s in states {
            let n = (s.end - s.start) as usize;
            if n == 0 {
                continue;
            }
            for (si, state) in STATES.iter().enumerate() {
                let mut dst = s.tensors[si].narrow(0, 0, n as i64); // (n,)
                let direct = how == Fill::Direct
                    && dst.device() == Device::Cpu
                    && dst.kind() == Kind::Float
                    && dst.is_contiguous();
                if direct {
                    // SAFETY: a contiguous CPU fp32 tensor of n elements starts at data_ptr()
                    // (the narrowed view's offset included); `dst` keeps it alive, and nothing
                    // else reads or writes the state while it is being loaded.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(dst.data_ptr() as *mut f32, n) };
                    fill_range(dir, reader, s, state, out)?;
                } else {
                    let mut buf = vec![0f32; n];
                    fill_range(dir, reader, s, state, &mut buf)?;
                    let src = Tensor::from_slice(&buf).to_device(dst.device());
                    dst.copy_(&src.to_kind(dst.kind()));
                }
            }
        }
        Ok(())
    })
}

/// State `state` of `s`'s range [start, end) into `out` (end - start elements), parameter by
/// parameter (their offsets may differ between the checkpoint and this model's layout).
fn fill_range(
    dir: &Path,
    reader: &mut Reader,
    s: &super::FlatState,
    state: &str,
    out: &mut [f32],
) -> Result<()> {
    for p in &s.params {
        let (a, b) = (p.offset.max(s.start), (p.offset + p.numel()).min(s.end));
        if a >= b {
            continue;
        }
        let (group, src_off, shape) = reader.params[&p.name].clone();
        if shape != p.shape {
            bail!(
                "checkpoint {}: parameter {} has shape {:?} there, {:?} in this model; {FIX}",
                dir.display(),
                p.name,
                shape,
                p.shape
            );
        }
        let from = src_off + (a - p.offset);
        reader.read(
            &group,
            state,
            from,
            from + (b - a),
            &mut out[(a - s.start) as usize..(b - s.start) as usize],
        )?;
    }
    Ok(())
}

/// Checks the size and sha256 of every `count`-th file of the manifest from the `index`-th: `count`
/// processes that read the same files check them all once between them. Returns how many it
/// checked.
pub(crate) fn verify_part(dir: &Path, m: &Manifest, index: usize, count: usize) -> Result<usize> {
    let names = every_nth(m.files.iter().map(|f| f.file.clone()), index, count);
    verify_files(dir, m, &names)?;
    Ok(names.len())
}

/// Every `count`-th item from the `index`-th: `index`'s share when `count` processes split them.
fn every_nth<T: Ord>(
    items: impl IntoIterator<Item = T>,
    index: usize,
    count: usize,
) -> BTreeSet<T> {
    (items.into_iter().enumerate())
        .filter(|(i, _)| i % count.max(1) == index)
        .map(|(_, t)| t)
        .collect()
}

/// Checks the sha256 of files `names` of checkpoint `dir`, several at once (up to one thread per
/// core): the first mismatch or read error.
fn verify_files(dir: &Path, m: &Manifest, names: &BTreeSet<String>) -> Result<()> {
    let entries: Vec<&FileEntry> = m.files.iter().filter(|f| names.contains(&f.file)).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(entries.len());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let Some(f) = entries.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        let path = dir.join(&f.file);
                        let file = std::fs::File::open(&path).with_context(|| {
                            format!("reading checkpoint file {}", path.display())
                        })?;
                        // SAFETY: checkpoint files are never modified after the rename that publishes them.
                        let map = unsafe { Mmap::map(&file) }
                            .with_context(|| format!("mapping {}", path.display()))?;
                        #[cfg(unix)]
                        let _ = map.advise(memmap2::Advice::Sequential);
                        check_sha256(&path, &map, &f.sha256)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(anyhow!("a checkpoint checksum thread panicked")))
        })
    })
}

/// `bytes` (the whole file at `path`) against the manifest's sha256.
pub(super) fn check_sha256(path: &Path, bytes: &[u8], expected: &str) -> Result<()> {
    let digest = super::sha256_hex(bytes);
    // (hex in either case: a checksum written by another tool may be upper case)
    if !digest.eq_ignore_ascii_case(expected) {
        return Err(damaged(format!(
            "checkpoint file {} is corrupt: sha256 {digest}, the manifest says {expected}",
            path.display(),
        )));
    }
    Ok(())
}

/// Checks manifest.json's bytes against `manifest.sha256` when the folder has one (trainers before
/// it wrote none); whether it had one.
fn check_manifest_checksum(dir: &Path, path: &Path, text: &[u8]) -> Result<bool> {
    let sum_path = dir.join(super::manifest::CHECKSUM_FILE);
    let line = match std::fs::read_to_string(&sum_path) {
        Ok(line) => line,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(damaged(format!(
                "{} cannot be read ({e})",
                sum_path.display()
            )))
        }
    };
    let Some(expected) = super::manifest::parse_checksum_line(&line) else {
        return Err(damaged(format!(
            "{} is damaged (expected `<sha256>  manifest.json`)",
            sum_path.display()
        )));
    };
    let digest = super::sha256_hex(text);
    if !digest.eq_ignore_ascii_case(expected) {
        return Err(damaged(format!(
            "checkpoint manifest {} is corrupt: sha256 {digest}, {} says {expected} (edited on purpose? then `sha256sum manifest.json > {}` in that folder records the edit)",
            path.display(),
            sum_path.display(),
            super::manifest::CHECKSUM_FILE
        )));
    }
    Ok(true)
}

/// An error of reading checkpoint `dir` for `trainer infer|eval|export`, worded for them: their
/// way out is another step folder, not a training run's `--set checkpoint.resume`; and a folder
/// that is not a checkpoint is named for what it is (a PEFT adapter, a folder of checkpoints).
pub fn for_reading(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if !dir.join("manifest.json").exists() {
        if dir.join("adapter_config.json").is_file() {
            return anyhow!(
                "{} is a PEFT adapter folder, not a training checkpoint: infer, eval and \
                 `export --format merged` take it with --adapter (it is already what \
                 `export --format peft` writes)",
                dir.display()
            );
        }
        if let Ok((complete, _)) = super::list_dir(dir) {
            if let Some((_, newest)) = complete.last() {
                return anyhow!(
                    "{} is a folder of checkpoints, not one: pass one of its step-N folders, \
                     e.g. the newest complete one, {}",
                    dir.display(),
                    newest.display()
                );
            }
        }
        if let Some(hint) = run_output_dir_hint(dir) {
            return anyhow!(
                "{} is a training run's train.output_dir, not a checkpoint: {hint}",
                dir.display()
            );
        }
        if !dir.exists() {
            return anyhow!("checkpoint {}: no such folder", dir.display());
        }
    }
    if !is_damaged(&e) {
        return e;
    }
    match older_checkpoint(dir) {
        Some(o) => anyhow!(
            "{e:#}; use another step-N folder of the run, e.g. {}",
            o.display()
        ),
        None => anyhow!("{e:#}; use another step-N folder of the run"),
    }
}

/// For a run's `train.output_dir` (it holds the run's `resolved_config.yaml`): where its
/// checkpoints are, the newest complete one named when its `checkpoint.dir` is found from here (a
/// relative one is relative to the folder the run started in, which `dir` ends with its relative
/// `train.output_dir` from).
fn run_output_dir_hint(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(crate::train::RESOLVED_CONFIG)).ok()?;
    let config: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let path_at = |section: &str, key: &str| -> Option<PathBuf> {
        config.get(section)?.get(key)?.as_str().map(PathBuf::from)
    };
    let Some(ckpt) = path_at("checkpoint", "dir") else {
        return Some("pass one of the step-N folders in its checkpoint.dir".into());
    };
    // (`./a-run` as `a-run`: Path::ends_with compares whole components)
    let started_in = path_at("train", "output_dir")
        .filter(|out| out.is_relative())
        .map(|out| {
            out.components()
                .filter(|c| c.as_os_str() != ".")
                .collect::<PathBuf>()
        })
        .filter(|out| dir.ends_with(out))
        .map(|out| {
            dir.ancestors()
                .nth(out.components().count())
                .map_or_else(PathBuf::new, Path::to_path_buf)
        });
    let found = match (ckpt.is_relative(), started_in) {
        (false, _) => Some(ckpt.clone()),
        (true, Some(base)) => Some(base.join(&ckpt)),
        (true, None) => None,
    };
    let newest = found
        .as_deref()
        .and_then(|d| super::list_dir(d).ok())
        .and_then(|(complete, _)| complete.last().map(|(_, p)| p.clone()));
    Some(match (newest, found) {
        (Some(n), _) => format!(
            "pass one of its checkpoints, e.g. the newest complete one, {}",
            n.display()
        ),
        (None, Some(d)) => format!(
            "its checkpoint.dir {} holds no complete checkpoint (pass a step-N folder with a manifest.json)",
            d.display()
        ),
        (None, None) => format!(
            "pass one of the step-N folders in its checkpoint.dir, {} (relative to the folder the run was started in)",
            ckpt.display()
        ),
    })
}

/// The newest complete checkpoint beside step folder `dir` of an older step. (Its run cannot be
/// told: `dir`'s manifest is the one that failed to read.)
fn older_checkpoint(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
    let (complete, _) = super::list_dir(dir.parent()?).ok()?;
    complete
        .into_iter()
        .rev()
        .find(|(s, _)| *s < step)
        .map(|(_, p)| p)
}

/// The error for a checkpoint's file given where its folder is expected.
fn file_not_folder(file: &Path) -> String {
    let folder = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // (the folder named only when it is a checkpoint: a config file given is no checkpoint's)
    match folder.join("manifest.json").is_file() {
        true => format!(
            "{} is a file, not a checkpoint folder: give the step-N folder ({} holds it)",
            file.display(),
            folder.display()
        ),
        false => format!(
            "{} is a file, not a checkpoint folder: give a step-N folder",
            file.display()
        ),
    }
}

/// Reads and checks `dir/manifest.json` (format and version).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    // (a file of the checkpoint, its manifest.json, given for the folder: not a damaged one)
    if dir.is_file() {
        bail!("{}", file_not_folder(dir));
    }
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        damaged(format!(
            "checkpoint manifest {} cannot be read ({e}); the checkpoint is incomplete",
            path.display()
        ))
    })?;
    let checked = check_manifest_checksum(dir, &path, text.as_bytes())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        damaged(format!(
            "checkpoint manifest {} is not valid JSON ({e})",
            path.display()
        ))
    })?;
    // (a manifest with a template_clock is of a trainer that writes manifest.sha256 beside it)
    if !checked && v.get("template_clock").is_some_and(|c| !c.is_null()) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "{}: {} is missing (the trainer that saved it writes one; deleted or not copied?): the manifest is read unchecked",
                dir.display(),
                super::manifest::CHECKSUM_FILE
            )
        });
    }
    if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(damaged(format!(
            "{} is not a {FORMAT} manifest (format {})",
            path.display(),
            v.get("format").unwrap_or(&Value::Null)
        )));
    }
    let version = v.get("version").and_then(Value::as_u64);
    if version != Some(VERSION) {
        // (not damaged: the other step folders of its run have that version too)
        return Err(anyhow::Error::new(OtherVersion(format!(
            "checkpoint manifest {} has format version {}, this trainer reads version {VERSION}; use a trainer of that version (or `trainer export` with it)",
            path.display(),
            v.get("version").unwrap_or(&Value::Null)
        ))));
    }
    let m: Manifest = serde_json::from_value(v).map_err(|e| {
        damaged(format!(
            "checkpoint manifest {} is malformed ({e})",
            path.display()
        ))
    })?;
    // plain names inside the folder: a damaged or crafted manifest must not make the trainer map
    // (and export copy out) files elsewhere
    let world = m.files.len();
    if let Some(f) = m
        .files
        .iter()
        .enumerate()
        .find(|(r, f)| f.file != super::rank_file_name(*r, world))
    {
        return Err(damaged(format!(
            "checkpoint manifest {} names the file {:?} where rank file {:?} belongs",
            path.display(),
            f.1.file,
            super::rank_file_name(f.0, world)
        )));
    }
    Ok(m)
}

/// A step folder chosen by its name (the newest in checkpoint.dir) must hold that step: a copy or
/// rename of another step's folder would be taken for the newest, and the run's real newest
/// checkpoints set aside as later than the step it resumes. (One given as checkpoint.resume is
/// the user's choice, whatever its name.) A manifest that cannot be read is left to the load to
/// report.
fn named_for_its_step(dir: &Path) -> Result<()> {
    let named = (dir.file_name().and_then(|n| n.to_str()))
        .and_then(|n| n.strip_prefix("step-")?.parse::<u64>().ok());
    let recorded = super::manifest_field(dir, "step")
        .ok()
        .and_then(|v| v.as_u64());
    match (named, recorded) {
        (Some(n), Some(step)) if n != step => Err(damaged(format!(
            "checkpoint {} is named for step {n}, but its manifest records step {step}: a copy or \
             rename of another step's folder, taken for the newest by its name; rename it to {} \
             (or move it out of checkpoint.dir)",
            dir.display(),
            super::step_dir_name(step)
        ))),
        _ => Ok(()),
    }
}

/// `checkpoint.resume: auto` found `dir`, the newest checkpoint: it must be of a run that wrote
/// to this run's `train.output_dir`, as seen from `checkpoint.dir` (checkpoints of older
/// trainers, which did not record it, pass). A new experiment that changed only output_dir, in
/// the default checkpoint.dir, would otherwise continue the last experiment's run, silently.
fn same_output_dir(dir: &Path, config: &Config) -> Result<()> {
    let Some(theirs) = super::manifest_field(dir, "output_dir_from_checkpoint_dir")
        .ok()
        .and_then(|v| v.as_str().map(String::from))
    else {
        return Ok(());
    };
    let ours = super::output_dir_from_checkpoint_dir(config);
    if theirs == ours {
        return Ok(());
    }
    let out = config.train.output_dir.display();
    bail!(
        "checkpoint.resume: auto found {}, the newest checkpoint in checkpoint.dir {}, saved by a \
         run whose train.output_dir was {} (from checkpoint.dir: {theirs}); this run writes to \
         {out} ({ours}). To start a new run, give it its own checkpoint.dir (e.g. `--set \
         checkpoint.dir={out}/checkpoints`); to continue that run into this output_dir, name the \
         checkpoint: `--set checkpoint.resume={}`",
        dir.display(),
        config.checkpoint.dir.display(),
        config.checkpoint.dir.join(&theirs).display(),
        dir.display()
    )
}

/// The config keys whose values differ between the checkpoint and `config`.
fn check_identity(dir: &Path, m: &Manifest, config: &Config) -> Result<()> {
    let ours = identity(config);
    let keys: std::collections::BTreeSet<&String> = ours.keys().chain(m.config.keys()).collect();
    let stored = |k: &str| m.config.get(k).map(|v| super::identity_value(k, v.clone()));
    // (a base config.json of other bytes but the same content, re-indented or re-saved, is the
    // same model)
    let same_base = || {
        let path = config.model.path.join("config.json");
        let same = std::fs::read(&path)
            .is_ok_and(|bytes| super::same_model_config(&m.model_config, &bytes));
        if same {
            tracing::info!(
                "{}: other bytes than the run's base config.json, the same model (only formatting or save-time keys differ)",
                path.display()
            );
        }
        same
    };
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| ours.get(*k) != stored(k).as_ref())
        .filter(|k| k.as_str() != "model.config_sha256" || !same_base())
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(unset)".to_string(), Value::to_string);
            format!(
                "{k}: checkpoint {}, config {}",
                show(m.config.get(k)),
                show(ours.get(k))
            )
        })
        .collect();
    if !diffs.is_empty() {
        bail!(
            "checkpoint {} was written with a different model/LoRA config ({}); resume with the matching config, or {FIX}",
            dir.display(),
            diffs.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock a resume renders comes from the checkpoint `resume` loads: the newest under
    /// `auto`, the given folder, none under `never`; and on a launcher restart of a run that was
    /// not `auto`, the newest its own launch saved (not a newer one of another launch).
    #[test]
    fn the_template_clock_is_the_checkpoint_resume_loads() {
        let dir = std::env::temp_dir().join(format!("clock-to-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (step, launch, clock) in [(2, "ours", 200), (4, "theirs", 400)] {
            let folder = dir.join(crate::checkpoint::step_dir_name(step));
            std::fs::create_dir_all(&folder).unwrap();
            let manifest = serde_json::json!({"launch_id": launch, "template_clock": clock});
            std::fs::write(folder.join("manifest.json"), manifest.to_string()).unwrap();
        }
        let config = |resume: &str| {
            let sets = [
                "model.path=m".to_string(),
                "data.train=t.jsonl".to_string(),
                format!("checkpoint.dir={}", dir.display()),
                format!("checkpoint.resume={resume}"),
            ];
            crate::config::parse("", &sets).unwrap()
        };
        let from = dir.join(crate::checkpoint::step_dir_name(4));
        let from = from.display().to_string();
        let clock = |resume: &str, restarted: bool| {
            template_clock_to_resume(&config(resume), restarted, Some("ours"))
        };
        assert_eq!(clock("auto", false), Some(400));
        assert_eq!(
            clock("auto", true),
            Some(400),
            "auto: the newest, any launch's"
        );
        assert_eq!(clock("never", false), None);
        assert_eq!(
            clock("never", true),
            Some(200),
            "a restart: its own launch's"
        );
        assert_eq!(clock(&from, false), Some(400));
        assert_eq!(clock(&from, true), Some(200), "a restart: its own launch's");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
