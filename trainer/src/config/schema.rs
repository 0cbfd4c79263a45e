//! The resolved config: what the rest of the trainer reads. Every value here has been checked;
//! defaults are filled in (see `raw.rs` for them and the llama-recipes flag each mirrors).
//!
//! Paths are kept exactly as written in the YAML: a relative path is relative to the working
//! directory of the run (as with llama-recipes and torchrun), not to the config file's folder.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A whole run: the six sections of the YAML file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub model: ModelConfig,
    pub peft: PeftConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub fsdp: FsdpConfig,
    pub checkpoint: CheckpointConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Hugging Face model folder (config.json, safetensors, tokenizer, processor config).
    pub path: PathBuf,
    /// Storage dtype of the weights on load.
    pub dtype: DType,
    pub attention: Attention,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bf16,
    Fp16,
    Fp32,
}

/// As the config writes it (`bf16`), for messages.
impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::Bf16 => "bf16",
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Plain matmul + softmax, the reference for numerics.
    Eager,
    /// libtorch's scaled_dot_product_attention (llama-recipes `--use_fast_kernels`).
    Sdpa,
    /// Our fused NVRTC kernels (GPU only).
    Fused,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftConfig {
    pub method: PeftMethod,
    /// LoRA rank.
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Which linear layers get a LoRA branch, as PEFT's `target_modules`.
    pub target_modules: LoraTargets,
    /// Rank-stabilized LoRA: the update scaled by alpha / sqrt(r) instead of alpha / r (PEFT's
    /// `use_rslora`).
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): each wrapped layer also learns the magnitude of each row of its
    /// adapted weight.
    pub use_dora: bool,
    /// PEFT's `rank_pattern`: (module pattern, rank) in the order written; a module takes the
    /// rank of the pattern that matches the end of its path at a `.`, else `r`. Patterns that
    /// give one module different values are refused when the model is built.
    #[serde(serialize_with = "as_map")]
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT's `alpha_pattern`: (module pattern, alpha), as `rank_pattern`.
    #[serde(serialize_with = "as_map")]
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `exclude_modules`: modules `target_modules` chooses that get no LoRA (a list of
    /// names matched as suffixes, or a regular expression matched against whole paths).
    pub exclude_modules: Option<LoraTargets>,
    /// PEFT's `layers_to_transform`: LoRA only on layers of these indices (empty: every layer).
    pub layers_to_transform: Vec<usize>,
    /// PEFT's `layers_pattern`: the layer lists whose index `layers_to_transform` reads (empty:
    /// the first numbered part of a module path).
    pub layers_pattern: Vec<String>,
    /// PEFT's `modules_to_save`: modules (a path ending with a name) whose every parameter trains
    /// in full beside the LoRA factors, and is saved in the adapter.
    pub modules_to_save: Vec<String>,
    /// A PEFT adapter folder to start from (llama-recipes `--from_peft_checkpoint`).
    pub init_from: Option<PathBuf>,
    /// Full finetuning of the vision tower, the projector and the text model's cross-attention
    /// layers only, the rest of the language model frozen (llama-recipes' `freeze_LLM_only`).
    pub freeze_llm_only: bool,
}

