//! The evaluation report: accuracy per turn (with its 95 % Wilson interval and the answers cut off
//! at --max-new-tokens), transitions between consecutive turns (right->right, right->wrong,
//! wrong->right, wrong->wrong; the fix rate, wrong->right among the wrong, and the break rate,
//! right->wrong among the right; right->wrong by being cut off; the answer-change rate; each pair's
//! exact McNemar p, so "does turn 2 help over turn 1" has its own answer), turn 0 against the
//! last turn with the same test (is the difference more than chance on these questions?), the same
//! per category, for each pair of consecutive turns the stage where the later first departs, with
//! the fixes and breaks among them (an error-type proxy), and compute per turn.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::stats::{mcnemar_exact, wilson95};

fn yes() -> bool {
    true
}

/// One turn of one sample, as stored in predictions.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TurnPrediction {
    pub text: String,
    pub extracted: String,
    pub correct: bool,
    #[serde(default)]
    pub stages: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub prompt_tokens: usize,
    /// Image tiles encoded for the turn (absent in older predictions: 0, counted as a turn
    /// without an image: no vision tower, no cross-attention layers).
    #[serde(default)]
    pub tiles: usize,
    #[serde(default)]
    pub tokens: usize,
    #[serde(default)]
    pub seconds: f64,
    /// Whether the turn ended by itself (end of turn), not at --max-new-tokens (absent in older
    /// predictions: true).
    #[serde(default = "yes")]
    pub finished: bool,
    /// The answer as scoring reads it (the option, the number, or the normalized text): what
    /// "answer changed" compares, so "B" and "(B)" or "3" and "3.0" are one answer.
    #[serde(default)]
    pub canonical: String,
    /// Finished (or concluded) without an answer scoring can read (`answer::unreadable`: no
    /// option, no number, nothing): scored wrong, a broken format rather than a wrong answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_answer: bool,
}

impl TurnPrediction {
    /// The answer to compare between turns (`canonical`, or the extracted text before it existed;
    /// turns without a readable answer all have the same one, as cut-off turns do).
    fn answer_key(&self) -> &str {
        if self.no_answer {
            "no answer"
        } else if self.canonical.is_empty() {
            self.extracted.trim()
        } else {
            &self.canonical
        }
    }
}

/// One line of predictions.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    /// As the benchmark wrote it (a string or an integer).
    pub id: crate::infer::item_id::ItemId,
    pub answer: String,
    #[serde(default)]
    pub category: Option<String>,
    /// What was asked (`BenchItem::asked`): a resume into this folder with a benchmark whose
    /// question of this id differs is refused. Absent in predictions of older trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<String>,
    /// sha256 of the image file it was asked about: a resume whose image under the same path
    /// holds other bytes is refused. Absent for text-only questions and older trainers'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// The scoring rules `correct` was decided by (`answer::SCORING_RULES`; 0: not recorded, an
    /// older trainer's).
    #[serde(default)]
    pub scoring: u32,
    pub turns: Vec<TurnPrediction>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnScore {
    pub turn: usize,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// 95 % Wilson score interval of the accuracy.
    pub ci95: [f64; 2],
    /// Answers cut off at --max-new-tokens (scored wrong unless they reached a conclusion).
    pub cut_off: usize,
    /// Turns that ended without an answer scoring can read (no option, no number, nothing),
    /// scored wrong: a broken format, which a correction turn can cause as well as fix.
    pub no_answer: usize,
}

/// Turn 0 against the last turn, paired on the same samples: the discordant counts and the
/// two-sided exact McNemar p-value (the chance of a split at least this uneven if correcting
/// changed nothing but noise).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Correction {
    pub from: usize,
    pub to: usize,
    pub wrong_right: usize,
    pub right_wrong: usize,
    pub p_value: f64,
}

impl Correction {
    pub fn new(from: usize, to: usize, wrong_right: usize, right_wrong: usize) -> Self {
        Self {
            from,
            to,
            wrong_right,
            right_wrong,
            p_value: mcnemar_exact(wrong_right as u64, right_wrong as u64),
        }
    }

