//! `trainer eval`: self-correction turns over a benchmark, scored turn by turn, with a report that
//! answers the seed's open questions (does correction help, on which question types, which stage
//! changes, at what cost). Resumable: predictions.jsonl is appended one sample at a time and
//! samples already in it are skipped on the next run.
//!
//! Under the launcher, rank r takes batches r, r + W, ... (of `--batch-size` samples, cut from the
//! benchmark in order) and appends to its own
//! `predictions.rank-R.jsonl`; after a barrier rank 0 merges every file into predictions.jsonl (in
//! benchmark order) and writes the reports. A resumed run, at any world size, skips every sample
//! found in any of those files.
//!
//! `batch_size` samples are generated together (`Session::run_batch`). Greedy results depend on
//! it only through rounding: on the CPU in fp32 they are the same (tested), on a GPU in bf16 a
//! padded batch takes the masked attention kernel and a near-tie can flip a token, so keep it fixed
//! when comparing runs token by token. Rank 0 also draws accuracy.png and transitions.png
//! (`plots`), linked from report.md.
//!
//! Before anything is generated, every rank checks every question left (image file, prompt):
//! a bad line stops the run at once with its FILE:LINE, not when its turn comes. Scoring reads
//! the conclusion stage; a turn cut off at --max-new-tokens before its conclusion closed is
//! wrong, and the report counts such turns. Batches are cut from the benchmark in order and dealt
//! to the ranks; with sampling, each question's seed comes from `--seed` and its id. The report's verdict on self-correction is an exact McNemar
//! test of turn 0 against the last turn, and every accuracy has a 95 % Wilson interval.
pub mod answer;
pub mod compare;
mod font;
pub mod interrupt;
pub mod plots;
pub mod report;
mod settings;
pub mod stats;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::image::load_rgb;
use crate::data::records::resolve_image;
use crate::infer::item_id::ItemId;
use crate::infer::{InferOptions, Session};
use report::{Prediction, Report, TurnPrediction};
use settings::{agree_on_settings, check_settings, settings, write_settings};
pub use settings::{content_fingerprints, made_with};
pub(crate) use settings::{differences, what_predicts};

/// One benchmark line. Other fields (a benchmark's own metadata: `source`, `split`, ...) are
/// ignored, with one warning naming them.
#[derive(Debug, Clone, Deserialize)]
pub struct BenchItem {
    /// A string or an integer (many benchmarks number their questions), written back as read.
    pub id: ItemId,
    /// None (null or left out): a text-only question.
    #[serde(default)]
    pub image: Option<String>,
    pub question: String,
    /// Text, or a number (kept as written).
    #[serde(deserialize_with = "answer_text")]
    pub answer: String,
    #[serde(default)]
    pub choices: Option<Vec<String>>,
    #[serde(default)]
    pub category: Option<String>,
}

fn answer_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "`answer` must be a string or a number, not {other}"
        ))),
    }
}

impl BenchItem {
    /// A fingerprint of what is asked (image, question, choices; not the gold answer, which may be
    /// corrected later and is re-scored on resume).
    pub fn asked(&self) -> String {
        let choices = self.choices.as_deref().unwrap_or(&[]).join("\u{1f}");
        // (a text-only question's image is "", which no image path is)
        let image = self.image.as_deref().unwrap_or_default();
        let text = format!("{image}\u{1e}{}\u{1e}{choices}", self.question);
        format!("{:016x}", launcher::token::fnv1a(text.as_bytes()))
    }

    /// The sampling seed of this question: `seed` mixed with its id, so sampled runs draw
    /// independently per question, whatever its batch or rank.
    pub fn seed(&self, seed: u64) -> u64 {
        crate::infer::questions::seed_of(seed, &self.id)
    }
}