/// (pattern, value) pairs as a mapping, as PEFT writes its patterns.
fn as_map<V: Serialize, S: serde::Serializer>(
    entries: &[(String, V)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// PEFT's `target_modules`, written as the config gives it (and as checkpoints record it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LoraTargets {
    /// Module names matched as suffixes, as PEFT does: `q_proj` wraps the vision attention,
    /// the text self-attention and the text cross-attention projections alike.
    Names(Vec<String>),
    /// `all-linear` (every linear layer but `lm_head`), or a regular expression matched against
    /// the whole module path (`model.language_model.layers.3.self_attn.q_proj`).
    Pattern(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftMethod {
    Lora,
    /// Full finetuning: every weight trains.
    None,
}

impl PeftConfig {
    pub fn is_lora(&self) -> bool {
        self.method == PeftMethod::Lora
    }

    /// The factor on the LoRA update, `B A x * alpha / r` (PEFT's `scaling`); only LoRA
    /// reads it.
    pub fn lora_scaling(&self) -> f64 {
        crate::model::lora::scaling(self.alpha, self.r as f64, self.use_rslora)
    }
}

/// The JSONL files of one split, read in this order as one dataset (the sampler shuffles across
/// them). YAML: one path, or a list; a file listed twice is read twice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataFiles(pub Vec<PathBuf>);

impl DataFiles {
    pub fn one(path: impl Into<PathBuf>) -> Self {
        DataFiles(vec![path.into()])
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.0
    }

    /// Where `file` is in the list (its first place), for listing problems in file order.
    pub fn position(&self, file: &Path) -> Option<usize> {
        self.0.iter().position(|f| f == file)
    }
}

/// The files, comma-separated.
impl std::fmt::Display for DataFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(|p| p.display().to_string()).collect();
        f.write_str(&names.join(", "))
    }
}

/// One file as a string (as it is usually written), several as a list.
impl Serialize for DataFiles {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataConfig {
    /// JSONL records in the LLaVA-CoT conversation format.
    pub train: DataFiles,
    pub eval: Option<DataFiles>,
    /// Folder that image paths in the records are relative to; null: used as written.
    pub image_root: Option<PathBuf>,
    /// Longest sample in tokens (llama-recipes `context_length`).
    pub max_seq_len: usize,
    /// What to do with a sample longer than `max_seq_len`.
    pub max_seq_len_policy: LengthPolicy,
    /// Background threads that decode images and tokenize (0 counts as 1: PyTorch's 0, loading
    /// on the training thread, is not offered).
    pub num_workers: usize,
    /// What to do with a record that cannot be parsed or whose image cannot be read.
    pub bad_records: BadRecords,
    /// What to do with a record that has no image (the seed's cot_dataset.py skips them).
    pub text_only: TextOnly,
    /// What to do with a LLaVA `<image>` marker in a human turn.
    pub image_placeholder: ImagePlaceholder,
    /// Keep the second `<|begin_of_text|>` that a chat template plus tokenizer BOS produce.
    pub double_bos: bool,
    /// Which assistant turns the loss covers.
    pub supervise: Supervise,
}

/// The assistant turns the loss covers: every one (the seed's masking), or the last only (in
/// self-correction records the correction, not the first answer it corrects, which is often wrong
/// on purpose: an ablation, as TRL's completion-only loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervise {
    All,
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthPolicy {
    /// Cut the sample at `max_seq_len` tokens.
    Truncate,
    /// Drop the sample (counted and reported).
    Skip,
    /// Stop with an error naming the record.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRecords {
    Error,
    Skip,
}

/// Records without an image: dropped (as the seed's cot_dataset.py), or trained as text.
/// With `keep`, a step whose batches hold no image gives the vision tower and the cross-attention
/// layers no gradient, and AdamW skips them in that step (as torch's AdamW skips a parameter
/// without `.grad`); a text-only sample batched with image samples gets no cross-attention
/// update, as when it is alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextOnly {
    Skip,
    Keep,
}

/// `train.save_adapter`: the naming of the adapter a LoRA run leaves in `train.output_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveAdapter {
    Hf5,
    Hf4,
    None,
}

/// A LLaVA `<image>` marker at the start or end of a human turn: removed (the chat template
/// already places the real `<|image|>` token), or kept as text, which is what the seed's
/// cot_dataset.py does (it only `.strip()`s values; the model then reads `<image>` as ordinary
/// tokens after `<|image|>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImagePlaceholder {
    Strip,
    Keep,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Samples per rank per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The samples of an epoch that do not fill a global batch sit out the epoch (a random
    /// subset, another each epoch) instead of being its last step, a partial one (false).
    pub drop_last: bool,
    pub lr: f64,
    pub weight_decay: f64,
    /// AdamW's betas and eps (HF's `adam_beta1`, `adam_beta2`, `adam_epsilon`).
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub schedule: Schedule,
    /// Max global gradient norm; None: no clipping.
    pub grad_clip: Option<f64>,
    /// Stop after this many optimizer steps; 0: no limit (run all epochs). llama-recipes'
    /// `max_train_step` counts micro-batches instead: with grad_accum > 1 set this to its value /
    /// grad_accum for the same run.
    pub max_steps: u64,
    pub seed: u64,
    /// Run validation on `data.eval` after each epoch (the epoch's checkpoint is saved first). As
    /// in llama-recipes, the adapter in `train.output_dir` is then replaced only after an epoch
    /// whose validation loss is the lowest so far (`checkpoint::validation`).
    pub validate: bool,
    /// Log a line every this many optimizer steps when no progress bar is drawn (metrics.jsonl
    /// gets every step).
    pub log_every: u64,
    /// Also write the metrics as TensorBoard scalars under `output_dir/tensorboard/`
    /// (`tensorboard --logdir`), as HF's `report_to: tensorboard` does.
    pub tensorboard: bool,
    /// Where metrics.jsonl goes and, after each epoch of a LoRA run, the epoch's PEFT adapter
    /// (adapter_config.json + adapter_model.safetensors, as llama-recipes' save_model leaves it,
    /// and the run's prompt settings in llava_sco_prompt.json; with `validate`, the best epoch's).
    pub output_dir: PathBuf,
    /// The key naming of that adapter, or none: `hf5` (transformers >= 4.52, current peft), `hf4`
    /// (transformers 4.45-4.51, the seed's stack), `none` (no adapter written).
    pub save_adapter: SaveAdapter,
    /// How many steps with a non-finite loss or gradient norm may be skipped (update dropped,
    /// warning logged) before the run fails; 0: fail on the first.
    pub skip_nonfinite: u64,
    /// Also validate every this many optimizer steps within an epoch (0: at epoch ends only).
    pub eval_every_steps: u64,
    /// Samples per rank per validation micro-batch; None: `batch_size`.
    pub val_batch_size: Option<usize>,
    /// Validate on the eval split's first this many samples (file order); 0: all of them.
    pub max_eval_samples: u64,
    /// Peak dense TFLOP/s of one device in the compute dtype, the denominator of the MFU that
    /// metrics.jsonl reports; null: looked up from the GPU's name (H100, H200, A100, ...; see
    /// `train::flops`), and MFU is null on a CPU or an unknown GPU.
    pub peak_tflops: Option<f64>,
}

