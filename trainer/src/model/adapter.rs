//! LoRA on the model with PEFT semantics and PEFT adapter folders (`adapter_config.json` +
//! `adapter_model.safetensors`, keys `base_model.model.<module path>.lora_{A,B}.weight`).
//! Reads transformers-4 (`base_model.model.language_model.model.layers...`) and transformers-5
//! (`base_model.model.model.language_model.layers...`) naming; writes the transformers-5 naming current peft writes.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::adapter_config::{AdapterConfig, AdapterLayout};
use super::lora::{LoraBranch, LoraConfig, TargetModules};
use super::weights::{is_placeholder, legacy_to_canonical, KeyLayout, WeightSource};
use super::{MllamaModel, ModelError};
use crate::rng::SplitMix64;

const PEFT_PREFIX: &str = "base_model.model.";

/// Module path of an adapter key in either naming, and which tensor: ("model.language_model.layers.0.self_attn.q_proj", "A").
/// "A" and "B" are the LoRA factors, "M" DoRA's magnitude (peft writes `.lora_magnitude_vector`,
/// some versions with `.weight`); any other key is "P", a parameter of a module to save, whose
/// full name it gives (`lm_head.weight`).
fn parse_adapter_key(key: &str) -> Option<(String, &'static str)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let found = [
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_magnitude_vector", "M"),
        (".lora_magnitude_vector.weight", "M"),
    ]
    .into_iter()
    .find_map(|(suffix, which)| rest.strip_suffix(suffix).map(|m| (m, which)));
    Some(match found {
        Some((module, which)) => (legacy_to_canonical(module), which),
        None => (legacy_to_canonical(rest), "P"),
    })
}

/// Our key for an adapter tensor of `module` (this model's naming); a saved module's parameter
/// goes by its own name.
fn adapter_key(module: &str, which: &str) -> String {
    match which {
        "M" => format!("{PEFT_PREFIX}{module}.lora_magnitude_vector"),
        "P" => module.to_string(),
        ab => format!("{PEFT_PREFIX}{module}.lora_{ab}.weight"),
    }
}

/// The base weight of `l` (out, in): the model's, or where that is a placeholder (one element
/// broadcast: an FSDP skeleton) read from `base` in `dtype`, the dtype the model loads it in.
fn base_weight(
    l: &super::lora::Linear,
    base: Option<(&WeightSource, KeyLayout)>,
    dtype: Kind,
) -> Result<Tensor, ModelError> {
    if !is_placeholder(&l.weight) {
        return Ok(l.weight.shallow_clone());
    }
    let (src, layout) = base.ok_or_else(|| {
        ModelError::Adapter(format!(
            "{}: the model holds no weights (a skeleton) and no weight source was given",
            l.path
        ))
    })?;
    src.get(&layout.file_name(&format!("{}.weight", l.path)), dtype)
}

/// Errors about an adapter's config named by its folder (`DIR/adapter_config.json: ...`).
fn in_folder(dir: &Path) -> impl Fn(ModelError) -> ModelError + '_ {
    move |e| match e {
        ModelError::Adapter(m) => ModelError::Adapter(format!(
            "{}{}",
            dir.display(),
            m.strip_prefix("adapter_config.json").map_or_else(
                || format!(": {m}"),
                |rest| format!("/adapter_config.json{rest}")
            )
        )),
        e => e,
    }
}

