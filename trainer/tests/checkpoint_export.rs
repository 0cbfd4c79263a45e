//! `trainer export --format peft` from a world-2 checkpoint: the adapter folder holds exactly the
//! trained LoRA factors and loads onto the base model with `load_adapter`; a full-finetuning
//! checkpoint is refused. Also: `fsdp.enabled: false` resumes a world-2 FSDP checkpoint (the
//! format maps parameters by name, whatever the sharding).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::bin;
use common::ckpt::*;
use serde_json::Value;
use tch::Tensor;
use trainer::model::{LoadOptions, MllamaModel};

fn export(ckpt: &Path, out: &Path) -> Out {
    export_with(ckpt, out, &[])
}

fn export_with(ckpt: &Path, out: &Path, extra: &[&str]) -> Out {
    let o = Command::new(bin("trainer"))
        .args(["export", "--format", "peft", "--checkpoint"])
        .arg(ckpt)
        .arg("--out")
        .arg(out)
        .args(extra)
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
    // torch's {"format": "pt"} metadata, as peft's save_pretrained writes it
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt", "{header}");
    // absolute: PEFT's AutoPeftModel loads the base from it, from any working directory
    let base = cfg["base_model_name_or_path"].as_str().unwrap();
    assert!(
        Path::new(base).is_absolute() && Path::new(base).join("config.json").is_file(),
        "{base}"
    );
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    let lora = model.load_adapter(&adapter).unwrap();
    assert_eq!(lora.lora.r, 4);
    println!("exported {} LoRA tensors, loaded back", exported.len());
    // the run itself left the final step's adapter in train.output_dir (llama-recipes' save_model)
    let in_output_dir: HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(in_output_dir.len(), exported.len());
    for (n, t) in &exported {
        assert!(
            t.equal(&in_output_dir[n]),
            "{n} differs in train.output_dir"
        );
    }
    assert!(out.join("adapter_config.json").exists());
    assert!(!out.join(".adapter.partial").exists());
    // --naming hf4: the same tensors under transformers-4 module names, which load back too
    let hf4 = out.join("adapter-hf4");
    ok(
        export_with(&out.join("ckpt/step-00000002"), &hf4, &["--naming", "hf4"]),
        "export hf4",
    );
    let legacy: HashMap<String, Tensor> =
        Tensor::read_safetensors(hf4.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(legacy.len(), exported.len());
    assert!(legacy
        .keys()
        .all(|k| !k.starts_with("base_model.model.model.")));
    let q = "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert!(legacy[q].equal(
        &exported["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"]
    ));
    let mut m4 = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    m4.load_adapter(&hf4).unwrap();
    for ((n, a), (_, b)) in m4
        .trainable_parameters()
        .iter()
        .zip(model.trainable_parameters())
    {
        assert!(a.equal(&b), "{n} differs between the hf4 and hf5 exports");
    }
    // a second export into the same folder is refused, the first one left as it was
    let before = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let o = export(&out.join("ckpt/step-00000002"), &adapter);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("already holds an adapter"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read(adapter.join("adapter_model.safetensors")).unwrap(),
        before
    );
    assert!(!adapter.join(LOCK).exists(), "the lock outlived the export");
    // a checkpoint whose rank file is damaged: refused, and the new --out it made is gone again
    let damaged = out.join("damaged-step");
    common::copy_dir(&out.join("ckpt/step-00000002"), &damaged);
    let rank_file = (std::fs::read_dir(&damaged).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&rank_file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&rank_file, bytes).unwrap();
    let o = export(&damaged, &out.join("new-out"));
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(!out.join("new-out").exists(), "an empty --out left behind");
    // a model folder (transformers would take it for the adapter from then on) and a pickled
    // adapter are refused too, nothing written
    for (name, why) in [
        ("config.json", "holds a model (config.json)"),
        (
            "adapter_model.bin",
            "already holds an adapter (adapter_model.bin)",
        ),
    ] {
        let used = out.join(format!("used-{name}"));
        std::fs::create_dir_all(&used).unwrap();
        std::fs::write(used.join(name), b"{}").unwrap();
        let o = export(&out.join("ckpt/step-00000002"), &used);
        assert_eq!(o.code, Some(1), "{}", o.stderr);
        assert!(o.stderr.contains(why), "{}", o.stderr);
        assert!(!used.join("adapter_config.json").exists());
    }
    // the checkpoint folder itself or a folder inside it (retention would delete the export with
    // the checkpoint), and a file: refused, nothing written
    let step = out.join("ckpt/step-00000002");
    for (inside, why) in [
        (step.clone(), "is inside checkpoint"),
        (step.join("adapter"), "is inside checkpoint"),
        (step.join("manifest.json"), "is a file, not a folder"),
    ] {
        let listed = || {
            let mut names: Vec<_> = (std::fs::read_dir(&step).unwrap())
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let before = listed();
        let o = export(&step, &inside);
        assert_eq!(o.code, Some(1), "{}", o.stderr);
        assert!(o.stderr.contains(why), "{}", o.stderr);
        assert_eq!(listed(), before, "{}", inside.display());
    }
    // a folder another export is writing (it holds the lock) is refused
    let busy = out.join("busy");
    let held = common::hold_export_lock(&busy);
    let o = export(&out.join("ckpt/step-00000002"), &busy);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("being written by another export or eval"),
        "{}",
        o.stderr
    );
    assert!(!busy.join("adapter_model.safetensors").exists());
    // a lock file no process holds (its export was killed) is no obstacle
    drop(held);
    ok(
        export(&out.join("ckpt/step-00000002"), &busy),
        "unheld lock file",
    );
    assert_eq!(
        std::fs::read(busy.join("adapter_model.safetensors")).unwrap(),
        before
    );
    assert!(!busy.join(LOCK).exists());
    // an export killed among its renames (the weights in place, the config not, its list of
    // renames left): the next export into the folder removes what it renamed and completes
    let killed = out.join("killed");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join("adapter_model.safetensors"), b"half").unwrap();
    std::fs::write(killed.join("adapter_model.safetensors.partial"), b"torn").unwrap();
    std::fs::write(killed.join("notes.txt"), b"the user's").unwrap();
    std::fs::write(
        killed.join(".adapter-export-renaming.json"),
        r#"["adapter_model.safetensors", "adapter_config.json"]"#,
    )
    .unwrap();
    ok(
        export(&out.join("ckpt/step-00000002"), &killed),
        "after a killed export",
    );
    assert_eq!(
        std::fs::read(killed.join("adapter_model.safetensors")).unwrap(),
        before
    );
    let mut names: Vec<String> = (std::fs::read_dir(&killed).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "llava_sco_prompt.json",
            "notes.txt"
        ]
    );
}

