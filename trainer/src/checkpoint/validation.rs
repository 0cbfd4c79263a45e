//! The validation record of a checkpoint, and the run's best validation loss across resumes.
//!
//! llama-recipes writes the PEFT adapter into `output_dir` after an epoch only when its validation
//! loss is below every earlier epoch's (`eval_epoch_loss < best_val_loss`), so the adapter left
//! there is the best epoch's. Our epoch-end checkpoint is saved (and published) before validating,
//! so its manifest holds the best of the epochs before it (`Manifest::best_eval`); once the epoch is
//! validated, rank 0 adds `validation.json` to the checkpoint folder. A resume takes the lower of
//! the two, so a run stopped and resumed keeps comparing against its best epoch.
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The file in a checkpoint folder with that step's validation result (written after the folder
/// is published; not listed in the manifest, which predates it).
pub const VALIDATION_FILE: &str = "validation.json";

/// One validation of the run: its mean token loss, after optimizer step `step` (end of `epoch`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub epoch: u64,
    /// A non-finite loss (a diverged run) is written as null (JSON has no NaN) and read as NaN.
    #[serde(with = "finite_or_null")]
    pub eval_loss: f64,
    /// The samples it was measured on (`train::setup::eval_set_fingerprint`: the validated
    /// records and their token lengths): a resume on another validation set does not compare its
    /// losses with this one. Absent from older trainers' records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_set: Option<u64>,
}

mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => s.serialize_f64(*v),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

impl EvalResult {
    /// Whether this result is below `best` (strictly, as llama-recipes compares). A non-finite
    /// loss (a diverged run) never is: it is no best epoch (so the manifest's `best_eval` is
    /// always finite).
    pub fn beats(&self, best: Option<&EvalResult>) -> bool {
        self.eval_loss.is_finite() && best.is_none_or(|b| self.eval_loss < b.eval_loss)
    }
}

/// Writes `result` into checkpoint folder `dir` (a temporary file renamed over, then the folder
/// synced: a crash leaves the old record or the new one). A non-finite loss is recorded too (as
/// null): the step was validated, it is just no best.
pub fn write_record(dir: &Path, result: &EvalResult) -> Result<()> {
    let text = serde_json::to_string_pretty(result)? + "\n";
    super::replace_synced(&dir.join(VALIDATION_FILE), text.as_bytes())
}

/// The validation record of checkpoint folder `dir` saved at `step`, if it has one for that step.
/// A record that cannot be read is an error naming it (it is only advisory: removing it is safe).
pub fn read_record(dir: &Path, step: u64) -> Result<Option<EvalResult>> {
    let path = dir.join(VALIDATION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let r: EvalResult = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a validation record ({{\"step\", \"epoch\", \"eval_loss\"}}); remove the file to resume without it (the epoch's validation is then not counted towards the best adapter)",
            path.display()
        )
    })?;
    Ok((r.step == step).then_some(r))
}

/// Rank 0's `record` on every rank (one all-reduce): what a resume does with it decides
/// collectives (validating again or not), so ranks must not go by their own view of the folder.
pub fn from_rank0(
    pg: &crate::dist::ProcessGroup,
    device: tch::Device,
    record: Option<EvalResult>,
) -> Result<Option<EvalResult>> {
    let mine: [i64; 6] = match record {
        Some(r) => [
            1,
            r.step as i64,
            r.epoch as i64,
            r.eval_loss.to_bits() as i64,
            r.eval_set.is_some() as i64,
            r.eval_set.unwrap_or(0) as i64,
        ],
        None => [0; 6],
    };
    let t = tch::Tensor::from_slice(&mine).to_device(device);
    pg.broadcast(&t, 0)?;
    let v: Vec<i64> = Vec::try_from(&t.to_device(tch::Device::Cpu))?;
    Ok((v[0] == 1).then(|| EvalResult {
        step: v[1] as u64,
        epoch: v[2] as u64,
        eval_loss: f64::from_bits(v[3] as u64),
        eval_set: (v[4] == 1).then_some(v[5] as u64),
    }))
}

/// The lower of two best results (either may be missing).
pub fn best_of(a: Option<EvalResult>, b: Option<EvalResult>) -> Option<EvalResult> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.beats(Some(&a)) { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: u64, eval_loss: f64) -> EvalResult {
        EvalResult {
            step,
            epoch: step / 10,
            eval_loss,
            eval_set: None,
        }
    }

    #[test]
    fn best_is_the_strictly_lower_loss() {
        assert!(at(1, 2.0).beats(None));
        assert!(at(2, 1.0).beats(Some(&at(1, 2.0))));
        assert!(!at(2, 2.0).beats(Some(&at(1, 2.0))));
        assert!(!at(2, f64::NAN).beats(Some(&at(1, 2.0))));
        assert!(!at(1, f64::NAN).beats(None));
        assert!(!at(1, f64::INFINITY).beats(None));
        assert_eq!(
            best_of(Some(at(1, 2.0)), Some(at(2, 1.0))),
            Some(at(2, 1.0))
        );
        assert_eq!(
            best_of(Some(at(1, 1.0)), Some(at(2, 1.0))),
            Some(at(1, 1.0))
        );
        assert_eq!(best_of(None, Some(at(2, 1.0))), Some(at(2, 1.0)));
        assert_eq!(best_of(Some(at(1, 1.0)), None), Some(at(1, 1.0)));
    }

    #[test]
    fn record_roundtrips_and_names_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("validation-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_record(&dir, 10).unwrap(), None);
        write_record(&dir, &at(10, 0.5)).unwrap();
        assert_eq!(read_record(&dir, 10).unwrap(), Some(at(10, 0.5)));
        // a record of another step (a folder replaced under the same name) does not count
        assert_eq!(read_record(&dir, 11).unwrap(), None);
        // (JSON has no NaN: a non-finite loss is written as null and read back as NaN)
        write_record(&dir, &at(10, f64::NAN)).unwrap();
        let text = std::fs::read_to_string(dir.join(VALIDATION_FILE)).unwrap();
        assert!(text.contains("\"eval_loss\": null"), "{text}");
        let back = read_record(&dir, 10).unwrap().unwrap();
        assert!(back.eval_loss.is_nan() && back.step == 10);
        std::fs::write(dir.join(VALIDATION_FILE), "{\"step\": 10").unwrap();
        let err = format!("{:#}", read_record(&dir, 10).unwrap_err());
        assert!(
            err.contains("validation.json") && err.contains("remove the file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
