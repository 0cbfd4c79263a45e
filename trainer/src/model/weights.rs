//! Weights: memory-mapped safetensors (`model.safetensors` or `model.safetensors.index.json` + shards).
//!
//! - [`WeightSource`]: every tensor's name, dtype and shape from the headers; `get(name, kind)` materializes one
//!   tensor (copied out of the map, converted to `kind`); `get_flat_range` a slice of one. FSDP asks for only the
//!   slices a rank keeps; `bytes_read` counts what was materialized (tests and the load log line).
//! - [`KeyLayout`]: the two key layouts; the model asks by canonical (transformers-5 module path) name.
//! - [`Loader`]: hands tensors to the model's constructors, checks shapes and collects every problem (missing,
//!   mis-shaped, unexpected) into one [`ModelError::Weights`]. [`Loader::shapes_only`] checks the same and hands out
//!   placeholders (one element broadcast to the shape) for a model whose weights FSDP then reads shard by shard.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::ModelError;

/// One mapped file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Start of the data section (8 + header length).
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shape: Vec<i64>,
    pub dtype: Dtype,
    shard: usize,
    offsets: (usize, usize),
}

/// All tensors of a checkpoint, memory-mapped; nothing is read until `get`.
pub struct WeightSource {
    shards: Vec<Shard>,
    entries: BTreeMap<String, TensorEntry>,
    /// Bytes copied out of the maps so far (`get` and `get_flat_range`).
    bytes_read: AtomicU64,
}

fn kind_of(d: Dtype, name: &str) -> Result<Kind, ModelError> {
    Ok(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        other => {
            return Err(ModelError::Weights(format!(
                "{name}: unsupported safetensors dtype {other:?}"
            )))
        }
    })
}

impl WeightSource {
    /// Opens `dir/model.safetensors.index.json` (+ shards) or `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ModelError::Weights(format!("{}: no `weight_map` object", index.display()))
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::Weights(format!(
                    "{}: neither model.safetensors nor model.safetensors.index.json found",
                    dir.display()
                )));
            }
            vec![single]
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = vec![];
        let mut entries = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the checkpoint is opened read-only; a concurrent writer would be a user error, as with any mmap.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                ModelError::Weights(format!("{}: {}", path.display(), unreadable_header(&e)))
            })?;
            for (name, info) in meta.tensors() {
                let entry = TensorEntry {
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    dtype: info.dtype,
                    shard: i,
                    offsets: info.data_offsets,
                };
                // (which copy would win is an accident of file order; the merged export would
                // write both under one name, a file safetensors then refuses)
                if let Some(first) = entries.insert(name.clone(), entry) {
                    return Err(ModelError::Weights(format!(
                        "tensor {name} is stored twice, in {} and in {}: a broken or mixed checkpoint folder (remove the stray shard, or re-download the model)",
                        files[first.shard].display(),
                        path.display()
                    )));
                }
            }
            shards.push(Shard {
                path: path.clone(),
                map,
                data_start: n + 8,
            });
        }
        Ok(Self {
            shards,
            entries,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Names and shapes of every tensor (file names, as stored).
    pub fn names_and_shapes(&self) -> impl Iterator<Item = (&str, &[i64])> {
        self.entries
            .iter()
            .map(|(k, e)| (k.as_str(), e.shape.as_slice()))
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    /// The stored bytes of one tensor (file name), borrowed from the map: nothing is copied, and
    /// `bytes_read` does not count them (a fingerprint's samples touch a few pages).
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.entries.get(name)?;
        let shard = &self.shards[e.shard];
        shard
            .map
            .get(shard.data_start + e.offsets.0..shard.data_start + e.offsets.1)
    }

    /// Bytes materialized so far by `get` and `get_flat_range` (what a rank actually read).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes of every tensor's data (what loading the whole model reads).
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.offsets.1 - e.offsets.0) as u64)
            .sum()
    }

    /// Materializes one tensor (file name) converted to `kind`, on the CPU.
    pub fn get(&self, name: &str, kind: Kind) -> Result<Tensor, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::Weights(format!("{name}: not in the checkpoint")))?;
        let shard = &self.shards[e.shard];
        let bytes = shard
            .map
            .get(shard.data_start + e.offsets.0..shard.data_start + e.offsets.1)
            .ok_or_else(|| {
                ModelError::Weights(format!(
                    "{name}: data offsets out of range in {}",
                    shard.path.display()
                ))
            })?;
        let file_kind = kind_of(e.dtype, name)?;
        let t = Tensor::f_from_data_size(bytes, &e.shape, file_kind)?;
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        release(
            shard,
            shard.data_start + e.offsets.0,
            e.offsets.1 - e.offsets.0,
        );
        Ok(if file_kind == kind {
            t
        } else {
            t.to_kind(kind)
        })
    }
}

