//! Checkpoint save/resume end to end through the real launcher and trainer (CPU backend, fp32,
//! tiny random Mllama + LoRA): a run stopped by SIGTERM (the `TRAINER_STOP_AFTER_STEP` hook)
//! after step 5 and resumed equals the uninterrupted 10-step run bitwise (losses, every metric,
//! final weights) at world 1 (synchronous saves) and 2 (background saves), across an epoch
//! boundary with dropout on; a checkpoint saved
//! at world 2 resumes at world 1 and 3 (losses within 1e-6 relative); a crash between the data
//! files and the manifest leaves a `.partial` folder that resume ignores and the next save removes.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use tch::Tensor;
use trainer::model::{KeyLayout, LoadOptions, MllamaConfig, MllamaModel};

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A temp folder with `model/` (tiny random Mllama + the fixture tokenizer) and `train.jsonl`.
fn setup() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ckpt-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model_dir = dir.join("model");
        std::fs::create_dir_all(&model_dir).unwrap();
        let fx = repo().join("tests/fixtures");
        let text = std::fs::read_to_string(fx.join("mllama_tiny/model_hf5/config.json")).unwrap();
        let mut cfg: Value = serde_json::from_str(&text).unwrap();
        cfg["text_config"]["vocab_size"] = 711.into();
        cfg["image_token_index"] = 711.into();
        cfg["vision_config"]["image_size"] = 56.into();
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        std::fs::write(model_dir.join("config.json"), &text).unwrap();
        let config = MllamaConfig::from_json_str(&text).unwrap();
        let model = MllamaModel::random(config, LoadOptions::default(), 11).unwrap();
        model
            .save_safetensors(&model_dir.join("model.safetensors"), KeyLayout::ModulePaths)
            .unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
        ] {
            std::fs::copy(fx.join("data/tok").join(f), model_dir.join(f)).unwrap();
        }
        let images = [
            "small.png",
            "large.png",
            "layout_1x2.png",
            "layout_2x1.png",
            "photo.jpg",
            "gray.png",
        ];
        let words = [
            "red", "square", "three", "objects", "blue", "circle", "answer", "count",
        ];
        let mut lines = vec![];
        for i in 0..48usize {
            let q: Vec<&str> = (0..(2 + i % 5))
                .map(|k| words[(i + k) % words.len()])
                .collect();
            let a: Vec<&str> = (0..(3 + (i * 7) % 11))
                .map(|k| words[(i * 3 + k) % words.len()])
                .collect();
            let rec = serde_json::json!({
                "id": format!("r{i}"),
                "image": images[i % images.len()],
                "conversations": [
                    {"from": "human", "value": format!("<image>\nWhat is {}?", q.join(" "))},
                    {"from": "gpt", "value": format!("<SUMMARY> {} </SUMMARY>", a.join(" "))},
                ]
            });
            lines.push(rec.to_string());
        }
        std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
        dir
    })
}

/// The result of one `trainer train` invocation.
struct Out {
    code: Option<i32>,
    stderr: String,
}

/// `trainer train` at `world` ranks (through the launcher when world > 1) with output_dir and
/// checkpoint.dir under `out` (kept between calls, so a second call resumes).
fn run(out: &Path, world: usize, train: &str, sets: &[&str], env: &[(&str, &str)]) -> Out {
    run_with(out, world, train, sets, env, &[])
}

