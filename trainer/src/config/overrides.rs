//! `--set KEY=VALUE` overrides, applied to the parsed YAML before it is checked, so an override
//! is checked exactly like the same key written in the file.
//!
//! VALUE is read as YAML, which types it the way the file would: `3` an integer, `2e-5` a float,
//! `true` a bool, `null` null, `[q_proj, v_proj]` a list, anything else text. To force text
//! that looks like something else, quote it: `--set model.path='"123"'`.
use serde_yaml::{Mapping, Value};

use super::ConfigError;

/// One parsed `--set` argument.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    /// The argument as given, for error messages.
    pub arg: String,
    /// The key path, split at dots: `train.schedule.kind` -> [train, schedule, kind].
    pub key: Vec<String>,
    pub value: Value,
}

impl Override {
    pub(crate) fn parse(arg: &str) -> Result<Override, ConfigError> {
        let syntax = || ConfigError::OverrideSyntax {
            arg: arg.to_string(),
        };
        let (key, value) = arg.split_once('=').ok_or_else(syntax)?;
        let key: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        if key.iter().any(|part| part.is_empty()) {
            return Err(syntax());
        }
        let value = serde_yaml::from_str(value).map_err(|e| ConfigError::OverrideValue {
            arg: arg.to_string(),
            // (serde_yaml's words for an integer past 64 bits: "invalid type: integer ... as u128")
            message: match e.to_string().contains(" as u128") || e.to_string().contains(" as i128")
            {
                true => format!("the number {} is too large", value.trim()),
                false => e.to_string(),
            },
        })?;
        Ok(Override {
            arg: arg.to_string(),
            key,
            value,
        })
    }

    /// The key path as written: `train.lr`.
    pub(crate) fn key_path(&self) -> String {
        self.key.join(".")
    }

    /// Set the key in `root`, creating sections on the way (`peft:` left empty is a section
    /// too). A value set on a whole section replaces it.
    pub(crate) fn apply(&self, root: &mut Mapping) -> Result<(), ConfigError> {
        let (last, parents) = self
            .key
            .split_last()
            .ok_or_else(|| ConfigError::OverrideSyntax {
                arg: self.arg.clone(),
            })?;
        let mut map = root;
        for (depth, part) in parents.iter().enumerate() {
            let slot = map
                .entry(Value::String(part.clone()))
                .or_insert(Value::Null);
            if slot.is_null() {
                *slot = Value::Mapping(Mapping::new());
            }
            map = match slot {
                Value::Mapping(m) => m,
                _ => {
                    return Err(ConfigError::OverrideNotSection {
                        arg: self.arg.clone(),
                        parent: self.key[..=depth].join("."),
                        key: self.key[depth + 1].clone(),
                    })
                }
            };
        }
        map.insert(Value::String(last.clone()), self.value.clone());
        Ok(())
    }
}
