//! The chat template, rendered with minijinja the way transformers renders it: trim_blocks and
//! lstrip_blocks on, `raise_exception(msg)`, `strftime_now(fmt)`, Python string methods
//! (pycompat), `tojson` as Python's `json.dumps`, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, `pad_token`, `unk_token`) as variables.
//!
//! Source, in order: `chat_template.jinja`, `chat_template.json` (`{"chat_template": ...}`),
//! `tokenizer_config.json` `chat_template` (a string, or a list of `{name, template}` where
//! `default` is used).
use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde_json::Value;

use super::records::Turn;

/// A compiled chat template plus the variables transformers passes to it.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: serde_json::Map<String, Value>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Find and compile the template of a model folder; special tokens come from
    /// `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, String> {
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| format!("{}: malformed JSON: {e}", tc_path.display()))?,
            Err(_) => Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        let source = if jinja.is_file() {
            std::fs::read_to_string(&jinja).map_err(|e| format!("{}: {e}", jinja.display()))?
        } else if json.is_file() {
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?,
            )
            .map_err(|e| format!("{}: malformed JSON: {e}", json.display()))?;
            template_of(&v)
                .ok_or_else(|| format!("{}: no \"chat_template\" string", json.display()))?
        } else {
            template_of(&tc).ok_or_else(|| {
                format!(
                    "{}: no chat template (looked for chat_template.jinja, chat_template.json and \"chat_template\" in tokenizer_config.json)",
                    dir.display()
                )
            })?
        };
        let mut special = serde_json::Map::new();
        for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(tok) = token_string(tc.get(k)) {
                special.insert(k.to_string(), Value::String(tok));
            }
        }
        Self::from_source(source, special)
    }

    /// Compile template text; `special_tokens` become template variables.
    pub fn from_source(
        source: String,
        special_tokens: serde_json::Map<String, Value>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<JValue, Error> {
            Ok(JValue::from(strftime_now(&fmt)))
        });
        env.add_filter(
            "tojson",
            |v: JValue, kwargs: minijinja::value::Kwargs| -> Result<String, Error> {
                let indent: Option<usize> = kwargs.get("indent")?;
                kwargs.assert_all_used()?;
                let j: Value = serde_json::to_value(&v)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                Ok(py_json_dumps(&j, indent))
            },
        );
        env.add_template_owned(NAME, source)
            .map_err(|e| format!("chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Render `messages` (HF chat format). `extra` adds variables (e.g. `date_string`).
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, String> {
        let mut ctx = self.special_tokens.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        if let Some(extra) = extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let t = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        t.render(JValue::from_serialize(&ctx))
            .map_err(|e| format!("chat template: {e:#}"))
    }
}

fn template_of(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
pub fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The HF messages for one record, as the seed's collator builds them: the image on the first
/// user turn, text contents; a system message first, its content a string (the template trims
/// it as one).
pub fn dialog_messages(system: Option<&str>, turns: &[Turn], has_image: bool) -> Value {
    let mut msgs = Vec::new();
    if let Some(text) = system {
        msgs.push(serde_json::json!({"role": "system", "content": text}));
    }
    for (i, t) in turns.iter().enumerate() {
        let mut user = Vec::new();
        if i == 0 && has_image {
            user.push(serde_json::json!({"type": "image"}));
        }
        user.push(serde_json::json!({"type": "text", "text": t.user}));
        msgs.push(serde_json::json!({"role": "user", "content": user}));
        msgs.push(serde_json::json!({"role": "assistant", "content": [{"type": "text", "text": t.assistant}]}));
    }
    Value::Array(msgs)
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)` (HF's `tojson`).
pub fn py_json_dumps(v: &Value, indent: Option<usize>) -> String {
    fn go(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
        let nl = |out: &mut String, level: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        };
        let item_sep = if indent.is_some() { "," } else { ", " };
        match v {
            Value::Array(a) if !a.is_empty() => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    nl(out, level + 1);
                    go(x, indent, level + 1, out);
                }
                nl(out, level);
                out.push(']');
            }
            Value::Object(o) if !o.is_empty() => {
                out.push('{');
                for (i, (k, x)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    nl(out, level + 1);
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push_str(": ");
                    go(x, indent, level + 1, out);
                }
                nl(out, level);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    go(v, indent, 0, &mut s);
    s
}

/// `datetime.now().strftime(fmt)` in local time (as transformers' `strftime_now`; TZ and
/// /etc/localtime decide, as for Python) for the common directives (%d %m %Y %y %b %B %H %M %S %%),
/// with "now" the first time this process asked: a run that crosses midnight renders the same
/// "Today Date" at the data scan and at every later load (the tokens of a text-only record would
/// otherwise change mid-run).
pub fn strftime_now(fmt: &str) -> String {
    strftime(fmt, template_clock())
}

/// The time `strftime_now` renders (local seconds since the epoch): fixed at first use, or by
/// [`agree_template_clock`].
static NOW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

/// This process's `strftime_now` time (local seconds since the epoch).
pub fn template_clock() -> i64 {
    *NOW.get_or_init(local_now)
}

/// Renders `clock` (local seconds since the epoch) instead of now, when nothing was rendered yet
/// (a run's recorded date: `Manifest::template_clock`, or the ranks' [`agree_template_clock`]).
pub fn use_template_clock(clock: i64) {
    if NOW.set(clock).is_err() && template_clock() != clock {
        tracing::warn!("the chat template's date was rendered before the run's date was fixed");
    }
}

/// `YYYY-MM-DD` as the template clock of that day (noon, local seconds since the epoch), for
/// [`use_template_clock`]: `--date`, where a text-only prompt's "Today Date" must not depend on
/// the day or the time zone it runs in.
pub fn parse_date(text: &str) -> Result<i64, String> {
    let bad = || format!("expected a date as YYYY-MM-DD (e.g. 2024-07-26), got {text:?}");
    let parts: Vec<&str> = text.trim().split('-').collect();
    let [y, m, d] = parts[..] else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = match (y.parse(), m.parse(), d.parse()) {
        // (a four-digit year: 26-1-1 is not 2026's, and strftime would write year 26 as "26")
        (Ok(y), Ok(m), Ok(d)) if (1000..=9999).contains(&y) && (1..=12).contains(&m) && d >= 1 => {
            (y, m, d)
        }
        _ => return Err(bad()),
    };
    // days_from_civil (Howard Hinnant), the inverse of `strftime`'s civil_from_days
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let clock = (era * 146_097 + doe - 719_468) * 86_400 + 12 * 3600;
    // (30 February and the like come back as another day)
    match strftime("%Y-%m-%d", clock) == format!("{y}-{m:02}-{d:02}") {
        true => Ok(clock),
        false => Err(format!("{text:?} is not a day of the calendar")),
    }
}

/// The clock a run's text-only prompts take, before ranks agree on it: --date's (`pinned`, set
/// already), else the day the run being resumed `recorded` (YYYY-MM-DD), else now.
pub fn run_clock(pinned: bool, recorded: Option<&str>) -> i64 {
    match pinned {
        true => template_clock(),
        false => recorded
            .and_then(|d| parse_date(d).ok())
            .unwrap_or_else(local_now),
    }
}

/// Fixes the template clock at `clock` (nothing rendered yet) and returns its day as a run
/// records it (YYYY-MM-DD).
pub fn fix_day(clock: i64) -> String {
    use_template_clock(clock);
    strftime("%Y-%m-%d", template_clock())
}

/// The local time now, in seconds since the epoch (TZ and /etc/localtime decide).
pub fn local_now() -> i64 {
    let utc = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    utc + local_offset_secs(utc)
}

/// Every rank renders rank 0's date (call before any template is rendered): ranks on nodes in
/// other time zones, or starting on either side of midnight, would otherwise tokenize a
/// text-only record to other lengths, and the epoch plan, sorted by length, would differ
/// between ranks. `resumed`: rank 0's clock instead of now (a resumed run's first start,
/// `Manifest::template_clock`; read on rank 0 only).
pub fn agree_template_clock(
    pg: &crate::dist::ProcessGroup,
    device: tch::Device,
    resumed: Option<i64>,
) -> crate::dist::Result<()> {
    let mine = match pg.rank() {
        0 => resumed.unwrap_or_else(template_clock),
        _ => 0,
    };
    let t = tch::Tensor::from_slice(&[mine]).to_device(device);
    pg.broadcast(&t, 0)?;
    use_template_clock(t.to_device(tch::Device::Cpu).int64_value(&[0]));
    Ok(())
}

/// The local time zone's offset from UTC at `utc` (seconds east), 0 when it cannot be read.
fn local_offset_secs(utc: i64) -> i64 {
    let t = utc as libc::time_t;
    // SAFETY: localtime_r writes only into the zeroed `tm` it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    match unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        true => 0,
        false => tm.tm_gmtoff as i64,
    }
}

/// `strftime` for a Unix time in seconds (UTC).
pub fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&format!("{y}")),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// Under TZ=Asia/Kolkata (+05:30, no daylight saving) the offset is 19800 s: this test runs
    /// itself again in a child process with that TZ (a process's zone is read once).
    #[test]
    fn local_offset_follows_tz() {
        const CHILD: &str = "LLAVA_SCO_TZ_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert_eq!(super::local_offset_secs(now), 19_800);
            return;
        }
        if !std::path::Path::new("/usr/share/zoneinfo/Asia/Kolkata").exists() {
            return; // no time zone database to test against
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "data::template::tests::local_offset_follows_tz"])
            .env(CHILD, "1")
            .env("TZ", "Asia/Kolkata")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    /// The local offset is the one `date` reports for this environment (TZ included).
    #[test]
    fn local_offset_agrees_with_date() {
        let out = std::process::Command::new("date").arg("+%z %s").output();
        let Ok(out) = out else { return }; // no `date`: nothing to compare with
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let (z, now) = (
            words.next().unwrap(),
            words.next().unwrap().parse::<i64>().unwrap(),
        );
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (h, m): (i64, i64) = (z[1..3].parse().unwrap(), z[3..5].parse().unwrap());
        assert_eq!(super::local_offset_secs(now), sign * (h * 3600 + m * 60));
    }
}