/// `run` with extra launcher arguments.
fn run_with(
    out: &Path,
    world: usize,
    train: &str,
    sets: &[&str],
    env: &[(&str, &str)],
    launcher_args: &[&str],
) -> Out {
    let dir = setup();
    std::fs::create_dir_all(out).unwrap();
    let cfg = out.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {{path: {m}, dtype: fp32, attention: sdpa}}\n\
             peft: {{method: lora, r: 4, alpha: 16, dropout: 0.1, target_modules: [q_proj, v_proj]}}\n\
             data: {{train: {d}, image_root: {i}, num_workers: 1}}\n\
             train: {{{train}, lr: 1.0e-3, weight_decay: 0.01, grad_clip: 1.0, seed: 5, output_dir: {o}, schedule: {{kind: step, gamma: 0.5}}}}\n\
             fsdp: {{backend: cpu, mixed_precision: fp32}}\n\
             checkpoint: {{dir: {c}, keep_last: 2, resume: auto}}\n",
            m = dir.join("model").display(),
            d = dir.join("train.jsonl").display(),
            i = repo().join("tests/fixtures/data/images").display(),
            o = out.display(),
            c = out.join("ckpt").display(),
        ),
    )
    .unwrap();
    let mut cmd = if world > 1 {
        let mut c = Command::new(bin("launcher"));
        c.args(["--standalone", "--nproc-per-node", &world.to_string()]);
        c.args(launcher_args);
        c.arg("--");
        c.arg(bin("trainer"));
        c
    } else {
        Command::new(bin("trainer"))
    };
    cmd.arg("train").arg(&cfg);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("TRAINER_DUMP_TRAINABLE", out.join("weights.safetensors"))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("TRAINER_STOP_AFTER_STEP")
        .env_remove("TRAINER_CHECKPOINT_CRASH_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("run trainer");
    Out {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ok(o: Out, what: &str) -> Out {
    assert_eq!(o.code, Some(0), "{what}: trainer failed\n{}", o.stderr);
    o
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(out: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(out.join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// The `step-N` folders (complete checkpoints) and `.partial` folders in `out/ckpt`.
fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("ckpt"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn fresh(name: &str) -> PathBuf {
    let out = setup().join(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}

/// 48 samples, global batch 8 (6 steps per epoch): 10 steps cross the epoch boundary.
fn bitwise(world: usize, async_save: bool) {
    let b = (4 / world).to_string();
    let train = format!("epochs: 2, batch_size: {b}, grad_accum: 2, max_steps: 10");
    let async_set = format!("checkpoint.async={async_save}");
    let every: &[&str] = &["checkpoint.every_steps=4", &async_set];
    let straight = fresh(&format!("bitwise-w{world}-straight"));
    ok(run(&straight, world, &train, every, &[]), "straight");
    let resumed = fresh(&format!("bitwise-w{world}-resumed"));
    let first = run(
        &resumed,
        world,
        &train,
        every,
        &[("TRAINER_STOP_AFTER_STEP", "5")],
    );
    assert_ne!(first.code, Some(0), "the stopped run exits non-zero (143)");
    assert!(
        first.stderr.contains("SIGTERM: stopping after step 5"),
        "{}",
        first.stderr
    );
    assert_eq!(checkpoints(&resumed), ["step-00000004", "step-00000005"]);
    assert_eq!(metrics(&resumed).len(), 5);
    let second = ok(run(&resumed, world, &train, every, &[]), "resumed");
    assert!(
        second.stderr.contains("resumed from") && second.stderr.contains("step-00000005"),
        "{}",
        second.stderr
    );

    let (a, b) = (metrics(&straight), metrics(&resumed));
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "epoch", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(x[k], y[k], "step {}: {k} differs after resume", x["step"]);
        }
    }
    let (wa, wb) = (weights(&straight), weights(&resumed));
    assert_eq!(wa.len(), wb.len());
    for (n, t) in &wa {
        assert!(t.equal(&wb[n]), "{n} differs after resume");
    }
    // every_steps 4 + the epoch end (step 6), keep_last 2
    assert_eq!(checkpoints(&straight), ["step-00000006", "step-00000008"]);
    assert_eq!(checkpoints(&resumed), ["step-00000006", "step-00000008"]);
    println!(
        "world {world}: 10 losses and {} weights identical after resume at step 5",
        wa.len()
    );
}

#[test]
fn resume_is_bitwise_world1_sync_save() {
    bitwise(1, false);
}

#[test]
fn resume_is_bitwise_world2_async_save() {
    bitwise(2, true);
}

/// Global batch 6 at every world size (batch 6/W), dropout off (its masks depend on the split).
#[test]
fn resharded_resume_world2_to_1_and_3() {
    let sets: &[&str] = &["checkpoint.every_steps=4", "peft.dropout=0.0"];
    let train = |w: usize| {
        format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 8",
            6 / w
        )
    };
    let w2 = fresh("reshard-w2");
    ok(run(&w2, 2, &train(2), sets, &[]), "world 2");
    let reference = metrics(&w2);
    assert_eq!(reference.len(), 8);
    let ckpt = w2.join("ckpt/step-00000004");
    let resume = format!("checkpoint.resume={}", ckpt.display());
    for w in [1, 3] {
        let out = fresh(&format!("reshard-w2-to-w{w}"));
        let mut s = sets.to_vec();
        s.push(&resume);
        let o = ok(run(&out, w, &train(w), &s, &[]), "resharded");
        assert!(o.stderr.contains("saved by 2 rank(s)"), "{}", o.stderr);
        let m = metrics(&out);
        assert_eq!(m.len(), 4, "steps 5..8 only");
        let mut worst = 0.0f64;
        for (x, y) in reference[4..].iter().zip(&m) {
            assert_eq!(x["step"], y["step"]);
            assert_eq!(x["tokens"], y["tokens"], "same samples per step");
            let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            worst = worst.max((lx - ly).abs() / lx.abs());
        }
        let (wa, wb) = (weights(&w2), weights(&out));
        let mut worst_w = 0.0f64;
        for (n, t) in &wa {
            worst_w = worst_w.max((t - &wb[n]).abs().max().double_value(&[]));
        }
        println!(
            "world 2 -> {w}: max loss rel diff {worst:.2e}, max weight abs diff {worst_w:.2e}"
        );
        assert!(worst < 1e-6, "world 2 -> {w}: losses differ (rel {worst})");
        assert!(
            worst_w < 1e-5,
            "world 2 -> {w}: weights differ (abs {worst_w})"
        );
    }
}

/// Killed after the rank files of step 4 and before its manifest: resume uses step 2, ignores
/// the partial folder, and the next successful save removes it.
#[test]
fn crash_before_manifest_leaves_earlier_checkpoint_usable() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let sets: &[&str] = &["checkpoint.every_steps=2"];
    let out = fresh("crash");
    let first = run(
        &out,
        2,
        train,
        sets,
        &[("TRAINER_CHECKPOINT_CRASH_AT", "4")],
    );
    assert_ne!(first.code, Some(0));
    assert_eq!(
        checkpoints(&out),
        ["step-00000002", "step-00000004.partial"]
    );
    let partial = out.join("ckpt/step-00000004.partial");
    assert!(partial.join("rank-0-of-2.safetensors").exists());
    assert!(partial.join("rank-1-of-2.safetensors").exists());
    assert!(!partial.join("manifest.json").exists());
    let second = ok(run(&out, 2, train, sets, &[]), "after the crash");
    assert!(
        second.stderr.contains("step-00000002 (step 2"),
        "{}",
        second.stderr
    );
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

/// The launcher's restart resumes from the last complete checkpoint: a crash inside the save of
/// step 4 (attempt 0), `--max-restarts 1`, and the run ends equal to one that never crashed.
#[test]
fn launcher_restart_after_a_crash_in_save_is_bitwise() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let sets: &[&str] = &["checkpoint.every_steps=2"];
    let straight = fresh("restart-straight");
    ok(run(&straight, 2, train, sets, &[]), "straight");
    let out = fresh("restart-crashed");
    let o = ok(
        run_with(
            &out,
            2,
            train,
            sets,
            &[("TRAINER_CHECKPOINT_CRASH_AT", "4")],
            &["--max-restarts", "1"],
        ),
        "crash + restart",
    );
    assert!(o.stderr.contains("step-00000002 (step 2"), "{}", o.stderr);
    let (a, b) = (metrics(&straight), metrics(&out));
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(
                x[k], y[k],
                "step {}: {k} differs after the restart",
                x["step"]
            );
        }
    }
    let (wa, wb) = (weights(&straight), weights(&out));
    for (n, t) in &wa {
        assert!(t.equal(&wb[n]), "{n} differs after the restart");
    }
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
}
