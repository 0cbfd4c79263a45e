//! The dataset the training loop reads: a pre-scanned split plus ordered, parallel loading of
//! micro-batches.
//!
//! `Dataset::open` reads the split's JSONL and, without decoding any image, checks every record:
//! JSON and conversation shape, image path (inside `image_root`, the file exists, its header
//! gives a size), tokenization (each record is rendered and tokenized once to know its length)
//! and `data.max_seq_len` with `data.max_seq_len_policy`. Problems are `FILE:LINE: reason`;
//! under `data.bad_records: error` the first one stops the run (with a count of all of them),
//! under `skip` they are counted in the `ScanReport`.
//!
//! `Dataset::epoch_iter` cuts an epoch into global batches of `batch_size * world * grad_accum`
//! samples (`LengthGroupedSampler`, seeded by `train.seed` and the epoch; the last one the samples
//! left over, unless `train.drop_last`), each global batch into `grad_accum` micro-steps (fewer
//! for the last) and each micro-step rank-contiguously into `world` parts of `batch_size` (the last
//! micro-step of a partial batch into fewer, filler rows for the ranks left without one). This rank's
//! parts are built by `data.num_workers` threads (`OrderedPool`) in a fixed order.
//!
//! Decode errors at load time (a truncated or corrupt image that the pre-scan cannot see): under
//! `bad_records: error` the item is an `Err` naming `FILE:LINE`; under `skip` the sample is
//! replaced by the next sample in dataset order (index + 1, + 2, ..., wrapping) that loads, so
//! the replacement depends only on the data, never on timing or worker count; each replacement
//! is counted (`Dataset::replaced_samples`) and logged.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;

use super::collate::{self, collate, Sample};
use super::image::{self, ImageProcessorConfig};
use super::loader::OrderedPool;
use super::records::{parse_jsonl, sort_in_file_order, ParseOptions, ParseReport, Problem, Record};
use super::sampler::{LengthGroupedSampler, Position};
pub use super::scan::check_tokenizer_fits_model;
use super::scan::{check_processors_fit_model, scan_record, Scanned};
pub use super::scan_report::{DataError, ScanReport};
use super::tokenize::{apply_length_policy, LengthOutcome, TextProcessor, IGNORE};
use crate::config::{BadRecords, Config, DataFiles, LengthPolicy};
use crate::model::{Batch, Images};

/// Which JSONL of the config: `data.train` or `data.eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Eval => "eval",
        })
    }
}

/// One rank's micro-batch, ready for the model (CPU tensors).
#[derive(Debug)]
pub struct MicroBatch {
    /// (epoch, global batch index) of the optimizer step this micro-batch belongs to.
    pub position: Position,
    /// 0..grad_accum within the global batch.
    pub micro_step: usize,
    pub batch: Batch,
    /// Labels that the (shifted) loss counts: `labels[:, 1:] != -100`.
    pub supervised_tokens: i64,
    /// Dataset indices of the samples, in batch order (after any replacement).
    pub sample_indices: Vec<usize>,
    /// Rows that are fillers (a rank with no sample left in the last, partial micro-step of an
    /// epoch or of evaluation, or in evaluation a sample that failed to load under `skip`): run
    /// through the model so every rank does the same number of forward passes, but their labels
    /// are all -100, so they add nothing to the loss sum or to `supervised_tokens`.
    pub filler_rows: usize,
    /// Samples that failed to load (under `bad_records: skip`) and were replaced by the next one
    /// that loads (training: that one then counts twice in the epoch).
    pub replaced: usize,
}

/// One unit of loading work: this rank's part of one micro-step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroJob {
    pub position: Position,
    pub micro_step: usize,
    pub indices: Vec<usize>,
    /// Trailing entries of `indices` that are fillers (a rank left without a sample in a partial
    /// last micro-step).
    pub fillers: usize,
}

/// A collated micro-batch with the indices actually used.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub collated: collate::Batch,
    /// Dataset indices in batch order (replacements included).
    pub indices: Vec<usize>,
    /// How many samples were replaced because they failed to load (skip only).
    pub replaced: usize,
}

struct Inner {
    file: DataFiles,
    records: Vec<Record>,
    lengths: Vec<usize>,
    /// Labels the shifted loss counts (`labels[1:] != -100`), per sample.
    supervised: Vec<usize>,
    /// What the scan counted of each sample into its report (`checked_report` takes out the
    /// samples whose images do not decode).
    counted: Vec<Counted>,
    text: TextProcessor,
    image: ImageProcessorConfig,
    max_seq_len: usize,
    length_policy: LengthPolicy,
    bad_records: BadRecords,
    num_workers: usize,
    seed: u64,
    /// `train.drop_last`.
    drop_last: bool,
    replaced: AtomicU64,
}

