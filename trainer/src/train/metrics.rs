//! What a run reports: `metrics.jsonl` in `train.output_dir` (rank 0; one JSON object per
//! optimizer step and per validation), and progress on rank 0: an indicatif bar (step, loss,
//! tokens/s, TFLOP/s, MFU, ETA) when stderr is a terminal, plain log lines otherwise.
//!
//! Step fields: step, epoch, loss (true mean over the global batch), ppl (exp(loss), null when
//! not finite: llama-recipes' train_step_perplexity), lr, grad_norm, tokens
//! (supervised tokens of the global batch), tokens_per_s, step_s (from asking the loader for the
//! step's micro-batches to the end of the optimizer step), data_s (of it, waiting for the loader:
//! a data bottleneck shows here), mem_bytes (resident set of rank 0), gpu_mem_bytes (rank 0's
//! device memory in use, as nvidia-smi counts it; null on CPU), param_bytes (parameter bytes
//! resident on rank 0 between steps), tflops (achieved
//! model TFLOP/s per rank, see `flops`), hw_tflops (executed TFLOP/s per rank: with the forward
//! recompute of activation checkpointing), mfu (tflops / the device's peak; null when unknown),
//! replaced_samples (samples of the step, all ranks, that failed to load under
//! `data.bad_records: skip` and were replaced by the next loadable one),
//! flops (the step's model FLOPs summed over all ranks: `trainer eval --train-metrics` adds them
//! up), world_size; the last step of an epoch also epoch_loss (the mean of the epoch's finite step
//! losses, steps before a resume included: llama-recipes' train_epoch_loss) and epoch_ppl
//! (exp(epoch_loss): its train_epoch_perplexity).
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tch::Device;

use crate::config::Config;
use crate::data::dataset::MicroBatch;
use crate::dist::ProcessGroup;

use super::flops::{device_peak_tflops, FlopCount};
use super::step::StepResult;

/// One optimizer step as the loop saw it.
pub(super) struct StepReport<'a> {
    pub step: u64,
    pub epoch: u64,
    pub result: &'a StepResult,
    pub lr: f64,
    pub step_s: f64,
    /// Of `step_s`, the wait for the loader's micro-batches.
    pub data_s: f64,
    /// This rank's micro-batches (their token counts give the FLOPs).
    pub batches: &'a [MicroBatch],
    pub param_bytes: i64,
    /// The epoch's last step.
    pub epoch_end: bool,
}

/// The step a run resumes from, as the checkpoint records it.
pub(super) struct ResumedAt {
    pub step: u64,
    /// Its loss (None from older trainers' checkpoints): tells the run's own metrics history
    /// from another run's.
    pub loss: Option<f64>,
    /// Whether its validation finished (else it is validated again and writes its line again).
    pub validated: bool,
}

pub(super) struct Meter {
    file: Option<std::fs::File>,
    /// `train.tensorboard` (rank 0): dropped, with a warning, at its first write error (the
    /// run and metrics.jsonl go on).
    tensorboard: Option<super::tensorboard::EventWriter>,
    flops: FlopCount,
    /// Activation checkpointing recomputes each unit's forward (counted in `hw_tflops`).
    recompute: bool,
    peak_tflops: Option<f64>,
    bar: Option<ProgressBar>,
    rank: usize,
    world: usize,
    total: u64,
    log_every: u64,
    /// Samples replaced at load time (all ranks) since the last epoch summary.
    replaced_in_epoch: u64,
    /// (epoch, loss) of every step in metrics.jsonl (rank 0: a resumed run's kept lines too; a
    /// non-finite loss as NaN), for the epoch means.
    losses: Vec<(u64, f64)>,
}

impl Meter {
    /// Right before the first step: the ETA's rate is measured from here and from the resumed
    /// position (as tqdm's `initial`), not from 0 (the resumed steps would count as done in the
    /// first interval, the ETA near zero) nor from the bar's creation (set-up time).
    pub fn start_steps(&self) {
        if let Some(bar) = &self.bar {
            bar.tick(); // (records the resumed position in the estimator)
            bar.reset_eta();
        }
    }

