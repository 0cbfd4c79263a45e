//! Answer extraction and normalization for scoring: the `<CONCLUSION>` stage (else the last
//! non-empty line), then multiple choice (letter or option text), numbers (tolerance), or short
//! text (case, punctuation, articles ignored).
use crate::infer::Stages;

/// The version of the scoring rules (extraction and matching, `score` in `eval`), stored with
/// each prediction: bump it with every change that can change a stored prediction's `correct`,
/// so `trainer compare` can tell two folders scored by different rules apart (0: a prediction
/// of a trainer that recorded none). 2: turns without a readable answer marked (`no_answer`).
/// 3: accents compared composed (NFC) and fullwidth forms as ASCII (`fold`).
pub const SCORING_RULES: u32 = 3;

/// The text a turn answered with: its conclusion, else the last non-empty line after the last
/// closed stage (a turn whose conclusion is empty or missing does not answer with its reasoning:
/// "<REASONING>... 3 ...</REASONING><CONCLUSION></CONCLUSION>" answers "").
pub fn extract(text: &str) -> String {
    match Stages::parse(text).conclusion {
        Some(c) if !c.is_empty() => c,
        _ => {
            let after = ["</SUMMARY>", "</CAPTION>", "</REASONING>", "</CONCLUSION>"]
                .iter()
                .filter_map(|tag| text.rfind(tag).map(|i| i + tag.len()))
                .max()
                .map_or(text, |end| &text[end..]);
            after
                .lines()
                .map(str::trim)
                .rev()
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_string()
        }
    }
}

/// `s` with accents composed (NFC: "e" + U+0301 is "é", which is a letter where the combining
/// accent alone was dropped as punctuation) and fullwidth ASCII forms (U+FF01-FF5E, "Ａ", "５")
/// as ASCII. Not NFKC: it would turn options written as Ⅲ or ③ into "iii" and "3", "1½" into
/// "11⁄2" and "2²" into "22".
pub fn fold(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.nfc()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c),
            '\u{3000}' => ' ',
            _ => c,
        })
        .collect()
}

/// [`fold`]ed, lowercase, punctuation to spaces, articles dropped, whitespace collapsed.
pub fn normalize_text(s: &str) -> String {
    let lowered: String = fold(s)
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

/// A bare capital letter ("B", "(B)", "B."): it names an option by its letter, even where an
/// option's text is that letter (a lowercase "b" may be an option's own text, as in AI2D).
fn is_capital_letter(s: &str) -> bool {
    let t = s.trim().trim_matches(|c: char| "().:[] ".contains(c));
    let mut chars = t.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if c.is_ascii_uppercase())
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

/// Lead-ins models put before their answer (compared lowercased), stripped repeatedly from the
/// start: "So, the correct answer is: Option B" -> "B".
const LEAD_INS: [&str; 16] = [
    "so",
    "therefore",
    "thus",
    "hence",
    "final answer",
    "the correct answer is",
    "the correct option is",
    "the correct choice is",
    "the answer is",
    "the option is",
    "correct answer",
    "answer is",
    "answer",
    "option",
    "choice",
    "is",
];

/// `p` without leading lead-ins (each followed by a non-alphanumeric character: "Optionally"
/// keeps its "option") and the punctuation after them.
fn strip_lead_ins(mut p: &str) -> &str {
    'again: loop {
        for lead in LEAD_INS {
            // (lead-ins are ASCII, so the cut is on a character boundary when it matches)
            if p.len() > lead.len()
                && p.is_char_boundary(lead.len())
                && p[..lead.len()].eq_ignore_ascii_case(lead)
                && !p[lead.len()..].starts_with(char::is_alphanumeric)
            {
                p = p[lead.len()..]
                    .trim_start_matches(|c: char| c.is_whitespace() || ",:-".contains(c));
                continue 'again;
            }
        }
        return p;
    }
}

/// The option letter standing alone among `p`'s words (punctuation split off, upper case only,
/// as VLMEvalKit's `can_infer_option`): "I think it's (C) because" -> C. None when no letter or
/// two different letters stand alone, or when the only one is "A" in a longer text without a cue
/// word before it ("A red circle is left of ..." uses the article).
fn standalone_letter(p: &str, n_choices: usize) -> Option<usize> {
    let spaced: String = p
        .chars()
        .map(|c| {
            if ".()[],:;!*#{}\"'".contains(c) {
                ' '
            } else {
                c
            }
        })
        .collect();
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let mut found: Option<(usize, usize)> = None; // (option, word index)
    for (k, w) in words.iter().enumerate() {
        let mut chars = w.chars();
        let (Some(c), None) = (chars.next(), chars.next()) else {
            continue;
        };
        if !c.is_ascii_uppercase() || ((c as u8 - b'A') as usize) >= n_choices {
            continue;
        }
        // ("I think", "I'm": the pronoun, with nine or more options)
        let next = words.get(k + 1).map(|w| w.to_ascii_lowercase());
        if c == 'I' && next.as_deref().is_some_and(|n| PRONOUN_VERBS.contains(&n)) {
            continue;
        }
        let i = (c as u8 - b'A') as usize;
        match found {
            Some((j, _)) if j != i => return None,
            _ => found = Some((i, k)),
        }
    }
    let (i, k) = found?;
    // a cue word before it ("the answer is A", "should be A", "I'd say A") or "is" after it ("A
    // is correct": an article is not followed by "is")
    // (not where a negation turns it down: "it cannot be A", "A is incorrect")
    let lower = |j: usize| words.get(j).map(|w| w.to_ascii_lowercase());
    let negation = |w: Option<String>| {
        w.is_some_and(|w| {
            matches!(
                w.as_str(),
                "not" | "cannot" | "never" | "t" | "incorrect" | "wrong" | "false"
            )
        })
    };
    let cue_before = k > 0
        && matches!(
            words[k - 1].to_ascii_lowercase().as_str(),
            "is" | "be" | "say" | "answer" | "option" | "choice" | "select" | "choose" | "pick"
        );
    let is_after = lower(k + 1).as_deref() == Some("is");
    // a letter said to be wrong is not the one picked, whichever it is
    let turned_down =
        (cue_before && k >= 2 && negation(lower(k - 2))) || (is_after && negation(lower(k + 2)));
    let cued = cue_before || is_after;
    (!turned_down && (i != 0 || words.len() <= 3 || cued)).then_some(i)
}