/// One sample's share of its split's `ScanReport` statistics.
#[derive(Debug, Clone, Copy)]
struct Counted {
    supervised: usize,
    tiles: usize,
    truncated: bool,
}

/// What an error about too few usable records says of the keys that drop them.
pub const DROPPING_KEYS: &str =
    "the keys that drop records are data.max_seq_len / data.max_seq_len_policy, data.text_only and data.bad_records";

/// A pre-scanned split. Cheap to share: `Send + Sync`.
pub struct Dataset {
    inner: Arc<Inner>,
    report: ScanReport,
}

const PREFETCH: usize = 2;

/// Test hook: `TRAINER_LOADER_PANIC_AT=RANK:BATCH` makes that rank's loader panic while loading
/// global batch BATCH (0-based, within its epoch).
pub const LOADER_PANIC_ENV: &str = "TRAINER_LOADER_PANIC_AT";

/// The global batch this rank's loader panics at (`LOADER_PANIC_ENV`; RANK 0 without a launcher).
fn loader_panic_hook() -> Option<u64> {
    let v = std::env::var(LOADER_PANIC_ENV).ok()?;
    let (rank, batch) = v.split_once(':')?;
    let ours = std::env::var("RANK").unwrap_or_else(|_| "0".into());
    (rank == ours).then(|| batch.parse().ok()).flatten()
}

impl Dataset {
    /// Parse and pre-scan the split, then apply `data.bad_records` and the length policy: the
    /// first problem stops with `FILE:LINE: reason` and a count of all problems under `error`.
    pub fn open(config: &Config, model_dir: &Path, split: Split) -> Result<Dataset, DataError> {
        let ds = Self::scan(config, model_dir, split)?;
        ds.report.verdict(ds.inner.length_policy)?;
        Ok(ds)
    }