    /// A fresh metrics file, or, when resuming, the existing one without the lines of later
    /// steps (those are trained again), nor the resumed step's validation line unless it was
    /// validated: a checkpoint whose validation never finished (a crash after the line, before
    /// validation.json) is validated again, and writes its line again. (`open_file` on another
    /// run's history there.)
    pub fn open(
        config: &Config,
        pg: &ProcessGroup,
        device: Device,
        flops: FlopCount,
        total: u64,
        resumed: Option<ResumedAt>,
    ) -> Result<Self> {
        let rank = pg.rank();
        // the peak of the dtype the matmuls run in (model.dtype without FSDP)
        let compute = crate::fsdp::kind_of(config.compute_dtype().1);
        let peak_tflops = match config.train.peak_tflops {
            Some(p) => Some(p),
            None => device_peak_tflops(device, compute).map(|(p, name)| {
                log(rank, &format!("MFU against {p} TFLOP/s ({name}, {compute:?}; set train.peak_tflops to override)"));
                p
            }),
        };
        let opened = if rank == 0 {
            open_file(&config.train.output_dir, resumed.as_ref()).map(|opened| {
                // (informational: a failure is a warning, not an error on rank 0 alone while
                // the other ranks go on into collectives)
                if let Err(e) = write_config(config) {
                    tracing::warn!("{e:#}");
                }
                Some(opened)
            })
        } else {
            Ok(None)
        };
        // (agreed: metrics.jsonl that cannot be opened or set aside stops every rank, not rank
        // 0 alone with the others waiting in the first step's collectives)
        let opened = crate::checkpoint::agree(pg, device, opened, || {
            "rank 0 could not open metrics.jsonl in train.output_dir".to_string()
        })?;
        let (file, kept, restored) = match opened {
            Some(o) => (Some(o.file), o.kept, o.restored),
            None => (None, vec![], false),
        };
        let losses = kept
            .iter()
            .filter(|v| v["validation"].as_bool() != Some(true) && v.get("loss").is_some())
            .filter_map(|v| Some((v["epoch"].as_u64()?, v["loss"].as_f64().unwrap_or(f64::NAN))))
            .collect();
        // (informational: a failure is a warning, as for the resolved config above)
        let tensorboard = match rank == 0 && config.train.tensorboard {
            true => {
                let dir = config.train.output_dir.join(super::tensorboard::DIR);
                // a resumed run replaces the points of the resumed step on: those of the run
                // that went on past its checkpoint, and the resumed step's own, written again
                // from the lines kept (all of them when they came from another folder)
                let from = resumed.as_ref().map(|r| r.step);
                let replayed = if restored { Some(0) } else { from };
                match super::tensorboard::EventWriter::create(&dir, from)
                    .and_then(|w| replay(w, &kept, replayed))
                {
                    Ok(w) => {
                        log(
                            rank,
                            &format!(
                                "TensorBoard scalars in {} (tensorboard --logdir {})",
                                w.path().display(),
                                dir.display()
                            ),
                        );
                        Some(w)
                    }
                    Err(e) => {
                        tracing::warn!("train.tensorboard: cannot create an event file in {} ({e}); no TensorBoard scalars this run (metrics.jsonl has them all)", dir.display());
                        None
                    }
                }
            }
            false => None,
        };
        let bar = (rank == 0 && crate::logging::progress_bars_enabled()).then(|| {
            let style = ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar =
                ProgressBar::with_draw_target(Some(total), crate::logging::progress_draw_target())
                    .with_style(style)
                    .with_position(resumed.as_ref().map_or(0, |r| r.step));
            // every log line (any thread) now clears the bar, prints, and redraws it
            crate::logging::set_active_bar(Some(bar.clone()));
            bar
        });
        Ok(Self {
            file,
            tensorboard,
            flops,
            recompute: config.fsdp.enabled && config.fsdp.activation_checkpointing,
            peak_tflops,
            bar,
            rank,
            world: pg.world_size(),
            total,
            log_every: config.train.log_every.max(1),
            replaced_in_epoch: 0,
            losses,
        })
    }

