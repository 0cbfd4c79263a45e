//! The staged answer format: `<SUMMARY> <CAPTION> <REASONING> <CONCLUSION>`. Parsing is lenient
//! (models are not always well-formed): a stage without its closing tag runs to the next opening
//! tag or the end; a repeated stage keeps its first occurrence; nested tags are left in the text.
use serde::Serialize;

pub const STAGES: [&str; 4] = ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stages {
    pub summary: Option<String>,
    pub caption: Option<String>,
    pub reasoning: Option<String>,
    pub conclusion: Option<String>,
}

impl Stages {
    pub fn parse(text: &str) -> Stages {
        let mut found: [Option<String>; 4] = Default::default();
        for (i, tag) in STAGES.iter().enumerate() {
            let open = format!("<{tag}>");
            let Some(start) = text.find(&open).map(|s| s + open.len()) else {
                continue;
            };
            let rest = &text[start..];
            let close = format!("</{tag}>");
            let end = rest.find(&close).unwrap_or_else(|| {
                // no closing tag: up to the next stage's opening tag, else the end
                STAGES
                    .iter()
                    .filter(|t| *t != tag)
                    .filter_map(|t| rest.find(&format!("<{t}>")))
                    .min()
                    .unwrap_or(rest.len())
            });
            found[i] = Some(rest[..end].trim().to_string());
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

/// The answer text up to and including `</REASONING>` (for `--position after_reasoning`), or the
/// whole text when there is no such tag.
pub fn through_reasoning(text: &str) -> &str {
    const CLOSE: &str = "</REASONING>";
    match text.find(CLOSE) {
        Some(i) => &text[..i + CLOSE.len()],
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
            // nested tag stays inside the outer stage's text
            ("<REASONING>a <CONCLUSION>x</CONCLUSION> b</REASONING>", Stages { reasoning: Some("a <CONCLUSION>x</CONCLUSION> b".into()), conclusion: Some("x".into()), ..Default::default() }),
            // repeated stage: the first wins
            ("<CONCLUSION>A</CONCLUSION><CONCLUSION>B</CONCLUSION>", Stages { conclusion: Some("A".into()), ..Default::default() }),
        ];
        for (text, want) in cases {
            assert_eq!(&Stages::parse(text), want, "{text}");
        }
    }

    #[test]
    fn cut_after_reasoning() {
        assert_eq!(
            through_reasoning("<REASONING>r</REASONING><CONCLUSION>c</CONCLUSION>"),
            "<REASONING>r</REASONING>"
        );
        assert_eq!(through_reasoning("no tags"), "no tags");
    }
}
