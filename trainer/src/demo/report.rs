//! The demo's final table: accuracy per turn before/after training, transitions between turns,
//! per question type against chance and the majority answer, the loss curve, wall time; plus two
//! small SVG plots (loss curve, accuracy per turn). Reads `trainer eval`'s report.json loosely
//! (serde_json::Value) so a missing part prints as "-" instead of failing the demo.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn turn_acc(r: &Value) -> Vec<f64> {
    r["turns"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["accuracy"].as_f64().unwrap_or(f64::NAN))
                .collect()
        })
        .unwrap_or_default()
}

fn pct(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{:5.1}%", 100.0 * v),
        _ => "    -".to_string(),
    }
}

/// Majority-answer accuracy per category on the bench (what a model that ignores the image and
/// learned the answer priors would get).
fn majority(bench: &Path, limit: Option<usize>) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for l in std::fs::read_to_string(bench)
        .unwrap_or_default()
        .lines()
        .take(limit.unwrap_or(usize::MAX))
    {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let c = v["category"].as_str().unwrap_or("all").to_string();
        // (a numeric answer is its JSON text, not one empty class for every number)
        let a = match &v["answer"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        *counts.entry(c).or_default().entry(a).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(c, m)| {
            let total: usize = m.values().sum();
            let best = m.values().copied().max().unwrap_or(0);
            (c, best as f64 / total.max(1) as f64)
        })
        .collect()
}

/// (the table's "clearly above" test: how likely a guesser right with probability `p` scores at
/// least `k` of `n`)
pub use crate::eval::stats::binomial_tail;

/// Inputs of [`table`].
pub struct TableInputs<'a> {
    pub base: &'a Path,
    pub after: &'a Path,
    pub metrics: &'a Path,
    pub bench: &'a Path,
    pub chance: &'a Path,
    pub wall_seconds: Option<f64>,
    /// Only the first K bench questions were scored (`trainer eval --limit`).
    pub limit: Option<usize>,
    /// Where to write loss.svg and accuracy.svg (and table.md).
    pub out: &'a Path,
}