/// An adapter folder's settings and its `adapter_config.json` as written; errors name the file,
/// and say where the adapter is when the folder holds one only in a subfolder (peft saves an
/// adapter not named `default` under its name).
pub fn read_adapter_config(dir: &Path) -> Result<(AdapterConfig, Value), ModelError> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        let mut inside: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("adapter_config.json").is_file())
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        inside.sort();
        // (a run's checkpoint.dir: its complete step-N folders, oldest first)
        let steps = crate::checkpoint::list_dir(dir).map_or(vec![], |(complete, _)| complete);
        // (another failure to read it, permission denied, is said as it is)
        let missing = e.kind() == std::io::ErrorKind::NotFound;
        match inside.is_empty() && missing {
            true if !steps.is_empty() => ModelError::Adapter(format!(
                "{} holds training checkpoints (step-N folders), not a PEFT adapter: infer, eval \
                 and export take one of them with --checkpoint, e.g. the newest: --checkpoint {}",
                dir.display(),
                steps[steps.len() - 1].1.display()
            )),
            true if dir.join("manifest.json").is_file() => ModelError::Adapter(format!(
                "{} is a training checkpoint (a step-N folder), not a PEFT adapter: infer, eval \
                 and export take it with --checkpoint (a training run continues it with \
                 checkpoint.resume); `trainer export --checkpoint {} --format peft --out DIR` \
                 writes an adapter from it",
                dir.display(),
                dir.display()
            )),
            true if dir.join("config.json").is_file() => ModelError::Adapter(format!(
                "{} is a model folder (config.json), not a PEFT adapter: give it with --model (a \
                 merged export is one too), and an adapter trained on it with --adapter",
                dir.display()
            )),
            true => ModelError::io(&cfg_path, e),
            false if !missing => ModelError::io(&cfg_path, e),
            false => ModelError::Adapter(format!(
                "{}: no adapter_config.json, but its subfolders hold adapters (peft saves an \
                 adapter under its name): pass one of {}",
                dir.display(),
                inside.join(", ")
            )),
        }
    })?;
    let config = AdapterConfig::parse(&text).map_err(in_folder(dir))?;
    let v: Value = serde_json::from_str(&text).expect("parsed above");
    Ok((config, v))
}

/// `read_adapter_config`, the layers the adapter wraps (`AdapterConfig::layout`, in the naming
/// its tensors use) and its weights file; the pickle format of older peft versions is named with
/// the way to convert it.
fn open_adapter(
    dir: &Path,
) -> Result<(AdapterConfig, AdapterLayout, Value, WeightSource), ModelError> {
    let (config, v) = read_adapter_config(dir)?;
    let unknown: Vec<&String> = v
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !super::adapter_config::KNOWN_KEYS.contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if !unknown.is_empty() {
        tracing::warn!(
            "{}: unknown keys {unknown:?} ignored (not options of peft 0.21's LoraConfig: a typo, \
             or a newer peft's option; if one changes what the adapter computes, results differ \
             from peft's)",
            dir.join("adapter_config.json").display()
        );
    }
    let weights = dir.join("adapter_model.safetensors");
    let pickle = dir.join("adapter_model.bin");
    if !weights.exists() && pickle.exists() {
        return Err(ModelError::Adapter(format!(
            "{}: the adapter's weights are in adapter_model.bin, the pickle format of older peft, \
             which is not read here; convert it: python -c \"import torch; from \
             safetensors.torch import save_file; save_file(torch.load('{}', map_location='cpu'), \
             '{}')\"",
            dir.display(),
            pickle.display(),
            weights.display()
        )));
    }
    let src = WeightSource::open_files(&[weights])?;
    // transformers-4 naming (`language_model.model.layers...`) changes under legacy_to_canonical
    let legacy = src.names_and_shapes().any(|(name, _)| {
        name.strip_prefix(PEFT_PREFIX)
            .is_some_and(|rest| legacy_to_canonical(rest) != rest)
    });
    let layout = config.layout(legacy).map_err(in_folder(dir))?;
    Ok((config, layout, v, src))
}

/// The base model folder of an adapter: `model` when given, else its `base_model_name_or_path`
/// when that is a model folder here (relative to the working directory, as transformers reads
/// it), as peft's `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds its base.
pub fn base_folder(dir: &Path, model: Option<&Path>) -> Result<std::path::PathBuf, ModelError> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let (_, raw) = read_adapter_config(dir)?;
    // (peft writes "" for a model built from a config)
    match raw
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .filter(|b| !b.is_empty())
    {
        Some(b) if Path::new(b).join("config.json").is_file() => Ok(b.into()),
        Some(b) => Err(ModelError::Adapter(format!(
            "{}: its base_model_name_or_path {b:?} is not a model folder here (a Hub id is not \
             downloaded); pass the base model folder with --model DIR",
            dir.display()
        ))),
        None => Err(ModelError::Adapter(format!(
            "{}: adapter_config.json names no base_model_name_or_path; pass the base model \
             folder with --model DIR",
            dir.display()
        ))),
    }
}

