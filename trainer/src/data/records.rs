//! JSONL records in the LLaVA-CoT / LLaVA-SCo conversation format, and the SCo converter.
//!
//! A line is `{"id": ..., "image": "rel/path.jpg", "conversations": [{"from": "human"|"gpt", "value": "..."}, ...]}`.
//! Consecutive human/gpt pairs become user/assistant turns (the seed's `cot_dataset.py`); the
//! image belongs to the first user turn. A leading or trailing `<image>` placeholder in a human
//! value is removed (the chat template places `<|image|>`), and every value is `.strip()`ped as
//! the seed's collator does. Every problem is reported as `FILE:LINE: reason`.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::config::{DataFiles, TextOnly};

/// The LLaVA placeholder that marks where the image goes in a human turn.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One user question and the assistant's answer, both stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// A parsed record: where it came from, its image (resolved against `image_root`), its turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    pub id: String,
    /// None: a text-only record kept under `data.text_only: keep`.
    pub image: Option<PathBuf>,
    /// A leading "system" turn's text (text-only records only: the chat template refuses a
    /// system message beside an image).
    pub system: Option<String>,
    pub turns: Vec<Turn>,
}

/// A bad record or image: printed as `FILE:LINE: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

impl std::error::Error for Problem {}

/// What parsing a JSONL file found.
#[derive(Debug, Clone, Default)]
pub struct ParseReport {
    pub records: Vec<Record>,
    /// Bad lines, in file order.
    pub problems: Vec<Problem>,
    /// Records without an image dropped under `text_only: skip`.
    pub skipped_text_only: usize,
    /// Records without an image kept under `text_only: keep`.
    pub kept_text_only: usize,
    /// Blank lines (ignored).
    pub blank_lines: usize,
    /// Fields of the records that are not read (a dataset's own metadata, or a misspelt key).
    pub unread_fields: std::collections::BTreeSet<String>,
}

/// Sorts `problems` of the split read from `files` as they appear: in the order of the list,
/// then by line.
pub fn sort_in_file_order(problems: &mut [Problem], files: &DataFiles) {
    problems.sort_by_key(|p| (files.position(&p.file), p.line));
}

impl ParseReport {
    /// Adds the next file's report after this one's.
    pub fn append(&mut self, next: ParseReport) {
        self.records.extend(next.records);
        self.problems.extend(next.problems);
        self.skipped_text_only += next.skipped_text_only;
        self.kept_text_only += next.kept_text_only;
        self.blank_lines += next.blank_lines;
        self.unread_fields.extend(next.unread_fields);
    }
}

/// How to parse: where images live, what to do with text-only records, whether to check that
/// image files exist (the pre-scan does; it never decodes).
#[derive(Debug, Clone)]
pub struct ParseOptions {
    pub image_root: Option<PathBuf>,
    pub text_only: TextOnly,
    pub check_image_exists: bool,
    /// Keep a leading or trailing `<image>` in human values as text (`data.image_placeholder:
    /// keep`, the seed's behaviour) instead of removing it.
    pub keep_image_placeholder: bool,
}

/// Parse a whole JSONL file. Only failing to read the file itself is an `Err`; bad lines are
/// collected in `ParseReport::problems`.
pub fn parse_jsonl(path: &Path, opts: &ParseOptions) -> Result<ParseReport, Problem> {
    let bytes = std::fs::read(path).map_err(|e| Problem {
        file: path.to_path_buf(),
        line: 0,
        reason: format!("cannot read the data file: {e}"),
    })?;
    // (Windows' "Unicode" saves UTF-16 with a byte-order mark, and a compressed file is no
    // text at all: one problem, not one per line)
    let whole_file = match bytes.as_slice() {
        [0xff, 0xfe, ..] | [0xfe, 0xff, ..] => {
            Some("the file is UTF-16 text: save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)")
        }
        [0x1f, 0x8b, ..] => {
            Some("the file is gzip-compressed: decompress it first (`gunzip -k FILE`)")
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            Some("the file is zstd-compressed: decompress it first (`zstd -d FILE`)")
        }
        _ => None,
    };
    if let Some(reason) = whole_file {
        let mut report = ParseReport::default();
        report.problems.push(Problem {
            file: path.to_path_buf(),
            line: 1,
            reason: reason.into(),
        });
        return Ok(report);
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) => parse_jsonl_str(path, &text, opts),
        // lines that are not UTF-8 are bad records of their own, the others parse as usual
        Err(e) => {
            let bytes = e.into_bytes();
            let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
            let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let lines = body
                .split(|&b| b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .map(|l| {
                    std::str::from_utf8(l).map_err(|e| {
                        format!(
                            "not UTF-8 text (invalid byte at offset {} of the line): save the file as UTF-8",
                            e.valid_up_to()
                        )
                    })
                });
            parse_lines(path, lines, opts)
        }
    })
}