/// serde_json's message without its position: a benchmark line is one line, so " at line 1
/// column N" would contradict FILE:LINE (the column stays).
fn without_line(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => format!("{} (column {})", &text[..at], e.column()),
        None => text,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{file}:{line}: {reason}")]
    Bench {
        file: String,
        line: usize,
        reason: String,
    },
    /// Several bad lines, each `FILE:LINE: reason` on a line of its own (the first 20).
    #[error("{file}: {} bad lines:\n  {}", problems.len(), show_lines(file, problems))]
    BenchLines {
        file: String,
        problems: Vec<(usize, String)>,
    },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    /// Another rank's check failed (its own error says why).
    #[error(transparent)]
    Elsewhere(#[from] crate::dist::FailedElsewhere),
}

fn show_lines(file: &str, problems: &[(usize, String)]) -> String {
    let mut lines: Vec<String> = problems
        .iter()
        .take(20)
        .map(|(line, reason)| format!("{file}:{line}: {reason}"))
        .collect();
    if problems.len() > 20 {
        lines.push(format!("... and {} more", problems.len() - 20));
    }
    lines.join("\n  ")
}

/// Every bad line of a benchmark in one error (one line: `FILE:LINE: reason`, as before).
pub fn bench_problems(file: &str, mut problems: Vec<(usize, String)>) -> Result<(), EvalError> {
    match problems.len() {
        0 => Ok(()),
        1 => {
            let (line, reason) = problems.remove(0);
            Err(EvalError::Bench {
                file: file.to_string(),
                line,
                reason,
            })
        }
        _ => Err(EvalError::BenchLines {
            file: file.to_string(),
            problems,
        }),
    }
}

/// The fields a benchmark line may have.
const BENCH_FIELDS: [&str; 6] = ["id", "image", "question", "answer", "choices", "category"];
/// One benchmark line as a question, or why not. `seen`: ids so far and their lines; `ignored`
/// collects fields eval does not read.
fn read_bench_line(
    line: &str,
    number: usize,
    seen: &mut HashMap<ItemId, usize>,
    ignored: &mut std::collections::BTreeSet<String>,
) -> Result<BenchItem, String> {
    // (a LLaVA `<image>` marker in the question is the prompt's business: `Session::prompt_ids`)
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON: {}", without_line(&e)))?;
    let Some(fields) = value.as_object() else {
        return Err(format!(
            "expected a JSON object ({{\"id\", \"image\", \"question\", \"answer\"}}), got {}",
            if value.is_array() {
                "an array"
            } else {
                "a single value"
            }
        ));
    };
    ignored.extend(
        fields
            .keys()
            .filter(|k| !BENCH_FIELDS.contains(&k.as_str()))
            .cloned(),
    );
    check_field_types(fields)?;
    let item: BenchItem = serde_json::from_value(value.clone()).map_err(|e| {
        let why = without_line(&e);
        match field_named_otherwise(&why, fields) {
            Some(note) => format!("{why} ({note})"),
            None => why,
        }
    })?;
    // (before the other checks: a later line that repeats a bad line's id is named too)
    if let Some(first) = seen.insert(item.id.clone(), number) {
        return Err(format!("id {:?} repeats the one on line {first}", item.id));
    }
    if item.question.trim().is_empty() {
        return Err("`question` is empty: give the text to ask".into());
    }
    if item.image.as_deref().is_some_and(|p| p.trim().is_empty()) {
        return Err(
            "`image` is an empty string: give the image's path, or null (or no `image`) for a text-only question"
                .into(),
        );
    }
    if !answer::gold_is_scorable(&item.answer, item.choices.as_deref()) {
        return Err(format!(
            "answer {:?} is nothing once normalized (free-text answers are compared after lower-casing and dropping punctuation and the articles a, an, the); give a letter option as a capital (\"A\"), or the answer's words or number",
            item.answer
        ));
    }
    if let Some(choices) = item.choices.as_deref().filter(|c| !c.is_empty()) {
        // (options repeated as padding, "" or "nan" for a question with fewer, are no matter
        // while the answer names another option or a letter)
        let named = answer::normalize_text(&item.answer);
        let same = |c: &String| !named.is_empty() && answer::normalize_text(c) == named;
        if choices.iter().filter(|c| same(c)).count() > 1 {
            return Err(format!(
                "answer {:?} is the text of more than one of the choices: give its letter, or each option once",
                item.answer
            ));
        }
        if answer::gold_choice(&item.answer, choices).is_none() {
            return Err(format!(
                "answer {:?} is none of the {} choices (give its letter or its text)",
                item.answer,
                choices.len()
            ));
        }
    }
    Ok(item)
}

/// The text fields' JSON types, each named when wrong (serde's "invalid type: integer 5, expected
/// a string" does not say which field): `question` a string, `image` and `category` a string or
/// null, `choices` a list of strings or null. (`id` and `answer` take numbers too.)
fn check_field_types(fields: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    use serde_json::Value as V;
    let kind = |v: &V| match v {
        V::Null => "null",
        V::Bool(_) => "a boolean",
        V::Number(_) => "a number",
        V::String(_) => "a string",
        V::Array(_) => "a list",
        V::Object(_) => "an object",
    };
    for (key, nullable) in [("question", false), ("image", true), ("category", true)] {
        match fields.get(key) {
            Some(V::String(_)) | None => {}
            Some(V::Null) if nullable => {}
            Some(v) => {
                let expected = if nullable {
                    "a string or null"
                } else {
                    "a string"
                };
                return Err(format!("`{key}` is {}: expected {expected}", kind(v)));
            }
        }
    }
    match fields.get("choices") {
        Some(V::Array(options)) => match options.iter().position(|o| !o.is_string()) {
            Some(i) => Err(format!(
                "`choices` item {} is {}: expected the options as strings ([\"red\", \"blue\"])",
                i + 1,
                kind(&options[i])
            )),
            None => Ok(()),
        },
        Some(V::Null) | None => Ok(()),
        Some(v) => Err(format!(
            "`choices` is {}: expected a list of strings, or null",
            kind(v)
        )),
    }
}

/// Other benchmarks' names for the fields a line must have (MathVista's `query`, `pid`, ...).
const FIELD_SYNONYMS: [(&str, &[&str]); 4] = [
    (
        "id",
        &["pid", "question_id", "qid", "index", "idx", "sample_id"],
    ),
    (
        "question",
        &["query", "prompt", "problem", "text", "instruction"],
    ),
    (
        "answer",
        &["gt", "ground_truth", "label", "target", "solution"],
    ),
    (
        "image",
        &["image_path", "img", "image_file", "decoded_image"],
    ),
];

/// For serde's "missing field `question`" on a line that has `query`: the rename that fixes it.
fn field_named_otherwise(
    error: &str,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
    let missing = error.strip_prefix("missing field `")?.split('`').next()?;
    let (_, others) = FIELD_SYNONYMS.iter().find(|(f, _)| *f == missing)?;
    let found = others.iter().find(|o| fields.contains_key(**o))?;
    Some(format!("this line has `{found}`: rename it to `{missing}`"))
}

/// Reads BENCH.jsonl; every bad line is named by FILE:LINE, all in one error.
pub fn read_bench(path: &Path) -> Result<Vec<(usize, BenchItem)>, EvalError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let local = match e.kind() {
            // (a Hub dataset id, `AI4Math/MathVista`, is not downloaded)
            std::io::ErrorKind::NotFound => " (--data is a local JSONL file, one {\"id\", \"image\", \"question\", \"answer\"} object per line; a Hub dataset is not downloaded: write its questions to such a file first)",
            _ if path.is_dir() => " (--data is the benchmark's JSONL file, not its folder; its images' folder is --image-root)",
            _ => "",
        };
        EvalError::Io(format!("--data {file}: {e}{local}"))
    })?;
    // (a byte-order mark, as Windows editors save UTF-8, is not part of the first line)
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut items = Vec::new();
    let mut seen = HashMap::new();
    let mut ignored = std::collections::BTreeSet::new();
    let mut problems = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match read_bench_line(line, i + 1, &mut seen, &mut ignored) {
            Ok(item) => items.push((i + 1, item)),
            Err(reason) => problems.push((i + 1, reason)),
        }
    }
    bench_problems(&file, problems)?;
    if items.is_empty() {
        return Err(EvalError::Io(format!("{file}: the benchmark is empty (one JSON object per line: id, image, question, answer)")));
    }
    // (once per process: the benchmark is read before the model loads and again by the run)
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !ignored.is_empty() {
        let names: Vec<String> = ignored.into_iter().collect();
        WARNED.call_once(|| {
            tracing::warn!(
                "{file}: field(s) {} are not read by eval (it reads {}): ignored",
                names.join(", "),
                BENCH_FIELDS.join(", ")
            )
        });
    }
    Ok(items)
}