/// A PEFT adapter folder read without a model (to merge it into weight files): its settings,
/// its `base_model_name_or_path`, and its factors in fp32 by key in this model's naming
/// (`base_model.model.<canonical module path>.lora_{A,B}.weight`), whichever naming the file
/// uses. A tensor that is not a LoRA factor of a module `target_modules` chooses is an error.
pub fn read_adapter(dir: &Path) -> Result<ReadAdapter, ModelError> {
    let (config, layout, raw, src) = open_adapter(dir)?;
    let (mut factors, mut problems) = (BTreeMap::new(), vec![]);
    for (name, _) in src.names_and_shapes() {
        match parse_adapter_key(name) {
            Some((param, "P")) if !layout.saves(&param) => problems.push(format!(
                "{name}: not a LoRA factor, nor a parameter of a module in modules_to_save {:?}",
                config.modules_to_save
            )),
            Some((module, ab)) if ab != "P" && !layout.wraps(&module) => problems.push(format!(
                "{name}: module {module} is not one the adapter config chooses (target_modules \
                 {}{})",
                config.lora.target_modules,
                chosen_by(&config)
            )),
            Some((_, "M")) if !config.use_dora => {
                problems.push(format!("{name}: a DoRA magnitude, but use_dora is false"))
            }
            Some((module, which)) => {
                let t = src.get(name, Kind::Float)?;
                factors.insert(adapter_key(&module, which), t);
            }
            None => problems.push(format!("{name}: not a LoRA factor")),
        }
    }
    if !problems.is_empty() {
        return Err(ModelError::Adapter(format!(
            "{}: adapter_model.safetensors does not fit its adapter_config.json ({} problems):\n  {}",
            dir.display(),
            problems.len(),
            problems.join("\n  ")
        )));
    }
    if factors.is_empty() {
        return Err(ModelError::Adapter(format!(
            "{}: adapter_model.safetensors holds no LoRA factors",
            dir.display()
        )));
    }
    let base_model = raw
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    Ok(ReadAdapter {
        config,
        layout,
        base_model,
        factors,
    })
}

/// The options besides target_modules that choose an adapter's layers, for error messages.
fn chosen_by(config: &AdapterConfig) -> String {
    let keys: Vec<&str> = config
        .extras()
        .into_iter()
        .filter(|k| matches!(*k, "exclude_modules" | "layers_to_transform"))
        .collect();
    match keys[..] {
        [] => String::new(),
        _ => format!(", with {}", keys.join(" and ")),
    }
}

/// An adapter folder's settings and the layers it wraps (each one's rank and scaling), as peft
/// reads its config in the naming its tensors use; only the weights file's header is read.
pub fn adapter_layout(dir: &Path) -> Result<(AdapterConfig, AdapterLayout), ModelError> {
    let (config, layout, _, _) = open_adapter(dir)?;
    Ok((config, layout))
}

/// What [`read_adapter`] read.
pub struct ReadAdapter {
    pub config: AdapterConfig,
    /// Which modules it wraps, each one's rank and scaling.
    pub layout: AdapterLayout,
    /// `base_model_name_or_path` (a folder or a Hub id).
    pub base_model: Option<String>,
    /// fp32 factors (and DoRA magnitudes) by key in this model's naming: `base_model.model.<module
    /// path>.lora_{A,B}.weight`, `.lora_magnitude_vector`.
    pub factors: BTreeMap<String, Tensor>,
}

/// The parameters of modules to save that an adapter holds for an FSDP skeleton: their values
/// stay in the adapter's file (the model's parameters stay placeholders) and FSDP reads each
/// rank's slice from it, so no rank holds a whole one (an lm_head is 1-2 GB). `keys`: model
/// parameter name -> the adapter's key.
pub struct SavedInAdapter {
    pub src: WeightSource,
    pub keys: BTreeMap<String, String>,
}