impl WeightSource {
    /// Elements [start, start + len) of tensor `name` in row-major order, as a 1-D tensor of `kind` (CPU). Only those
    /// bytes are read from the map: an FSDP rank materializes just its shard of a flat parameter.
    pub fn get_flat_range(
        &self,
        name: &str,
        start: i64,
        len: i64,
        kind: Kind,
    ) -> Result<Tensor, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::Weights(format!("{name}: not in the checkpoint")))?;
        let numel: i64 = e.shape.iter().product();
        if start < 0 || len < 0 || start + len > numel {
            return Err(ModelError::Weights(format!(
                "{name}: range [{start}, {}) outside its {numel} elements (shape {:?})",
                start + len,
                e.shape
            )));
        }
        let file_kind = kind_of(e.dtype, name)?;
        let es = file_kind.elt_size_in_bytes();
        let shard = &self.shards[e.shard];
        let base = shard.data_start + e.offsets.0;
        let (a, b) = (
            base + start as usize * es,
            base + (start + len) as usize * es,
        );
        let bytes = shard.map.get(a..b).ok_or_else(|| {
            ModelError::Weights(format!(
                "{name}: data offsets out of range in {}",
                shard.path.display()
            ))
        })?;
        let t = Tensor::f_from_data_size(bytes, &[len], file_kind)?;
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        release(shard, a, b - a);
        Ok(if file_kind == kind {
            t
        } else {
            t.to_kind(kind)
        })
    }
}

/// Drops the mapped pages of a range once copied out, so that loading keeps host memory near the kept weights
/// plus one tensor (mapped pages otherwise stay in the process's resident set until the map is dropped).
fn release(shard: &Shard, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the map is a read-only shared file mapping and no slice into this range outlives the copy above;
        // MADV_DONTNEED only drops the pages (a later read faults them in again from the file).
        let _ = unsafe {
            shard
                .map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }
    #[cfg(not(unix))]
    let _ = (shard, offset, len);
}

/// Key layout of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// Released checkpoints (and what transformers 5.24 still saves): `language_model.model.layers.N...`,
    /// `vision_model...`, `multi_modal_projector...`, `language_model.lm_head...`.
    Legacy,
    /// transformers-5 module paths: `model.language_model.layers.N...`, `model.vision_model...`, `lm_head...`.
    ModulePaths,
}

impl KeyLayout {
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        for n in names {
            if n.starts_with("model.language_model.") || n.starts_with("model.vision_model.") {
                return Self::ModulePaths;
            }
            if n.starts_with("language_model.") || n.starts_with("vision_model.") {
                return Self::Legacy;
            }
        }
        Self::ModulePaths
    }

    /// Canonical (module path) name -> this layout's name.
    pub fn file_name(self, canonical: &str) -> String {
        match self {
            Self::ModulePaths => canonical.to_string(),
            Self::Legacy => canonical_to_legacy(canonical),
        }
    }
}

