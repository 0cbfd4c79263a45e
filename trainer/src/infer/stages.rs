//! The staged answer format: `<SUMMARY> <CAPTION> <REASONING> <CONCLUSION>`. Parsing is lenient
//! (models are not always well-formed):
//! - tags are matched in any case and with spaces inside the brackets (`<Conclusion >`);
//! - a stage without its closing tag runs to the next opening tag or the end (a tag cut off at the
//!   end of the text, `</CONCL`, is dropped);
//! - a stage's tags inside another stage that is closed later are that stage's text, not a stage
//!   (`<REASONING> ... the <CONCLUSION> should say ... </REASONING>`), unless the stage is found
//!   nowhere else (tags closed out of order: `<REASONING> r <CONCLUSION> A </CONCLUSION>
//!   </REASONING>` still concludes `A`);
//! - a repeated stage keeps its first occurrence.
use std::ops::Range;
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

pub const STAGES: [&str; 4] = ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"];
/// Indices into [`STAGES`].
const REASONING: usize = 2;
const CONCLUSION: usize = 3;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stages {
    pub summary: Option<String>,
    pub caption: Option<String>,
    pub reasoning: Option<String>,
    pub conclusion: Option<String>,
}

/// One stage tag in the text: which stage, opening or closing, and its byte range.
#[derive(Debug, Clone, Copy)]
struct Tag {
    stage: usize,
    close: bool,
    start: usize,
    end: usize,
}

fn tags(text: &str) -> Vec<Tag> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"(?i)<\s*(/?)\s*(SUMMARY|CAPTION|REASONING|CONCLUSION)\s*>")
            .expect("a valid regex")
    });
    re.captures_iter(text)
        .filter_map(|c| {
            let whole = c.get(0)?;
            let name = c.get(2)?.as_str().to_ascii_uppercase();
            Some(Tag {
                stage: STAGES.iter().position(|s| *s == name)?,
                close: !c.get(1)?.as_str().is_empty(),
                start: whole.start(),
                end: whole.end(),
            })
        })
        .collect()
}

/// The top-level stages in order, from the text's `tags`: (stage, text range, closing tag range
/// if closed).
fn top_level(text: &str, tags: &[Tag]) -> Vec<(usize, Range<usize>, Option<Range<usize>>)> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < tags.len() {
        let open = tags[k];
        k += 1;
        if open.close {
            continue; // a stray closing tag
        }
        // its own closing tag, if one comes later
        let close = tags[k..]
            .iter()
            .position(|t| t.close && t.stage == open.stage)
            .map(|i| k + i);
        match close {
            Some(c) => {
                out.push((
                    open.stage,
                    open.end..tags[c].start,
                    Some(tags[c].start..tags[c].end),
                ));
                k = c + 1;
            }
            None => {
                // unclosed: up to the next opening tag of another stage, else the end
                let next = tags[k..]
                    .iter()
                    .position(|t| !t.close && t.stage != open.stage);
                let end = next.map_or(text.len(), |i| tags[k + i].start);
                out.push((open.stage, open.end..end, None));
                if let Some(i) = next {
                    k += i;
                }
            }
        }
    }
    out
}

/// `text` without a tag cut off at its end (`... B </CONCL`): generation stopped inside it.
fn without_cut_tag(text: &str) -> &str {
    let Some(lt) = text.rfind('<') else {
        return text;
    };
    // `<`, `</`, `</CONCL`: no space, no `>` ("x < c" is an answer, not a cut tag)
    let after = &text[lt + 1..];
    let tail = after
        .strip_prefix('/')
        .unwrap_or(after)
        .to_ascii_uppercase();
    let partial = tail.chars().all(|c| c.is_ascii_alphabetic())
        && STAGES.iter().any(|s| s.starts_with(tail.as_str()));
    match partial {
        true => &text[..lt],
        false => text,
    }
}

/// Each stage's span: its first top-level occurrence, else its first nested one (text range,
/// closing tag range if closed).
fn spans(text: &str) -> [Option<Span>; 4] {
    let tags = tags(text);
    let mut found: [Option<Span>; 4] = Default::default();
    for (stage, range, close) in top_level(text, &tags) {
        found[stage].get_or_insert((range, close));
    }
    for (stage, slot) in found.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let Some(k) = tags.iter().position(|t| !t.close && t.stage == stage) else {
            continue;
        };
        let close = tags[k + 1..].iter().find(|t| t.close && t.stage == stage);
        let end = close.map_or(text.len(), |t| t.start);
        *slot = Some((tags[k].end..end, close.map(|t| t.start..t.end)));
    }
    found
}

type Span = (Range<usize>, Option<Range<usize>>);

impl Stages {
    pub fn parse(text: &str) -> Stages {
        let mut found: [Option<String>; 4] = Default::default();
        for (stage, span) in spans(text).into_iter().enumerate() {
            let Some((range, close)) = span else {
                continue;
            };
            let body = &text[range.clone()];
            let body = match (close, range.end == text.len()) {
                (None, true) => without_cut_tag(body),
                _ => body,
            };
            found[stage] = Some(body.trim().to_string());
        }
        let [summary, caption, reasoning, conclusion] = found;
        Stages {
            summary,
            caption,
            reasoning,
            conclusion,
        }
    }

