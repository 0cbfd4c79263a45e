//! The prompt settings a run trained with (the manifest's `prompt` section): how it built prompts
//! (double BOS, the image placeholder) and its data's correction prompt. Inference follows them:
//! `--checkpoint` reads the manifest, and exported adapter and merged folders carry the section
//! as [`PROMPT_FILE`], which `--adapter` and `--model` read (other tools ignore the file).
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// The file an exported folder carries its run's prompt settings in.
pub const PROMPT_FILE: &str = "llava_sco_prompt.json";

/// The key of an adapter's prompt settings that names its weights (the sha256 of
/// `adapter_model.safetensors` as exported).
const WEIGHTS_KEY: &str = "adapter_sha256";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The prompt settings a run trained with, which inference from its weights follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptSettings {
    pub double_bos: bool,
    pub keep_image_placeholder: bool,
    /// The second user turn of the run's data (its most common one).
    pub correction_prompt: Option<String>,
}

impl PromptSettings {
    /// A manifest's `prompt` section; the defaults for what trainers before a setting did not
    /// record.
    pub fn from_value(p: &Value) -> Self {
        PromptSettings {
            double_bos: p
                .get("double_bos")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            keep_image_placeholder: p.get("image_placeholder").and_then(Value::as_str)
                == Some("keep"),
            correction_prompt: p
                .get("correction_prompt")
                .and_then(Value::as_str)
                .map(String::from),
        }
    }

    /// The settings `dir` carries in [`PROMPT_FILE`]; None when it has none.
    pub fn read_folder(dir: &Path) -> Result<Option<Self>> {
        Ok(read_section(dir)?.map(|p| Self::from_value(&p)))
    }
}

/// `section` without the weights it was tied to (a merged folder has other weights).
pub(crate) fn untied(mut section: Value) -> Value {
    if let Value::Object(m) = &mut section {
        m.remove(WEIGHTS_KEY);
    }
    section
}

/// The `prompt` section `dir` carries in [`PROMPT_FILE`]; None when it has none, or when it
/// names adapter weights other than the folder's (another run saved its adapter over the export:
/// a warning says the settings are not applied).
pub(crate) fn read_section(dir: &Path) -> Result<Option<Value>> {
    let Some(section) = read_section_untied(dir)? else {
        return Ok(None);
    };
    let weights = dir.join(ADAPTER_WEIGHTS);
    if let (Some(want), true) = (
        section.get(WEIGHTS_KEY).and_then(Value::as_str),
        weights.is_file(),
    ) {
        let bytes =
            std::fs::read(&weights).with_context(|| format!("reading {}", weights.display()))?;
        if super::sha256_hex(&bytes) != want {
            tracing::warn!(
                "{}: written for other adapter weights than {} (saved over the export since, or damaged): its prompt settings are not applied",
                dir.join(PROMPT_FILE).display(),
                weights.display()
            );
            return Ok(None);
        }
    }
    Ok(Some(section))
}

/// [`read_section`] without the check of the weights.
fn read_section_untied(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join(PROMPT_FILE);
    // (a file given for the folder: the weights' loader says what is wrong with it)
    if !path.is_file() && !dir.is_dir() {
        return Ok(None);
    }
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        read => read.with_context(|| format!("reading {}", path.display()))?,
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(p) if p.is_object() => Ok(Some(p)),
        _ => anyhow::bail!(
            "{}: not the JSON object of prompt settings an export writes; export again, or remove the file to prompt with the defaults",
            path.display()
        ),
    }
}

/// [`PROMPT_FILE`]'s bytes for a `prompt` section, tied to the adapter weights `weights` (the
/// file's bytes) when given; None for checkpoints of trainers that recorded none.
pub(crate) fn file_bytes(prompt: &Value, weights: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
    let mut section = match prompt {
        Value::Object(m) if !m.is_empty() => m.clone(),
        _ => return Ok(None),
    };
    if let Some(w) = weights {
        section.insert(WEIGHTS_KEY.into(), super::sha256_hex(w).into());
    }
    Ok(Some(serde_json::to_vec_pretty(&section)?))
}