fn read_predictions(path: &Path) -> Result<Vec<Prediction>, EvalError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        // unreadable is not empty: the file is rewritten from what is read here
        Err(e) => return Err(EvalError::Io(format!("{}: {e}", path.display()))),
    };
    let mut out = Vec::new();
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // (an interrupted write can also cut a multi-byte character)
        let parsed = std::str::from_utf8(line)
            .map_err(|e| e.to_string())
            .and_then(|l| serde_json::from_str::<Prediction>(l).map_err(|e| e.to_string()));
        match parsed {
            Ok(p) => out.push(p),
            // an interrupted write leaves a partial last line: drop it and redo that sample
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(EvalError::Bench {
                    file: path.display().to_string(),
                    line: i + 1,
                    reason: format!("unreadable prediction ({e}); delete the file to start over"),
                })
            }
        }
    }
    Ok(out)
}

/// This process's share of a distributed evaluation.
pub struct Shard<'a> {
    pub rank: usize,
    pub world: usize,
    /// Waits for every rank (the process group's barrier).
    pub barrier: &'a dyn Fn() -> Result<(), String>,
    /// Whether any rank passes true (an all-reduce; every rank must call it).
    pub any: &'a dyn Fn(bool) -> Result<bool, String>,
    /// Every rank's value, in rank order (an all-gather; every rank must call it).
    pub gather: &'a dyn Fn(i64) -> Result<Vec<i64>, String>,
}

pub struct EvalOptions {
    pub infer: InferOptions,
    pub image_root: PathBuf,
    pub out: PathBuf,
    pub limit: Option<usize>,
    pub training_metrics: Option<PathBuf>,
    /// Samples generated together (left-padded batches; see the module doc on greedy results).
    pub batch_size: usize,
    /// The model the predictions come from (e.g. its folder and adapter), compared on resume.
    pub made_with: serde_json::Value,
}

/// The model FLOPs of a whole training run, over all its ranks, from its metrics.jsonl: each step
/// line's `flops`; for lines written before that field, tflops (per rank) x step_s x world_size.
/// An error when the file cannot be read or holds no step line.
pub fn training_flops(path: &Path) -> Result<f64, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        EvalError::Io(format!(
            "--train-metrics {}: {e} (give the metrics.jsonl in a training run's train.output_dir)",
            path.display()
        ))
    })?;
    let step_flops = |v: &serde_json::Value| -> Option<f64> {
        if let Some(f) = v.get("flops").and_then(|f| f.as_f64()) {
            return Some(f);
        }
        // (a validation line has neither: no FLOPs, and no warning about its world size)
        let per_rank = v.get("tflops")?.as_f64()? * v.get("step_s")?.as_f64()? * 1e12;
        let world = v.get("world_size").and_then(|w| w.as_f64()).unwrap_or_else(|| {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("{}: step lines without world_size (an older trainer's): their training FLOPs are counted for one rank; multiply by the run's world size", path.display()));
            1.0
        });
        Some(per_rank * world)
    };
    let steps: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| step_flops(&v))
        .collect();
    if steps.is_empty() {
        return Err(EvalError::Io(format!(
            "--train-metrics {}: no step line with flops (or tflops and step_s): is it the metrics.jsonl of `trainer train`?",
            path.display()
        )));
    }
    Ok(steps.iter().sum())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |e| EvalError::Io(format!("{}: {e}", path.display()))
}

/// The per-rank prediction files (`predictions.rank-R.jsonl`) in `out`, sorted: an unfinished
/// run's (a finished one's are merged and removed).
pub(super) fn rank_files(out: &Path) -> Vec<PathBuf> {
    let mut ranks: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("predictions.rank-"))
        })
        .collect();
    ranks.sort();
    ranks
}

/// Every prediction already made: the merged file and any rank files of an interrupted run.
fn existing_predictions(out: &Path) -> Result<HashMap<ItemId, Prediction>, EvalError> {
    let mut done = HashMap::new();
    let mut files = vec![out.join("predictions.jsonl")];
    files.extend(rank_files(out));
    for f in files {
        for p in read_predictions(&f)? {
            done.insert(p.id.clone(), p);
        }
    }
    Ok(done)
}

