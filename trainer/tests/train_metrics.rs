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
