//! `ConfigError`: every way a config can be wrong, each with the full message a user sees.
//!
//! Messages lead with what the user wrote (a file, a key path, a `--set` argument), then what was
//! found and what is allowed, so that the fix is obvious without reading the source.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: config file does not exist", path.display())]
    NotFound { path: PathBuf },

    // (`reason`, not `source`: the message holds it, and a chain printed with `{:#}` would say it
    // twice)
    #[error("{}: cannot read config file: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },

    /// `file` is a path, or `<string>` for text parsed directly; the parser's message says
    /// where (`... at line 3 column 2, while parsing a block mapping`).
    #[error("{file}: invalid YAML: {message}")]
    Syntax { file: String, message: String },

    #[error("{file}: expected a mapping of sections (model, peft, data, train, fsdp, checkpoint), got {got}")]
    NotAMapping { file: String, got: String },

    #[error("--set {arg:?}: expected KEY=VALUE")]
    OverrideSyntax { arg: String },

    #[error("--set {arg:?}: VALUE is not a YAML value: {message}")]
    OverrideValue { arg: String, message: String },

    #[error("--set {arg:?}: {parent} is a value, not a section, so it has no key {key:?}")]
    OverrideNotSection {
        arg: String,
        parent: String,
        key: String,
    },

    /// `path` names where the key sits (for a `--set`, the whole overridden key).
    #[error("{path}: unknown key {key:?} ({})", hint(suggestion.as_ref(), valid))]
    UnknownKey {
        path: String,
        key: String,
        suggestion: Option<Suggestion>,
        valid: Vec<String>,
    },

    /// Wrong type or out of range: `expected` says what is allowed, `got` is the value as written.
    #[error("{path}: expected {expected}, got {got}")]
    Invalid {
        path: String,
        expected: String,
        got: String,
    },

    #[error("{path}: required key is missing ({what})")]
    Missing { path: String, what: &'static str },

    /// Keys that are fine alone but not together.
    #[error("{path}: {message}")]
    Conflict { path: String, message: String },

    /// A file or folder the run reads that is not there (`validate::missing_paths`).
    #[error("{path}: {message}")]
    NoSuchPath { path: String, message: String },

    /// Anything else serde reports, with its key path.
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },

    #[error("cannot print the config as YAML: {0}")]
    Serialize(String),

    /// A key's error in a config file: the file, and the `--set` that gave the key its value, if
    /// one did.
    #[error("{file}: {inner}{}", set.as_ref().map_or(String::new(), |a| format!(" (from --set {a})")))]
    InFile {
        file: String,
        set: Option<String>,
        inner: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The key path an error is about, for the errors that are about one key.
    pub fn key_path(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Missing { path, .. }
            | ConfigError::Conflict { path, .. }
            | ConfigError::NoSuchPath { path, .. }
            | ConfigError::Malformed { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// What an unknown key most likely meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Suggestion {
    /// A valid key of the same section, a typo away (or one it abbreviates or extends).
    Typo(String),
    /// Another tool's name for a key of this config (`OTHER_NAMES`): our full key, or, where
    /// there is none, what to do instead (starting "no key").
    OtherTool(String),
    /// The same key name in other sections (`lr` at the top: `train.lr`).
    OtherSection(Vec<String>),
}

fn hint(suggestion: Option<&Suggestion>, valid: &[String]) -> String {
    match suggestion {
        Some(Suggestion::OtherTool(s)) if s.starts_with("no key") => {
            format!("that is llama-recipes', PEFT's or transformers' name; {s}")
        }
        Some(Suggestion::OtherTool(s)) => {
            format!("that is llama-recipes', PEFT's or transformers' name; here it is {s}")
        }
        Some(Suggestion::OtherSection(keys)) => match &keys[..] {
            [one] => format!("it is a key of another section: {one}"),
            many => format!("it is a key of other sections: {}", many.join(", ")),
        },
        Some(Suggestion::Typo(s)) => format!("did you mean {s:?}?"),
        None if valid.is_empty() => "this section takes no keys".to_string(),
        None => format!("valid keys: {}", valid.join(", ")),
    }
}

/// llama-recipes', PEFT's and Hugging Face Trainer's names for keys of this config (docs/config.md's
/// last column), as (their name, our full key): a user coming from those writes them.
const OTHER_NAMES: [(&str, &str); 54] = [
    ("model_name", "model.path"),
    ("use_fast_kernels", "model.attention"),
    ("use_peft", "peft.method"),
    ("peft_method", "peft.method"),
    ("fsdp_config", "fsdp"),
    ("lora_r", "peft.r"),
    ("lora_alpha", "peft.alpha"),
    ("lora_dropout", "peft.dropout"),
    ("freeze_LLM_only", "peft.freeze_llm_only"),
    ("from_peft_checkpoint", "peft.init_from"),
    (
        "custom_dataset",
        "data.train (the JSONL records its dataset file reads; their image folder is \
         data.image_root)",
    ),
    ("context_length", "data.max_seq_len"),
    ("num_workers_dataloader", "data.num_workers"),
    ("num_epochs", "train.epochs"),
    ("num_train_epochs", "train.epochs"),
    ("batch_size_training", "train.batch_size"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("dataloader_drop_last", "train.drop_last"),
    ("learning_rate", "train.lr"),
    ("lr_scheduler_type", "train.schedule.kind"),
    ("gradient_clipping_threshold", "train.grad_clip"),
    ("max_grad_norm", "train.grad_clip"),
    (
        "max_train_step",
        "train.max_steps, which counts optimizer steps, not micro-batches (max_train_step / grad_accum)",
    ),
    ("warmup_steps", "train.schedule.warmup_steps"),
    ("run_validation", "train.validate"),
    ("per_device_eval_batch_size", "train.val_batch_size"),
    ("eval_batch_size", "train.val_batch_size"),
    (
        "max_eval_step",
        "train.max_eval_samples, which counts samples, not batches per rank (max_eval_step x val_batch_size x world size)",
    ),
    ("save_model", "train.save_adapter"),
    ("enable_fsdp", "fsdp.enabled"),
    (
        "pure_bf16",
        "fsdp.mixed_precision: bf16, the nearest (parameters gathered in bf16; fp32 master weights \
         are kept, where pure_bf16 keeps none)",
    ),
    ("use_fp16", "fsdp.mixed_precision"),
    ("gamma", "train.schedule.gamma"),
    (
        "gradient_clipping",
        "train.grad_clip (a threshold; null: no clipping)",
    ),
    (
        "use_wandb",
        "train.tensorboard (TensorBoard event files; wandb is not built in)",
    ),
    (
        "batching_strategy",
        "no key: batches are always padded to their longest sample (llama-recipes' \"padding\"; \
         \"packing\" is not offered)",
    ),
    (
        "quantization",
        "no key: quantized (4-bit or 8-bit) training is not offered",
    ),
    (
        "fsdp_cpu_offload",
        "no key: parameters and optimizer state stay on the GPU (no CPU offload)",
    ),
    (
        "fsdp_activation_checkpointing",
        "fsdp.activation_checkpointing",
    ),
    ("hsdp", "fsdp.sharding_strategy"),
    ("dist_checkpoint_root_folder", "checkpoint.dir"),
    ("dist_checkpoint_folder", "checkpoint.dir"),
    (
        "lora_config",
        "peft (lora_config's r, lora_alpha, lora_dropout and target_modules are peft.r, \
         peft.alpha, peft.dropout and peft.target_modules)",
    ),
    (
        "checkpoint_type",
        "no key: checkpoints are always sharded, one file per rank, and resume at any world \
         size that divides their global batch (`trainer export` writes a whole model: a PEFT \
         adapter or a merged folder)",
    ),
    (
        "save_optimizer",
        "no key: checkpoints always hold the optimizer state (an export holds none)",
    ),
    (
        "optimizer",
        "no key: the optimizer is AdamW (train.lr, train.weight_decay)",
    ),
    (
        "save_metrics",
        "no key: metrics.jsonl in train.output_dir is always written (train.tensorboard adds \
         event files)",
    ),
    (
        "freeze_layers",
        "no key: freezing a number of layers is not offered (LoRA trains adapters only; \
         peft.freeze_llm_only freezes the language model in full fine-tuning)",
    ),
    (
        "num_freeze_layers",
        "no key: freezing a number of layers is not offered (LoRA trains adapters only; \
         peft.freeze_llm_only freezes the language model in full fine-tuning)",
    ),
    (
        "one_gpu",
        "no key: the launcher's --nproc-per-node sets the ranks (`trainer train CONFIG` alone \
         is one rank)",
    ),
    (
        "low_cpu_fsdp",
        "no key: every rank always reads only its own shard of the weights",
    ),
    (
        "use_profiler",
        "no key: no profiler is built in; the log reports FLOP/s and MFU per step",
    ),
    (
        "flop_counter",
        "no key: the log and metrics.jsonl report TFLOP/s and MFU per step",
    ),
];

/// llama-recipes' booleans for keys that are a choice here: (key, what they mean).
const OTHER_VALUES: [(&str, &str); 2] = [
    (
        "fsdp.mixed_precision",
        "llama-recipes' mixed_precision: true is bf16 here, false fp32",
    ),
    (
        "train.save_adapter",
        "llama-recipes' save_model: true is hf5 here, false none",
    ),
];

/// What another tool's value `got` for `key` means here (`OTHER_VALUES`), e.g. a boolean
/// `fsdp.mixed_precision`.
pub(crate) fn other_value(key: &str, got: &str) -> Option<&'static str> {
    let boolean = got == "true" || got == "false";
    (OTHER_VALUES.iter())
        .find(|(k, _)| boolean && *k == key)
        .map(|(_, meant)| *meant)
}

/// Our key for another tool's name (`OTHER_NAMES`), e.g. `num_epochs` -> `train.epochs`.
pub(crate) fn other_name(key: &str) -> Option<&'static str> {
    OTHER_NAMES
        .iter()
        .find(|(n, _)| *n == key)
        .map(|(_, ours)| *ours)
}

/// The valid key `key` was most likely meant to be: the closest by edit distance if it is close
/// enough to be a typo (at most a third of the longer word, at least one edit), otherwise a key
/// it abbreviates (`warmup` -> `warmup_steps`) or extends (`dropout_rate` -> `dropout`).
pub(crate) fn suggest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    let typo = valid
        .iter()
        .map(|v| (edit_distance(key, v), *v))
        .filter(|(d, v)| *d <= (key.chars().count().max(v.chars().count()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v);
    typo.or_else(|| {
        valid
            .iter()
            .copied()
            .find(|v| (key.len() >= 3 && v.starts_with(key)) || key.starts_with(&format!("{v}_")))
    })
}

/// Edit distance where inserting, deleting or substituting a char, or swapping two adjacent
/// chars, costs 1 (optimal string alignment), so that "trian" is one typo away from "train".
fn edit_distance(a: &str, b: &str) -> usize {
    strsim::osa_distance(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("pef", "peft"), 1);
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("trian", "train"), 1);
    }

    #[test]
    fn suggests_only_close_keys() {
        let valid = ["model", "peft", "data", "train", "fsdp", "checkpoint"];
        assert_eq!(suggest("pef", &valid), Some("peft"));
        assert_eq!(suggest("trian", &valid), Some("train"));
        assert_eq!(suggest("checkpoints", &valid), Some("checkpoint"));
        assert_eq!(suggest("optimizer", &valid), None);
        let valid = ["kind", "gamma", "warmup_steps", "min_lr_ratio"];
        assert_eq!(suggest("warmup", &valid), Some("warmup_steps"));
        assert_eq!(suggest("min_lr", &valid), Some("min_lr_ratio"));
        assert_eq!(suggest("kind_of", &valid), Some("kind"));
    }
}