/// Every stored prediction of a question of this benchmark was made for that question: an id
/// whose image, question or choices differ (another benchmark numbered the same way, an edited
/// line) is refused, as its predictions would be scored against the wrong answer.
/// Each rank reads the images of its own share (`mine`) only; an image that does not read now
/// is not compared (its answer needs none; a question left to ask says so when checked).
fn check_asked(
    items: &[(usize, BenchItem)],
    done: &HashMap<ItemId, Prediction>,
    (out, bench): (&Path, &str),
    image_root: &Path,
    mine: &dyn Fn(&str) -> bool,
) -> Result<(), EvalError> {
    for (line, item) in items {
        let Some(stored) = done.get(&item.id) else {
            continue;
        };
        let refuse = |what: String| {
            EvalError::Bench {
            file: bench.to_string(),
            line: *line,
            reason: format!(
                "id {:?}: the prediction for it in {} was made for {what}; use another --out, or delete its predictions*.jsonl to start over",
                item.id,
                out.display()
            ),
        }
        };
        if stored.asked.as_deref().is_some_and(|a| a != item.asked()) {
            return Err(refuse(
                "another question (image, question or choices differ)".into(),
            ));
        }
        // (the same path may hold another image now: a benchmark folder replaced in place)
        if let Some(digest) = stored.image_sha256.as_ref().filter(|_| mine(&item.id)) {
            if image_sha256(item, image_root).is_some_and(|now| &now != digest) {
                return Err(refuse(format!(
                    "another image: {} holds other bytes now",
                    item.image.as_deref().unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// sha256 of `item`'s image file (None: text-only, or it does not read).
fn image_sha256(item: &BenchItem, image_root: &Path) -> Option<String> {
    let path = resolve_image(item.image.as_deref()?, Some(image_root)).ok()?;
    crate::checkpoint::file_sha256(&path)
}

/// The day of text-only questions' prompts (Llama 3.2's chat template writes "Today Date" into a
/// prompt without an image), fixed before any prompt renders and the same on every rank (rank
/// 0's): --date, else the day an earlier run into `out` recorded (so a resumed run asks as it
/// asked, on another day or in another time zone), else today. None without text-only questions.
fn fix_template_date(
    items: &[(usize, BenchItem)],
    opts: &EvalOptions,
    shard: Option<&Shard>,
) -> Result<Option<String>, EvalError> {
    use crate::data::template::{fix_day, run_clock};
    if items.iter().all(|(_, it)| it.image.is_some()) {
        return Ok(None);
    }
    let recorded = std::fs::read_to_string(opts.out.join("settings.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| Some(v.get("template_date")?.as_str()?.to_string()));
    // (the clock is fixed once, by the agreed value: nothing has rendered a prompt yet)
    let mine = run_clock(opts.infer.date.is_some(), recorded.as_deref());
    // (every rank gathers: whether to is decided by the benchmark alone, which all ranks read)
    let agreed = match shard {
        Some(s) => (s.gather)(mine)
            .map_err(|e| EvalError::Io(format!("agreeing on the prompts' date: {e}")))?[0],
        None => mine,
    };
    Ok(Some(fix_day(agreed)))
}

/// Every question a run will ask, checked before the first is generated (a bad one would
/// otherwise stop the run when its turn comes, hours in): its image file exists and its prompt
/// builds (no literal image token, the template renders); the images of this rank's own share
/// (`mine`) are decoded too (a truncated or corrupt file), each by one rank only.
fn check_items(
    session: &Session,
    items: &[&(usize, BenchItem)],
    opts: &EvalOptions,
    bench: &str,
    mine: &dyn Fn(&str) -> bool,
) -> Result<(), EvalError> {
    let mut problems = vec![];
    for (line, item) in items {
        let checked = (|| {
            let path = item
                .image
                .as_deref()
                .map(|p| resolve_image(p, Some(&opts.image_root)))
                .transpose()?;
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(format!(
                    "image {} not found (paths are relative to --image-root {})",
                    path.display(),
                    opts.image_root.display()
                ));
            }
            session
                .prompt_ids(&item.question, path.is_some(), &[], &opts.infer)
                .map_err(|e| format!("id {:?}: {e}", item.id))?;
            if let Some(path) = path.filter(|_| mine(&item.id)) {
                load_rgb(&path)?;
            }
            Ok(())
        })();
        if let Err(reason) = checked {
            problems.push((*line, reason));
        }
    }
    bench_problems(bench, problems)
}

/// After every rank finished its share, a question without a prediction in `done` is in a rank
/// file rank 0 cannot see: another node's, with an --out that is not shared. An error (after the
/// merge, which keeps what is there).
fn check_all_predicted(
    items: &[(usize, BenchItem)],
    done: &HashMap<ItemId, Prediction>,
    out: &Path,
) -> Result<(), EvalError> {
    let missing: Vec<&str> = items
        .iter()
        .filter(|(_, it)| !done.contains_key(&it.id))
        .map(|(_, it)| it.id.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(EvalError::Io(format!(
        "{} of {} questions have no prediction in {} after every rank finished (ids {:?}{}): \
         with several nodes, --out must be a folder every node shares; the predictions made are \
         kept (here in predictions.jsonl, on the other nodes in predictions.rank-R.jsonl): copy \
         them here, or run again with a shared --out, which skips them",
        missing.len(),
        items.len(),
        out.display(),
        &missing[..missing.len().min(5)],
        if missing.len() > 5 { ", ..." } else { "" }
    )))
}

/// Rank `rank`'s batches: fixed batches of `batch_size` over the whole benchmark, dealt to the
/// ranks in turn.
fn shares(
    items: &[(usize, BenchItem)],
    batch_size: usize,
    world: usize,
    rank: usize,
) -> impl Iterator<Item = &[(usize, BenchItem)]> {
    items
        .chunks(batch_size.max(1))
        .enumerate()
        .filter(move |(k, _)| k % world.max(1) == rank)
        .map(|(_, c)| c)
}

/// Opens `path` for appending (created when missing), first cutting a torn last line (a write
/// interrupted mid-line) so the next line starts clean; a whole last line that only lacks its
/// newline (counted as done by `read_predictions`) gets one instead.
fn open_for_append(path: &Path) -> std::io::Result<std::fs::File> {
    open_lines_for_append(path, &|l| serde_json::from_str::<Prediction>(l).is_ok())
}

/// [`open_for_append`] for any file of JSON lines, `is_whole` telling a last line that lacks
/// only its newline from one an interrupted write cut.
pub fn open_lines_for_append(
    path: &Path,
    is_whole: &dyn Fn(&str) -> bool,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        file.read_exact_at(&mut last, len - 1)?;
    }
    // the whole file is read only when its end is torn
    if last[0] != b'\n' {
        let bytes = std::fs::read(path)?;
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let whole = std::str::from_utf8(&bytes[keep..])
            .ok()
            .is_some_and(is_whole);
        match whole {
            true => file.write_all(b"\n")?,
            false => file.set_len(keep as u64)?,
        }
    }
    Ok(file)
}

/// A stored prediction scored against the benchmark's current answer (it may have been fixed
/// since the prediction was made) and by the current rules.
fn rescored(mut p: Prediction, item: &BenchItem) -> Prediction {
    for t in &mut p.turns {
        // (the stored answer and stages as the current parser reads the stored text, so a
        // resumed report equals a fresh one)
        t.extracted = answer::extract(&t.text);
        t.stages = stage_map(&crate::infer::Stages::parse(&t.text));
        score(t, item);
    }
    p.answer = item.answer.clone();
    p.category = item.category.clone();
    // (an older trainer's string for an integer id: written back as the benchmark writes it)
    p.id = item.id.clone();
    p.scoring = answer::SCORING_RULES;
    p
}

/// Scores one turn against `item`: correct and canonical answer. A turn cut off at
/// --max-new-tokens gave an answer only if its conclusion closed (`</CONCLUSION>`, non-empty):
/// otherwise it is wrong, whatever number its last line or a half-written conclusion ("1" of
/// "12") happens to hold.
fn score(t: &mut TurnPrediction, item: &BenchItem) {
    let choices = item.choices.as_deref();
    let concluded = crate::infer::stages::conclusion_closed(&t.text)
        && t.stages
            .get("conclusion")
            .is_some_and(|c| c.as_deref().is_some_and(|c| !c.trim().is_empty()));
    let answered = t.finished || concluded;
    t.correct = answered && answer::is_correct(&t.extracted, &item.answer, choices);
    // (a cut-off turn gave no answer: its half-written last line is not one that "answer
    // changed" compares)
    t.canonical = match answered {
        true => answer::canonical(&t.extracted, &item.answer, choices),
        false => "cut off".into(),
    };
    t.no_answer = answered && answer::unreadable(&t.canonical, &item.answer, choices);
}

/// A turn's stages as predictions.jsonl stores them (stage name -> text, if present).
fn stage_map(stages: &crate::infer::Stages) -> std::collections::BTreeMap<String, Option<String>> {
    stages
        .as_list()
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect()
}

/// Scores one sample's turns.
fn prediction(item: &BenchItem, turns: Vec<crate::infer::TurnOutput>) -> Prediction {
    let mut p = Prediction {
        id: item.id.clone(),
        answer: item.answer.clone(),
        category: item.category.clone(),
        asked: Some(item.asked()),
        image_sha256: None,
        scoring: answer::SCORING_RULES,
        turns: turns
            .into_iter()
            .map(|t| {
                let extracted = answer::extract(&t.text);
                let stages = stage_map(&t.stages);
                TurnPrediction {
                    correct: false,
                    extracted,
                    text: t.text,
                    stages,
                    prompt_tokens: t.prompt_tokens,
                    tiles: t.tiles,
                    // (by an end token or a stop string, even on the last token allowed)
                    finished: t.finished,
                    tokens: t.tokens,
                    seconds: t.seconds,
                    canonical: String::new(),
                    no_answer: false,
                }
            })
            .collect(),
    };
    for t in &mut p.turns {
        score(t, item);
    }
    p
}

/// `local` on this rank, made an error on every rank when it is one on any (the others get
/// `elsewhere`): a rank failing alone would leave the others waiting at the next collective.
fn agree<T>(
    shard: Option<&Shard>,
    local: Result<T, EvalError>,
    elsewhere: impl FnOnce() -> String,
) -> Result<T, EvalError> {
    if let Some(s) = shard {
        let any = (s.any)(local.is_err())
            .map_err(|e| EvalError::Io(format!("agreeing with the other ranks: {e}")))?;
        if any && local.is_ok() {
            let what = elsewhere();
            return Err(crate::dist::FailedElsewhere { what, rank: None }.into());
        }
    }
    local
}

/// What ran, for the report: the benchmark, the weights' folders, the generation settings.
fn setup_of(bench: &str, opts: &EvalOptions) -> report::Setup {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    let m = &opts.made_with;
    report::Setup {
        benchmark: bench.to_string(),
        limit: opts.limit,
        model: text(&m["model"]).unwrap_or_default(),
        adapter: text(&m["adapter"]),
        // (recorded as [folder, manifest sha256])
        checkpoint: text(&m["checkpoint"][0]),
        turns: opts.infer.turns,
        position: opts.infer.position,
        max_new_tokens: opts.infer.max_new_tokens,
        temperature: opts.infer.temperature,
        top_k: opts.infer.top_k,
        top_p: opts.infer.top_p,
        seed: opts.infer.seed,
        correction_prompt: opts.infer.correction_prompt.clone(),
    }
}

/// Runs (or resumes) the evaluation and, on rank 0, writes predictions.jsonl, report.json and
/// report.md and returns the report. `progress(done, total)` is called after each sample.
pub fn run(
    session: &Session,
    bench: &Path,
    opts: &EvalOptions,
    shard: Option<&Shard>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<Report>, EvalError> {
    let (rank, world) = shard.map_or((0, 1), |s| (s.rank, s.world));
    let bench_file = bench.display().to_string();
    // Every rank reads the benchmark; rank 0 holds --out for the run (a second eval into it would
    // interleave lines and delete the rank files this one merges). A failure on any rank (a file
    // one node cannot read, the lock) stops every rank here, before anything is written.
    let started = (|| {
        let items: Vec<_> = read_bench(bench)?
            .into_iter()
            .take(opts.limit.unwrap_or(usize::MAX))
            .collect();
        if opts.out.exists() && !opts.out.is_dir() {
            return Err(EvalError::Io(format!(
                "--out {}: a file, not a folder: give the folder predictions.jsonl, report.json and report.md go into",
                opts.out.display()
            )));
        }
        // report.md or report.json without the settings and predictions an evaluation writes
        // first: someone's own files, which the report would replace
        let ours = ["settings.json", "predictions.jsonl"].map(|f| opts.out.join(f).exists());
        if let (false, Some(theirs)) = (
            ours.contains(&true),
            ["report.md", "report.json"]
                .into_iter()
                .find(|f| opts.out.join(f).exists()),
        ) {
            return Err(EvalError::Io(format!(
                "--out {}: holds {theirs} but is not an evaluation's folder (no settings.json or predictions.jsonl): it is left as it is; give another --out",
                opts.out.display()
            )));
        }
        std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
        let lock = match rank {
            0 => Some(
                crate::checkpoint::ExportLock::acquire(&opts.out)
                    .map_err(|e| EvalError::Io(format!("{e:#}")))?,
            ),
            _ => None,
        };
        Ok((items, lock))
    })();
    let (items, _lock) = agree(shard, started, || {
        format!(
            "another rank could not start evaluating into {}",
            opts.out.display()
        )
    })?;
    let template_date = fix_template_date(&items, opts, shard)?;
    let now = settings(opts, template_date.as_deref());
    if let Some(s) = shard {
        agree_on_settings(s, &now)?;
    }
    // every rank checks the stored predictions, the settings and every question left (image file,
    // prompt) before anything is generated or written; any rank's failure stops all
    let checked = (|| {
        let done = existing_predictions(&opts.out)?;
        let mine: std::collections::HashSet<&str> = shares(&items, opts.batch_size, world, rank)
            .flatten()
            .map(|(_, item)| item.id.as_str())
            .collect();
        let is_mine = |id: &str| mine.contains(id);
        check_asked(
            &items,
            &done,
            (&opts.out, &bench_file),
            &opts.image_root,
            &is_mine,
        )?;
        if check_settings(&opts.out, &now, !done.is_empty())? && rank == 0 {
            write_settings(&opts.out, &now)?;
        }
        let left: Vec<&(usize, BenchItem)> = items
            .iter()
            .filter(|(_, item)| !done.contains_key(&item.id))
            .collect();
        check_items(session, &left, opts, &bench_file, &|id| mine.contains(id))?;
        Ok(done)
    })();
    let mut done = agree(shard, checked, || {
        "another rank's checks failed".to_string()
    })?;
    // fixed batches over the whole benchmark, dealt to the ranks in turn: a question's batch mates
    // (and so its greedy result on a GPU, see the module doc) do not depend on the world size; a
    // resumed batch runs only its questions left
    let my_batches: Vec<&[(usize, BenchItem)]> =
        shares(&items, opts.batch_size, world, rank).collect();
    let mine_total: usize = my_batches.iter().map(|c| c.len()).sum();
    let rank_path = opts.out.join(format!("predictions.rank-{rank}.jsonl"));
    // appended to, never rewritten: it may hold predictions of samples outside this run's share
    // (another world size or --limit before), which the merge below keeps
    let mut file = open_for_append(&rank_path).map_err(io_err(&rank_path))?;
    let bad = |line: usize| {
        let file = bench_file.clone();
        move |reason: String| EvalError::Bench { file, line, reason }
    };
    let todo: Vec<Vec<&(usize, BenchItem)>> = my_batches
        .iter()
        .map(|c| {
            c.iter()
                .filter(|(_, it)| !done.contains_key(&it.id))
                .collect()
        })
        .filter(|c: &Vec<_>| !c.is_empty())
        .collect();
    let mut finished = mine_total - todo.iter().map(Vec::len).sum::<usize>();
    if finished > 0 {
        tracing::info!(
            "resuming: {finished} of this rank's {mine_total} questions already answered in {}, {} to go",
            opts.out.display(),
            mine_total - finished
        );
    }
    let interrupt_note = interrupt::install(interrupt::note("eval", "predictions", &rank_path));
    for chunk in &todo {
        // (a text-only question: None)
        let images = chunk
            .iter()
            .map(|(line, item)| {
                let Some(image) = item.image.as_deref() else {
                    return Ok(None);
                };
                let path = resolve_image(image, Some(&opts.image_root)).map_err(bad(*line))?;
                load_rgb(&path).map(Some).map_err(bad(*line))
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        let inputs: Vec<_> = chunk
            .iter()
            .zip(&images)
            .map(|((_, item), image)| (image.as_ref(), item.question.as_str()))
            .collect();
        let seeds: Vec<u64> = chunk
            .iter()
            .map(|(_, item)| item.seed(opts.infer.seed))
            .collect();
        let outputs = session.run_batch_seeded(&inputs, &seeds, &opts.infer, &mut |_, _, _| {})?;
        for ((_, item), turns) in chunk.iter().zip(outputs) {
            let mut pred = prediction(item, turns);
            pred.image_sha256 = image_sha256(item, &opts.image_root);
            // one write per line (writeln! makes two, which another writer could split)
            let line = serde_json::to_string(&pred).unwrap_or_default() + "\n";
            file.write_all(line.as_bytes())
                .and_then(|_| file.flush())
                .map_err(io_err(&rank_path))?;
            done.insert(item.id.clone(), pred);
        }
        finished += chunk.len();
        progress(finished, mine_total);
    }
    drop(file);
    // (rank 0's merge below removes the rank files the note names)
    drop(interrupt_note);
    if let Some(s) = shard {
        (s.barrier)().map_err(|e| EvalError::Io(format!("waiting for the other ranks: {e}")))?;
    }
    if rank != 0 {
        return Ok(None);
    }
    // rank 0: merge every rank's file, in benchmark order, then drop the rank files; predictions
    // of samples outside this run (an earlier full run, before this --limit) are kept after them
    let mut done = existing_predictions(&opts.out)?;
    let complete = check_all_predicted(&items, &done, &opts.out);
    let mut rescored_differently = 0;
    let preds: Vec<Prediction> = items
        .iter()
        .filter_map(|(_, it)| {
            done.remove(&it.id).map(|p| {
                let before: Vec<bool> = p.turns.iter().map(|t| t.correct).collect();
                let p = rescored(p, it);
                rescored_differently += usize::from(p.turns.iter().map(|t| t.correct).ne(before));
                p
            })
        })
        .collect();
    if rescored_differently > 0 {
        // (a stored prediction scored by other rules, or against a gold answer fixed since)
        tracing::warn!(
            "{rescored_differently} stored prediction(s) score differently now than when they were stored (this trainer's scoring rules, v{}, and the benchmark's current answers): the report counts the new scores",
            answer::SCORING_RULES
        );
    }
    let mut others: Vec<Prediction> = done.into_values().collect();
    others.sort_by(|a, b| a.id.cmp(&b.id));
    let merged = opts.out.join("predictions.jsonl");
    let text: String = preds
        .iter()
        .chain(&others)
        .map(|p| serde_json::to_string(p).unwrap_or_default() + "\n")
        .collect();
    // durable before the rank files it replaces go
    crate::checkpoint::replace_synced(&merged, text.as_bytes())
        .map_err(|e| EvalError::Io(format!("{}: {e:#}", merged.display())))?;
    for path in rank_files(&opts.out) {
        let _ = std::fs::remove_file(path);
    }
    complete?;
    let params: usize = session
        .model
        .parameter_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as usize)
        .sum();
    let flops = crate::train::flops::FlopCount::of_base(session.model);
    let turn_flops = |t: &TurnPrediction| flops.inference_flops(t.prompt_tokens, t.tokens, t.tiles);
    let mut report = report::build(
        &preds,
        params,
        &turn_flops,
        opts.training_metrics
            .as_deref()
            .map(training_flops)
            .transpose()?,
    );
    report.setup = Some(setup_of(&bench_file, opts));
    // (whole or not at all: a crash while writing leaves the previous report)
    let write = |name: &str, text: String| {
        let path = opts.out.join(name);
        crate::checkpoint::replace_synced(&path, text.as_bytes())
            .map_err(|e| EvalError::Io(format!("{e:#}")))
    };
    write(
        "report.json",
        serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
    )?;
    write("report.md", report::markdown(&report))?;
    plots::write_all(&report, &opts.out).map_err(EvalError::Io)?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(answer: &str) -> BenchItem {
        BenchItem {
            id: "x".into(),
            image: Some("i.png".into()),
            question: "How many?".into(),
            answer: answer.into(),
            choices: None,
            category: None,
        }
    }

    fn turn(text: &str, finished: bool) -> TurnPrediction {
        let stages = stage_map(&crate::infer::Stages::parse(text));
        TurnPrediction {
            text: text.into(),
            extracted: answer::extract(text),
            correct: false,
            stages,
            prompt_tokens: 0,
            tiles: 0,
            tokens: 0,
            seconds: 0.0,
            finished,
            canonical: String::new(),
            no_answer: false,
        }
    }

    /// Every bad line of a benchmark is named at once, each as FILE:LINE (one bad line: the
    /// error as before).
    #[test]
    fn every_bad_benchmark_line_is_named_at_once() {
        let dir = std::env::temp_dir().join(format!("bench-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.jsonl");
        let good = r#"{"id": "a", "image": "x.png", "question": "q?", "answer": "B", "choices": ["1", "2"]}"#;
        let text = [
            good,
            "{not json",
            good,
            r#"{"id": "c", "image": "x.png", "question": "q?", "answer": "C", "choices": ["1", "2"]}"#,
            r#"{"id": "d", "image": "x.png", "question": "q?", "answer": "the"}"#,
            r#"{"id": "d", "image": "x.png", "question": "q?", "answer": "4"}"#,
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        let e = read_bench(&path).unwrap_err().to_string();
        let f = path.display();
        assert!(e.starts_with(&format!("{f}: 5 bad lines:")), "{e}");
        for line in [2, 3, 4, 5, 6] {
            assert!(e.contains(&format!("\n  {f}:{line}: ")), "{e}");
        }
        assert!(e.contains("repeats the one on line 1") && e.contains("none of the 2 choices"));
        // (a repeat of a bad line's id is named too)
        assert!(e.contains("nothing once normalized") && e.contains("repeats the one on line 5"));
        std::fs::write(&path, [good, "{not json"].join("\n")).unwrap();
        let e = read_bench(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{f}:2: ")), "{e}");
        // another benchmark's field names (MathVista's query): the rename is named
        let mathvista = r#"{"pid": "1", "image": "x.png", "query": "q?", "answer": "4"}"#;
        std::fs::write(&path, mathvista).unwrap();
        let e = read_bench(&path).unwrap_err().to_string();
        assert!(
            e.contains("missing field `id` (this line has `pid`: rename it to `id`)"),
            "{e}"
        );
        let e = read_bench(&dir.join("AI4Math/MathVista"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--data is a local JSONL file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Choices repeated as padding ("" or "nan" for a question with fewer options) are read when
    /// the answer is a letter or another option; an answer whose text is two options is refused.
    #[test]
    fn padded_choices_read_and_an_ambiguous_answer_does_not() {
        let line = |answer: &str, choices: &str| {
            let text = format!(
                r#"{{"id": "x", "question": "q", "answer": "{answer}", "choices": {choices}}}"#
            );
            read_bench_line(&text, 1, &mut HashMap::new(), &mut Default::default())
        };
        assert!(line("B", r#"["red", "blue", "", ""]"#).is_ok());
        assert!(line("blue", r#"["red", "blue", "nan", "nan"]"#).is_ok());
        let e = line("Red", r#"["red", "red "]"#).unwrap_err();
        assert!(
            e.contains("is the text of more than one of the choices"),
            "{e}"
        );
    }

    /// The training compute is the run's, over all ranks: each step's `flops`, or for older
    /// lines the per-rank tflops x seconds x world size; validation lines add nothing.
    #[test]
    fn training_flops_count_every_rank() {
        let dir = std::env::temp_dir().join(format!("eval-train-flops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let lines = [
            r#"{"step": 1, "tflops": 2.0, "step_s": 0.5, "flops": 2e12, "world_size": 2}"#,
            r#"{"step": 2, "tflops": 2.0, "step_s": 0.5, "world_size": 2}"#,
            r#"{"step": 3, "tflops": 1.0, "step_s": 1.0}"#,
            r#"{"validation": true, "step": 3, "eval_loss": 1.0}"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        assert_eq!(training_flops(&path).unwrap(), 2e12 + 2e12 + 1e12);
        // no step line, no file: errors naming the flag and the file
        std::fs::write(&path, lines[3]).unwrap();
        let e = training_flops(&path).unwrap_err().to_string();
        assert!(
            e.starts_with("--train-metrics ") && e.contains("no step line"),
            "{e}"
        );
        let e = training_flops(&dir.join("none.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none.jsonl") && e.contains("train.output_dir"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn saved(id: &str) -> Prediction {
        Prediction {
            id: id.into(),
            answer: "3".into(),
            category: None,
            asked: None,
            image_sha256: None,
            scoring: 0,
            turns: vec![turn("<CONCLUSION> 3 </CONCLUSION>", true)],
        }
    }

    /// A rank file's last line: torn, it is cut (the sample is redone); whole but without its
    /// newline (counted as done), it gets the newline, so the next line starts clean and the
    /// sample stays.
    #[test]
    fn a_whole_last_line_without_newline_is_kept() {
        let dir = std::env::temp_dir().join(format!("eval-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("predictions.rank-0.jsonl");
        let line = |id: &str| serde_json::to_string(&saved(id)).unwrap();
        std::fs::write(&path, format!("{}\n{}", line("a"), line("b"))).unwrap();
        let mut f = open_for_append(&path).unwrap();
        f.write_all(format!("{}\n", line("c")).as_bytes()).unwrap();
        let ids: Vec<ItemId> = read_predictions(&path)
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["a".into(), "b".into(), "c".into()]);
        let torn = &line("d")[..20];
        std::fs::write(&path, format!("{}\n{torn}", line("a"))).unwrap();
        drop(open_for_append(&path).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", line("a"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stored prediction is read again from its text on resume: an answer extracted by an
    /// older parser (here, from a conclusion tag the reasoning mentioned) does not stay.
    #[test]
    fn stored_predictions_are_read_again_from_their_text() {
        let text = "<REASONING>put it in <CONCLUSION> tags</REASONING><CONCLUSION> 3 </CONCLUSION>";
        let mut p = saved("a");
        p.turns[0] = turn(text, true);
        p.turns[0].extracted = "tags</REASONING><CONCLUSION> 3".into();
        p.turns[0]
            .stages
            .insert("conclusion".into(), Some("stale".into()));
        let p = rescored(p, &item("3"));
        assert_eq!(p.turns[0].extracted, "3");
        assert_eq!(p.turns[0].stages["conclusion"].as_deref(), Some("3"));
        assert!(p.turns[0].correct);
    }

    /// Rank 0 refuses to report on a subset: ids no rank file it can see holds are named.
    #[test]
    fn questions_without_a_prediction_after_the_run_are_an_error() {
        let mut a = item("1");
        a.id = "a".into();
        let mut b = item("1");
        b.id = "b".into();
        let items = vec![(1, a), (2, b)];
        let mut done = HashMap::new();
        done.insert("a".into(), saved("a"));
        let err = check_all_predicted(&items, &done, Path::new("/out"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 of 2 questions")
                && err.contains("[\"b\"]")
                && err.contains("shared --out"),
            "{err}"
        );
        done.insert("b".into(), saved("b"));
        assert!(check_all_predicted(&items, &done, Path::new("/out")).is_ok());
    }

    /// Each question samples from its own seed: equal for the same id, whatever its position.
    #[test]
    fn questions_are_seeded_by_id() {
        let (mut a, mut b) = (item("1"), item("1"));
        b.id = "y".into();
        assert_ne!(a.seed(0), b.seed(0));
        assert_ne!(a.seed(0), a.seed(1));
        a.question = "other".into();
        assert_eq!(a.seed(5), item("2").seed(5), "the id alone decides");
        assert_ne!(a.asked(), item("1").asked(), "what is asked differs");
    }

    /// A finished turn without an answer scoring can read (no number for a numeric question, no
    /// option of a multiple-choice one, an empty conclusion) is marked no_answer, apart from a
    /// wrong answer; a cut-off turn is counted as cut off, not as this; report.md shows both.
    #[test]
    fn a_turn_without_a_readable_answer_is_told_from_a_wrong_one() {
        let no_answer = |text: &str, item: &BenchItem| {
            let mut t = turn(text, true);
            score(&mut t, item);
            assert!(!t.correct, "{text}");
            t.no_answer
        };
        let three = item("3");
        assert!(no_answer(
            "<CONCLUSION> several circles </CONCLUSION>",
            &three
        ));
        assert!(
            !no_answer("<CONCLUSION> 4 </CONCLUSION>", &three),
            "a wrong number"
        );
        let mut choice = item("B");
        choice.choices = Some(vec!["red".into(), "blue".into()]);
        assert!(no_answer("<CONCLUSION> purple </CONCLUSION>", &choice));
        assert!(!no_answer("<CONCLUSION> red </CONCLUSION>", &choice));
        let text = item("a cat");
        assert!(no_answer(
            "<SUMMARY> s </SUMMARY><CONCLUSION></CONCLUSION>",
            &text
        ));
        assert!(!no_answer("<CONCLUSION> a dog </CONCLUSION>", &text));
        let mut cut = turn("<REASONING> there are", false);
        score(&mut cut, &three);
        assert!(!cut.no_answer, "cut off, not unreadable");
        // counted per turn in the report, and shown
        let mut p = saved("a");
        p.turns[0] = turn("<CONCLUSION> several </CONCLUSION>", true);
        let p = rescored(p, &three);
        let r = report::build(&[p], 1, &|_| 0.0, None);
        assert_eq!((r.turns[0].no_answer, r.turns[0].cut_off), (1, 0));
        // two unreadable turns are the same answer for "answer changed", whatever their text
        let mut p = saved("b");
        p.turns = vec![
            turn("<CONCLUSION> several </CONCLUSION>", true),
            turn(
                "<REASONING> r </REASONING><CONCLUSION></CONCLUSION> many",
                true,
            ),
        ];
        let p = rescored(p, &three);
        assert!(p
            .turns
            .iter()
            .all(|t| t.no_answer && t.canonical.starts_with("text")));
        assert_ne!(p.turns[0].canonical, p.turns[1].canonical);
        let r = report::build(&[p], 1, &|_| 0.0, None);
        assert_eq!(r.transitions[0].changed, 0);
        assert!(
            report::markdown(&r).contains("| cut off at max tokens | no readable answer |"),
            "{}",
            report::markdown(&r)
        );
    }

    /// A turn cut off at --max-new-tokens in its reasoning gave no answer, whatever number its
    /// last line holds; one cut off inside its conclusion, or one that finished, is scored.
    #[test]
    fn a_cut_off_answer_without_conclusion_is_wrong() {
        let cut = "<REASONING> there are 3 circles and";
        let mut t = turn(cut, false);
        score(&mut t, &item("3"));
        assert!(!t.correct, "cut off before its conclusion");
        let mut t = turn(cut, true);
        score(&mut t, &item("3"));
        assert!(
            t.correct,
            "the same text, finished: its last line is the answer"
        );
        let mut t = turn("<REASONING> r </REASONING><CONCLUSION> 1", false);
        score(&mut t, &item("1"));
        assert!(
            !t.correct,
            "cut off inside the conclusion (it may have been 12)"
        );
        let mut t = turn(
            "<REASONING> r </REASONING><CONCLUSION> 3 </CONCLUSION> and",
            false,
        );
        score(&mut t, &item("3"));
        assert!(t.correct, "cut off after its conclusion closed");
        assert_eq!(t.canonical, "number 3");
        let mut t = turn("<REASONING> 3 circles </REASONING><CONCLUSION>", false);
        score(&mut t, &item("3"));
        assert!(
            !t.correct,
            "cut off right after opening an empty conclusion"
        );
    }
}
