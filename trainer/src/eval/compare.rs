//! Two evaluations of the same benchmark set side by side, paired question by question (`trainer
//! compare A B`): per turn, each run's accuracy, the questions only one of them answers right, and
//! the exact McNemar p of the difference; and each question's last turn in A against its last
//! turn in B (a base model's one answer against a self-correcting model's final one). The paired
//! test is what says whether a trained model beats its base (or one correction prompt another) on
//! these questions; two accuracies with their own intervals overlap long after the paired
//! difference is clear.
use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::report::{Prediction, TurnPrediction};
use super::stats::mcnemar_exact;
use super::EvalError;
use crate::infer::item_id::ItemId;

/// One turn of the comparison, over the questions both runs answered at that turn.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnComparison {
    pub turn: usize,
    #[serde(flatten)]
    pub paired: Paired,
}

/// A and B's answers to the same questions, paired.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Paired {
    pub questions: usize,
    pub accuracy_a: f64,
    pub accuracy_b: f64,
    /// Right in both runs.
    pub both: usize,
    /// Right in A only, in B only.
    pub a_only: usize,
    pub b_only: usize,
    /// Exact McNemar p of `a_only` against `b_only`.
    pub p_value: f64,
    /// Of these questions, the ones each run's turn was cut off at --max-new-tokens (no answer,
    /// scored wrong): a difference they make is the token budget's.
    pub cut_off_a: usize,
    pub cut_off_b: usize,
    /// Of these questions, the ones each run's turn finished without an answer scoring can read
    /// (no option, no number, nothing: `TurnPrediction::no_answer`), scored wrong.
    pub no_answer_a: usize,
    pub no_answer_b: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    /// Questions in both runs (the pairs), and in one run only (left out).
    pub paired: usize,
    pub only_a: usize,
    pub only_b: usize,
    /// Turns each run generated (the comparison covers the turns both have).
    pub turns_a: usize,
    pub turns_b: usize,
    pub turns: Vec<TurnComparison>,
    /// Each question's last turn in A against its last turn in B (when a run has more than one
    /// turn): the final answers, whatever turn each run ended at.
    pub last: Option<Paired>,
    /// The settings the two runs differ in (settings.json: generation flags, the weights' files
    /// by fingerprint, the prompts' day), as "key: A value, B value"; what the comparison tests
    /// besides what was meant to differ.
    pub settings_differ: Vec<String>,
    /// The folders that also hold an unfinished run's `predictions.rank-*.jsonl` (read over
    /// predictions.jsonl, as a resumed `trainer eval` reads them, but not scored into a report).
    pub unfinished: Vec<String>,
}

/// Compares the predictions of two `trainer eval --out` folders.
pub fn compare(a: &Path, b: &Path) -> Result<Comparison, EvalError> {
    let (pa, pb) = (predictions_of(a)?, predictions_of(b)?);
    let mut paired: Vec<(&Prediction, &Prediction)> = pa
        .iter()
        .filter_map(|(id, p)| pb.get(id).map(|q| (p, q)))
        .collect();
    // (by id, shorter first, so "q2" before "q10": one question named, the same every time)
    paired.sort_by(|(p, _), (q, _)| (p.id.len(), &p.id).cmp(&(q.id.len(), &q.id)));
    // the same id in two benchmarks (ids "0", "1", ... are common) is not the same question
    if let Some((p, q)) = paired.iter().find(|(p, q)| {
        p.answer != q.answer || matches!((&p.asked, &q.asked), (Some(x), Some(y)) if x != y)
    }) {
        let what = match p.answer != q.answer {
            true => format!("answer {:?} against {:?}", p.answer, q.answer),
            false => "the question asked".to_string(),
        };
        return Err(EvalError::Io(format!(
            "question {:?} differs between {} and {} ({what}): they are not evaluations of the same benchmark",
            p.id,
            a.display(),
            b.display(),
        )));
    }
    if paired.is_empty() {
        return Err(EvalError::Io(format!(
            "{} and {} share no question id: they are not evaluations of the same benchmark",
            a.display(),
            b.display()
        )));
    }
    let turns_a = paired.iter().map(|(p, _)| p.turns.len()).max().unwrap_or(0);
    let turns_b = paired.iter().map(|(_, q)| q.turns.len()).max().unwrap_or(0);
    // (a question whose run stopped before turn t is not paired at t)
    let turns = (0..turns_a.min(turns_b))
        .map(|t| TurnComparison {
            turn: t,
            paired: pair(&paired, |p| p.turns.get(t)),
        })
        .collect();
    let last = (turns_a.max(turns_b) > 1).then(|| pair(&paired, |p| p.turns.last()));
    Ok(Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        paired: paired.len(),
        only_a: pa.len() - paired.len(),
        only_b: pb.len() - paired.len(),
        turns_a,
        turns_b,
        turns,
        last,
        settings_differ: scoring_differs(&paired)
            .into_iter()
            .chain(settings_differ(a, b))
            .collect(),
        unfinished: [a, b]
            .iter()
            .filter(|d| has_rank_files(d))
            .map(|d| d.display().to_string())
            .collect(),
    })
}

