//! The training loop (torchtitan's train.py as a model): state declared in one place, construction
//! as numbered steps, a short loop. One process = one rank; `launcher` starts W of them.
//!
//! Loss normalization: every optimizer step sees `batch_size x world x grad_accum` samples; the
//! loss is the sum of token losses over all of them divided by the global count of supervised
//! tokens (all-reduced before the first backward), so the logged loss is the true mean and
//! world 2 x batch 2 trains exactly like world 1 x batch 4.
//!
//! Checkpoints (issue 8, `crate::checkpoint`): resumed before the loop per `checkpoint.resume`;
//! saved every `checkpoint.every_steps` steps, at the end of each completed epoch, and on SIGTERM.
//!
//! Hooks: `TRAINER_DUMP_TRAINABLE=FILE` makes rank 0 write the final trainable weights (fp32,
//! by name) to FILE as safetensors (tests and debugging). `TRAINER_STOP_AFTER_STEP=N` acts as a
//! SIGTERM received during step N (tests of the preemption path).
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Progress};
use crate::config::{self, Config};
use crate::data::dataset::{Dataset, MicroBatch, Split};
use crate::dist::{self, ProcessGroup, ReduceOp};
use crate::fsdp::{kind_of, FsdpModel, PlainModel, Trainable, WrapOptions};
use crate::model::{
    AttentionImpl, Batch, Images, LoadOptions, LoraConfig, MllamaModel, TargetModules,
};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub steps: u64,
    /// Stopped early by SIGTERM (the caller exits 143).
    pub interrupted: bool,
    pub last_loss: Option<f64>,
}

/// Everything the loop mutates, in one place.
struct State {
    step: u64,
    epoch: u64,
    /// Global batches of the current epoch consumed so far (the data position).
    epoch_batch: u64,
    /// The step of the last checkpoint saved (or resumed from).
    saved_step: Option<u64>,
    skipped_nonfinite: u64,
    last_loss: Option<f64>,
}

