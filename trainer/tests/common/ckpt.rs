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
    output(command(out, world, train, sets, env, &[]))
}

/// Runs `cmd` to its end: its exit code and stderr.
pub fn output(mut cmd: Command) -> Out {
    let output = cmd.output().expect("run trainer");
    Out {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The command `run` runs (the launcher's with `world` > 1, else the trainer's), with extra
/// launcher arguments, for a test that adds to it or signals it while it runs.
pub fn command(
    out: &Path,
    world: usize,
    train: &str,
    sets: &[&str],
    env: &[(&str, &str)],
    launcher_args: &[&str],
) -> Command {
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
        let mut c = super::launcher();
        c.args(["--standalone", "--nproc-per-node", &world.to_string()]);
        c.args(launcher_args);
        c.arg("--");
        c.arg(bin("trainer"));
        c
    } else {
        super::isolated(Command::new(bin("trainer")))
    };
    // (a launcher's kept error-file folders under the test's own TMPDIR, not the machine's)
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    cmd.env("TMPDIR", &tmp);
    cmd.arg("train").arg(&cfg);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("TRAINER_DUMP_TRAINABLE", out.join("weights.safetensors"))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("TRAINER_STOP_AFTER_STEP")
        .env_remove("TRAINER_STOP_DURING_VALIDATION")
        .env_remove("TRAINER_CHECKPOINT_CRASH_AT")
        .env_remove("TRAINER_CHECKPOINT_FAIL_WRITE_AT")
        .env_remove("TRAINER_CHECKPOINT_FAIL_MANIFEST_AT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
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

/// The `previous-run-*` folders a fresh run moved an earlier run's files into, in `out`.
pub fn previous_runs(out: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("previous-run-")
        })
        .collect();
    found.sort();
    found
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

/// The image token of the tiny models (`image_token_index`, past the 711-token vocabulary).
pub const IMAGE_TOKEN: i64 = 711;

/// Pixel values both Rust and Python make without a stored file: `(k % 97) / 97 - 0.5` over the
/// flat (B, M, T, 3, 56, 56) buffer, fp32 (exact in both: integer, then one rounded division).
pub fn probe_pixels(b: i64, m: i64, t: i64) -> tch::Tensor {
    let n = b * m * t * 3 * 56 * 56;
    let k = tch::Tensor::arange(n, (tch::Kind::Int64, tch::Device::Cpu)).remainder(97);
    (k.to_kind(tch::Kind::Float) / 97.0 - 0.5).view([b, m, t, 3, 56, 56])
}

/// A one-image batch for the tiny models: `ids` (image token included) and an image of
/// `tiles` of 4 tiles (aspect-ratio id `ar_id`) that every token from the image token on sees.
pub fn probe_batch(ids: &[i64], tiles: i64, ar_id: i64) -> trainer::model::Batch {
    use tch::{Kind, Tensor};
    let s = ids.len() as i64;
    let at = ids
        .iter()
        .position(|&t| t == IMAGE_TOKEN)
        .expect("an image token") as i64;
    let tile_mask = Tensor::arange(4, (Kind::Int64, tch::Device::Cpu))
        .lt(tiles)
        .to_kind(Kind::Int64); // (T,)
    let rows = Tensor::arange(s, (Kind::Int64, tch::Device::Cpu))
        .ge(at)
        .to_kind(Kind::Int64); // (S,)
    let cam = rows.view([1, s, 1, 1]) * tile_mask.view([1, 1, 1, 4]); // (B, S, M, T)
    trainer::model::Batch {
        input_ids: Tensor::from_slice(ids).view([1, s]),
        attention_mask: Some(Tensor::ones([1, s], (Kind::Int64, tch::Device::Cpu))),
        labels: None,
        images: Some(trainer::model::Images {
            pixel_values: probe_pixels(1, 1, 4),
            aspect_ratio_ids: Tensor::from_slice(&[ar_id]).view([1, 1]),
            aspect_ratio_mask: tile_mask.view([1, 1, 4]),
            cross_attention_mask: cam,
        }),
    }
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
}

/// `.venv/bin/python` when it can import `modules`, else `None` (the caller prints SKIP).
pub fn venv_python(modules: &str) -> Option<PathBuf> {
    let py = repo().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// A fresh folder `name` holding one full-finetuning step at world `world`, checkpointed
/// (`ckpt/step-00000001`).
#[allow(dead_code)]
pub fn full_finetuned_one_step(name: &str, world: usize) -> PathBuf {
    let out = fresh(name);
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    ok(
        run(
            &out,
            world,
            train,
            &["checkpoint.every_steps=1", "peft.method=none"],
            &[],
        ),
        "train",
    );
    out
}

/// Two runs of `steps` steps in `a` and `b` logged the same metrics and ended with bitwise
/// the same trainable weights (a resumed run against a straight one); returns how many weights.
#[allow(dead_code)]
pub fn assert_same_run(a: &Path, b: &Path, steps: usize) -> usize {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), steps);
    assert_eq!(mb.len(), steps);
    for (x, y) in ma.iter().zip(&mb) {
        for k in ["step", "epoch", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(x[k], y[k], "step {}: {k} differs after resume", x["step"]);
        }
    }
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    for (n, t) in &wa {
        assert!(t.equal(&wb[n]), "{n} differs after resume");
    }
    wa.len()
}

/// The `step-N` folders (and any `.partial` or set-aside ones) in `out/ckpt`, sorted; not hidden
/// files such as the run's lock file, which a crashed run leaves behind (unlocked).
pub fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("ckpt"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
