//! Content fingerprints of a model folder for an evaluation's settings (what a resume compares):
//! the tokenizer and processor files whole, and the weights by samples of every tensor. Hashing
//! 20 GB of weights would take minutes at every start; a retrained, merged or edited model
//! changes whole tensors (a merged LoRA delta, an edit in place), which the first, middle and last
//! bytes of each tensor show, at a few bytes per tensor read.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes read at each of a tensor's three places.
const SAMPLE: usize = 4096;

/// The files besides the weights and config.json that decide the prompt's tokens, the images'
/// pixels and the generation's defaults: the tokenizer, its config with the chat template (or the
/// template in a file of its own, as newer transformers save it), the image processor's config
/// and generation_config.json (its eos ids, top_k, repetition_penalty).
pub const MODEL_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
];

/// sha256 of each of `MODEL_FILES` that `model` holds, by name with `_` for `.`
/// ("tokenizer_config_json": the settings' differences are named by dotted key paths).
pub fn model_files(model: &Path) -> serde_json::Map<String, serde_json::Value> {
    MODEL_FILES
        .iter()
        .filter_map(|name| {
            let bytes = std::fs::read(model.join(name)).ok()?;
            let hex = crate::checkpoint::sha256_hex(&bytes);
            Some((name.replace('.', "_"), serde_json::Value::from(hex)))
        })
        .collect()
}

/// The `*.safetensors` files of `model`, by name.
pub fn weight_files(model: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".safetensors"))
    });
    files.sort();
    files
}

/// One sha256 over the weight `files` ([`weight_files`]): each file's name, its header (tensor
/// names, dtypes, shapes, offsets) and the first, middle and last [`SAMPLE`] bytes of each
/// tensor's data. A file that cannot be read adds its error, so it differs from a readable one.
pub fn sampled_weights(files: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for path in files {
        h.update(path.file_name().unwrap_or_default().as_encoded_bytes());
        if let Err(e) = sample_file(path, &mut h) {
            h.update(format!("unreadable: {e}").as_bytes());
        }
    }
    crate::checkpoint::hex(&h.finalize())
}

fn sample_file(path: &Path, h: &mut Sha256) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: opened read-only, as the model loader maps it (weights.rs).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| format!("{e:?}"))?;
    h.update(&map[8..8 + n]);
    let data = &map[8 + n..];
    // (each tensor's [begin, end) in the data section, in name order)
    let mut spans: Vec<(String, (usize, usize))> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.data_offsets))
        .collect();
    spans.sort();
    for (_, (begin, end)) in spans {
        let n = (end - begin).min(SAMPLE);
        let middle = begin + ((end - begin) / 2).saturating_sub(n / 2);
        for at in [begin, middle, end - n] {
            h.update(&data[at..at + n]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of one f32 tensor "w" with `values`.
    fn write(dir: &Path, values: &[f32]) {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![values.len()],
            &bytes,
        )
        .unwrap();
        let data = safetensors::tensor::serialize([("w", view)], &None).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), data).unwrap();
    }

    /// The same weights in two folders give one fingerprint; weights of the same names, shapes
    /// and file size that differ at the start, the middle or the end of a tensor give others.
    #[test]
    fn sampled_weights_tell_other_weights_of_the_same_size_apart() {
        let root = std::env::temp_dir().join(format!("fingerprint-{}", std::process::id()));
        let base: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        write(&root.join("a"), &base);
        write(&root.join("b"), &base);
        let sampled = |dir: &str| sampled_weights(&weight_files(&root.join(dir)));
        let a = sampled("a");
        assert_eq!(a, sampled("b"));
        for at in [0, 5_000, 9_999] {
            let mut other = base.clone();
            other[at] = -1.0;
            write(&root.join("b"), &other);
            assert_ne!(a, sampled("b"), "changed at {at}");
        }
        std::fs::write(root.join("b/model.safetensors"), b"broken").unwrap();
        assert_ne!(a, sampled("b"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
