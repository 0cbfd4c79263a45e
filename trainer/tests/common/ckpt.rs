//! The checkpoint tests' harness: one tiny model + training set per test process, and `trainer
//! train` runs (through the launcher when world > 1) whose output and checkpoints stay in a folder,
//! so a second run resumes.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use tch::Tensor;

use super::{bin, repo, tiny_model_folder, write_train_records};

/// A temp folder with `model/` (tiny random Mllama + the fixture tokenizer) and `train.jsonl`.
pub fn setup() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        tiny_model_folder(&dir.join("model"), 11, |_| {});
        write_train_records(&dir);
        dir
    })
}

/// The result of one `trainer train` invocation.
pub struct Out {
    pub code: Option<i32>,
    pub stderr: String,
}

/// `trainer train` at `world` ranks (through the launcher when world > 1) with output_dir and
/// checkpoint.dir under `out` (kept between calls, so a second call resumes).
pub fn run(out: &Path, world: usize, train: &str, sets: &[&str], env: &[(&str, &str)]) -> Out {
    run_with(out, world, train, sets, env, &[])
}

/// `run` with extra launcher arguments.
pub fn run_with(
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

pub fn ok(o: Out, what: &str) -> Out {
    assert_eq!(o.code, Some(0), "{what}: trainer failed\n{}", o.stderr);
    o
}

pub fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn weights(out: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(out.join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

pub fn fresh(name: &str) -> PathBuf {
    let out = setup().join(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}
