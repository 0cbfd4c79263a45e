//! Placeholder: replaced by the config helper (schema, overrides, validation).
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Io(String),
}

pub struct Config;

impl Config {
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(String::new())
    }
}

pub fn load(path: &Path, _overrides: &[String]) -> Result<Config, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Io(format!("{}: {e}", path.display())))?;
    Ok(Config)
}