impl std::fmt::Debug for SavedInAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedInAdapter")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Where an FSDP skeleton's fresh DoRA magnitudes come from: the base weights in `src`, of
/// which this rank reads every `world`-th wrapped layer's, from the `rank`-th on in module order
/// (reading them all on every rank would read the whole model per rank with every linear layer
/// wrapped). The others start at zero until [`MllamaModel::sum_dora_magnitudes`] adds up the
/// ranks' magnitudes.
#[derive(Clone, Copy)]
pub struct DoraBase<'a> {
    pub src: &'a WeightSource,
    pub rank: usize,
    pub world: usize,
}

impl MllamaModel {
    /// After `apply_adapter` with a [`DoraBase`] share on every rank: each DoRA magnitude becomes
    /// the sum over the ranks (`sum`, an all-reduce of the tensor it is given, on `device`), so
    /// every rank holds every magnitude, exactly (one rank's norms plus zeros). Nothing to do
    /// without DoRA.
    pub fn sum_dora_magnitudes<E>(
        &mut self,
        device: tch::Device,
        sum: impl FnOnce(&Tensor) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut magnitudes = vec![];
        self.visit_linears(&mut |l| {
            if let Some(m) = l.lora.as_ref().and_then(|br| br.magnitude.as_ref()) {
                magnitudes.push(m.shallow_clone());
            }
        });
        if magnitudes.is_empty() {
            return Ok(());
        }
        let flat = Tensor::cat(&magnitudes, 0).to_device(device); // (sum of out,)
        sum(&flat)?;
        let mut offset = 0;
        tch::no_grad(|| {
            for m in &mut magnitudes {
                let n = m.size()[0];
                m.copy_(&flat.narrow(0, offset, n));
                offset += n;
            }
        });
        Ok(())
    }

    /// Wraps every linear layer whose module path matches `cfg.target_modules` with a fresh LoRA branch (PEFT init,
    /// A drawn from a SplitMix64 of `seed`). Returns the number of wrapped layers.
    pub fn apply_lora(&mut self, cfg: &LoraConfig, seed: i64) -> Result<usize, ModelError> {
        self.apply_adapter(&AdapterConfig::plain(cfg.clone()), seed, None)
    }