/// Renders the final table (also written to `out/table.md`) and the plots.
pub fn table(i: &TableInputs) -> Result<String> {
    let base = read_json(&i.base.join("report.json"));
    let after = read_json(&i.after.join("report.json"));
    let chance: BTreeMap<String, f64> = read_json(i.chance)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let prior = majority(i.bench, i.limit);
    let losses: Vec<(f64, f64)> = std::fs::read_to_string(i.metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v.get("step").is_some() && v.get("loss").is_some() && v.get("grad_norm").is_some()
        })
        .filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?)))
        .collect();
    let mut s = String::new();
    let _ = writeln!(s, "## LLaVA-SCo CPU demo: results\n");
    if let (Some(f), Some(l)) = (losses.first(), losses.last()) {
        let _ = writeln!(
            s,
            "training loss: {:.3} (step {}) -> {:.3} (step {})\n",
            f.1, f.0, l.1, l.0
        );
    }
    if let Some(p) = after
        .as_ref()
        .or(base.as_ref())
        .and_then(|r| r["parameters"].as_u64())
    {
        let _ = writeln!(s, "model: tiny Mllama, {p} parameters\n");
    }
    let (ba, aa) = (
        base.as_ref().map(turn_acc).unwrap_or_default(),
        after.as_ref().map(turn_acc).unwrap_or_default(),
    );
    let n = ba.len().max(aa.len());
    // the same questions before and after: paired (exact McNemar), as `trainer compare` prints
    let paired = match crate::eval::compare::compare(i.base, i.after) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = writeln!(s, "(no paired comparison: {e})\n");
            None
        }
    };
    let _ = writeln!(
        s,
        "| turn | before (base) | after (trained) | right after only / before only (paired p) |\n|---|---|---|---|"
    );
    for t in 0..n {
        let cmp = paired
            .as_ref()
            .and_then(|c| c.turns.get(t))
            .map(|c| &c.paired)
            .map_or("-".to_string(), |c| {
                format!(
                    "{} / {} (p {})",
                    c.b_only,
                    c.a_only,
                    crate::eval::report::p_text(c.p_value)
                )
            });
        let _ = writeln!(
            s,
            "| {t} | {} | {} | {cmp} |",
            pct(ba.get(t).copied()),
            pct(aa.get(t).copied())
        );
    }
    let _ = writeln!(s);
    for (name, r) in [("before", &base), ("after", &after)] {
        let Some(r) = r else {
            let _ = writeln!(s, "{name}: no report.json\n");
            continue;
        };
        for tr in r["transitions"].as_array().into_iter().flatten() {
            let g = |k: &str| tr[k].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "{name}: turn {} -> {}: right->wrong {}, wrong->right {}, right->right {}, wrong->wrong {}",
                g("from"),
                g("to"),
                g("right_wrong"),
                g("wrong_right"),
                g("right_right"),
                g("wrong_wrong")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nper question type (the last column: one-sided binomial test of after t0 against the larger of chance and majority):"
    );
    let _ = writeln!(
        s,
        "\n| question type | questions | chance | majority answer | before t0 | after t0 | after t1 | after t0 beats chance and majority |\n|---|---|---|---|---|---|---|---|"
    );
    let cat_acc = |r: &Option<Value>, c: &str, t: usize| -> Option<f64> {
        r.as_ref()?["by_category"][c]["turns"][t]["accuracy"].as_f64()
    };
    let cat_n = |r: &Option<Value>, c: &str| -> Option<u64> {
        r.as_ref()?["by_category"][c]["turns"][0]["total"].as_u64()
    };
    // the types whose turn-0 accuracy passes the test: the ones the model answers from the image
    let mut reads: Vec<&str> = vec![];
    for (c, ch) in &chance {
        let a0 = cat_acc(&after, c, 0);
        let bar = ch.max(prior.get(c).copied().unwrap_or(0.0));
        let beats = match (a0, cat_n(&after, c)) {
            (Some(a), Some(n)) if n > 0 => {
                let k = (a * n as f64).round() as u64;
                let p = binomial_tail(n, k, bar);
                let verdict = if a > bar && p < 0.05 { "yes" } else { "no" };
                if verdict == "yes" {
                    reads.push(c);
                }
                // tiny p-values in scientific notation ("0.000" would read as exactly zero)
                if p < 1e-3 {
                    format!("{verdict} (p = {p:.1e})")
                } else {
                    format!("{verdict} (p = {p:.3})")
                }
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            s,
            "| {c} | {} | {} | {} | {} | {} | {} | {beats} |",
            cat_n(&after, c).map_or("-".to_string(), |n| n.to_string()),
            pct(Some(*ch)),
            pct(prior.get(c).copied()),
            pct(cat_acc(&base, c, 0)),
            pct(a0),
            pct(cat_acc(&after, c, 1)),
        );
    }
    if after.is_some() {
        let list = if reads.is_empty() {
            "none (every type is within what the answer priors explain)".to_string()
        } else {
            reads.join(", ")
        };
        let _ = writeln!(
            s,
            "
question types answered significantly above chance and the majority answer (p < 0.05): {list}"
        );
    }
    if let (Some(b0), Some(a0)) = (ba.first(), aa.first()) {
        let _ = writeln!(
            s,
            "\nturn 0 after training: {} (base {}).",
            pct(Some(*a0)),
            pct(Some(*b0))
        );
    }
    if let (Some(a0), Some(a1)) = (aa.first(), aa.get(1)) {
        // paired on the same questions: the discordant turn 0 -> 1 counts, exact McNemar test
        let t01 = after
            .as_ref()
            .and_then(|r| r["transitions"].get(0).cloned())
            .unwrap_or_default();
        let count = |k: &str| t01[k].as_u64().unwrap_or(0);
        let c = crate::eval::report::Correction::new(
            0,
            1,
            count("wrong_right") as usize,
            count("right_wrong") as usize,
        );
        let _ = writeln!(
            s,
            "after training, turn 1 (self-correction) {} turn 0: {} vs {} ({} wrong->right, {} right->wrong; exact McNemar p = {:.3}).",
            c.verdict(),
            pct(Some(*a1)),
            pct(Some(*a0)),
            c.wrong_right,
            c.right_wrong,
            c.p_value
        );
    }
    if let Some(w) = i.wall_seconds {
        let _ = writeln!(s, "wall time: {w:.0} s");
    }
    std::fs::create_dir_all(i.out).with_context(|| format!("creating {}", i.out.display()))?;
    std::fs::write(i.out.join("table.md"), &s)?;
    std::fs::write(
        i.out.join("loss.svg"),
        svg_lines("training loss", "step", &[("loss", losses)]),
    )?;
    let pts = |v: &[f64]| {
        v.iter()
            .enumerate()
            .map(|(t, a)| (t as f64, *a))
            .collect::<Vec<_>>()
    };
    std::fs::write(
        i.out.join("accuracy.svg"),
        svg_lines(
            "accuracy per turn",
            "turn",
            &[("before", pts(&ba)), ("after", pts(&aa))],
        ),
    )?;
    Ok(s)
}

/// A minimal line plot as SVG (no plotting dependency).
fn svg_lines(title: &str, xlabel: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let (w, h, m) = (480.0, 300.0, 40.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let (y0, y1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (y0.min(0.0), y1.max(y0 + 1e-9))
    };
    let (x0, x1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x0, x1.max(x0 + 1.0))
    };
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{m}\" y=\"20\" font-family=\"sans-serif\" font-size=\"14\">{title}</text>\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\
         <text x=\"{r}\" y=\"{lb}\" font-size=\"11\" text-anchor=\"end\">{xlabel} {x0}..{x1}</text>\
         <text x=\"4\" y=\"{m}\" font-size=\"11\">{y1:.2}</text><text x=\"4\" y=\"{b}\" font-size=\"11\">{y0:.2}</text>",
        b = h - m,
        r = w - m,
        lb = h - 10.0
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = colors[k % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{c}\" font-size=\"12\">{name}</text>",
            path.join(" "),
            w - m - 60.0,
            m + 14.0 * (k as f64 + 1.0)
        );
    }
    s.push_str("</svg>\n");
    s
}
