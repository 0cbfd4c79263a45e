//! `trainer export --checkpoint DIR --out DIR --format peft`: the checkpoint's LoRA factors as a
//! PEFT adapter folder (adapter_config.json + adapter_model.safetensors, fp32), the layout
//! `MllamaModel::save_adapter` writes and `load_adapter` / Python peft read. The factors are read
//! from the rank files flat tensor by flat tensor (the base model is not loaded).
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::Tensor;

use super::load::read_full;
use crate::model::adapter_config::AdapterConfig;

/// Module naming of an exported adapter's keys (`--naming`, `train.save_adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AdapterNaming {
    /// transformers >= 4.52 module paths (`base_model.model.model.language_model.layers...`,
    /// `...model.vision_model...`): what current peft writes and loads.
    #[default]
    Hf5,
    /// transformers 4.45-4.51 (`base_model.model.language_model.model.layers...`,
    /// `base_model.model.vision_model...`): the seed's stack, which finds no module for the
    /// other naming and loads nothing (peft only warns). transformers 5.24 + peft 0.21 convert
    /// this naming's text keys but not its vision keys (checked: the vision LoRA is then dropped
    /// with a warning), so use it only for a transformers-4 stack.
    Hf4,
}

/// Writes the adapter folder; returns the number of tensors written.
pub fn export_peft(checkpoint: &Path, out: &Path, naming: AdapterNaming) -> Result<usize> {
    // the method first: a full fine-tuning checkpoint's weights are not read (44 GB for 11B)
    let method = super::load::read_manifest(checkpoint)?
        .peft
        .get("method")
        .cloned();
    if method.as_ref().and_then(Value::as_str) != Some("lora") {
        bail!(
            "checkpoint {} was not trained with LoRA (peft.method {}): --format peft needs a LoRA checkpoint; export its weights as a full model folder with --format merged",
            checkpoint.display(),
            method.unwrap_or(Value::Null)
        );
    }
    // held until the adapter is complete (or removed again): a second export into --out waits out
    let _lock = super::ExportLock::acquire(out)?;
    // an export killed while renaming its files into place: what it renamed goes
    super::clear_killed_export(out, RENAMING)?;
    // an adapter already there is not overwritten (it may be the only copy of another run's)
    for name in [
        "adapter_model.safetensors",
        "adapter_model.bin",
        "adapter_config.json",
    ] {
        if out.join(name).exists() {
            bail!(
                "--out {} already holds an adapter ({name}); give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
                out.display()
            );
        }
    }
    // nor is a model folder made into an adapter's: transformers' from_pretrained would take it
    // for a PEFT adapter from then on
    if out.join("config.json").exists() {
        bail!(
            "--out {} holds a model (config.json): an adapter written there would make \
             transformers load the folder as the adapter; give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
            out.display()
        );
    }
    // (another export's: it would describe these weights where this run recorded no settings)
    if out.join(super::PROMPT_FILE).exists() {
        bail!(
            "--out {} already holds {} (another export's prompt settings); give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
            out.display(),
            super::PROMPT_FILE
        );
    }
    let (m, mut tensors) = read_full(checkpoint)?;
    // the trained modules (this model's naming) and each one's rank, from its A factor (r, in)
    let modules: BTreeMap<String, i64> = (tensors.iter())
        .filter_map(|(n, t)| {
            let module = n
                .strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")?;
            Some((module.to_string(), t.size().first().copied()?))
        })
        .collect();
    // (the parameters of modules to save: by their own names in the checkpoint)
    let saved: Vec<String> = (tensors.iter())
        .filter(|(n, _)| !n.starts_with("base_model.model."))
        .map(|(n, _)| n.clone())
        .collect();
    let config = adapter_config(checkpoint, &m, &modules, &saved, naming)?;
    // the parameters of modules to save go by their own names in the checkpoint, by
    // `base_model.model.<name>` in an adapter
    for (name, _) in &mut tensors {
        if !name.starts_with("base_model.model.") {
            *name = format!("base_model.model.{name}");
        }
    }
    if naming == AdapterNaming::Hf4 {
        for (name, _) in &mut tensors {
            if let Some(module) = name.strip_prefix("base_model.model.") {
                *name = format!(
                    "base_model.model.{}",
                    crate::model::weights::canonical_to_legacy(module)
                );
            }
        }
    }
    // each file written under a .partial name, then all renamed, the config last: a run killed
    // midway leaves no adapter_config.json beside missing or torn weights; a failed run removes
    // what it wrote (`Created`), and the next export what a killed one renamed (the renaming
    // list), so a retry into the same --out is not refused
    let mut created = super::Created::default();
    let mut staged = vec![];
    let mut publish = |name: &str, write: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let (tmp, path) = (out.join(format!("{name}.partial")), out.join(name));
        created.paths.extend([tmp.clone(), path.clone()]);
        write(&tmp)?;
        staged.push((tmp, path));
        Ok(())
    };
    let weights = adapter_bytes(&tensors)?;
    publish("adapter_model.safetensors", &|p| {
        super::write_synced(p, &weights)
    })?;
    // the run's prompt settings, which `trainer infer|eval --adapter` follow, tied to these
    // weights (other weights saved over them later leave the settings unused)
    if let Some(bytes) = super::prompt::file_bytes(&m.prompt, Some(&weights))? {
        publish(super::PROMPT_FILE, &|p| super::write_synced(p, &bytes))?;
    }
    publish("adapter_config.json", &|p| {
        super::write_synced(p, serde_json::to_string_pretty(&config)?.as_bytes())
    })?;
    super::rename_into_place(out, RENAMING, &staged)
        .with_context(|| format!("writing the adapter into {}", out.display()))?;
    created.done = true;
    Ok(tensors.len())
}

