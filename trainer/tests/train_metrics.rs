//! metrics.jsonl and the log lines: tokens/s and achieved TFLOP/s on every step; MFU null on the
//! CPU unless `train.peak_tflops` gives the peak, and then exactly tflops / peak. Without a
//! terminal, rank 0 logs one plain line per step (no progress bar).
mod common;

use common::ckpt::*;

const TRAIN: &str = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";

#[test]
fn mfu_is_null_on_cpu_and_tflops_over_peak_when_configured() {
    let plain = fresh("metrics-cpu");
    let o = ok(run(&plain, 1, TRAIN, &[], &[]), "cpu");
    let m = metrics(&plain);
    // the resolved config beside metrics.jsonl loads back to the run's config
    let resolved = plain.join("resolved_config.yaml");
    let again = trainer::config::load(&resolved, &[]).expect("resolved_config.yaml loads");
    let given = trainer::config::load(&plain.join("config.yaml"), &[]).unwrap();
    assert_eq!(again.to_yaml().unwrap(), given.to_yaml().unwrap());
    assert_eq!(m.len(), 2);
    for v in &m {
        assert!(v["tflops"].as_f64().unwrap() > 0.0, "{v}");
        let supervised = v["tokens_per_s"].as_f64().unwrap();
        assert!(supervised > 0.0, "{v}");
        // every input token (prompt and answer) per rank: at world 1 at least the answers
        assert!(
            v["input_tokens_per_s_per_rank"].as_f64().unwrap() > supervised,
            "{v}"
        );
        assert!(v["mfu"].is_null(), "no peak known on a CPU: {v}");
        // the step's model FLOPs over all ranks (world 1: tflops x seconds)
        assert_eq!(v["world_size"], 1, "{v}");
        let per_rank = v["tflops"].as_f64().unwrap() * v["step_s"].as_f64().unwrap() * 1e12;
        let flops = v["flops"].as_f64().unwrap();
        assert!((flops - per_rank).abs() <= 1e-9 * flops, "{v}");
        // the loader wait is part of the step's time; no device memory on a CPU
        let (data_s, step_s) = (v["data_s"].as_f64().unwrap(), v["step_s"].as_f64().unwrap());
        assert!(data_s >= 0.0 && data_s < step_s, "{v}");
        assert!(v["gpu_mem_bytes"].is_null(), "{v}");
        assert!(v["mem_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
        assert_eq!(v["replaced_samples"], 0, "{v}");
    }
    // plain log lines (stderr is a pipe here), one per step
    for step in ["step 1/2 loss", "step 2/2 loss"] {
        assert!(o.stderr.contains(step), "{step:?} missing:\n{}", o.stderr);
    }
    assert!(o.stderr.contains("FLOP/s/rank"), "{}", o.stderr);
    assert!(
        o.stderr.contains("tok/s/rank, ") && o.stderr.contains(" supervised tok/s in all, "),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("MFU"), "{}", o.stderr);

    let peak = fresh("metrics-peak");
    let o = ok(
        run(&peak, 1, TRAIN, &["train.peak_tflops=0.5"], &[]),
        "peak",
    );
    for v in metrics(&peak) {
        let (tflops, mfu) = (v["tflops"].as_f64().unwrap(), v["mfu"].as_f64().unwrap());
        assert!((mfu - tflops / 0.5).abs() <= 1e-12 * mfu.abs(), "{v}");
    }
    assert!(o.stderr.contains("MFU"), "{}", o.stderr);
}

/// hw_tflops counts the forward recompute of activation checkpointing (2 FLOPs per parameter and
/// token on top of the model's 4 per frozen and 6 per trained one), and equals tflops without it.
#[test]
fn hw_tflops_adds_the_recompute_only_with_activation_checkpointing() {
    let ratio = |name: &str, sets: &[&str]| -> Vec<f64> {
        let dir = fresh(name);
        ok(run(&dir, 1, TRAIN, sets, &[]), name);
        metrics(&dir)
            .iter()
            .map(|v| v["hw_tflops"].as_f64().unwrap() / v["tflops"].as_f64().unwrap())
            .collect()
    };
    // LoRA on a frozen base: (4 N + 6 n + 2 (N + n)) / (4 N + 6 n) is just under 1.5
    for r in ratio("hw-recompute", &[]) {
        assert!(r > 1.4 && r < 1.5, "recompute ratio {r}");
    }
    for r in ratio("hw-no-recompute", &["fsdp.activation_checkpointing=false"]) {
        assert!((r - 1.0).abs() < 1e-12, "no recompute: ratio {r}");
    }
}

/// Protobuf fields of `msg` as (field number, varint or fixed value, bytes of a length-delimited
/// one): enough to read TensorBoard's `Event`, `Summary` and `Summary.Value`.
fn fields(mut msg: &[u8]) -> Vec<(u64, u64, &[u8])> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = vec![];
    while !msg.is_empty() {
        let key = varint(&mut msg);
        let (field, wire) = (key >> 3, key & 7);
        let (num, bytes): (u64, &[u8]) = match wire {
            0 => (varint(&mut msg), &[]),
            1 => {
                let v = u64::from_le_bytes(msg[..8].try_into().unwrap());
                msg = &msg[8..];
                (v, &[])
            }
            2 => {
                let n = varint(&mut msg) as usize;
                let b = &msg[..n];
                msg = &msg[n..];
                (0, b)
            }
            5 => {
                let v = u32::from_le_bytes(msg[..4].try_into().unwrap()) as u64;
                msg = &msg[4..];
                (v, &[])
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, num, bytes));
    }
    out
}

/// `train.tensorboard`: rank 0 writes one event file whose scalars are metrics.jsonl's, tagged
/// `train/<key>` at each step (the bytes are checked against PyTorch's SummaryWriter in the unit
/// tests).
#[test]
fn tensorboard_scalars_mirror_metrics_jsonl() {
    let out = fresh("metrics-tensorboard");
    ok(
        run(&out, 2, TRAIN, &["train.tensorboard=true"], &[]),
        "tensorboard",
    );
    let files: Vec<_> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let mut scalars = vec![]; // (step, tag, value)
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let event = &bytes[at + 12..at + 12 + len];
        at += 16 + len;
        let ev = fields(event);
        let step = ev.iter().find(|f| f.0 == 2).map_or(0, |f| f.1);
        for (_, _, summary) in ev.iter().filter(|f| f.0 == 5) {
            for (_, _, value) in fields(summary) {
                let v = fields(value);
                let tag = std::str::from_utf8(v[0].2).unwrap().to_string();
                scalars.push((step, tag, f32::from_bits(v[1].1 as u32)));
            }
        }
    }
    assert_eq!(at, bytes.len());
    let m = metrics(&out);
    let want: usize = m
        .iter()
        .map(|l| trainer::train::tensorboard::scalars_of(l).unwrap().1.len())
        .sum();
    assert_eq!(scalars.len(), want);
    for l in &m {
        let step = l["step"].as_u64().unwrap();
        let loss = scalars
            .iter()
            .find(|s| s.0 == step && s.1 == "train/loss")
            .unwrap_or_else(|| panic!("no train/loss at step {step}: {scalars:?}"));
        assert_eq!(loss.2, l["loss"].as_f64().unwrap() as f32);
    }
}