/// `parse_jsonl` over text already in memory; `path` names the file in problems.
pub fn parse_jsonl_str(path: &Path, text: &str, opts: &ParseOptions) -> ParseReport {
    // (a byte-order mark, as Windows editors save UTF-8, is not part of the first record)
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // (LLaVA's `.json` layout, one list of records: one problem that says how to convert it,
    // not one per line of it)
    if text.trim_start().starts_with('[')
        && serde_json::from_str::<Vec<serde_json::Map<String, Value>>>(text).is_ok()
    {
        let mut report = ParseReport::default();
        report.problems.push(Problem {
            file: path.to_path_buf(),
            line: 1,
            reason: format!(
                "the file is one JSON list of records (LLaVA's .json layout), not JSON Lines (one \
                 record per line): convert it with `python3 -c \"import json,sys; \
                 [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]\" {} > \
                 data.jsonl` (or `jq -c '.[]'`)",
                path.display()
            ),
        });
        return report;
    }
    parse_lines(path, text.lines().map(Ok), opts)
}

/// Lines in file order, each its text or why it has none.
fn parse_lines<'a>(
    path: &Path,
    lines: impl Iterator<Item = Result<&'a str, String>>,
    opts: &ParseOptions,
) -> ParseReport {
    let mut report = ParseReport::default();
    for (i, line) in lines.enumerate() {
        let lineno = i + 1;
        if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
            report.blank_lines += 1;
            continue;
        }
        match line.and_then(|l| parse_line(l, opts, &mut report.unread_fields)) {
            Ok(None) => report.skipped_text_only += 1,
            Ok(Some(mut rec)) => {
                if rec.image.is_none() {
                    report.kept_text_only += 1;
                }
                rec.file = path.to_path_buf();
                rec.line = lineno;
                report.records.push(rec);
            }
            Err(reason) => report.problems.push(Problem {
                file: path.to_path_buf(),
                line: lineno,
                reason,
            }),
        }
    }
    report
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Whether a human turn of the record's conversations starts or ends with LLaVA's `<image>`
/// marker (where `strip_placeholder` takes it for the image's place; elsewhere it is text).
fn has_image_marker(obj: &serde_json::Map<String, Value>) -> bool {
    let turns = obj.get("conversations").and_then(Value::as_array);
    turns.into_iter().flatten().any(|c| {
        let value = c["value"].as_str().map(py_strip).unwrap_or_default();
        matches!(c["from"].as_str(), Some("human" | "user"))
            && (value.starts_with(IMAGE_PLACEHOLDER) || value.ends_with(IMAGE_PLACEHOLDER))
    })
}

