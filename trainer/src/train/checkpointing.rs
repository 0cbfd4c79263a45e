//! The loop's checkpoint hooks (the format and I/O are `crate::checkpoint`'s): resume before the
//! loop; save every `checkpoint.every_steps` steps, when `train.max_steps` stops the run in
//! mid-epoch, at the end of each completed epoch, and on SIGTERM. With `checkpoint.async` at most
//! one save is in flight: a new one first completes the previous one, and a written one is
//! published (manifest + rename after a barrier) once every rank has written its file. `finish`
//! at the end of training (SIGTERM included) waits for the save in flight and for retention, and
//! reports their errors (the save's fails the run, retention's is a warning).
use anyhow::{Context, Result};
use tch::Device;

use crate::checkpoint::validation::{self, EvalResult};
use crate::checkpoint::{self, Checkpointer, DataPlan, Progress};
use crate::config::{Config, PeftConfig, SaveAdapter};
use crate::dist::ProcessGroup;
use crate::fsdp::Trainable;
use crate::optim::{AdamW, LrSchedule};

use super::metrics::log;
use super::step::{all_reduce_i64, AgreedStop};
use super::State;

pub(super) struct Saver<'a> {
    pg: &'a ProcessGroup,
    config: &'a Config,
    schedule: &'a LrSchedule,
    device: Device,
    /// The epoch plan's samples and lengths, recorded in each checkpoint.
    plan: DataPlan,
    saves: Checkpointer,
    /// Whether the background saves' snapshot buffers were reserved (after the first step).
    reserved: bool,
    /// The step whose adapter this process last wrote into `train.output_dir` (rank 0).
    exported: Option<u64>,
    /// Rank 0's claims on `checkpoint.dir` and `train.output_dir` for the whole run (`probe`;
    /// one lock when they are the same folder).
    dir_locks: Option<[Option<checkpoint::ExportLock>; 2]>,
}

/// The lock file rank 0 holds in `checkpoint.dir` and in `train.output_dir` while training.
const TRAIN_LOCK: &str = ".llava-sco-train.lock";

/// Rank 0's lock on the folder of config key `key` for this run (created if needed): refused when
/// another training run holds it, or when the folder or its lock file cannot be written.
fn claim(dir: &std::path::Path, key: &str) -> Result<checkpoint::ExportLock> {
    const BUSY: &str = "is in use by another training run";
    checkpoint::ExportLock::acquire_named(
        dir,
        TRAIN_LOCK,
        BUSY,
        &format!("give this run a {key} of its own, or stop the other run first"),
    )
    .map_err(|e| match e.to_string().contains(BUSY) {
        true => e.context(format!("rank 0: {key}")),
        // (creating the folder or the lock file failed)
        false => e.context(match key {
            "checkpoint.dir" => format!("rank 0: checkpoint.dir {} is not writable (set checkpoint.dir to a folder every rank can write, shared between nodes)", dir.display()),
            _ => format!("rank 0: {key} {} is not writable (set {key} to a folder this node can write)", dir.display()),
        }),
    })
}

/// Logs a note when the learning-rate schedule of this run differs from the one the checkpoint
/// was trained with (HF and torch rebuild it from the run's arguments too; a longer run moves a
/// cosine horizon).
pub(super) fn note_schedule_change(
    rank: usize,
    saved: &serde_json::Value,
    schedule: &LrSchedule,
    step: u64,
) {
    let now = schedule.to_json();
    if LrSchedule::used_fields(saved) != LrSchedule::used_fields(&now) {
        log(
            rank,
            &format!(
                "note: the learning-rate schedule differs from the checkpoint's (saved {saved}, now {now}); from step {step} the lr follows the new one"
            ),
        );
    }
}

/// Notes on the peft settings a resume may change from its checkpoint's `saved` section (what
/// must match is compared by `checkpoint::identity`): the dropout rate, a training setting like
/// the lr, and `init_from`, whose values only a fresh run starts from.
fn peft_setting_changes(saved: &serde_json::Value, now: &PeftConfig) -> Vec<String> {
    let mut notes = vec![];
    if !now.is_lora() {
        return notes;
    }
    if let Some(was) = saved.get("dropout").and_then(|d| d.as_f64()) {
        if was != now.dropout {
            notes.push(format!(
                "note: the checkpoint was trained with peft.dropout {was}, this run has {}: LoRA dropout uses {} from here on, and the adapters of its later steps record lora_dropout {}",
                now.dropout, now.dropout, now.dropout
            ));
        }
    }
    // (the same folder, spelt otherwise, is no change)
    let real = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let was = saved
        .get("init_from")
        .and_then(|v| v.as_str())
        .map(std::path::Path::new);
    if let Some(dir) = now.init_from.as_ref() {
        if was.map(real) != Some(real(dir)) {
            notes.push(format!(
                "note: peft.init_from {} is not what the checkpoint started from ({}): the resumed run continues the checkpoint's factors, which replace the adapter's (its values start a fresh run only; set checkpoint.resume=never to start from it)",
                dir.display(),
                was.map_or("a fresh adapter".into(), |p| p.display().to_string())
            ));
        }
    }
    notes
}