/// The questions both runs have a turn `pick` for, paired: accuracies, discordant counts, the
/// exact McNemar p, cut-off turns.
fn pair(
    paired: &[(&Prediction, &Prediction)],
    pick: impl Fn(&Prediction) -> Option<&TurnPrediction>,
) -> Paired {
    let at: Vec<(&TurnPrediction, &TurnPrediction)> = paired
        .iter()
        .filter_map(|(p, q)| Some((pick(p)?, pick(q)?)))
        .collect();
    let count =
        |f: &dyn Fn(bool, bool) -> bool| at.iter().filter(|(x, y)| f(x.correct, y.correct)).count();
    let (a_only, b_only) = (count(&|x, y| x && !y), count(&|x, y| !x && y));
    let n = at.len().max(1) as f64;
    let cut = |in_b: bool| {
        at.iter()
            .filter(|(x, y)| super::report::cut_off(if in_b { y } else { x }))
            .count()
    };
    let unreadable = |in_b: bool| {
        (at.iter())
            .filter(|(x, y)| if in_b { y.no_answer } else { x.no_answer })
            .count()
    };
    Paired {
        questions: at.len(),
        accuracy_a: count(&|x, _| x) as f64 / n,
        accuracy_b: count(&|_, y| y) as f64 / n,
        both: count(&|x, y| x && y),
        a_only,
        b_only,
        p_value: mcnemar_exact(a_only as u64, b_only as u64),
        cut_off_a: cut(false),
        cut_off_b: cut(true),
        no_answer_a: unreadable(false),
        no_answer_b: unreadable(true),
    }
}

/// Whether the paired predictions were scored by different rules (`answer::SCORING_RULES`: a
/// folder evaluated by an older trainer, rescored by neither run since): "scoring rules: A .., B
/// .." with how to rescore; None when every prediction was scored by the same rules.
fn scoring_differs(paired: &[(&Prediction, &Prediction)]) -> Option<String> {
    let rules = |side: usize| -> std::collections::BTreeSet<u32> {
        (paired.iter())
            .map(|pq| [pq.0, pq.1][side].scoring)
            .collect()
    };
    let (ra, rb) = (rules(0), rules(1));
    if ra == rb && ra.len() == 1 {
        return None;
    }
    let named = |r: &std::collections::BTreeSet<u32>| -> String {
        let v: Vec<String> = r
            .iter()
            .map(|&v| match v {
                0 => "an older trainer's (unrecorded)".to_string(),
                v => format!("v{v}"),
            })
            .collect();
        v.join(" and ")
    };
    Some(format!(
        "scoring rules: A {}, B {} (this trainer's: v{}); run a folder's `trainer eval` command again to rescore its stored predictions by this trainer's rules (nothing is generated again)",
        named(&ra),
        named(&rb),
        super::answer::SCORING_RULES
    ))
}