    /// `open` without the verdict: every bad record is left out and listed in the report
    /// (what `trainer data check` prints). Errors only when the model folder or the file
    /// cannot be read.
    pub fn scan(config: &Config, model_dir: &Path, split: Split) -> Result<Dataset, DataError> {
        let d = &config.data;
        let files = match split {
            Split::Train => d.train.clone(),
            Split::Eval => d.eval.clone().ok_or(DataError::NoEvalSplit)?,
        };
        let mut text = TextProcessor::from_model_dir(model_dir, d.double_bos)
            .map_err(DataError::ModelFolder)?;
        text.check_pad_for_training(model_dir)
            .map_err(DataError::ModelFolder)?;
        text.last_turn_only = d.supervise == crate::config::Supervise::Last;
        let image =
            ImageProcessorConfig::from_model_dir(model_dir).map_err(DataError::ModelFolder)?;
        check_processors_fit_model(model_dir, &mut text, &image).map_err(DataError::ModelFolder)?;
        let opts = ParseOptions {
            image_root: d.image_root.clone(),
            text_only: d.text_only,
            check_image_exists: true,
            keep_image_placeholder: d.image_placeholder == crate::config::ImagePlaceholder::Keep,
        };
        // several files are one dataset: their records in order (problems name file and line)
        let mut parsed = ParseReport::default();
        let mut empty_files = Vec::new();
        for file in files.files() {
            let one = parse_jsonl(file, &opts).map_err(|mut problem| {
                problem.reason = format!("data.{split}: {}", problem.reason);
                DataError::Read(problem)
            })?;
            let lines = one.records.len() + one.problems.len() + one.skipped_text_only;
            // (one file of several that adds nothing: a failed export, the wrong file listed)
            if lines == 0 && files.files().len() > 1 {
                tracing::warn!("data.{split}: {} holds no record (empty or blank lines only): it adds nothing to the split", file.display());
                empty_files.push(file.clone());
            }
            parsed.append(one);
        }
        let mut report = ScanReport {
            split: split.to_string(),
            file: files.clone(),
            lines: parsed.records.len() + parsed.problems.len() + parsed.skipped_text_only,
            text_only_kept: 0,
            bad_records: Some(d.bad_records),
            max_seq_len: d.max_seq_len,
            empty_files,
            unread_fields: std::mem::take(&mut parsed.unread_fields),
            ..Default::default()
        };
        if !report.unread_fields.is_empty() {
            let fields: Vec<&str> = report.unread_fields.iter().map(String::as_str).collect();
            tracing::warn!("data.{split}: the records' fields {} are not read (id, image and conversations are)", fields.join(", "));
        }
        if parsed.skipped_text_only > 0 {
            report
                .skipped
                .insert("text-only".into(), parsed.skipped_text_only);
        }
        // Tokenize (and read image headers) in parallel; results stay in record order.
        let workers = d.num_workers.max(1);
        let recs = &parsed.records;
        let chunk = recs.len().div_ceil(workers).max(1);
        let scanned: Vec<Scanned> = std::thread::scope(|s| {
            let handles: Vec<_> = recs
                .chunks(chunk)
                .map(|c| {
                    let (text, image) = (&text, &image);
                    s.spawn(move || {
                        c.iter()
                            .map(|r| {
                                scan_record(r, text, image, d.max_seq_len, d.max_seq_len_policy)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("scan worker panicked"))
                .collect()
        });
        // Merge parse problems and scan problems in file order.
        let mut problems = parsed.problems;
        let mut records = Vec::new();
        let mut lengths = Vec::new();
        let mut shifted = Vec::new();
        let mut counted = Vec::new();
        for (r, sc) in parsed.records.into_iter().zip(scanned) {
            let problem = |reason: String| Problem {
                file: r.file.clone(),
                line: r.line,
                reason,
            };
            match sc {
                Scanned::Ok {
                    len,
                    supervised,
                    shifted_supervised,
                    tiles,
                    truncated,
                } => {
                    report.ok += 1;
                    report.truncated += usize::from(truncated);
                    report.text_only_kept += usize::from(r.image.is_none());
                    *report.tiles.entry(tiles).or_default() += 1;
                    report.supervised_tokens += supervised as u64;
                    report.total_tokens += len as u64;
                    lengths.push(len);
                    shifted.push(shifted_supervised);
                    counted.push(Counted {
                        supervised,
                        tiles,
                        truncated,
                    });
                    records.push(r);
                }
                Scanned::Bad(reason) => problems.push(problem(reason)),
                Scanned::TooLong(reason) => {
                    let key = "too long, refused (data.max_seq_len_policy: error)";
                    *report.skipped.entry(key.into()).or_default() += 1;
                    report.too_long.push(problem(reason));
                }
                Scanned::TooLongDropped(reason) => {
                    *report.skipped.entry("too long".into()).or_default() += 1;
                    report.too_long.push(problem(reason));
                }
                Scanned::Skipped(why) => {
                    *report.skipped.entry(why.into()).or_default() += 1;
                    report.dropped.push(problem(format!("skipped: {why}")));
                }
            }
        }
        sort_in_file_order(&mut problems, &files);
        if !problems.is_empty() {
            report.skipped.insert("bad record".into(), problems.len());
        }
        report.problems = problems;
        report.lengths = lengths.clone();
        report.repeated_ids = repeated_ids(&records);
        Ok(Dataset {
            inner: Arc::new(Inner {
                file: files,
                records,
                lengths,
                supervised: shifted,
                counted,
                text,
                image,
                max_seq_len: d.max_seq_len,
                length_policy: d.max_seq_len_policy,
                bad_records: d.bad_records,
                num_workers: d.num_workers.max(1),
                seed: config.train.seed,
                drop_last: config.train.drop_last,
                replaced: AtomicU64::new(0),
            }),
            report,
        })
    }

    pub fn len(&self) -> usize {
        self.inner.records.len()
    }

    /// The most common second user turn (as the template gets it, trimmed): the self-correction
    /// prompt in self-correction data, where most samples share it. Returns it with how many
    /// samples have it and how many have a second turn; None without multi-turn samples.
    pub fn correction_prompt(&self) -> Option<(String, usize, usize)> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut multi = 0;
        for r in &self.inner.records {
            if let Some(t) = r.turns.get(1) {
                multi += 1;
                *counts.entry(t.user.trim()).or_default() += 1;
            }
        }
        // (most common; a tie goes to the text that sorts first, so every rank picks the same)
        let (text, n) = counts
            .into_iter()
            .max_by(|(ta, a), (tb, b)| a.cmp(b).then(tb.cmp(ta)))?;
        Some((text.to_string(), n, multi))
    }

    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    pub fn report(&self) -> &ScanReport {
        &self.report
    }

    /// The record behind dataset index `i`.
    pub fn record(&self, i: usize) -> &Record {
        &self.inner.records[i]
    }

    /// Token count of sample `i` (after the length policy).
    pub fn length(&self, i: usize) -> usize {
        self.inner.lengths[i]
    }

    /// Labels of sample `i` that the shifted loss counts (`labels[1:] != -100`), as summed in
    /// `MicroBatch::supervised_tokens`: every rank can compute a global batch's total from the
    /// plan without a collective (exact unless a sample was replaced at load time).
    pub fn supervised_tokens(&self, i: usize) -> usize {
        self.inner.supervised[i]
    }

    /// The tokenizer, template and special ids in use.
    pub fn text_processor(&self) -> &TextProcessor {
        &self.inner.text
    }

    /// Samples replaced because they failed to load (under `bad_records: skip`), so far.
    pub fn replaced_samples(&self) -> u64 {
        self.inner.replaced.load(Ordering::Relaxed)
    }

    /// Optimizer steps per epoch for a global batch of `global_batch` samples (with the last,
    /// partial one unless `train.drop_last`), independent of world size.
    pub fn batches_per_epoch(&self, global_batch: usize) -> u64 {
        match global_batch {
            0 => 0,
            g => {
                crate::data::sampler::batches_per_epoch(self.len(), g, self.inner.drop_last) as u64
            }
        }
    }

    /// The samples of an epoch that do not fill a global batch of `global_batch`: its last step's
    /// (fewer samples than the others), or, with `train.drop_last`, those that sit out.
    pub fn partial_batch_len(&self, global_batch: usize) -> usize {
        self.len().checked_rem(global_batch).unwrap_or(0)
    }

    /// The global batches of an epoch (dataset indices), `global_batch` samples each but the
    /// last, partial one (see [`LengthGroupedSampler`]).
    pub fn epoch_batches(&self, epoch: u64, global_batch: usize) -> Vec<Vec<usize>> {
        let i = &self.inner;
        match global_batch {
            0 => vec![],
            g => LengthGroupedSampler::new(i.lengths.clone(), g, i.seed, i.drop_last)
                .epoch_batches(epoch),
        }
    }

    /// Micro-batches (per rank) of the optimizer step at `position` in an epoch of global batches
    /// of `batch_size * world * grad_accum`: `grad_accum`, but fewer for the last, partial one
    /// (its samples cut into micro-steps of `batch_size * world`, the last of them into fewer
    /// parts of `batch_size`, with filler rows).
    pub fn micro_steps(
        &self,
        position: u64,
        batch_size: usize,
        world: usize,
        grad_accum: usize,
    ) -> usize {
        let micro = batch_size * world;
        let global = micro * grad_accum;
        let whole = (self.len() / global.max(1)) as u64;
        match self.partial_batch_len(global) {
            r if position == whole && r > 0 && !self.inner.drop_last => r.div_ceil(micro),
            _ => grad_accum,
        }
    }

    /// This rank's loading jobs for one epoch from global batch `start_batch` on, in order.
    pub fn epoch_plan(
        &self,
        epoch: u64,
        start_batch: u64,
        rank: usize,
        world: usize,
        batch_size: usize,
        grad_accum: usize,
    ) -> Result<Vec<MicroJob>, DataError> {
        if world == 0 || batch_size == 0 || grad_accum == 0 || rank >= world {
            return Err(DataError::Layout(format!(
                "rank {rank}, world {world}, batch_size {batch_size}, grad_accum {grad_accum}: all must be positive and rank < world"
            )));
        }
        let micro = batch_size * world;
        let global = micro * grad_accum;
        let mut jobs = Vec::new();
        for (g, gb) in self
            .epoch_batches(epoch, global)
            .into_iter()
            .enumerate()
            .skip(start_batch as usize)
        {
            // (a partial global batch: whole micro-steps, then one of fewer slices)
            for (m, step) in gb.chunks(micro).enumerate() {
                let (indices, fillers) = LengthGroupedSampler::slice_part(step, rank, batch_size);
                jobs.push(MicroJob {
                    position: Position {
                        epoch,
                        batch: g as u64,
                    },
                    micro_step: m,
                    indices,
                    fillers,
                });
            }
        }
        Ok(jobs)
    }

    /// This rank's evaluation micro-batches: every sample of the split exactly once (no
    /// drop_last, no shuffle), or with `limit` the split's first `limit` samples in file order
    /// (`train.max_eval_samples`: the same samples at any world size and batch size, as HF's
    /// `max_eval_samples` selects them). Samples are ordered by token length (less padding) and cut into
    /// global batches of `batch_size * world`, split rank-contiguously; the last, partial global
    /// batch is spread over the ranks by `LengthGroupedSampler::even_part` (filler rows for
    /// ranks left without a sample). Position = (0, global batch index).
    pub fn eval_plan(
        &self,
        rank: usize,
        world: usize,
        batch_size: usize,
        limit: Option<usize>,
    ) -> Result<Vec<MicroJob>, DataError> {
        if world == 0 || batch_size == 0 || rank >= world {
            return Err(DataError::Layout(format!(
                "rank {rank}, world {world}, batch_size {batch_size}: all must be positive and rank < world"
            )));
        }
        let n = limit.map_or(self.len(), |l| l.min(self.len()));
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| self.inner.lengths[i]);
        let global = batch_size * world;
        let mut jobs = Vec::new();
        for (g, gb) in order.chunks(global).enumerate() {
            let (indices, fillers) = LengthGroupedSampler::even_part(gb, rank, world);
            jobs.push(MicroJob {
                position: Position {
                    epoch: 0,
                    batch: g as u64,
                },
                micro_step: 0,
                indices,
                fillers,
            });
        }
        Ok(jobs)
    }

    /// The micro-batches of `eval_plan`, loaded by `data.num_workers` threads in order. Under
    /// `bad_records: skip` a sample that fails to load is a masked filler row (counted once
    /// in `replaced_samples`), never a second copy of another sample.
    pub fn eval_iter(
        &self,
        rank: usize,
        world: usize,
        batch_size: usize,
        limit: Option<usize>,
    ) -> impl Iterator<Item = Result<MicroBatch, DataError>> + '_ {
        self.loaded(self.eval_plan(rank, world, batch_size, limit), true)
    }

    /// The micro-batches of `plan` loaded by `data.num_workers` threads in order (`eval`: with
    /// filler rows for samples that fail under `skip`); the plan's error, or a thread's that did
    /// not start, first.
    fn loaded(
        &self,
        plan: Result<Vec<MicroJob>, DataError>,
        eval: bool,
    ) -> impl Iterator<Item = Result<MicroBatch, DataError>> + '_ {
        let (jobs, err) = match plan {
            Ok(j) => (j, None),
            Err(e) => (vec![], Some(e)),
        };
        let inner = Arc::clone(&self.inner);
        let workers = self.inner.num_workers;
        // a panic while loading (a failed allocation in libtorch, a broken invariant) is this
        // micro-batch's error, so it takes the agreed way out every other load error takes (the
        // training loop agrees on it with the other ranks and publishes the last checkpoint);
        // re-raised on the training thread it skipped that and left the other ranks waiting
        let panic_at = loader_panic_hook();
        let pool = OrderedPool::new(jobs, workers, PREFETCH, move |job: &MicroJob| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if panic_at == Some(job.position.batch) {
                    panic!(
                        "{LOADER_PANIC_ENV} fired at global batch {}",
                        job.position.batch
                    );
                }
                load_micro(&inner, job, eval)
            }))
            .unwrap_or_else(|panic| {
                let why = crate::logging::panic_message(panic.as_ref());
                Err(DataError::Loader(format!(
                    "loading a micro-batch of samples {:?} failed: {why}",
                    job.indices
                )))
            })
        });
        start_error(err, &pool, workers)
            .map(Err)
            .into_iter()
            .chain(pool.into_iter().flatten())
    }

    /// Load and collate the samples `indices` (in this order), replacing samples that fail to
    /// load under `skip` (see the module docs).
    pub fn load(&self, indices: &[usize]) -> Result<Loaded, DataError> {
        load(&self.inner, indices, indices.len())
    }

    /// `load` of one loading job, its filler rows masked (labels all -100) as training masks
    /// them; `Loaded::indices` then holds only the job's real samples.
    pub fn load_job(&self, job: &MicroJob) -> Result<Loaded, DataError> {
        let real = job.indices.len() - job.fillers;
        let mut loaded = load(&self.inner, &job.indices, real)?;
        mask_rows(
            &mut loaded.collated,
            &filler_rows(job, &loaded.indices, false),
        );
        loaded.indices.truncate(real);
        Ok(loaded)
    }

    /// This rank's micro-batches of one epoch starting at global batch `start_batch`: global
    /// batch g (`batch_size * world * grad_accum` samples) is split into `grad_accum` micro-steps,
    /// each split rank-contiguously into `world` parts of `batch_size` (an epoch's last, partial
    /// batch into `micro_steps` of them, the last with fewer parts). Built by
    /// `data.num_workers` threads with a bounded prefetch queue, in a deterministic order.
    pub fn epoch_iter(
        &self,
        epoch: u64,
        start_batch: u64,
        rank: usize,
        world: usize,
        batch_size: usize,
        grad_accum: usize,
    ) -> impl Iterator<Item = Result<MicroBatch, DataError>> + '_ {
        let plan = self.epoch_plan(epoch, start_batch, rank, world, batch_size, grad_accum);
        self.loaded(plan, false)
    }
}

