//! Checkpoint integrity through the real trainer binary: a flipped byte, a truncated file, a
//! deleted file, a manifest of another format version, and a changed `peft.r` each stop the
//! resume with an error naming the file (or the differing key) and the fix
//! (`--set checkpoint.resume=never`); that fix then trains from scratch. At world 2 a file only
//! one rank reads fails both ranks (no rank waits forever).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
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
        let dir = std::env::temp_dir().join(format!("ckpt-errors-{}", std::process::id()));
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
        c.args(["--standalone", "--nproc-per-node", &world.to_string(), "--"]);
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

fn fresh(name: &str) -> PathBuf {
    let out = setup().join(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}

/// A world-`world` checkpoint of step 2 (made once per world size).
fn base(world: usize) -> PathBuf {
    static W1: OnceLock<PathBuf> = OnceLock::new();
    static W2: OnceLock<PathBuf> = OnceLock::new();
    let cell = if world == 1 { &W1 } else { &W2 };
    cell.get_or_init(|| {
        let out = fresh(&format!("base-w{world}"));
        let train = format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 2",
            4 / world
        );
        ok(
            run(&out, world, &train, &["checkpoint.every_steps=2"], &[]),
            "base",
        );
        out.join("ckpt/step-00000002")
    })
    .clone()
}

/// A copy of the base checkpoint in a fresh run folder, damaged by `damage`; resumes it.
fn resume_damaged(name: &str, world: usize, sets: &[&str], damage: impl FnOnce(&Path)) -> Out {
    let src = base(world);
    let out = fresh(name);
    let dst = out.join("ckpt/step-00000002");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    damage(&dst);
    let train = format!(
        "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 3",
        4 / world
    );
    run(&out, world, &train, sets, &[])
}

fn assert_error(o: &Out, wants: &[&str]) {
    assert_eq!(o.code, Some(1), "expected a failure\n{}", o.stderr);
    for w in wants {
        assert!(o.stderr.contains(w), "missing {w:?} in\n{}", o.stderr);
    }
    assert!(
        o.stderr.contains("--set checkpoint.resume=never"),
        "the fix is named\n{}",
        o.stderr
    );
}

#[test]
fn intact_copy_resumes() {
    let o = ok(resume_damaged("intact", 1, &[], |_| {}), "intact");
    assert!(o.stderr.contains("resumed from"), "{}", o.stderr);
    assert_eq!(
        metrics(&setup().join("intact")).len(),
        1,
        "only step 3 trained"
    );
}

#[test]
fn flipped_byte_is_corrupt() {
    let o = resume_damaged("flip", 1, &[], |d| {
        let p = d.join("rank-0-of-1.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.len() - 3;
        b[i] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is corrupt", "sha256"]);
    // the fix works
    let fixed = ok(
        resume_damaged("flip-fixed", 1, &["checkpoint.resume=never"], |_| {}),
        "resume=never",
    );
    assert!(!fixed.stderr.contains("resumed from"));
    assert_eq!(metrics(&setup().join("flip-fixed")).len(), 3);
}

#[test]
fn truncated_file_is_named() {
    let o = resume_damaged("truncate", 1, &[], |d| {
        let p = d.join("rank-0-of-1.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is truncated"]);
}

#[test]
fn deleted_file_is_named() {
    let o = resume_damaged("delete", 1, &[], |d| {
        std::fs::remove_file(d.join("rank-0-of-1.safetensors")).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is missing"]);
}

#[test]
fn other_manifest_version_is_refused() {
    let o = resume_damaged("version", 1, &[], |d| {
        let p = d.join("manifest.json");
        let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        m["version"] = 99.into();
        std::fs::write(&p, m.to_string()).unwrap();
    });
    assert_error(
        &o,
        &["manifest.json has format version 99", "reads version 1"],
    );
}

#[test]
fn changed_lora_rank_names_the_key() {
    let o = resume_damaged("peft-r", 1, &["peft.r=8"], |_| {});
    assert_error(
        &o,
        &[
            "different model/LoRA config",
            "peft.r: checkpoint 4, config 8",
        ],
    );
}

#[test]
fn damage_seen_by_one_rank_fails_both() {
    let o = resume_damaged("flip-w2", 2, &[], |d| {
        let p = d.join("rank-1-of-2.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.len() - 3;
        b[i] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    });
    assert_ne!(o.code, Some(0));
    assert!(
        o.stderr.contains("rank-1-of-2.safetensors is corrupt"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("failed on another rank"), "{}", o.stderr);
}