impl TrainConfig {
    /// Samples per optimizer step: independent of how they are split across ranks and
    /// micro-batches, which is what makes runs at different world sizes comparable.
    pub fn global_batch(&self, world_size: usize) -> usize {
        self.batch_size * world_size * self.grad_accum
    }

    /// The optimizer-step limit, if any.
    pub fn step_limit(&self) -> Option<u64> {
        (self.max_steps > 0).then_some(self.max_steps)
    }

    /// Samples per rank per validation micro-batch.
    pub fn eval_batch_size(&self) -> usize {
        self.val_batch_size.unwrap_or(self.batch_size)
    }

    /// How many of the eval split's first samples validation reads; None: all.
    pub fn eval_sample_limit(&self) -> Option<usize> {
        (self.max_eval_samples > 0)
            .then(|| usize::try_from(self.max_eval_samples).unwrap_or(usize::MAX))
    }
}

/// Learning-rate schedule. Every key is always present (so printed configs load back); each
/// kind reads its own: `step` reads `gamma`, `cosine` reads `warmup_steps` and `min_lr_ratio`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// step: lr *= gamma after each epoch (llama-recipes' StepLR).
    pub gamma: f64,
    /// cosine: linear warmup from 0 over this many optimizer steps.
    pub warmup_steps: u64,
    /// cosine: the final lr as a fraction of `train.lr`.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// `gamma`'s default: llama-recipes' StepLR gamma.
    pub const DEFAULT_GAMMA: f64 = 0.85;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Step,
    Cosine,
    /// transformers' `get_linear_schedule_with_warmup` (the HF Trainer's default), to a floor.
    Linear,
    /// transformers' `get_constant_schedule_with_warmup`.
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsdpConfig {
    /// Shard parameters, gradients and optimizer state across ranks.
    pub enabled: bool,
    pub backend: Backend,
    /// Dtype of the gathered parameters the forward and backward compute in (fp32 masters are
    /// kept). Gradients are reduce-scattered in fp32 whatever this says (llama-recipes' bfSixteen
    /// reduces in bf16: twice the bytes here, and no bf16 rounding of the sum).
    pub mixed_precision: DType,
    /// Recompute each unit in backward instead of keeping its activations (FSDP only; the
    /// plain trainer keeps its autograd graph).
    ///
    /// Memory trade-off. true (default): between a unit's forward and its backward only the
    /// unit's input is kept and its parameters are freed; backward gathers the unit again and
    /// recomputes it, costing one more forward (~1/3 more compute) and a second all-gather per
    /// unit. false: each unit's autograd graph (every intermediate activation) stays from the
    /// forward to its backward, and so do its gathered parameters, so a rank holds the whole
    /// gathered model (W x its shard) plus all activations of the micro-batch at the peak, in
    /// exchange for no recompute and no backward all-gathers. Use false only when that fits
    /// (small models, short sequences); results are the same either way.
    pub activation_checkpointing: bool,
    /// Gather the next unit's parameters while the current one computes.
    pub prefetch: bool,
    /// What is sharded across ranks (PyTorch FSDP's `ShardingStrategy`).
    pub sharding_strategy: ShardingStrategy,
    /// `hybrid_shard`: ranks per shard group (llama-recipes' `sharding_group_size`); None: the
    /// ranks per node (`LOCAL_WORLD_SIZE`), as PyTorch's HYBRID_SHARD shards within a node.
    pub sharding_group_size: Option<usize>,
    /// `hybrid_shard`: shard groups, the copies of the model (llama-recipes'
    /// `replica_group_size`); None: the world size over the shard group's.
    pub replica_group_size: Option<usize>,
}