/// The first error of a loader: its plan's, else a worker thread that did not start.
fn start_error<T>(
    plan: Option<DataError>,
    pool: &std::io::Result<T>,
    workers: usize,
) -> Option<DataError> {
    plan.or_else(|| {
        pool.as_ref().err().map(|e| {
            DataError::Loader(format!(
                "data.num_workers {workers}: cannot start a loader thread ({e}); lower \
                 data.num_workers (or raise the process's thread and memory limits)"
            ))
        })
    })
}

/// Build one sample: tokenize (as the scan did) and decode + process the image.
fn load_sample(inner: &Inner, i: usize) -> Result<Sample, Problem> {
    let r = &inner.records[i];
    let problem = |reason: String| Problem {
        file: r.file.clone(),
        line: r.line,
        reason,
    };
    let mut enc = inner
        .text
        .encode_dialog(r.system.as_deref(), &r.turns, r.image.is_some())
        .map_err(problem)?;
    // The scan kept this record; a different outcome now (a template that renders today's date
    // crossed midnight, an edited file) must not train an over-long sample.
    if let LengthOutcome::Skipped { reason } =
        apply_length_policy(&mut enc, inner.max_seq_len, inner.length_policy).map_err(problem)?
    {
        return Err(problem(format!(
            "{reason} now, though it fit when the data was scanned (did the file or the chat template's output change?)"
        )));
    }
    let image = match &r.image {
        None => None,
        Some(p) => {
            let rgb = image::load_rgb(p).map_err(problem)?;
            let processed = image::process(&inner.image, &rgb);
            super::scratch::give(rgb.data);
            Some(processed)
        }
    };
    Ok(Sample {
        index: i,
        text: enc,
        image,
    })
}