/// Words after the pronoun "I" ("I think B"), lowercased; "m", "d", "ll", "ve" are what is left of
/// "I'm", "I'd", "I'll", "I've" once the apostrophe is split off.
const PRONOUN_VERBS: [&str; 27] = [
    "think", "would", "am", "believe", "guess", "can", "see", "will", "chose", "choose", "pick",
    "select", "say", "need", "have", "know", "feel", "conclude", "must", "should", "might",
    "could", "count", "m", "d", "ll", "ve",
];

/// The letter a prediction picks where the options are not given (a question with its options in
/// its text, a gold answer "B"): a bare letter, a leading one after lead-ins, or one standing
/// alone, as [`choice_of`] reads letters.
fn letter_of(pred: &str, n: usize) -> Option<usize> {
    let unmarked = pred.replace('*', "");
    let p = strip_lead_ins(unmarked.trim());
    letter_choice(p, n, true)
}

/// The letter a gold answer that is one capital letter names (its options are in the question's
/// text), and how many letters a prediction may pick from: at least A-D, up to the gold one ("I"
/// in "I think (C)" is then a word, not a letter).
fn gold_letter(gold: &str) -> Option<(usize, usize)> {
    if !is_capital_letter(gold) {
        return None;
    }
    let g = letter_of(gold, 26)?;
    Some((g, (g + 1).max(4)))
}

/// The letter `p` (lead-ins stripped) names among `n` options: a bare letter ("B", "(B)"), a
/// leading letter ("B) red", "C. blue"), or with `loose` one standing alone in the text.
fn letter_choice(p: &str, n: usize, loose: bool) -> Option<usize> {
    if let Some(i) = letter_index(p, n) {
        return Some(i);
    }
    if let Some(head) = p.split([')', '.', ':', ',']).next() {
        if head.len() <= 3 && p.len() > head.len() {
            if let Some(i) = letter_index(head, n) {
                return Some(i);
            }
        }
    }
    if loose {
        return standalone_letter(p, n);
    }
    None
}

/// The option a prediction picks: exactly one option's text ("Vitamin D", "A dog" for "dog"), a
/// bare letter ("B", "(B)", "B.", "**B**"), a leading letter after lead-ins ("B) red", "Answer:
/// Option B", "So the answer is B, not red"), one letter standing alone in the text ("I think
/// it's (C)"), or one option's text inside it.
pub fn choice_of(pred: &str, choices: &[String]) -> Option<usize> {
    pick(&fold(pred), choices, true)
}

/// [`choice_of`]; `loose`: also a letter standing alone in the text (not for reading a gold
/// answer, whose capitals are its own words).
fn pick(pred: &str, choices: &[String], loose: bool) -> Option<usize> {
    let unmarked = pred.replace('*', ""); // markdown emphasis
    let p = strip_lead_ins(unmarked.trim());
    // an option's own text first: a capital letter inside it ("Vitamin D", "Hepatitis A") is not
    // a letter choice. Not for a bare letter ("A" normalizes to nothing, "B" may be an option's
    // text in a which-letter question: the letter names the option) or an empty text.
    for text in [unmarked.trim(), p] {
        if is_capital_letter(text) {
            continue;
        }
        // (text that normalizes to nothing, "∞" or ">", is compared as written)
        let np = normalize_text(text);
        let key = |t: &str| match np.is_empty() {
            true => t.trim().to_string(),
            false => normalize_text(t),
        };
        let want = key(text);
        if want.is_empty() {
            continue;
        }
        let exact: Vec<usize> = (0..choices.len())
            .filter(|&i| key(&choices[i]) == want)
            .collect();
        if exact.len() == 1 {
            return Some(exact[0]);
        }
    }
    if let Some(i) = letter_choice(p, choices.len(), loose) {
        return Some(i);
    }
    // numeric options: the one whose value the prediction's number equals ("3.0" for "3",
    // "1000" for "1,000")
    // (an option written "(2)" is not read as a number: predictions cite such options in
    // parentheses, which number_in reads last)
    let values: Vec<Option<f64>> = choices
        .iter()
        .map(|c| {
            (!c.trim_start().starts_with('('))
                .then(|| gold_number(c))
                .flatten()
        })
        .collect();
    if values.iter().all(Option::is_some) {
        if let Some(x) = number_in(p) {
            let hits: Vec<usize> = (0..choices.len())
                .filter(|&i| values[i].is_some_and(|v| close(x, v)))
                .collect();
            if hits.len() == 1 {
                return Some(hits[0]);
            }
        }
    }
    // one option's text inside it; an option found only inside another found option that holds
    // it ("red" in "dark red") does not count: "It is dark red" picks "dark red", "red, not dark
    // red" neither, "a big red ball" with "big red" and "red ball" neither
    let words = |t: &str| format!(" {t} ");
    let text = words(&normalize_text(p));
    let found: Vec<(usize, String)> = (0..choices.len())
        .map(|i| (i, normalize_text(&choices[i])))
        .filter(|(_, c)| !c.is_empty() && text.contains(&words(c)))
        .collect();
    let inside: Vec<usize> = found
        .iter()
        .filter(|(_, c)| {
            let mut rest = text.clone();
            for (_, holder) in &found {
                if holder.len() > c.len() && words(holder).contains(&words(c)) {
                    rest = rest.replace(&words(holder), " | ");
                }
            }
            rest.contains(&words(c))
        })
        .map(|(i, _)| *i)
        .collect();
    (inside.len() == 1).then(|| inside[0])
}

