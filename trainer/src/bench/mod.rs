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

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every bench's `--json` objects carry DESIGN's fields: name, figure and unit, the peer
    /// (null where it runs in a process of its own) and the ratio.
    #[test]
    fn every_json_line_has_the_common_fields() {
        let collectives = super::collectives::Measurement {
            op: "all_reduce",
            bytes: 1 << 20,
            seconds: 0.01,
            busbw_gbps: 0.2,
        };
        let checkpoint = super::checkpoint::Measurement {
            op: "save",
            bytes: 1 << 20,
            seconds: 0.01,
        };
        let data = super::data::Measurement {
            workers: 2,
            samples: 10,
            seconds: 1.0,
            cpu_seconds: 2.0,
            peer_seconds: Some(2.0),
            peer_cpu_seconds: Some(2.0),
        };
        let lines: Vec<Value> = [
            super::collectives::json_line(&collectives, "cpu", 2),
            checkpoint.json_line(1, 3),
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .chain([data.json(), super::data::Stages::default().json()])
        .collect();
        for line in &lines {
            for key in ["name", "figure", "unit", "peer", "ratio"] {
                assert!(line.get(key).is_some(), "{key} missing: {line}");
            }
            assert!(
                line["name"].is_string() && line["unit"].is_string(),
                "{line}"
            );
        }
        assert_eq!(lines[2]["peer"], 5.0, "data: the peer's samples/s");
        assert_eq!(lines[2]["ratio"], 2.0, "data: figure / peer");
    }
}
