//! `manifest.json`: everything needed to read a checkpoint folder without the trainer
//! (docs/checkpoint-format.md describes it for other tools).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::adapter_config::AdapterConfig;

/// The `format` field of every manifest.
pub const FORMAT: &str = "llava-sco-checkpoint";
/// The manifest version this trainer writes and reads.
pub const VERSION: u64 = 1;
/// The optimizer-state tensors saved next to each trainable flat group's master weights.
pub const STATES: [&str; 3] = ["param", "exp_avg", "exp_avg_sq"];
/// The manifest's own checksum, in `sha256sum` format (`<hex>  manifest.json`): the rank files'
/// sha256 sit in the manifest, so a damaged manifest (a flipped offset) would otherwise load
/// shifted weights with every file check passing. Checkpoints without it (older trainers) load.
pub const CHECKSUM_FILE: &str = "manifest.sha256";

/// The line `CHECKSUM_FILE` holds for manifest bytes `text`.
pub fn checksum_line(text: &[u8]) -> String {
    format!("{}  manifest.json\n", super::sha256_hex(text))
}

/// The sha256 a `CHECKSUM_FILE` line records for manifest.json, if it is such a line.
pub fn parse_checksum_line(line: &str) -> Option<&str> {
    let (digest, name) = line.trim_end().split_once(char::is_whitespace)?;
    let name = name.trim_start().trim_start_matches('*');
    let hex_ok = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_ok && name == "manifest.json").then_some(digest)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u64,
    /// Optimizer steps of the training loop done when saved.
    pub step: u64,
    /// AdamW's own step count (bias correction; differs from `step` after skipped steps).
    pub optimizer_step: u64,
    /// Trainable parameters whose tensor took part in fewer AdamW steps than `optimizer_step`
    /// (no gradient in some: cross-attention and vision on text-only batches), by parameter
    /// name. Absent in checkpoints of older trainers (one count for all).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub optimizer_steps: BTreeMap<String, u64>,
    /// The epoch the loop was in.
    pub epoch: u64,
    /// Where the data stream continues.
    pub data: DataPosition,
    pub world_size: usize,
    pub seed: u64,
    /// Non-finite steps skipped so far (counted against `train.skip_nonfinite`).
    pub skipped_nonfinite: u64,
    /// The loss of step `step`, as its metrics.jsonl line has it: a resume tells the run's own
    /// metrics history from another run's in `train.output_dir`. Absent in checkpoints of older
    /// trainers (and where the loss was not finite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The lr schedule (a pure function of step and epoch: its parameters are its state).
    pub scheduler: Value,
    /// AdamW's settings (`AdamWConfig::to_json`); a resume with others notes it. Absent in
    /// checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub optimizer: Value,
    /// How the random state is restored.
    pub rng: String,
    /// `model.path`, made absolute (the frozen base weights are not copied).
    pub model_path: String,
    /// sha256 over `config` (canonical JSON).
    pub config_hash: String,
    /// The model/LoRA settings the saved state depends on, by config key.
    pub config: BTreeMap<String, Value>,
    /// The base model's config.json as the run read it, so that a copy whose bytes differ
    /// (re-indented, re-saved by transformers) is still known for the same model
    /// (`same_model_config`). Absent in checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub model_config: Value,
    /// The base model's tensors as the run read them, by samples (`fingerprint::sampled_tensors`),
    /// so that a base of the same config.json but other weights (another checkpoint of the
    /// architecture, a merged export of this run) is refused by a resume, an export and `infer
    /// --checkpoint` (`check_base_tensors`). Absent in checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_tensors_sampled: String,
    /// The whole `peft` config section (export writes the adapter config from it).
    #[serde(default)]
    pub peft: Value,
    /// How the run built its prompts, `{"double_bos", "image_placeholder"}` (`infer
    /// --checkpoint` follows it). Absent in checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub prompt: Value,
    pub tensors: Vec<TensorEntry>,
    pub files: Vec<FileEntry>,
    /// The launcher invocation that saved it (`LLAVA_SCO_LAUNCH_ID`, drawn by node 0's launcher,
    /// kept across its restarts; unlike the run id it is never shared by two invocations): after a
    /// launcher restart the ranks continue from their own launch's newest checkpoint, whatever
    /// `checkpoint.resume` says. Absent outside the launcher and from older trainers'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_id: Option<String>,
    /// The run's `train.output_dir` as a path from its `checkpoint.dir` (`..` for the defaults;
    /// relative, so a run moved whole keeps it): `checkpoint.resume: auto` does not continue a
    /// run into another run's output folder (a new experiment that changed only output_dir would
    /// silently continue the last one's checkpoints). Absent from older trainers'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir_from_checkpoint_dir: Option<String>,
    /// The training run across resumes: drawn at a fresh start, kept by each resume. Retention
    /// (`checkpoint.keep_last`) removes checkpoints of its own run only (and older trainers'),
    /// never another run's in the same `checkpoint.dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    /// The run's lowest validation loss before this checkpoint (an epoch-end checkpoint is saved
    /// before its own epoch is validated; that result goes to `validation.json` in the folder).
    /// Absent when nothing was validated yet, and from older trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval: Option<super::validation::EvalResult>,
    /// The time the chat template's `strftime_now` rendered for this run (local seconds since the
    /// epoch, fixed at its start: `data::template::template_clock`): the "Today Date" of a
    /// text-only sample's system turn. A resume renders it again, so such samples keep their
    /// tokens on another day. Absent from older trainers' checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_clock: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Epoch whose shuffle to use.
    pub epoch: u64,
    /// Next global batch index within that epoch.
    pub batch: u64,
    /// Samples per global batch (`batch_size x world x grad_accum`) when saved.
    pub global_batch: usize,
    /// Samples per micro-batch (`train.batch_size`) when saved: LoRA dropout masks are drawn per
    /// micro-batch, so a resume with another batch_size draws others. Absent in checkpoints of
    /// older trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// `train.drop_last` when saved: whether each epoch ended with a partial step of the samples
    /// left over (false) or left them out. Absent in checkpoints of older trainers, which left
    /// them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_last: Option<bool>,
    /// Training samples in the epoch plan (after skipped records) when saved: a resume on other
    /// data (the batch position would point into another permutation) is refused. Absent in
    /// checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// `checkpoint::lengths_hash` of those samples' token lengths: the epoch plan sorts by length,
    /// so data of the same count but other lengths (an edited file, another max_seq_len or
    /// tokenizer) would put other samples behind the saved position; refused on resume. Absent
    /// in checkpoints of older trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lengths_hash: Option<u64>,
}