/// `fsdp.sharding_strategy`, as PyTorch FSDP's `ShardingStrategy` (its upper-case spellings are
/// accepted too, and `_hybrid_shard_zero2` with its underscore). Checkpoints do not depend on it:
/// one saved under any strategy resumes under any other, at any world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardingStrategy {
    /// Parameters, gradients and optimizer state sharded; each layer unit is gathered for its
    /// forward, freed, and gathered again for its backward (ZeRO-3).
    FullShard,
    /// Gradients and optimizer state sharded; a layer unit gathered for the forward stays
    /// gathered until its backward (no second all-gather, for the memory of the whole gathered
    /// model at the peak: ZeRO-2, FSDP2's `reshard_after_forward=False`).
    ShardGradOp,
    /// Nothing sharded: every rank holds the whole model and optimizer state and gradients are
    /// all-reduced, as DistributedDataParallel does (no all-gathers; W times the memory).
    NoShard,
    /// HSDP: full_shard within groups of `fsdp.sharding_group_size` ranks (by default a node's),
    /// each group a whole copy of the model: all-gathers and reduce-scatters stay inside a
    /// group (a node), and only the gradient shards are all-reduced across the groups.
    HybridShard,
    /// HSDP with shard_grad_op within the groups (PyTorch's `_HYBRID_SHARD_ZERO2`): a unit
    /// gathered for the forward stays gathered until its backward.
    HybridShardZero2,
}

impl FsdpConfig {
    /// `hybrid_shard`'s ranks per shard group at `world` ranks, `ranks_per_node` on each node:
    /// `sharding_group_size`, else the world over `replica_group_size`, else a node's ranks; it
    /// must divide the world (and times `replica_group_size` make it, when that is given). An
    /// error names the key at fault with its message.
    pub fn shard_group_size(
        &self,
        world: usize,
        ranks_per_node: usize,
    ) -> Result<usize, (&'static str, String)> {
        let (sharding, replica) = ("fsdp.sharding_group_size", "fsdp.replica_group_size");
        let g = match (self.sharding_group_size, self.replica_group_size) {
            (Some(g), _) => g,
            (None, Some(r)) if r > 0 && world.is_multiple_of(r) => world / r,
            (None, Some(r)) => {
                return Err((replica, format!(
                    "{r} does not divide the {world} ranks: give a divisor, or fsdp.sharding_group_size instead"
                )))
            }
            (None, None) => ranks_per_node.max(1),
        };
        if g == 0 || !world.is_multiple_of(g) {
            return Err((sharding, format!(
                "{g} does not divide the {world} ranks of this run: give a divisor of {world} (by default a node's ranks)"
            )));
        }
        if let Some(r) = self.replica_group_size.filter(|&r| r * g != world) {
            return Err((replica, format!(
                "{r} x sharding_group_size {g} is not the {world} ranks of this run: give one of them, or two whose product is {world}"
            )));
        }
        Ok(g)
    }
}

impl ShardingStrategy {
    /// Every strategy with its config spelling.
    pub const ALL: [(ShardingStrategy, &'static str); 5] = [
        (ShardingStrategy::FullShard, "full_shard"),
        (ShardingStrategy::ShardGradOp, "shard_grad_op"),
        (ShardingStrategy::NoShard, "no_shard"),
        (ShardingStrategy::HybridShard, "hybrid_shard"),
        (ShardingStrategy::HybridShardZero2, "hybrid_shard_zero2"),
    ];

    /// HSDP: sharded within groups (`fsdp.sharding_group_size`), copies across them.
    pub fn is_hybrid(self) -> bool {
        matches!(self, Self::HybridShard | Self::HybridShardZero2)
    }

    /// A unit gathered for the forward stays gathered until its backward (ZeRO-2).
    pub fn keeps_gathered(self) -> bool {
        matches!(self, Self::ShardGradOp | Self::HybridShardZero2)
    }

    /// The config's spelling.
    pub fn name(self) -> &'static str {
        let named = Self::ALL.iter().find(|(s, _)| *s == self);
        named.map_or("", |(_, n)| n)
    }

    /// The strategy a config or flag names: ours, PyTorch's upper-case names (the private
    /// `_HYBRID_SHARD_ZERO2` with its underscore), or `ShardingStrategy.X` as llama-recipes'
    /// configs print it.
    pub fn from_name(text: &str) -> Option<Self> {
        let name = text.strip_prefix("ShardingStrategy.").unwrap_or(text);
        let name = name.strip_prefix('_').unwrap_or(name).to_ascii_lowercase();
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
    }
}