/// What a safetensors header that cannot be read means, for an error message (the crate's own
/// text is its variant's name).
pub fn unreadable_header(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let why = match e {
        E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeaderLength => {
            "the file is truncated or not a safetensors file"
        }
        E::MetadataIncompleteBuffer => {
            "the file is shorter or longer than its header says: truncated (an interrupted copy or \
             download) or damaged"
        }
        E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization => {
            "its header is not the safetensors JSON (a damaged or other kind of file)"
        }
        _ => "its header does not describe the file's data (damaged?)",
    };
    format!("not a readable safetensors file: {why} ({e:?})")
}

/// `model.language_model.X` -> `language_model.model.X`, `model.vision_model.X` -> `vision_model.X`,
/// `model.multi_modal_projector.X` -> `multi_modal_projector.X`, `lm_head.X` -> `language_model.lm_head.X`.
/// Module paths too (no `.X`: `lm_head` -> `language_model.lm_head`, as PEFT names LoRA keys;
/// `model.language_model` -> `language_model.model`, a module to save).
pub fn canonical_to_legacy(name: &str) -> String {
    if name == "model.language_model" {
        "language_model.model".to_string()
    } else if let Some(r) = name.strip_prefix("model.language_model.") {
        format!("language_model.model.{r}")
    } else if let Some(r) = name.strip_prefix("model.") {
        r.to_string()
    } else if name == "lm_head" || name.starts_with("lm_head.") {
        format!("language_model.{name}")
    } else {
        name.to_string()
    }
}

/// Inverse of [`canonical_to_legacy`] (tensor names and module paths); module-path names pass
/// through.
pub fn legacy_to_canonical(name: &str) -> String {
    let under = |prefix: &str| name == prefix || name.starts_with(&format!("{prefix}."));
    if name.starts_with("model.") || under("lm_head") {
        name.to_string()
    } else if name == "language_model.model" {
        "model.language_model".to_string()
    } else if let Some(r) = name.strip_prefix("language_model.model.") {
        format!("model.language_model.{r}")
    } else if under("language_model.lm_head") {
        name["language_model.".len()..].to_string()
    } else if under("vision_model") || under("multi_modal_projector") {
        format!("model.{name}")
    } else {
        name.to_string()
    }
}

/// Whether `t` is a [`Loader`] placeholder (a skeleton's stand-in for a weight it has not read):
/// a zero-dimensional zero broadcast to the shape, so every stride is 0, one-element shapes
/// included (a real `(1,)` tensor has stride 1).
pub fn is_placeholder(t: &Tensor) -> bool {
    t.dim() > 0 && t.stride().iter().all(|s| *s == 0)
}

/// Hands tensors to the constructors by canonical name and collects problems.
pub struct Loader<'a> {
    /// None: random initialisation (synthetic models for tests and benchmarks).
    src: Option<&'a WeightSource>,
    layout: KeyLayout,
    kind: Kind,
    device: Device,
    used: BTreeSet<String>,
    problems: Vec<String>,
    /// Check names and shapes but read nothing: hand out placeholders (`shapes_only`).
    placeholders: bool,
}

impl<'a> Loader<'a> {
    pub fn new(src: &'a WeightSource, kind: Kind, device: Device) -> Self {
        let layout = KeyLayout::detect(src.entries.keys().map(String::as_str));
        Self {
            src: Some(src),
            layout,
            kind,
            device,
            used: BTreeSet::new(),
            problems: vec![],
            placeholders: false,
        }
    }

    /// Like [`Loader::new`] (same name and shape checks, same errors) but reads no data: every tensor is a
    /// placeholder, one zero element broadcast (stride 0) to the expected shape, with the right dtype and device.
    /// For FSDP's sharded loading: the model's structure is built, then each rank reads only its slices with
    /// [`WeightSource::get_flat_range`] into its flat shards.
    pub fn shapes_only(src: &'a WeightSource, kind: Kind, device: Device) -> Self {
        Self {
            placeholders: true,
            ..Self::new(src, kind, device)
        }
    }