/// The settings two eval folders' settings.json differ in (what predictions depend on; the
/// folders' paths left out where their files' fingerprints are recorded), "key: A x, B y" (a long
/// value, a fingerprint, is named only); a folder without one is named.
fn settings_differ(a: &Path, b: &Path) -> Vec<String> {
    let read = |dir: &Path| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join("settings.json")).ok()?;
        serde_json::from_str(&text).ok()
    };
    let (sa, sb) = match (read(a), read(b)) {
        (Some(x), Some(y)) => (x, y),
        (x, y) => {
            let missing = [(a, x.is_none()), (b, y.is_none())];
            return (missing.iter().filter(|m| m.1))
                .map(|(dir, _)| {
                    format!(
                        "{}: no readable settings.json (its settings cannot be compared)",
                        dir.display()
                    )
                })
                .collect();
        }
    };
    let [ca, cb] = super::settings::comparable(&sa, &sb);
    super::settings::differing_keys(&ca, &cb, "")
        .into_iter()
        .map(|key| {
            let at = |v: &serde_json::Value| {
                let text = v
                    .pointer(&format!("/{}", key.replace('.', "/")))
                    .map_or("(unset)".to_string(), |x| x.to_string());
                // (a long value, a correction prompt, shortened)
                match text.chars().count() > 80 {
                    true => text.chars().take(77).collect::<String>() + "...",
                    false => text,
                }
            };
            // (the files' fingerprints say only that they differ)
            let fingerprint = key.starts_with("model.model_")
                || key.starts_with("model.adapter_sha256")
                || key.starts_with("model.checkpoint");
            match fingerprint {
                true => format!("{key} (the files differ)"),
                false => format!("{key}: A {}, B {}", at(&ca), at(&cb)),
            }
        })
        .collect()
}

/// An eval folder's predictions by id, as a resumed `trainer eval` reads them.
fn predictions_of(dir: &Path) -> Result<HashMap<ItemId, Prediction>, EvalError> {
    if !dir.join("predictions.jsonl").is_file() {
        let hint = match has_rank_files(dir) {
            true => "an interrupted evaluation: run its `trainer eval` command again to finish it (it resumes), then compare",
            false => "expected a `trainer eval --out` folder",
        };
        return Err(EvalError::Io(format!(
            "{}: no predictions.jsonl ({hint})",
            dir.display()
        )));
    }
    super::existing_predictions(dir)
}

/// Whether `dir` holds an interrupted `trainer eval`'s per-rank prediction files.
fn has_rank_files(dir: &Path) -> bool {
    !super::rank_files(dir).is_empty()
}

