//! `trainer export --format merged`: a full Hugging Face model folder from a checkpoint (or a
//! PEFT adapter folder, as PEFT's `merge_and_unload`) and the base model it was trained on. Every base tensor is streamed from the base's memory-mapped
//! safetensors into the output shards one at a time (host memory holds one tensor and its LoRA
//! factors, never the model):
//! - a LoRA-targeted linear weight W (out, in) becomes W + scaling * B (out, r) @ A (r, in),
//!   computed in fp32 and cast back to W's dtype (`Linear::merge_lora`, the model's own math);
//!   an adapter's scaling is the module's (rank_pattern / alpha_pattern), and a DoRA adapter's
//!   weight becomes g (W + scaling B A), g its magnitude over that matrix's row norms;
//! - an adapter's modules_to_save parameters replace the base's (cast to their dtype);
//! - a full-finetuning checkpoint's trained parameter replaces the base tensor (cast to its dtype);
//! - every other tensor is copied byte for byte.
//!
//! Output layout as `save_pretrained` writes it: `model.safetensors` when everything fits in one
//! shard of `max_shard_bytes`, else `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
//! (`metadata.total_size`, `weight_map`), greedy in base order like huggingface_hub's splitter (a
//! tensor larger than the limit gets a shard of its own); plus config.json, generation_config.json,
//! tokenizer, chat-template and processor files copied from the base folder. Tensor names and
//! dtypes are the base's (either key layout), so whatever loads the base loads the export.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::load::{read_manifest, TrainedParams};
use crate::model::adapter_config::AdapterLayout;
use crate::model::lora::LoraBranch;
use crate::model::weights::legacy_to_canonical;
use crate::model::Linear;

/// huggingface_hub's default `max_shard_size`.
pub const DEFAULT_MAX_SHARD: &str = "5GB";

/// Files copied from the base folder when present (config.json must be), config.json last: a
/// folder with it looks loadable, so it comes once everything else is in place.
const SIDE_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "config.json",
];

/// What `export_merged` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedSummary {
    /// Tensors written (all of the base's).
    pub tensors: usize,
    /// Linear weights with a LoRA update merged in.
    pub merged: usize,
    /// Base tensors replaced by trained (full-finetuning) parameters.
    pub replaced: usize,
    /// Weight files written, in order.
    pub files: Vec<String>,
    /// Bytes of tensor data (`metadata.total_size`).
    pub total_bytes: u64,
}

/// `"5GB"` -> 5e9 bytes, as transformers' `convert_file_size_to_int` reads it: KB/MB/GB are
/// powers of 1000, KiB/MiB/GiB powers of 1024, a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => {
            bail!("--max-shard-size {s:?}: unknown unit; use e.g. 5GB, 500MB, 2GiB or a byte count")
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("--max-shard-size {s:?}: expected a number with an optional unit (5GB, 500MB, 2GiB, 1000000)"))?;
    let bytes = (n * scale as f64).round();
    if bytes.is_nan() || bytes < 1.0 {
        bail!("--max-shard-size {s:?}: must be at least 1 byte");
    }
    Ok(bytes as u64)
}

/// One tensor of the base model, where it lives in its mapped file.
struct BaseTensor {
    name: String,
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range relative to the file's data start.
    offsets: (usize, usize),
}

impl BaseTensor {
    fn bytes(&self) -> u64 {
        (self.offsets.1 - self.offsets.0) as u64
    }
}

struct BaseFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
}

/// What happens to one base tensor.
enum Action {
    Copy,
    /// The module path and its LoRA tensor names (A, B, DoRA magnitude) in the source.
    Merge {
        module: String,
        a: String,
        b: String,
        magnitude: Option<String>,
    },
    /// The checkpoint parameter's name.
    Replace(String),
}