/// The samples of `indices`, the indices used (replacements included) and how many were
/// replaced.
/// The samples `indices`; the entries from `real` on are filler rows (masked copies of a sample
/// another rank trains): one that fails to load is replaced without a warning or a count, its
/// sample's own rank reporting it.
fn load_samples(
    inner: &Inner,
    indices: &[usize],
    real: usize,
) -> Result<(Vec<Sample>, Vec<usize>, usize), DataError> {
    let n = inner.records.len();
    let mut samples = Vec::with_capacity(indices.len());
    let mut used = Vec::with_capacity(indices.len());
    let mut replaced = 0;
    for (row, &i) in indices.iter().enumerate() {
        match load_sample(inner, i) {
            Ok(s) => {
                used.push(i);
                samples.push(s);
            }
            Err(p) if inner.bad_records == BadRecords::Error => return Err(DataError::Decode(p)),
            Err(p) => {
                let found = (1..n)
                    .map(|k| (i + k) % n)
                    .find_map(|j| load_sample(inner, j).ok().map(|s| (j, s)));
                let Some((j, s)) = found else {
                    return Err(DataError::NothingLoads {
                        first: p,
                        file: inner.file.clone(),
                    });
                };
                if row < real {
                    // (named by its line, as the record that failed is)
                    let r = &inner.records[j];
                    tracing::warn!(
                        "{p} (skipped: replaced by the record at {}:{})",
                        r.file.display(),
                        r.line
                    );
                    inner.replaced.fetch_add(1, Ordering::Relaxed);
                    replaced += 1;
                }
                used.push(j);
                samples.push(s);
            }
        }
    }
    Ok((samples, used, replaced))
}

