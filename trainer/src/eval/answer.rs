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

/// The option a prediction picks: a bare letter ("B", "(B)", "B."), a leading letter ("B) red",
/// "Answer: B"), or exactly one option's text.
pub fn choice_of(pred: &str, choices: &[String]) -> Option<usize> {
    let p = pred.trim();
    let p = p
        .strip_prefix("Answer:")
        .or_else(|| p.strip_prefix("answer:"))
        .unwrap_or(p)
        .trim();
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

/// The last number in a text ("3", "-2.5", "1,000", "42%").
pub fn number_in(s: &str) -> Option<f64> {
    let cleaned: String = s.chars().filter(|&c| c != ',').collect();
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

/// Whether `pred` (already extracted) answers `gold`.
pub fn is_correct(pred: &str, gold: &str, choices: Option<&[String]>) -> bool {
    if let Some(choices) = choices.filter(|c| !c.is_empty()) {
        let want = letter_index(gold, choices.len()).or_else(|| choice_of(gold, choices));
        return want.is_some() && choice_of(pred, choices) == want;
    }
    if let Ok(g) = gold.trim().trim_end_matches('%').parse::<f64>() {
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
}