impl Comparison {
    /// The table `trainer compare` prints.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "A: {} ({} turn(s))\nB: {} ({} turn(s))\n{} questions paired ({} in A only, {} in B only, left out)\n",
            self.a, self.turns_a, self.b, self.turns_b, self.paired, self.only_a, self.only_b
        );
        for dir in &self.unfinished {
            s += &format!("Note: {dir} holds an unfinished evaluation's predictions.rank-*.jsonl, whose predictions replace predictions.jsonl's of the same questions here (as a resumed `trainer eval` reads them), not rescored: run its `trainer eval` command again to finish it.\n");
        }
        match self.settings_differ.is_empty() {
            true => s += "The two runs' settings are the same (weights, generation, prompts).\n",
            false => {
                s += "The two runs differ in (the comparison tests all of these at once):\n";
                for d in &self.settings_differ {
                    s += &format!("- {d}\n");
                }
            }
        }
        s += "\n| turn | questions | accuracy A | accuracy B | right in both | A only | B only | p (exact McNemar) | cut off A / B | no readable answer A / B |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        let last = self.last.iter().map(|p| ("last".to_string(), p));
        let rows = (self.turns.iter().map(|t| (t.turn.to_string(), &t.paired))).chain(last);
        for (turn, t) in rows.clone() {
            s += &format!(
                "| {turn} | {} | {:.1}% | {:.1}% | {} | {} | {} | {} | {} / {} | {} / {} |\n",
                t.questions,
                100.0 * t.accuracy_a,
                100.0 * t.accuracy_b,
                t.both,
                t.a_only,
                t.b_only,
                super::report::p_text(t.p_value),
                t.cut_off_a,
                t.cut_off_b,
                t.no_answer_a,
                t.no_answer_b
            );
        }
        if self.last.is_some() {
            s += &format!(
                "\n\"last\": each question's last turn in A (of up to {}) against its last turn in B (of up to {}), the final answers.\n",
                self.turns_a, self.turns_b
            );
        }
        if rows.into_iter().any(|(_, t)| t.cut_off_a + t.cut_off_b > 0) {
            s += "\nAnswers cut off at --max-new-tokens have none and are scored wrong: where the runs' cut-offs differ, so does what the test measures (the token budget as well as the answers).\n";
        }
        s +=
            "\nA difference is more than chance on these questions when p < 0.05. Correctness is as \
              stored in each predictions.jsonl: questions kept there from an earlier run into the \
              folder (a longer one, or one of another benchmark) are paired too, while its report.md \
              covers only its last run's.\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rows: &[(&str, &[bool])]) {
        std::fs::create_dir_all(dir).unwrap();
        let lines: Vec<String> = rows
            .iter()
            .map(|(id, turns)| {
                let turns: Vec<serde_json::Value> = turns
                    .iter()
                    .map(|c| serde_json::json!({"text": "", "extracted": "", "correct": c}))
                    .collect();
                serde_json::json!({"id": id, "answer": "x", "turns": turns}).to_string()
            })
            .collect();
        std::fs::write(dir.join("predictions.jsonl"), lines.join("\n") + "\n").unwrap();
    }

    /// The settings the two runs differ in are listed (a position ablation says which side is
    /// which), turns cut off at --max-new-tokens are counted per side, and a folder holding only
    /// an interrupted run's rank files is named as such.
    #[test]
    fn settings_that_differ_and_cut_off_turns_are_shown() {
        let root = std::env::temp_dir().join(format!("eval-compare-s-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        write(&a, &[("q0", &[true, true]), ("q1", &[false, true])]);
        write(&b, &[("q0", &[true, false]), ("q1", &[false, false])]);
        let text = std::fs::read_to_string(b.join("predictions.jsonl")).unwrap();
        let cut = text.replacen(
            "\"correct\":false,\"extracted\":\"\"",
            "\"correct\":false,\"extracted\":\"\",\"finished\":false",
            1,
        );
        assert_ne!(cut, text);
        std::fs::write(b.join("predictions.jsonl"), cut).unwrap();
        let settings = |position: &str| {
            serde_json::json!({"model": {"model": "/m", "model_files": {}, "model_weights_sampled": "w"},
                "infer": {"turns": 2, "position": position, "max_new_tokens": 80, "temperature": 0.0},
                "prompt": 3, "seeds": "id"})
            .to_string()
        };
        std::fs::write(a.join("settings.json"), settings("after_answer")).unwrap();
        std::fs::write(b.join("settings.json"), settings("after_reasoning")).unwrap();
        let c = compare(&a, &b).unwrap();
        assert_eq!(
            c.settings_differ,
            ["infer.position: A \"after_answer\", B \"after_reasoning\""]
        );
        let t1 = &c.turns[1].paired;
        assert_eq!((t1.cut_off_a, t1.cut_off_b), (0, 1));
        let md = c.markdown();
        assert!(md.contains("- infer.position: A \"after_answer\""), "{md}");
        assert!(
            md.contains("| 0 / 0 | 0 / 0 |\n| 1 |") && md.contains("| 0 / 1 | 0 / 0 |"),
            "{md}"
        );
        assert!(md.contains("Answers cut off at --max-new-tokens"), "{md}");
        // the same settings: said so
        std::fs::write(b.join("settings.json"), settings("after_answer")).unwrap();
        assert!(compare(&a, &b)
            .unwrap()
            .markdown()
            .contains("The two runs' settings are the same"));
        // an older trainer's folder (no weight samples, no file hashes, the config by its bytes'
        // sha256 only) against a newer one of the same model: no difference made up
        let mut new: serde_json::Value = serde_json::from_str(&settings("after_answer")).unwrap();
        new["model"]["model_config"] = serde_json::json!({"model_type": "mllama"});
        new["model"]["model_config_sha256"] = "s".into();
        let mut old = new.clone();
        let m = old["model"].as_object_mut().unwrap();
        for key in ["model_files", "model_weights_sampled", "model_config"] {
            m.remove(key);
        }
        std::fs::write(a.join("settings.json"), new.to_string()).unwrap();
        std::fs::write(b.join("settings.json"), old.to_string()).unwrap();
        assert_eq!(
            compare(&a, &b).unwrap().settings_differ,
            Vec::<String>::new()
        );
        // other weights are named, a long correction prompt is shortened
        let mut other = new.clone();
        other["model"]["model_weights_sampled"] = "w2".into();
        other["infer"]["correction_prompt"] = "x".repeat(200).into();
        std::fs::write(b.join("settings.json"), other.to_string()).unwrap();
        let differ = compare(&a, &b).unwrap().settings_differ;
        assert_eq!(differ.len(), 2, "{differ:?}");
        assert!(
            differ[0].starts_with("infer.correction_prompt: A (unset), B \"xxx")
                && differ[0].ends_with("..."),
            "{differ:?}"
        );
        assert_eq!(differ[1], "model.model_weights_sampled (the files differ)");
        // rank files beside predictions.jsonl: compared, and said to be unfinished
        std::fs::write(a.join("predictions.rank-0.jsonl"), "").unwrap();
        let c = compare(&a, &b).unwrap();
        assert_eq!(c.unfinished, [a.display().to_string()]);
        assert!(c.markdown().contains("holds an unfinished evaluation's"));
        // an interrupted run: its rank files only
        let cut_short = root.join("interrupted");
        std::fs::create_dir_all(&cut_short).unwrap();
        std::fs::write(cut_short.join("predictions.rank-0.jsonl"), "").unwrap();
        let e = compare(&a, &cut_short).unwrap_err().to_string();
        assert!(
            e.contains("an interrupted evaluation: run its `trainer eval` command again"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A base run of one turn against a self-correcting run of three: turn 0 is paired, and the
    /// "last" row pairs the base's answer with the final one (the comparison the with/without
    /// self-correction claim needs), in the table and the JSON; a folder pair without
    /// settings.json names both.
    #[test]
    fn one_turn_against_three_pairs_the_final_answers() {
        let root = std::env::temp_dir().join(format!("eval-compare-last-{}", std::process::id()));
        let (a, b) = (root.join("base"), root.join("sco"));
        // 6 questions: base right on q0, q1; sco right at turn 0 on q0, and at its last turn on
        // q0..q4 (q5 stops after turn 1, wrong)
        write(
            &a,
            &[
                ("q0", &[true]),
                ("q1", &[true]),
                ("q2", &[false]),
                ("q3", &[false]),
                ("q4", &[false]),
                ("q5", &[false]),
            ],
        );
        write(
            &b,
            &[
                ("q0", &[true, true, true]),
                ("q1", &[false, true, true]),
                ("q2", &[false, false, true]),
                ("q3", &[false, true, true]),
                ("q4", &[false, false, true]),
                ("q5", &[false, false]),
            ],
        );
        let c = compare(&a, &b).unwrap();
        assert_eq!((c.turns_a, c.turns_b, c.turns.len()), (1, 3, 1));
        let t0 = &c.turns[0].paired;
        assert_eq!((t0.both, t0.a_only, t0.b_only), (1, 1, 0));
        let last = c.last.as_ref().unwrap();
        assert_eq!(
            (last.questions, last.both, last.a_only, last.b_only),
            (6, 2, 0, 3)
        );
        assert!((last.p_value - 0.25).abs() < 1e-12);
        let md = c.markdown();
        assert!(
            md.contains("| last | 6 | 33.3% | 83.3% | 2 | 0 | 3 | 0.250 | 0 / 0 | 0 / 0 |"),
            "{md}"
        );
        assert!(
            md.contains("each question's last turn in A (of up to 1)"),
            "{md}"
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["last"]["b_only"], 3);
        assert_eq!(json["turns"][0]["turn"], 0);
        assert_eq!(json["turns"][0]["a_only"], 1, "flattened as before");
        assert_eq!(c.settings_differ.len(), 2, "{:?}", c.settings_differ);
        // one turn each: no "last" row
        assert!(compare(&a, &a).unwrap().last.is_none());
        // turns without a readable answer, counted per side (A: 2, B: 1)
        let (x, y) = (root.join("x"), root.join("y"));
        let lines = |unreadable: &[bool]| -> String {
            (unreadable.iter().enumerate())
                .map(|(i, &u)| {
                    let turn = serde_json::json!({"text": "", "extracted": "", "correct": false, "no_answer": u});
                    serde_json::json!({"id": format!("q{i}"), "answer": "x", "turns": [turn]})
                        .to_string()
                        + "\n"
                })
                .collect()
        };
        for (dir, u) in [(&x, [true, true, false]), (&y, [false, true, false])] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("predictions.jsonl"), lines(&u)).unwrap();
        }
        let t0 = compare(&x, &y).unwrap().turns[0].paired.clone();
        assert_eq!((t0.no_answer_a, t0.no_answer_b), (2, 1));
        assert!(compare(&x, &y)
            .unwrap()
            .markdown()
            .contains("| 0 / 0 | 2 / 1 |"));
        // B rescored by this trainer's rules, A not: said, with how to rescore
        let text = std::fs::read_to_string(b.join("predictions.jsonl")).unwrap();
        let rescored: String = (text.lines())
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["scoring"] = crate::eval::answer::SCORING_RULES.into();
                v.to_string() + "\n"
            })
            .collect();
        std::fs::write(b.join("predictions.jsonl"), rescored).unwrap();
        let differ = compare(&a, &b).unwrap().settings_differ;
        let v = crate::eval::answer::SCORING_RULES;
        assert!(
            differ[0].starts_with(&format!("scoring rules: A an older trainer's (unrecorded), B v{v} (this trainer's: v{v}); run a folder's `trainer eval` command again")),
            "{differ:?}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn paired_counts_and_the_exact_test() {
        let root = std::env::temp_dir().join(format!("eval-compare-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        // 10 questions B gets right and A wrong at turn 0, none the other way: p = 2 / 1024;
        // one question only in A, one only in B
        let mut ra: Vec<(String, Vec<bool>)> = (0..10)
            .map(|i| (format!("q{i}"), vec![false, true]))
            .collect();
        let mut rb: Vec<(String, Vec<bool>)> = (0..10)
            .map(|i| (format!("q{i}"), vec![true, true]))
            .collect();
        ra.push(("right".into(), vec![true, true]));
        rb.push(("right".into(), vec![true, false]));
        ra.push(("a-only".into(), vec![true, true]));
        rb.push(("b-only".into(), vec![true]));
        fn rows(r: &[(String, Vec<bool>)]) -> Vec<(&str, &[bool])> {
            r.iter().map(|(i, t)| (i.as_str(), t.as_slice())).collect()
        }
        write(&a, &rows(&ra));
        write(&b, &rows(&rb));
        let c = compare(&a, &b).unwrap();
        assert_eq!((c.paired, c.only_a, c.only_b), (11, 1, 1));
        assert_eq!((c.turns_a, c.turns_b, c.turns.len()), (2, 2, 2));
        let t0 = &c.turns[0].paired;
        assert_eq!(
            (t0.questions, t0.both, t0.a_only, t0.b_only),
            (11, 1, 0, 10)
        );
        assert_eq!(t0.p_value, 2.0 / 1024.0);
        assert!((t0.accuracy_b - 1.0).abs() < 1e-12);
        let t1 = &c.turns[1].paired;
        assert_eq!((t1.both, t1.a_only, t1.b_only, t1.p_value), (10, 1, 0, 1.0));
        // the last turns are turn 1 here: as turn 1's row
        let last = c.last.as_ref().unwrap();
        assert_eq!((last.both, last.a_only, last.b_only), (10, 1, 0));
        assert!(c
            .markdown()
            .contains("| 0 | 11 | 9.1% | 100.0% | 1 | 0 | 10 | 0.00195 |"));
        // no shared id: an error naming both
        let other = root.join("other");
        write(&other, &[("z", &[true])]);
        let err = compare(&a, &other).unwrap_err().to_string();
        assert!(err.contains("share no question id"), "{err}");
        // the same ids with other answers: another benchmark
        let renamed = root.join("renamed");
        write(&renamed, &[("q0", &[true])]);
        let text = std::fs::read_to_string(renamed.join("predictions.jsonl")).unwrap();
        std::fs::write(
            renamed.join("predictions.jsonl"),
            text.replace("\"x\"", "\"y\""),
        )
        .unwrap();
        let err = compare(&a, &renamed).unwrap_err().to_string();
        assert!(err.contains("question \"q0\" differs"), "{err}");
        assert!(err.contains("(answer \"x\" against \"y\")"), "{err}");
        // every question reworded, the answers the same: the first id is named, and what differs
        let reworded = root.join("reworded");
        write(&reworded, &rows(&ra));
        let text = std::fs::read_to_string(reworded.join("predictions.jsonl")).unwrap();
        let asked =
            |t: &str, q: &str| t.replace("\"answer\"", &format!("\"asked\": \"{q}\", \"answer\""));
        std::fs::write(reworded.join("predictions.jsonl"), asked(&text, "new?")).unwrap();
        let original = std::fs::read_to_string(a.join("predictions.jsonl")).unwrap();
        std::fs::write(a.join("predictions.jsonl"), asked(&original, "old?")).unwrap();
        let err = compare(&a, &reworded).unwrap_err().to_string();
        assert!(
            err.contains("question \"q0\" differs") && err.contains("(the question asked)"),
            "{err}"
        );
        let err = compare(&a, &root.join("none")).unwrap_err().to_string();
        assert!(err.contains("no predictions.jsonl"), "{err}");

        let _ = std::fs::remove_dir_all(&root);
    }
}