impl<'a> Saver<'a> {
    pub fn new(
        pg: &'a ProcessGroup,
        config: &'a Config,
        schedule: &'a LrSchedule,
        device: Device,
        plan: DataPlan,
    ) -> Self {
        if config.checkpoint.async_save {
            log(pg.rank(), "checkpoint.async: checkpoint files are written by a background thread; a checkpoint is published once every rank has written its file (at the latest before the next save and at the end)");
        }
        // the base's tensors as the run reads them, which every manifest records (rank 0 writes
        // them): sampled now, not at the first save (hours in, maybe in a SIGTERM's grace period)
        if pg.rank() == 0 {
            if let Err(e) = crate::checkpoint::fingerprint::base_tensors(&config.model.path) {
                tracing::warn!("the tensors of model.path cannot be sampled ({e}): checkpoints will not record them, so a resume cannot tell this base from another of the same config.json");
            }
        }
        Self {
            pg,
            config,
            schedule,
            device,
            plan,
            saves: Checkpointer::new(),
            reserved: false,
            exported: None,
            dir_locks: None,
        }
    }

    /// Records the data's self-correction prompt in the checkpoints, for `infer`/`eval
    /// --checkpoint` to ask the model with the prompt it learned (rank 0 writes manifests).
    pub fn note_correction_prompt(&mut self, prompt: &str) {
        self.saves
            .note_prompt("correction_prompt", serde_json::Value::from(prompt));
    }