/// The base folder's weight files (index or single file), mapped, and their tensors in file order.
fn open_base(dir: &Path) -> Result<(Vec<BaseFile>, Vec<BaseTensor>)> {
    let index = dir.join("model.safetensors.index.json");
    let paths: Vec<PathBuf> = if index.exists() {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("parsing {}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
        let names: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        names.into_iter().map(|f| dir.join(f)).collect()
    } else {
        let single = dir.join("model.safetensors");
        if !single.exists() {
            bail!(
                "base model folder {}: neither model.safetensors nor model.safetensors.index.json found; pass the folder the checkpoint was trained on with --model DIR",
                dir.display()
            );
        }
        vec![single]
    };
    let (mut files, mut tensors) = (vec![], vec![]);
    for (i, path) in paths.into_iter().enumerate() {
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the base model is only read; a concurrent writer would be a user error, as with any mmap.
        let map =
            unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            let why = crate::model::weights::unreadable_header(&e);
            anyhow!("{}: {why}", path.display())
        })?;
        let mut here: Vec<BaseTensor> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| BaseTensor {
                name,
                file: i,
                dtype: info.dtype,
                shape: info.shape.iter().map(|&d| d as i64).collect(),
                offsets: info.data_offsets,
            })
            .collect();
        // file order: reading the map front to back
        here.sort_by_key(|t| t.offsets.0);
        tensors.extend(here);
        files.push(BaseFile {
            path,
            map,
            data_start: n + 8,
        });
    }
    // a name in two shards would be written twice under one name (a file safetensors refuses)
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for t in &tensors {
        if let Some(&f) = first.get(t.name.as_str()) {
            bail!(
                "tensor {} is stored twice, in {} and in {}: a broken or mixed model folder (remove the stray shard, or re-download the model)",
                t.name,
                files[f].path.display(),
                files[t.file].path.display()
            );
        }
        first.insert(&t.name, t.file);
    }
    Ok((files, tensors))
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_name(d: Dtype) -> Value {
    serde_json::to_value(d).expect("Dtype serializes")
}

/// Where the trained weights of a merged export come from.
#[derive(Debug, Clone, Copy)]
pub enum MergeSource<'a> {
    /// A checkpoint folder: LoRA factors, or full-finetuning parameters.
    Checkpoint(&'a Path),
    /// A PEFT LoRA adapter folder (either key naming), as `merge_and_unload` merges it.
    Adapter(&'a Path),
}

/// The trained tensors by parameter name (this model's naming).
enum Trained<'m> {
    Checkpoint(TrainedParams<'m>),
    /// An adapter's fp32 factors (small: read whole).
    Adapter(BTreeMap<String, Tensor>),
}

impl Trained<'_> {
    fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Self::Checkpoint(t) => Box::new(t.names()),
            Self::Adapter(f) => Box::new(f.keys().map(String::as_str)),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        match self {
            Self::Checkpoint(t) => t.shape(name).map(<[i64]>::to_vec),
            Self::Adapter(f) => f.get(name).map(Tensor::size),
        }
    }

    /// The fp32 tensor `name`.
    fn get(&mut self, name: &str) -> Result<Tensor> {
        match self {
            Self::Checkpoint(t) => t.get(name),
            Self::Adapter(f) => f
                .get(name)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| anyhow!("the adapter has no tensor {name}")),
        }
    }
}

