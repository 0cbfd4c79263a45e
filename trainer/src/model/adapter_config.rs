//! A PEFT adapter folder's `adapter_config.json`: the plain LoRA settings (`LoraConfig`) and the
//! PEFT options that choose layers or vary LoRA by layer, applied as peft applies them when it
//! loads an adapter:
//! - `exclude_modules` (a list: exact path or `.`-suffix; a string: a full-match regex) leaves
//!   modules out; `layers_to_transform` (+ `layers_pattern`) keeps only layers of those indices,
//!   for list `target_modules` that match by suffix (`check_target_module_exists`);
//! - `rank_pattern` / `alpha_pattern` give a module the value of the first key (in file order)
//!   that matches the end of its path at a `.` (`get_pattern_key`);
//! - `use_dora`: DoRA, a learned magnitude per output row (`LoraBranch::magnitude`);
//! - `modules_to_save`: modules trained in full, whose every parameter the adapter file holds
//!   (a module whose path ends with one of the names; no LoRA inside them).
//!
//! Options that change what LoRA computes in other ways stay refused by name.
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::lora::{full_match, LoraConfig, TargetMatcher, TargetModules, ALL_LINEAR};
use super::weights::canonical_to_legacy;
use super::ModelError;

/// An adapter's settings as `adapter_config.json` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// r, lora_alpha, lora_dropout, target_modules, use_rslora: a layer's unless a pattern says otherwise.
    pub lora: LoraConfig,
    /// (key, rank) in file order: peft takes the first key that matches.
    pub rank_pattern: Vec<(String, i64)>,
    /// (key, alpha) in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub exclude_modules: Option<TargetModules>,
    /// Layer indices LoRA is kept on (empty: every layer).
    pub layers_to_transform: Vec<i64>,
    /// Names of the layer lists the index follows (empty: the first numbered part of the path).
    pub layers_pattern: Vec<String>,
    pub use_dora: bool,
    /// Modules stored whole in the adapter (their path ends with one of these).
    pub modules_to_save: Vec<String>,
}

/// PEFT settings that change what LoRA computes or where in ways not supported here: loading
/// such an adapter as plain LoRA would be wrong (aLoRA applies only after its invocation tokens)
/// or fail with a list of missing keys that does not say why.
const UNSUPPORTED: [(&str, &str); 11] = [
    ("lora_bias", "a bias in lora_B"),
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
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("kasa_config", "KaSA"),
];

/// Every key of peft 0.21's `LoraConfig` (and of older versions' configs that meant nothing more):
/// another key is a newer peft's option, or a typo, and is ignored with a warning.
pub const KNOWN_KEYS: [&str; 44] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "runtime_config",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
    "enable_lora",
    "merge_weights",
];

/// A JSON object's entries in file order (serde_json's `Value` sorts them, and the order of
/// `rank_pattern` keys decides which applies).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Ordered, M::Error> {
                let mut v = vec![];
                while let Some(entry) = m.next_entry()? {
                    v.push(entry);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(Visitor)
    }
}

impl AdapterConfig {
    /// Plain LoRA with `lora`'s settings on every layer it targets.
    pub fn plain(lora: LoraConfig) -> Self {
        Self {
            lora,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            exclude_modules: None,
            layers_to_transform: vec![],
            layers_pattern: vec![],
            use_dora: false,
            modules_to_save: vec![],
        }
    }