pub fn train(config: &Config) -> Result<Outcome> {
    // 1. Ranks and collectives.
    let pg = ProcessGroup::from_env(backend(config.fsdp.backend), Duration::from_secs(600))
        .context("setting up the process group")?;
    let (rank, world) = (pg.rank(), pg.world_size());
    let device = if pg.backend_name() == "nccl" {
        Device::Cuda(launcher::env::RankEnv::from_env()?.local_rank)
    } else {
        Device::Cpu
    };
    if !config.fsdp.enabled && world > 1 {
        bail!("fsdp.enabled: false trains in one process, but this run has {world} ranks (launch one rank, or set fsdp.enabled: true)");
    }
    let t = &config.train;
    install_sigterm_handler();

    // 2. Model (+ LoRA), seeded, then sharded.
    let mut model = load_model(config, device)?;
    let flops_per_token = FlopCount::of(&model);
    let mut trainable = if config.fsdp.enabled {
        if !config.fsdp.activation_checkpointing {
            bail!("fsdp.activation_checkpointing: false is not implemented yet (every unit is recomputed in backward); set it to true");
        }
        let opts = WrapOptions {
            compute: kind_of(config.fsdp.mixed_precision),
            prefetch: config.fsdp.prefetch,
        };
        Trainable::Fsdp(Box::new(FsdpModel::wrap(model, &pg, opts)?))
    } else {
        model.set_training(true);
        Trainable::Plain(Box::new(PlainModel::new(model)))
    };

    // 3. Data.
    let train_ds = Dataset::open(config, &config.model.path, Split::Train)?;
    let eval_ds = t
        .validate
        .then(|| Dataset::open(config, &config.model.path, Split::Eval))
        .transpose()?;
    let steps_per_epoch = train_ds.batches_per_epoch(t.global_batch(world));
    if steps_per_epoch == 0 {
        bail!("{} samples do not fill one global batch of {} (batch_size {} x world {world} x grad_accum {}); lower train.batch_size", train_ds.len(), t.global_batch(world), t.batch_size, t.grad_accum);
    }
    let total_steps = t
        .step_limit()
        .unwrap_or(u64::MAX)
        .min(steps_per_epoch * t.epochs as u64);

    // 4. Optimizer and schedule over this rank's shards.
    let params = trainable.master_params();
    let adamw = AdamWConfig {
        weight_decay: t.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(adamw, &params);
    let schedule = LrSchedule::new(t.lr, &t.schedule, total_steps);
    let mut st = State {
        step: 0,
        epoch: 0,
        epoch_batch: 0,
        saved_step: None,
        skipped_nonfinite: 0,
        last_loss: None,
    };
    let mut start = (0u64, 0u64); // (epoch, batch) the data starts at
    if let Some(r) = checkpoint::resume(&pg, device, config, &mut trainable, &mut opt)? {
        let p = r.progress;
        log(rank, &format!("resumed from {} (step {}, epoch {}, data at epoch {} batch {}, saved by {} rank(s))", r.dir.display(), p.step, p.epoch, p.data_epoch, p.data_batch, r.world_size));
        st.step = p.step;
        st.epoch = p.epoch;
        st.skipped_nonfinite = p.skipped_nonfinite;
        st.saved_step = Some(p.step);
        start = (p.data_epoch, p.data_batch);
    }
    let ck = &config.checkpoint;
    if ck.async_save {
        log(rank, "checkpoint.async: checkpoint files are written by a background thread; a checkpoint is published once every rank has written its file (at the latest before the next save and at the end)");
    }
    let mut metrics = Metrics::open(&t.output_dir, rank == 0, st.saved_step)?;
    // At most one save in flight: a new one first completes the previous one.
    let mut pending: Option<checkpoint::save::PendingSave> = None;
    let save = |pending: &mut Option<checkpoint::save::PendingSave>,
                st: &State,
                trainable: &Trainable,
                opt: &AdamW,
                data: (u64, u64)|
     -> Result<()> {
        if let Some(p) = pending.take() {
            p.finish(&pg, device)?;
        }
        let progress = Progress {
            step: st.step,
            epoch: st.epoch,
            data_epoch: data.0,
            data_batch: data.1,
            skipped_nonfinite: st.skipped_nonfinite,
        };
        let p = checkpoint::save::begin(
            &pg,
            config,
            trainable,
            opt,
            &schedule,
            &progress,
            ck.async_save,
        )
        .with_context(|| format!("saving the checkpoint of step {}", st.step))?;
        if ck.async_save {
            *pending = Some(p);
        } else {
            p.finish(&pg, device)?;
        }
        Ok(())
    };
    let stop_after = std::env::var("TRAINER_STOP_AFTER_STEP")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    log(rank, &format!("training {} steps ({steps_per_epoch} per epoch) on {world} rank(s), {} backend, fsdp {}", total_steps, pg.backend_name(), config.fsdp.enabled));

    // 5. The loop: epochs of optimizer steps of grad_accum micro-batches.
    let mut interrupted = false;
    'epochs: for epoch in start.0..t.epochs as u64 {
        st.epoch = epoch;
        st.epoch_batch = if epoch == start.0 { start.1 } else { 0 };
        let mut micro = train_ds.epoch_iter(
            epoch,
            st.epoch_batch,
            rank,
            world,
            t.batch_size,
            t.grad_accum,
        );
        let epoch_start = Instant::now();
        let mut epoch_loss = vec![];
        while st.step < total_steps {
            let batches: Vec<MicroBatch> = micro
                .by_ref()
                .take(t.grad_accum)
                .collect::<Result<_, _>>()?;
            if batches.len() < t.grad_accum {
                break;
            }
            let started = Instant::now();
            let lr = schedule.lr(st.step, epoch);
            let r = train_step(
                &pg,
                &mut trainable,
                &mut opt,
                &params,
                &batches,
                lr,
                t.grad_clip,
                t.seed ^ st.step.wrapping_mul(0x2545_F491_4F6C_DD1D),
                device,
            )?;
            st.step += 1;
            st.epoch_batch += 1;
            let step_s = started.elapsed().as_secs_f64();
            if !r.loss.is_finite() || !r.grad_norm.is_finite() {
                st.skipped_nonfinite += 1;
                if st.skipped_nonfinite > t.skip_nonfinite {
                    bail!("step {}: loss {} / gradient norm {} is not finite (update not applied; set train.skip_nonfinite to skip up to N such steps)", st.step, r.loss, r.grad_norm);
                }
                log(rank, &format!("step {}: non-finite loss or gradient norm, update skipped ({} of {} allowed)", st.step, st.skipped_nonfinite, t.skip_nonfinite));
            }
            st.last_loss = Some(r.loss);
            epoch_loss.push(r.loss);
            let tflops = flops_per_token.step_flops(&batches) / step_s / 1e12;
            if st.step.is_multiple_of(t.log_every.max(1)) || st.step == total_steps {
                metrics.write(json!({
                    "step": st.step, "epoch": epoch, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
                    "tokens": r.tokens, "tokens_per_s": r.tokens as f64 / step_s, "step_s": step_s,
                    "mem_bytes": resident_bytes(), "tflops": tflops,
                    "param_bytes": trainable.resident_param_bytes(),
                }))?;
                progress(rank, st.step, total_steps, r.loss, r.tokens as f64 / step_s);
            }
            // Periodic checkpoint (the epoch's last step is saved at the epoch end instead).
            if ck.every_steps > 0
                && st.step.is_multiple_of(ck.every_steps)
                && st.epoch_batch < steps_per_epoch
            {
                save(&mut pending, &st, &trainable, &opt, (epoch, st.epoch_batch))?;
                st.saved_step = Some(st.step);
            }
            // Publish a background save once every rank has written its file.
            if pending.is_some() {
                let busy = !pending.as_ref().is_some_and(|p| p.is_written());
                if all_reduce_i64(&pg, busy as i64, device)? == 0 {
                    if let Some(p) = pending.take() {
                        p.finish(&pg, device)?;
                    }
                }
            }
            if stop_after == Some(st.step) {
                STOP.store(true, Ordering::SeqCst);
            }
            // SIGTERM: every rank stops after the same step (the flag is all-reduced).
            if stop_requested(&pg, device)? {
                if st.saved_step != Some(st.step) {
                    save(&mut pending, &st, &trainable, &opt, (epoch, st.epoch_batch))?;
                    st.saved_step = Some(st.step);
                }
                log(rank, &format!("SIGTERM: stopping after step {}", st.step));
                interrupted = true;
                break 'epochs;
            }
        }
        drop(micro);
        if !epoch_loss.is_empty() {
            let mean = epoch_loss.iter().sum::<f64>() / epoch_loss.len() as f64;
            log(
                rank,
                &format!(
                    "epoch {epoch}: {} steps, mean loss {mean:.4}, {:.1} s",
                    epoch_loss.len(),
                    epoch_start.elapsed().as_secs_f64()
                ),
            );
        }
        if let Some(ds) = &eval_ds {
            let (loss, tokens) = validate(&pg, &mut trainable, ds, config, device)?;
            metrics.write(json!({"validation": true, "step": st.step, "epoch": epoch, "eval_loss": loss, "eval_ppl": loss.exp(), "eval_tokens": tokens}))?;
            log(
                rank,
                &format!(
                    "epoch {epoch}: validation loss {loss:.4}, perplexity {:.3}",
                    loss.exp()
                ),
            );
        }
        // Epoch end: the data continues with the next epoch.
        if st.epoch_batch >= steps_per_epoch {
            save(&mut pending, &st, &trainable, &opt, (epoch + 1, 0))?;
            st.saved_step = Some(st.step);
        }
        if st.step >= total_steps {
            break;
        }
    }

    if let Some(p) = pending.take() {
        p.finish(&pg, device)?;
    }

    // 6. Final weights for tests.
    if let Some(path) = std::env::var_os("TRAINER_DUMP_TRAINABLE") {
        let full = trainable.gather_trainable(&pg)?;
        if rank == 0 {
            let refs: Vec<(&str, &Tensor)> = full.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&refs, Path::new(&path))?;
        }
    }
    pg.barrier()?;
    Ok(Outcome {
        steps: st.step,
        interrupted,
        last_loss: st.last_loss,
    })
}