    /// Records one step: every rank must call it (the FLOPs are averaged over ranks).
    pub fn step(&mut self, pg: &ProcessGroup, device: Device, s: StepReport) -> Result<()> {
        let (model, executed) = self.flops.step_flops(s.batches, self.recompute);
        // the input tokens (prompt, answer; not padding) this rank computed on
        let input: f64 = s
            .batches
            .iter()
            .map(|mb| match &mb.batch.attention_mask {
                Some(m) => m.sum(tch::Kind::Int64).double_value(&[]),
                None => mb.batch.input_ids.numel() as f64,
            })
            .sum();
        let replaced: usize = s.batches.iter().map(|mb| mb.replaced).sum();
        // one all-reduce for all four, summed over ranks, then per rank
        let sums = all_reduce_sum(pg, [model, executed, input, replaced as f64], device)?;
        let replaced = sums[3] as u64;
        self.replaced_in_epoch += replaced;
        let per_rank_s = self.world as f64 * s.step_s;
        let tflops = sums[0] / per_rank_s / 1e12;
        let hw_tflops = sums[1] / per_rank_s / 1e12;
        let mfu = self.peak_tflops.map(|p| tflops / p);
        let r = s.result;
        // supervised (answer) tokens of the global batch per second, and every input token per
        // second per rank (torchtitan's and torchtune's tok/s/GPU)
        let tokens_per_s = r.tokens as f64 / s.step_s;
        let input_tokens_per_s_per_rank = sums[2] / per_rank_s;
        self.losses.push((s.epoch, r.loss));
        // metrics.jsonl has every step; the console every train.log_every steps and the last
        let mut line = json!({
            "step": s.step, "epoch": s.epoch, "loss": r.loss, "ppl": perplexity(r.loss), "lr": s.lr, "grad_norm": r.grad_norm,
            "tokens": r.tokens, "tokens_per_s": tokens_per_s,
            "input_tokens_per_s_per_rank": input_tokens_per_s_per_rank, "step_s": s.step_s,
            "data_s": s.data_s, "mem_bytes": resident_bytes(), "gpu_mem_bytes": gpu_used_bytes(device), "tflops": tflops, "hw_tflops": hw_tflops, "mfu": mfu,
            "param_bytes": s.param_bytes, "flops": sums[0], "world_size": self.world,
            "replaced_samples": replaced,
        });
        if s.epoch_end {
            let mean = self.epoch_mean(s.epoch).0;
            line["epoch_loss"] = json!(mean);
            line["epoch_ppl"] = json!(mean.and_then(perplexity));
        }
        self.write(line)?;
        if self.rank != 0 || !(s.step.is_multiple_of(self.log_every) || s.step == self.total) {
            return Ok(());
        }
        let mfu_text = mfu.map_or(String::new(), |m| format!(" MFU {:.1}%", m * 100.0));
        let rate = if tflops < 0.1 {
            format!("{:.2} GFLOP/s/rank", tflops * 1e3)
        } else {
            format!("{tflops:.2} TFLOP/s/rank")
        };
        // (input tokens and FLOPs per rank, as torchtitan logs them; supervised tokens are the
        // global batch's, as metrics.jsonl's tokens_per_s)
        let line = format!(
            "loss {:.4} {input_tokens_per_s_per_rank:.0} tok/s/rank, {tokens_per_s:.0} supervised tok/s in all, {rate}{mfu_text}",
            r.loss
        );
        match &self.bar {
            Some(bar) => {
                bar.set_message(line);
                bar.set_position(s.step);
            }
            None => tracing::info!("step {}/{} {line}", s.step, self.total),
        }
        Ok(())
    }

    /// Writes one JSON line (rank 0; [`append_line`]).
    pub fn write(&mut self, v: Value) -> Result<()> {
        append_line(&mut self.file, &v);
        if let (Some(tb), Some((step, values))) =
            (&mut self.tensorboard, super::tensorboard::scalars_of(&v))
        {
            if let Err(e) = tb.scalars(step, &values) {
                tracing::warn!(
                    "train.tensorboard: writing {} failed ({e}); no more TensorBoard scalars this run (metrics.jsonl has them all)",
                    tb.path().display()
                );
                self.tensorboard = None;
            }
        }
        Ok(())
    }