const LOCK: &str = ".llava-sco-export.lock";

/// An hf4 export renames target modules named by their full path as it renames the keys (a
/// transformers-4 model has no module of the canonical path); bare names stay.
#[test]
fn hf4_exports_rename_full_target_paths() {
    let out = fresh("hf4-targets");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    let sets = [
        "peft.target_modules=[q_proj, model.language_model.layers.0.self_attn.v_proj]",
        "checkpoint.every_steps=1",
    ];
    ok(run(&out, 1, train, &sets, &[]), "train");
    let hf4 = out.join("adapter-hf4");
    ok(
        export_with(&out.join("ckpt/step-00000001"), &hf4, &["--naming", "hf4"]),
        "export hf4",
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf4.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "language_model.model.layers.0.self_attn.v_proj"])
    );
    let mut m4 = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    m4.load_adapter(&hf4).unwrap();
}

/// A regex target is kept as written in an export whose module paths it full-matches; otherwise
/// (an hf4 export of an expression written for this model's paths, or the other way) the export
/// lists the modules it chose, as PEFT full-matches the string against the paths it sees.
#[test]
fn hf4_exports_list_the_modules_a_regex_chose() {
    let out = fresh("hf4-regex");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    let regex = r"model\.language_model\.layers\.0\.self_attn\.(q|v)_proj";
    let set = format!("peft.target_modules='{regex}'");
    ok(
        run(
            &out,
            1,
            train,
            &[set.as_str(), "checkpoint.every_steps=1"],
            &[],
        ),
        "train",
    );
    let ckpt = out.join("ckpt/step-00000001");
    let read = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (canonical, hf4) = (out.join("adapter"), out.join("adapter-hf4"));
    ok(export(&ckpt, &canonical), "export");
    assert_eq!(read(&canonical)["target_modules"], serde_json::json!(regex));
    ok(export_with(&ckpt, &hf4, &["--naming", "hf4"]), "export hf4");
    assert_eq!(
        read(&hf4)["target_modules"],
        serde_json::json!([
            "language_model.model.layers.0.self_attn.q_proj",
            "language_model.model.layers.0.self_attn.v_proj"
        ])
    );
    for dir in [&canonical, &hf4] {
        let mut m = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
        m.load_adapter(dir).unwrap();
    }

    // written for transformers-4 paths (our matcher takes either): the hf5 export lists the
    // modules under this model's paths, which PEFT's full match would not find with the string
    let out = fresh("hf5-legacy-regex");
    let set = r"peft.target_modules='language_model\.model\.layers\.0\.self_attn\.(q|v)_proj'";
    ok(
        run(&out, 1, train, &[set, "checkpoint.every_steps=1"], &[]),
        "train",
    );
    let hf5 = out.join("adapter");
    ok(export(&out.join("ckpt/step-00000001"), &hf5), "export");
    assert_eq!(
        read(&hf5)["target_modules"],
        serde_json::json!([
            "model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.0.self_attn.v_proj"
        ])
    );
}

