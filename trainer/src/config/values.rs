//! Checked leaf values of the raw layer: numbers with a range, non-empty paths, LoRA targets.
//!
//! Each type says in words what it allows (`EXPECTED`), and that one phrase serves both the wrong
//! type and the out-of-range case, so `lr: fast` and `lr: -1` read `expected a positive number`.
//! Checking while deserializing keeps the key path in the error for free (see `de.rs`).
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Unexpected, Visitor};

use super::schema::DataFiles;
use crate::model::lora::ALL_LINEAR;

/// A rule for a floating-point value.
pub(crate) trait NumRule {
    const EXPECTED: &'static str;
    fn allows(v: f64) -> bool;
}

/// A rule for an integer value (always >= 0: no key of the schema takes a negative integer).
pub(crate) trait IntRule {
    const EXPECTED: &'static str;
    fn allows(v: u64) -> bool;
}

macro_rules! num_rule {
    ($name:ident, $expected:literal, |$v:ident| $check:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub(crate) struct $name;
        impl NumRule for $name {
            const EXPECTED: &'static str = $expected;
            fn allows($v: f64) -> bool {
                $check
            }
        }
    };
}

macro_rules! int_rule {
    ($name:ident, $expected:literal, |$v:ident| $check:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub(crate) struct $name;
        impl IntRule for $name {
            const EXPECTED: &'static str = $expected;
            fn allows($v: u64) -> bool {
                $check
            }
        }
    };
}

// NaN fails every comparison, and the infinities are excluded explicitly, so `.nan`/`.inf` in
// YAML are rejected by every rule.
num_rule!(Positive, "a positive number", |v| v.is_finite() && v > 0.0);
num_rule!(NonNegative, "a number >= 0", |v| v.is_finite() && v >= 0.0);
num_rule!(Dropout, "a number in [0, 1)", |v| (0.0..1.0).contains(&v));
num_rule!(Decay, "a number in (0, 1]", |v| v > 0.0 && v <= 1.0);
num_rule!(Ratio, "a number in [0, 1]", |v| (0.0..=1.0).contains(&v));
num_rule!(Beta, "a number in [0, 1)", |v| (0.0..1.0).contains(&v));
num_rule!(ClipNorm, "a positive number (or null: no clipping)", |v| v
    .is_finite()
    && v > 0.0);

int_rule!(PositiveInt, "a positive integer", |v| v >= 1);
int_rule!(Count, "an integer >= 0", |_v| true);
int_rule!(
    Workers,
    "an integer from 0 to 256 (loader threads per rank; more only contend for the cores)",
    |v| v <= 256
);

/// A float checked by rule `R`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Num<R>(f64, PhantomData<R>);

impl<R> Num<R> {
    /// Defaults are written in code and trusted (a test checks each against its rule).
    pub(crate) const fn new(v: f64) -> Self {
        Num(v, PhantomData)
    }
    pub(crate) fn get(self) -> f64 {
        self.0
    }
}

/// An integer checked by rule `R`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Int<R>(u64, PhantomData<R>);

impl<R> Int<R> {
    pub(crate) const fn new(v: u64) -> Self {
        Int(v, PhantomData)
    }
    pub(crate) fn get(self) -> u64 {
        self.0
    }
    /// As a size. Saturates on 32-bit targets, where such a count could never be met anyway.
    pub(crate) fn size(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

struct NumVisitor<R>(PhantomData<R>);

impl<R: NumRule> Visitor<'_> for NumVisitor<R> {
    type Value = Num<R>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(R::EXPECTED)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        if R::allows(v) {
            Ok(Num::new(v))
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
    // Integers are numbers too (`alpha: 32`); the error repeats them as written.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        let f = v as f64;
        if R::allows(f) {
            Ok(Num::new(f))
        } else {
            Err(E::invalid_value(Unexpected::Unsigned(v), &self))
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        let f = v as f64;
        if R::allows(f) {
            Ok(Num::new(f))
        } else {
            Err(E::invalid_value(Unexpected::Signed(v), &self))
        }
    }
}

impl<'de, R: NumRule> Deserialize<'de> for Num<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_f64(NumVisitor(PhantomData))
    }
}

struct IntVisitor<R>(PhantomData<R>);

impl<R: IntRule> Visitor<'_> for IntVisitor<R> {
    type Value = Int<R>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(R::EXPECTED)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if R::allows(v) {
            Ok(Int::new(v))
        } else {
            Err(E::invalid_value(Unexpected::Unsigned(v), &self))
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }
}