    /// Wraps the linear layers a run's adapter settings choose (`AdapterConfig::training_layout`:
    /// target_modules less exclude_modules, on layers_to_transform, outside modules to save) with
    /// fresh LoRA branches of their rank and scaling (rank_pattern, alpha_pattern), PEFT init, A
    /// drawn in module order from a SplitMix64 of `seed`; with `use_dora`, each with PEFT's
    /// initial magnitude, the row norms of its base weight (read from `base` where the model
    /// holds placeholders: an FSDP skeleton, whose ranks each read a share of them, see
    /// [`DoraBase`]). The parameters of modules_to_save train in full (`saved_params`). Returns
    /// the number of wrapped layers.
    pub fn apply_adapter(
        &mut self,
        cfg: &AdapterConfig,
        seed: i64,
        base: Option<DoraBase>,
    ) -> Result<usize, ModelError> {
        let layout = cfg.training_layout()?;
        let saved = self.saved_by(cfg, &layout)?;
        // its own SplitMix64, not libtorch's global generator: another thread drawing at the same
        // time (tests, a program wrapping two models) cannot shift the values
        let mut rng = SplitMix64::new(seed as u64);
        let kind = self.lora_kind;
        let mut branches = vec![];
        let (mut overlaps, mut problems, mut lora_saved) = (vec![], vec![], None);
        let dtype = self.options.dtype;
        let names = base.map(|b| KeyLayout::detect(b.src.names_and_shapes().map(|(n, _)| n)));
        self.visit_linears(&mut |l| {
            if !layout.wraps(&l.path) {
                return;
            }
            // (peft refuses a module to save that is itself a LoRA layer: a name matching the
            // end of its path, not a whole part of it, saves it and leaves it to target_modules)
            if lora_saved.is_none() && layout.saves(&format!("{}.weight", l.path)) {
                lora_saved = Some(l.path.clone());
            }
            if let Some(o) = layout.overlap(&l.path) {
                overlaps.push(o);
            }
            let (r, scaling) = (layout.rank(&l.path), layout.scaling(&l.path));
            let mut br = LoraBranch::init(l, r, scaling, cfg.lora.dropout, kind, &mut rng);
            match base {
                _ if !cfg.use_dora => {}
                // another rank reads this one's base weight (`sum_dora_magnitudes` adds it in)
                Some(b) if branches.len() % b.world != b.rank => br.init_dora_elsewhere(),
                _ => match base_weight(l, base.map(|b| b.src).zip(names), dtype) {
                    Ok(w) => br.init_dora(&w),
                    Err(e) => problems.push(e.to_string()),
                },
            }
            branches.push((l.path.clone(), br));
        });
        if let Some(path) = lora_saved {
            return Err(ModelError::Adapter(format!(
                "modules_to_save {:?} saves {path}, which target_modules also gives LoRA: peft \
                 refuses that (\"modules_to_save cannot be applied to modules of type \
                 lora.layer.Linear\"); name the module to save by whole path parts (a name that \
                 ends at a `.` keeps LoRA out of it), or leave it out of target_modules",
                cfg.modules_to_save
            )));
        }
        if let Some(first) = problems.first() {
            return Err(ModelError::Adapter(format!(
                "use_dora: reading the base weights for DoRA's magnitudes: {first}"
            )));
        }
        if let Some(first) = overlaps.first() {
            return Err(ModelError::Adapter(format!(
                "{first}{}: patterns that give a module different values must not overlap \
                 (peft takes the first in order, which a checkpoint does not record); narrow the \
                 keys",
                match overlaps.len() {
                    1 => String::new(),
                    n => format!(" (and {} more modules)", n - 1),
                }
            )));
        }
        let n = branches.len();
        if n == 0 {
            let narrowing: Vec<&str> = (cfg.extras().into_iter())
                .filter(|e| {
                    ["exclude_modules", "layers_to_transform", "modules_to_save"].contains(e)
                })
                .collect();
            let narrowed = match narrowing.is_empty() {
                true => String::new(),
                false => format!(", narrowed by {}", narrowing.join(" and ")),
            };
            return Err(ModelError::Adapter(format!(
                "target_modules {}{narrowed} match no linear layer (listed names match a module \
                 path or its last parts, like q_proj; a string is a regular expression matched \
                 against whole paths like model.language_model.layers.0.self_attn.q_proj)",
                cfg.lora.target_modules
            )));
        }
        let mut branches = branches.into_iter();
        self.visit_linears(&mut |l| {
            if layout.wraps(&l.path) {
                l.lora = branches.next().map(|(_, br)| br);
            }
        });
        self.lora = Some(cfg.lora.clone());
        self.saved_modules = layout.saved_modules(&saved);
        self.saved_params = saved;
        self.set_lora_requires_grad(true);
        Ok(n)
    }

    /// The base parameters of the modules `cfg.modules_to_save` names (a module whose path ends
    /// with the name, as peft's `_set_trainable`); a name that matches no module is an error.
    pub(crate) fn saved_by(
        &self,
        cfg: &AdapterConfig,
        layout: &AdapterLayout,
    ) -> Result<Vec<String>, ModelError> {
        let mut saved = vec![];
        self.visit_params(&mut |name, _| {
            if layout.saves(name) {
                saved.push(name.to_string());
            }
        });
        let one = AdapterConfig::plain(cfg.lora.clone());
        for m in &cfg.modules_to_save {
            let layout = AdapterConfig {
                modules_to_save: vec![m.clone()],
                ..one.clone()
            }
            .training_layout()?;
            if !saved.iter().any(|n| layout.saves(n)) {
                let tied = m == "lm_head" && self.lm_head_tied;
                return Err(ModelError::Adapter(format!(
                    "modules_to_save {m:?}: {}",
                    match tied {
                        true => "lm_head shares its weight with embed_tokens here \
                                 (tie_word_embeddings): save embed_tokens"
                            .to_string(),
                        false => "no module of this model has a path that ends with it (names \
                                  like multi_modal_projector, lm_head)"
                            .to_string(),
                    }
                )));
            }
        }
        Ok(saved)
    }