/// `train.save_adapter`: hf4 leaves the adapter in output_dir with transformers-4 keys; none
/// leaves none.
#[test]
fn save_adapter_picks_the_naming_or_none() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    let hf4 = fresh("save-adapter-hf4");
    ok(
        run(&hf4, 1, train, &["train.save_adapter=hf4"], &[]),
        "hf4 run",
    );
    let keys: Vec<String> = Tensor::read_safetensors(hf4.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k.starts_with("base_model.model.language_model.model.")
                || k.starts_with("base_model.model.vision_model.")),
        "{keys:?}"
    );
    let none = fresh("save-adapter-none");
    ok(
        run(&none, 1, train, &["train.save_adapter=none"], &[]),
        "none run",
    );
    assert!(!none.join("adapter_model.safetensors").exists());
    assert!(!none.join("adapter_config.json").exists());
}

#[test]
fn export_peft_refuses_a_full_finetuning_checkpoint() {
    let out = full_finetuned_one_step("export-full", 1);
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

/// Merged-only flags with --format peft, and an unknown format, are refused (not ignored).
#[test]
fn export_refuses_flags_the_format_does_not_use() {
    let run = |args: &[&str]| {
        let o = Command::new(bin("trainer"))
            .args(["export", "--checkpoint", "c", "--out", "o"])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--format", "peft", "--max-shard-size", "1GB"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--max-shard-size is for --format merged"),
        "{err}"
    );
    let (code, err) = run(&["--model", "m"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--model is for --format merged"), "{err}");
    let (code, err) = run(&["--format", "merged", "--naming", "hf4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--naming is for --format peft"), "{err}");
    let (code, err) = run(&["--format", "gguf"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("possible values: peft, merged"), "{err}");
}

/// The validation records of a run's metrics.jsonl: (epoch, step, eval_loss).
fn validations(out: &Path) -> Vec<(u64, u64, f64)> {
    metrics(out)
        .iter()
        .filter(|r| r["validation"] == true)
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("epoch"), n("step"), r["eval_loss"].as_f64().unwrap())
        })
        .collect()
}