/// The list of files a PEFT export is renaming into place (present only while it does).
const RENAMING: &str = ".adapter-export-renaming.json";

/// `checkpoint`'s adapter into `dir` (a run's `train.output_dir`), replacing the adapter there:
/// under `dir`'s export lock, written into a staging folder of this process, then the old
/// `adapter_config.json` removed (so no config describes other weights at any moment), the prompt
/// settings moved in (an older run's removed when this one recorded none), the weights, then the
/// config.
pub fn replace_adapter(checkpoint: &Path, dir: &Path, naming: AdapterNaming) -> Result<()> {
    let lock = super::ExportLock::acquire(dir)?;
    // staging folders of runs killed here before (no other writer holds the lock now; without a
    // real lock another one may be live); one that cannot go stays, with a warning
    let stale = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".adapter.partial-")
        });
    for e in stale.filter(|_| lock.held) {
        if let Err(err) = std::fs::remove_dir_all(e.path()) {
            tracing::warn!("{} stays: {err}", e.path().display());
        }
    }
    // (a name no earlier process used: a container may give every launch the same pid)
    let nonce = launcher::token::random_hex(4).unwrap_or_default();
    let staging = dir.join(format!(".adapter.partial-{}-{nonce}", std::process::id()));
    export_peft(checkpoint, &staging, naming)?;
    let config = dir.join("adapter_config.json");
    match std::fs::remove_file(&config) {
        Ok(()) => super::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", config.display())),
    }
    // the prompt settings first (an older run's go when this one recorded none), then the weights
    for name in [
        super::PROMPT_FILE,
        "adapter_model.safetensors",
        "adapter_config.json",
    ] {
        let (from, to) = (staging.join(name), dir.join(name));
        if name == super::PROMPT_FILE && !from.exists() {
            match std::fs::remove_file(&to) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", to.display()))
                }
                _ => continue,
            }
        }
        std::fs::rename(&from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    std::fs::remove_dir(&staging).with_context(|| format!("removing {}", staging.display()))?;
    super::fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))
}