    /// Stage names in order with their text, for comparisons across turns.
    pub fn as_list(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("summary", self.summary.as_deref()),
            ("caption", self.caption.as_deref()),
            ("reasoning", self.reasoning.as_deref()),
            ("conclusion", self.conclusion.as_deref()),
        ]
    }
}

/// Whether the top-level conclusion of `text` has its closing tag (a turn cut off at
/// --max-new-tokens gave an answer only then).
pub fn conclusion_closed(text: &str) -> bool {
    spans(text)[CONCLUSION]
        .as_ref()
        .is_some_and(|(_, close)| close.is_some())
}

/// The answer text through its reasoning (for `--position after_reasoning`): up to and including
/// the top-level `</REASONING>`; for a reasoning left unclosed, up to the conclusion's opening tag;
/// the whole text when there is no reasoning.
pub fn through_reasoning(text: &str) -> &str {
    match top_level(text, &tags(text))
        .into_iter()
        .find(|(s, _, _)| *s == REASONING)
    {
        Some((_, _, Some(close))) => &text[..close.end],
        Some((_, body, None)) => text[..body.end].trim_end(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, Stages)] = &[
            (
                "<SUMMARY>s</SUMMARY><CAPTION> c </CAPTION><REASONING>r</REASONING><CONCLUSION>B</CONCLUSION>",
                Stages { summary: Some("s".into()), caption: Some("c".into()), reasoning: Some("r".into()), conclusion: Some("B".into()) },
            ),
            // missing closing tags: each stage runs to the next opening tag / the end
            ("<SUMMARY>s<REASONING>r<CONCLUSION>7", Stages { summary: Some("s".into()), reasoning: Some("r".into()), conclusion: Some("7".into()), ..Default::default() }),
            // no conclusion at all
            ("<SUMMARY>only</SUMMARY>", Stages { summary: Some("only".into()), ..Default::default() }),
            // no tags
            ("plain answer", Stages::default()),
            // a nested tag stays inside the outer stage's text; it is the stage only when there is
            // no other
            ("<REASONING>a <CONCLUSION>x</CONCLUSION> b</REASONING>", Stages { reasoning: Some("a <CONCLUSION>x</CONCLUSION> b".into()), conclusion: Some("x".into()), ..Default::default() }),
            ("<REASONING>a <CONCLUSION>x</CONCLUSION> b</REASONING><CONCLUSION>y</CONCLUSION>", Stages { reasoning: Some("a <CONCLUSION>x</CONCLUSION> b".into()), conclusion: Some("y".into()), ..Default::default() }),
            // a reasoning that mentions the tag: the real conclusion after it
            ("<REASONING>put it in <CONCLUSION> tags</REASONING><CONCLUSION>A</CONCLUSION>", Stages { reasoning: Some("put it in <CONCLUSION> tags".into()), conclusion: Some("A".into()), ..Default::default() }),
            // any case, spaces inside the brackets; a closing tag cut off at the end is dropped
            ("<Reasoning >r</ reasoning><conclusion>B</CONCL", Stages { reasoning: Some("r".into()), conclusion: Some("B".into()), ..Default::default() }),
            // a stray closing tag is ignored
            ("</SUMMARY><CONCLUSION>C</CONCLUSION>", Stages { conclusion: Some("C".into()), ..Default::default() }),
            // tags closed out of order: the nested conclusion is the only one, so it counts
            ("<REASONING> r <CONCLUSION> A </CONCLUSION> </REASONING>", Stages { reasoning: Some("r <CONCLUSION> A </CONCLUSION>".into()), conclusion: Some("A".into()), ..Default::default() }),
            // a `<` in an unclosed answer is text, not a cut tag
            ("<CONCLUSION> x < c", Stages { conclusion: Some("x < c".into()), ..Default::default() }),
            // repeated stage: the first wins
            ("<CONCLUSION>A</CONCLUSION><CONCLUSION>B</CONCLUSION>", Stages { conclusion: Some("A".into()), ..Default::default() }),
        ];
        for (text, want) in cases {
            assert_eq!(&Stages::parse(text), want, "{text}");
        }
    }

    #[test]
    fn a_conclusion_is_closed_by_its_own_top_level_tag() {
        assert!(conclusion_closed("<CONCLUSION> 3 </conclusion>"));
        assert!(!conclusion_closed("<CONCLUSION> 1"));
        // the closed one inside the reasoning is not the answer's
        assert!(!conclusion_closed(
            "<REASONING>a <CONCLUSION>x</CONCLUSION> b</REASONING><CONCLUSION>1"
        ));
    }

    #[test]
    fn cut_after_reasoning() {
        assert_eq!(
            through_reasoning("<REASONING>r</REASONING><CONCLUSION>c</CONCLUSION>"),
            "<REASONING>r</REASONING>"
        );
        assert_eq!(through_reasoning("no tags"), "no tags");
        // an unclosed reasoning ends where the conclusion opens
        assert_eq!(
            through_reasoning("<REASONING>r <CONCLUSION>c</CONCLUSION>"),
            "<REASONING>r"
        );
    }
}
