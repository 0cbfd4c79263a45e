//! One optimizer step (global token count, forward/backward of each micro-batch, clip, AdamW),
//! validation, and the scalar all-reduces the loop needs.
use anyhow::Result;
use tch::{Device, Tensor};

use crate::config::Config;
use crate::data::dataset::{Dataset, MicroBatch};
use crate::dist::{ProcessGroup, ReduceOp};
use crate::fsdp::Trainable;
use crate::model::{Batch, Images};
use crate::optim::{clip_grad_norm, AdamW};

use super::metrics::Meter;
use super::State;

/// A stop every rank reaches at the same step, decided from all-reduced values (a loss that is
/// not finite past `train.skip_nonfinite`, a global batch without supervised tokens): the ranks
/// are still in step, so the loop can publish a background checkpoint before returning it
/// (`Saver::publish_before_stop`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct AgreedStop(pub String);

/// What one optimizer step measured (all values global over ranks).
pub(super) struct StepResult {
    pub loss: f64,
    pub grad_norm: f64,
    /// Supervised tokens of the global batch.
    pub tokens: i64,
}

impl StepResult {
    pub fn is_finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// What every optimizer step shares: the process group, this rank's master shards (the
/// optimizer's parameters), clipping and the device.
pub(super) struct Stepper<'a> {
    pub pg: &'a ProcessGroup,
    pub params: Vec<Tensor>,
    pub clip: Option<f64>,
    pub device: Device,
}

impl Stepper<'_> {
    /// One optimizer step: global token count, forward/backward of each micro-batch, clip,
    /// AdamW. The loss of every micro-batch is scaled by 1 / the global supervised-token count,
    /// so the accumulated gradient is that of the true mean loss over the global batch.
    pub fn step(
        &self,
        trainable: &mut Trainable,
        opt: &mut AdamW,
        batches: &[MicroBatch],
        lr: f64,
        seed: u64,
    ) -> Result<StepResult> {
        let (pg, device) = (self.pg, self.device);
        let local_tokens: i64 = batches.iter().map(|b| b.supervised_tokens).sum();
        let tokens = all_reduce_i64(pg, local_tokens, device)?;
        if tokens == 0 {
            return Err(AgreedStop(
                "a global batch has no supervised tokens (check the label masking of the data)"
                    .into(),
            )
            .into());
        }
        trainable.zero_grads();
        let mut loss_sum = 0.0;
        for (i, mb) in batches.iter().enumerate() {
            let batch = to_device(&mb.batch, device);
            loss_sum += trainable.forward_backward(
                pg,
                &batch,
                1.0 / tokens as f64,
                // by the micro-batch's slice of the global batch (micro-batch i of rank r holds
                // slice i * world + r, of train.batch_size samples), not by (rank, i): runs that
                // split the same global batch into the same batch_size draw the same masks at
                // any world size, so a resume on another world size replays them (an epoch's
                // last, partial micro-step too: its slices are cut the same way, `slice_part`)
                seed ^ ((i * pg.world_size() + pg.rank()) as u64 + 1),
            )?;
        }
        let loss = all_reduce_f64(pg, loss_sum, device)? / tokens as f64;
        trainable.sync_replicas()?;
        let grads = trainable.grads();
        let present = any_rank(pg, &trainable.grad_present(), device)?;
        let grad_norm = clip_grad_norm(&grads, self.clip, trainable.norm_group(pg))?;
        if loss.is_finite() && grad_norm.is_finite() {
            opt.step_present(&self.params, &grads, &present, lr);
            trainable.after_update();
        }
        // as llama-recipes' zero_grad() after the step: the plain trainer's full-size gradients
        // are not kept through checkpoint saves and validation
        drop(grads);
        trainable.zero_grads();
        Ok(StepResult {
            loss,
            grad_norm,
            tokens,
        })
    }
}

impl State {
    /// Counts step `r` into the state; a non-finite loss or gradient norm (update not applied)
    /// is an error once more than `skip_limit` were skipped.
    pub(super) fn record(&mut self, r: &StepResult, skip_limit: u64, meter: &Meter) -> Result<()> {
        self.step += 1;
        self.epoch_batch += 1;
        if !r.is_finite() {
            self.skipped_nonfinite += 1;
            if self.skipped_nonfinite > skip_limit {
                let fix = match skip_limit {
                    0 => "set train.skip_nonfinite to skip up to N such steps".to_string(),
                    n => format!("the {n} skips allowed by train.skip_nonfinite are used up: lower train.lr, or allow more"),
                };
                return Err(AgreedStop(format!(
                    "step {}: loss {} / gradient norm {} is not finite (update not applied; {fix})",
                    self.step, r.loss, r.grad_norm
                ))
                .into());
            }
            meter.log(&format!(
                "step {}: non-finite loss or gradient norm, update skipped ({} of {skip_limit} allowed)",
                self.step, self.skipped_nonfinite
            ));
        }
        self.last_loss = Some(r.loss);
        Ok(())
    }
}

