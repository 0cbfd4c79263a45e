//! The raw layer: the YAML file as serde reads it. Unknown keys are refused, absent keys take
//! the defaults below, and every leaf is already checked for type and range (`values.rs`). What
//! is left for `validate.rs`: required keys and rules that span several keys.
//!
//! Defaults follow llama-recipes' `train_config`, `fsdp_config` and `lora_config` where those
//! have one (the llama-recipes name is in the comment), and DESIGN.md elsewhere.
use serde::Deserialize;

use super::schema::{
    Attention, Backend, BadRecords, DType, DataFiles, ImagePlaceholder, LengthPolicy, PeftMethod,
    Resume, SaveAdapter, Schedule, ScheduleKind, ShardingStrategy, Supervise, TextOnly,
};
use super::values::{
    Beta, ClipNorm, Count, Decay, Dropout, FilePath, Int, LayerIndices, LayerLists, ModuleNames,
    NonNegative, Num, Patterns, Positive, PositiveInt, Ratio, Targets, Workers,
};

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub model: RawModel,
    pub peft: RawPeft,
    pub data: RawData,
    pub train: RawTrain,
    pub fsdp: RawFsdp,
    pub checkpoint: RawCheckpoint,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawModel {
    /// Required (llama-recipes `model_name`).
    pub path: Option<FilePath>,
    pub dtype: DType,
    pub attention: Attention,
}