/// Parse one line; the error is the reason (without the location). None: a record without an
/// image under `text_only: skip`, dropped (as the seed's loader drops it) before its
/// conversation is checked: text-only records of mixed data (a system turn, a ShareGPT-style
/// shape) must not stop a run that would never train on them. Only a human turn that starts or
/// ends with the `<image>` marker is looked at first: its image is missing (a misspelt key), the
/// record is not text-only.
fn parse_line(
    line: &str,
    opts: &ParseOptions,
    unread: &mut std::collections::BTreeSet<String>,
) -> Result<Option<Record>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("a record must be a JSON object, got {}", type_name(&v)))?;
    const READ: [&str; 4] = ["id", "image", "images", "conversations"];
    unread.extend(obj.keys().filter(|k| !READ.contains(&k.as_str())).cloned());
    let id = match obj.get("id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(format!(
                "field \"id\" must be a string or a number, got {}",
                type_name(other)
            ))
        }
    };
    let image = match obj.get("image") {
        // (LLaMA-Factory's and ShareGPT's key: read as no image, the record would be dropped
        // as text-only, or trained without its image)
        None | Some(Value::Null) if obj.get("images").is_some_and(|v| !v.is_null()) => {
            return Err(
                "field \"images\" is not read: give the record's image as \"image\": \
                 \"path\" (one image per record, as in the seed)"
                    .into(),
            )
        }
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err("field \"image\" is an empty string".into())
        }
        Some(Value::String(s)) => Some(resolve_image(s, opts.image_root.as_deref())?),
        Some(Value::Array(_)) => return Err(
            "field \"image\" is a list: only one image per record is supported (as in the seed)"
                .into(),
        ),
        Some(other) => {
            return Err(format!(
                "field \"image\" must be a string (a path), got {}",
                type_name(other)
            ))
        }
    };
    if image.is_none() && has_image_marker(obj) {
        // (an image under another key, "imgae" or build-sco's input's "image_path": skipped
        // or trained as text without a word)
        let fields: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(format!(
            "a human turn has an <image> marker but the record has no \"image\" (its fields: {}): give the image's path as \"image\"",
            fields.join(", ")
        ));
    }
    if image.is_none() && opts.text_only == TextOnly::Skip {
        return Ok(None);
    }
    let convs = match obj.get("conversations") {
        None => return Err("missing field \"conversations\"".into()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(format!(
                "field \"conversations\" must be a list, got {}",
                type_name(other)
            ))
        }
    };
    if convs.is_empty() {
        return Err("empty conversation".into());
    }
    let mut turns = Vec::new();
    let mut system = None;
    let mut pending_user: Option<String> = None;
    for (k, c) in convs.iter().enumerate() {
        let c = c.as_object().ok_or_else(|| {
            format!(
                "conversations[{k}] must be an object with \"from\" and \"value\", got {}",
                type_name(c)
            )
        })?;
        let from = match c.get("from") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(format!("conversations[{k}]: missing field \"from\"")),
            Some(other) => {
                return Err(format!(
                    "conversations[{k}].from must be a string, got {}",
                    type_name(other)
                ))
            }
        };
        let value = match c.get("value") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(format!("conversations[{k}]: missing field \"value\"")),
            Some(other) => {
                return Err(format!(
                    "conversations[{k}].value must be a string, got {}",
                    type_name(other)
                ))
            }
        };
        match from {
            "human" | "user" => {
                if pending_user.is_some() {
                    return Err(format!(
                        "roles out of order: conversations[{k}] is a second \"human\" turn in a row (expected \"gpt\")"
                    ));
                }
                pending_user = Some(match opts.keep_image_placeholder {
                    true => py_strip(value).to_string(),
                    false => strip_placeholder(value),
                });
            }
            "gpt" | "assistant" => match pending_user.take() {
                Some(user) => turns.push(Turn {
                    user,
                    assistant: py_strip(value).to_string(),
                }),
                None => {
                    return Err(format!(
                        "roles out of order: conversations[{k}] is a \"gpt\" turn without a \"human\" turn before it"
                    ))
                }
            },
            // (the seed's records have none; Llama 3.2 Vision's chat template raises on a system
            // message in a conversation with an image, and takes one without)
            "system" if image.is_some() => {
                return Err(format!(
                    "conversations[{k}] is a \"system\" turn in a record with an image: Llama 3.2 Vision's chat \
                     template refuses a system message beside an image (\"Prompting with images is incompatible \
                     with system messages\"): fold its text into the first \"human\" turn or remove it"
                ))
            }
            "system" if k > 0 => {
                return Err(format!(
                    "conversations[{k}] is a \"system\" turn after the first: the chat template takes one \
                     system message, as the conversation's first turn"
                ))
            }
            "system" => system = Some(py_strip(value).to_string()),
            other => {
                return Err(format!(
                    "unknown role {other:?} in conversations[{k}].from (expected \"human\" or \"gpt\", or their aliases \"user\" and \"assistant\")"
                ))
            }
        }
    }
    if pending_user.is_some() {
        return Err(
            "the conversation ends with a \"human\" turn that has no \"gpt\" answer".to_string(),
        );
    }
    if turns.is_empty() {
        return Err(
            "the conversation has a \"system\" turn but no \"human\" / \"gpt\" turns".into(),
        );
    }
    if let (Some(p), true) = (&image, opts.check_image_exists) {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(format!("image {} is not a file", p.display())),
            Err(e) => {
                let written = obj.get("image").and_then(Value::as_str).unwrap_or_default();
                return Err(format!(
                    "image {} cannot be read: {e}{}",
                    p.display(),
                    missing_image_hint(written, opts.image_root.as_deref())
                ));
            }
        }
    }
    Ok(Some(Record {
        file: PathBuf::new(),
        line: 0,
        id,
        image,
        system,
        turns,
    }))
}

