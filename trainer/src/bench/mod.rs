//! `trainer bench ...`: measurements, never timed tests. Each prints a table, or with `--json`
//! one JSON object per measurement on stdout.
pub mod checkpoint;
pub mod collectives;
pub mod data;
pub mod decode;
pub mod step;

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Runs a Python peer benchmark (`cmd`, running `script`) and returns the last JSON line it
/// printed; a failed run or no JSON is an error carrying the peer's stderr or stdout.
pub(crate) fn peer_json(mut cmd: Command, script: &Path) -> Result<Value> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("{} printed no JSON line:\n{stdout}", script.display()))
}