    /// A loader that invents every tensor: N(0, 0.02) weights, norm weights 1 + N(0, 0.1), gates N(0.5, 0.3)
    /// (non-zero so that every branch contributes). Seed libtorch's generator first for reproducibility.
    pub fn random(kind: Kind, device: Device) -> Self {
        Self {
            src: None,
            layout: KeyLayout::ModulePaths,
            kind,
            device,
            used: BTreeSet::new(),
            problems: vec![],
            placeholders: false,
        }
    }

    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the weights hold `canonical` (false for random initialisation).
    pub fn has(&self, canonical: &str) -> bool {
        self.src
            .is_some_and(|src| src.entry(&self.layout.file_name(canonical)).is_some())
    }

    /// The tensor `canonical` with the expected `shape`, or a placeholder while a problem is recorded.
    pub fn get(&mut self, canonical: &str, shape: &[i64]) -> Tensor {
        let Some(src) = self.src else {
            let r = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            let t = if canonical.contains("norm") && canonical.ends_with(".weight") {
                r * 0.1 + 1.0
            } else if canonical
                .rsplit('.')
                .next()
                .is_some_and(|last| last.contains("gate"))
            {
                r * 0.3 + 0.5
            } else {
                r * 0.02
            };
            return t.to_kind(self.kind).to_device(self.device);
        };
        let file = self.layout.file_name(canonical);
        // Stands in for a tensor with a problem (finish() fails) or a skeleton's: one element
        // broadcast, so a folder of wrongly shaped (e.g. quantized) weights does not allocate
        // the model in zeros before the error is reported.
        let placeholder =
            |device| Tensor::zeros([0i64; 0], (self.kind, device)).expand(shape, false);
        match src.entry(&file) {
            None => {
                self.problems
                    .push(format!("missing    {file}: expected {shape:?}"));
                placeholder(Device::Cpu)
            }
            Some(e) if e.shape != shape => {
                self.used.insert(file.clone());
                self.problems.push(format!(
                    "mis-shaped {file}: expected {shape:?}, found {:?}",
                    e.shape
                ));
                placeholder(Device::Cpu)
            }
            Some(_) if self.placeholders => {
                self.used.insert(file);
                placeholder(self.device)
            }
            Some(_) => {
                self.used.insert(file.clone());
                match src.get(&file, self.kind) {
                    Ok(t) => t.to_device(self.device),
                    Err(e) => {
                        self.problems.push(e.to_string());
                        placeholder(Device::Cpu)
                    }
                }
            }
        }
    }

    /// Finishes loading: one error listing missing, mis-shaped and unexpected tensors.
    pub fn finish(mut self) -> Result<(), ModelError> {
        let Some(src) = self.src else { return Ok(()) };
        for name in src.entries.keys() {
            if !self.used.contains(name) {
                let e = &src.entries[name];
                self.problems
                    .push(format!("unexpected {name}: found {:?}", e.shape));
            }
        }
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Weights(format!(
                "checkpoint does not match the config ({} problems, key layout {:?}):\n  {}",
                self.problems.len(),
                self.layout,
                self.problems.join("\n  ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensor names and module paths (PEFT's LoRA keys name modules: no `.weight`) map both ways.
    #[test]
    fn legacy_and_canonical_names_map_both_ways() {
        let pairs = [
            (
                "model.language_model.layers.0.self_attn.q_proj.weight",
                "language_model.model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "model.language_model.layers.0.self_attn.q_proj",
                "language_model.model.layers.0.self_attn.q_proj",
            ),
            (
                "model.vision_model.transformer.layers.1.self_attn.v_proj",
                "vision_model.transformer.layers.1.self_attn.v_proj",
            ),
            (
                "model.multi_modal_projector.weight",
                "multi_modal_projector.weight",
            ),
            ("model.multi_modal_projector", "multi_modal_projector"),
            ("model.language_model", "language_model.model"),
            ("lm_head.weight", "language_model.lm_head.weight"),
            ("lm_head", "language_model.lm_head"),
        ];
        for (canonical, legacy) in pairs {
            assert_eq!(canonical_to_legacy(canonical), legacy);
            assert_eq!(legacy_to_canonical(legacy), canonical);
            assert_eq!(legacy_to_canonical(canonical), canonical);
        }
    }
}
