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
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("ModuleNotFoundError") {
            "\nthe peer's packages are missing: `make bench-peers` installs the pinned transformers, \
             peft and Pillow into .venv (or pass --no-peer, or --python for another interpreter)"
        } else {
            ""
        };
        bail!("{} failed:\n{stderr}{hint}", script.display());
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

    /// A peer that fails names its script and its stderr; a missing Python package also gets
    /// the command that installs the pinned ones.
    #[test]
    fn a_failed_peer_says_why_and_how_to_install_its_packages() {
        let run = |stderr: &str| {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", &format!("echo '{stderr}' >&2; exit 1")]);
            super::peer_json(cmd, std::path::Path::new("scripts/peer.py"))
                .unwrap_err()
                .to_string()
        };
        let missing = run("ModuleNotFoundError: No module named PIL");
        assert!(missing.contains("scripts/peer.py failed"), "{missing}");
        assert!(missing.contains("No module named PIL"), "{missing}");
        assert!(missing.contains("make bench-peers"), "{missing}");
        let other = run("ValueError: bad size");
        assert!(other.contains("ValueError: bad size"), "{other}");
        assert!(!other.contains("bench-peers"), "{other}");
    }

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
            super::collectives::json_line(&collectives, "cpu", "shm-cma", 2),
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