impl<'de, R: IntRule> Deserialize<'de> for Int<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_u64(IntVisitor(PhantomData))
    }
}

/// A file or folder path, kept exactly as written: relative paths stay relative to the working
/// directory of the run (as with llama-recipes), not to the config file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FilePath(pub(crate) PathBuf);

impl FilePath {
    pub(crate) fn new(p: &str) -> Self {
        FilePath(PathBuf::from(p))
    }
}

struct PathVisitor;

impl Visitor<'_> for PathVisitor {
    type Value = FilePath;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a path")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<FilePath, E> {
        if v.is_empty() {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        } else {
            Ok(FilePath::new(v))
        }
    }
}

impl<'de> Deserialize<'de> for FilePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_string(PathVisitor)
    }
}

/// `data.train` / `data.eval` ([`DataFiles`]): a path, or a non-empty list of paths.
struct PathsVisitor;

impl<'de> Visitor<'de> for PathsVisitor {
    type Value = DataFiles;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a path or a list of paths")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<DataFiles, E> {
        PathVisitor.visit_str(v).map(|p| DataFiles(vec![p.0]))
    }
    // (as a single path reads them: `--set data.train=2024` is the file `2024`; a fraction's text
    // would not be what was written, so it asks for quotes)
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<DataFiles, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<DataFiles, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<DataFiles, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<DataFiles, E> {
        Err(E::invalid_type(
            Unexpected::Float(v),
            &"a path (YAML read a number here, which may not be spelled as written: quote it, e.g. \"2024.10\")",
        ))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DataFiles, A::Error> {
        let mut paths = Vec::new();
        while let Some(FilePath(p)) = seq.next_element()? {
            paths.push(p);
        }
        if paths.is_empty() {
            return Err(de::Error::custom(
                "an empty list: name a JSONL file, or a list of them",
            ));
        }
        Ok(DataFiles(paths))
    }
}

impl<'de> Deserialize<'de> for DataFiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PathsVisitor)
    }
}

/// LoRA target modules as PEFT's `target_modules` takes them: a list of names, or one string,
/// `all-linear` or a regular expression matched against the whole module path. The expression is
/// compiled here, so a typo is an error at its key rather than on every rank at model load.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Targets {
    Names(Vec<String>),
    Pattern(String),
}

struct TargetsVisitor;

impl<'de> Visitor<'de> for TargetsVisitor {
    type Value = Targets;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a list of module names like [q_proj, v_proj], all-linear, or a regular expression",
        )
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Targets, A::Error> {
        let mut names = Vec::new();
        while let Some(Name(name)) = seq.next_element()? {
            names.push(name);
        }
        Ok(Targets::Names(names))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Targets, E> {
        if v.is_empty() {
            return Err(E::invalid_value(Unexpected::Str(v), &self));
        }
        // every module path but `lm_head` holds a dot: a string of bare names (`q_proj`,
        // `q_proj,v_proj`) matches no layer, in PEFT too, and was meant as a list
        if v != "lm_head" && v.chars().all(|c| c.is_alphanumeric() || "_, ".contains(c)) {
            return Err(E::custom(format!(
                "{v:?} is a regular expression matched against whole module paths (as PEFT \
                 does), so it matches no layer; list names as [{}]",
                v.split(',').map(str::trim).collect::<Vec<_>>().join(", ")
            )));
        }
        if v != ALL_LINEAR {
            regex::Regex::new(v).map_err(|e| {
                // (the syntax error's last line; the ones above draw a caret under the pattern)
                let why = e.to_string();
                let why = why.lines().last().unwrap_or_default();
                E::custom(format!(
                    "\"{v}\" is not a regular expression ({}); a string is matched against \
                     whole module paths as PEFT does, names are listed as [q_proj, v_proj]",
                    why.trim_start_matches("error: ")
                ))
            })?;
        }
        Ok(Targets::Pattern(v.to_string()))
    }
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TargetsVisitor)
    }
}

/// One non-empty name of a `Targets` list.
struct Name(String);

struct NameVisitor;

