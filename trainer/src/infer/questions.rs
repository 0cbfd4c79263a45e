//! `trainer infer --questions Q.jsonl --out G.jsonl`: many questions at once, in batches, one
//! JSON line of generations per question (`trainer eval` scores; this only generates), as a list
//! of prompts goes through transformers' `generate`. The output is appended a line at a time, so
//! an interrupted run keeps what it generated and the same command resumes from it, asking only
//! the questions whose ids are not in it yet (with the settings the file's lines were made with;
//! other settings are refused, as they would mix two runs' generations in one file).
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::item_id::ItemId;
use super::InferError;

/// One question of a questions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// 1-based line in the file.
    pub line: usize,
    /// The line's `id` (a string or an integer), else `line-N`.
    pub id: ItemId,
    /// Resolved against the image root; None: a text-only question.
    pub image: Option<PathBuf>,
    /// The image as the line writes it (what a stored answer is compared with on resume).
    pub image_text: Option<String>,
    pub question: String,
}

/// The sampling seed of question `id`: `seed` mixed with it, so a sampled answer does not depend
/// on its batch (as `trainer eval` seeds each question).
pub fn seed_of(seed: u64, id: &str) -> u64 {
    seed ^ launcher::token::fnv1a(id.as_bytes())
}

/// Reads a questions file: a JSON object per line with `question`, optional `id` and `image`
/// (other fields, e.g. a benchmark's `answer`, are ignored); every bad line is named FILE:LINE,
/// all in one error.
pub fn read(path: &Path, image_root: &Path) -> Result<Vec<Question>, InferError> {
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| InferError::Input(format!("{file}: {e}")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (mut questions, mut problems) = (Vec::new(), Vec::new());
    let mut seen: HashMap<ItemId, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, i + 1, image_root) {
            Ok(q) => match seen.insert(q.id.clone(), q.line) {
                Some(first) => problems.push((
                    q.line,
                    format!("id {:?} repeats the one on line {first}", q.id),
                )),
                None => questions.push(q),
            },
            Err(reason) => problems.push((i + 1, reason)),
        }
    }
    // (FILE:LINE: reason, one line each, as eval names a benchmark's)
    crate::eval::bench_problems(&file, problems).map_err(|e| InferError::Input(e.to_string()))?;
    if questions.is_empty() {
        return Err(InferError::Input(format!(
            "{file}: no questions (one JSON object per line: {{\"id\", \"image\", \"question\"}})"
        )));
    }
    Ok(questions)
}

fn parse_line(line: &str, number: usize, image_root: &Path) -> Result<Question, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("expected a JSON object ({\"id\", \"image\", \"question\"})")?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => ItemId::text(format!("line-{number}")),
        Some(v) => ItemId::from_json(v)?,
    };
    let question = match obj.get("question") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("`question` is empty".into()),
        Some(other) => return Err(format!("`question` must be a string, not {other}")),
        None => return Err("missing `question`".into()),
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => return Err(
            "`image` is an empty string: give the image's path, or null for a text-only question"
                .into(),
        ),
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("`image` must be a path (a string), not {other}")),
    };
    Ok(Question {
        line: number,
        id,
        image: image
            .as_deref()
            .map(|s| crate::data::records::resolve_image(s, Some(image_root)))
            .transpose()?,
        image_text: image,
        question,
    })
}