/// What one optimizer step measured (all values global over ranks).
struct StepResult {
    loss: f64,
    grad_norm: f64,
    tokens: i64,
}

/// One optimizer step: global token count, forward/backward of each micro-batch, clip, AdamW.
#[allow(clippy::too_many_arguments)]
fn train_step(
    pg: &ProcessGroup,
    trainable: &mut Trainable,
    opt: &mut AdamW,
    params: &[Tensor],
    batches: &[MicroBatch],
    lr: f64,
    clip: Option<f64>,
    seed: u64,
    device: Device,
) -> Result<StepResult> {
    let local_tokens: i64 = batches.iter().map(|b| b.supervised_tokens).sum();
    let tokens = all_reduce_i64(pg, local_tokens, device)?;
    if tokens == 0 {
        bail!("a global batch has no supervised tokens (check the label masking of the data)");
    }
    trainable.zero_grads();
    let mut loss_sum = 0.0;
    for (i, mb) in batches.iter().enumerate() {
        let batch = to_device(&mb.batch, device);
        loss_sum += trainable.forward_backward(
            pg,
            &batch,
            1.0 / tokens as f64,
            seed ^ (i as u64 + 1) ^ ((pg.rank() as u64) << 32),
        )?;
    }
    let loss = all_reduce_f64(pg, loss_sum, device)? / tokens as f64;
    let grads = trainable.grads();
    let grad_norm = clip_grad_norm(&grads, clip, Some(pg))?;
    if loss.is_finite() && grad_norm.is_finite() {
        opt.step(params, &grads, lr);
        trainable.after_update();
    }
    Ok(StepResult {
        loss,
        grad_norm,
        tokens,
    })
}