/// The adapter_config.json of the export: the run's peft section (`Manifest::adapter_config_json`),
/// written so that peft, reading it in the naming written, wraps exactly the trained `modules`
/// (module -> rank) with their ranks and scalings:
/// - a list of targets names full paths in the naming written (bare names match in both);
/// - an expression PEFT would not full-match against every trained module in that naming (one
///   written for the other naming: ours tries both) becomes the list of those modules, as PEFT
///   saves a resolved `all-linear`; so does any target when `exclude_modules` or
///   `layers_to_transform` narrowed it (the modules left out are not in the checkpoint to check
///   an expression against);
/// - the result is then read as peft reads it in that naming: unless it wraps every trained
///   module with the rank its factors have and the alpha the run used, and saves every saved
///   parameter (a partial path, pattern key or module name written for the other naming misses
///   some), every choice is written out by module: the list of trained modules, one full-path
///   `rank_pattern` / `alpha_pattern` key per module that differs from `r` / `lora_alpha`, the
///   full paths of the modules to save. (A module peft would wrap beyond the trained ones gets a
///   fresh branch with B zero: it computes what the base does.)
fn adapter_config(
    checkpoint: &Path,
    m: &super::manifest::Manifest,
    modules: &BTreeMap<String, i64>,
    saved: &[String],
    naming: AdapterNaming,
) -> Result<Value> {
    let legacy = naming == AdapterNaming::Hf4;
    let written = |module: &str| match legacy {
        true => crate::model::weights::canonical_to_legacy(module),
        false => module.to_string(),
    };
    let mut config = m.adapter_config_json();
    let trained = m
        .adapter_config()
        .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", checkpoint.display()))?;
    let layout = trained.training_layout()?;
    // (a checkpoint whose factors do not fit its own manifest is damaged: nothing is written)
    if let Some((module, r)) = modules.iter().find(|(p, r)| layout.rank(p) != **r) {
        bail!(
            "checkpoint {}: the factors of {module} have rank {r}, its manifest's peft section \
             gives {}",
            checkpoint.display(),
            layout.rank(module)
        );
    }
    let narrowed = trained.exclude_modules.is_some() || !trained.layers_to_transform.is_empty();
    let listed = || json!(modules.keys().map(|p| written(p)).collect::<Vec<_>>());
    // module paths named in full (`model.language_model.layers.3.cross_attn.q_proj`) are renamed
    // as the keys are: transformers 4.4x has no module of the canonical path (only full canonical
    // paths: a bare or partial name keeps the modules it matches)
    let full_path = |m: &str| {
        [
            "model.language_model.",
            "model.vision_model.",
            "model.multi_modal_projector.",
        ]
        .iter()
        .any(|p| m.starts_with(p))
            || m == "lm_head"
    };
    config["target_modules"] = match config["target_modules"].take() {
        _ if narrowed => listed(),
        Value::Array(list) if legacy => Value::Array(
            list.into_iter()
                .map(|t| match t.as_str() {
                    Some(m) if full_path(m) => json!(written(m)),
                    _ => t,
                })
                .collect(),
        ),
        Value::String(re) if re != crate::model::lora::ALL_LINEAR => {
            let full = regex::Regex::new(&format!("^(?:{re})$")).ok();
            match full.filter(|r| modules.keys().all(|m| r.is_match(&written(m)))) {
                Some(_) => json!(re),
                None => listed(),
            }
        }
        other => other,
    };
    // the modules to save, in the other naming: the ones the names chose, by path (a name
    // may choose other modules there: `language_model` holds lm_head in transformers 4)
    let saved_modules = || {
        json!(layout
            .saved_modules(saved)
            .iter()
            .map(|m| written(m))
            .collect::<Vec<_>>())
    };
    if legacy && !saved.is_empty() {
        config["modules_to_save"] = saved_modules();
    }
    if narrowed {
        if let Some(o) = config.as_object_mut() {
            o.remove("exclude_modules");
        }
        config["layers_to_transform"] = Value::Null;
        config["layers_pattern"] = Value::Null;
    }
    // the config as peft reads it in the naming written must wrap every trained module with
    // the rank its factors have and the alpha the run used, and save every saved parameter
    // (a partial path or a pattern key written for the other naming would miss some: peft would
    // then leave trained layers out); otherwise every choice is written out module by module
    let reads_as_trained = |config: &Value| -> Result<bool> {
        let peft = AdapterConfig::parse(&config.to_string())?.layout(legacy)?;
        Ok(modules.keys().all(|p| {
            peft.wraps(p) && peft.rank(p) == layout.rank(p) && peft.alpha(p) == layout.alpha(p)
        }) && saved.iter().all(|n| peft.saves(n)))
    };
    if !reads_as_trained(&config)? {
        let (r, alpha) = (trained.lora.r, trained.lora.alpha);
        let per_module = |value: &dyn Fn(&str) -> Option<Value>| {
            let entries =
                (modules.keys()).filter_map(|p| Some((regex::escape(&written(p)), value(p)?)));
            Value::Object(entries.collect())
        };
        config["target_modules"] = listed();
        if let Some(o) = config.as_object_mut() {
            o.remove("exclude_modules");
        }
        config["layers_to_transform"] = Value::Null;
        config["layers_pattern"] = Value::Null;
        config["rank_pattern"] =
            per_module(&|p| (layout.rank(p) != r).then(|| json!(layout.rank(p))));
        config["alpha_pattern"] =
            per_module(&|p| (layout.alpha(p) != alpha).then(|| json!(layout.alpha(p))));
        if !saved.is_empty() {
            config["modules_to_save"] = saved_modules();
        }
        if !reads_as_trained(&config)? {
            bail!(
                "checkpoint {}: no adapter_config.json this export can write makes peft wrap \
                 the trained modules as trained (please report this)",
                checkpoint.display()
            );
        }
    }
    Ok(config)
}

/// `tensors` as a safetensors file with torch's `{"format": "pt"}` metadata, as peft's
/// `save_pretrained` writes it (tch's writer leaves the metadata out).
fn adapter_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    use safetensors::Dtype;
    let mut raw: Vec<super::RawTensor> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous();
        let dtype = match t.kind() {
            tch::Kind::Float => Dtype::F32,
            tch::Kind::BFloat16 => Dtype::BF16,
            tch::Kind::Half => Dtype::F16,
            tch::Kind::Double => Dtype::F64,
            other => bail!("{name}: cannot write a {other:?} tensor"),
        };
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        raw.push((name.clone(), dtype, shape, bytes));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    super::safetensors_bytes(&raw, meta)
}