    /// A log line (rank 0); the logger keeps it clear of the progress bar.
    pub fn log(&self, msg: &str) {
        log(self.rank, msg)
    }

    /// The mean of `epoch`'s finite step losses (None when none is finite), and its number of
    /// steps and of non-finite ones.
    fn epoch_mean(&self, epoch: u64) -> (Option<f64>, usize, usize) {
        let losses: Vec<f64> = self
            .losses
            .iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, l)| *l)
            .collect();
        let finite: Vec<f64> = losses.iter().copied().filter(|l| l.is_finite()).collect();
        let mean = (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64);
        (mean, losses.len(), losses.len() - finite.len())
    }

    /// The one-line summary of an epoch: of all its steps, those before a mid-epoch resume too
    /// (from metrics.jsonl); skipped non-finite steps are counted, not averaged. `seconds`: of
    /// this process's part.
    pub fn epoch_summary(&mut self, epoch: u64, seconds: f64) {
        let replaced = std::mem::take(&mut self.replaced_in_epoch);
        if replaced > 0 {
            self.log(&format!(
                "epoch {epoch}: {replaced} sample(s) failed to load and were replaced by the next loadable sample, which trained twice (data.bad_records: skip; their errors are in the log above, `trainer data check CONFIG` lists unreadable images)"
            ));
        }
        let (mean, steps, nonfinite) = self.epoch_mean(epoch);
        if steps == 0 {
            return;
        }
        let mean = mean.map_or("none finite".to_string(), |m| format!("{m:.4}"));
        let skipped = match nonfinite {
            0 => String::new(),
            n => format!(" ({n} non-finite, not averaged)"),
        };
        self.log(&format!(
            "epoch {epoch}: {steps} steps, mean loss {mean}{skipped}, {seconds:.1} s"
        ));
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
            crate::logging::set_active_bar(None);
            // the next output starts below the finished bar, not over it
            let _ = writeln!(std::io::stderr()); // (eprintln! panics on a hung-up terminal)
        }
    }
}

impl Drop for Meter {
    /// A run that ends with an error leaves no bar for later log lines to suspend.
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            crate::logging::set_active_bar(None);
            if !bar.is_finished() {
                // leave the bar as it stood, and the error that follows on a line of its own
                bar.abandon();
                let _ = writeln!(std::io::stderr());
            }
        }
    }
}