/// The tensors of an adapter folder's adapter_model.safetensors.
fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Validation records whose answers are words the training set never has: training makes them
/// less likely, so the validation loss rises after the first steps.
fn rising_eval_set() -> PathBuf {
    let eval_file = common::ckpt::setup().join("best-adapter-eval.jsonl");
    let records: Vec<String> = (0..8)
        .map(|i| {
            let image = ["small.png", "photo.jpg"][i % 2];
            serde_json::json!({
                "id": format!("e{i}"),
                "image": image,
                "conversations": [
                    {"from": "human", "value": "What is it?"},
                    {"from": "gpt", "value": "zebra quantum xylophone jazz fjord waltz vex nymph"},
                ]
            })
            .to_string()
        })
        .collect();
    std::fs::write(&eval_file, records.join("\n") + "\n").unwrap();
    eval_file
}

/// `train.max_eval_samples` validates on the eval split's first records: the loss and token count
/// of a file holding only those, in micro-batches of `train.val_batch_size` (world 2); another
/// `val_batch_size` changes only the batching (the loss is a token mean).
#[test]
fn max_eval_samples_validates_on_the_first_records() {
    let full = common::ckpt::setup().join("train.jsonl");
    let first = common::ckpt::setup().join("first-7.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&full)
        .unwrap()
        .lines()
        .take(7)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&first, lines.concat()).unwrap();
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 1";
    let validated_with = |name: &str, eval: &Path, limit: &str, batch: &str| -> Value {
        let out = fresh(name);
        let eval = format!("data.eval={}", eval.display());
        let sets = [
            eval.as_str(),
            "train.validate=true",
            batch,
            limit,
            "peft.dropout=0.0",
        ];
        let o = ok(run(&out, 2, train, &sets, &[]), name);
        assert!(o.stderr.contains("(7 samples)"), "{}", o.stderr);
        let m = metrics(&out);
        let v: Vec<&Value> = m.iter().filter(|r| r["validation"] == true).collect();
        assert_eq!(v.len(), 1, "{m:?}");
        v[0].clone()
    };
    let validated = |name: &str, eval: &Path, limit: &str| -> Value {
        validated_with(name, eval, limit, "train.val_batch_size=3")
    };
    let limited = validated("max-eval-samples", &full, "train.max_eval_samples=7");
    let file = validated("max-eval-samples-file", &first, "train.max_eval_samples=0");
    assert_eq!(limited["eval_samples"], 7);
    for key in ["eval_samples", "eval_tokens", "eval_loss"] {
        assert_eq!(limited[key], file[key], "{key}: {limited} vs {file}");
    }
    // train.batch_size's 4 per rank instead of 3: other batches, the same loss up to rounding
    let four = validated_with(
        "max-eval-samples-b4",
        &full,
        "train.max_eval_samples=7",
        "train.val_batch_size=4",
    );
    assert_eq!(four["eval_tokens"], limited["eval_tokens"]);
    let (a, b) = (
        four["eval_loss"].as_f64().unwrap(),
        limited["eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
}

/// A resume that validates on another set (here: another `train.max_eval_samples`) does not
/// compare its losses with the best loss of the old one: the best is chosen anew, with a note;
/// on the same set the best carries over.
#[test]
fn a_resume_on_another_validation_set_chooses_the_best_anew() {
    let eval = format!(
        "data.eval={}",
        common::ckpt::setup().join("train.jsonl").display()
    );
    let train = "epochs: 2, batch_size: 8, grad_accum: 1";
    let sets = |limit: &'static str| -> Vec<String> {
        vec![
            eval.clone(),
            "train.validate=true".into(),
            "peft.dropout=0.0".into(),
            limit.into(),
        ]
    };
    let run_with = |out: &Path, limit: &'static str, env: &[(&str, &str)]| {
        let s = sets(limit);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        run(out, 1, train, &s, env)
    };
    let note = "was measured on another validation set";
    for (name, resumed_limit, noted) in [
        ("eval-set-same", "train.max_eval_samples=7", false),
        ("eval-set-other", "train.max_eval_samples=5", true),
    ] {
        let out = fresh(name);
        let first = run_with(
            &out,
            "train.max_eval_samples=7",
            &[("TRAINER_STOP_AFTER_STEP", "7")],
        );
        assert!(
            first.stderr.contains("SIGTERM: stopping after step 7"),
            "{}",
            first.stderr
        );
        let second = ok(run_with(&out, resumed_limit, &[]), name);
        assert_eq!(
            second.stderr.contains(note),
            noted,
            "{name}: {}",
            second.stderr
        );
        assert_eq!(
            second.stderr.contains(
                "a later epoch replaces the adapter in train.output_dir only with a lower one"
            ),
            !noted,
            "{name}: {}",
            second.stderr
        );
    }
}

