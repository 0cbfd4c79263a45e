//! What stops the data pipeline (`DataError`) and what the pre-scan of a split found
//! (`ScanReport`, printed by `trainer data check` and at the start of training).
use std::collections::BTreeMap;
use std::fmt;

use super::records::Problem;
use crate::config::{BadRecords, DataFiles, LengthPolicy};

/// Everything that can stop the data pipeline; `Display` is the full user-facing message.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The model folder lacks or has a broken tokenizer, chat template or processor config.
    #[error("{0}")]
    ModelFolder(String),
    #[error("data.eval is not set: there is no evaluation split (set data.eval to a JSONL file, or train.validate: false)")]
    NoEvalSplit,
    /// The JSONL file itself cannot be read.
    #[error("{}: {}", .0.file.display(), .0.reason)]
    Read(Problem),
    /// Bad records under `data.bad_records: error`.
    #[error("{first}\n{count} bad record(s) in {file}: fix them, or set data.bad_records: skip to skip and count them (`trainer data check CONFIG` lists them all)")]
    BadRecords {
        first: Problem,
        count: usize,
        file: DataFiles,
    },
    /// Samples longer than `data.max_seq_len` under `data.max_seq_len_policy: error`.
    #[error("{first}\n{count} sample(s) longer than data.max_seq_len {max_seq_len} in {file}")]
    TooLong {
        first: Problem,
        count: usize,
        max_seq_len: usize,
        file: DataFiles,
    },
    /// An image that fails to decode at load time under `data.bad_records: error`.
    #[error("{0}\n(found while loading; set data.bad_records: skip to replace such samples and count them)")]
    Decode(Problem),
    /// Under `skip`, no sample of the dataset could be loaded as a replacement.
    #[error("{first}\nno sample of {file} can be loaded (every replacement failed too)")]
    NothingLoads { first: Problem, file: DataFiles },
    /// Arguments of `epoch_iter` (or `data dump --index`) that cannot describe a batch.
    #[error("invalid batch layout: {0}")]
    Layout(String),
    /// Reading or writing a tool's file (`data dump`, `data build-sco`).
    #[error("{0}")]
    Output(String),
    /// The loader's worker threads cannot start.
    #[error("{0}")]
    Loader(String),
}

/// What the pre-scan found; `Display` prints it as `trainer data check` shows it.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    pub split: String,
    pub file: DataFiles,
    /// Non-blank lines of the files.
    pub lines: usize,
    /// Samples in the dataset.
    pub ok: usize,
    /// Records that text_only: keep kept (part of `ok`).
    pub text_only_kept: usize,
    /// Samples cut to max_seq_len under `truncate` (part of `ok`).
    pub truncated: usize,
    /// Dropped records by reason ("bad record", "text-only", "too long", ...).
    pub skipped: BTreeMap<String, usize>,
    /// Bad records (parse, image path or header, tokenization), in file order.
    pub problems: Vec<Problem>,
    /// Records longer than max_seq_len under `max_seq_len_policy: error` (refused) or `skip`
    /// (dropped), named.
    pub too_long: Vec<Problem>,
    /// Well-formed records left out with nothing to train on (no supervised token), named.
    pub dropped: Vec<Problem>,
    /// Records whose id an earlier one has, and the first of them as text.
    pub repeated_ids: (usize, Option<String>),
    /// Files of a list of several that hold no record.
    pub empty_files: Vec<std::path::PathBuf>,
    /// Fields of the records that are not read.
    pub unread_fields: std::collections::BTreeSet<String>,
    /// Token counts of the samples (after the length policy), in dataset order.
    pub lengths: Vec<usize>,
    /// Tiles per image -> samples; text-only samples are under 0.
    pub tiles: BTreeMap<usize, usize>,
    pub supervised_tokens: u64,
    pub total_tokens: u64,
    /// The policies in force (decide what `check` makes of the problems).
    pub bad_records: Option<BadRecords>,
    pub max_seq_len: usize,
}