    /// Parses `adapter_config.json`'s text (errors say `adapter_config.json: ...`).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let bad = |m: String| ModelError::Adapter(format!("adapter_config.json: {m}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut c = Self::plain(parse_lora(&v)?);
        for (key, what) in UNSUPPORTED {
            if is_set(v.get(key)) {
                return Err(bad(format!(
                    "`{key}` ({what}) is not supported: LoRA and DoRA on linear layers load"
                )));
            }
        }
        if is_set(v.get("fan_in_fan_out")) {
            // (PEFT's dispatch_default sets it back to False for nn.Linear, with this warning)
            tracing::warn!(
                "adapter_config.json: fan_in_fan_out is true, but every layer LoRA targets here \
                 is a Linear layer (not a transposed Conv1D): read as false, as PEFT does"
            );
        }
        c.use_dora = match v.get("use_dora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(bad(format!("`use_dora` must be true or false, not {x}"))),
        };
        // the patterns in file order: a second, ordered read of the same text
        #[derive(Deserialize)]
        struct Patterns {
            rank_pattern: Option<Ordered>,
            alpha_pattern: Option<Ordered>,
        }
        let p: Patterns = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "`rank_pattern` and `alpha_pattern` must be objects of module pattern: value ({e})"
            ))
        })?;
        for (key, value) in p.rank_pattern.map(|o| o.0).unwrap_or_default() {
            match value.as_i64().filter(|r| *r >= 1) {
                Some(r) => c.rank_pattern.push((key, r)),
                None => {
                    return Err(bad(format!(
                        "`rank_pattern` {key:?} must be a positive integer, not {value}"
                    )))
                }
            }
        }
        for (key, value) in p.alpha_pattern.map(|o| o.0).unwrap_or_default() {
            match value.as_f64() {
                Some(a) => c.alpha_pattern.push((key, a)),
                None => {
                    return Err(bad(format!(
                        "`alpha_pattern` {key:?} must be a number, not {value}"
                    )))
                }
            }
        }
        c.exclude_modules = match v.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(TargetModules::Regex(s.clone())),
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(TargetModules::Names(strings(a, "exclude_modules")?)),
            Some(x) => {
                return Err(bad(format!(
                    "`exclude_modules` must be a list of names or a regex, not {x}"
                )))
            }
        };
        c.layers_to_transform = match v.get("layers_to_transform") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        bad(format!(
                            "`layers_to_transform` entries must be layer indices, not {x}"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(x) => vec![x.as_i64().ok_or_else(|| {
                bad(format!(
                    "`layers_to_transform` must be a layer index or a list of them, not {x}"
                ))
            })?],
        };
        c.modules_to_save = match v.get("modules_to_save") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => strings(a, "modules_to_save")?,
            Some(x) => {
                return Err(bad(format!(
                    "`modules_to_save` must be a list of module names, not {x}"
                )))
            }
        };
        c.layers_pattern = match v.get("layers_pattern") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) if s.is_empty() => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => strings(a, "layers_pattern")?,
            Some(x) => {
                return Err(bad(format!(
                    "`layers_pattern` must be a name or a list of names, not {x}"
                )))
            }
        };
        // peft's LoraConfig refuses these combinations too
        let regex_targets = matches!(c.lora.target_modules, TargetModules::Regex(_));
        if regex_targets && !c.layers_to_transform.is_empty() {
            return Err(bad(
                "`layers_to_transform` cannot be used when `target_modules` is a regex (a string)"
                    .into(),
            ));
        }
        if regex_targets && !c.layers_pattern.is_empty() {
            return Err(bad(
                "`layers_pattern` cannot be used when `target_modules` is a regex (a string)"
                    .into(),
            ));
        }
        let no_layers = matches!(v.get("layers_to_transform"), None | Some(Value::Null));
        if !c.layers_pattern.is_empty() && no_layers {
            return Err(bad(
                "`layers_pattern` is set but `layers_to_transform` is not: give the layer indices too"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// The options beyond plain LoRA this adapter sets, by their PEFT names.
    pub fn extras(&self) -> Vec<&'static str> {
        [
            ("use_dora", self.use_dora),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
            ("exclude_modules", self.exclude_modules.is_some()),
            ("layers_to_transform", !self.layers_to_transform.is_empty()),
            ("modules_to_save", !self.modules_to_save.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// The layers this adapter wraps and each one's rank and scaling. Its module names, patterns
    /// and regexes are read in the naming its tensors use (`legacy`: transformers 4's
    /// `language_model.model.layers...`, as an adapter made then names modules), as peft read
    /// them on the model the adapter was made for.
    pub fn layout(&self, legacy: bool) -> Result<AdapterLayout, ModelError> {
        self.layout_in(legacy, false)
    }

    /// The layout of a run's `peft` section (as a run's checkpoint records it): paths in this
    /// model's naming, and a regular expression (target_modules, exclude_modules, a pattern key)
    /// matches a path in transformers-4 naming too, as `TargetMatcher::matches` reads a
    /// target_modules expression written for those paths.
    pub fn training_layout(&self) -> Result<AdapterLayout, ModelError> {
        self.layout_in(false, true)
    }

    fn layout_in(&self, legacy: bool, either_naming: bool) -> Result<AdapterLayout, ModelError> {
        let bad_regex = |what: &str, key: &str, e: regex::Error| {
            ModelError::Adapter(format!(
                "adapter_config.json: {what} {key:?} is not a regex this program reads (Rust's \
                 regex syntax, as Python's without look-around or backreferences): {e}"
            ))
        };
        let regex = |what: &str, key: &str, re: String| {
            Regex::new(&re).map_err(|e| bad_regex(what, key, e))
        };
        // get_pattern_key: re.match(rf"(.*\.)?({key})$", path)
        let pattern = |what: &str, key: &str| regex(what, key, format!(r"^(?:.*\.)?(?:{key})$"));
        // (as `TargetModules::compile`, but `all-linear` is a name only in target_modules)
        let choose = |what: &str, t: &TargetModules| -> Result<TargetMatcher, ModelError> {
            Ok(match t {
                TargetModules::Regex(r)
                    if r.eq_ignore_ascii_case(ALL_LINEAR) && what == "target_modules" =>
                {
                    TargetMatcher::AllLinear
                }
                TargetModules::Regex(r) => {
                    TargetMatcher::Regex(full_match(r).map_err(|e| bad_regex(what, r, e))?)
                }
                TargetModules::Names(n) => TargetMatcher::Names(n.clone()),
            })
        };
        // peft's layer index: re.match with a named group, so a pattern's own groups or `|` do
        // not take its place (a match without it leaves the module out)
        let layer_index = if self.layers_to_transform.is_empty() {
            vec![]
        } else if self.layers_pattern.is_empty() {
            // (lazy: the first numbered part, not an expert index further on)
            vec![Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").expect("regex")]
        } else {
            self.layers_pattern
                .iter()
                .map(|p| {
                    let re = format!(r"^(?:(?:.*?\.)??{p}\.(?P<idx>\d+)\.)");
                    regex("layers_pattern", p, re)
                })
                .collect::<Result<_, _>>()?
        };
        Ok(AdapterLayout {
            legacy,
            either_naming,
            targets: choose("target_modules", &self.lora.target_modules)?,
            exclude: match &self.exclude_modules {
                None => None,
                Some(e) => Some(choose("exclude_modules", e)?),
            },
            layers: self.layers_to_transform.clone(),
            layer_index,
            rank: self
                .rank_pattern
                .iter()
                .map(|(k, r)| Ok((pattern("rank_pattern", k)?, *r)))
                .collect::<Result<_, ModelError>>()?,
            alpha: self
                .alpha_pattern
                .iter()
                .map(|(k, a)| Ok((pattern("alpha_pattern", k)?, *a)))
                .collect::<Result<_, ModelError>>()?,
            // check_target_module_exists: no LoRA on or inside a module to save
            saved_lora: self
                .modules_to_save
                .iter()
                .map(|m| {
                    let re = format!(r"^(?:(?:|.*\.){m}(?:$|\..*))");
                    regex("modules_to_save", m, re)
                })
                .collect::<Result<_, _>>()?,
            saved: self.modules_to_save.clone(),
            lora: self.lora.clone(),
            use_dora: self.use_dora,
        })
    }
}

/// Which linear layers an adapter wraps, and with what rank and scaling (`AdapterConfig::layout`).
/// Paths are asked in this model's naming and matched in the adapter's.
pub struct AdapterLayout {
    /// The adapter names modules as transformers 4 did.
    legacy: bool,
    /// Expressions match a path in either naming (`AdapterConfig::training_layout`).
    either_naming: bool,
    targets: TargetMatcher,
    exclude: Option<TargetMatcher>,
    /// layers_to_transform (empty: every layer).
    layers: Vec<i64>,
    /// Where a path's layer index is (group `idx`): the first of these that matches gives it.
    layer_index: Vec<Regex>,
    rank: Vec<(Regex, i64)>,
    alpha: Vec<(Regex, f64)>,
    /// modules_to_save, and as the regexes that keep LoRA out of them.
    saved: Vec<String>,
    saved_lora: Vec<Regex>,
    lora: LoraConfig,
    pub use_dora: bool,
}

impl AdapterLayout {
    /// A path of this model in the adapter's naming.
    fn named<'p>(&self, path: &'p str) -> std::borrow::Cow<'p, str> {
        match self.legacy {
            true => canonical_to_legacy(path).into(),
            false => path.into(),
        }
    }

    /// Whether `m` chooses `path` (this model's naming).
    fn chooses(&self, m: &TargetMatcher, path: &str) -> bool {
        match self.either_naming {
            true => m.matches(path),
            false => m.matches_named(&self.named(path), path),
        }
    }

    /// peft's `check_target_module_exists` for a module path (this model's naming).
    pub fn wraps(&self, path: &str) -> bool {
        let name = self.named(path);
        if self.exclude.as_ref().is_some_and(|e| self.chooses(e, path))
            || self.saved_lora.iter().any(|re| re.is_match(&name))
            || !self.chooses(&self.targets, path)
        {
            return false;
        }
        // (a list target naming the module in full skips the layer check, as in peft)
        let exact =
            matches!(&self.targets, TargetMatcher::Names(n) if n.iter().any(|n| *n == name));
        if self.layers.is_empty() || exact {
            return true;
        }
        let index = self
            .layer_index
            .iter()
            .find_map(|re| re.captures(&name))
            .and_then(|c| c.name("idx")?.as_str().parse::<i64>().ok());
        index.is_some_and(|i| self.layers.contains(&i))
    }

    /// Whether parameter `name` (e.g. `lm_head.weight`) belongs to a module to save: peft's
    /// `_set_trainable` wraps every module whose path ends with one of the names (a plain suffix).
    pub fn saves(&self, name: &str) -> bool {
        let name = self.named(name);
        name.match_indices('.').any(|(i, _)| {
            let module = &name[..i];
            self.saved.iter().any(|m| module.ends_with(m.as_str()))
        })
    }

    /// Whether pattern `re` matches `path` (this model's naming).
    fn pattern_matches(&self, re: &Regex, path: &str) -> bool {
        re.is_match(&self.named(path))
            || self.either_naming && re.is_match(&canonical_to_legacy(path))
    }

    /// The modules peft's `_set_trainable` wraps for `modules_to_save` (this model's naming), from
    /// the parameter names `params` (this model's naming): each saved parameter's outermost
    /// module whose path ends with a name, in first-seen order, none inside another.
    pub fn saved_modules(&self, params: &[String]) -> Vec<String> {
        let mut modules: Vec<String> = vec![];
        for param in params {
            let name = self.named(param);
            let outermost = (name.match_indices('.').map(|(i, _)| &name[..i]))
                .find(|m| self.saved.iter().any(|s| m.ends_with(s.as_str())));
            if let Some(m) = outermost {
                let m = match self.legacy {
                    true => super::weights::legacy_to_canonical(m),
                    false => m.to_string(),
                };
                if !modules.contains(&m) {
                    modules.push(m);
                }
            }
        }
        let all = modules.clone();
        modules.retain(|m| !all.iter().any(|o| m.starts_with(&format!("{o}."))));
        modules
    }

    /// The first pattern entry that matches `path`, else `default`.
    fn pattern<T: Copy>(&self, entries: &[(Regex, T)], path: &str, default: T) -> T {
        entries
            .iter()
            .find(|(re, _)| self.pattern_matches(re, path))
            .map_or(default, |(_, v)| *v)
    }

    /// The module's rank: `rank_pattern`'s, else `r`.
    pub fn rank(&self, path: &str) -> i64 {
        self.pattern(&self.rank, path, self.lora.r)
    }

    /// The module's alpha: `alpha_pattern`'s, else `lora_alpha`.
    pub fn alpha(&self, path: &str) -> f64 {
        self.pattern(&self.alpha, path, self.lora.alpha)
    }

    /// The module's scaling, from its rank and alpha.
    pub fn scaling(&self, path: &str) -> f64 {
        super::lora::scaling(
            self.alpha(path),
            self.rank(path) as f64,
            self.lora.use_rslora,
        )
    }

    /// What in these settings chooses nothing among the linear layers at `paths` (this model's
    /// naming), in words, as peft warns of it: a `rank_pattern` / `alpha_pattern` key no wrapped
    /// layer matches, an `exclude_modules` entry (each of a list, or the expression) no targeted
    /// layer matches. A typo there silently trains the default otherwise.
    pub fn unmatched(&self, paths: &[String]) -> Vec<String> {
        let wrapped: Vec<&String> = paths.iter().filter(|p| self.wraps(p)).collect();
        let mut unmatched = vec![];
        for (what, keys) in [
            (
                "rank_pattern",
                self.rank.iter().map(|(re, _)| re).collect::<Vec<_>>(),
            ),
            (
                "alpha_pattern",
                self.alpha.iter().map(|(re, _)| re).collect(),
            ),
        ] {
            for re in keys {
                if !wrapped.iter().any(|p| self.pattern_matches(re, p)) {
                    unmatched.push(format!(
                        "{what} key {:?} matches no layer LoRA wraps",
                        pattern_key(re)
                    ));
                }
            }
        }
        let entries: Vec<(String, TargetMatcher)> = match &self.exclude {
            None | Some(TargetMatcher::AllLinear) => vec![],
            Some(TargetMatcher::Names(names)) => (names.iter())
                .map(|n| (format!("{n:?}"), TargetMatcher::Names(vec![n.clone()])))
                .collect(),
            Some(TargetMatcher::Regex(re)) => {
                let written = (re.as_str().strip_prefix("^(?:"))
                    .and_then(|r| r.strip_suffix(")$"))
                    .unwrap_or(re.as_str());
                vec![(format!("{written:?}"), TargetMatcher::Regex(re.clone()))]
            }
        };
        for (entry, m) in entries {
            if !paths.iter().any(|p| self.chooses(&m, p)) {
                unmatched.push(format!("exclude_modules {entry} matches no linear layer"));
            }
        }
        unmatched
    }

    /// Two pattern keys that give module `path` different values, in words: peft takes the first
    /// in its file's order, which a checkpoint's manifest (a JSON object) does not keep, so a
    /// run's patterns may not overlap so.
    pub fn overlap(&self, path: &str) -> Option<String> {
        fn first_two<T: Copy + PartialEq + std::fmt::Display>(
            layout: &AdapterLayout,
            entries: &[(Regex, T)],
            path: &str,
        ) -> Option<String> {
            let mut matching = entries
                .iter()
                .filter(|(re, _)| layout.pattern_matches(re, path));
            let (first_re, first) = matching.next()?;
            let (re, v) = matching.find(|(_, v)| v != first)?;
            Some(format!(
                "{:?} gives {path} {first}, {:?} gives it {v}",
                pattern_key(first_re),
                pattern_key(re)
            ))
        }
        let rank = first_two(self, &self.rank, path).map(|m| format!("rank_pattern: {m}"));
        rank.or_else(|| first_two(self, &self.alpha, path).map(|m| format!("alpha_pattern: {m}")))
    }
}

/// A pattern key as written, from its compiled regex (`^(?:.*\.)?(?:KEY)$`).
fn pattern_key(re: &Regex) -> &str {
    let s = re.as_str();
    s.strip_prefix(r"^(?:.*\.)?(?:")
        .and_then(|k| k.strip_suffix(")$"))
        .unwrap_or(s)
}

/// Whether an optional setting's JSON value sets something (not absent, null, false, `""`, `[]`
/// or `{}`).
pub fn is_set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn strings(a: &[Value], key: &str) -> Result<Vec<String>, ModelError> {
    a.iter()
        .map(|x| {
            x.as_str().map(String::from).ok_or_else(|| {
                ModelError::Adapter(format!(
                    "adapter_config.json: `{key}` entries must be strings, not {x}"
                ))
            })
        })
        .collect()
}

/// The plain LoRA settings (r, lora_alpha, lora_dropout, target_modules, use_rslora, bias).
fn parse_lora(v: &Value) -> Result<LoraConfig, ModelError> {
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
        Some(Value::Array(a)) => TargetModules::Names(strings(a, "target_modules")?),
        _ => return Err(bad("missing `target_modules`".into())),
    };
    // "lora_only" and "all" save the biases PEFT trained beside the factors: a file that holds
    // one is refused when its tensors are read (a targeted layer without a bias, as every
    // attention projection here, saves none: plain LoRA)
    match v.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if ["none", "lora_only", "all"].contains(&b.as_str()) => {}
        Some(x) => {
            return Err(bad(format!(
                "`bias` must be \"none\", \"lora_only\" or \"all\", not {x}"
            )))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: &Value) -> Result<AdapterConfig, String> {
        AdapterConfig::parse(&v.to_string()).map_err(|e| e.to_string())
    }

    fn base() -> Value {
        json!({"peft_type": "LORA", "r": 8, "lora_alpha": 32, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "use_rslora": false})
    }

    #[test]
    fn adapter_configs_with_wrong_types_are_errors_not_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(
            (c.lora.r, c.lora.alpha, c.lora.use_rslora),
            (8, 32.0, false)
        );
        assert!(c.extras().is_empty());
        let with = |key: &str, value: Value| {
            let mut v = base();
            v[key] = value;
            parse(&v).map(|_| ())
        };
        assert!(
            with("lora_alpha", Value::Null).is_ok(),
            "null = PEFT's default"
        );
        for (key, value, says) in [
            ("lora_alpha", json!("32"), "`lora_alpha` must be a number"),
            ("r", json!(0), "`r` must be a positive integer"),
            ("r", json!(8.5), "`r` must be a positive integer"),
            (
                "use_rslora",
                json!("true"),
                "`use_rslora` must be true or false",
            ),
            (
                "lora_dropout",
                json!(1.5),
                "`lora_dropout` must be a number in [0, 1)",
            ),
            (
                "target_modules",
                json!(["q_proj", 3]),
                "entries must be strings",
            ),
            ("use_dora", json!("yes"), "`use_dora` must be true or false"),
            (
                "rank_pattern",
                json!({"q_proj": 0}),
                "must be a positive integer",
            ),
            ("rank_pattern", json!(["q_proj"]), "must be objects"),
            ("alpha_pattern", json!({"q_proj": "16"}), "must be a number"),
            ("exclude_modules", json!(3), "`exclude_modules` must be"),
            ("layers_to_transform", json!(["0"]), "must be layer indices"),
            (
                "layers_pattern",
                json!("layers"),
                "`layers_to_transform` is not",
            ),
            (
                "modules_to_save",
                json!("lm_head"),
                "`modules_to_save` must be a list",
            ),
            ("lora_bias", json!(true), "`lora_bias`"),
        ] {
            let e = with(key, value.clone()).unwrap_err();
            assert!(
                e.contains(says) && e.contains("adapter_config.json"),
                "{key} = {value}: {e}"
            );
        }
        // peft's own refusals: layers_to_transform / layers_pattern need list target_modules
        let mut v = base();
        v["target_modules"] = json!(".*q_proj");
        v["layers_to_transform"] = json!([0]);
        assert!(parse(&v)
            .unwrap_err()
            .contains("cannot be used when `target_modules` is a regex"));
    }

    const PATHS: [&str; 6] = [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.cross_attn.q_proj",
        "model.language_model.layers.2.self_attn.q_proj",
        "model.vision_model.transformer.layers.1.self_attn.q_proj",
        "model.vision_model.global_transformer.layers.0.self_attn.v_proj",
        "model.language_model.layers.12.self_attn.v_proj",
    ];

    fn layout(extra: Value) -> AdapterLayout {
        let mut v = base();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        parse(&v).unwrap().layout(false).unwrap()
    }

    fn wrapped(l: &AdapterLayout) -> Vec<&'static str> {
        PATHS.into_iter().filter(|p| l.wraps(p)).collect()
    }

    /// PEFT's `check_target_module_exists`: exclude_modules (list: exact or suffix; string:
    /// full match), layers_to_transform by the first numbered part or after layers_pattern.
    #[test]
    fn layers_are_chosen_as_peft_chooses_them() {
        let all = layout(json!({}));
        assert_eq!(wrapped(&all).len(), 6);
        let l = layout(json!({"exclude_modules": ["layers.2.self_attn.q_proj",
            "model.vision_model.transformer.layers.1.self_attn.q_proj"]}));
        assert_eq!(wrapped(&l), [PATHS[0], PATHS[1], PATHS[4], PATHS[5]]);
        let l = layout(json!({"exclude_modules": ".*vision_model.*"}));
        assert_eq!(wrapped(&l), [PATHS[0], PATHS[1], PATHS[2], PATHS[5]]);
        // (a transformers-4 path in a transformers-4 adapter's list reaches this model's layer)
        let mut v = base();
        v["exclude_modules"] = json!(["language_model.model.layers.0.self_attn.q_proj"]);
        let l = parse(&v).unwrap().layout(true).unwrap();
        assert!(!l.wraps(PATHS[0]) && l.wraps(PATHS[2]));
        // layer 1 of every stack (not 12: the index is a whole part)
        let l = layout(json!({"layers_to_transform": 1}));
        assert_eq!(wrapped(&l), [PATHS[1], PATHS[3]]);
        let l = layout(json!({"layers_to_transform": [0, 12], "layers_pattern": ["layers"]}));
        assert_eq!(wrapped(&l), [PATHS[0], PATHS[4], PATHS[5]]);
        // a pattern that only the global stack has
        let l = layout(
            json!({"layers_to_transform": [0], "layers_pattern": "global_transformer.layers"}),
        );
        assert_eq!(wrapped(&l), [PATHS[4]]);
        // a target named in full is wrapped whatever its layer (peft checks that first)
        let mut v = base();
        v["target_modules"] = json!([PATHS[2], "v_proj"]);
        v["layers_to_transform"] = json!([0]);
        let l = parse(&v).unwrap().layout(false).unwrap();
        assert_eq!(wrapped(&l), [PATHS[2], PATHS[4]]);
    }

    /// Patterns and regexes read in the adapter's own naming: a transformers-5 adapter's
    /// `language_model.*` does not reach lm_head (whose transformers-4 name starts so), a
    /// transformers-4 adapter's full paths do reach this model's layers. A layers_pattern with
    /// its own group or `|` finds the index as peft does (a named group), without a panic.
    #[test]
    fn names_are_read_in_the_adapter_naming() {
        let parsed = |extra: Value| {
            let mut v = base();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            parse(&v).unwrap()
        };
        let c = parsed(json!({"target_modules": ["q_proj", "lm_head"],
            "alpha_pattern": {"language_model.*": 64}}));
        let (new, old) = (c.layout(false).unwrap(), c.layout(true).unwrap());
        assert_eq!((new.scaling("lm_head"), old.scaling("lm_head")), (4.0, 8.0));
        assert_eq!((new.scaling(PATHS[0]), old.scaling(PATHS[0])), (8.0, 8.0));
        let c = parsed(
            json!({"target_modules": r"language_model\.model\.layers\.\d+\.self_attn\.q_proj"}),
        );
        assert_eq!(wrapped(&c.layout(true).unwrap()), [PATHS[0], PATHS[2]]);
        assert!(wrapped(&c.layout(false).unwrap()).is_empty());
        let c = parsed(json!({"exclude_modules": "language_model.*"}));
        assert_eq!(wrapped(&c.layout(false).unwrap()).len(), 6);
        assert_eq!(wrapped(&c.layout(true).unwrap()), [PATHS[3], PATHS[4]]);
        // (peft: [] and [1, 3])
        let l = layout(json!({"layers_to_transform": [0, 1], "layers_pattern": ["layers|h"]}));
        assert!(wrapped(&l).is_empty());
        let l = layout(json!({"layers_to_transform": [1], "layers_pattern": ["layer(s)?"]}));
        assert_eq!(wrapped(&l), [PATHS[1], PATHS[3]]);
    }

    /// PEFT's `get_pattern_key`: the first key (in file order, not sorted) whose regex matches
    /// the end of the path at a `.` gives the rank or alpha; scaling follows both.
    #[test]
    fn rank_and_alpha_patterns_apply_in_file_order() {
        let text = r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"self_attn.q_proj": 4, "q_proj": 2, "layers\\.1[0-9]\\..*": 32},
            "alpha_pattern": {"cross_attn.q_proj": 64}}"#;
        let c = AdapterConfig::parse(text).unwrap();
        assert_eq!(c.extras(), ["rank_pattern", "alpha_pattern"]);
        let l = c.layout(false).unwrap();
        let rs: Vec<i64> = PATHS.iter().map(|p| l.rank(p)).collect();
        // (sorted keys would put "q_proj" first and give every q_proj rank 2)
        assert_eq!(rs, [4, 2, 4, 4, 8, 32]);
        let sc: Vec<f64> = PATHS.iter().map(|p| l.scaling(p)).collect();
        assert_eq!(sc, [4.0, 32.0, 4.0, 4.0, 2.0, 0.5]);
        // "proj" matches no path at a `.` boundary; "_proj" neither
        let c = AdapterConfig::parse(
            r#"{"r": 8, "target_modules": ["q_proj"], "rank_pattern": {"proj": 2, "_proj": 3}}"#,
        )
        .unwrap();
        assert_eq!(c.layout(false).unwrap().rank(PATHS[0]), 8);
        let c = AdapterConfig::parse(
            r#"{"r": 8, "target_modules": ["q_proj"], "use_rslora": true, "rank_pattern": {"q_proj": 4}}"#,
        )
        .unwrap();
        assert_eq!(c.layout(false).unwrap().scaling(PATHS[0]), 4.0); // 8 / sqrt(4)
    }
}