/// The resolved config (every default filled in, overrides applied) as `resolved_config.yaml`
/// beside metrics.jsonl, as llama-recipes keeps `train_params.yaml` and HF's Trainer its
/// arguments: `trainer train OUTPUT_DIR/resolved_config.yaml` runs it again. Replaced whole by
/// each launch (a resume with other settings records those). (Not `config.yaml`: a user's own
/// config kept there, comments and all, must not be overwritten.)
pub const RESOLVED_CONFIG: &str = "resolved_config.yaml";
fn write_config(config: &Config) -> Result<()> {
    let path = config.train.output_dir.join(RESOLVED_CONFIG);
    let yaml = config.to_yaml()?;
    crate::checkpoint::replace_synced(&path, yaml.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The files a training run writes into `train.output_dir`, and its TensorBoard folder (one
/// folder is one run to TensorBoard: a new run's curves must not continue the last one's).
const RUN_FILES: [&str; 6] = [
    "metrics.jsonl",
    RESOLVED_CONFIG,
    "adapter_config.json",
    "adapter_model.safetensors",
    crate::checkpoint::PROMPT_FILE,
    super::tensorboard::DIR,
];

/// A fresh run (not resumed) into a `train.output_dir` that holds an earlier run's results (its
/// metrics lines or its adapter) moves that run's files into `previous-run-<UTC time>/` there,
/// and says so: a reused output folder must not lose them. (llama-recipes overwrites them; HF's
/// example scripts refuse a folder that is not empty.) Returns the folder they went to.
fn set_aside_previous_run(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let metrics = std::fs::metadata(dir.join(RUN_FILES[0])).map_or(0, |m| m.len());
    let events = std::fs::read_dir(dir.join(super::tensorboard::DIR))
        .is_ok_and(|mut entries| entries.next().is_some());
    if metrics == 0 && !events && !dir.join("adapter_config.json").exists() {
        return Ok(None);
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let stamp = crate::data::template::strftime("%Y%m%d-%H%M%S", secs);
    let aside = (1..)
        .map(|n| match n {
            1 => dir.join(format!("previous-run-{stamp}")),
            _ => dir.join(format!("previous-run-{stamp}-{n}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for name in RUN_FILES {
        let from = dir.join(name);
        if from.exists() {
            std::fs::rename(&from, aside.join(name))
                .with_context(|| format!("moving {} into {}", from.display(), aside.display()))?;
        }
    }
    crate::checkpoint::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(Some(aside))
}

/// Appends `v` to metrics.jsonl as one line. A write that fails (a full disk) is logged and ends
/// the file's lines (`file` becomes None), not the run: rank 0 stopping alone would leave the
/// other ranks waiting in the next step's collectives, while the checkpoints, which every rank
/// saves together, stop the run as one where the disk is really full.
fn append_line(file: &mut Option<std::fs::File>, v: &Value) {
    let Some(f) = file else {
        return;
    };
    if let Err(e) = writeln!(f, "{v}").and_then(|()| f.flush()) {
        let step = v.get("step").map_or("?".to_string(), |s| s.to_string());
        tracing::error!(
            "metrics.jsonl: writing failed ({e}): no more lines there this run (from step {step}); free space, then a resume from the next checkpoint records again"
        );
        *file = None;
    }
}

/// metrics.jsonl for appending ([`Opened`]). When resuming, a metrics.jsonl whose line of the
/// resumed step has another loss than the checkpoint recorded is another run's history (a run started over into this folder since, whose checkpoints `resume: auto`
/// passed over), and so is one without that line where a `previous-run-*` folder holds it: it is
/// set aside with the other run files, and the resumed run's history taken from that folder.
fn open_file(dir: &Path, resumed: Option<&ResumedAt>) -> Result<Opened> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating train.output_dir {}", dir.display()))?;
    if resumed.is_none() {
        // (a launcher's restart with no checkpoint of its launch starts over: the files are
        // most likely the failed attempt's)
        let earlier = match crate::checkpoint::load::restart_attempt() {
            Some(n) => format!("an earlier run's, or the attempt before restart {n}'s,"),
            None => "an earlier run's".to_string(),
        };
        if let Some(aside) = set_aside_previous_run(dir)? {
            tracing::warn!(
                "train.output_dir {} held {earlier} metrics.jsonl or adapter, and this run is not resumed from a checkpoint: those files are moved into {} (nothing is deleted; give each run its own train.output_dir to keep them apart)",
                dir.display(),
                aside.display()
            );
        }
    }
    let path = dir.join("metrics.jsonl");
    let (kept, restored) = match resumed {
        Some(r) => {
            let (lines, restored) = resumed_history(dir, r.step, r.loss)?;
            warn_if_adapter_from_later(dir, r.step, &lines);
            let kept = lines
                .into_iter()
                .filter(|v| {
                    let validation = v["validation"].as_bool() == Some(true);
                    v["step"].as_u64().is_some_and(|s| {
                        s < r.step || (s == r.step && (r.validated || !validation))
                    })
                })
                .collect();
            (kept, restored)
        }
        None => (vec![], false),
    };
    // the kept lines go into a new file that then replaces the old one: a kill while rewriting
    // (truncating it in place) would lose the run's history
    let fresh = dir.join("metrics.jsonl.partial");
    let mut file =
        std::fs::File::create(&fresh).with_context(|| format!("creating {}", fresh.display()))?;
    for l in &kept {
        writeln!(file, "{l}").with_context(|| format!("writing {}", fresh.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("writing {}", fresh.display()))?;
    std::fs::rename(&fresh, &path)
        .with_context(|| format!("replacing {} with {}", path.display(), fresh.display()))?;
    Ok(Opened {
        file,
        kept,
        restored,
    })
}

/// metrics.jsonl opened for appending, the lines kept from an earlier launch (a resumed run's),
/// and whether those came from a `previous-run-*` folder (the event files there stay: all of them
/// go to this folder's TensorBoard again).
struct Opened {
    file: std::fs::File,
    kept: Vec<Value>,
    restored: bool,
}

/// The adapter in `dir` may be of a step after `step` (the one resumed from), which this resume
/// trains again: with validation lines the best validated step's (when that is after `step`),
/// else the last epoch end's after it (where the adapter is written). Said, with how to get the
/// resumed step's: it stays until this run writes its own.
fn warn_if_adapter_from_later(dir: &Path, step: u64, lines: &[Value]) {
    let validation = |v: &&Value| v["validation"].as_bool() == Some(true);
    let best = lines
        .iter()
        .filter(validation)
        .filter_map(|v| Some((v["eval_loss"].as_f64()?, v["step"].as_u64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let written = match best {
        Some((_, s)) => Some(s),
        None => lines
            .iter()
            .filter(|v| v.get("epoch_loss").is_some())
            .filter_map(|v| v["step"].as_u64())
            .max(),
    };
    if let (Some(s), true) = (
        written.filter(|&s| s > step),
        dir.join("adapter_config.json").exists(),
    ) {
        tracing::warn!(
            "train.output_dir {}: its adapter may be the one written at step {s}, one of the steps after step {step} that this resume trains again; it stays until this run writes its own (the next epoch end, or a better validation); `trainer export --checkpoint` of the checkpoint resumed gives that step's weights",
            dir.display()
        );
    }
}

/// The lines of `path` that parse (a line a kill cut mid-character is dropped, not the whole
/// history).
fn parsed_lines(path: &Path) -> Result<Vec<Value>> {
    Ok(String::from_utf8_lossy(&earlier_lines(path)?)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}

/// Whether `lines` hold step `step`'s line with loss `loss`, bit for bit (JSON keeps an f64 exact).
fn holds_step(lines: &[Value], step: u64, loss: f64) -> bool {
    lines.iter().any(|v| {
        v["validation"].as_bool() != Some(true)
            && v["step"].as_u64() == Some(step)
            && v["loss"].as_f64() == Some(loss)
    })
}

/// The metrics lines of the run resumed at `step`, and whether they came from a
/// `previous-run-*` folder (see `open_file`). Without the step's line (lines lost to a failed
/// write or a crash, or an empty file of a run that died at once) the file stays this run's
/// unless a `previous-run-*` folder holds the line.
fn resumed_history(dir: &Path, step: u64, loss: Option<f64>) -> Result<(Vec<Value>, bool)> {
    let lines = parsed_lines(&dir.join("metrics.jsonl"))?;
    let Some(loss) = loss else {
        return Ok((lines, false)); // (an older trainer's checkpoint: no loss to tell runs by)
    };
    if holds_step(&lines, step, loss) {
        return Ok((lines, false));
    }
    let other_run = lines
        .iter()
        .any(|v| v["validation"].as_bool() != Some(true) && v["step"].as_u64() == Some(step));
    let found = earlier_history(dir, step, loss);
    if found.is_none() && !other_run {
        if !lines.is_empty() {
            tracing::warn!(
                "train.output_dir {}: metrics.jsonl has no line of step {step}, the step resumed from (lines lost to a failed write or a crash?): it is continued as it is",
                dir.display()
            );
        }
        return Ok((lines, false));
    }
    let aside = set_aside_previous_run(dir)?;
    let aside = match aside {
        Some(a) => format!("its files are moved into {}", a.display()),
        None => "it held no lines".to_string(),
    };
    let (from, lines, restored) = match found {
        Some((path, lines)) => (
            format!("the resumed run's lines are continued from {}", path.display()),
            lines,
            true,
        ),
        None => (
            format!("the resumed run's own lines were not found (metrics.jsonl starts after step {step})"),
            vec![],
            false,
        ),
    };
    tracing::warn!(
        "train.output_dir {}: metrics.jsonl is not the history of the run resumed from step {step} (another run wrote into this folder since, e.g. one started with checkpoint.resume: never); {aside}, and {from}",
        dir.display()
    );
    Ok((lines, restored))
}

/// The newest `previous-run-*/metrics.jsonl` in `dir` that holds step `step` with loss `loss`, and
/// its lines (a folder that cannot be read is passed over, with a warning).
fn earlier_history(dir: &Path, step: u64, loss: f64) -> Option<(std::path::PathBuf, Vec<Value>)> {
    let mut earlier: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("previous-run-"))
        .map(|e| e.path().join("metrics.jsonl"))
        .filter(|p| p.exists())
        .collect();
    earlier.sort(); // (by time, the newest last)
    earlier
        .into_iter()
        .rev()
        .find_map(|path| match parsed_lines(&path) {
            Ok(lines) => holds_step(&lines, step, loss).then_some((path, lines)),
            Err(e) => {
                tracing::warn!("{e:#} (passed over)");
                None
            }
        })
}

/// exp(loss) when finite (llama-recipes' perplexity).
fn perplexity(loss: f64) -> Option<f64> {
    Some(loss.exp()).filter(|p| p.is_finite())
}

/// Writes the scalars of the kept metrics lines of steps from `from` on (a resumed run's step,
/// whose points the file's purge event drops from the earlier files) into a new event file.
fn replay(
    mut w: super::tensorboard::EventWriter,
    kept: &[Value],
    from: Option<u64>,
) -> std::io::Result<super::tensorboard::EventWriter> {
    let Some(from) = from else {
        return Ok(w);
    };
    for (step, values) in kept.iter().filter_map(super::tensorboard::scalars_of) {
        if step >= from {
            w.scalars(step, &values)?;
        }
    }
    Ok(w)
}

/// The bytes of an earlier run's metrics.jsonl (none when it is not there), read lossily by the
/// caller: a line a kill cut mid-character is dropped, not the whole history.
fn earlier_lines(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        read => read.with_context(|| format!("reading {}", path.display())),
    }
}

/// Resident set size of this process in bytes (Linux), else 0.
fn resident_bytes() -> u64 {
    // SAFETY: sysconf only reads a system value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// The device memory in use on `device` (total less free: this process's allocator pool and
/// context, and any other process's, as nvidia-smi counts it); None on CPU or when the driver
/// does not say.
fn gpu_used_bytes(device: Device) -> Option<u64> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    kernels::runtime::gpu(ordinal as i32)
        .ok()?
        .make_current()
        .ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

pub(super) fn log(rank: usize, msg: &str) {
    if rank == 0 {
        tracing::info!("{msg}");
    }
}

/// Sums `v` over ranks (one collective for both numbers).
fn all_reduce_sum<const N: usize>(
    pg: &ProcessGroup,
    v: [f64; N],
    device: Device,
) -> Result<[f64; N]> {
    let t = tch::Tensor::from_slice(&v).to_device(device);
    pg.all_reduce(&t, crate::dist::ReduceOp::Sum)?;
    Ok(std::array::from_fn(|i| t.double_value(&[i as i64])))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line that cannot be written (a full disk: /dev/full) ends the file's lines, not the
    /// run; lines written before it stay.
    #[test]
    fn a_failed_metrics_write_ends_the_file_not_the_run() {
        let path = std::env::temp_dir().join(format!("metrics-{}.jsonl", std::process::id()));
        let mut file = Some(std::fs::File::create(&path).unwrap());
        append_line(&mut file, &json!({"step": 1}));
        assert!(file.is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\":1}\n");
        let _ = std::fs::remove_file(&path);
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .ok();
        if full.is_none() {
            return; // (no /dev/full here)
        }
        append_line(&mut full, &json!({"step": 2}));
        assert!(full.is_none());
        append_line(&mut full, &json!({"step": 3}));
    }
}
