//! Content fingerprints of a model folder: for an evaluation's settings (what its resume
//! compares) the tokenizer and processor files whole and the weight files by samples of every
//! tensor; for a checkpoint's manifest the base's tensors by samples (what a resume, an export
//! and `infer --checkpoint` compare, whatever files hold them). Hashing 20 GB of weights would
//! take minutes at every start; a retrained, merged or edited model changes whole tensors (a
//! merged LoRA delta, an edit in place), which the first, middle and last bytes of each tensor
//! show, at a few bytes per tensor read.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Bytes read at each of a tensor's three places.
const SAMPLE: usize = 4096;

/// The files besides the weights and config.json that decide the prompt's tokens, the images'
/// pixels and the generation's defaults: the tokenizer, its config with the chat template (or the
/// template in a file of its own, as newer transformers save it), the image processor's config
/// and generation_config.json (its eos ids, top_k, repetition_penalty). (transformers 5's
/// `processor_config.json` is fingerprinted apart, [`processor_config`]: settings recorded before
/// it was would otherwise all differ.)
pub const MODEL_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
];

/// sha256 of `model`'s `processor_config.json` (transformers 5's layout, whose `image_processor`
/// section `data::image` reads when there is no preprocessor_config.json), null without one.
pub fn processor_config(model: &Path) -> serde_json::Value {
    let sha = super::file_sha256(&model.join("processor_config.json"));
    sha.map_or(serde_json::Value::Null, Into::into)
}

/// sha256 of each of `MODEL_FILES` that `model` holds, by name with `_` for `.`
/// ("tokenizer_config_json": the settings' differences are named by dotted key paths).
pub fn model_files(model: &Path) -> serde_json::Map<String, serde_json::Value> {
    MODEL_FILES
        .iter()
        .filter_map(|name| {
            let hex = super::file_sha256(&model.join(name))?;
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
    let map = map_file(path)?;
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
    for (_, span) in spans {
        update_with_samples(h, data, span);
    }
    Ok(())
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: opened read-only, as the model loader maps it (weights.rs).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())
}

/// Hashes the first, middle and last [`SAMPLE`] bytes of `data[begin..end]`.
fn update_with_samples(h: &mut Sha256, data: &[u8], (begin, end): (usize, usize)) {
    let n = (end - begin).min(SAMPLE);
    let middle = begin + ((end - begin) / 2).saturating_sub(n / 2);
    for at in [begin, middle, end - n] {
        h.update(&data[at..at + n]);
    }
}

/// One sha256 over the tensors of the model folder `model`, read as the model loader reads it
/// (`WeightSource::open_dir`: the shards model.safetensors.index.json names, else
/// model.safetensors; a tensor stored twice refused), in name order whatever file holds them:
/// each tensor's name, dtype, shape and the first, middle and last [`SAMPLE`] bytes of its data.
/// The same weights saved in other shards give the same fingerprint; other weights (another
/// checkpoint of the same architecture, a merged export) another.
pub fn sampled_tensors(model: &Path) -> Result<String, String> {
    let src = crate::model::weights::WeightSource::open_dir(model).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    for (name, shape) in src.names_and_shapes() {
        let (Some(entry), Some(data)) = (src.entry(name), src.raw_bytes(name)) else {
            return Err(format!(
                "{}: tensor {name} lies outside its file",
                model.display()
            ));
        };
        h.update(name.as_bytes());
        h.update(format!("{:?} {shape:?}", entry.dtype).as_bytes());
        update_with_samples(&mut h, data, (0, data.len()));
    }
    Ok(crate::checkpoint::hex(&h.finalize()))
}

/// [`sampled_tensors`] of a base model, computed once per folder in a process (a run checks it
/// when it resumes and records it in every checkpoint it saves).
pub fn base_tensors(model: &Path) -> Result<String, String> {
    static DONE: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    let key = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    if let Some(found) = DONE.lock().ok().and_then(|d| d.get(&key).cloned()) {
        return Ok(found);
    }
    let found = sampled_tensors(model)?;
    if let Ok(mut d) = DONE.lock() {
        d.insert(key, found.clone());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of one f32 tensor "w" with `values`.
    fn write(dir: &Path, values: &[f32]) {
        write_file(&dir.join("model.safetensors"), &[("w", values)]);
    }

    /// A safetensors file of f32 tensors.
    fn write_file(path: &Path, tensors: &[(&str, &[f32])]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = tensors.iter().zip(&bytes).map(|((name, v), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], b);
            (*name, view.unwrap())
        });
        let data = safetensors::tensor::serialize(views, &None).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// The same tensors in one file or two give one fingerprint; another value at the start,
    /// middle or end of a tensor, another shape or a missing tensor give others.
    #[test]
    fn sampled_tensors_follow_the_weights_not_their_files() {
        let root = std::env::temp_dir().join(format!("fingerprint-t-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let a: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..3_000).map(|i| -(i as f32)).collect();
        write_file(&root.join("one/model.safetensors"), &[("a", &a), ("b", &b)]);
        write_file(
            &root.join("two/model-00001-of-00002.safetensors"),
            &[("b", &b)],
        );
        write_file(
            &root.join("two/model-00002-of-00002.safetensors"),
            &[("a", &a)],
        );
        let index = r#"{"weight_map": {"a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors"}}"#;
        std::fs::write(root.join("two/model.safetensors.index.json"), index).unwrap();
        let one = sampled_tensors(&root.join("one")).unwrap();
        assert_eq!(one, sampled_tensors(&root.join("two")).unwrap());
        // a stray file the loader does not read (the index names the shards) changes nothing
        write_file(&root.join("two/model.safetensors"), &[("a", &b), ("b", &a)]);
        assert_eq!(one, sampled_tensors(&root.join("two")).unwrap());
        for at in [0, 5_000, 9_999] {
            let mut other = a.clone();
            other[at] += 1.0;
            write_file(
                &root.join("x/model.safetensors"),
                &[("a", &other), ("b", &b)],
            );
            assert_ne!(
                one,
                sampled_tensors(&root.join("x")).unwrap(),
                "changed at {at}"
            );
        }
        write_file(
            &root.join("x/model.safetensors"),
            &[("a", &a), ("b", &b[..2_999])],
        );
        assert_ne!(one, sampled_tensors(&root.join("x")).unwrap());
        write_file(&root.join("x/model.safetensors"), &[("a", &a)]);
        assert_ne!(one, sampled_tensors(&root.join("x")).unwrap());
        let e = sampled_tensors(&root.join("none")).unwrap_err();
        assert!(e.contains("neither model.safetensors nor"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
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
