//! Two evaluations of the same benchmark set side by side, paired question by question (`trainer
//! compare A B`): per turn, each run's accuracy, the questions only one of them answers right, and
//! the exact McNemar p of the difference. The paired test is what says whether a trained model
//! beats its base (or one correction prompt another) on these questions; two accuracies with
//! their own intervals overlap long after the paired difference is clear.
use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::report::Prediction;
use super::stats::mcnemar_exact;
use super::EvalError;

/// One turn of the comparison, over the questions both runs answered at that turn.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnComparison {
    pub turn: usize,
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
    /// The settings the two runs differ in (settings.json: generation flags, the weights' files
    /// by fingerprint, the prompts' day), as "key: A value, B value"; what the comparison tests
    /// besides what was meant to differ.
    pub settings_differ: Vec<String>,
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
    let turns = (0..turns_a.min(turns_b))
        .map(|t| {
            // (a question whose run stopped before turn t is not paired at t)
            let both_at: Vec<(&Prediction, &Prediction)> = paired
                .iter()
                .filter(|(p, q)| p.turns.len() > t && q.turns.len() > t)
                .copied()
                .collect();
            let at: Vec<(bool, bool)> = both_at
                .iter()
                .map(|(p, q)| (p.turns[t].correct, q.turns[t].correct))
                .collect();
            let cut = |in_b: bool| {
                both_at
                    .iter()
                    .filter(|(p, q)| super::report::cut_off(&if in_b { q } else { p }.turns[t]))
                    .count()
            };
            let count = |f: fn(&(bool, bool)) -> bool| at.iter().filter(|x| f(x)).count();
            let (a_only, b_only) = (count(|x| x.0 && !x.1), count(|x| !x.0 && x.1));
            let n = at.len().max(1) as f64;
            TurnComparison {
                turn: t,
                questions: at.len(),
                accuracy_a: count(|x| x.0) as f64 / n,
                accuracy_b: count(|x| x.1) as f64 / n,
                both: count(|x| x.0 && x.1),
                a_only,
                b_only,
                p_value: mcnemar_exact(a_only as u64, b_only as u64),
                cut_off_a: cut(false),
                cut_off_b: cut(true),
            }
        })
        .collect();
    Ok(Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        paired: paired.len(),
        only_a: pa.len() - paired.len(),
        only_b: pb.len() - paired.len(),
        turns_a,
        turns_b,
        turns,
        settings_differ: settings_differ(a, b),
    })
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
        (x, _) => {
            let missing = if x.is_none() { a } else { b };
            return vec![format!(
                "{}: no readable settings.json (its settings cannot be compared)",
                missing.display()
            )];
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
fn predictions_of(dir: &Path) -> Result<HashMap<String, Prediction>, EvalError> {
    if !dir.join("predictions.jsonl").is_file() {
        let interrupted = std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("predictions.rank-"))
            })
        });
        let hint = match interrupted {
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

impl Comparison {
    /// The table `trainer compare` prints.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "A: {} ({} turns)\nB: {} ({} turns)\n{} questions paired ({} in A only, {} in B only, left out)\n",
            self.a, self.turns_a, self.b, self.turns_b, self.paired, self.only_a, self.only_b
        );
        match self.settings_differ.is_empty() {
            true => s += "The two runs' settings are the same (weights, generation, prompts).\n",
            false => {
                s += "The two runs differ in (the comparison tests all of these at once):\n";
                for d in &self.settings_differ {
                    s += &format!("- {d}\n");
                }
            }
        }
        s += "\n| turn | questions | accuracy A | accuracy B | right in both | A only | B only | p (exact McNemar) | cut off A / B |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for t in &self.turns {
            s += &format!(
                "| {} | {} | {:.1}% | {:.1}% | {} | {} | {} | {} | {} / {} |\n",
                t.turn,
                t.questions,
                100.0 * t.accuracy_a,
                100.0 * t.accuracy_b,
                t.both,
                t.a_only,
                t.b_only,
                super::report::p_text(t.p_value),
                t.cut_off_a,
                t.cut_off_b
            );
        }
        if self.turns.iter().any(|t| t.cut_off_a + t.cut_off_b > 0) {
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
        assert_eq!((c.turns[1].cut_off_a, c.turns[1].cut_off_b), (0, 1));
        let md = c.markdown();
        assert!(md.contains("- infer.position: A \"after_answer\""), "{md}");
        assert!(
            md.contains("| 0 / 0 |\n| 1 |") && md.contains("| 0 / 1 |"),
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
        let t0 = &c.turns[0];
        assert_eq!(
            (t0.questions, t0.both, t0.a_only, t0.b_only),
            (11, 1, 0, 10)
        );
        assert_eq!(t0.p_value, 2.0 / 1024.0);
        assert!((t0.accuracy_b - 1.0).abs() < 1e-12);
        let t1 = &c.turns[1];
        assert_eq!((t1.both, t1.a_only, t1.b_only, t1.p_value), (10, 1, 0, 1.0));
        assert!(c
            .markdown()
            .contains("| 0 | 11 | 9.1% | 100.0% | 1 | 0 | 10 | 0.002 |"));
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
