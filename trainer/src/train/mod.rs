//! The training loop (torchtitan's train.py as a model): state declared in one place, construction
//! as numbered steps, a short loop. One process = one rank; `launcher` starts W of them.
//! Module index:
//! - `setup`:         process group and device, model (sharded as it loads), data and step counts
//! - `step`:          one optimizer step (grad accumulation, clip, AdamW), validation, all-reduces
//! - `checkpointing`: resume, periodic / max_steps / epoch-end / SIGTERM saves (`crate::checkpoint`)
//! - `metrics`:       metrics.jsonl, the progress bar or log lines
//! - `flops`:         model FLOPs per step, TFLOP/s and MFU
//! - `params`:        what trains, as peft's trainable-parameter line (and `config check`'s model)
//! - `signal`:        SIGTERM (all ranks stop after the same step)
//!
//! Loss normalization: every optimizer step sees `batch_size x world x grad_accum` samples (an
//! epoch's last one the fewer left over, unless `train.drop_last`); the loss is the sum of token
//! losses over all of them divided by the global count of supervised tokens (all-reduced before
//! the first backward), so the logged loss is the true mean and world 2 x batch 2 trains exactly
//! like world 1 x batch 4.
//!
//! Hooks: `TRAINER_DUMP_TRAINABLE=FILE` makes rank 0 write the final trainable weights (fp32,
//! by name) to FILE as safetensors (tests and debugging). `TRAINER_STOP_AFTER_STEP=N` acts as a
//! SIGTERM received during step N (tests of the preemption path).
mod checkpointing;
pub(crate) mod flops;
mod metrics;
mod params;
mod same_settings;
mod setup;
pub(crate) mod signal;
mod step;
pub mod tensorboard;

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::checkpoint::validation::EvalResult;
use crate::config::Config;
use crate::data::dataset::MicroBatch;
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use metrics::{Meter, StepReport};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub steps: u64,
    /// Stopped early by this signal (SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP) after a step and
    /// its checkpoint: the caller exits 128 + it (143 for SIGUSR1/SIGUSR2, a scheduler's notice).
    pub stopped_by: Option<i32>,
    /// With `stopped_by`: what the stop was, for the launcher's error file (`signal::stop_note`).
    pub stop_note: Option<(String, Option<usize>)>,
    pub last_loss: Option<f64>,
}

pub use metrics::RESOLVED_CONFIG;
pub use params::check_model;
pub use signal::stop_exit_code;

/// Settings that do nothing in `config` (notes, not errors), as a run logs them: for `trainer
/// config check` to say before the run.
pub fn config_notes(config: &Config) -> Vec<String> {
    setup::unused_settings_notes(config)
}

/// Everything the loop mutates, in one place.
#[derive(Debug, Default)]
struct State {
    step: u64,
    epoch: u64,
    /// Global batches of the current epoch consumed so far (the data position).
    epoch_batch: u64,
    /// The step of the last checkpoint saved (or resumed from).
    saved_step: Option<u64>,
    skipped_nonfinite: u64,
    last_loss: Option<f64>,
    /// The schedule a resumed checkpoint was trained with (compared with this run's, then dropped).
    resumed_schedule: Option<serde_json::Value>,
    /// The lowest validation loss so far (the epoch whose adapter is in `train.output_dir`).
    best_eval: Option<EvalResult>,
    /// Whether the checkpoint resumed from was validated at its step (its validation.json).
    resumed_validated: bool,
    /// The chat template's clock the resumed checkpoint was trained with (noted, then dropped).
    resumed_template_clock: Option<i64>,
}

