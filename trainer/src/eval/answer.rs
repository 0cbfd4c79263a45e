//! Answer extraction and normalization for scoring: the `<CONCLUSION>` stage (else the last
//! non-empty line), then multiple choice (letter or option text), numbers (tolerance), or short
//! text (case, punctuation, articles ignored).
use crate::infer::Stages;

/// The text a turn answered with.
pub fn extract(text: &str) -> String {
    match Stages::parse(text).conclusion {
        Some(c) if !c.is_empty() => c,
        _ => text
            .lines()
            .map(str::trim)
            .rev()
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string(),
    }
}

/// Lowercase, punctuation to spaces, articles dropped, whitespace collapsed.
pub fn normalize_text(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered
        .split_whitespace()
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| !w.is_empty() && !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn letter_index(s: &str, n_choices: usize) -> Option<usize> {
    let t = s.trim().trim_matches(|c: char| "().:[] ".contains(c));
    let mut chars = t.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !c.is_ascii_alphabetic() {
        return None;
    }
    let i = (c.to_ascii_uppercase() as u8 - b'A') as usize;
    (i < n_choices).then_some(i)
}

/// Lead-ins models put before the letter of their choice (compared lowercased).
const CHOICE_LEAD_INS: [&str; 8] = [
    "the correct answer is",
    "the answer is",
    "correct answer:",
    "answer is",
    "answer:",
    "the option is",
    "option",
    "choice",
];

/// The option a prediction picks: a bare letter ("B", "(B)", "B.", "**B**"), a leading letter
/// ("B) red", "Answer: B", "The answer is B", "Option B"), or exactly one option's text.
pub fn choice_of(pred: &str, choices: &[String]) -> Option<usize> {
    let unmarked = pred.replace('*', ""); // markdown emphasis
    let mut p = unmarked.trim();
    for lead in CHOICE_LEAD_INS {
        // (lead-ins are ASCII, so the cut is on a character boundary when it matches)
        if p.len() > lead.len()
            && p.is_char_boundary(lead.len())
            && p[..lead.len()].eq_ignore_ascii_case(lead)
            && !p[lead.len()..].starts_with(char::is_alphanumeric)
        {
            p = p[lead.len()..].trim();
            break;
        }
    }
    if let Some(i) = letter_index(p, choices.len()) {
        return Some(i);
    }
    if let Some(head) = p.split([')', '.', ':']).next() {
        if head.len() <= 3 && p.len() > head.len() {
            if let Some(i) = letter_index(head, choices.len()) {
                return Some(i);
            }
        }
    }
    let np = normalize_text(p);
    let exact: Vec<usize> = (0..choices.len())
        .filter(|&i| normalize_text(&choices[i]) == np)
        .collect();
    if exact.len() == 1 {
        return Some(exact[0]);
    }
    let inside: Vec<usize> = (0..choices.len())
        .filter(|&i| {
            let c = normalize_text(&choices[i]);
            !c.is_empty() && format!(" {np} ").contains(&format!(" {c} "))
        })
        .collect();
    (inside.len() == 1).then(|| inside[0])
}

/// `s` without thousands separators: commas between a digit and exactly three digits ("1,000",
/// "12,345,678"; not "(1,2)" or "3,14").
fn strip_thousands(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let digit = |i: usize| c.get(i).is_some_and(char::is_ascii_digit);
    c.iter()
        .enumerate()
        .filter(|&(i, &ch)| {
            let separator = ch == ','
                && i > 0
                && digit(i - 1)
                && (1..=3).all(|k| digit(i + k))
                && !digit(i + 4);
            !separator
        })
        .map(|(_, &ch)| ch)
        .collect()
}

/// A gold answer that is a number ("3", "-2.5", "1,000", "42%"): digits required and finite
/// ("inf" and "NaN" are text answers).
fn gold_number(s: &str) -> Option<f64> {
    let t = strip_thousands(s.trim().trim_end_matches('%'));
    let v: f64 = t.parse().ok()?;
    (t.chars().any(|c| c.is_ascii_digit()) && v.is_finite()).then_some(v)
}

/// The last number in a text ("3", "-2.5", "1,000", "42%").
pub fn number_in(s: &str) -> Option<f64> {
    let cleaned = strip_thousands(s);
    let mut found = None;
    let mut cur = String::new();
    for c in cleaned.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || c == '.' || (c == '-' && cur.is_empty()) {
            cur.push(c);
        } else {
            if let Ok(v) = cur.trim_end_matches('.').parse::<f64>() {
                found = Some(v);
            }
            cur.clear();
        }
    }
    found
}