impl<'de> Deserialize<'de> for ShardingStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ShardingStrategy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "one of full_shard, shard_grad_op, no_shard, hybrid_shard, hybrid_shard_zero2",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ShardingStrategy, E> {
                if let Some(s) = ShardingStrategy::from_name(v) {
                    return Ok(s);
                }
                let got = format!("{v:?}");
                Err(E::invalid_value(serde::de::Unexpected::Other(&got), &self))
            }
        }
        d.deserialize_string(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// nccl when libtorch sees a CUDA GPU (an error if its driver or libnccl cannot be loaded,
    /// rather than training on the CPU), cpu otherwise.
    Auto,
    Nccl,
    Cpu,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointConfig {
    /// Folder holding the `step-N/` checkpoints.
    pub dir: PathBuf,
    /// Save every this many optimizer steps; 0: only at the end of each epoch.
    pub every_steps: u64,
    /// How many checkpoints to keep, oldest deleted first; 0: keep all. With `train.validate` the
    /// best validated epoch's is kept besides them.
    pub keep_last: usize,
    pub resume: Resume,
    /// Write checkpoints in the background while training goes on.
    #[serde(rename = "async")]
    pub async_save: bool,
}

/// Where a run starts from. In YAML: `auto`, `never`, or a checkpoint folder path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From the newest complete checkpoint in `checkpoint.dir`, if there is one.
    Auto,
    /// From scratch, even if checkpoints exist.
    Never,
    /// From this checkpoint folder; an error if it is missing.
    From(PathBuf),
}

impl Resume {
    /// Words that are not keywords here (other tools', YAML's booleans, a miscapitalised keyword)
    /// are refused rather than taken as a folder name: a folder of that name is `./NAME`.
    fn from_text(text: &str) -> Result<Resume, String> {
        let keyword_like = |w: &str| -> Option<&'static str> {
            match w.to_ascii_lowercase().as_str() {
                "auto" | "latest" | "last" | "true" | "yes" | "on" => Some("auto"),
                "never" | "none" | "null" | "false" | "no" | "off" => Some("never"),
                _ => None,
            }
        };
        match text {
            "" => Err("\"\"".into()),
            "auto" => Ok(Resume::Auto),
            "never" => Ok(Resume::Never),
            word => match keyword_like(word) {
                Some(meant) => Err(format!(
                    "{word:?} (did you mean {meant}? a folder of that name is ./{word})"
                )),
                None => Ok(Resume::From(PathBuf::from(word))),
            },
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Resume::From(p) => Some(p),
            _ => None,
        }
    }
}

impl Serialize for Resume {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Resume::Auto => s.serialize_str("auto"),
            Resume::Never => s.serialize_str("never"),
            Resume::From(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Resume;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, never, or a checkpoint folder")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Resume, E> {
                Resume::from_text(v)
                    .map_err(|got| E::invalid_value(serde::de::Unexpected::Other(&got), &self))
            }
        }
        d.deserialize_string(V)
    }
}

impl Config {
    /// The dtype the forward and backward compute in, and the key that sets it:
    /// `fsdp.mixed_precision` under FSDP, else `model.dtype` (FSDP's keys do nothing then).
    pub fn compute_dtype(&self) -> (&'static str, DType) {
        if self.fsdp.enabled {
            ("fsdp.mixed_precision", self.fsdp.mixed_precision)
        } else {
            ("model.dtype", self.model.dtype)
        }
    }

    /// The resolved config as YAML: every key, defaults filled in. Loading it back gives the
    /// same config, here and in Python: a number in exponent form is written as YAML 1.1
    /// (PyYAML) reads a float, with a point and a signed exponent (`1.0e-8`, not `1e-8`, which
    /// PyYAML reads as a string).
    pub fn to_yaml(&self) -> Result<String, super::ConfigError> {
        let text = serde_yaml::to_string(self)
            .map_err(|e| super::ConfigError::Serialize(e.to_string()))?;
        let exponent =
            regex::Regex::new(r"(?m)^(\s*[\w.-]+: )(-?\d+)(\.\d+)?e([+-]?)(\d+)$").expect("regex");
        Ok(exponent
            .replace_all(&text, |c: &regex::Captures| {
                let point = c.get(3).map_or(".0", |m| m.as_str());
                let sign = if &c[4] == "-" { "-" } else { "+" };
                format!("{}{}{point}e{sign}{}", &c[1], &c[2], &c[5])
            })
            .into_owned())
    }
}