/// Mean token loss over the eval split (every rank takes its part; sums are all-reduced).
fn validate(
    pg: &ProcessGroup,
    trainable: &mut Trainable,
    ds: &Dataset,
    config: &Config,
    device: Device,
) -> Result<(f64, i64)> {
    let (mut sum, mut count) = (0.0, 0i64);
    for mb in ds.epoch_iter(0, 0, pg.rank(), pg.world_size(), config.train.batch_size, 1) {
        let mb = mb?;
        sum += trainable.forward_loss(pg, &to_device(&mb.batch, device))?;
        count += mb.supervised_tokens;
    }
    let count = all_reduce_i64(pg, count, device)?;
    Ok((
        all_reduce_f64(pg, sum, device)? / count.max(1) as f64,
        count,
    ))
}

fn load_model(config: &Config, device: Device) -> Result<MllamaModel> {
    let attention = match config.model.attention {
        config::Attention::Eager => AttentionImpl::Eager,
        config::Attention::Sdpa => AttentionImpl::Sdpa,
        config::Attention::Fused => AttentionImpl::Fused,
    };
    let opts = LoadOptions {
        dtype: kind_of(config.model.dtype),
        device,
        attention,
    };
    let mut model = MllamaModel::load(&config.model.path, opts)
        .with_context(|| format!("loading model.path {}", config.model.path.display()))?;
    let p = &config.peft;
    if p.is_lora() {
        match &p.init_from {
            Some(dir) => {
                model
                    .load_adapter(dir)
                    .with_context(|| format!("loading peft.init_from {}", dir.display()))?;
            }
            None => {
                let lora = LoraConfig {
                    r: p.r as i64,
                    alpha: p.alpha,
                    dropout: p.dropout,
                    target_modules: TargetModules::Names(p.target_modules.clone()),
                    use_rslora: false,
                };
                model.apply_lora(&lora, Some(config.train.seed as i64))?;
            }
        }
    }
    Ok(model)
}

fn backend(b: config::Backend) -> dist::Backend {
    match b {
        config::Backend::Auto => dist::Backend::Auto,
        config::Backend::Nccl => dist::Backend::Nccl,
        config::Backend::Cpu => dist::Backend::Cpu,
    }
}

fn to_device(b: &Batch, device: Device) -> Batch {
    Batch {
        input_ids: b.input_ids.to_device(device),
        attention_mask: b.attention_mask.as_ref().map(|t| t.to_device(device)),
        labels: b.labels.as_ref().map(|t| t.to_device(device)),
        images: b.images.as_ref().map(|i| Images {
            pixel_values: i.pixel_values.to_device(device),
            aspect_ratio_ids: i.aspect_ratio_ids.to_device(device),
            aspect_ratio_mask: i.aspect_ratio_mask.to_device(device),
            cross_attention_mask: i.cross_attention_mask.to_device(device),
        }),
    }
}