/// Which rows of `job`, loaded as `used`, are masked: the plan's filler rows (a rank without a
/// sample in a partial last micro-step), and with `eval` samples that failed to load (training
/// replaces them with the next sample).
fn filler_rows(job: &MicroJob, used: &[usize], eval: bool) -> Vec<bool> {
    let real = job.indices.len() - job.fillers;
    (0..job.indices.len())
        .map(|i| i >= real || (eval && used[i] != job.indices[i]))
        .collect()
}

/// The reference path: samples -> `collate` (all buffers) -> `Loaded` (`real`: as in
/// `load_samples`).
fn load(inner: &Inner, indices: &[usize], real: usize) -> Result<Loaded, DataError> {
    let (samples, used, replaced) = load_samples(inner, indices, real)?;
    let collated = collate(
        &samples,
        inner.text.ids.pad,
        inner.text.ids.image,
        inner.image.max_image_tiles,
        inner.image.tile,
    );
    Ok(Loaded {
        collated,
        indices: used,
        replaced,
    })
}

/// The loader's fused path, same tensors as `to_model_batch(load(..).collated)` (tested): the
/// pixel values go from each sample straight into the model's tensor, skipping the collated
/// (B, I, T, 3, H, W) buffer and its copy (two writes of ~15 MB per 4-tile sample, most of the
/// collate cost). With `eval`, filler rows (`MicroJob::fillers`, failed loads) are masked.
fn load_micro(inner: &Inner, job: &MicroJob, eval: bool) -> Result<MicroBatch, DataError> {
    let real = job.indices.len() - job.fillers;
    let (samples, used, replaced) = load_samples(inner, &job.indices, real)?;
    let (max_tiles, tile) = (inner.image.max_image_tiles, inner.image.tile);
    let mut c = collate::collate_text(
        &samples,
        inner.text.ids.pad,
        inner.text.ids.image,
        max_tiles,
        tile,
    );
    let fillers = mask_rows(&mut c, &filler_rows(job, &used, eval));
    let batch = to_model_batch_fused(&samples, &c);
    recycle(samples);
    Ok(MicroBatch {
        position: job.position,
        micro_step: job.micro_step,
        supervised_tokens: shifted_supervised(&c),
        batch,
        sample_indices: used,
        filler_rows: fillers,
        replaced,
    })
}

