//! LoRA on the model with PEFT semantics and PEFT adapter folders (`adapter_config.json` +
//! `adapter_model.safetensors`, keys `base_model.model.<module path>.lora_{A,B}.weight`).
//! Reads transformers-4 (`base_model.model.language_model.model.layers...`) and transformers-5
//! (`base_model.model.model.language_model.layers...`) naming; writes the transformers-5 naming current peft writes.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::lora::{LoraConfig, TargetModules};
use super::weights::{legacy_to_canonical, WeightSource};
use super::{MllamaModel, ModelError};
use crate::rng::SplitMix64;

const PEFT_PREFIX: &str = "base_model.model.";

/// Module path of an adapter key in either naming, and which factor: ("model.language_model.layers.0.self_attn.q_proj", "A").
fn parse_adapter_key(key: &str) -> Option<(String, &'static str)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, "A")
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, "B")
    } else {
        return None;
    };
    Some((legacy_to_canonical(module), ab))
}

fn parse_config(v: &Value) -> Result<LoraConfig, ModelError> {
    let bad = |m: String| ModelError::Adapter(format!("adapter_config.json: {m}"));
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(bad(format!("peft_type {t} is not supported (only LORA)")));
        }
    }
    // present keys of the wrong type are errors, not defaults (a quoted "32" must not become 8)
    let typed = |key: &str, want: &str, ok: fn(&Value) -> bool| match v.get(key) {
        Some(x) if !x.is_null() && !ok(x) => Err(bad(format!("`{key}` must be {want}, not {x}"))),
        x => Ok(x.filter(|x| !x.is_null())),
    };
    let r = typed("r", "a positive integer", |x| {
        x.as_i64().is_some_and(|r| r >= 1)
    })?
    .and_then(Value::as_i64)
    .ok_or_else(|| bad("missing `r`".into()))?;
    let alpha = typed("lora_alpha", "a number", Value::is_number)?
        .and_then(Value::as_f64)
        .unwrap_or(8.0);
    let dropout = typed("lora_dropout", "a number in [0, 1)", |x| {
        x.as_f64().is_some_and(|d| (0.0..1.0).contains(&d))
    })?
    .and_then(Value::as_f64)
    .unwrap_or(0.0);
    let target_modules = match v.get("target_modules") {
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .map(|x| {
                    x.as_str().map(String::from).ok_or_else(|| {
                        bad(format!("`target_modules` entries must be strings, not {x}"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(bad("missing `target_modules`".into())),
    };
    if v.get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return Err(bad("only bias=\"none\" is supported".into()));
    }
    // PEFT settings that change which layers carry LoRA or what it computes: loading such an
    // adapter as plain LoRA would be wrong (aLoRA applies only after its invocation tokens) or
    // fail with a list of missing keys that does not say why
    const UNSUPPORTED: [(&str, &str); 16] = [
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("use_dora", "DoRA"),
        ("modules_to_save", "fully trained modules besides LoRA"),
        ("layers_to_transform", "LoRA on some layers only"),
        ("layers_pattern", "LoRA on some layers only"),
        ("exclude_modules", "modules left out of target_modules"),
        ("lora_bias", "a bias in lora_B"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
        ("trainable_token_indices", "trained token embeddings"),
        ("layer_replication", "replicated layers"),
        ("target_parameters", "LoRA on parameters, not modules"),
        (
            "alora_invocation_tokens",
            "activated LoRA (applied after its invocation tokens)",
        ),
        ("arrow_config", "Arrow routing between LoRA experts"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QA-LoRA (pooled inputs to lora_A)"),
    ];
    for (key, what) in UNSUPPORTED {
        let set = match v.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(format!(
                "`{key}` ({what}) is not supported: only plain LoRA on whole modules loads"
            )));
        }
    }
    let use_rslora = typed("use_rslora", "true or false", Value::is_boolean)?
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora,
    })
}

/// An adapter folder's settings, and its `adapter_config.json` as written.
fn read_config(dir: &Path) -> Result<(LoraConfig, Value), ModelError> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Adapter(format!("{}: {e}", cfg_path.display())))?;
    Ok((parse_config(&v)?, v))
}