/// Writes the merged model of `source` into `out` (see the module doc). `model`: the base folder
/// (default: a checkpoint's `model_path`, an adapter's `base_model_name_or_path` when that is a
/// folder).
pub fn export_merged(
    source: MergeSource,
    out: &Path,
    model: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<MergedSummary> {
    let manifest;
    // (and the run's prompt settings, which the folder carries for `trainer infer|eval --model`)
    let (what, base_dir, lora, mut trained, prompt) = match source {
        MergeSource::Checkpoint(dir) => {
            manifest = read_manifest(dir)?;
            // (each module's rank and scaling: the run's, as its manifest records them)
            let (base_dir, lora) = checkpoint_base(dir, &manifest, model)?;
            let trained = Trained::Checkpoint(TrainedParams::new(dir, &manifest)?);
            (
                format!("checkpoint {}", dir.display()),
                base_dir,
                lora,
                trained,
                super::prompt::file_bytes(&manifest.prompt, None)?,
            )
        }
        MergeSource::Adapter(dir) => {
            let a = crate::model::adapter::read_adapter(dir)?;
            let base_dir = crate::model::adapter::base_folder(dir, model)?;
            let what = format!("adapter {}", dir.display());
            let prompt = match super::prompt::read_section(dir)? {
                Some(p) => super::prompt::file_bytes(&super::prompt::untied(p), None)?,
                None => None,
            };
            (
                what,
                base_dir,
                Some(Box::new(a.layout)),
                Trained::Adapter(a.factors),
                prompt,
            )
        }
    };
    let (files, base) = open_base(&base_dir)?;

    // 1. decide every tensor's fate and check shapes before writing anything
    let mut actions = Vec::with_capacity(base.len());
    let mut used = BTreeSet::new();
    let mut problems = vec![];
    for t in &base {
        let canonical = legacy_to_canonical(&t.name);
        // a trained parameter of this name: full finetuning's, or one of an adapter's modules to
        // save (LoRA factors go by other names)
        let action = match (trained.shape(&canonical), &lora) {
            (Some(s), _) => {
                if s != t.shape {
                    problems.push(format!(
                        "{}: base shape {:?}, trained {:?}",
                        t.name, t.shape, s
                    ));
                }
                used.insert(canonical.clone());
                Action::Replace(canonical)
            }
            (None, Some(how)) if how.saves(&canonical) => {
                problems.push(format!(
                    "{}: in a module of the adapter's modules_to_save, but the adapter lacks \
                     base_model.model.{canonical}",
                    t.name
                ));
                Action::Copy
            }
            (None, Some(how)) => {
                let module = canonical.strip_suffix(".weight");
                let a = module.map(|p| format!("base_model.model.{p}.lora_A.weight"));
                match (module, a.as_deref().and_then(|a| trained.shape(a)), a) {
                    (Some(module), Some(sa), Some(a)) => {
                        let b = format!("base_model.model.{module}.lora_B.weight");
                        let sb = trained.shape(&b);
                        let ok = t.shape.len() == 2
                            && sa.len() == 2
                            && sa[1] == t.shape[1]
                            && sb.as_ref().is_some_and(|sb| {
                                sb.len() == 2 && sb[0] == t.shape[0] && sb[1] == sa[0]
                            });
                        if !ok {
                            problems.push(format!(
                                "{}: base shape {:?}, LoRA A {:?}, B {:?} (expected A (r, in), B (out, r))",
                                t.name, t.shape, sa, sb
                            ));
                        }
                        let r = how.rank(module);
                        if sa.first() != Some(&r) {
                            problems.push(format!(
                                "{a}: rank {:?}, but the {what}'s LoRA config gives {module} rank {r}",
                                sa.first()
                            ));
                        }
                        let magnitude = how.use_dora.then(|| {
                            let m = format!("base_model.model.{module}.lora_magnitude_vector");
                            let sm = trained.shape(&m);
                            if sm.as_deref() != t.shape.get(..1) {
                                problems.push(format!(
                                    "{m}: shape {sm:?}, expected [{}] (DoRA's magnitude of each output row of {})",
                                    t.shape.first().unwrap_or(&0),
                                    t.name
                                ));
                            }
                            used.insert(m.clone());
                            m
                        });
                        used.insert(a.clone());
                        used.insert(b.clone());
                        Action::Merge {
                            module: module.to_string(),
                            a,
                            b,
                            magnitude,
                        }
                    }
                    _ => Action::Copy,
                }
            }
            (None, None) => Action::Copy,
        };
        if !matches!(action, Action::Copy) && kind_of(t.dtype).is_none() {
            problems.push(format!(
                "{}: dtype {:?} is not a float type, it cannot hold trained weights",
                t.name, t.dtype
            ));
        }
        actions.push(action);
    }
    // every linear layer the adapter's config chooses must have its factors, as `infer --adapter`
    // requires (peft only warns of missing adapter keys: the merge would hold a layer untrained)
    let mut unlisted = 0; // (problems counted but not listed)
    if let Some(layout) = &lora {
        let missing: Vec<String> = linear_paths(&base_dir)?
            .into_iter()
            .filter(|p| layout.wraps(p))
            .map(|p| format!("base_model.model.{p}.lora_A.weight"))
            .filter(|a| !used.contains(a))
            .collect();
        for a in missing.iter().take(10) {
            problems.push(format!(
                "the adapter config chooses the base's layer of {a}, but the adapter lacks it"
            ));
        }
        unlisted += missing.len().saturating_sub(10);
    }
    let unused: Vec<&str> = trained.names().filter(|n| !used.contains(*n)).collect();
    for n in unused.iter().take(10) {
        problems.push(format!(
            "trained tensor {n} has no tensor in the base model"
        ));
    }
    unlisted += unused.len().saturating_sub(10);
    if !problems.is_empty() {
        let more = match unlisted {
            0 => String::new(),
            n => format!("\n  ... and {n} more"),
        };
        bail!(
            "{what} does not fit the base model {} ({} problem(s)):\n  {}{more}\npass the folder it was trained on with --model DIR",
            base_dir.display(),
            problems.len() + unlisted,
            problems.join("\n  ")
        );
    }

    // 2. shard plan: greedy in base order (huggingface_hub's `split_torch_state_dict_into_shards`)
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current = 0u64;
    for (i, t) in base.iter().enumerate() {
        if shards.is_empty() || (current + t.bytes() > max_shard_bytes && current > 0) {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("a shard").push(i);
        current += t.bytes();
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };

    // 3. write, every file under a staging name (`.NAME.partial`), renamed into place once all
    // are written, config.json last: an export that is killed (Ctrl-C, the OOM killer) leaves
    // only staging files, which the next export into the folder removes, not a folder of torn
    // shards that every retry refuses
    let _lock = prepare_out(out)?;
    let mut created = super::Created::default();
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new(); // (staging, final)
    let mut stage = |name: &str, created: &mut super::Created| -> PathBuf {
        let (tmp, fin) = (out.join(staging_name(name)), out.join(name));
        created.paths.extend([tmp.clone(), fin.clone()]);
        staged.push((tmp.clone(), fin));
        tmp
    };
    let mut weight_map = serde_json::Map::new();
    let (mut merged, mut replaced) = (0, 0);
    for (shard, fname) in shards.iter().zip(&names) {
        let path = stage(fname, &mut created);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut at = 0u64;
        for &i in shard {
            let t = &base[i];
            header.insert(
                t.name.clone(),
                json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [at, at + t.bytes()]}),
            );
            at += t.bytes();
            weight_map.insert(t.name.clone(), json!(fname));
        }
        let mut head = serde_json::to_vec(&Value::Object(header))?;
        while head.len() % 8 != 0 {
            head.push(b' ');
        }
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for &i in shard {
            let t = &base[i];
            let f = &files[t.file];
            let (a, b) = (f.data_start + t.offsets.0, f.data_start + t.offsets.1);
            let raw = f.map.get(a..b).ok_or_else(|| {
                anyhow!(
                    "{}: data of {} out of range (truncated file?)",
                    f.path.display(),
                    t.name
                )
            })?;
            let written = match &actions[i] {
                Action::Copy => {
                    w.write_all(raw)?;
                    Ok(())
                }
                Action::Merge {
                    module,
                    a,
                    b,
                    magnitude,
                } => {
                    merged += 1;
                    let kind = kind_of(t.dtype).expect("checked");
                    let weight = Tensor::f_from_data_size(raw, &t.shape, kind)?; // (out, in)
                    let scaling = lora.as_ref().expect("lora").scaling(module);
                    // A (r, in), B (out, r) fp32
                    let mut branch =
                        LoraBranch::new(trained.get(a)?, trained.get(b)?, scaling, 0.0);
                    if let Some(m) = magnitude {
                        branch.set_dora(&trained.get(m)?, &weight); // m (out,)
                    }
                    let mut lin = Linear {
                        path: t.name.clone(),
                        weight,
                        bias: None,
                        lora: Some(branch),
                    };
                    lin.merge_lora();
                    write_tensor(&mut w, &lin.weight, t)
                }
                Action::Replace(pn) => {
                    replaced += 1;
                    let kind = kind_of(t.dtype).expect("checked");
                    let p = trained.get(pn)?.to_kind(kind);
                    write_tensor(&mut w, &p, t)
                }
            };
            written.with_context(|| format!("writing {} into {}", t.name, path.display()))?;
            release(f, a, b - a);
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    let total_bytes: u64 = base.iter().map(BaseTensor::bytes).sum();
    if n > 1 {
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        let p = stage("model.safetensors.index.json", &mut created);
        super::write_synced(&p, serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    if let Some(bytes) = &prompt {
        let p = stage(super::PROMPT_FILE, &mut created);
        super::write_synced(&p, bytes)?;
    }
    // (SIDE_FILES ends with config.json: renamed last, it marks the folder complete)
    for f in SIDE_FILES {
        let src = base_dir.join(f);
        if src.exists() {
            let p = stage(f, &mut created);
            super::copy_synced(&src, &p)?;
        }
    }
    super::rename_into_place(out, RENAMING, &staged)?;
    created.done = true;
    Ok(MergedSummary {
        tensors: base.len(),
        merged,
        replaced,
        files: names,
        total_bytes,
    })
}

/// The module paths of the base's linear layers (from its config.json and weight headers; no
/// weight is read).
fn linear_paths(base_dir: &Path) -> Result<Vec<String>> {
    use crate::model::{LoadOptions, MllamaConfig, MllamaModel, WeightSource};
    let config = MllamaConfig::from_file(&base_dir.join("config.json"))?;
    let src = WeightSource::open_dir(base_dir)?;
    let mut model = MllamaModel::skeleton(config, &src, LoadOptions::default())?;
    let mut paths = vec![];
    model.visit_linears(&mut |l| paths.push(l.path.clone()));
    Ok(paths)
}

/// A checkpoint's base folder (`model`, else the manifest's `model_path`), checked against the
/// config.json hash the manifest records, and its LoRA layout (None: full finetuning).
fn checkpoint_base(
    checkpoint: &Path,
    m: &super::manifest::Manifest,
    model: Option<&Path>,
) -> Result<(PathBuf, Option<Box<AdapterLayout>>)> {
    let base_dir = model.map_or_else(|| PathBuf::from(&m.model_path), Path::to_path_buf);
    super::check_base(m, &base_dir)?;
    let lora = match m.peft.get("method").and_then(Value::as_str) {
        Some("lora") => {
            let adapter = m.adapter_config().map_err(|e| {
                anyhow!(
                    "checkpoint {}: {e}; it cannot be merged",
                    checkpoint.display()
                )
            })?;
            Some(Box::new(adapter.training_layout()?))
        }
        Some("none") => None,
        other => bail!(
            "checkpoint {}: unknown peft.method {other:?} in the manifest",
            checkpoint.display()
        ),
    };
    Ok((base_dir, lora))
}

/// Creates `out`; refuses a folder that already holds weights (a stale shard would mix into the
/// export) or any file the export writes (a user's edited chat template would be replaced).
/// Returns the folder's lock, to hold until the export is complete.
fn prepare_out(out: &Path) -> Result<super::ExportLock> {
    let lock = super::ExportLock::acquire(out)?;
    // an export killed while renaming its files into place: what it renamed goes (this folder is
    // locked, and the list names only that export's files), then the list
    super::clear_killed_export(out, RENAMING)?;
    let mut names = Vec::new();
    for e in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // a killed export's staging files (this folder is locked: no export is writing them)
        if is_staging_name(&name) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            continue;
        }
        names.push(name);
    }
    // (weights named first: a model's folder is refused as one, whatever order the listing has)
    names.sort();
    // (transformers' from_pretrained takes a folder with an adapter config for a PEFT adapter,
    // and would not load the merged model beside it)
    if let Some(name) = names.iter().find(|n| n.starts_with("adapter_")) {
        bail!(
            "--out {} already holds a PEFT adapter's file ({name}), which transformers would load \
             instead of the merged model; give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
            out.display()
        );
    }
    if let Some(name) = names.iter().find(|n| is_weights_file(n)) {
        bail!(
            "--out {} already holds model weights ({name}); give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
            out.display()
        );
    }
    let written = |n: &&String| SIDE_FILES.contains(&n.as_str()) || *n == super::PROMPT_FILE;
    if let Some(name) = names.iter().find(written) {
        bail!(
            "--out {} already holds {name}, which the export writes; give a new folder, or one without an export in it (files of other kinds are left as they are, as save_pretrained leaves them)",
            out.display()
        );
    }
    Ok(lock)
}

/// A file of model weights as transformers (or Meta's release) names them in a folder
/// (safetensors, PyTorch pickles, their index files), which a merged export must not mix with;
/// a Trainer's state beside them (training_args.bin, optimizer.pt) is not.
pub(crate) fn is_weights_file(name: &str) -> bool {
    let pickle = |prefix: &str, ext: &str| name.starts_with(prefix) && name.ends_with(ext);
    name.ends_with(".safetensors")
        || name.ends_with(".index.json")
        || pickle("pytorch_model", ".bin")
        || pickle("consolidated", ".pth")
}

/// The list of files an export is renaming into place (present only while it does).
const RENAMING: &str = ".merged-export-renaming.json";

/// The name a merged-export file is written under before it is renamed into place.
fn staging_name(name: &str) -> String {
    format!(".{name}.partial")
}

fn is_staging_name(name: &str) -> bool {
    SIDE_FILES
        .iter()
        .copied()
        .chain([
            "model.safetensors",
            "model.safetensors.index.json",
            super::PROMPT_FILE,
        ])
        .any(|f| name == staging_name(f))
        || (name.starts_with(".model-") && name.ends_with(".safetensors.partial"))
}

/// The bytes of `t` (contiguous, the base tensor's dtype and shape) into `w`.
fn write_tensor(w: &mut impl Write, t: &Tensor, base: &BaseTensor) -> Result<()> {
    let t = t.contiguous();
    if t.size() != base.shape {
        bail!("shape {:?}, expected {:?}", t.size(), base.shape);
    }
    let mut bytes = vec![0u8; base.bytes() as usize];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    w.write_all(&bytes)?;
    Ok(())
}

/// Drops a range's mapped pages once written, so the export's resident memory stays near one
/// tensor (mapped pages otherwise stay resident until the map is dropped).
fn release(f: &BaseFile, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: read-only shared file mapping; no slice into this range is used after this call
        // (MADV_DONTNEED only drops pages, a later read faults them in from the file again).
        let _ = unsafe {
            f.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }
    #[cfg(not(unix))]
    let _ = (f, offset, len);
}

/// The index of a sharded export (`None`: single file), for tests and tools.
pub fn read_index(dir: &Path) -> Result<Option<(u64, BTreeMap<String, String>)>> {
    let p = dir.join("model.safetensors.index.json");
    if !p.exists() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
    let total = v["metadata"]["total_size"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: no metadata.total_size", p.display()))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| anyhow!("{}: no weight_map", p.display()))?
        .iter()
        .map(|(k, f)| (k.clone(), f.as_str().unwrap_or_default().to_string()))
        .collect();
    Ok(Some((total, map)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5kb").unwrap(), 1500);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }
}