/// `train.eval_every_steps` validates within the epoch too (steps 2 and 4 of its 6 global batches of 8, then the
/// epoch's end), each validated step's checkpoint carries its record, and the adapter in
/// output_dir is the best step's.
#[test]
fn eval_every_steps_validates_within_the_epoch() {
    let out = fresh("eval-every-steps");
    let eval = format!("data.eval={}", rising_eval_set().display());
    let sets = [
        eval.as_str(),
        "train.validate=true",
        "train.eval_every_steps=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=0",
        "peft.dropout=0.0",
        "train.lr=0.01",
    ];
    ok(
        run(
            &out,
            1,
            "epochs: 1, batch_size: 8, grad_accum: 1",
            &sets,
            &[],
        ),
        "run",
    );
    let v = validations(&out);
    assert_eq!(
        v.iter().map(|r| r.1).collect::<Vec<_>>(),
        [2, 4, 6],
        "{v:?}"
    );
    for &(_, step, loss) in &v {
        let ckpt = out.join(format!("ckpt/step-{step:08}"));
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("validation.json")).unwrap())
                .unwrap();
        assert_eq!(record["eval_loss"].as_f64(), Some(loss), "step {step}");
    }
    let best = v.iter().fold(v[0], |b, &r| if r.2 < b.2 { r } else { b });
    let exported = out.join("best-export");
    ok(
        export(&out.join(format!("ckpt/step-{:08}", best.1)), &exported),
        "export",
    );
    let (kept, want) = (adapter_tensors(&out), adapter_tensors(&exported));
    assert_eq!(kept.len(), want.len());
    for (n, t) in &want {
        assert!(
            t.equal(&kept[n]),
            "{n}: output_dir's adapter is not step {}'s",
            best.1
        );
    }
}

/// With validation, the adapter left in output_dir is the epoch with the lowest validation loss
/// (llama-recipes saves only when `eval_epoch_loss < best_val_loss`), not the last one; a run
/// stopped after the best epoch and resumed keeps comparing against it (the best is carried in
/// the manifest and the checkpoint's validation.json).
#[test]
fn validation_keeps_the_best_epochs_adapter_across_a_resume() {
    let whole = fresh("best-adapter-whole");
    std::fs::create_dir_all(&whole).unwrap();
    let eval = format!("data.eval={}", rising_eval_set().display());
    let sets = [
        eval.as_str(),
        "train.validate=true",
        "checkpoint.keep_last=0",
        "peft.dropout=0.0",
        "train.lr=0.01",
    ];
    let train = "epochs: 4, batch_size: 8, grad_accum: 1";
    // the adapter in output_dir is the export of the best epoch's checkpoint, bit for bit
    let check = |out: &Path| -> (u64, u64) {
        let v = validations(out);
        assert_eq!(v.len(), 4, "{v:?}");
        let best = v.iter().fold(v[0], |b, &r| if r.2 < b.2 { r } else { b });
        assert!(best.0 < 3, "the last epoch is the best here: {v:?}");
        let ckpt = out.join(format!("ckpt/step-{:08}", best.1));
        let exported = out.join("best-export");
        ok(export(&ckpt, &exported), "export");
        let (kept, want) = (adapter_tensors(out), adapter_tensors(&exported));
        assert_eq!(kept.len(), want.len());
        for (n, t) in &want {
            assert!(
                t.equal(&kept[n]),
                "{n}: output_dir's adapter is not epoch {}'s",
                best.0
            );
        }
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("validation.json")).unwrap())
                .unwrap();
        assert_eq!(record["eval_loss"].as_f64(), Some(best.2));
        (best.0, best.1)
    };
    let o = ok(run(&whole, 1, train, &sets, &[]), "uninterrupted run");
    assert!(
        o.stderr.contains("best validation loss so far"),
        "{}",
        o.stderr
    );
    let (best_epoch, best_step) = check(&whole);
    // stopped inside the epoch after the best one, then resumed: without the carried best, the
    // next validated epoch would replace the adapter
    let resumed = fresh("best-adapter-resumed");
    let stop = (best_step + 3).to_string();
    let first = run(
        &resumed,
        1,
        train,
        &sets,
        &[("TRAINER_STOP_AFTER_STEP", &stop)],
    );
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    let second = ok(run(&resumed, 1, train, &sets, &[]), "resumed run");
    assert!(
        second.stderr.contains("best validation loss so far"),
        "{}",
        second.stderr
    );
    assert_eq!(check(&resumed), (best_epoch, best_step));
    // resumed from the best epoch's own checkpoint (into another folder): its manifest predates
    // that epoch's validation, which only its validation.json holds; with it, no later epoch is
    // better, so no adapter is written there
    let from_best = fresh("best-adapter-from-best");
    let folder = whole.join(format!("ckpt/step-{best_step:08}"));
    let resume = format!("checkpoint.resume={}", folder.display());
    let mut sets_from = sets.to_vec();
    sets_from.push(&resume);
    let o = ok(
        run(&from_best, 1, train, &sets_from, &[]),
        "run from the best",
    );
    let carried = format!("(epoch {best_epoch}, step {best_step})");
    assert!(o.stderr.contains(&carried), "{carried}: {}", o.stderr);
    assert!(
        !from_best.join("adapter_model.safetensors").exists(),
        "{}",
        o.stderr
    );
}