pub fn train(config: &Config) -> Result<Outcome> {
    let t = &config.train;
    crate::config::training_conflicts(config)?;
    crate::config::missing_paths(config)?;
    signal::install_notice_handlers();
    // 1. Ranks and collectives.
    let (pg, device) = setup::process_group(config)?;
    let (rank, world) = (pg.rank(), pg.world_size());
    signal::install_stop_handlers();
    same_settings::agree_settings(&pg, device, config)?;
    if let Some(note) = setup::fused_attention_note(config, device)? {
        metrics::log(rank, &note);
    }
    // 2. Data, and a checkpoint folder to resume from, before the model: a wrong path or a bad
    // record must not cost a model load on every rank first.
    crate::checkpoint::check_resume_folder(&pg, device, config)?;
    let data = setup::data(config, world)?;
    setup::agree_data(&pg, device, &data)?;
    let (steps_per_epoch, total_steps) = (data.steps_per_epoch, data.total_steps);
    // The checkpoint and output folders are claimed (and checked writable) before the model
    // loads too: a second run into the same folders is refused before it costs a model load.
    let schedule = LrSchedule::new(t.lr, &t.schedule, total_steps);
    if let (Some(note), 0) = (schedule.warmup_note(), rank) {
        tracing::warn!("{note}");
    }
    let mut st = State::default();
    let plan = crate::checkpoint::DataPlan::new(&data.train.report().lengths);
    let mut saver = checkpointing::Saver::new(&pg, config, &schedule, device, plan);
    // (only a prompt most two-turn samples share is one: in other multi-turn data the second
    // turns are further questions)
    match data.train.correction_prompt() {
        Some((prompt, n, multi)) if 2 * n > multi => {
            let share = match n == multi {
                true => String::new(),
                false => format!(" ({n} of the {multi} samples with a second turn)"),
            };
            metrics::log(rank, &format!("the data's correction turn{share}: {prompt:?}; checkpoints and exports record it for infer/eval"));
            saver.note_correction_prompt(&prompt);
        }
        Some((_, n, multi)) if rank == 0 => tracing::warn!(
            "no second user turn is shared by most of the {multi} two-turn samples (the most common one by {n}): no correction prompt is recorded; give infer/eval --correction-prompt"
        ),
        _ => {}
    }
    saver.probe()?;
    // 3. Model (+ LoRA), seeded; with FSDP each rank reads only its shards.
    let (mut trainable, flops) = setup::model(config, &pg, device)?;
    for note in setup::unused_settings_notes(config) {
        metrics::log(rank, &note);
    }
    let splits = [("train", Some(&data.train)), ("eval", data.eval.as_ref())];
    for (split, ds) in splits {
        if let Some(note) = ds.and_then(|ds| setup::skipped_note(split, ds)) {
            metrics::log(rank, &note);
        }
    }
    // 4. Optimizer and schedule over this rank's shards; resume; checkpoints and metrics.
    let params = trainable.master_params();
    let adamw = AdamWConfig::for_training(config);
    let mut opt = AdamW::with_segments(adamw, &params, trainable.optimizer_segments());
    let stepper = step::Stepper {
        pg: &pg,
        params,
        clip: t.grad_clip,
        device,
    };
    let start = saver.resume(
        &mut st,
        &mut trainable,
        &mut opt,
        steps_per_epoch,
        data.eval_set,
    )?;
    if let Some(saved) = st.resumed_schedule.take() {
        checkpointing::note_schedule_change(rank, &saved, &schedule, st.step);
    }
    let text_only = data.train.report().text_only_kept;
    if let Some(note) = setup::template_date_note(st.resumed_template_clock.take(), text_only) {
        metrics::log(rank, &note);
    }
    let resumed = st.saved_step.map(|step| metrics::ResumedAt {
        step,
        loss: st.last_loss,
        validated: st.resumed_validated,
    });
    let mut meter = Meter::open(config, &pg, device, flops, total_steps, resumed)?;
    let stop_after = signal::stop_after_step();
    let fsdp = match config.fsdp.enabled {
        true => config.fsdp.sharding_strategy.name(),
        false => "off",
    };
    // (where the run writes: checkpoint.dir's default is relative to the working directory,
    // apart from train.output_dir, as llama-recipes' dist_checkpoint_root_folder is)
    meter.log(&format!(
        "training {total_steps} steps ({steps_per_epoch} per epoch) on {world} rank(s), {} backend, fsdp {fsdp}; metrics{} in {}, checkpoints in {}",
        pg.backend_name(),
        if config.peft.is_lora() { " and adapter" } else { "" },
        config.train.output_dir.display(),
        config.checkpoint.dir.display()
    ));
    if let Some(limit) = t.step_limit().filter(|&l| l > total_steps) {
        // (llama-recipes' max_train_step only caps; in HF's Trainer max_steps overrides the
        // epochs: say which one this is, and that the schedule spans the shorter run)
        meter.log(&format!("note: train.max_steps {limit} is more than train.epochs {} x {steps_per_epoch} steps: the run (and its learning-rate schedule) ends after {total_steps}; raise train.epochs for more", t.epochs));
    }
    let global = t.global_batch(world);
    match data.train.partial_batch_len(global) {
        0 => {}
        r if t.drop_last => meter.log(&format!("{r} of {} training samples sit out each epoch (not a multiple of the global batch of {global}; train.drop_last): a random subset, another one each epoch", plan.samples)),
        r if steps_per_epoch == 1 => meter.log(&format!("each epoch is one step of all {r} training sample(s), fewer than the global batch of {global}")),
        r => meter.log(&format!("the last step of each epoch trains {r} sample(s) (the {} training samples are not a multiple of the global batch of {global}): a random subset, another one each epoch", plan.samples)),
    }

    // 5. The loop: epochs of optimizer steps of grad_accum micro-batches. (A run resumed at its
    // last step has none left: no epoch is entered, so nothing is saved again.) A checkpoint
    // resumed at an epoch's end, or at the run's last step, whose validation never finished (the
    // process died or was stopped while validating) is validated first, as that epoch would have
    // been: its result counts towards the best adapter.
    // A stop signal that came while the ranks started (the model load takes minutes at 11B) stops
    // the run here, before a step it would then train and save past a scheduler's grace period.
    let mut stopped_by = signal::stop_requested(&pg, device, st.step, stop_after)?;
    // (Ctrl-C from here on stops after a step, or an eval micro-batch, as SIGTERM does)
    signal::install_interrupt_handlers();
    let start_step = st.step;
    let at_epoch_end = start.1 == 0 && start.0 == st.epoch + 1;
    let unvalidated = st.saved_step.is_some() && data.eval.is_some() && !st.resumed_validated;
    if let Some(sig) = stopped_by {
        meter.log(&format!(
            "{}: stopping before training (at step {}; nothing new to save)",
            signal::name(sig),
            st.step
        ));
    } else if st.step > total_steps {
        meter.log(&format!("the checkpoint resumed is past the run's end (step {} of {total_steps}: train.epochs or train.max_steps lowered?): nothing to train, validate or export", st.step));
    } else if unvalidated
        && (at_epoch_end || st.step == total_steps || is_eval_step(t.eval_every_steps, st.step))
    {
        meter.log(&format!("checkpoint of step {} (epoch {}) has no validation record (stopped while validating?): validating it now", st.step, st.epoch));
        let epoch = st.epoch;
        let ctx = (&pg, config, device, &data);
        let at = (epoch, true);
        stopped_by = validate_epoch(ctx, &mut saver, &mut st, &mut trainable, at, &mut meter)?;
    } else if at_epoch_end && data.eval.is_none() && st.step < total_steps {
        // (a stop at an epoch's last step saved its checkpoint but ended before the epoch's end,
        // where its adapter goes into train.output_dir: written now, as it would have been; the
        // same adapter again when the run got past the epoch's end before)
        saver.export_adapter(st.step);
    }
    meter.start_steps();
    let epochs = match st.step >= total_steps || stopped_by.is_some() {
        true if stopped_by.is_some() => 0..0,
        true => {
            meter.log(&format!(
                "nothing left to train: the run is at step {} of {total_steps}",
                st.step
            ));
            0..0
        }
        false => start.0..t.epochs as u64,
    };
    'epochs: for epoch in epochs {
        st.epoch = epoch;
        st.epoch_batch = if epoch == start.0 { start.1 } else { 0 };
        let mut micro = data.train.epoch_iter(
            epoch,
            st.epoch_batch,
            rank,
            world,
            t.batch_size,
            t.grad_accum,
        );
        let epoch_start = Instant::now();
        while st.step < total_steps {
            let started = Instant::now();
            // (grad_accum micro-batches, fewer for an epoch's last, partial global batch)
            let want = data
                .train
                .micro_steps(st.epoch_batch, t.batch_size, world, t.grad_accum);
            let fetched: Result<Vec<MicroBatch>> = (micro.by_ref().take(want))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::from);
            // (agreed: a record the scan let through that fails to load, a truncated image whose
            // header was whole, stops every rank, after a checkpoint of the last step, instead of
            // one rank exiting and the others waiting in the step's collectives)
            let fetched = crate::checkpoint::agree(&pg, device, fetched, || {
                format!(
                    "step {}: another rank could not load its batch",
                    st.step + 1
                )
            });
            let batches = match fetched {
                Ok(batches) => batches,
                Err(e) => {
                    saver.save_step_done(&mut st, &trainable, &opt, epoch)?;
                    let why = step::AgreedStop(match st.step {
                        0 => "the first batch could not be loaded".to_string(),
                        s => format!(
                            "the batch after step {s} could not be loaded (its checkpoint is saved: fix the record, or set data.bad_records: skip, then run again to resume)"
                        ),
                    });
                    return Err(saver.publish_before_stop(e.context(why)));
                }
            };
            if batches.len() < want {
                // the plan gives every rank the same whole global batches: anything else is a
                // bug, and a rank leaving the epoch early would leave the others waiting
                if !batches.is_empty() || st.epoch_batch < steps_per_epoch {
                    bail!("rank {rank}: epoch {epoch} ended after {} of its {steps_per_epoch} global batches (+{} micro-batches): the data loader and the epoch plan disagree", st.epoch_batch, batches.len());
                }
                break;
            }
            let data_s = started.elapsed().as_secs_f64();
            // (a skipped step, its update not applied, does not move the schedule on either, as
            // transformers' Trainer does not step its scheduler when the optimizer step was
            // skipped)
            let lr = schedule.lr(st.step - st.skipped_nonfinite, epoch);
            let seed = t.seed ^ st.step.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let stepped = stepper
                .step(&mut trainable, &mut opt, &batches, lr, seed)
                .with_context(|| {
                    format!(
                        "step {} (epoch {epoch}, global batch {} of {steps_per_epoch})",
                        st.step + 1,
                        st.epoch_batch + 1
                    )
                });
            let step_s = started.elapsed().as_secs_f64();
            let r = match stepped.and_then(|r| st.record(&r, t.skip_nonfinite, &meter).map(|()| r))
            {
                Ok(r) => r,
                Err(e) => return Err(saver.publish_before_stop(e)),
            };
            let param_bytes = trainable.resident_param_bytes();
            let report = StepReport {
                step: st.step,
                epoch,
                result: &r,
                lr,
                step_s,
                data_s,
                batches: &batches,
                param_bytes,
                epoch_end: st.epoch_batch >= steps_per_epoch,
            };
            meter.step(&pg, device, report)?;
            saver.after_step(&mut st, &trainable, &opt, steps_per_epoch, total_steps)?;
            // SIGTERM (SIGUSR1, SIGINT, SIGHUP): every rank stops after the same step, with a
            // checkpoint of it.
            if let Some(sig) = signal::stop_requested(&pg, device, st.step, stop_after)? {
                saver.save_step_done(&mut st, &trainable, &opt, epoch)?;
                let name = signal::name(sig);
                meter.log(&format!("{name}: stopping after step {}", st.step));
                stopped_by = Some(sig);
                break 'epochs;
            }
            // train.eval_every_steps: validation within the epoch (its checkpoint saved above;
            // the epoch's last step and the run's are validated after the loop; after the stop
            // check: a stop does not wait for it, the resumed run validates the step)
            if is_eval_step(t.eval_every_steps, st.step)
                && st.epoch_batch < steps_per_epoch
                && st.step < total_steps
            {
                let ctx = (&pg, config, device, &data);
                let at = (epoch, true);
                let stop =
                    validate_epoch(ctx, &mut saver, &mut st, &mut trainable, at, &mut meter)?;
                if let Some(sig) = stop {
                    stopped_by = Some(sig);
                    break 'epochs;
                }
            }
        }
        drop(micro);
        meter.epoch_summary(epoch, epoch_start.elapsed().as_secs_f64());
        // Epoch end: the data continues with the next epoch. Saved before validating (in the
        // background with checkpoint.async), so a validation that fails (an eval image that does
        // not decode, out of memory) or is stopped does not lose the epoch. (A step saved already,
        // e.g. by SIGTERM at an epoch's last step and resumed from, is not saved again: its
        // position (epoch, steps_per_epoch) resumes the same way, and replacing it would risk it.)
        if st.epoch_batch >= steps_per_epoch && st.saved_step != Some(st.step) {
            saver.save(&mut st, &trainable, &opt, (epoch + 1, 0))?;
        }
        // (at the run's end a stop after the validation changes nothing)
        let ctx = (&pg, config, device, &data);
        let at = (epoch, st.step < total_steps);
        if let Some(sig) = validate_epoch(ctx, &mut saver, &mut st, &mut trainable, at, &mut meter)?
        {
            stopped_by = Some(sig);
            break;
        }
        if st.step >= total_steps {
            break;
        }
    }
    saver.finish()?;
    // Without validation, the adapter of a complete run that did not reach its last epoch's end
    // here (SIGTERM at the last step); a run with no step of its own, resumed at its end, leaves
    // output_dir's adapter as it is unless there is none (an export that was killed or failed
    // before). (With validation the adapter is the best validated epoch's, written at its end.)
    // (a checkpoint past the run's end, resumed with a lowered max_steps, is not exported)
    let complete = st.step == total_steps;
    let adapter_there = t.output_dir.join("adapter_config.json").exists();
    if data.eval.is_none() && complete && st.step > 0 && (st.step > start_step || !adapter_there) {
        saver.export_adapter(st.step);
    }
    meter.finish();

    // 6. Final weights for tests; all ranks leave together.
    step::dump_trainable(&pg, &trainable)?;
    pg.barrier()?;
    Ok(Outcome {
        steps: st.step,
        stopped_by,
        stop_note: stopped_by.map(|sig| signal::stop_note(sig, (start_step, st.step), rank)),
        last_loss: st.last_loss,
    })
}

