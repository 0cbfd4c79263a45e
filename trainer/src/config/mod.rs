//! Run configuration: the YAML schema, `--set` overrides, and validation into a resolved config.
//!
//! Module index:
//! - `schema`:    the resolved `Config` the trainer reads, its enums, derived facts, `to_yaml`
//! - `raw`:       the serde layer: unknown keys refused, defaults (llama-recipes'), checked leaves
//! - `values`:    leaf types that check themselves (ranged numbers, paths, lists of names)
//! - `de`:        a deserializer over a YAML value that names the key path in every error
//! - `overrides`: `--set KEY=VALUE`
//! - `validate`:  raw -> resolved: required keys, rules that span several keys
//! - `error`:     `ConfigError` (the user-facing messages) and key suggestions
//!
//! Loading goes: file text -> YAML value -> overrides applied to the value -> raw config
//! (types, ranges, unknown keys) -> validated `Config`. Overrides act on the value, not on the
//! typed config, so that a `--set` is checked, and its errors worded, exactly like the file.
use std::path::Path;

use serde_yaml::{Mapping, Value};

mod de;
mod error;
mod overrides;
mod raw;
mod schema;
mod validate;
mod values;

pub(crate) use error::suggest;
pub use error::{ConfigError, Suggestion};
pub use schema::{
    Attention, Backend, BadRecords, CheckpointConfig, Config, DType, DataConfig, DataFiles,
    FsdpConfig, ImagePlaceholder, LengthPolicy, LoraTargets, ModelConfig, PeftConfig, PeftMethod,
    Resume, SaveAdapter, Schedule, ScheduleKind, ShardingStrategy, Supervise, TextOnly,
    TrainConfig,
};

pub use validate::{
    is_hub_id, missing_data_paths, missing_paths, training_conflicts, world_conflicts, HUB_ID_NOTE,
};

use de::{DeError, DeErrorKind};
use overrides::Override;

/// Read the config file at `path`, apply `--set KEY=VALUE` overrides in order, and validate.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|reason| {
        if reason.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            ConfigError::Read {
                path: path.to_path_buf(),
                reason,
            }
        }
    })?;
    parse_named(&path.display().to_string(), &text, overrides)
        .map_err(|e| in_file(path, overrides, e))
}

/// An error about a key of the config file at `path`, named with the file and the `--set` that
/// gave the key its value, if one did (`ConfigError::InFile`); other errors as they are. For the
/// checks after `load` too (`training_conflicts`, `world_conflicts`, `missing_paths`).
pub fn in_file(path: &Path, overrides: &[String], e: ConfigError) -> ConfigError {
    let Some(key) = e.key_path() else {
        return e;
    };
    // the last --set of that key, of a section above it, or of a key below it
    let set = overrides
        .iter()
        .filter_map(|arg| Some((arg, Override::parse(arg).ok()?.key_path())))
        .rev()
        .find(|(_, k)| {
            k == key
                || key.starts_with(&format!("{k}."))
                || key.starts_with(&format!("{k}["))
                || k.starts_with(&format!("{key}."))
        })
        .map(|(arg, _)| arg.clone());
    ConfigError::InFile {
        file: path.display().to_string(),
        set,
        inner: Box::new(e),
    }
}

/// `load` for YAML text already in memory; errors name the file as `<string>`.
pub fn parse(yaml: &str, overrides: &[String]) -> Result<Config, ConfigError> {
    parse_named("<string>", yaml, overrides)
}

/// serde_yaml names a repeated top-level key without a place: the lines it is on.
fn with_duplicate_lines(message: String, text: &str) -> String {
    let key = message
        .strip_prefix("duplicate entry with key \"")
        .and_then(|rest| rest.strip_suffix('"'));
    let Some(key) = key else {
        return message;
    };
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    match lines.len() {
        0 | 1 => message,
        _ => format!(
            "{message} (lines {}): merge them into one section",
            lines.join(", ")
        ),
    }
}

fn parse_named(file: &str, text: &str, overrides: &[String]) -> Result<Config, ConfigError> {
    let overrides = overrides
        .iter()
        .map(|arg| Override::parse(arg))
        .collect::<Result<Vec<_>, _>>()?;
    // (`<<: *defaults` merge keys are resolved first, as PyYAML does)
    let parsed = serde_yaml::from_str::<Value>(text).and_then(|mut v| v.apply_merge().map(|()| v));
    let mut root = match parsed {
        // An empty file is an empty config: the missing required keys are then named.
        Ok(Value::Null) => Mapping::new(),
        Ok(Value::Mapping(map)) => map,
        Ok(other) => {
            return Err(ConfigError::NotAMapping {
                file: file.to_string(),
                got: de::describe_value(&other),
            })
        }
        Err(e) => {
            return Err(ConfigError::Syntax {
                file: file.to_string(),
                message: with_duplicate_lines(e.to_string(), text),
            })
        }
    };
    for o in &overrides {
        o.apply(&mut root)?;
    }
    let raw: raw::RawConfig =
        de::from_value(&Value::Mapping(root)).map_err(|e| user_error(e, &overrides))?;
    validate::validate(raw)
}

/// Every key of the config as its full path (`train.lr`, `train.schedule.kind`), read off the
/// defaults of a minimal config.
fn key_paths() -> &'static [String] {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            // (an empty mapping, peft.rank_pattern's default, is a key's value)
            Value::Mapping(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = k.as_str().unwrap_or_default();
                    let path = match prefix {
                        "" => k.to_string(),
                        p => format!("{p}.{k}"),
                    };
                    walk(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    static PATHS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    PATHS.get_or_init(|| {
        let mut out = vec![];
        let minimal = "model: {path: m}\ndata: {train: t.jsonl}\n";
        if let Some(v) = parse(minimal, &[])
            .ok()
            .and_then(|c| serde_yaml::to_value(c).ok())
        {
            walk("", &v, &mut out);
        }
        out
    })
}

/// Word a deserialization error for the user: suggestions for unknown keys, and the full key
/// of the `--set` that introduced an unknown section (`--set pef.r=8` -> `pef.r: ...`).
fn user_error(e: DeError, overrides: &[Override]) -> ConfigError {
    let path = e.path.unwrap_or_else(|| "config".to_string());
    match e.kind {
        DeErrorKind::UnknownKey { key, valid } => {
            let below = format!("{path}.");
            let path = overrides
                .iter()
                .rev()
                .map(Override::key_path)
                .find(|k| *k == path || k.starts_with(&below))
                .unwrap_or(path);
            // another tool's name, then the same name in other sections (exact, so above a
            // typo of this section's keys), then a typo
            let elsewhere: Vec<String> = key_paths()
                .iter()
                .filter(|p| p.rsplit('.').next() == Some(key.as_str()) && **p != path)
                .cloned()
                .collect();
            let suggestion = match error::other_name(&key) {
                Some(ours) => Some(Suggestion::OtherTool(ours.to_string())),
                None if !elsewhere.is_empty() => Some(Suggestion::OtherSection(elsewhere)),
                None => error::suggest(&key, valid).map(|s| Suggestion::Typo(s.to_string())),
            };
            ConfigError::UnknownKey {
                path,
                suggestion,
                valid: valid.iter().map(|v| v.to_string()).collect(),
                key,
            }
        }
        DeErrorKind::Invalid { expected, got } => ConfigError::Invalid {
            expected: match error::other_value(&path, &got) {
                Some(meant) => format!("{expected} ({meant})"),
                None => expected,
            },
            path,
            got,
        },
        DeErrorKind::Other(message) => ConfigError::Malformed { path, message },
    }
}