impl ScanReport {
    /// `(percent, tokens)` nearest-rank percentiles of the sample lengths (0 = min, 100 = max).
    pub fn length_percentiles(&self) -> Vec<(u32, usize)> {
        let mut v = self.lengths.clone();
        v.sort_unstable();
        if v.is_empty() {
            return vec![];
        }
        [0u32, 50, 90, 99, 100]
            .iter()
            .map(|&p| {
                let rank = ((p as f64 / 100.0) * v.len() as f64).ceil() as usize;
                (p, v[rank.clamp(1, v.len()) - 1])
            })
            .collect()
    }

    /// Supervised tokens / all tokens (0 when empty).
    pub fn supervised_share(&self) -> f64 {
        if self.total_tokens == 0 {
            0.0
        } else {
            self.supervised_tokens as f64 / self.total_tokens as f64
        }
    }

    /// All dropped records.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    /// What `open` makes of the problems: the first one (with a count) under `error`.
    pub fn verdict(&self, length_policy: LengthPolicy) -> Result<(), DataError> {
        if self.bad_records == Some(BadRecords::Error) {
            if let Some(first) = self.problems.first() {
                return Err(DataError::BadRecords {
                    first: first.clone(),
                    count: self.problems.len(),
                    file: self.file.clone(),
                });
            }
        }
        if length_policy == LengthPolicy::Error {
            if let Some(first) = self.too_long.first() {
                return Err(DataError::TooLong {
                    first: first.clone(),
                    count: self.too_long.len(),
                    max_seq_len: self.max_seq_len,
                    file: self.file.clone(),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} split: {}", self.split, self.file)?;
        writeln!(
            f,
            "  records: {} lines, {} ok ({} text-only kept, {} truncated), {} skipped",
            self.lines,
            self.ok,
            self.text_only_kept,
            self.truncated,
            self.skipped_total()
        )?;
        if !self.skipped.is_empty() {
            let parts: Vec<String> = self
                .skipped
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            writeln!(f, "  skipped by reason: {}", parts.join(", "))?;
        }
        let pct = self.length_percentiles();
        if pct.is_empty() {
            writeln!(f, "  token lengths: (no samples)")?;
        } else {
            let parts: Vec<String> = pct
                .iter()
                .map(|(p, n)| match p {
                    0 => format!("min {n}"),
                    100 => format!("max {n}"),
                    p => format!("p{p} {n}"),
                })
                .collect();
            writeln!(
                f,
                "  token lengths: {} (max_seq_len {})",
                parts.join(", "),
                self.max_seq_len
            )?;
        }
        let tiles: Vec<String> = self
            .tiles
            .iter()
            .map(|(t, n)| {
                if *t == 0 {
                    format!("text-only: {n}")
                } else {
                    format!("{t}: {n}")
                }
            })
            .collect();
        writeln!(f, "  tiles per image: {}", tiles.join(", "))?;
        writeln!(
            f,
            "  supervised tokens: {} of {} ({:.1}%)",
            self.supervised_tokens,
            self.total_tokens,
            100.0 * self.supervised_share()
        )?;
        if !self.unread_fields.is_empty() {
            writeln!(
                f,
                "  fields not read: {} (id, image and conversations are)",
                Vec::from_iter(self.unread_fields.iter().map(String::as_str)).join(", ")
            )?;
        }
        for file in &self.empty_files {
            writeln!(
                f,
                "  {} holds no record: it adds nothing to the split",
                file.display()
            )?;
        }
        if let (n @ 1.., Some(first)) = &self.repeated_ids {
            writeln!(f, "  repeated ids: {n} record(s) have the id of an earlier one, first {first}: they train as separate samples, but `data dump` and the logs name samples by id")?;
        }
        let n = self.problems.len() + self.too_long.len();
        if n > 0 {
            writeln!(f, "  problems: {n}")?;
            for p in self.problems.iter().chain(&self.too_long) {
                writeln!(f, "{p}")?;
            }
        }
        if !self.dropped.is_empty() {
            writeln!(f, "  left out: {}", self.dropped.len())?;
            for p in &self.dropped {
                writeln!(f, "{p}")?;
            }
        }
        Ok(())
    }
}