/// Why an image path `written` in a record may not be found: spaces around it (invisible in
/// the message), or a relative path with no data.image_root (read from the working folder).
fn missing_image_hint(written: &str, image_root: Option<&Path>) -> String {
    if written.trim() != written {
        return format!(" (the record's path, {written:?}, has spaces around it)");
    }
    match (image_root, Path::new(written).is_relative(), std::env::current_dir()) {
        (None, true, Ok(cwd)) => format!(
            " (data.image_root is not set, so relative image paths are read from the working folder, {}: set data.image_root to the images' folder)",
            cwd.display()
        ),
        _ => String::new(),
    }
}

/// `s` without leading and trailing whitespace as Python's `str.strip()` sees it: Unicode
/// whitespace and the ASCII separators U+001C..U+001F, which Rust's `trim` keeps (the seed strips
/// every value).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Remove a leading and a trailing `<image>` placeholder, then strip whitespace (the seed
/// strips every value). A placeholder in the middle of the text is left as text.
pub fn strip_placeholder(text: &str) -> String {
    let mut t = py_strip(text);
    if let Some(rest) = t.strip_prefix(IMAGE_PLACEHOLDER) {
        t = rest;
    }
    if let Some(rest) = t.strip_suffix(IMAGE_PLACEHOLDER) {
        t = rest;
    }
    py_strip(t).to_string()
}

/// Join `path` onto `root`, refusing `..` that would leave the root. An absolute path, and any
/// path without a root, is used as written (the seed's `os.path.join(root, path)` does the same).
pub fn resolve_image(path: &str, root: Option<&Path>) -> Result<PathBuf, String> {
    let p = Path::new(path);
    let Some(root) = root.filter(|_| !p.is_absolute()) else {
        return Ok(p.to_path_buf());
    };
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err(format!(
                        "image path {path:?} escapes image_root {} (\"..\" above the root)",
                        root.display()
                    ));
                }
                depth -= 1;
            }
            // (not after the first component: the path is relative)
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(root.join(p))
}

/// The second-turn prompt of the self-correction format written by `build_sco` unless the user
/// gives another. The seed's converter to `llava-sco-100k.jsonl` is not public (REFERENCE.md),
/// so this wording is ours: it asks the model to revisit every stage of its staged answer.
pub const DEFAULT_CORRECTION_PROMPT: &str = "Please review your previous answer carefully. Check the summary, the caption, the reasoning and the conclusion for mistakes, then give a corrected answer in the same format.";

/// What `build_sco` made.
#[derive(Debug, Clone, Default)]
pub struct ScoReport {
    /// One JSON object per output line.
    pub lines: Vec<String>,
    /// Entries whose `refined_answer` is empty (the refinement failed).
    pub skipped_empty_refined: usize,
    /// Entries without an `image_path`, written as text-only records.
    pub without_image: usize,
    /// Entries that are not objects with string fields; `index: reason`.
    pub problems: Vec<String>,
}