    fn set_lora_requires_grad(&mut self, on: bool) {
        self.visit_linears(&mut |l| {
            if let Some(br) = &mut l.lora {
                br.a = br.a.detach().set_requires_grad(on);
                br.b = br.b.detach().set_requires_grad(on);
                br.magnitude = br
                    .magnitude
                    .as_ref()
                    .map(|m| m.detach().set_requires_grad(on));
            }
        });
    }

    /// The dtype LoRA factors have: `set_lora_kind`'s, else the model's.
    pub fn lora_kind(&self) -> Kind {
        self.lora_kind.unwrap_or(self.options.dtype)
    }

    /// LoRA factors in `kind` from now on (those present converted, those applied or loaded later
    /// made so): inference keeps them in fp32 over a bf16 model, as PEFT's `from_pretrained` does
    /// (autocast_adapter_dtype), and `Linear::forward` then computes the branch in fp32. Training
    /// leaves them in the model's dtype (FSDP keeps fp32 masters of them).
    pub fn set_lora_kind(&mut self, kind: Kind) {
        self.lora_kind = Some(kind);
        self.visit_linears(&mut |l| {
            if let Some(br) = &mut l.lora {
                br.a = br.a.detach().to_kind(kind);
                br.b = br.b.detach().to_kind(kind);
                br.magnitude = br.magnitude.as_ref().map(|m| m.detach().to_kind(kind));
                br.dora_scale = br.dora_scale.as_ref().map(|g| g.to_kind(kind));
            }
        });
    }

    /// Computes each DoRA branch's g once (`LoraBranch::fix_dora`), for weights that no longer
    /// change (inference): a forward then does not recompute the norm of W + scaling B A.
    pub fn fix_dora(&mut self) {
        self.visit_linears(&mut |l| {
            if let Some(br) = &mut l.lora {
                if br.magnitude.is_some() {
                    br.fix_dora(&l.weight);
                }
            }
        });
    }

    /// Training mode switches LoRA dropout on.
    pub fn set_training(&mut self, training: bool) {
        self.visit_linears(&mut |l| {
            if let Some(br) = &mut l.lora {
                br.training = training;
            }
        });
    }