/// The option a multiple-choice gold answer names (its letter or its text).
pub fn gold_choice(gold: &str, choices: &[String]) -> Option<usize> {
    letter_index(gold, choices.len()).or_else(|| choice_of(gold, choices))
}

/// `pred` (already extracted) as scoring reads it against `gold`: the option it picks, the
/// number it ends with (for a numeric gold), else its normalized text; two turns with the same
/// canonical answer gave the same answer ("B" and "(B)", "3" and "3.0").
pub fn canonical(pred: &str, gold: &str, choices: Option<&[String]>) -> String {
    if let Some(choices) = choices.filter(|c| !c.is_empty()) {
        if let Some(i) = choice_of(pred, choices) {
            return format!("choice {i}");
        }
    } else if gold_number(gold).is_some() {
        if let Some(v) = number_in(pred) {
            return format!("number {v}");
        }
    }
    format!("text {}", normalize_text(pred))
}

/// Whether `pred` (already extracted) answers `gold`.
pub fn is_correct(pred: &str, gold: &str, choices: Option<&[String]>) -> bool {
    if let Some(choices) = choices.filter(|c| !c.is_empty()) {
        let want = gold_choice(gold, choices);
        return want.is_some() && choice_of(pred, choices) == want;
    }
    if let Some(g) = gold_number(gold) {
        return number_in(pred).is_some_and(|p| (p - g).abs() <= 1e-6_f64.max(1e-4 * g.abs()));
    }
    let (p, g) = (normalize_text(pred), normalize_text(gold));
    !g.is_empty() && p == g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn extraction() {
        let cases = [
            ("<SUMMARY>s</SUMMARY><CONCLUSION> B </CONCLUSION>", "B"),
            ("reasoning...\nThe answer is 4\n\n", "The answer is 4"),
            ("<CONCLUSION></CONCLUSION>\nfinal: red", "final: red"),
            ("<CONCLUSION>unterminated 7", "unterminated 7"),
            ("", ""),
        ];
        for (text, want) in cases {
            assert_eq!(extract(text), want, "{text}");
        }
    }

    #[test]
    fn multiple_choice() {
        let c = opts(&["red", "blue", "green square"]);
        let cases = [
            ("B", "B", true),
            ("(b)", "B", true),
            ("B. blue", "B", true),
            ("Answer: C", "C", true),
            ("The answer is B", "B", true),
            ("ANSWER: b.", "B", true),
            ("Option C", "C", true),
            ("**B**", "B", true),
            ("Optionally blue", "B", true),
            ("The answer is A", "B", false),
            ("blue", "B", true),
            ("The shape is a green square.", "C", true),
            ("blue", "blue", true),
            ("A", "B", false),
            ("red or blue", "A", false),
            ("D", "A", false),
        ];
        for (pred, gold, want) in cases {
            assert_eq!(is_correct(pred, gold, Some(&c)), want, "{pred} vs {gold}");
        }
    }

    #[test]
    fn numbers_and_text() {
        let cases = [
            ("There are 3 circles", "3", true),
            ("3.0", "3", true),
            ("1,000 apples", "1000", true),
            ("1000", "1,000", true),
            ("about 1,000 apples", "1,000", true),
            ("(1,2)", "12", false),
            ("infinite", "inf", false),
            ("inf", "inf", true),
            ("nan", "NaN", true),
            ("4", "3", false),
            ("no number", "3", false),
            ("The Red Circle!", "red circle", true),
            ("an apple", "apple", true),
            ("blue", "red", false),
        ];
        for (pred, gold, want) in cases {
            assert_eq!(is_correct(pred, gold, None), want, "{pred} vs {gold}");
        }
    }

    #[test]
    fn canonical_answers() {
        let c = opts(&["red", "blue"]);
        assert_eq!(
            canonical("B", "A", Some(&c)),
            canonical("(b)", "A", Some(&c))
        );
        assert_eq!(
            canonical("Answer: B", "A", Some(&c)),
            canonical("blue", "A", Some(&c))
        );
        assert_ne!(canonical("A", "A", Some(&c)), canonical("B", "A", Some(&c)));
        assert_eq!(
            canonical("3", "3", None),
            canonical("there are 3.0", "3", None)
        );
        assert_eq!(
            canonical("The Cat.", "dog", None),
            canonical("cat", "dog", None)
        );
        assert_ne!(canonical("cat", "dog", None), canonical("dog", "dog", None));
    }
}