/// Whether `train.eval_every_steps` validates after optimizer step `step`.
fn is_eval_step(every: u64, step: u64) -> bool {
    every > 0 && step > 0 && step.is_multiple_of(every)
}

/// A SIGTERM during an epoch-end save or the last micro-batch of its validation (every rank calls
/// it): the run stops now, the epoch's checkpoint being there, not after one more step and save,
/// past a scheduler's grace period.
fn stopped_after_validation(
    pg: &crate::dist::ProcessGroup,
    device: tch::Device,
    step: u64,
    meter: &Meter,
) -> Result<Option<i32>> {
    let stop = signal::stop_requested(pg, device, step, signal::stop_during_validation())?;
    if let Some(sig) = stop {
        meter.log(&format!(
            "{}: stopping after step {step}",
            signal::name(sig)
        ));
    }
    Ok(stop)
}

/// What validation reads of the loop: the process group, the config, the device, the data.
type LoopCtx<'a> = (
    &'a crate::dist::ProcessGroup,
    &'a Config,
    tch::Device,
    &'a setup::Data,
);

/// After an epoch (its checkpoint saved): validation on `data.eval` if there is one, then the
/// adapter in train.output_dir (this epoch's, unless validation found a better one earlier).
/// Returns the stop signal that left the validation unfinished (then neither the adapter nor a
/// validation record is written: the resumed run validates the checkpoint, "validating it now"),
/// or with `check_after` one that came after it (`stopped_after_validation`).
fn validate_epoch(
    (pg, config, device, data): LoopCtx,
    saver: &mut checkpointing::Saver,
    st: &mut State,
    trainable: &mut crate::fsdp::Trainable,
    (epoch, check_after): (u64, bool),
    meter: &mut Meter,
) -> Result<Option<i32>> {
    let validated = match &data.eval {
        Some(ds) => {
            // (a background save is only a checkpoint once published)
            saver.publish_pending()?;
            let at = (st.step, epoch);
            let eval_loss = match step::validate(pg, trainable, ds, config, device, at, meter)? {
                step::Validation::Loss(loss) => loss,
                step::Validation::Stopped(sig) => return Ok(Some(sig)),
            };
            Some(EvalResult {
                step: st.step,
                epoch,
                eval_loss,
                eval_set: data.eval_set,
            })
        }
        None => None,
    };
    saver.epoch_end(st, validated)?;
    match check_after {
        true => stopped_after_validation(pg, device, st.step, meter),
        false => Ok(None),
    }
}