    /// Loads a PEFT adapter folder onto the model (either naming), its factors in `lora_kind()`,
    /// on the layers and with the ranks, scalings and DoRA magnitudes its config gives
    /// (`AdapterConfig`). Every wrapped layer must have its tensors with the right shapes, and
    /// every adapter tensor must belong to a wrapped layer; all problems in one error.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<AdapterConfig, ModelError> {
        let (cfg, layout, _, src) = open_adapter(dir)?;
        let mut tensors: BTreeMap<(String, &'static str), String> = BTreeMap::new();
        let mut problems = vec![];
        for (name, _) in src.names_and_shapes() {
            match parse_adapter_key(name) {
                Some(k) => {
                    tensors.insert(k, name.to_string());
                }
                None => problems.push(format!("unexpected {name}: not a LoRA factor")),
            }
        }
        let (kind, device) = (self.lora_kind(), self.options.device);
        let mut used = BTreeSet::new();
        // (attached only once everything fits: an error leaves the model as it was)
        let mut branches = std::collections::HashMap::new();
        self.visit_linears(&mut |l| {
            if !layout.wraps(&l.path) {
                return;
            }
            let r = layout.rank(&l.path);
            let mut wanted = vec![
                ("A", vec![r, l.in_features()]),
                ("B", vec![l.out_features(), r]),
            ];
            if cfg.use_dora {
                wanted.push(("M", vec![l.out_features()]));
            }
            let mut found = vec![];
            for (which, shape) in wanted {
                match tensors.get(&(l.path.clone(), which)) {
                    None => problems.push(format!(
                        "missing    {}: expected {shape:?}",
                        adapter_key(&l.path, which)
                    )),
                    Some(file) => {
                        used.insert(file.clone());
                        let got = src.entry(file).map(|e| e.shape.clone()).unwrap_or_default();
                        if got != shape {
                            problems.push(format!(
                                "mis-shaped {file}: expected {shape:?}, found {got:?}"
                            ));
                        } else {
                            match src.get(file, kind) {
                                Ok(t) => found.push(t.to_device(device)),
                                Err(e) => problems.push(e.to_string()),
                            }
                        }
                    }
                }
            }
            if let [a, b, dora @ ..] = &found[..] {
                let mut br = LoraBranch::new(
                    a.shallow_clone(),
                    b.shallow_clone(),
                    layout.scaling(&l.path),
                    cfg.lora.dropout,
                );
                match dora {
                    // (g is computed in each forward, or once by `fix_dora`: under FSDP the
                    // weight here may be a placeholder)
                    [m] => br.magnitude = Some(m.shallow_clone()),
                    [] if !cfg.use_dora => {}
                    _ => return,
                }
                branches.insert(l.path.clone(), br);
            }
        });
        // modules_to_save: their parameters replace the model's, in its dtype (peft loads them into
        // its copy of the module); applied only once everything fits
        let (mut saved, mut saved_keys) = (vec![], BTreeMap::new());
        let mut model_params = vec![];
        self.visit_params(&mut |name, t| {
            if layout.saves(name) {
                model_params.push((name.to_string(), t.shallow_clone()));
            }
        });
        let saved_names: Vec<String> = model_params.iter().map(|(n, _)| n.clone()).collect();
        for (name, p) in model_params {
            match tensors.get(&(name.clone(), "P")) {
                None => problems.push(format!(
                    "missing    {PEFT_PREFIX}{name}: expected {:?} (a parameter of a module in \
                     modules_to_save {:?})",
                    p.size(),
                    cfg.modules_to_save
                )),
                Some(file) => {
                    used.insert(file.clone());
                    let got = src.entry(file).map(|e| e.shape.clone()).unwrap_or_default();
                    if got != p.size() {
                        problems.push(format!(
                            "mis-shaped {file}: expected {:?}, found {got:?}",
                            p.size()
                        ));
                    } else if is_placeholder(&p) {
                        // an FSDP skeleton's: FSDP reads its slices from the adapter
                        saved_keys.insert(name, file.clone());
                    } else {
                        match src.get(file, p.kind()) {
                            Ok(t) => saved.push((p, t)),
                            Err(e) => problems.push(e.to_string()),
                        }
                    }
                }
            }
        }
        for ((_, which), file) in &tensors {
            if !used.contains(file) {
                problems.push(match *which {
                    "M" if !cfg.use_dora => {
                        format!("unexpected {file}: a DoRA magnitude, but use_dora is false")
                    }
                    "P" => format!(
                        "unexpected {file}: not a LoRA factor, nor a parameter of this model in a \
                         module of modules_to_save {:?}",
                        cfg.modules_to_save
                    ),
                    _ => format!(
                        "unexpected {file}: no linear layer the adapter config chooses has that \
                         name (target_modules {}{})",
                        cfg.lora.target_modules,
                        chosen_by(&cfg)
                    ),
                });
            }
        }
        if !problems.is_empty() || branches.len() + saved.len() + saved_keys.len() == 0 {
            // (an adapter of a deeper model names layers this one lacks: say how deep this is)
            let layers = match problems.iter().any(|p| p.starts_with("unexpected")) {
                true => format!(
                    "\n  (this model has {} text layers and {} + {} vision layers: an adapter trained on another model names layers or modules it lacks)",
                    self.config.text.num_hidden_layers,
                    self.config.vision.num_hidden_layers,
                    self.config.vision.num_global_layers
                ),
                false => String::new(),
            };
            return Err(ModelError::Adapter(format!(
                "{} does not match the model ({} problems):\n  {}{layers}",
                dir.display(),
                problems.len(),
                problems.join("\n  ")
            )));
        }
        tch::no_grad(|| {
            saved.iter().try_for_each(|(p, t)| {
                let t = t.to_device(p.device());
                p.shallow_clone().f_copy_(&t).map(|_| ())
            })
        })?;
        self.visit_linears(&mut |l| {
            if let Some(br) = branches.remove(&l.path) {
                l.lora = Some(br);
            }
        });
        self.lora = Some(cfg.lora.clone());
        self.saved_modules = layout.saved_modules(&saved_names);
        self.saved_params = saved_names;
        self.saved_in_adapter = (!saved_keys.is_empty()).then(|| SavedInAdapter {
            src,
            keys: saved_keys,
        });
        self.set_lora_requires_grad(true);
        Ok(cfg)
    }