/// `s` without thousands separators: commas between a digit and exactly three digits ("1,000",
/// "12,345,678"; not "(1,2)" or "3,14", a decimal comma `numbers` reads).
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

/// A number written in text and where it stands: byte range in the text it was read from, and
/// whether it sits inside parentheses.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Found {
    value: f64,
    start: usize,
    end: usize,
    in_parens: bool,
}

/// Every number in `s` (thousands separators removed first): integers, decimals, a sign only
/// where a word does not touch it ("-2", not "step-2"), with `decimal_comma` a decimal comma
/// ("2,5": a prediction's; a gold "1,5" is a list, the text it reads), exponents ("1e-5", "1.5 x 10^3",
/// "1.5 × 10^3"), fractions of integers ("1/2"); a unit's power ("m/s^2", "cm²") is not a number.
fn numbers(s: &str, decimal_comma: bool) -> Vec<Found> {
    let b: Vec<char> = s.chars().map(ascii_number_char).collect();
    let (mut out, mut i, mut depth) = (Vec::new(), 0usize, 0i32);
    let digits = |from: usize| {
        let mut j = from;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        match b[i] {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        // ".5" and "-.5" start at their point (not after a digit: "3.5" is read whole)
        let digit_at = |k: usize| {
            b.get(k).is_some_and(char::is_ascii_digit)
                || (b.get(k) == Some(&'.')
                    && b.get(k + 1).is_some_and(char::is_ascii_digit)
                    && (k == 0 || !(b[k - 1].is_ascii_digit() || b[k - 1] == '.')))
        };
        // a unit's power ("m/s^2", "m^-10"): skipped whole, sign and digits
        if b[i] == '^' {
            i += 1;
            if b.get(i) == Some(&'-') {
                i += 1;
            }
            i = digits(i);
            continue;
        }
        let signed =
            matches!(b[i], '-' | '+') && digit_at(i + 1) && (i == 0 || !b[i - 1].is_alphanumeric());
        if !(digit_at(i) || signed) {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = digits(if signed { i + 1 } else { i });
        if j + 1 < b.len() && b[j] == '.' && b[j + 1].is_ascii_digit() {
            j = digits(j + 1);
        }
        // a decimal comma ("2,5", "-0,75"): thousands groups of three were removed before, and
        // coordinates "(1,2)" and lists "1,2,3" stay numbers apart
        let mut comma_read = false;
        if decimal_comma && b.get(j) == Some(&',') && !b[start..j].contains(&'.') && depth == 0 {
            let end = digits(j + 1);
            let in_list = (start > 0 && b[start - 1] == ',')
                || (b.get(end) == Some(&',') && b.get(end + 1).is_some_and(char::is_ascii_digit));
            if end > j + 1 && end - (j + 1) != 3 && !in_list {
                comma_read = true;
                j = end;
            }
        }
        let text: String = b[start..j].iter().collect();
        let text = if comma_read {
            text.replacen(',', ".", 1)
        } else {
            text
        };
        let text = text.replacen("-.", "-0.", 1);
        let text = if text.starts_with('.') {
            format!("0{text}")
        } else {
            text
        };
        let mut value: f64 = text.parse().unwrap_or(f64::NAN);
        // 1e-5, 2.5E3
        if j < b.len() && (b[j] == 'e' || b[j] == 'E') {
            let k = j + 1 + usize::from(b.get(j + 1).is_some_and(|c| *c == '-' || *c == '+'));
            let e_end = digits(k);
            if e_end > k {
                let e: String = b[j + 1..e_end].iter().collect();
                value *= 10f64.powi(e.parse::<i32>().unwrap_or(0));
                j = e_end;
            }
        }
        // 1.5 x 10^3, 1.5 × 10^3, 1.5*10^3
        let rest: String = b[j..b.len().min(j + 12)].iter().collect();
        for times in [" x 10^", " × 10^", "x10^", "×10^", "*10^", " * 10^"] {
            if let Some(after) = rest.strip_prefix(times) {
                let k = j + times.chars().count();
                let sign = after.starts_with('-');
                let e_end = digits(k + usize::from(sign));
                if e_end > k + usize::from(sign) {
                    let e: String = b[k..e_end].iter().collect();
                    value *= 10f64.powi(e.parse::<i32>().unwrap_or(0));
                    j = e_end;
                }
                break;
            }
        }
        // 10^3, 10^-3: a number raised by a number (a unit's power, "m/s^2", is skipped above)
        let neg = b.get(j + 1) == Some(&'-');
        let e_at = j + 1 + usize::from(neg);
        if b.get(j) == Some(&'^') && b.get(e_at).is_some_and(char::is_ascii_digit) {
            let e_end = digits(e_at);
            let e: String = b[e_at..e_end].iter().collect();
            let e = e.parse::<i32>().unwrap_or(1);
            value = value.powi(if neg { -e } else { e });
            j = e_end;
        }
        // 1/2 (integers only: "m/s" is a unit, "3/4" a number)
        if !text.contains('.') && j + 1 < b.len() && b[j] == '/' && b[j + 1].is_ascii_digit() {
            let d_end = digits(j + 1);
            let den: String = b[j + 1..d_end].iter().collect();
            if let Ok(d) = den.parse::<f64>() {
                if d != 0.0 {
                    value /= d;
                    j = d_end;
                }
            }
        }
        if value.is_finite() {
            out.push(Found {
                value,
                start,
                end: j,
                in_parens: depth > 0,
            });
        }
        i = j;
    }
    out
}

/// A character of a number written outside ASCII as its ASCII counterpart (one for one, so
/// positions keep): the minus sign and the dashes models write for "-" (U+2212, U+2012, U+2013,
/// U+FE63, U+FF0D), fullwidth digits.
fn ascii_number_char(c: char) -> char {
    match c {
        '\u{2212}' | '\u{2012}' | '\u{2013}' | '\u{FE63}' | '\u{FF0D}' => '-',
        '\u{FF10}'..='\u{FF19}' => char::from(b'0' + (c as u32 - 0xFF10) as u8),
        _ => c,
    }
}

/// One number word ("three", "Twelve", "ninety"): zero to nineteen and the tens.
fn word_number(word: &str) -> Option<f64> {
    const WORDS: [&str; 21] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ];
    const TENS: [&str; 7] = [
        "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    let w = word.to_ascii_lowercase();
    if let Some(i) = WORDS.iter().position(|&x| x == w) {
        return Some(i as f64);
    }
    TENS.iter()
        .position(|&x| x == w)
        .map(|i| 30.0 + 10.0 * i as f64)
}

/// A number below a hundred at the start of `words` ("seven", "twenty one" from "twenty-one"),
/// and how many words it took.
fn below_hundred(words: &[&str]) -> Option<(f64, usize)> {
    let v = word_number(words.first()?)?;
    match words.get(1).and_then(|w| word_number(w)) {
        Some(u) if v >= 20.0 && v % 10.0 == 0.0 && (1.0..10.0).contains(&u) => Some((v + u, 2)),
        _ => Some((v, 1)),
    }
}

/// The number `words` spell, all of them ("twenty one", "one hundred and five", "hundred"), or
/// None when they spell none or more than one ("one two").
fn words_value(words: &[&str]) -> Option<f64> {
    // ("hundred" alone, as in "a hundred": one hundred)
    let (mut value, mut k) = below_hundred(words).unwrap_or((1.0, 0));
    if words
        .get(k)
        .is_some_and(|w| w.eq_ignore_ascii_case("hundred"))
    {
        value *= 100.0;
        k += 1;
        if words.get(k).is_some_and(|w| w.eq_ignore_ascii_case("and")) {
            k += 1;
        }
        if let Some((rest, n)) = below_hundred(&words[k..]) {
            value += rest;
            k += n;
        }
    } else if k == 0 {
        return None;
    }
    (k == words.len()).then_some(value)
}

fn is_number_word(w: &str) -> bool {
    word_number(w).is_some() || w.eq_ignore_ascii_case("hundred")
}

/// The last number written in words in `s` ("There are three circles" -> 3, "twenty-one" -> 21,
/// "one hundred" -> 100: a compound is read whole, not as its last word), for text without
/// digits.
fn last_word_number(s: &str) -> Option<f64> {
    let words: Vec<&str> = s
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let last = words.iter().rposition(|w| is_number_word(w))?;
    let mut first = last;
    while first > 0 && (is_number_word(words[first - 1]) || words[first - 1] == "and") {
        first -= 1;
    }
    // the longest run of words before it that spells one number ("one two three" -> three)
    (first..=last).find_map(|start| words_value(&words[start..=last]))
}

/// Whether a predicted number answers a gold one (relative 1e-4, absolute 1e-6).
fn close(p: f64, g: f64) -> bool {
    (p - g).abs() <= 1e-6_f64.max(1e-4 * g.abs())
}

/// Units written against their number in gold answers ("5cm", "10kg", "30s").
const GLUED_UNITS: [&str; 16] = [
    "mm", "cm", "m", "km", "g", "kg", "mg", "ml", "l", "s", "ms", "min", "h", "hr", "ft", "in",
];

/// A gold answer that is a number, optionally followed by a unit or a counted noun ("3", "-2.5",
/// ".5", "1,000", "42%", "3 cm", "45°", "9.8 m/s^2", "1/2", "10^3", "2 dogs", "3.", "+3", "$12",
/// "(3)"): one number at the start (after a currency sign, inside parentheses), not run into a
/// word ("3D" is text), then at most three words and no other number ("inf", "NaN" and "3 apples
/// and 2 pears" are text answers).
fn gold_number(s: &str) -> Option<f64> {
    let t = s.trim();
    let t = match t.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        Some(inner) => inner.trim(),
        None => t,
    };
    let t = strip_thousands(t.trim_start_matches(['$', '€', '£', '¥']));
    let found = numbers(&t, false);
    let Some(first) = found.first() else {
        // a gold answer that is a number in words ("three", "Three.", "twenty-one")
        let words: Vec<&str> = t
            .trim_end_matches(['.', '!'])
            .split(['-', ' '])
            .filter(|w| !w.is_empty())
            .collect();
        return words_value(&words);
    };
    let rest: String = t.chars().skip(first.end).collect();
    // "3D" is a word, "5cm" a number and its unit
    let word: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
    let glued = !word.is_empty() && !GLUED_UNITS.contains(&word.to_lowercase().as_str());
    let more_numbers = found.len() > 1;
    let short = rest.split_whitespace().count() <= 3;
    (first.start == 0 && !glued && !more_numbers && short).then_some(first.value)
}

/// The number a text answers with: the one right after its last "answer is" / "answer:" ("The
/// answer is 7, since 3 + 4": only spaces, a colon or a currency sign may come between; "the
/// answer is not 3 but 5" has no such number), else the last number outside parentheses ("12 + 3
/// = 15", "3 (rounded to 1 decimal)" -> 3), else the last one.
pub fn number_in(s: &str) -> Option<f64> {
    // markdown emphasis and LaTeX wrappers around an answer ("**3**", "\\boxed{3}", "\\(3\\)")
    let unwrapped = s
        .replace("**", "")
        .replace("\\boxed{", " answer is ") // (a cue: what is boxed is the answer)
        .replace("\\(", "")
        .replace("\\)", "");
    let cleaned = strip_thousands(&unwrapped);
    let chars: Vec<char> = cleaned.chars().collect();
    let lower: Vec<char> = chars.iter().map(char::to_ascii_lowercase).collect();
    let found = numbers(&cleaned, true);
    let at = |k: usize, cue: &str| {
        cue.chars()
            .enumerate()
            .all(|(i, c)| lower.get(k + i) == Some(&c))
    };
    // where each cue ends, last first
    let mut cues: Vec<usize> = (0..lower.len())
        .filter_map(|k| {
            if at(k, "answer is") {
                Some(k + 9)
            } else if at(k, "answer:") {
                Some(k + 7)
            } else {
                None
            }
        })
        .collect();
    cues.reverse();
    if let Some(f) = cues.iter().find_map(|&end| {
        let f = found.iter().find(|f| f.start >= end)?;
        chars[end..f.start]
            .iter()
            .all(|c| c.is_whitespace() || "$€£:\"'{".contains(*c))
            .then_some(f)
    }) {
        return Some(f.value);
    }
    found
        .iter()
        .rev()
        .find(|f| !f.in_parens)
        .or(found.last())
        .map(|f| f.value)
        .or_else(|| last_word_number(&cleaned))
}

/// The option a multiple-choice gold answer names: read as a prediction is (an option's own text
/// first, then a letter), so a lowercase "a" among options ["d", "c", "b", "a"] is the option "a"
/// on both sides.
pub fn gold_choice(gold: &str, choices: &[String]) -> Option<usize> {
    pick(&fold(gold), choices, false)
}

/// `pred` (already extracted) as scoring reads it against `gold`: the option it picks, the
/// number it ends with (for a numeric gold), else its normalized text; two turns with the same
/// canonical answer gave the same answer ("B" and "(B)", "3" and "3.0").
pub fn canonical(pred: &str, gold: &str, choices: Option<&[String]>) -> String {
    let (pred, gold) = (&fold(pred), &fold(gold));
    if let Some(choices) = choices.filter(|c| !c.is_empty()) {
        if let Some(i) = choice_of(pred, choices) {
            return format!("choice {i}");
        }
    } else if let Some((_, n)) = gold_letter(gold) {
        if let Some(i) = letter_of(pred, n) {
            return format!("choice {i}");
        }
    } else if gold_number(gold).is_some() {
        if let Some(v) = number_in(pred) {
            return format!("number {v}");
        }
    } else if matches!(normalize_text(gold).as_str(), "yes" | "no") {
        let p = normalize_text(strip_lead_ins(pred.trim()));
        return format!("text {}", p.split_whitespace().next().unwrap_or(""));
    }
    format!("text {}", normalize_text(strip_lead_ins(pred.trim())))
}

/// Whether a turn whose answer scoring read as `canonical` (`canonical` of `gold`, `choices`)
/// holds no answer: no option of a multiple-choice question, no number where the answer is one
/// (`canonical` fell back to text), nothing at all otherwise. A turn like that is wrong for its
/// format, not for its answer.
pub fn unreadable(canonical: &str, gold: &str, choices: Option<&[String]>) -> bool {
    let gold = &fold(gold);
    let structured = choices.is_some_and(|c| !c.is_empty())
        || gold_letter(gold).is_some()
        || gold_number(gold).is_some();
    canonical == "text " || (structured && canonical.starts_with("text "))
}

/// Whether `pred` (already extracted) answers `gold`.
pub fn is_correct(pred: &str, gold: &str, choices: Option<&[String]>) -> bool {
    let (pred, gold) = (&fold(pred), &fold(gold));
    if let Some(choices) = choices.filter(|c| !c.is_empty()) {
        let want = gold_choice(gold, choices);
        return want.is_some() && choice_of(pred, choices) == want;
    }
    // a letter without the options (they are in the question's text): the letter picked
    if let Some((g, n)) = gold_letter(gold) {
        return letter_of(pred, n) == Some(g);
    }
    if let Some(g) = gold_number(gold) {
        return number_in(pred).is_some_and(|p| close(p, g));
    }
    // as written, or after a lead-in ("The answer is yes", "So, red circle")
    let g = normalize_text(gold);
    let readings = [
        normalize_text(pred),
        normalize_text(strip_lead_ins(pred.trim())),
    ];
    if matches!(g.as_str(), "yes" | "no") {
        // "Yes, because ..." answers a yes/no question with its first word
        return readings
            .iter()
            .any(|p| p.split_whitespace().next() == Some(g.as_str()));
    }
    !g.is_empty() && readings.contains(&g)
}

/// Whether `is_correct` can ever find a prediction right for `gold`: false for a free-text
/// answer that normalizes to nothing (punctuation, or an article alone).
pub fn gold_is_scorable(gold: &str, choices: Option<&[String]>) -> bool {
    let gold = &fold(gold);
    choices.is_some_and(|c| !c.is_empty())
        || gold_letter(gold).is_some()
        || gold_number(gold).is_some()
        || !normalize_text(gold).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// An accent written composed or decomposed, and fullwidth forms, are the same answer (the
    /// decomposed accent was dropped as punctuation: "café" NFD matched "cafe", not "café"); a
    /// fullwidth capital is a letter answer. Roman numerals, circled digits, fractions and
    /// superscripts keep their own forms (NFKC would make "2²" match "22").
    #[test]
    fn accents_composed_and_fullwidth_folded() {
        let (composed, decomposed) = ("caf\u{e9}", "cafe\u{301}");
        assert!(is_correct(decomposed, composed, None));
        assert!(is_correct(composed, decomposed, None));
        assert!(!is_correct(decomposed, "cafe", None));
        assert!(is_correct("\u{ff21}\u{ff22}\u{ff23}", "abc", None));
        // "Ｂ" is the letter B, a fullwidth gold "Ａ" is scorable (not the article "a")
        assert!(is_correct("\u{ff22}", "B", Some(&opts(&["x", "y"]))));
        assert!(gold_is_scorable("\u{ff21}", None));
        assert!(is_correct("(B)", "\u{ff22}", None));
        // options as Roman numerals and circled digits: the one named is picked
        let roman = opts(&["\u{2160}", "\u{2161}", "\u{2162}"]);
        assert_eq!(choice_of("I think \u{2162}", &roman), Some(2));
        let circled = opts(&["\u{2460}", "\u{2461}", "\u{2462}", "\u{2463}"]);
        assert_eq!(choice_of("\u{2462}, since 2 of them", &circled), Some(2));
        for (pred, gold) in [("22", "2\u{b2}"), ("11/2", "1\u{bd}")] {
            assert!(!is_correct(pred, gold, None), "{pred} vs {gold}");
        }
    }

    #[test]
    fn extraction() {
        let cases = [
            ("<SUMMARY>s</SUMMARY><CONCLUSION> B </CONCLUSION>", "B"),
            ("reasoning...\nThe answer is 4\n\n", "The answer is 4"),
            ("<CONCLUSION></CONCLUSION>\nfinal: red", "final: red"),
            ("<CONCLUSION>unterminated 7", "unterminated 7"),
            ("", ""),
            // an empty conclusion does not answer with the reasoning before it
            (
                "<REASONING>so 3 circles</REASONING><CONCLUSION></CONCLUSION>",
                "",
            ),
            ("<REASONING>so 3</REASONING>\n3 circles", "3 circles"),
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
            // lead-ins stripped repeatedly, a comma after the letter, a letter standing alone
            ("Answer: Option B", "B", true),
            ("The correct answer is option B.", "B", true),
            ("The answer is B, not red.", "B", true),
            ("So the answer is B.", "B", true),
            ("Therefore, the correct option is C", "C", true),
            ("I think it's (C) because of its corners", "C", true),
            ("Between B and C, neither", "B", false),
            ("A square is drawn next to it", "A", false),
        ];
        for (pred, gold, want) in cases {
            assert_eq!(is_correct(pred, gold, Some(&c)), want, "{pred} vs {gold}");
        }
        // an option's text wins over a capital letter inside it, for predictions and golds
        let c = opts(&["cat", "dog"]);
        assert!(is_correct("A dog", "B", Some(&c)));
        assert!(is_correct("Answer: A dog", "B", Some(&c)));
        let c = opts(&["Vitamin D", "Vitamin C", "Iron", "Zinc"]);
        assert!(is_correct("Vitamin D", "A", Some(&c)));
        assert!(!is_correct("Vitamin D", "D", Some(&c)));
        let c = opts(&["cat", "A dog"]);
        assert_eq!(gold_choice("A dog", &c), Some(1));
        assert!(!is_correct("A", "A dog", Some(&c)));
        // a bare letter names its option, even where options are letters or normalize to nothing
        let c = opts(&["D", "B", "A", "C"]);
        assert!(is_correct("B", "B", Some(&c)));
        assert!(!is_correct("B", "A", Some(&c)));
        let c = opts(&["0", "1", "∞", "none"]);
        assert!(is_correct("A", "A", Some(&c)));
        assert!(!is_correct("", "C", Some(&c)));
        assert!(
            is_correct("∞", "∞", Some(&c)),
            "text that normalizes to nothing"
        );
        // lowercase options are their own text (AI2D labels)
        let c = opts(&["d", "c", "b", "a"]);
        assert!(is_correct("b", "C", Some(&c)));
        // a gold naming its option with more words still reads
        let c = opts(&["red", "blue"]);
        assert_eq!(gold_choice("blue (the sky)", &c), Some(1));
        let cases: [(&str, &str, bool); 0] = [];
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
            // a decimal comma; coordinates and lists are numbers apart
            ("2,5", "2.5", true),
            ("The answer is -0,75 m", "-0.75", true),
            ("2,5", "5", false),
            // (a gold "1,5" is a list of two, read as text)
            ("1, 5", "1,5", true),
            ("1.5", "1,5", false),
            ("(1,2)", "1.2", false),
            ("1,2,3", "1.2", false),
            ("1,2,3", "3", true),
            ("12,345", "12345", true),
            ("infinite", "inf", false),
            ("inf", "inf", true),
            ("nan", "NaN", true),
            ("4", "3", false),
            ("no number", "3", false),
            // units, powers, scientific notation, fractions, cues, parentheses, signs
            ("9.8 m/s^2", "9.8", true),
            ("24 cm^2", "24", true),
            ("1.5 × 10^3", "1500", true),
            ("1.5 x 10^3 J", "1500", true),
            ("1e-5", "0.00001", true),
            ("1/2", "0.5", true),
            ("3", "3 cm", true),
            ("The angle is 45 degrees", "45°", true),
            ("3 (rounded to 1 decimal)", "3", true),
            ("12 + 3 = 15", "15", true),
            ("The answer is 7, since 3 + 4 makes it", "7", true),
            ("see step-2", "-2", false),
            // a point without a leading digit; a cue only when the number follows it
            (".5", "0.5", true),
            ("0.5", ".5", true),
            ("-.5", "-0.5", true),
            ("Since n = 2, the total is 8", "8", true),
            ("The answer is not 3 but 5", "5", true),
            ("x <= 4, so 7", "7", true),
            ("The answer is $12", "12", true),
            ("10^3", "1000", true),
            ("1000", "10^3", true),
            ("2", "2 dogs", true),
            ("3", "3D", false),
            ("9.8", "9.8 m/s²", true),
            ("1", "1 hour", true),
            ("3", "3.", true),
            ("The answer is **3**, which is 1 more than 2", "3", true),
            ("so \\boxed{3}, as 1 + 2", "3", true),
            ("it is...5", "5", true),
            ("1.5*10^3", "1.5*10^3", true),
            ("2 * 10^3", "2000", true),
            ("The answer is (3 + 5) × 2 = 16", "16", true),
            ("5 cm", "5cm", true),
            ("The length is 5cm", "5cm", true),
            ("-2", "-2", true),
            ("3 apples", "3 apples and 2 pears", false),
            ("Yes, because the sky is blue", "yes", true),
            ("No.", "no", true),
            ("yes", "no", false),
            ("The Red Circle!", "red circle", true),
            ("an apple", "apple", true),
            ("blue", "red", false),
            // lead-ins before a yes/no or text answer
            ("The answer is yes", "yes", true),
            ("So, no.", "no", true),
            ("The answer is no", "yes", false),
            ("So, the answer is red circle", "red circle", true),
            ("Answer: blue", "red", false),
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
        assert_eq!(
            canonical("The answer is yes", "no", None),
            canonical("Yes.", "no", None)
        );
    }

    /// A gold answer is read as a prediction is: a lowercase letter that is an option's own text
    /// names that option (AI2D's ["d", "c", "b", "a"]), a capital letter names an option by its
    /// position.
    #[test]
    fn gold_letters_read_as_predictions_are() {
        let c = opts(&["d", "c", "b", "a"]);
        assert!(is_correct("a", "a", Some(&c)));
        assert!(!is_correct("d", "a", Some(&c)));
        assert_eq!(gold_choice("A", &c), Some(0));
        assert!(is_correct("A", "A", Some(&c)));
        let words = opts(&["cat", "dog"]);
        assert_eq!(
            gold_choice("b", &words),
            Some(1),
            "no option is \"b\": its letter"
        );
        assert_eq!(gold_choice("dog", &words), Some(1));
    }

    /// Review findings (2026-11-28): a gold letter without the options (they are in the
    /// question's text; "A" used to normalize to nothing, never right), numbers as words, numeric
    /// options, signed powers.
    #[test]
    fn letters_without_options_words_and_numeric_options() {
        for (pred, gold, want) in [
            ("A", "A", true),
            ("(A)", "A", true),
            ("The answer is A.", "A", true),
            ("A. blue", "A", true),
            ("B. blue", "B", true),
            ("B", "A", false),
            ("A red circle is left of the square", "A", false),
            ("C", "C.", true),
            ("I think the answer is (C)", "C", true),
        ] {
            assert_eq!(is_correct(pred, gold, None), want, "{pred:?} vs {gold:?}");
        }
        assert_eq!(canonical("(B)", "A", None), canonical("B.", "A", None));
        for (pred, gold, want) in [
            ("There are three circles", "3", true),
            ("Three", "3", true),
            ("3", "three", true),
            ("twelve", "Twelve.", true),
            ("four", "3", false),
            ("2 red and three blue", "2", true),
            ("10^-3", "0.001", true),
            ("1.5 m^10", "1.5", true),
            ("2 m^-2", "2", true),
        ] {
            assert_eq!(is_correct(pred, gold, None), want, "{pred:?} vs {gold:?}");
        }
        let n = opts(&["1", "2", "3", "1,000"]);
        assert!(is_correct("3.0", "3", Some(&n)));
        assert!(is_correct("1000", "D", Some(&n)));
        assert!(is_correct("There are 2.", "B", Some(&n)));
        assert!(!is_correct("4", "3", Some(&n)));
        assert_eq!(gold_choice("3.0", &n), Some(2));
    }

    /// Cases a review scored wrongly: a Unicode minus or dash is a sign, fullwidth digits are
    /// digits; a number in words is read whole ("twenty-one" is 21, not 1); an option whose text
    /// holds another's ("dark red" and "red") is picked by the longer; "A" cued after it ("A is
    /// correct") or by "be"/"say"; "I" before a verb is the pronoun, with nine options.
    #[test]
    fn signs_compound_number_words_nested_options_and_letter_cues() {
        for (pred, gold, want) in [
            ("\u{2212}2", "2", false),
            ("The answer is \u{2013}2", "2", false),
            ("\u{2212}2", "-2", true),
            ("\u{2013}2", "-2", true),
            ("\u{FF13}", "3", true),
            ("twenty-one", "1", false),
            ("twenty-one", "21", true),
            ("There are seventy five", "75", true),
            ("one hundred", "1", false),
            ("one hundred", "100", true),
            ("one hundred and five", "105", true),
            ("I count one two three", "3", true),
            ("21", "twenty-one", true),
            ("step-2", "-2", false),
            ("3", "+3", true),
            ("$12.00", "$12", true),
            ("12 dollars", "$12", true),
            ("3.0", "(3)", true),
            ("4", "(3)", false),
        ] {
            assert_eq!(is_correct(pred, gold, None), want, "{pred:?} vs {gold:?}");
        }
        let reds = opts(&["red", "dark red"]);
        assert!(is_correct("It is dark red", "B", Some(&reds)));
        assert!(is_correct("It is red", "A", Some(&reds)));
        assert!(!is_correct("red, not dark red", "A", Some(&reds)));
        assert!(!is_correct("red, not dark red", "B", Some(&reds)));
        let cats = opts(&["cat", "black cat"]);
        assert!(is_correct("It is a black cat.", "B", Some(&cats)));
        for pred in [
            "A is the answer",
            "The answer should be A",
            "I would say A here",
            "A is the correct option",
        ] {
            assert!(is_correct(pred, "A", None), "{pred:?}");
        }
        assert!(!is_correct("A red circle is left of the square", "A", None));
        for pred in [
            "A is incorrect.",
            "It cannot be A.",
            "It is not A, but I am unsure",
        ] {
            assert!(!is_correct(pred, "A", None), "{pred:?}");
        }
        assert!(!is_correct("B is wrong here", "B", None));
        // overlapping options, neither inside the other, and equal texts: no pick
        let balls = opts(&["big red", "red ball"]);
        assert_eq!(choice_of("a big red ball", &balls), None);
        let cats2 = opts(&["The cat", "cat"]);
        assert_eq!(choice_of("a cat", &cats2), None);
        // options written "(1)".."(4)": cited in parentheses, read by letter or text as before
        let paren = opts(&["(1)", "(2)", "(3)", "(4)"]);
        assert!(is_correct(
            "The answer is (2), not the 3rd",
            "B",
            Some(&paren)
        ));
        let nine = opts(&["a", "b", "c", "d", "e", "f", "g", "h", "i"]);
        assert!(is_correct("I think B", "B", Some(&nine)));
        assert!(is_correct("I'm sure it is B", "B", Some(&nine)));
        assert!(is_correct("(I)", "I", Some(&nine)));
    }
}
