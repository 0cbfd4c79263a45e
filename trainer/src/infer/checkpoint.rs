//! `trainer infer --checkpoint DIR`: a training checkpoint (`step-NNNNNNNN/`, see
//! docs/checkpoint-format.md) applied to its base model in memory, without exporting an adapter
//! first. The trainable weights are read one parameter at a time (`checkpoint::load::TrainedParams`,
//! the merged export's reader: each file verified when first read, never all fp32 weights of a
//! full finetuning in host memory at once): LoRA factors are put on fresh branches made from the
//! checkpoint's `peft` section; full-finetuning parameters replace the base weights.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::InferError;
use crate::checkpoint::{Manifest, PromptSettings};
use crate::model::MllamaModel;

/// A checkpoint whose trainable weights `apply` puts on a model.
pub struct CheckpointWeights {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// `what` about the checkpoint `dir`, which it names unless it starts by naming it already
/// ("checkpoint DIR: ..." or "DIR is ...").
fn err(dir: &Path, what: impl std::fmt::Display) -> InferError {
    let (what, named) = (what.to_string(), dir.display().to_string());
    let prefix = format!("checkpoint {named}: ");
    match what.starts_with(&prefix) || what.starts_with(&format!("{named} ")) {
        true => InferError::Input(what),
        false => InferError::Input(format!("{prefix}{what}")),
    }
}

impl CheckpointWeights {
    /// Reads the manifest and verifies every file it lists (before the base model is loaded, so
    /// a damaged checkpoint fails in seconds); the weights are read by `apply`.
    pub fn read(dir: &Path) -> Result<Self, InferError> {
        let c = Self::read_unverified(dir)?;
        c.verify_part(0, 1)?;
        Ok(c)
    }

    /// The manifest only: the caller verifies the files (`verify_part`) before `apply`.
    pub fn read_unverified(dir: &Path) -> Result<Self, InferError> {
        use crate::checkpoint::load::{for_reading, read_manifest};
        let manifest =
            read_manifest(dir).map_err(|e| err(dir, format!("{:#}", for_reading(e, dir))))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Verifies every `count`-th file from the `index`-th (the ranks of a node split the hashing
    /// of a checkpoint they all read, rather than each reading it whole). Returns how many files
    /// it checked.
    pub fn verify_part(&self, index: usize, count: usize) -> Result<usize, InferError> {
        use crate::checkpoint::load::{for_reading, verify_part};
        verify_part(&self.dir, &self.manifest, index, count)
            .map_err(|e| err(&self.dir, format!("{:#}", for_reading(e, &self.dir))))
    }

    /// The base model folder the run trained on (`model.path` as configured).
    pub fn model_path(&self) -> PathBuf {
        PathBuf::from(&self.manifest.model_path)
    }

    /// How the run built its prompts (`data.double_bos`, `data.image_placeholder`); the defaults
    /// for checkpoints of trainers that did not record them.
    pub fn prompt_settings(&self) -> PromptSettings {
        PromptSettings::from_value(&self.manifest.prompt)
    }

    fn is_lora(&self) -> bool {
        self.manifest.is_lora()
    }

    /// Checks that `model_dir` is the base the run trained on (its config.json's bytes or
    /// content, and its tensors: `checkpoint::check_base`).
    pub fn check_base(&self, model_dir: &Path) -> Result<(), InferError> {
        crate::checkpoint::check_base(&self.manifest, model_dir)
            .map_err(|e| err(&self.dir, format!("{e:#}")))
    }

    /// Puts the trained weights on `model` (loaded from the base): every checkpoint tensor must
    /// match a parameter of the same name and shape, and every trainable parameter must be found.
    /// Returns the number of tensors applied.
    pub fn apply(&self, model: &mut MllamaModel) -> Result<usize, InferError> {
        let targets: BTreeMap<String, Tensor> = if self.is_lora() {
            // the trained fp32 factors as they are, as `infer --adapter` loads an adapter
            model.set_lora_kind(tch::Kind::Float);
            let adapter = (self.manifest.adapter_config()).map_err(|e| err(&self.dir, e))?;
            model.apply_adapter(&adapter, 0, None)?;
            model.set_training(false);
            model.trainable_parameters().into_iter().collect()
        } else {
            let mut m = BTreeMap::new();
            model.visit_params(&mut |n, t| {
                m.insert(n.to_string(), t.shallow_clone());
            });
            m
        };
        let mut problems = vec![];
        let mut found = 0;
        let mut params = crate::checkpoint::load::TrainedParams::new(&self.dir, &self.manifest)
            .map_err(|e| {
                let e = crate::checkpoint::load::for_reading(e, &self.dir);
                err(&self.dir, format!("{e:#}"))
            })?;
        let names: Vec<String> = params.names().map(str::to_string).collect();
        for name in &names {
            let shape = params.shape(name).unwrap_or_default().to_vec();
            match targets.get(name) {
                None => problems.push(format!("{name}: no such parameter in the model")),
                Some(p) if p.size() != shape => problems.push(format!(
                    "{name}: the checkpoint has {shape:?}, the model {:?}",
                    p.size()
                )),
                Some(p) => {
                    let t = params
                        .get(name)
                        .map_err(|e| err(&self.dir, format!("{e:#}")))?;
                    tch::no_grad(|| p.shallow_clone().copy_(&t));
                    found += 1;
                }
            }
        }
        if self.is_lora() && found != targets.len() {
            problems.push(format!(
                "{} LoRA factors of the model are not in the checkpoint",
                targets.len() - found
            ));
        }
        if !problems.is_empty() {
            return Err(err(
                &self.dir,
                format!(
                    "does not fit the model (was it trained on another base? pass --model that base):\n  {}",
                    problems.join("\n  ")
                ),
            ));
        }
        // (DoRA's g once, not in every decoding step)
        model.fix_dora();
        Ok(found)
    }
}