fn all_reduce_i64(pg: &ProcessGroup, v: i64, device: Device) -> Result<i64> {
    let t = Tensor::from_slice(&[v]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Sum)?;
    Ok(t.int64_value(&[0]))
}

fn all_reduce_f64(pg: &ProcessGroup, v: f64, device: Device) -> Result<f64> {
    let t = Tensor::from_slice(&[v]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Sum)?;
    Ok(t.double_value(&[0]))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_sigterm_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
}

/// Whether any rank received SIGTERM (so that all ranks stop after the same step).
fn stop_requested(pg: &ProcessGroup, device: Device) -> Result<bool> {
    let t = Tensor::from_slice(&[STOP.load(Ordering::SeqCst) as i64]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Max)?;
    Ok(t.int64_value(&[0]) > 0)
}

/// Analytic FLOPs: 2 per parameter per token for a forward, x4 with the recompute and the
/// backward (forward + recompute + 2 x forward for backward); text parameters see text tokens,
/// vision parameters see vision tokens (images x tiles x patches).
struct FlopCount {
    text_params: f64,
    vision_params: f64,
    patches_per_tile: f64,
}

impl FlopCount {
    fn of(m: &MllamaModel) -> Self {
        let (mut text, mut vision) = (0i64, 0i64);
        m.visit_params(&mut |n, t| {
            if n.starts_with("model.vision_model") {
                vision += t.numel() as i64
            } else {
                text += t.numel() as i64
            }
        });
        Self {
            text_params: text as f64,
            vision_params: vision as f64,
            patches_per_tile: (m.config.vision.num_patches()) as f64,
        }
    }

    fn step_flops(&self, batches: &[MicroBatch]) -> f64 {
        batches
            .iter()
            .map(|mb| {
                let text_tokens = mb.batch.input_ids.numel() as f64;
                let tiles = mb.batch.images.as_ref().map_or(0.0, |i| {
                    i.aspect_ratio_mask.sum(Kind::Int64).double_value(&[])
                });
                8.0 * (self.text_params * text_tokens
                    + self.vision_params * tiles * self.patches_per_tile)
            })
            .sum()
    }
}

/// Resident set size of this process in bytes (Linux), else 0.
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// metrics.jsonl on rank 0: one JSON object per optimizer step and per validation.
struct Metrics {
    file: Option<std::fs::File>,
}

impl Metrics {
    /// A fresh file, or, when resuming from step `resumed`, the existing one without the lines
    /// of later steps (those are trained again).
    fn open(dir: &Path, rank0: bool, resumed: Option<u64>) -> Result<Self> {
        if !rank0 {
            return Ok(Self { file: None });
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating train.output_dir {}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = match resumed {
            Some(step) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(str::to_string)
                .collect(),
            None => vec![],
        };
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for l in kept {
            writeln!(file, "{l}")?;
        }
        Ok(Self { file: Some(file) })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{v}")?;
            f.flush()?;
        }
        Ok(())
    }
}

fn log(rank: usize, msg: &str) {
    if rank == 0 {
        tracing::info!("{msg}");
    }
}

/// Rank 0: a one-line progress bar on a terminal, plain log lines otherwise.
fn progress(rank: usize, step: u64, total: u64, loss: f64, tokens_per_s: f64) {
    if rank != 0 {
        return;
    }
    if crate::logging::progress_bars_enabled() {
        let width = 30usize;
        let done = (width as u64 * step / total.max(1)) as usize;
        eprint!(
            "\r[{}{}] step {step}/{total} loss {loss:.4} {tokens_per_s:.0} tok/s ",
            "#".repeat(done),
            " ".repeat(width - done)
        );
        if step == total {
            eprintln!();
        }
    } else {
        tracing::info!("step {step}/{total} loss {loss:.4} {tokens_per_s:.0} tok/s");
    }
}