impl Default for RawModel {
    fn default() -> Self {
        RawModel {
            path: None,
            // The released checkpoints are bf16, and llama-recipes loads them as stored.
            dtype: DType::Bf16,
            // `use_fast_kernels` (the seed passes it) selects sdpa.
            attention: Attention::Sdpa,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawPeft {
    pub method: PeftMethod,
    pub r: Int<PositiveInt>,
    pub alpha: Num<Positive>,
    pub dropout: Num<Dropout>,
    pub target_modules: Targets,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub rank_pattern: Patterns<Int<PositiveInt>>,
    pub alpha_pattern: Patterns<Num<Positive>>,
    pub exclude_modules: Option<Targets>,
    pub layers_to_transform: LayerIndices,
    pub layers_pattern: LayerLists,
    pub modules_to_save: ModuleNames,
    pub init_from: Option<FilePath>,
    pub freeze_llm_only: bool,
}

impl Default for RawPeft {
    fn default() -> Self {
        // lora_config: r 8, lora_alpha 32, target_modules [q_proj, v_proj], lora_dropout 0.05.
        RawPeft {
            method: PeftMethod::Lora,
            r: Int::new(8),
            alpha: Num::new(32.0),
            dropout: Num::new(0.05),
            target_modules: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            use_dora: false,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            exclude_modules: None,
            layers_to_transform: LayerIndices::default(),
            layers_pattern: LayerLists::default(),
            modules_to_save: ModuleNames::default(),
            init_from: None,
            freeze_llm_only: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawData {
    /// Required.
    pub train: Option<DataFiles>,
    pub eval: Option<DataFiles>,
    pub image_root: Option<FilePath>,
    pub max_seq_len: Int<PositiveInt>,
    pub max_seq_len_policy: LengthPolicy,
    pub num_workers: Int<Workers>,
    pub bad_records: BadRecords,
    pub text_only: TextOnly,
    pub image_placeholder: ImagePlaceholder,
    pub double_bos: bool,
    pub supervise: Supervise,
}

impl Default for RawData {
    fn default() -> Self {
        RawData {
            train: None,
            eval: None,
            image_root: None,
            // context_length 4096.
            max_seq_len: Int::new(4096),
            // The seed never truncates; dropping an over-long sample (and counting it) keeps
            // its supervision intact where truncation could cut the answer off.
            max_seq_len_policy: LengthPolicy::Skip,
            num_workers: Int::new(2),
            bad_records: BadRecords::Error,
            // cot_dataset.py skips records without an image.
            text_only: TextOnly::Skip,
            // (the seed keeps the marker as text: `keep` reproduces it)
            image_placeholder: ImagePlaceholder::Strip,
            double_bos: false,
            // the seed supervises every assistant turn
            supervise: Supervise::All,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawTrain {
    pub epochs: Int<PositiveInt>,
    pub batch_size: Int<PositiveInt>,
    pub grad_accum: Int<PositiveInt>,
    pub drop_last: bool,
    pub lr: Num<Positive>,
    pub weight_decay: Num<NonNegative>,
    pub adam_beta1: Num<Beta>,
    pub adam_beta2: Num<Beta>,
    pub adam_epsilon: Num<Positive>,
    pub schedule: RawSchedule,
    pub grad_clip: Option<Num<ClipNorm>>,
    pub max_steps: Int<Count>,
    pub seed: Int<Count>,
    pub validate: bool,
    pub log_every: Int<PositiveInt>,
    pub tensorboard: bool,
    pub output_dir: FilePath,
    pub save_adapter: SaveAdapter,
    pub skip_nonfinite: Int<Count>,
    pub eval_every_steps: Int<Count>,
    pub val_batch_size: Option<Int<PositiveInt>>,
    pub max_eval_samples: Int<Count>,
    pub peak_tflops: Option<Num<Positive>>,
}

impl Default for RawTrain {
    fn default() -> Self {
        RawTrain {
            // num_epochs 3, batch_size_training 4, gradient_accumulation_steps 1.
            epochs: Int::new(3),
            batch_size: Int::new(4),
            grad_accum: Int::new(1),
            // the last, incomplete accumulation window is trained, as llama-recipes' train loop
            // and HF's Trainer (dataloader_drop_last False) train it
            drop_last: false,
            // llama-recipes' default is 1e-4; the seed (and LLaVA-CoT) train at 1e-5.
            lr: Num::new(1e-5),
            weight_decay: Num::new(0.0),
            // torch.optim.AdamW's (llama-recipes passes none; HF's Trainer has the same defaults)
            adam_beta1: Num::new(0.9),
            adam_beta2: Num::new(0.999),
            adam_epsilon: Num::new(1e-8),
            schedule: RawSchedule::default(),
            // gradient_clipping False.
            grad_clip: None,
            // max_train_step 0: no limit. (It counts micro-batches; this counts optimizer steps.)
            max_steps: Int::new(0),
            seed: Int::new(42),
            // run_validation is True in llama-recipes, but there is no eval split unless
            // data.eval names one, so validation is opt-in here.
            validate: false,
            log_every: Int::new(1),
            // llama-recipes logs to wandb only when asked (use_wandb); so TensorBoard here
            tensorboard: false,
            output_dir: FilePath::new("./finetuned_model"),
            // llama-recipes' save_model (True) with current peft's naming
            save_adapter: SaveAdapter::Hf5,
            skip_nonfinite: Int::new(0),
            // llama-recipes validates after each epoch only
            eval_every_steps: Int::new(0),
            // val_batch_size 1 in llama-recipes; the loss is a mean over tokens, so the batch
            // size changes only speed and memory: train.batch_size's by default
            val_batch_size: None,
            // max_eval_step 0: the whole eval split
            max_eval_samples: Int::new(0),
            // null: from the device table (GPUs), none on CPU (MFU not reported).
            peak_tflops: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawSchedule {
    pub kind: ScheduleKind,
    pub gamma: Num<Decay>,
    pub warmup_steps: Int<Count>,
    pub min_lr_ratio: Num<Ratio>,
}

impl Default for RawSchedule {
    fn default() -> Self {
        // StepLR(step_size=1, gamma=0.85) stepped once per epoch.
        RawSchedule {
            kind: ScheduleKind::Step,
            gamma: Num::new(Schedule::DEFAULT_GAMMA),
            warmup_steps: Int::new(0),
            min_lr_ratio: Num::new(0.0),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawFsdp {
    pub enabled: bool,
    pub backend: Backend,
    pub mixed_precision: DType,
    pub activation_checkpointing: bool,
    pub prefetch: bool,
    pub sharding_strategy: ShardingStrategy,
    pub sharding_group_size: Option<Int<PositiveInt>>,
    pub replica_group_size: Option<Int<PositiveInt>>,
}

impl Default for RawFsdp {
    fn default() -> Self {
        // enable_fsdp (the seed passes it); mixed_precision True with bf16;
        // fsdp_activation_checkpointing True.
        RawFsdp {
            enabled: true,
            backend: Backend::Auto,
            mixed_precision: DType::Bf16,
            activation_checkpointing: true,
            prefetch: true,
            // fsdp_config.sharding_strategy: FULL_SHARD
            sharding_strategy: ShardingStrategy::FullShard,
            // (fsdp_config: sharding_group_size 0, replica_group_size 0, read only with hsdp)
            sharding_group_size: None,
            replica_group_size: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawCheckpoint {
    pub dir: FilePath,
    pub every_steps: Int<Count>,
    pub keep_last: Int<Count>,
    pub resume: Resume,
    #[serde(rename = "async")]
    pub async_save: bool,
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        RawCheckpoint {
            // dist_checkpoint_root_folder / dist_checkpoint_folder as the seed sets them.
            dir: FilePath::new("./finetuned_model/fine-tuned"),
            // llama-recipes saves once per epoch.
            every_steps: Int::new(0),
            keep_last: Int::new(2),
            resume: Resume::Auto,
            async_save: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::values::{IntRule, NumRule};
    use super::*;

    /// Defaults bypass the rules (they are constants), so check them against the rules here.
    #[test]
    fn defaults_obey_their_rules() {
        let (p, t, s) = (
            RawPeft::default(),
            RawTrain::default(),
            RawSchedule::default(),
        );
        assert!(PositiveInt::allows(p.r.get()));
        assert!(Positive::allows(p.alpha.get()));
        assert!(Dropout::allows(p.dropout.get()));
        assert!(PositiveInt::allows(RawData::default().max_seq_len.get()));
        for v in [t.epochs, t.batch_size, t.grad_accum, t.log_every] {
            assert!(PositiveInt::allows(v.get()));
        }
        assert!(Positive::allows(t.lr.get()));
        assert!(NonNegative::allows(t.weight_decay.get()));
        assert!(Decay::allows(s.gamma.get()));
        assert!(Ratio::allows(s.min_lr_ratio.get()));
    }
}