    /// Resumes per `checkpoint.resume` into `st`, `trainable` and `opt`; returns the data
    /// position (epoch, batch) to start at. The saves continue the training run (lineage) of the
    /// checkpoint resumed. (A checkpoint of an epoch's last step saved by a stop, at (e,
    /// `steps_per_epoch`), resumes as the epoch-end checkpoint it is, at (e + 1, 0): its
    /// validation done first if missing, not by entering epoch e for no step.) `eval_set`: the
    /// validation set this run validates on (`setup::eval_set_fingerprint`): a best loss the
    /// checkpoint's run measured on another one is not compared with this run's.
    pub fn resume(
        &mut self,
        st: &mut State,
        trainable: &mut Trainable,
        opt: &mut AdamW,
        steps_per_epoch: u64,
        eval_set: Option<u64>,
    ) -> Result<(u64, u64)> {
        let (pg, device, config, plan) = (self.pg, self.device, self.config, self.plan);
        let Some(r) = checkpoint::resume(pg, device, config, plan, trainable, opt)? else {
            return Ok((0, 0));
        };
        self.saves.continue_lineage(r.lineage.clone());
        let mut p = r.progress;
        if p.data_batch >= steps_per_epoch {
            (p.data_epoch, p.data_batch) = (p.data_epoch + 1, 0);
        }
        if let (0, Some(lineage)) = (pg.rank(), &r.lineage) {
            let moved = checkpoint::set_aside_later(&config.checkpoint.dir, p.step, lineage);
            if let Some((from, to)) = moved.first() {
                tracing::warn!(
                    "resumed from step {}: this run's {} later checkpoint(s) are kept aside, not continued from (`checkpoint.resume: auto` would take the newest, and retention would remove the one resumed from first): {} -> {}{}",
                    p.step,
                    moved.len(),
                    from.display(),
                    to.display(),
                    if moved.len() > 1 { ", ..." } else { "" }
                );
            }
        }
        log(
            pg.rank(),
            &format!(
                "resumed from {} (step {}, epoch {}, data at epoch {} batch {}, saved by {} rank(s))",
                r.dir.display(),
                p.step,
                p.epoch,
                p.data_epoch,
                p.data_batch,
                r.world_size
            ),
        );
        // masks are drawn per micro-batch of train.batch_size samples (older trainers, which
        // record no micro_batch, drew them per rank: their masks are not replayed at all)
        let changed = match r.micro_batch {
            Some(b) if b != config.train.batch_size => Some(format!(
                "saved with train.batch_size {b}, resumed with {} (keep {b} to replay them)",
                config.train.batch_size
            )),
            Some(_) => None,
            None => Some("saved by an older trainer, which drew them per rank".to_string()),
        };
        if let Some(why) = changed.filter(|_| config.peft.is_lora() && config.peft.dropout > 0.0) {
            log(
                pg.rank(),
                &format!(
                    "note: {why}: the data, weights and optimizer state continue exactly, but LoRA dropout masks are drawn per micro-batch, so with peft.dropout {} the next steps are not those of an uninterrupted run",
                    config.peft.dropout
                ),
            );
        }
        let supervise = serde_json::json!(config.data.supervise);
        if r.supervise != supervise {
            log(
                pg.rank(),
                &format!(
                    "note: the checkpoint was trained with data.supervise {}, this run has {supervise}: the loss covers other turns from here on",
                    r.supervise
                ),
            );
        }
        for note in peft_setting_changes(&r.peft, &config.peft) {
            log(pg.rank(), &note);
        }
        let now = crate::optim::AdamWConfig::for_training(config).to_json();
        if !r.optimizer.is_null() && r.optimizer != now {
            // (torch's load_state_dict would bring back the saved values; HF's Trainer, like this
            // one, builds the optimizer from the run's arguments)
            log(
                pg.rank(),
                &format!(
                    "note: the optimizer settings differ from the checkpoint's (saved {}, now {now}); the restored moments continue under the new ones",
                    r.optimizer
                ),
            );
        }
        st.resumed_schedule = Some(r.scheduler);
        st.step = p.step;
        st.epoch = p.epoch;
        st.skipped_nonfinite = p.skipped_nonfinite;
        st.saved_step = Some(p.step);
        st.last_loss = p.loss;
        // (a best loss of another validation set, e.g. another data.eval or
        // train.max_eval_samples, says nothing about this one's: the best is chosen anew, as a
        // fresh run would, from the next validation on)
        let other_set = |b: &EvalResult| b.eval_set.is_some_and(|s| Some(s) != eval_set);
        if let Some(b) = p.best_eval.filter(other_set) {
            log(
                pg.rank(),
                &format!(
                    "note: the best validation loss so far ({:.4}, step {}) was measured on another validation set (data.eval or train.max_eval_samples changed): it is not compared with this run's; the next validation's adapter replaces the one in train.output_dir",
                    b.eval_loss, b.step
                ),
            );
            p.best_eval = None;
        }
        st.best_eval = p.best_eval;
        st.resumed_validated = r.validated;
        st.resumed_template_clock = r.template_clock;
        self.saves.protect(p.best_eval.map(|b| b.step));
        if let Some(b) = p.best_eval {
            log(
                pg.rank(),
                &format!(
                    "best validation loss so far {:.4} (epoch {}, step {}): a later epoch replaces the adapter in train.output_dir only with a lower one",
                    b.eval_loss, b.epoch, b.step
                ),
            );
        }
        Ok((p.data_epoch, p.data_batch))
    }

    /// Rank 0 takes the locks of `checkpoint.dir` and `train.output_dir` for the run, then every
    /// rank checks that it can write into `checkpoint.dir` (`probe_writes`). The locks come first:
    /// a second run saving into the same checkpoint folder (a requeued job whose first allocation
    /// still runs, a command started twice) would replace its in-flight checkpoint folders and
    /// retire its checkpoints, and its probe files would overwrite this run's; one writing into
    /// the same output folder would interleave its metrics.jsonl lines with this run's and replace
    /// its adapter. It is refused before it writes anything. (Taking the output folder's lock also
    /// shows that rank 0, which alone writes there, can write there: before the model loads.)
    pub fn probe(&mut self) -> Result<()> {
        let (pg, config) = (self.pg, self.config);
        let (ckpt, out) = (&config.checkpoint.dir, &config.train.output_dir);
        let locked = match pg.rank() {
            0 => claim(ckpt, "checkpoint.dir").and_then(|ckpt_lock| {
                // (one folder for both: its one lock covers both; a second flock on the same file
                // from this process would be refused)
                let same = std::fs::create_dir_all(out).is_ok()
                    && std::fs::canonicalize(ckpt).ok() == std::fs::canonicalize(out).ok();
                let out_lock = match same {
                    true => None,
                    false => Some(claim(out, "train.output_dir")?),
                };
                Ok(Some([Some(ckpt_lock), out_lock]))
            }),
            _ => Ok(None),
        };
        let elsewhere = || {
            format!(
                "checkpoint.dir {} or train.output_dir {}: rank 0 could not take them for this run: \
                 another training run holds one, or one is not writable",
                ckpt.display(),
                out.display()
            )
        };
        self.dir_locks = checkpoint::agree(pg, self.device, locked, elsewhere)?;
        self.probe_writes()
    }