    /// LoRA factors (and DoRA magnitudes) as (PEFT key, tensor) in module order, then the
    /// parameters of modules to save by name: the trainable parameters. The tensors share
    /// storage with the model (an optimizer updating them in place updates the model).
    pub fn trainable_parameters(&mut self) -> Vec<(String, Tensor)> {
        let mut v = vec![];
        self.visit_linears(&mut |l| {
            if let Some(br) = &l.lora {
                v.push((
                    format!("{PEFT_PREFIX}{}.lora_A.weight", l.path),
                    br.a.shallow_clone(),
                ));
                v.push((
                    format!("{PEFT_PREFIX}{}.lora_B.weight", l.path),
                    br.b.shallow_clone(),
                ));
                if let Some(m) = &br.magnitude {
                    v.push((adapter_key(&l.path, "M"), m.shallow_clone()));
                }
            }
        });
        // the parameters of modules to save, by their own names
        self.visit_params(&mut |name, t| {
            if self.saved_params.iter().any(|s| s == name) {
                v.push((name.to_string(), t.shallow_clone()));
            }
        });
        v
    }

    /// Writes a PEFT adapter folder (fp32 factors unless the model dtype is wider) with the naming current peft
    /// writes (`base_model.model.model.language_model.layers...`).
    pub fn save_adapter(
        &mut self,
        dir: &Path,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), ModelError> {
        let cfg = self
            .lora
            .clone()
            .ok_or_else(|| ModelError::Adapter("no LoRA on the model to save".into()))?;
        // one r and lora_alpha in the file: per-layer ranks, scalings or DoRA (an adapter loaded
        // with them) would be written as something else
        let mut varied = None;
        self.visit_linears(&mut |l| {
            if let Some(br) = &l.lora {
                let plain = br.magnitude.is_none()
                    && br.a.size()[0] == cfg.r
                    && br.scaling == cfg.scaling();
                if !plain && varied.is_none() {
                    varied = Some(l.path.clone());
                }
            }
        });
        if let Some(path) = varied {
            return Err(ModelError::Adapter(format!(
                "{path}: its LoRA has a rank, scaling or DoRA magnitude other than r {} and \
                 lora_alpha {} (loaded from an adapter with rank_pattern, alpha_pattern or \
                 use_dora); it cannot be saved as a plain LoRA adapter",
                cfg.r, cfg.alpha
            )));
        }
        // modules trained in full are written by a checkpoint's `export --format peft`, with
        // PEFT's names and modules_to_save; here they would be unnamed and unlisted
        if !self.saved_params.is_empty() {
            return Err(ModelError::Adapter(format!(
                "the model trains modules in full (modules_to_save {:?}): save it through a \
                 checkpoint and `trainer export --format peft`",
                self.saved_modules
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .trainable_parameters()
            .into_iter()
            .map(|(n, t)| {
                (
                    n,
                    t.detach()
                        .to_kind(Kind::Float)
                        .to_device(tch::Device::Cpu)
                        .contiguous(),
                )
            })
            .collect();
        let target = match &cfg.target_modules {
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
        };
        let config = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": cfg.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": target,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": cfg.use_rslora,
        });
        let p = dir.join("adapter_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&config).expect("json"))
            .map_err(|e| ModelError::io(&p, e))?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }

    /// Merges every LoRA branch into its base weight (W += scaling * B A) and removes the branches.
    pub fn merge_lora(&mut self) {
        self.visit_linears(&mut |l| l.merge_lora());
        self.lora = None;
    }
}