/// `to_model_batch(c)` with the pixel values written from `samples` straight into the tensor
/// (`pixel_tensor`) instead of copied from `c`: the loader's path; `c` is their `collate_text`.
pub fn to_model_batch_fused(samples: &[Sample], c: &collate::Batch) -> Batch {
    let mut batch = to_model_batch(c);
    if let Some(images) = batch.images.as_mut() {
        images.pixel_values = pixel_tensor(samples, c);
    }
    batch
}

/// The batch's (B, I, T, 3, H, W) pixel values, written from each sample's resized u8 image
/// straight into a fresh tensor (`collate::pack_pixels`): `c` is the batch's `collate_text`.
fn pixel_tensor(samples: &[Sample], c: &collate::Batch) -> Tensor {
    let (b, ni, h) = (c.batch as i64, c.num_images as i64, c.tile as i64);
    let pixels = Tensor::empty(
        [b, ni, c.max_tiles as i64, 3, h, h],
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let n = collate::pixel_len(c);
    assert_eq!(pixels.numel(), n);
    // SAFETY: a fresh, contiguous CPU f32 tensor of exactly n elements that nothing else
    // references yet; pack_pixels writes every element.
    let out = unsafe { std::slice::from_raw_parts_mut(pixels.data_ptr() as *mut f32, n) };
    // 15 MB per 4-tile sample: on 4 KiB pages the first-touch faults cost more than the writes
    crate::dist::thp::advise_fresh(out.as_ptr() as *const u8, n * 4);
    collate::pack_pixels(samples, c.num_images, c.max_tiles, c.tile, out);
    pixels
}

/// Hand the samples' resized images back to this thread's buffers once their pixels are written.
pub fn recycle(samples: Vec<Sample>) {
    for s in samples {
        if let Some(image::ProcessedImage {
            pixels: image::Pixels::Resized { image, .. },
            ..
        }) = s.image
        {
            super::scratch::give(image.data);
        }
    }
}

/// Count the labels that the shifted loss uses (`labels[:, 1:] != IGNORE`).
fn shifted_supervised(c: &collate::Batch) -> i64 {
    if c.seq_len == 0 {
        return 0;
    }
    c.labels
        .chunks_exact(c.seq_len)
        .map(|row| row[1..].iter().filter(|&&l| l != IGNORE).count() as i64)
        .sum()
}

/// The model's input tensors (CPU) for a collated batch.
pub fn to_model_batch(c: &collate::Batch) -> Batch {
    let (b, l) = (c.batch as i64, c.seq_len as i64);
    let (ni, t, h) = (c.num_images as i64, c.max_tiles as i64, c.tile as i64);
    // an empty pixel buffer (`collate_text`) gives an empty placeholder the fused path replaces
    let images = (ni > 0).then(|| Images {
        pixel_values: if c.pixel_values.is_empty() {
            Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu))
        } else {
            Tensor::from_slice(&c.pixel_values).view([b, ni, t, 3, h, h])
        },
        aspect_ratio_ids: Tensor::from_slice(&c.aspect_ratio_ids).view([b, ni]),
        aspect_ratio_mask: Tensor::from_slice(&c.aspect_ratio_mask).view([b, ni, t]),
        cross_attention_mask: Tensor::from_slice(&c.cross_attention_mask).view([b, l, ni, t]),
    });
    Batch {
        input_ids: Tensor::from_slice(&c.input_ids).view([b, l]),
        attention_mask: Some(Tensor::from_slice(&c.attention_mask).view([b, l])),
        labels: Some(Tensor::from_slice(&c.labels).view([b, l])),
        images,
    }
}

