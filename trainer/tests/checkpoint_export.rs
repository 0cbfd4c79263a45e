//! `trainer export --format peft` from a world-2 checkpoint: the adapter folder holds exactly the
//! trained LoRA factors and loads onto the base model with `load_adapter`; a full-finetuning
//! checkpoint is refused. Also: `fsdp.enabled: false` resumes a world-2 FSDP checkpoint (the
//! format maps parameters by name, whatever the sharding).
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
        let dir = std::env::temp_dir().join(format!("ckpt-export-{}", std::process::id()));
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

fn weights(out: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(out.join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn fresh(name: &str) -> PathBuf {
    let out = setup().join(name);
    let _ = std::fs::remove_dir_all(&out);
    out
}

fn export(ckpt: &Path, out: &Path) -> Out {
    let o = Command::new(bin("trainer"))
        .args(["export", "--format", "peft", "--checkpoint"])
        .arg(ckpt)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    Out {
        code: o.status.code(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn export_peft_holds_the_trained_factors_and_loads() {
    let out = fresh("export-lora");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    ok(
        run(&out, 2, train, &["checkpoint.every_steps=2"], &[]),
        "train",
    );
    let adapter = out.join("adapter");
    ok(export(&out.join("ckpt/step-00000002"), &adapter), "export");
    let trained = weights(&out);
    let exported: HashMap<String, Tensor> =
        Tensor::read_safetensors(adapter.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(trained.len(), exported.len());
    for (n, t) in &trained {
        assert!(t.equal(&exported[n]), "{n} differs in the export");
    }
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["peft_type"], "LORA");
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    let lora = model.load_adapter(&adapter).unwrap();
    assert_eq!(lora.r, 4);
    println!("exported {} LoRA tensors, loaded back", exported.len());
}

#[test]
fn export_peft_refuses_a_full_finetuning_checkpoint() {
    let out = fresh("export-full");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    ok(
        run(
            &out,
            1,
            train,
            &["checkpoint.every_steps=1", "peft.method=none"],
            &[],
        ),
        "train",
    );
    let o = export(&out.join("ckpt/step-00000001"), &out.join("adapter"));
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("not trained with LoRA"), "{}", o.stderr);
}

#[test]
fn plain_trainer_resumes_a_sharded_checkpoint() {
    let sets: &[&str] = &["checkpoint.every_steps=2", "peft.dropout=0.0"];
    let w2 = fresh("plain-from-w2");
    let train2 = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 4";
    ok(run(&w2, 2, train2, sets, &[]), "world 2");
    let plain = fresh("plain-resumed");
    let resume = format!(
        "checkpoint.resume={}",
        w2.join("ckpt/step-00000002").display()
    );
    let mut s = sets.to_vec();
    s.push("fsdp.enabled=false");
    s.push(&resume);
    let train1 = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 4";
    ok(run(&plain, 1, train1, &s, &[]), "plain");
    let (a, b) = (metrics(&w2), metrics(&plain));
    assert_eq!(b.len(), 2);
    for (x, y) in a[2..].iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() / lx < 1e-5,
            "step {}: {lx} vs {ly}",
            x["step"]
        );
    }
}
