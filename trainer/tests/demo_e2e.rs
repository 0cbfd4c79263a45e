//! The demo at reduced size, end to end through the real binaries: `trainer demo-data`, a few
//! full-finetuning steps of configs/demo.yaml on 2 CPU ranks through the launcher (loss falls,
//! metrics.jsonl parses), `trainer export --format merged` of the final checkpoint (the folder
//! loads and holds trained weights), `trainer eval`
//! on two bench questions (when it is built), and `trainer demo-model table`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use trainer::model::{LoadOptions, MllamaModel};

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

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn demo_reduced_end_to_end() {
    let dir = std::env::temp_dir().join(format!("demo-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let demo_data = || {
        let mut cmd = Command::new(bin("trainer"));
        cmd.args([
            "demo-data",
            "--train",
            "24",
            "--val",
            "4",
            "--test",
            "4",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&data);
        cmd
    };
    let msg = run(&mut demo_data(), "demo-data");
    assert!(msg.contains("wrote"), "{msg}");
    let again = run(&mut demo_data(), "demo-data (cached)");
    assert!(again.contains("reusing"), "{again}");

    let run_dir = dir.join("run");
    let sets: Vec<String> = vec![
        format!("model.path={}", data.join("model").display()),
        format!("data.train={}", data.join("train.jsonl").display()),
        format!("data.eval={}", data.join("val.jsonl").display()),
        format!("data.image_root={}", data.join("images").display()),
        format!("train.output_dir={}", run_dir.display()),
        format!("checkpoint.dir={}", run_dir.join("checkpoints").display()),
        "train.max_steps=6".into(),
        "train.lr=4e-3".into(),
        "train.batch_size=2".into(),
        "train.log_every=1".into(),
        "train.schedule.warmup_steps=1".into(),
        "checkpoint.every_steps=6".into(),
    ];
    let mut cmd = common::launcher();
    cmd.args(["--standalone", "--nproc-per-node", "2", "--"])
        .arg(bin("trainer"))
        .arg("train")
        .arg(repo().join("configs/demo.yaml"));
    for s in &sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd, "launcher + trainer train");
    let metrics: Vec<Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = metrics
        .iter()
        .filter(|m| m.get("grad_norm").is_some())
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 6, "{metrics:?}");
    let (first, last) = (losses[0], (losses[4] + losses[5]) / 2.0);
    println!("demo loss {first:.3} -> {last:.3}: {losses:?}");
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");

    // the final checkpoint -> a full model folder (as scripts/demo.sh does)
    let ckpt = run_dir.join("checkpoints").join("step-00000006");
    assert!(ckpt.join("manifest.json").is_file(), "{}", ckpt.display());
    let msg = run(
        Command::new(bin("trainer"))
            .args(["export", "--format", "merged", "--checkpoint"])
            .arg(&ckpt)
            .arg("--out")
            .arg(run_dir.join("finetuned")),
        "trainer export",
    );
    assert!(msg.contains("replaced by trained weights"), "{msg}");
    let base = MllamaModel::load(&data.join("model"), LoadOptions::default()).unwrap();
    let tuned = MllamaModel::load(&run_dir.join("finetuned"), LoadOptions::default()).unwrap();
    // full finetuning changed the weights (and the export carries them)
    let mut changed = 0usize;
    let mut base_params = std::collections::BTreeMap::new();
    base.visit_params(&mut |n, t| {
        base_params.insert(n.to_string(), t.shallow_clone());
    });
    tuned.visit_params(&mut |n, t| {
        changed += usize::from(!t.allclose(&base_params[n], 0.0, 0.0, false));
    });
    assert!(
        changed > base_params.len() / 2,
        "{changed} of {} tensors changed",
        base_params.len()
    );

    // trainer eval on two bench questions, when it is built (the lead's issue 9)
    let eval_out = run_dir.join("eval");
    let out = Command::new(bin("trainer"))
        .args(["eval", "--model"])
        .arg(run_dir.join("finetuned"))
        .arg("--data")
        .arg(data.join("test.jsonl"))
        .arg("--image-root")
        .arg(data.join("images"))
        .args([
            "--turns",
            "2",
            "--max-new-tokens",
            "6",
            "--limit",
            "2",
            "--out",
        ])
        .arg(&eval_out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trainer eval failed: {stderr}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(r["turns"].as_array().unwrap().len(), 2);
    let table = run(
        Command::new(bin("trainer"))
            .args(["demo-model", "table", "--base"])
            .arg(&eval_out)
            .arg("--after")
            .arg(&eval_out)
            .arg("--metrics")
            .arg(run_dir.join("metrics.jsonl"))
            .arg("--bench")
            .arg(data.join("test.jsonl"))
            .arg("--chance")
            .arg(data.join("chance.json"))
            .arg("--out")
            .arg(&run_dir),
        "demo-model table",
    );
    assert!(table.contains("training loss"), "{table}");
    // the same folder twice: nothing differs, paired p 1
    assert!(table.contains("| 0 / 0 (p 1.000) |"), "{table}");
    // the per-type verdict line (chance, majority answer and the binomial test feed it)
    assert!(
        table.contains("question types answered significantly above chance and the majority"),
        "{table}"
    );
    for f in ["table.md", "loss.svg", "accuracy.svg"] {
        assert!(run_dir.join(f).is_file(), "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