    /// How turn `to` compares with turn `from`: a difference only when significant (p < 0.05).
    pub fn verdict(&self) -> &'static str {
        if self.p_value >= 0.05 {
            "does not differ significantly from"
        } else if self.wrong_right > self.right_wrong {
            "improves on"
        } else {
            "is worse than"
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Transition {
    pub from: usize,
    pub to: usize,
    pub right_right: usize,
    pub right_wrong: usize,
    pub wrong_right: usize,
    pub wrong_wrong: usize,
    /// Of right_wrong, the ones whose later turn was cut off at --max-new-tokens (no answer, not
    /// a changed one).
    pub right_cut_off: usize,
    /// Of wrong_right, the ones whose earlier turn was cut off (an answer finished late, not an
    /// error corrected).
    pub wrong_right_from_cut_off: usize,
    /// Samples whose extracted answer changed between the two turns.
    pub changed: usize,
    pub change_rate: f64,
    /// wrong->right among the samples wrong at `from` (0 when none was).
    pub fix_rate: f64,
    /// right->wrong among the samples right at `from` (0 when none was).
    pub break_rate: f64,
    /// Exact McNemar p of `to` against `from` on these samples.
    pub p_value: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    pub turns: Vec<TurnScore>,
    pub transitions: Vec<Transition>,
    /// With 2+ turns.
    pub correction: Option<Correction>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageDepartures {
    pub from: usize,
    pub to: usize,
    /// By stage: [questions, of them wrong->right, of them right->wrong].
    pub stages: BTreeMap<String, [usize; 3]>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnCost {
    pub turn: usize,
    pub mean_prompt_tokens: f64,
    pub mean_new_tokens: f64,
    pub mean_seconds: f64,
    /// Analytic forward FLOPs (weights: 2 per parameter and token, or vision token; attention
    /// over the cache; `train::flops::FlopCount::inference_flops`), summed over samples.
    pub flops: f64,
}

/// What an evaluation ran (its settings.json holds them all, with the files' fingerprints): the
/// report says it too, since its numbers are a setting's (an ablation's side).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Setup {
    pub benchmark: String,
    pub limit: Option<usize>,
    pub model: String,
    pub adapter: Option<String>,
    pub checkpoint: Option<String>,
    pub turns: usize,
    pub position: crate::infer::Position,
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Sampling's filters and seed (read with temperature > 0): top-k 0 is off.
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    pub correction_prompt: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// What ran (set by `eval::run`; None for a report built from predictions alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup: Option<Setup>,
    pub samples: usize,
    pub turns: Vec<TurnScore>,
    pub transitions: Vec<Transition>,
    /// Turn 0 against the last turn (with 2+ turns).
    pub correction: Option<Correction>,
    pub by_category: BTreeMap<String, Breakdown>,
    /// Where turn 0 and turn 1 first differ: "summary", "caption", "reasoning", "conclusion",
    /// "outside the stages" when every stage is the same but the texts are not (answers without
    /// the stage tags, or text outside them), or "none" when the texts are the same (only with 2+
    /// turns).
    pub first_differing_stage: BTreeMap<String, usize>,
    /// For each pair of consecutive turns, where the later one first departs (the stages of
    /// `first_differing_stage`), with how many of those questions it fixed and broke: which
    /// stage a correction rewrites when it helps, and when it hurts.
    pub stage_departures: Vec<StageDepartures>,
    pub cost: Vec<TurnCost>,
    /// Training FLOPs from a metrics.jsonl (sum of tflops x step seconds), when given.
    pub training_flops: Option<f64>,
    pub parameters: usize,
}

fn breakdown(preds: &[&Prediction]) -> Breakdown {
    let n_turns = preds.iter().map(|p| p.turns.len()).min().unwrap_or(0);
    let turns = (0..n_turns)
        .map(|t| {
            let correct = preds.iter().filter(|p| p.turns[t].correct).count();
            TurnScore {
                turn: t,
                correct,
                total: preds.len(),
                accuracy: ratio(correct, preds.len()),
                ci95: wilson95(correct as u64, preds.len() as u64),
                cut_off: preds.iter().filter(|p| !p.turns[t].finished).count(),
                no_answer: preds.iter().filter(|p| p.turns[t].no_answer).count(),
            }
        })
        .collect();
    let transitions = (1..n_turns)
        .map(|t| {
            let mut tr = Transition {
                from: t - 1,
                to: t,
                right_right: 0,
                right_wrong: 0,
                wrong_right: 0,
                wrong_wrong: 0,
                right_cut_off: 0,
                wrong_right_from_cut_off: 0,
                changed: 0,
                change_rate: 0.0,
                fix_rate: 0.0,
                break_rate: 0.0,
                p_value: 1.0,
            };
            for p in preds {
                let (a, b) = (&p.turns[t - 1], &p.turns[t]);
                match (a.correct, b.correct) {
                    (true, true) => tr.right_right += 1,
                    (true, false) => {
                        tr.right_wrong += 1;
                        tr.right_cut_off += usize::from(cut_off(b));
                    }
                    (false, true) => {
                        tr.wrong_right += 1;
                        tr.wrong_right_from_cut_off += usize::from(cut_off(a));
                    }
                    (false, false) => tr.wrong_wrong += 1,
                }
                tr.changed += usize::from(a.answer_key() != b.answer_key());
            }
            tr.change_rate = ratio(tr.changed, preds.len());
            tr.fix_rate = ratio(tr.wrong_right, tr.wrong_right + tr.wrong_wrong);
            tr.break_rate = ratio(tr.right_wrong, tr.right_right + tr.right_wrong);
            tr.p_value = mcnemar_exact(tr.wrong_right as u64, tr.right_wrong as u64);
            tr
        })
        .collect();
    let correction = (n_turns >= 2).then(|| {
        let last = n_turns - 1;
        let count = |first: bool| {
            preds
                .iter()
                .filter(|p| p.turns[0].correct == first && p.turns[last].correct != first)
                .count()
        };
        Correction::new(0, last, count(false), count(true))
    });
    Breakdown {
        turns,
        transitions,
        correction,
    }
}

/// The first stage whose text differs between turns `a` and `b`; "outside the stages" when every
/// stage is the same but the texts are not, "none" when the texts are the same.
fn first_departure(a: &TurnPrediction, b: &TurnPrediction) -> &'static str {
    STAGE_ORDER
        .iter()
        .find(|s| a.stages.get(**s) != b.stages.get(**s))
        .copied()
        .unwrap_or(match a.text == b.text {
            true => "none",
            false => OUTSIDE_STAGES,
        })
}

/// Whether a turn has no answer for being cut off at --max-new-tokens, as scoring decides it (no
/// answer unless its conclusion closed).
pub(super) fn cut_off(t: &TurnPrediction) -> bool {
    t.canonical == "cut off" || (t.canonical.is_empty() && !t.finished)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

const STAGE_ORDER: [&str; 4] = ["summary", "caption", "reasoning", "conclusion"];
/// `first_differing_stage`'s key for two turns whose stages are the same and texts are not.
const OUTSIDE_STAGES: &str = "outside the stages";

/// Builds the report from predictions in bench order.
/// `turn_flops`: the forward FLOPs of one turn (from its prompt, new tokens and tiles).
pub fn build(
    preds: &[Prediction],
    parameters: usize,
    turn_flops: &dyn Fn(&TurnPrediction) -> f64,
    training_flops: Option<f64>,
) -> Report {
    let all: Vec<&Prediction> = preds.iter().collect();
    let overall = breakdown(&all);
    let mut cats: BTreeMap<String, Vec<&Prediction>> = BTreeMap::new();
    // questions without a category, under a name no benchmark category has
    let mut uncategorized = String::from("(none)");
    while preds
        .iter()
        .any(|p| p.category.as_deref() == Some(uncategorized.as_str()))
    {
        uncategorized = format!("({uncategorized})");
    }
    for p in preds {
        cats.entry(p.category.clone().unwrap_or_else(|| uncategorized.clone()))
            .or_default()
            .push(p);
    }
    let by_category = cats.into_iter().map(|(k, v)| (k, breakdown(&v))).collect();
    let mut first_differing_stage: BTreeMap<String, usize> = BTreeMap::new();
    for p in preds.iter().filter(|p| p.turns.len() >= 2) {
        let stage = first_departure(&p.turns[0], &p.turns[1]);
        *first_differing_stage.entry(stage.to_string()).or_insert(0) += 1;
    }
    let n_turns = overall.turns.len();
    let stage_departures = (1..n_turns)
        .map(|t| {
            let mut stages: BTreeMap<String, [usize; 3]> = BTreeMap::new();
            for p in preds {
                let (a, b) = (&p.turns[t - 1], &p.turns[t]);
                let row = stages.entry(first_departure(a, b).to_string()).or_default();
                row[0] += 1;
                row[1] += usize::from(!a.correct && b.correct);
                row[2] += usize::from(a.correct && !b.correct);
            }
            StageDepartures {
                from: t - 1,
                to: t,
                stages,
            }
        })
        .collect();
    let cost = (0..n_turns)
        .map(|t| {
            let n = preds.len().max(1) as f64;
            let prompt: usize = preds.iter().map(|p| p.turns[t].prompt_tokens).sum();
            let new: usize = preds.iter().map(|p| p.turns[t].tokens).sum();
            TurnCost {
                turn: t,
                mean_prompt_tokens: prompt as f64 / n,
                mean_new_tokens: new as f64 / n,
                mean_seconds: preds.iter().map(|p| p.turns[t].seconds).sum::<f64>() / n,
                flops: preds.iter().map(|p| turn_flops(&p.turns[t])).sum(),
            }
        })
        .collect();
    Report {
        setup: None,
        samples: preds.len(),
        turns: overall.turns,
        transitions: overall.transitions,
        correction: overall.correction,
        by_category,
        first_differing_stage,
        stage_departures,
        cost,
        training_flops,
        parameters,
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// A p-value as the reports print it: three significant digits, at least three decimals
/// (scientific below 0.001), more where rounding would carry a p below 0.05 up to "0.0500" (the
/// verdict next to it says significant).
pub(crate) fn p_text(p: f64) -> String {
    if p < 1e-3 {
        return format!("{p:.1e}");
    }
    let mut decimals = (2 - p.log10().floor() as i32).max(3) as usize;
    loop {
        let text = format!("{p:.decimals$}");
        match p < 0.05 && text.parse::<f64>().is_ok_and(|shown| shown >= 0.05) && decimals < 12 {
            true => decimals += 1,
            false => return text,
        }
    }
}

/// report.md: the same numbers as report.json, as tables.
/// How answers are scored (`answer`), for the reader of the report.
const SCORING: &str = "Scoring: a turn answers with its <CONCLUSION> stage (else the last line after its last closed stage); with choices, the option it picks by letter or text; a number, by value (relative tolerance); free text must equal the gold answer after lower-casing and dropping punctuation, articles and a lead-in such as \"the answer is\" (a longer sentence around the right words counts as wrong).";

pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# Evaluation report\n\n{} sample{}, {} parameters.\n",
        r.samples,
        if r.samples == 1 { "" } else { "s" },
        r.parameters
    );
    if let Some(u) = &r.setup {
        let limit = u
            .limit
            .map_or(String::new(), |l| format!(" (the first {l} questions)"));
        let mut weights = format!("model `{}`", u.model);
        if let Some(a) = &u.adapter {
            weights += &format!(", adapter `{a}`");
        }
        if let Some(c) = &u.checkpoint {
            weights += &format!(", checkpoint `{c}`");
        }
        let position = match u.position {
            crate::infer::Position::AfterAnswer => "after the answer",
            crate::infer::Position::AfterReasoning => "after the reasoning",
        };
        let decoding = match u.temperature {
            0.0 => "greedy".to_string(),
            t => format!(
                "sampled at temperature {t}, top-k {}, top-p {}, seed {} (each question's sampler seeded from it and the question's id)",
                match u.top_k {
                    0 => "off".to_string(),
                    k => k.to_string(),
                },
                u.top_p,
                u.seed
            ),
        };
        let turns = match u.turns {
            1 => "1 turn (no correction turn)".to_string(),
            n => format!("{n} turns, the correction turn {position}"),
        };
        s += &format!(
            "\n## Setup\n\n- benchmark `{}`{limit}\n- {weights}\n- {turns}, at most {} new tokens per turn, {decoding}\n- correction prompt: {:?}\n",
            u.benchmark, u.max_new_tokens, u.correction_prompt
        );
    }
    s += &format!("\n## Accuracy per turn\n\n{SCORING}\n\n| turn | correct | total | accuracy | 95% CI (Wilson) | cut off at max tokens | no readable answer |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for t in &r.turns {
        s += &format!(
            "| {} | {} | {} | {} | {} - {} | {} | {} |\n",
            t.turn,
            t.correct,
            t.total,
            pct(t.accuracy),
            pct(t.ci95[0]),
            pct(t.ci95[1]),
            t.cut_off,
            t.no_answer
        );
    }
    s += &format!("\n![Accuracy per turn]({})\n", super::plots::ACCURACY);
    if !r.transitions.is_empty() {
        s += "\n## Transitions between consecutive turns\n\nFix rate: wrong->right among the answers wrong before (from cut off: of those, the ones whose earlier turn hit --max-new-tokens, an answer finished late rather than an error corrected); break rate: right->wrong among the right ones (cut off: of those, the ones whose later turn hit --max-new-tokens); p: exact McNemar of the two turns; answer changed: the answers as scoring reads them differ (a turn cut off before its conclusion has the answer \"cut off\", and one without a readable answer the answer \"no answer\", so two such turns count as the same answer).\n\n| from -> to | right->right | right->wrong (cut off) | wrong->right (from cut off) | wrong->wrong | fix rate | break rate | p | answer changed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    }
    for t in &r.transitions {
        s += &format!(
            "| {} -> {} | {} | {} ({}) | {} ({}) | {} | {} | {} | {} | {} ({}) |\n",
            t.from,
            t.to,
            t.right_right,
            t.right_wrong,
            t.right_cut_off,
            t.wrong_right,
            t.wrong_right_from_cut_off,
            t.wrong_wrong,
            pct(t.fix_rate),
            pct(t.break_rate),
            p_text(t.p_value),
            t.changed,
            pct(t.change_rate)
        );
    }
    if !r.transitions.is_empty() {
        s += &format!(
            "\n![Transitions per turn pair]({})\n",
            super::plots::TRANSITIONS
        );
    }
    if let (Some(c), Some(first), Some(last)) = (&r.correction, r.turns.first(), r.turns.last()) {
        let verdict = c.verdict();
        s += &format!(
            "\nSelf-correction: the last turn ({}) {verdict} turn 0 ({}): {} wrong->right against {} right->wrong, exact McNemar p = {} (significant below 0.05).\n",
            pct(last.accuracy),
            pct(first.accuracy),
            c.wrong_right,
            c.right_wrong,
            p_text(c.p_value)
        );
        // (a turn cut off has no answer: a difference in cut-offs is the token budget's)
        if first.cut_off + last.cut_off > 0 {
            s += &format!(
                "Of these answers, {} at turn 0 and {} at the last turn were cut off at --max-new-tokens (wrong unless their conclusion had closed): the difference they make is the token budget's, not the correction's; a larger --max-new-tokens tells them apart.\n",
                first.cut_off, last.cut_off
            );
        }
    }
    s += "\n## By category\n\n| category | samples | accuracy per turn | wrong->right (turn 0 vs last) | right->wrong | p |\n| --- | ---: | --- | ---: | ---: | ---: |\n";
    for (cat, b) in &r.by_category {
        let accs: Vec<String> = b.turns.iter().map(|t| pct(t.accuracy)).collect();
        // turn 0 against the last, as the p-value beside them (summing every turn pair would
        // count a wrong -> right -> wrong sample in both columns)
        let (wr, rw, p) = match &b.correction {
            Some(c) => (
                c.wrong_right.to_string(),
                c.right_wrong.to_string(),
                p_text(c.p_value),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        // (a "|" in a category name would end its table cell, a line break its row)
        let cat = cat.replace('|', "\\|").replace(['\n', '\r'], " ");
        s += &format!(
            "| {cat} | {} | {} | {wr} | {rw} | {p} |\n",
            b.turns.first().map_or(0, |t| t.total),
            accs.join(" / ")
        );
    }
    if !r.stage_departures.is_empty() {
        s += "\n## Where each turn departs from the one before\n\nThe first stage whose text differs between the two turns, with the questions the later turn fixed (wrong->right) and broke (right->wrong) among them: which stage a correction rewrites when it helps and when it hurts. \"outside the stages\": every stage the same but the texts not (answers without the stage tags, or text outside them); \"none\": the same text.\n";
        // in the stages' order, then "outside the stages", "none" last (not alphabetical)
        let rank = |s: &str| match STAGE_ORDER.iter().position(|x| *x == s) {
            Some(i) => i,
            None if s == OUTSIDE_STAGES => STAGE_ORDER.len(),
            None => STAGE_ORDER.len() + 1,
        };
        for d in &r.stage_departures {
            s += &format!(
                "\n| turn {} departs from turn {} at | questions | wrong->right | right->wrong |\n| --- | ---: | ---: | ---: |\n",
                d.to, d.from
            );
            let mut stages: Vec<(&String, &[usize; 3])> = d.stages.iter().collect();
            stages.sort_by_key(|(s, _)| rank(s));
            for (stage, [n, fixed, broke]) in stages {
                s += &format!("| {stage} | {n} | {fixed} | {broke} |\n");
            }
        }
    }
    s += "\n## Compute per turn\n\nForward FLOPs count the weights, attention over the cache and the vision tower.\n\n| turn | mean prompt tokens | mean new tokens | mean seconds | forward FLOPs per question | forward FLOPs, all questions |\n| --- | ---: | ---: | ---: | ---: | ---: |\n";
    for c in &r.cost {
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.3e} | {:.3e} |\n",
            c.turn,
            c.mean_prompt_tokens,
            c.mean_new_tokens,
            c.mean_seconds,
            c.flops / r.samples.max(1) as f64,
            c.flops
        );
    }
    if let Some(f) = r.training_flops {
        let inference: f64 = r.cost.iter().map(|c| c.flops).sum();
        let times = match inference > 0.0 {
            true => {
                let ratio = f / inference;
                match (1.0..1e6).contains(&ratio) {
                    true => format!(" ({ratio:.1} times this evaluation's {inference:.3e})"),
                    false => format!(" ({ratio:.3e} times this evaluation's {inference:.3e})"),
                }
            }
            false => String::new(),
        };
        s += &format!("\nTraining compute (from metrics.jsonl, all ranks): {f:.3e} FLOPs{times}; set it against an RL run's rollouts + updates for the cost question.\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(correct: bool, extracted: &str, reasoning: &str) -> TurnPrediction {
        let mut stages = BTreeMap::new();
        stages.insert("summary".to_string(), Some("s".to_string()));
        stages.insert("reasoning".to_string(), Some(reasoning.to_string()));
        TurnPrediction {
            text: String::new(),
            extracted: extracted.into(),
            correct,
            stages,
            prompt_tokens: 10,
            tokens: 5,
            tiles: 0,
            seconds: 1.0,
            finished: true,
            canonical: String::new(),
            no_answer: false,
        }
    }

    /// A model of 100 parameters without attention or vision: 2 x 100 FLOPs per token.
    fn two_n_tokens(t: &TurnPrediction) -> f64 {
        2.0 * 100.0 * (t.prompt_tokens + t.tokens) as f64
    }

    fn pred(id: &str, cat: &str, t: [(bool, &str, &str); 2]) -> Prediction {
        Prediction {
            id: id.into(),
            answer: "x".into(),
            category: Some(cat.into()),
            asked: None,
            image_sha256: None,
            scoring: crate::eval::answer::SCORING_RULES,
            turns: t.iter().map(|&(c, e, r)| turn(c, e, r)).collect(),
        }
    }

    #[test]
    fn numbers_recomputed_by_hand() {
        let preds = vec![
            pred("1", "count", [(true, "3", "r"), (true, "3", "r")]), // right -> right, unchanged
            pred("2", "count", [(false, "4", "r"), (true, "3", "r2")]), // wrong -> right, changed, reasoning differs
            pred("3", "color", [(true, "red", "r"), (false, "blue", "q")]),
            pred("4", "color", [(false, "red", "r"), (false, "red", "r")]),
        ];
        let r = build(&preds, 100, &two_n_tokens, Some(1e9));
        assert_eq!(r.turns[0].correct, 2);
        assert_eq!(r.turns[1].correct, 2);
        assert_eq!(r.turns[0].accuracy, 0.5);
        let t = &r.transitions[0];
        assert_eq!(
            (t.right_right, t.right_wrong, t.wrong_right, t.wrong_wrong),
            (1, 1, 1, 1)
        );
        assert_eq!(t.changed, 2);
        assert_eq!(t.change_rate, 0.5);
        assert_eq!(r.by_category["count"].turns[1].accuracy, 1.0);
        assert_eq!(r.by_category["color"].transitions[0].right_wrong, 1);
        assert_eq!(r.first_differing_stage["reasoning"], 2);
        assert_eq!(r.first_differing_stage["none"], 2);
        // the same stages (none at all: untagged answers) and other texts: not "none"
        let mut untagged = pred("5", "count", [(false, "4", "r"), (false, "5", "r")]);
        for (t, text) in untagged.turns.iter_mut().zip(["4 shapes", "5 shapes"]) {
            t.stages.clear();
            t.text = text.into();
        }
        let u = build(&[untagged], 100, &two_n_tokens, None);
        assert_eq!(u.first_differing_stage["outside the stages"], 1);
        assert!(!u.first_differing_stage.contains_key("none"));
        // (fix: 1 of the 2 wrong at turn 0; break: 1 of the 2 right)
        assert_eq!((t.fix_rate, t.break_rate, t.p_value), (0.5, 0.5, 1.0));
        // 4 samples x (10 + 5) tokens x 2 x 100 parameters
        assert_eq!(r.cost[0].flops, 2.0 * 100.0 * 60.0);
        let md = markdown(&r);
        assert!(
            md.contains("## Accuracy per turn\n\nScoring: a turn answers with its <CONCLUSION>"),
            "{md}"
        );
        assert!(
            md.contains("| 0 -> 1 | 1 | 1 (0) | 1 (0) | 1 | 50.0% | 50.0% | 1.000 | 2 (50.0%) |"),
            "{md}"
        );
        assert!(
            md.contains("does not differ significantly from turn 0 (50.0%): 1 wrong->right against 1 right->wrong, exact McNemar p = 1.000"),
            "{md}"
        );
        assert_eq!(r.turns[0].ci95, crate::eval::stats::wilson95(2, 4));
        let c = r.correction.as_ref().unwrap();
        assert_eq!((c.from, c.to, c.wrong_right, c.right_wrong), (0, 1, 1, 1));
    }

    /// 3 wrong->right against 2 right->wrong is no evidence (p = 1); 10 against 0 is
    /// (p = 2 / 1024); cut-off turns are counted.
    #[test]
    fn the_verdict_needs_a_significant_split() {
        let mut preds: Vec<Prediction> = (0..3)
            .map(|i| pred(&format!("w{i}"), "c", [(false, "a", "r"), (true, "b", "r")]))
            .chain(
                (0..2).map(|i| pred(&format!("r{i}"), "c", [(true, "b", "r"), (false, "a", "r")])),
            )
            .collect();
        preds[0].turns[1].finished = false;
        preds[3].turns[1].finished = false;
        let r = build(&preds, 1, &two_n_tokens, None);
        assert_eq!(r.turns[1].cut_off, 2);
        // a right answer followed by a cut-off turn is right->wrong, and counted as cut off
        assert_eq!(
            (r.transitions[0].right_wrong, r.transitions[0].right_cut_off),
            (2, 1)
        );
        let md = markdown(&r);
        assert!(md.contains("does not differ significantly"), "{md}");
        assert!(!md.contains("improves on"), "{md}");
        let ten: Vec<Prediction> = (0..10)
            .map(|i| pred(&format!("w{i}"), "c", [(false, "a", "r"), (true, "b", "r")]))
            .collect();
        let r = build(&ten, 1, &two_n_tokens, None);
        assert_eq!(r.correction.as_ref().unwrap().p_value, 2.0 / 1024.0);
        assert!(markdown(&r).contains("improves on turn 0"));
    }

    /// With three turns, a category's wrong->right and right->wrong are turn 0 against the last,
    /// the pair its p-value tests: wrong -> right -> wrong is in neither column.
    #[test]
    fn category_counts_are_turn_0_against_the_last() {
        let mut p = pred("1", "count", [(false, "4", "r"), (true, "3", "r")]);
        p.turns.push(p.turns[0].clone());
        let r = build(&[p], 1, &two_n_tokens, None);
        let md = markdown(&r);
        assert!(
            md.contains("| count | 1 | 0.0% / 100.0% / 0.0% | 0 | 0 | 1.000 |"),
            "{md}"
        );
    }

    /// Questions without a category are not counted with a category literally named "(none)".
    #[test]
    fn uncategorized_questions_keep_apart_from_a_category_named_none() {
        let mut plain = pred("2", "x", [(true, "3", "r"), (true, "3", "r")]);
        plain.category = None;
        let named = pred("1", "(none)", [(true, "3", "r"), (true, "3", "r")]);
        let preds = [named.clone(), named, plain];
        let r = build(&preds, 1, &two_n_tokens, None);
        let sizes: Vec<(&str, usize)> = r
            .by_category
            .iter()
            .map(|(k, b)| (k.as_str(), b.turns[0].total))
            .collect();
        assert_eq!(sizes, [("((none))", 1), ("(none)", 2)]);
    }

    /// The first differing stage is listed in the stages' order, "none" last; a "|" or a line
    /// break in a category name does not break its table row.
    #[test]
    fn stages_in_order_and_categories_escaped() {
        let preds = [
            pred("1", "a|b", [(true, "3", "r"), (true, "3", "r")]),
            pred("2", "a|b", [(true, "3", "r"), (true, "3", "r2")]),
            pred("3", "two\nlines", [(true, "3", "r"), (true, "3", "r")]),
        ];
        let md = markdown(&build(&preds, 1, &two_n_tokens, None));
        let (reasoning, none) = (md.find("| reasoning | 1 |"), md.find("| none | 2 |"));
        assert!(
            reasoning.is_some() && none.is_some() && reasoning < none,
            "{md}"
        );
        assert!(md.contains("| a\\|b | 2 |"), "{md}");
        assert!(md.contains("| two lines | 1 |"), "{md}");
    }

    /// Three significant digits, never a p below 0.05 shown as 0.05 (25 against 42 discordant
    /// questions gives p = 0.0498; 117 against 150, 0.04998), and no exact zero.
    #[test]
    fn p_values_below_the_threshold_never_read_as_it() {
        use crate::eval::stats::mcnemar_exact;
        for (p, text) in [
            (0.25, "0.250"),
            (1.0, "1.000"),
            (0.0498, "0.0498"),
            (0.049_98, "0.04998"),
            (0.05, "0.0500"),
            (0.002, "0.00200"),
            (4e-4, "4.0e-4"),
        ] {
            assert_eq!(p_text(p), text, "{p}");
        }
        let p = mcnemar_exact(117, 150);
        assert!(p < 0.05 && p_text(p).parse::<f64>().unwrap() < 0.05, "{p}");
        assert!(mcnemar_exact(0, 2000) > 0.0);
    }

    /// A review's cases: fixes from a cut-off turn are counted apart, the verdict says how many
    /// answers were cut off, each turn pair has its stage table with fixes and breaks, the setup
    /// heads the report, FLOPs are given per question too, and one turn has no transitions.
    #[test]
    fn cut_offs_stage_tables_setup_and_one_turn() {
        let mut preds: Vec<Prediction> = (0..3)
            .map(|i| {
                pred(
                    &format!("w{i}"),
                    "c",
                    [(false, "a", "r"), (true, "b", "r2")],
                )
            })
            .collect();
        preds[0].turns[0].finished = false;
        let mut third = preds[1].clone();
        third.id = "x".into();
        third.turns.push(turn(false, "a", "r3"));
        let mut r = build(&preds, 100, &two_n_tokens, Some(1e6));
        let t = &r.transitions[0];
        assert_eq!((t.wrong_right, t.wrong_right_from_cut_off), (3, 1));
        let d = &r.stage_departures[0];
        assert_eq!((d.from, d.to, d.stages["reasoning"]), (0, 1, [3, 3, 0]));
        r.setup = Some(Setup {
            benchmark: "b.jsonl".into(),
            limit: Some(3),
            model: "/m".into(),
            adapter: None,
            checkpoint: Some("/c/step-00000002".into()),
            turns: 2,
            position: crate::infer::Position::AfterReasoning,
            max_new_tokens: 40,
            temperature: 0.0,
            top_k: 50,
            top_p: 0.9,
            seed: 7,
            correction_prompt: "Check.".into(),
        });
        if let Some(u) = r.setup.as_mut() {
            u.temperature = 0.7;
        }
        assert!(markdown(&r).contains("per turn, sampled at temperature 0.7, top-k 50, top-p 0.9, seed 7 (each question's sampler"));
        if let Some(u) = r.setup.as_mut() {
            u.temperature = 0.0;
        }
        let md = markdown(&r);
        for want in [
            "## Setup\n\n- benchmark `b.jsonl` (the first 3 questions)\n- model `/m`, checkpoint `/c/step-00000002`\n- 2 turns, the correction turn after the reasoning, at most 40 new tokens per turn, greedy\n",
            "| 0 -> 1 | 0 | 0 (0) | 3 (1) | 0 |",
            "Of these answers, 1 at turn 0 and 0 at the last turn were cut off at --max-new-tokens",
            "| turn 1 departs from turn 0 at | questions | wrong->right | right->wrong |",
            "| reasoning | 3 | 3 | 0 |",
            // 3 questions x (10 + 5) tokens x 2 x 100: 9000, 3000 each
            "| 3.000e3 | 9.000e3 |",
            "(55.6 times this evaluation's 1.800e4)",
        ] {
            assert!(md.contains(want), "{want:?} in\n{md}");
        }
        // three turns: a stage table per pair
        let r3 = build(&[third], 1, &two_n_tokens, None);
        assert_eq!(r3.stage_departures.len(), 2);
        assert_eq!(r3.stage_departures[1].stages["reasoning"], [1, 0, 1]);
        // one turn: no transitions section
        let mut one = preds[1].clone();
        one.turns.truncate(1);
        let md = markdown(&build(&[one], 1, &two_n_tokens, None));
        assert!(!md.contains("## Transitions"), "{md}");
        assert!(!md.contains("departs"), "{md}");
    }

    /// "Answer changed" compares the canonical answers: "B" and "(B)" are one answer.
    #[test]
    fn changed_compares_canonical_answers() {
        let mut p = pred("1", "c", [(true, "B", "r"), (true, "(B)", "r")]);
        p.turns[0].canonical = "choice 1".into();
        p.turns[1].canonical = "choice 1".into();
        assert_eq!(
            build(&[p.clone()], 1, &two_n_tokens, None).transitions[0].changed,
            0
        );
        p.turns[1].canonical = String::new(); // older predictions: the extracted text
        assert_eq!(
            build(&[p], 1, &two_n_tokens, None).transitions[0].changed,
            1
        );
    }
}