/// `TRAINER_DUMP_TRAINABLE=FILE`: rank 0 writes the final trainable weights (fp32, by name).
pub(super) fn dump_trainable(pg: &ProcessGroup, trainable: &Trainable) -> Result<()> {
    if let Some(path) = std::env::var_os("TRAINER_DUMP_TRAINABLE") {
        let full = trainable.gather_trainable(pg)?;
        if pg.rank() == 0 {
            let refs: Vec<(&str, &Tensor)> = full.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&refs, std::path::Path::new(&path))?;
        }
    }
    Ok(())
}

/// How a validation ended.
pub(super) enum Validation {
    /// Mean token loss over the eval samples.
    Loss(f64),
    /// A stop signal came (the agreed one): the validation was left unfinished.
    Stopped(i32),
}

/// Mean token loss and perplexity over the eval split (its first `train.max_eval_samples`) after
/// `epoch` (every rank takes its part, in micro-batches of `train.val_batch_size`; sums are
/// all-reduced), written to metrics.jsonl with the samples and tokens it covered, and logged;
/// returns the loss. A stop signal (SIGTERM, a scheduler's notice, Ctrl-C) is checked between
/// micro-batches, all ranks agreeing: a long validation does not outlast a scheduler's grace
/// period (the step's checkpoint is saved; the resumed run validates it again). One that comes
/// during the last micro-batch lets the validation finish (the caller's check after it stops
/// the run).
pub(super) fn validate(
    pg: &ProcessGroup,
    trainable: &mut Trainable,
    ds: &Dataset,
    config: &Config,
    device: Device,
    (step, epoch): (u64, u64),
    meter: &mut Meter,
) -> Result<Validation> {
    let (mut sum, mut count, mut samples) = (0.0, 0i64, 0i64);
    let stop_hook = super::signal::stop_during_validation();
    let t = &config.train;
    let batches = ds.eval_iter(
        pg.rank(),
        pg.world_size(),
        t.eval_batch_size(),
        t.eval_sample_limit(),
    );
    for (k, mb) in batches.enumerate() {
        if k > 0 {
            if let Some(sig) = super::signal::stop_requested(pg, device, step, stop_hook)? {
                meter.log(&format!(
                    "{}: validation of step {step} stopped unfinished ({k} eval micro-batch(es) done); stopping after step {step} (its checkpoint is saved: the resumed run validates it)",
                    super::signal::name(sig)
                ));
                return Ok(Validation::Stopped(sig));
            }
        }
        // (agreed, as the training loop's batches are: a record that fails to load stops every
        // rank here, the step's checkpoint published before validation began, not one rank
        // alone with the others waiting in the forward's collectives)
        let mb = crate::checkpoint::agree(pg, device, mb.map_err(anyhow::Error::from), || {
            format!("validation at step {step}: another rank could not load its batch")
        })
        .map_err(|e| {
            e.context(AgreedStop(format!(
                "validation at step {step} could not load a batch (the step's checkpoint is saved: fix the record, or set data.bad_records: skip, then run again to resume)"
            )))
        })?;
        sum += trainable.forward_loss(pg, &to_device(&mb.batch, device))?;
        count += mb.supervised_tokens;
        samples += (mb.sample_indices.len() - mb.filler_rows) as i64;
    }
    let tokens = all_reduce_i64(pg, count, device)?;
    let samples = all_reduce_i64(pg, samples, device)?;
    let loss = all_reduce_f64(pg, sum, device)? / tokens.max(1) as f64;
    meter.write(serde_json::json!({"validation": true, "step": step, "epoch": epoch, "eval_loss": loss, "eval_ppl": loss.exp(), "eval_samples": samples, "eval_tokens": tokens}))?;
    meter.log(&format!(
        "epoch {epoch}, step {step}: validation loss {loss:.4}, perplexity {:.3} ({samples} samples)",
        loss.exp()
    ));
    Ok(Validation::Loss(loss))
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

pub(super) fn all_reduce_i64(pg: &ProcessGroup, v: i64, device: Device) -> Result<i64> {
    let t = Tensor::from_slice(&[v]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Sum)?;
    Ok(t.int64_value(&[0]))
}

/// Element-wise "true on any rank" of `flags` (one small all-reduce).
fn any_rank(pg: &ProcessGroup, flags: &[Vec<bool>], device: Device) -> Result<Vec<Vec<bool>>> {
    let v: Vec<i64> = flags.iter().flatten().map(|&f| f as i64).collect();
    if v.is_empty() {
        return Ok(flags.to_vec());
    }
    let t = Tensor::from_slice(&v).to_device(device);
    pg.all_reduce(&t, ReduceOp::Max)?;
    let mut any = Vec::<i64>::try_from(t.to_device(Device::Cpu))?
        .into_iter()
        .map(|x| x != 0);
    Ok(flags
        .iter()
        .map(|f| f.iter().map(|_| any.next().unwrap_or(true)).collect())
        .collect())
}

pub(super) fn all_reduce_f64(pg: &ProcessGroup, v: f64, device: Device) -> Result<f64> {
    let t = Tensor::from_slice(&[v]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Sum)?;
    Ok(t.double_value(&[0]))
}