    /// Checks before training that every rank can write into `checkpoint.dir` and that rank 0
    /// sees what the others write there (a folder local to each node would only fail at the first
    /// save, an epoch or more in): each rank writes `.probe-rank-R` holding a token rank 0 drew
    /// for this run (so a file left by a crashed run does not count), rank 0 looks for all of
    /// them, then each removes its own. Every rank fails when any check fails.
    fn probe_writes(&self) -> Result<()> {
        let (pg, dir) = (self.pg, &self.config.checkpoint.dir);
        let (rank, world) = (pg.rank(), pg.world_size());
        let probe = |r: usize| dir.join(format!(".probe-rank-{r}"));
        let drawn = if rank == 0 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            ((t ^ (std::process::id() as u64) << 40) & (i64::MAX as u64)) as i64
        } else {
            0
        };
        let token = all_reduce_i64(pg, drawn, self.device)?.to_string();
        let wrote = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(probe(rank), &token))
            .with_context(|| format!("rank {rank}: checkpoint.dir {} is not writable (set checkpoint.dir to a folder every rank can write, shared between nodes)", dir.display()));
        let not_writable = || "checkpoint.dir is not writable on another rank".into();
        // (both checks' outcomes are agreed on, so every rank takes the same branch)
        let checked = checkpoint::agree(pg, self.device, wrote, not_writable).and_then(|()| {
            let missing: Vec<usize> = if rank == 0 {
                (0..world)
                    .filter(|&r| {
                        std::fs::read_to_string(probe(r)).ok().as_deref() != Some(token.as_str())
                    })
                    .collect()
            } else {
                vec![]
            };
            let seen = if missing.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "checkpoint.dir {}: rank 0 does not see the files ranks {missing:?} wrote there (a folder local to each node?); a checkpoint needs every rank's file in one folder: set checkpoint.dir to shared storage",
                    dir.display()
                ))
            };
            let unseen = || "rank 0 could not see every rank's file in checkpoint.dir".into();
            checkpoint::agree(pg, self.device, seen, unseen)
        });
        let _ = std::fs::remove_file(probe(rank));
        checked
    }

    /// Saves the state after `st.step` with the data continuing at `data` (epoch, batch).
    /// A checkpoint of the step just done in epoch `epoch` (data at its next batch), unless it
    /// has one (saved by `after_step`, or the one resumed from) or no step was done.
    pub fn save_step_done(
        &mut self,
        st: &mut State,
        trainable: &Trainable,
        opt: &AdamW,
        epoch: u64,
    ) -> Result<()> {
        if st.step == 0 || st.saved_step == Some(st.step) {
            return Ok(());
        }
        let at = (epoch, st.epoch_batch);
        self.save(st, trainable, opt, at)
    }

    pub fn save(
        &mut self,
        st: &mut State,
        trainable: &Trainable,
        opt: &AdamW,
        data: (u64, u64),
    ) -> Result<()> {
        let progress = Progress {
            step: st.step,
            epoch: st.epoch,
            data_epoch: data.0,
            data_batch: data.1,
            skipped_nonfinite: st.skipped_nonfinite,
            loss: st.last_loss,
            samples: Some(self.plan.samples),
            lengths_hash: Some(self.plan.lengths_hash),
            best_eval: st.best_eval,
        };
        let async_save = self.config.checkpoint.async_save;
        // (completes the save in flight first)
        self.saves
            .save(
                self.pg,
                self.device,
                self.config,
                trainable,
                opt,
                self.schedule,
                &progress,
                async_save,
            )
            .with_context(|| format!("saving the checkpoint of step {}", st.step))?;
        st.saved_step = Some(st.step);
        Ok(())
    }

    /// After a step inside an epoch: the periodic save, the save at `train.max_steps` in
    /// mid-epoch (an epoch's last step is saved at the epoch end instead), then publishing a
    /// background save that every rank has written.
    pub fn after_step(
        &mut self,
        st: &mut State,
        trainable: &Trainable,
        opt: &AdamW,
        steps_per_epoch: u64,
        total_steps: u64,
    ) -> Result<()> {
        if self.config.checkpoint.async_save && !self.reserved {
            // host memory for the snapshots, allocated while training goes on
            self.saves.reserve(trainable, opt);
            self.reserved = true;
        }
        let every = self.config.checkpoint.every_steps;
        let periodic = every > 0 && st.step.is_multiple_of(every);
        if (periodic || st.step == total_steps)
            && st.epoch_batch < steps_per_epoch
            && st.saved_step != Some(st.step)
        {
            self.save(st, trainable, opt, (st.epoch, st.epoch_batch))?;
        }
        if self.saves.in_flight() {
            let busy = !self.saves.is_written();
            if all_reduce_i64(self.pg, busy as i64, self.device)? == 0 {
                self.saves.finish(self.pg, self.device)?;
            }
        }
        Ok(())
    }

    /// End of training: completes and publishes the save in flight, if any (its error on any rank
    /// is returned on every rank), and waits for the removal of old checkpoints (a warning).
    pub fn finish(&mut self) -> Result<()> {
        self.saves.close(self.pg, self.device)
    }

    /// Publishes the save in flight now (every rank calls it), so that it is a checkpoint before
    /// something that may fail runs.
    pub fn publish_pending(&mut self) -> Result<()> {
        self.saves.finish(self.pg, self.device).map(|_| ())
    }

    /// `e`, after finishing the saves (`finish`: the one in flight published, the removal of old
    /// checkpoints waited for) when `e` is an [`AgreedStop`] (every rank stops at the same step,
    /// so the publishing collectives can run): a background save whose files are written is then
    /// a checkpoint, not a `.partial` folder with the resume going back to an older one, and no
    /// old one is left half deleted. A failure there is logged; `e` is returned either way. (After
    /// another error, a peer may be gone: nothing is attempted that would wait for it.)
    pub fn publish_before_stop(&mut self, e: anyhow::Error) -> anyhow::Error {
        // (anyhow's downcast finds it as the error or as any context over it)
        if e.downcast_ref::<AgreedStop>().is_some() {
            if let Err(p) = self.finish() {
                tracing::warn!("the checkpoint being saved could not be published: {p:#}");
            }
            // every rank waits for rank 0's retention to end: a rank exiting first has the
            // launcher stop the others, rank 0 in the middle of a deletion among them
            let _ = self.pg.barrier();
        }
        e
    }

    /// Whether this run leaves a PEFT adapter in `train.output_dir` (LoRA, `train.save_adapter`
    /// not none); the same on every rank.
    pub fn writes_adapter(&self) -> bool {
        self.config.peft.is_lora() && self.config.train.save_adapter != SaveAdapter::None
    }

    /// At an epoch's end (every rank calls it; the checkpoint of `st.step` is saved): as
    /// llama-recipes' save_model, the adapter goes into `train.output_dir` after every epoch
    /// without validation, and after an epoch whose validation loss (`validated`, all-reduced:
    /// the same on every rank) is below every earlier epoch's with it. Rank 0 then adds the
    /// result to the checkpoint folder (`checkpoint::validation`), so a resumed run compares
    /// against its best epoch too.
    pub fn epoch_end(&mut self, st: &mut State, validated: Option<EvalResult>) -> Result<()> {
        let improved = validated.is_none_or(|r| r.beats(st.best_eval.as_ref()));
        if improved && self.writes_adapter() {
            // (a background save is a checkpoint, and exportable, once published)
            self.publish_pending()?;
            self.export_adapter(st.step);
        }
        let Some(result) = validated else {
            return Ok(());
        };
        if improved {
            st.best_eval = Some(result);
            // (kept by retention from now on, as HF keeps best_model_checkpoint; the one kept
            // before goes unless it is among the newest)
            self.saves.protect(Some(result.step));
            if self.pg.rank() == 0 {
                let c = &self.config.checkpoint;
                self.saves.retire_unprotected(&c.dir, c.keep_last);
            }
            log(
                self.pg.rank(),
                &format!(
                    "best validation loss so far: {:.4} (epoch {}, step {})",
                    result.eval_loss, result.epoch, result.step
                ),
            );
        }
        let ckpt = self.step_dir(st.step);
        let finite = result.eval_loss.is_finite();
        if !finite {
            log(
                self.pg.rank(),
                &format!(
                    "warning: the validation loss of epoch {} is {}: not a best epoch (the adapter in train.output_dir stays as it is)",
                    result.epoch, result.eval_loss
                ),
            );
        }
        if self.pg.rank() == 0 && self.saves.saved_by_this_run(&ckpt) {
            if let Err(e) = validation::write_record(&ckpt, &result) {
                tracing::warn!("the validation result of step {} was not recorded in its checkpoint ({e:#}): a run resumed from it does not count this epoch towards the best adapter", st.step);
            }
        }
        Ok(())
    }

    fn step_dir(&self, step: u64) -> std::path::PathBuf {
        self.config
            .checkpoint
            .dir
            .join(checkpoint::step_dir_name(step))
    }

    /// Rank 0 writes the checkpoint of step `step` (published by then) as a PEFT adapter into
    /// `train.output_dir`, where llama-recipes' `save_model` leaves it and the seed's inference
    /// script looks (`train.save_adapter` names its keys, or turns it off), replacing the adapter
    /// there (`checkpoint::replace_adapter`); once per step. Only a checkpoint of this run is
    /// exported (one resumed from outside `checkpoint.dir` with no step left is not). A failure is
    /// a warning: the checkpoint is complete, and `trainer export` writes the adapter from it.
    pub fn export_adapter(&mut self, step: u64) {
        let naming = match self.config.train.save_adapter {
            _ if !self.config.peft.is_lora() || self.pg.rank() != 0 => return,
            _ if self.exported == Some(step) => return,
            SaveAdapter::None => return,
            SaveAdapter::Hf5 => checkpoint::AdapterNaming::Hf5,
            SaveAdapter::Hf4 => checkpoint::AdapterNaming::Hf4,
        };
        let out = &self.config.train.output_dir;
        let ckpt = self.step_dir(step);
        if !self.saves.saved_by_this_run(&ckpt) {
            log(0, &format!("no checkpoint of this run at step {step} in checkpoint.dir: no PEFT adapter written to train.output_dir (`trainer export --format peft` writes one from any checkpoint)"));
            return;
        }
        match checkpoint::replace_adapter(&ckpt, out, naming) {
            Ok(()) => {
                self.exported = Some(step);
                log(
                    0,
                    &format!(
                        "PEFT adapter of step {step} written to {} ({} key naming; adapter_config.json, adapter_model.safetensors, and the run's prompt settings in llava_sco_prompt.json): PeftModel.from_pretrained or `trainer infer --adapter` loads it",
                        out.display(),
                        match naming {
                            checkpoint::AdapterNaming::Hf5 => "transformers-5",
                            checkpoint::AdapterNaming::Hf4 => "transformers-4",
                        }
                    ),
                )
            }
            Err(e) => tracing::warn!(
                "the PEFT adapter of {} was not written into train.output_dir {}: {e:#} (the checkpoint is complete; `trainer export --format peft --checkpoint {}` writes it)",
                ckpt.display(),
                out.display(),
                ckpt.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peft(sets: &[&str]) -> PeftConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let yaml = "model: {path: m}\ndata: {train: t.jsonl}\n";
        crate::config::parse(yaml, &sets).expect("config").peft
    }

    /// A resume may change peft.dropout (noted: the masks and the later adapters' lora_dropout
    /// follow the run's) and gives an init_from that is not the checkpoint's a note that it is
    /// not read; the same settings give no note.
    #[test]
    fn a_resume_notes_a_changed_dropout_and_an_unread_init_from() {
        let saved = serde_json::to_value(peft(&["peft.dropout=0.0"])).unwrap();
        assert!(peft_setting_changes(&saved, &peft(&["peft.dropout=0.0"])).is_empty());
        let notes = peft_setting_changes(&saved, &peft(&["peft.dropout=0.1"]));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("trained with peft.dropout 0, this run has 0.1"),
            "{notes:?}"
        );
        let from_a = ["peft.dropout=0.0", "peft.init_from=a"];
        let notes = peft_setting_changes(&saved, &peft(&from_a));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(
                "peft.init_from a is not what the checkpoint started from (a fresh adapter)"
            ),
            "{notes:?}"
        );
        let saved_from_a = serde_json::to_value(peft(&from_a)).unwrap();
        assert!(peft_setting_changes(&saved_from_a, &peft(&from_a)).is_empty());
        // full finetuning has neither
        let full = serde_json::to_value(peft(&["peft.method=none"])).unwrap();
        assert!(peft_setting_changes(&full, &peft(&["peft.method=none"])).is_empty());
    }
}