/// The lines already in `out` (JSON values with their 1-based line numbers), read once; a torn
/// last line (an interrupted write, which may end inside a character: the start of a line as
/// this command writes them, `{"id":...`) is left out, to be redone. Any other line, the last one
/// included, is refused (a file that is not this command's output must not be cut).
/// Empty when `out` does not exist.
pub fn stored(out: &Path) -> Result<Vec<(usize, Value)>, InferError> {
    let text = match std::fs::read(out) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(InferError::Input(format!("{}: {e}", out.display()))),
    };
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let mut kept = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed: Option<Value> = serde_json::from_slice(line).ok();
        // (a torn line does not parse; one that does, but is not ours, is another file's)
        let torn = parsed.is_none() && is_torn_line(line);
        let ours = |v: &Value| {
            v.get("id").is_some_and(|id| ItemId::from_json(id).is_ok())
                && v.get("settings").is_some()
        };
        match parsed.filter(ours) {
            Some(v) => kept.push((i + 1, v)),
            None if i + 1 == lines.len() && torn => {}
            None => {
                return Err(InferError::Input(format!(
                    "{}:{}: not a line of `infer --questions` (id, settings, turns); give another --out",
                    out.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(kept)
}

/// Whether `line`, the last of a file without a newline, is a line of ours an interrupted write
/// cut: the lines are JSON objects with sorted keys, `id` first.
fn is_torn_line(line: &[u8]) -> bool {
    const START: &[u8] = b"{\"id\":";
    line.starts_with(START) || START.starts_with(line)
}

/// The `template_date` the `stored` lines were made with (the first line's that has one).
pub fn stored_template_date(stored: &[(usize, Value)]) -> Option<String> {
    stored.iter().find_map(|(_, v)| {
        Some(
            v.get("settings")?
                .get("template_date")?
                .as_str()?
                .to_string(),
        )
    })
}

pub fn done(
    out: &Path,
    stored: &[(usize, Value)],
    settings: &Value,
    asked: &[Question],
) -> Result<HashSet<ItemId>, InferError> {
    let by_id: HashMap<&str, &Question> = asked.iter().map(|q| (q.id.as_str(), q)).collect();
    let mut ids = HashSet::new();
    for (line, v) in stored {
        // (`stored` kept lines with an id only)
        let id = ItemId::from_json(&v["id"]).map_err(InferError::Input)?;
        let made_with = &v["settings"];
        // (greedy decoding reads no seed, top-k or top-p: those may differ; the prompts' date
        // matters to text-only questions only; the folders compare by their files' content
        // where the line records it, so a copy of the model elsewhere resumes)
        let text_only = v.get("image").is_some_and(Value::is_null);
        let recorded_files = made_with.get("files").and_then(Value::as_object);
        let predicts = |s: &Value| {
            let mut s = crate::eval::what_predicts(s);
            if let Some(o) = s.as_object_mut() {
                if !text_only {
                    o.remove("template_date");
                }
                match recorded_files {
                    Some(recorded) => {
                        for path in ["model", "adapter", "checkpoint"] {
                            o.remove(path);
                        }
                        // (a part the line did not record, which a later trainer adds, is
                        // compared from the next run on)
                        if let Some(files) = o.get_mut("files").and_then(Value::as_object_mut) {
                            files.retain(|k, _| recorded.contains_key(k));
                        }
                    }
                    // (a line of an earlier trainer, which recorded the paths only)
                    None => drop(o.remove("files")),
                }
            }
            s
        };
        if let Some(differ) = crate::eval::differences(&predicts(made_with), &predicts(settings)) {
            return Err(InferError::Input(format!(
                "{}:{}: generated with other settings ({differ}); rerun with the same model, \
                 adapter and flags to resume, or give another --out",
                out.display(),
                line
            )));
        }
        if let Some(q) = by_id.get(id.as_str()) {
            let same = v.get("question").and_then(Value::as_str) == Some(q.question.as_str())
                && v.get("image").and_then(Value::as_str) == q.image_text.as_deref();
            // (a line of an earlier trainer has no image_sha256: known by its path only)
            let stored_image = v.get("image_sha256").and_then(Value::as_str);
            let image_now = || q.image.as_deref().and_then(crate::checkpoint::file_sha256);
            // (one that does not read now is not compared: its answer needs no image)
            let changed = |d: &str| image_now().is_some_and(|now| now != d);
            if same && stored_image.is_some_and(changed) {
                return Err(InferError::Input(format!(
                    "{}:{}: the generation for id {id:?} was made for another image: {} holds other bytes now; \
                     give another --out, or delete that line to ask it again",
                    out.display(),
                    line,
                    q.image_text.as_deref().unwrap_or_default()
                )));
            }
            if !same {
                return Err(InferError::Input(format!(
                    "{}:{}: the generation for id {id:?} was made for another question or image than line {} of the questions file asks; \
                     give another --out, or delete that line to ask it again",
                    out.display(),
                    line,
                    q.line
                )));
            }
        }
        if !ids.insert(id.clone()) {
            return Err(InferError::Input(format!(
                "{}:{}: a second generation for id {id:?} (two runs into one --out?); give another --out, or delete one of them",
                out.display(),
                line
            )));
        }
    }
    Ok(ids)
}