/// Convert the seed's refinement output (a JSON list of `{question, original_answer,
/// refined_answer, image_path}`) into two-turn self-correction records:
/// human question -> gpt original answer -> human `correction_prompt` -> gpt refined answer.
/// The question gets the `<image>` placeholder in front, as LLaVA-CoT's records have it.
pub fn build_sco(refined_json: &str, correction_prompt: &str) -> Result<ScoReport, String> {
    if correction_prompt.trim().is_empty() {
        return Err("the correction prompt is empty: the second turn would ask nothing".into());
    }
    let refined_json = refined_json
        .strip_prefix('\u{feff}')
        .unwrap_or(refined_json);
    let v: Value = serde_json::from_str(refined_json).map_err(|e| {
        let lines = refined_json.lines().filter(|l| !l.trim().is_empty());
        match lines.clone().count() > 1 && lines.clone().all(|l| serde_json::from_str::<serde_json::Map<String, Value>>(l).is_ok()) {
            true => "the file is JSON Lines (one object per line), not one JSON list: make it a list first (`jq -s . FILE > refined.json`)".to_string(),
            false => format!("malformed JSON: {e}"),
        }
    })?;
    let list = v.as_array().ok_or_else(|| {
        format!(
            "expected a JSON list of {{question, original_answer, refined_answer, image_path}}, got {}",
            type_name(&v)
        )
    })?;
    let mut report = ScoReport::default();
    // the entries' own ids (an entry without one is named `sco-N` where no entry's own id is
    // that) and the first entry of each
    let own_id = |e: &Value| match e.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let taken: HashSet<String> = list.iter().filter_map(own_id).collect();
    let mut first_of: HashMap<String, usize> = HashMap::new();
    for (i, e) in list.iter().enumerate() {
        // (null is an empty field: a failed refinement, an image-less question; an absent key
        // is a malformed entry, e.g. a file from another tool whose fields are named otherwise)
        let field = |name: &str| -> Result<String, String> {
            match e.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Null) => Ok(String::new()),
                None => {
                    let keys: Vec<&str> = e
                        .as_object()
                        .map(|o| o.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    Err(format!(
                        "entry {i}: no field {name:?} (it has {keys:?}; expected question, original_answer, refined_answer, image_path)"
                    ))
                }
                Some(other) => Err(format!(
                    "entry {i}: field {name:?} must be a string, got {}",
                    type_name(other)
                )),
            }
        };
        if !e.is_object() {
            report.problems.push(format!(
                "entry {i}: expected an object, got {}",
                type_name(e)
            ));
            continue;
        }
        let fields = (|| {
            Ok::<_, String>((
                field("question")?,
                field("original_answer")?,
                field("refined_answer")?,
                field("image_path")?,
            ))
        })();
        let (q, orig, refined, image) = match fields {
            Ok(f) => f,
            Err(reason) => {
                report.problems.push(reason);
                continue;
            }
        };
        if refined.trim().is_empty() {
            report.skipped_empty_refined += 1;
            continue;
        }
        if q.trim().is_empty() || orig.trim().is_empty() {
            report.problems.push(format!(
                "entry {i}: empty \"question\" or \"original_answer\""
            ));
            continue;
        }
        let mut rec = serde_json::Map::new();
        // (the entry's own id, when it has one)
        let id = own_id(e).unwrap_or_else(|| {
            let free = |n: usize| match n {
                0 => format!("sco-{i}"),
                n => format!("sco-{i}-{n}"),
            };
            (0..)
                .map(free)
                .find(|id| !taken.contains(id))
                .unwrap_or_default()
        });
        if let Some(&first) = first_of.get(&id) {
            report.problems.push(format!(
                "entry {i}: id {id:?} repeats entry {first}'s (records are named by id)"
            ));
            continue;
        }
        first_of.insert(id.clone(), i);
        rec.insert("id".into(), Value::String(id));
        let has_image = !image.trim().is_empty();
        if has_image {
            rec.insert("image".into(), Value::String(image));
        } else {
            report.without_image += 1;
        }
        // (a question that already carries the placeholder gets it once; one without an image
        // none)
        let question = match has_image {
            true => format!("{IMAGE_PLACEHOLDER}\n{}", strip_placeholder(&q)),
            false => strip_placeholder(&q).to_string(),
        };
        let turn = |from: &str, value: String| serde_json::json!({"from": from, "value": value});
        rec.insert(
            "conversations".into(),
            Value::Array(vec![
                turn("human", question),
                turn("gpt", py_strip(&orig).to_string()),
                turn("human", correction_prompt.to_string()),
                turn("gpt", py_strip(&refined).to_string()),
            ]),
        );
        report.lines.push(Value::Object(rec).to_string());
    }
    Ok(report)
}