/// Without validation, a run stopped by SIGTERM at an epoch's last step (not the run's) saved the
/// epoch's checkpoint but ended before the epoch's end, where its adapter goes into
/// train.output_dir: the resumed run writes it first, as the uninterrupted run did then.
#[test]
fn a_stop_at_an_epochs_last_step_leaves_its_adapter_when_resumed() {
    let out = fresh("adapter-after-epoch-stop");
    let sets = ["peft.dropout=0.0"];
    let train = "epochs: 2, batch_size: 8, grad_accum: 1";
    let first = run(&out, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "6")]);
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    assert!(
        first.stderr.contains("stopping after step 6"),
        "{}",
        first.stderr
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    let second = run(&out, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "7")]);
    assert_ne!(second.code, Some(0), "{}", second.stderr);
    assert!(
        second.stderr.contains("PEFT adapter of step 6 written"),
        "{}",
        second.stderr
    );
    assert!(out.join("adapter_model.safetensors").exists());
}

/// With validation, a run stopped by SIGTERM at its very last step (before that epoch's
/// validation) is validated when launched again, "nothing left to train", and leaves its adapter
/// then; a third launch validates nothing again.
#[test]
fn a_run_stopped_at_its_last_step_is_validated_when_launched_again() {
    let out = fresh("validate-after-last-step");
    let eval = format!(
        "data.eval={}",
        common::ckpt::setup().join("train.jsonl").display()
    );
    let sets = [eval.as_str(), "train.validate=true", "peft.dropout=0.0"];
    let train = "epochs: 1, batch_size: 8, grad_accum: 1";
    let first = run(&out, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "6")]);
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    assert!(
        first.stderr.contains("SIGTERM: stopping after step 6"),
        "{}",
        first.stderr
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    let second = ok(run(&out, 1, train, &sets, &[]), "launched again");
    assert!(
        second.stderr.contains("nothing left to train"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("validating it now"),
        "{}",
        second.stderr
    );
    assert!(
        out.join("adapter_model.safetensors").exists(),
        "{}",
        second.stderr
    );
    assert!(out.join("ckpt/step-00000006/validation.json").exists());
    let third = ok(run(&out, 1, train, &sets, &[]), "launched a third time");
    assert!(
        !third.stderr.contains("validating it now"),
        "{}",
        third.stderr
    );
    // a validation that wrote its metrics line but died before validation.json is validated
    // again, and its line is in metrics.jsonl once
    std::fs::remove_file(out.join("ckpt/step-00000006/validation.json")).unwrap();
    let fourth = ok(run(&out, 1, train, &sets, &[]), "launched a fourth time");
    assert!(
        fourth.stderr.contains("validating it now"),
        "{}",
        fourth.stderr
    );
    let steps: Vec<u64> = validations(&out).iter().map(|v| v.1).collect();
    assert_eq!(steps, [6]);
}

/// SIGTERM while an epoch is validated: the run stops after the eval micro-batch it came in
/// (exit 143), with the epoch's checkpoint and no validation record, instead of finishing a long
/// validation past a scheduler's grace period (or training and saving one more step); the resumed
/// run validates that epoch, once, and does not lose it.
#[test]
fn a_sigterm_during_validation_stops_it() {
    let eval = format!(
        "data.eval={}",
        common::ckpt::setup().join("train.jsonl").display()
    );
    let sets = [eval.as_str(), "train.validate=true", "peft.dropout=0.0"];
    let train = "epochs: 2, batch_size: 8, grad_accum: 1";
    let out = fresh("sigterm-during-validation");
    let first = run(
        &out,
        1,
        train,
        &sets,
        &[("TRAINER_STOP_DURING_VALIDATION", "6")],
    );
    assert_eq!(first.code, Some(143), "{}", first.stderr);
    assert!(
        first
            .stderr
            .contains("SIGTERM: validation of step 6 stopped unfinished (1 eval micro-batch(es) done); stopping after step 6"),
        "{}",
        first.stderr
    );
    assert!(out.join("ckpt/step-00000006").exists());
    assert!(!out.join("ckpt/step-00000006/validation.json").exists());
    assert!(
        !out.join("ckpt/step-00000007").exists(),
        "no step after the validation"
    );
    let steps = |out: &Path| -> Vec<u64> { validations(out).iter().map(|v| v.1).collect() };
    assert!(
        steps(&out).is_empty(),
        "an unfinished validation writes no line"
    );
    let second = ok(run(&out, 1, train, &sets, &[]), "resumed");
    assert!(
        second
            .stderr
            .contains("checkpoint of step 6 (epoch 0) has no validation record"),
        "{}",
        second.stderr
    );
    assert_eq!(steps(&out), [6, 12]);
}

/// A checkpoint saved by SIGTERM at an epoch's last step resumes as the epoch-end checkpoint it
/// is: validated first when it has no validation record, and not validated again when it has
/// one (the loop used to enter that epoch for no step and validate it once more).
#[test]
fn a_sigterm_checkpoint_at_an_epochs_last_step_is_validated_once() {
    let eval = format!(
        "data.eval={}",
        common::ckpt::setup().join("train.jsonl").display()
    );
    let sets = [eval.as_str(), "train.validate=true", "peft.dropout=0.0"];
    let train = "epochs: 2, batch_size: 8, grad_accum: 1";
    let validated = |out: &Path| -> Vec<u64> { validations(out).iter().map(|v| v.1).collect() };
    // no record: validated before epoch 1 trains
    let out = fresh("sigterm-epoch-end-unvalidated");
    let first = run(&out, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "6")]);
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    let o = ok(run(&out, 1, train, &sets, &[]), "resumed");
    assert!(
        o.stderr
            .contains("checkpoint of step 6 (epoch 0) has no validation record"),
        "{}",
        o.stderr
    );
    assert_eq!(validated(&out), [6, 12]);
    // a record: not validated again
    let out = fresh("sigterm-epoch-end-validated");
    let first = run(&out, 1, train, &sets, &[("TRAINER_STOP_AFTER_STEP", "6")]);
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    std::fs::write(
        out.join("ckpt/step-00000006/validation.json"),
        r#"{"step": 6, "epoch": 0, "eval_loss": 6.0}"#,
    )
    .unwrap();
    let o = ok(run(&out, 1, train, &sets, &[]), "resumed");
    assert!(
        !o.stderr.contains("has no validation record"),
        "{}",
        o.stderr
    );
    assert_eq!(validated(&out), [12]);
}