/// One logical tensor: a trainable flat group's state, 1-D fp32 of `shape[0]` elements (the
/// unpadded concatenation of `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// `<group>/<state>`: the key inside the rank files too.
    pub name: String,
    /// `<unit>/<group index>` for FSDP, the parameter name for `fsdp.enabled: false`.
    pub group: String,
    /// One of [`STATES`].
    pub state: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    /// The parameters packed in the flat tensor.
    pub params: Vec<ParamEntry>,
    /// Which file holds which element range [start, end) (ascending, covering the tensor).
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<i64>,
    /// Element offset in the flat tensor.
    pub offset: i64,
}

impl ParamEntry {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    /// Whether the run trained LoRA factors over a frozen base (its `peft.method`).
    pub fn is_lora(&self) -> bool {
        self.peft.get("method").and_then(Value::as_str) == Some("lora")
    }

    /// The PEFT `adapter_config.json` of the run's `peft` section, in this model's module naming:
    /// what `trainer export --format peft` writes (before it renames modules for another naming
    /// or resolves patterns), and what infer, eval and the merged export read a checkpoint's LoRA
    /// layout from (`adapter_config`). Options not set are left out or empty, as peft writes
    /// them (older peft does not know `exclude_modules`).
    pub fn adapter_config_json(&self) -> Value {
        let peft = &self.peft;
        let field = |k: &str| peft.get(k).cloned().unwrap_or(Value::Null);
        // (an empty list of layers is not "every layer" to peft but none: unset is null)
        let optional = |k: &str| {
            (peft.get(k).cloned())
                .filter(|v| crate::model::adapter_config::is_set(Some(v)))
                .unwrap_or(Value::Null)
        };
        let or_empty = |k: &str| {
            peft.get(k)
                .cloned()
                .filter(Value::is_object)
                .unwrap_or(json!({}))
        };
        let mut config = json!({
            "alpha_pattern": or_empty("alpha_pattern"),
            "auto_mapping": null,
            "base_model_name_or_path": self.model_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": optional("layers_pattern"),
            "layers_to_transform": optional("layers_to_transform"),
            "lora_alpha": field("alpha"),
            "lora_dropout": field("dropout"),
            "modules_to_save": optional("modules_to_save"),
            "peft_type": "LORA",
            "r": field("r"),
            "rank_pattern": or_empty("rank_pattern"),
            "revision": null,
            "target_modules": field("target_modules"),
            "task_type": "CAUSAL_LM",
            // (absent from manifests of trainers before the option)
            "use_dora": peft.get("use_dora").cloned().unwrap_or(json!(false)),
            // (absent from manifests of trainers before the option: they trained without it)
            "use_rslora": peft.get("use_rslora").cloned().unwrap_or(json!(false)),
        });
        if let exclude @ (Value::String(_) | Value::Array(_)) = optional("exclude_modules") {
            config["exclude_modules"] = exclude;
        }
        config
    }

    /// The run's LoRA settings (layers, ranks, alphas) as an adapter's (`adapter_config_json`).
    pub fn adapter_config(&self) -> Result<AdapterConfig, String> {
        // (peft's defaults would stand in for a missing rank or alpha: the run had its own)
        for key in ["r", "alpha"] {
            if !self.peft.get(key).is_some_and(Value::is_number) {
                return Err(format!(
                    "manifest.json: its peft section lacks {key} ({})",
                    self.peft
                ));
            }
        }
        let text = self.adapter_config_json().to_string();
        AdapterConfig::parse(&text).map_err(|e| {
            let e = e.to_string();
            let why = e.strip_prefix("adapter_config.json: ").unwrap_or(&e);
            format!(
                "manifest.json: its peft section is not LoRA settings this program reads: {why}"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_line_round_trips_and_rejects_other_lines() {
        let line = checksum_line(b"{}");
        assert_eq!(
            line,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a  manifest.json\n"
        );
        assert_eq!(parse_checksum_line(&line), Some(&line[..64]));
        // sha256sum's binary-mode marker is accepted
        let binary = line.replacen("  ", " *", 1);
        assert_eq!(parse_checksum_line(&binary), Some(&line[..64]));
        for bad in [
            "",
            "44136fa3  manifest.json",
            &line.replace("manifest.json", "other.json"),
            &line.replacen('4', "g", 1),
        ] {
            assert_eq!(parse_checksum_line(bad), None, "{bad:?}");
        }
    }
}