impl Visitor<'_> for NameVisitor {
    type Value = Name;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a module name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Name, E> {
        if v.is_empty() {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        } else {
            Ok(Name(v.to_string()))
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_string(NameVisitor)
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern`: module pattern -> value (`V`: a checked number), in
/// the order written. A key is a regular expression that must match the end of a module path at a
/// `.` (PEFT's `get_pattern_key`: `gate_proj`, `layers\.0\.self_attn\.q_proj`); it is compiled
/// here, so a typo is an error at its key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Patterns<V>(pub(crate) Vec<(String, V)>);

impl<V> Default for Patterns<V> {
    fn default() -> Self {
        Patterns(vec![])
    }
}

struct PatternsVisitor<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for PatternsVisitor<V> {
    type Value = Patterns<V>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of module patterns to values, like {gate_proj: 4}")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Patterns::default())
    }
    fn visit_map<M: de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut entries = vec![];
        while let Some(key) = map.next_key::<String>()? {
            // (the value first: its errors are at the key's path)
            let value = map.next_value::<V>()?;
            if key.is_empty() {
                return Err(de::Error::custom("an empty module pattern"));
            }
            if let Err(e) = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")) {
                let why = e.to_string();
                let why = why.lines().last().unwrap_or_default().to_string();
                return Err(de::Error::custom(format!(
                    "the key \"{key}\" is not a regular expression ({}); a key matches the end \
                     of a module path at a `.`, as PEFT reads it",
                    why.trim_start_matches("error: ")
                )));
            }
            entries.push((key, value));
        }
        Ok(Patterns(entries))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Patterns<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PatternsVisitor(PhantomData))
    }
}

/// PEFT's `layers_to_transform`: one layer index or a list of them (empty: every layer).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct LayerIndices(pub(crate) Vec<usize>);

struct LayerIndicesVisitor;

impl<'de> Visitor<'de> for LayerIndicesVisitor {
    type Value = LayerIndices;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a layer index (an integer >= 0) or a list of them")
    }
    fn visit_unit<E: de::Error>(self) -> Result<LayerIndices, E> {
        Ok(LayerIndices::default())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<LayerIndices, E> {
        let i = usize::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))?;
        Ok(LayerIndices(vec![i]))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<LayerIndices, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LayerIndices, A::Error> {
        let mut v = vec![];
        while let Some(i) = seq.next_element::<Int<Count>>()? {
            v.push(i.size());
        }
        Ok(LayerIndices(v))
    }
}

impl<'de> Deserialize<'de> for LayerIndices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LayerIndicesVisitor)
    }
}

/// PEFT's `layers_pattern`: the name of the layer list the index of `layers_to_transform` follows
/// (`layers`), or a list of such names.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct LayerLists(pub(crate) Vec<String>);

struct LayerListsVisitor;

impl<'de> Visitor<'de> for LayerListsVisitor {
    type Value = LayerLists;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a layer list name like layers, or a list of them")
    }
    fn visit_unit<E: de::Error>(self) -> Result<LayerLists, E> {
        Ok(LayerLists::default())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<LayerLists, E> {
        Ok(LayerLists(vec![layer_list::<E>(
            NameVisitor.visit_str::<E>(v)?.0,
        )?]))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LayerLists, A::Error> {
        let mut v = vec![];
        while let Some(Name(n)) = seq.next_element()? {
            v.push(layer_list::<A::Error>(n)?);
        }
        Ok(LayerLists(v))
    }
}

/// A `layers_pattern` name, which PEFT puts into a regular expression (`layers\.(\d+)\.`).
fn layer_list<E: de::Error>(name: String) -> Result<String, E> {
    match regex::Regex::new(&format!(r"(?:{name})\.(\d+)\.")) {
        Ok(_) => Ok(name),
        Err(_) => Err(E::custom(format!(
            "\"{name}\" is not a regular expression; name the layer list, like layers"
        ))),
    }
}

impl<'de> Deserialize<'de> for LayerLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LayerListsVisitor)
    }
}

/// PEFT's `modules_to_save`: a list of module names (a module whose path ends with one trains in
/// full).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct ModuleNames(pub(crate) Vec<String>);

struct ModuleNamesVisitor;

impl<'de> Visitor<'de> for ModuleNamesVisitor {
    type Value = ModuleNames;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of module names like [multi_modal_projector]")
    }
    fn visit_unit<E: de::Error>(self) -> Result<ModuleNames, E> {
        Ok(ModuleNames::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ModuleNames, A::Error> {
        let mut v = vec![];
        while let Some(Name(n)) = seq.next_element()? {
            v.push(n);
        }
        Ok(ModuleNames(v))
    }
}

impl<'de> Deserialize<'de> for ModuleNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ModuleNamesVisitor)
    }
}