/// A PEFT adapter folder read without a model (to merge it into weight files): its settings,
/// its `base_model_name_or_path`, and its factors in fp32 by key in this model's naming
/// (`base_model.model.<canonical module path>.lora_{A,B}.weight`), whichever naming the file
/// uses. A tensor that is not a LoRA factor of a module `target_modules` chooses is an error.
pub fn read_adapter(dir: &Path) -> Result<ReadAdapter, ModelError> {
    let (config, raw) = read_config(dir)?;
    let src = WeightSource::open_files(&[dir.join("adapter_model.safetensors")])?;
    let matcher = config.target_modules.canonical().compile()?;
    let (mut factors, mut problems) = (BTreeMap::new(), vec![]);
    for (name, _) in src.names_and_shapes() {
        match parse_adapter_key(name) {
            Some((module, _)) if !matcher.matches(&module) => problems.push(format!(
                "{name}: module {module} is not one target_modules {:?} chooses",
                config.target_modules
            )),
            Some((module, ab)) => {
                let t = src.get(name, Kind::Float)?;
                factors.insert(format!("{PEFT_PREFIX}{module}.lora_{ab}.weight"), t);
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
        base_model,
        factors,
    })
}

/// What [`read_adapter`] read.
pub struct ReadAdapter {
    pub config: LoraConfig,
    /// `base_model_name_or_path` (a folder or a Hub id).
    pub base_model: Option<String>,
    /// fp32 factors by key in this model's naming.
    pub factors: BTreeMap<String, Tensor>,
}

impl MllamaModel {
    /// Wraps every linear layer whose module path matches `cfg.target_modules` with a fresh LoRA branch (PEFT init,
    /// A drawn from a SplitMix64 of `seed`). Returns the number of wrapped layers.
    pub fn apply_lora(&mut self, cfg: &LoraConfig, seed: i64) -> Result<usize, ModelError> {
        // its own SplitMix64, not libtorch's global generator: another thread drawing at the same
        // time (tests, a program wrapping two models) cannot shift the values
        let mut rng = SplitMix64::new(seed as u64);
        let kind = self.lora_kind;
        let matcher = cfg.target_modules.compile()?;
        let mut n = 0;
        self.visit_linears(&mut |l| {
            if matcher.matches(&l.path) {
                let br = cfg.new_branch(l, kind, &mut rng);
                l.lora = Some(br);
                n += 1;
            }
        });
        if n == 0 {
            return Err(ModelError::Adapter(format!(
                "target_modules {:?} match no linear layer (listed names match a module path or \
                 its last parts, like q_proj; a string is a regular expression matched against \
                 whole paths like model.language_model.layers.0.self_attn.q_proj)",
                cfg.target_modules
            )));
        }
        self.lora = Some(cfg.clone());
        self.set_lora_requires_grad(true);
        Ok(n)
    }

    fn set_lora_requires_grad(&mut self, on: bool) {
        self.visit_linears(&mut |l| {
            if let Some(br) = &mut l.lora {
                br.a = br.a.detach().set_requires_grad(on);
                br.b = br.b.detach().set_requires_grad(on);
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

    /// Loads a PEFT adapter folder onto the model (either naming), its factors in `lora_kind()`.
    /// Every targeted layer must have both factors with the right shapes, and every adapter tensor
    /// must belong to a targeted layer; all problems in one error.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig, ModelError> {
        let (cfg, _) = read_config(dir)?;
        let src = WeightSource::open_files(&[dir.join("adapter_model.safetensors")])?;
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
        // (an adapter saved with transformers-4 names: its full module paths read as this model's)
        let matcher = cfg.target_modules.canonical().compile()?;
        let (kind, device) = (self.lora_kind(), self.options.device);
        let mut used = BTreeSet::new();
        let mut n = 0;
        self.visit_linears(&mut |l| {
            if !matcher.matches(&l.path) {
                return;
            }
            let mut ab = vec![];
            for (which, shape) in [
                ("A", [cfg.r, l.in_features()]),
                ("B", [l.out_features(), cfg.r]),
            ] {
                match tensors.get(&(l.path.clone(), which)) {
                    None => problems.push(format!(
                        "missing    {PEFT_PREFIX}{}.lora_{which}.weight: expected {shape:?}",
                        l.path
                    )),
                    Some(file) => {
                        used.insert(file.clone());
                        let found = src.entry(file).map(|e| e.shape.clone()).unwrap_or_default();
                        if found != shape {
                            problems.push(format!(
                                "mis-shaped {file}: expected {shape:?}, found {found:?}"
                            ));
                        } else {
                            match src.get(file, kind) {
                                Ok(t) => ab.push(t.to_device(device)),
                                Err(e) => problems.push(e.to_string()),
                            }
                        }
                    }
                }
            }
            if let [a, b] = &ab[..] {
                l.lora = Some(cfg.branch(a.shallow_clone(), b.shallow_clone()));
                n += 1;
            }
        });
        for file in tensors.values() {
            if !used.contains(file) {
                problems.push(format!(
                    "unexpected {file}: no targeted linear layer of that name"
                ));
            }
        }
        if !problems.is_empty() || n == 0 {
            return Err(ModelError::Adapter(format!(
                "{} does not match the model ({} problems):\n  {}",
                dir.display(),
                problems.len(),
                problems.join("\n  ")
            )));
        }
        self.lora = Some(cfg.clone());
        self.set_lora_requires_grad(true);
        Ok(cfg)
    }

    /// LoRA factors as (PEFT key, tensor) in module order: the trainable parameters. The tensors share storage with
    /// the model (an optimizer updating them in place updates the model).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_configs_with_wrong_types_are_errors_not_defaults() {
        let base = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 32,
            "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": false});
        let c = parse_config(&base).unwrap();
        assert_eq!((c.r, c.alpha, c.use_rslora), (8, 32.0, false));
        let with = |key: &str, value: Value| {
            let mut v = base.clone();
            v[key] = value;
            parse_config(&v).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(
            with("lora_alpha", Value::Null).is_ok(),
            "null = PEFT's default"
        );
        for (key, value, says) in [
            (
                "lora_alpha",
                serde_json::json!("32"),
                "`lora_alpha` must be a number",
            ),
            ("r", serde_json::json!(0), "`r` must be a positive integer"),
            (
                "r",
                serde_json::json!(8.5),
                "`r` must be a positive integer",
            ),
            (
                "use_rslora",
                serde_json::json!("true"),
                "`use_rslora` must be true or false",
            ),
            (
                "lora_dropout",
                serde_json::json!(1.5),
                "`lora_dropout` must be a number in [0, 1)",
            ),
            (
                "target_modules",
                serde_json::json!(["q_proj", 3]),
                "entries must be strings",
            ),
        ] {
            let e = with(key, value).unwrap_err();
            assert!(
                e.contains(says) && e.contains("adapter_config.json"),
                "{key}: {e}"
            );
        }
    }
}