/// The scalars of the event files in `dir` as TensorBoard shows them: the files in name order,
/// a `session_log { status: START }` at step S dropping the points read so far from S on
/// (PyTorch's purge_step); (step, value) per tag.
fn tensorboard_curves(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, Vec<(u64, f32)>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut curves = std::collections::BTreeMap::<String, Vec<(u64, f32)>>::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let ev = fields(&bytes[at + 12..at + 12 + len]);
            at += 16 + len;
            let step = ev.iter().find(|f| f.0 == 2).map_or(0, |f| f.1);
            if ev.iter().any(|f| f.0 == 7 && f.2 == [0x08, 0x01]) {
                for points in curves.values_mut() {
                    points.retain(|p| p.0 < step);
                }
            }
            for (_, _, summary) in ev.iter().filter(|f| f.0 == 5) {
                for (_, _, value) in fields(summary) {
                    let v = fields(value);
                    let tag = std::str::from_utf8(v[0].2).unwrap().to_string();
                    curves
                        .entry(tag)
                        .or_default()
                        .push((step, f32::from_bits(v[1].1 as u32)));
                }
            }
        }
    }
    curves
}

/// Each step's perplexity and, on an epoch's last step, the epoch's mean loss and perplexity
/// (llama-recipes' train_step_perplexity, train_epoch_loss, train_epoch_perplexity), the same
/// after a stop and resume mid-epoch (the epoch mean covers the steps before it); TensorBoard's
/// curves of a resumed run hold each step once, with the resumed run's values, once its purge
/// event drops a run that went on past the checkpoint; a new run into the same output folder moves
/// the event files aside with the other run files.
#[test]
fn epoch_means_perplexity_and_tensorboard_across_a_resume() {
    const EPOCHS: &str = "epochs: 2, batch_size: 8, grad_accum: 1"; // 48 samples: 6 steps per epoch
    let tb = ["train.tensorboard=true", "checkpoint.every_steps=2"];
    let straight = fresh("metrics-epochs-straight");
    ok(run(&straight, 1, EPOCHS, &tb, &[]), "straight");
    let want = metrics(&straight);
    assert_eq!(want.len(), 12);
    for (i, m) in want.iter().enumerate() {
        let loss = m["loss"].as_f64().unwrap();
        assert!(
            (m["ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp(),
            "{m}"
        );
        let step = i + 1;
        match step % 6 {
            0 => {
                let epoch: Vec<f64> = want[step - 6..step]
                    .iter()
                    .map(|m| m["loss"].as_f64().unwrap())
                    .collect();
                let mean = epoch.iter().sum::<f64>() / 6.0;
                assert!(
                    (m["epoch_loss"].as_f64().unwrap() - mean).abs() < 1e-12,
                    "{m}"
                );
                assert!(
                    (m["epoch_ppl"].as_f64().unwrap() - mean.exp()).abs() < 1e-9 * mean.exp(),
                    "{m}"
                );
            }
            _ => assert!(
                m.get("epoch_loss").is_none() && m.get("epoch_ppl").is_none(),
                "{m}"
            ),
        }
    }

    // a run that went on to step 5 (its checkpoints at 2 and 4), resumed from step 4: the points
    // of its step 5 go (written again by the resumed run), step 4's stay, each step once
    let resumed = fresh("metrics-epochs-resumed");
    let o = run(
        &resumed,
        1,
        EPOCHS,
        &tb,
        &[("TRAINER_STOP_AFTER_STEP", "5")],
    );
    assert_eq!(o.code, Some(143), "{}", o.stderr);
    let step5 = resumed.join("ckpt/step-00000005");
    std::fs::remove_dir_all(&step5).unwrap();
    ok(run(&resumed, 1, EPOCHS, &tb, &[]), "resumed");
    let got = metrics(&resumed);
    assert_eq!(got.len(), 12);
    for (g, w) in got.iter().zip(&want) {
        for key in ["step", "loss", "ppl", "epoch_loss", "epoch_ppl"] {
            match (
                g.get(key).and_then(|v| v.as_f64()),
                w.get(key).and_then(|v| v.as_f64()),
            ) {
                (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-6 * b.abs(), "{key}: {g} vs {w}"),
                (a, b) => assert_eq!(a, b, "{key}: {g} vs {w}"),
            }
        }
    }
    let curves = tensorboard_curves(&resumed.join("tensorboard"));
    for (tag, key) in [
        ("train/loss", "loss"),
        ("train/ppl", "ppl"),
        ("train/epoch_loss", "epoch_loss"),
    ] {
        let expected: Vec<(u64, f32)> = got
            .iter()
            .filter_map(|m| Some((m["step"].as_u64()?, m.get(key)?.as_f64()? as f32)))
            .collect();
        assert_eq!(curves[tag], expected, "{tag}");
    }

    // a new run into the same folder: the earlier run's event files go aside with its metrics
    ok(
        run(
            &resumed,
            1,
            EPOCHS,
            &[
                "train.tensorboard=true",
                "train.max_steps=1",
                "checkpoint.resume=never",
            ],
            &[],
        ),
        "new run",
    );
    let aside = previous_runs(&resumed);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_dir(aside[0].join("tensorboard"))
            .unwrap()
            .count(),
        2
    );
    assert_eq!(
        tensorboard_curves(&resumed.join("tensorboard"))["train/loss"].len(),
        1
    );
}

/// A resume from a checkpoint before an epoch end the run had gone past: the adapter in
/// train.output_dir is that later epoch end's, which the resume trains again, and it says so.
#[test]
fn a_resume_before_an_exported_epoch_end_names_the_adapters_step() {
    const EPOCHS: &str = "epochs: 2, batch_size: 8, grad_accum: 1"; // 6 steps per epoch
    let out = fresh("metrics-adapter-later");
    let sets = ["checkpoint.every_steps=2", "checkpoint.keep_last=0"];
    ok(run(&out, 1, EPOCHS, &sets, &[]), "run to its end");
    let step4 = out.join("ckpt/step-00000004");
    let resume = format!("checkpoint.resume={}", step4.display());
    let o = ok(
        run(&out, 1, EPOCHS, &[sets[0], sets[1], &resume], &[]),
        "resumed at 4",
    );
    assert!(
        o.stderr.contains(
            "its adapter may be the one written at step 12, one of the steps after step 4"
        ),
        "{}",
        o.stderr
    );
}

/// The resumed run's own history, whatever happened to metrics.jsonl in between: lines lost (a
/// failed write, a crash) are not taken for another run's (the file is continued, with a note);
/// a run started over into the folder that died before its first step left an empty file and
/// moved the resumed run's files aside: its lines, and its TensorBoard curves, come back.
#[test]
fn a_resume_finds_its_own_history_after_lost_lines_or_a_run_that_died_at_once() {
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 8";
    let sets = ["checkpoint.every_steps=1", "train.tensorboard=true"];
    let straight = fresh("history-lost-straight");
    ok(run(&straight, 1, train, &sets, &[]), "straight");
    let steps = |m: &[serde_json::Value]| -> Vec<u64> {
        m.iter().map(|v| v["step"].as_u64().unwrap()).collect()
    };
    // lines 4 and 5 lost
    let lost = fresh("history-lost-lines");
    let a = run(&lost, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "5")]);
    assert_eq!(a.code, Some(143), "{}", a.stderr);
    let path = lost.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let first3: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, first3).unwrap();
    let o = ok(run(&lost, 1, train, &sets, &[]), "resumed after lost lines");
    assert!(
        o.stderr.contains("metrics.jsonl has no line of step 5"),
        "{}",
        o.stderr
    );
    assert_eq!(steps(&metrics(&lost)), [1, 2, 3, 6, 7, 8]);
    assert!(previous_runs(&lost).is_empty());
    // a run started over that stopped during its start-up: an empty metrics.jsonl, the resumed
    // run's files aside
    let died = fresh("history-died-at-once");
    let a = run(&died, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "5")]);
    assert_eq!(a.code, Some(143), "{}", a.stderr);
    let never = [sets[0], sets[1], "checkpoint.resume=never"];
    let b = run(&died, 1, train, &never, &[("TRAINER_STOP_AFTER_STEP", "0")]);
    assert_eq!(b.code, Some(143), "{}", b.stderr);
    assert_eq!(previous_runs(&died).len(), 1);
    let o = ok(
        run(&died, 1, train, &sets, &[]),
        "resumed after the run that died",
    );
    assert!(
        o.stderr
            .contains("the resumed run's lines are continued from"),
        "{}",
        o.stderr
    );
    let (got, want) = (metrics(&died), metrics(&straight));
    assert_eq!(steps(&got), steps(&want));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["loss"], w["loss"], "{g} vs {w}");
    }
    let curves = tensorboard_curves(&died.join("tensorboard"));
    let expected: Vec<(u64, f32)> = got
        .iter()
        .map(|m| {
            (
                m["step"].as_u64().unwrap(),
                m["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(curves["train/loss"], expected);
}