/// Set the labels of the rows flagged in `filler` to IGNORE; returns how many. `labels`: (B, L).
fn mask_rows(c: &mut collate::Batch, filler: &[bool]) -> usize {
    let seq = c.seq_len;
    if seq > 0 {
        for (row, &f) in c.labels.chunks_exact_mut(seq).zip(filler) {
            if f {
                row.fill(IGNORE);
            }
        }
    }
    filler.iter().filter(|&&f| f).count()
}

/// The split's report after decoding every image of the dataset (what training would do), with
/// `data.num_workers` threads: a sample whose image does not decode is a bad record (in file
/// order among the others), and its length, tiles and tokens leave the statistics. Used by
/// `trainer data check`.
pub fn checked_report(ds: &Dataset) -> ScanReport {
    let inner = &ds.inner;
    let workers = inner.num_workers.max(1);
    let idx: Vec<usize> = (0..inner.records.len())
        .filter(|&i| inner.records[i].image.is_some())
        .collect();
    let chunk = idx.len().div_ceil(workers).max(1);
    let failed: Vec<(usize, Problem)> = std::thread::scope(|s| {
        let handles: Vec<_> = idx
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .filter_map(|&i| {
                            let r = &inner.records[i];
                            let p = r.image.as_ref()?;
                            let problem = |reason| Problem {
                                file: r.file.clone(),
                                line: r.line,
                                reason,
                            };
                            image::load_rgb(p).err().map(|reason| (i, problem(reason)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("check worker panicked"))
            .collect()
    });
    let mut report = ds.report.clone();
    if failed.is_empty() {
        return report;
    }
    let gone: std::collections::BTreeSet<usize> = failed.iter().map(|(i, _)| *i).collect();
    for &i in &gone {
        let c = inner.counted[i];
        report.ok -= 1;
        report.truncated -= usize::from(c.truncated);
        report.supervised_tokens -= c.supervised as u64;
        report.total_tokens -= inner.lengths[i] as u64;
        if let Some(n) = report.tiles.get_mut(&c.tiles) {
            *n -= 1;
            if *n == 0 {
                report.tiles.remove(&c.tiles);
            }
        }
    }
    report.lengths = (inner.lengths.iter().enumerate())
        .filter(|(i, _)| !gone.contains(i))
        .map(|(_, &n)| n)
        .collect();
    *report.skipped.entry("bad record".into()).or_default() += failed.len();
    report.problems.extend(failed.into_iter().map(|(_, p)| p));
    sort_in_file_order(&mut report.problems, &inner.file);
    report
}

/// Records whose id an earlier record of the split has (ids name samples in `data dump` and the
/// logs; training itself does not read them): how many, and the first as "ID at FILE:LINE
/// (first at FILE:LINE)". Records without an id are left out.
fn repeated_ids(records: &[Record]) -> (usize, Option<String>) {
    let mut first: HashMap<&str, &Record> = HashMap::new();
    let (mut count, mut example) = (0, None);
    for r in records.iter().filter(|r| !r.id.is_empty()) {
        match first.get(r.id.as_str()) {
            Some(f) => {
                count += 1;
                example.get_or_insert_with(|| {
                    format!(
                        "{:?} at {}:{} (first at {}:{})",
                        r.id,
                        r.file.display(),
                        r.line,
                        f.file.display(),
                        f.line
                    )
                });
            }
            None => drop(first.insert(&r.id, r)),
        }
    }
    (count, example)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokenizer files of another model (here: config.json's image_token_index or vocab_size
    /// changed) are refused when the data is opened, naming the folder.
    #[test]
    fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let src = fixtures.join("train/model");
        // the fixture's training data over the model folder `model`
        let scan = |model: &Path| {
            let yaml = format!(
                "model: {{path: {}}}\ndata: {{train: {}, image_root: {}}}\n",
                model.display(),
                fixtures.join("train/train.jsonl").display(),
                fixtures.join("data/images").display()
            );
            let config = crate::config::parse(&yaml, &[]).unwrap();
            Dataset::scan(&config, model, Split::Train)
        };
        for (key, value, want) in [
            ("image_token_index", 5, "image_token_index is 5"),
            // (its special ids, 455-459, stay inside: config.json itself is valid)
            ("vocab_size", 600, "embedding has 608 rows"),
        ] {
            let dir = std::env::temp_dir().join(format!("tok-fit-{key}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
            let cfg_path = dir.join("config.json");
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            if key == "vocab_size" {
                cfg["text_config"][key] = value.into();
            } else {
                cfg[key] = value.into();
            }
            std::fs::write(&cfg_path, cfg.to_string()).unwrap();
            let err = match scan(&dir) {
                Ok(_) => panic!("{key}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(want) && err.contains("not this model's"),
                "{key}: {err}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        // the fixture itself fits
        assert!(scan(&src).is_ok());
    }
}
