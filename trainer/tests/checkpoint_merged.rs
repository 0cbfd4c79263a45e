//! `trainer export --format merged`: after a short LoRA training (world 2), the merged folder
//! loaded as a plain model gives the logits of base + exported PEFT adapter; untouched tensors
//! are the base's bytes; a tiny `--max-shard-size` gives HF-named shards with a valid index that
//! our loader and (when `.venv` has it) transformers load; a full-finetuning checkpoint exports its
//! trained weights; a wrong base model or a non-empty --out is refused with a clear error.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::ckpt::*;
use common::{bin, copy_dir};
use safetensors::SafeTensors;
use tch::Tensor;
use trainer::infer::CheckpointWeights;
use trainer::model::{LoadOptions, MllamaModel};

fn export(ckpt: &Path, out: &Path, format: &str, extra: &[&str]) -> Out {
    let o = Command::new(bin("trainer"))
        .args(["export", "--format", format, "--checkpoint"])
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

/// A LoRA checkpoint after 2 steps at world 2 (shared by the tests of this file).
fn lora_checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = fresh("merged-lora");
        let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
        ok(
            run(&out, 2, train, &["checkpoint.every_steps=2"], &[]),
            "train",
        );
        out.join("ckpt/step-00000002")
    })
}

fn tensors(file: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .into_iter()
        .collect()
}

fn logits(model: &MllamaModel) -> Tensor {
    let ids = [455, IMAGE_TOKEN, 12, 40, 77, 3, 250, 600, 9, 31];
    tch::no_grad(|| model.forward(&probe_batch(&ids, 2, 2))).unwrap()
}

#[test]
fn merged_lora_export_gives_the_adapters_logits() {
    let ckpt = lora_checkpoint();
    let root = ckpt.parent().unwrap().parent().unwrap();
    let (adapter, merged) = (root.join("adapter"), root.join("merged"));
    ok(export(ckpt, &adapter, "peft", &[]), "export peft");
    ok(export(ckpt, &merged, "merged", &[]), "export merged");
    let base_dir = setup().join("model");

    // one file (the tiny model fits in 5GB), config and tokenizer files copied
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        assert!(merged.join(f).exists(), "{f} missing in the export");
    }
    assert!(!merged.join("model.safetensors.index.json").exists());

    // q_proj / v_proj weights changed, everything else byte-identical to the base
    let base = tensors(&base_dir.join("model.safetensors"));
    let out = tensors(&merged.join("model.safetensors"));
    assert_eq!(
        base.keys().collect::<BTreeSet<_>>(),
        out.keys().collect::<BTreeSet<_>>()
    );
    let mut changed = 0;
    for (n, t) in &base {
        let lora = n.ends_with("q_proj.weight") || n.ends_with("v_proj.weight");
        assert_eq!(t.kind(), out[n].kind(), "{n}: dtype changed");
        if lora {
            assert!(!t.equal(&out[n]), "{n}: LoRA update not merged");
            changed += 1;
        } else {
            assert!(t.equal(&out[n]), "{n}: changed but not a LoRA target");
        }
    }
    assert!(changed > 0);

    let mut with_adapter = MllamaModel::load(&base_dir, LoadOptions::default()).unwrap();
    with_adapter.load_adapter(&adapter).unwrap();
    let want = logits(&with_adapter);
    let got = logits(&MllamaModel::load(&merged, LoadOptions::default()).unwrap());
    let err = rel_err(&got, &want);
    let plain = logits(&MllamaModel::load(&base_dir, LoadOptions::default()).unwrap());
    let effect = rel_err(&plain, &want);
    println!("merged vs base + adapter: rel {err:.2e} (base alone: {effect:.2e}); {changed} weights merged");
    assert!(
        err < 1e-5,
        "merged logits differ from base + adapter: {err}"
    );
    assert!(
        effect > 1e-4,
        "the adapter has no visible effect ({effect}): test is vacuous"
    );
}

/// LoRA on every linear layer but lm_head with rank-stabilized scaling (PEFT's `all-linear`,
/// `use_rslora`), trained at world 2: the exported adapter records both, and the merged weights
/// (merged with alpha / sqrt(r)) give base + adapter's logits; lm_head stays the base's.
#[test]
fn all_linear_rslora_merges_with_its_scaling() {
    let out = fresh("merged-all-linear-rslora");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    let sets = [
        "checkpoint.every_steps=2",
        "peft.target_modules=all-linear",
        "peft.use_rslora=true",
    ];
    ok(run(&out, 2, train, &sets, &[]), "train");
    let ckpt = out.join("ckpt/step-00000002");
    let (adapter, merged) = (out.join("adapter"), out.join("merged"));
    ok(export(&ckpt, &adapter, "peft", &[]), "export peft");
    ok(export(&ckpt, &merged, "merged", &[]), "export merged");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&cfg["target_modules"], &cfg["use_rslora"]),
        (&serde_json::json!("all-linear"), &serde_json::json!(true))
    );

    let base_dir = setup().join("model");
    let base = tensors(&base_dir.join("model.safetensors"));
    let got = tensors(&merged.join("model.safetensors"));
    for n in [
        "model.language_model.layers.0.mlp.down_proj.weight",
        "model.language_model.layers.0.self_attn.k_proj.weight",
        "model.vision_model.transformer.layers.0.mlp.fc1.weight",
        "model.multi_modal_projector.weight",
    ] {
        assert!(!base[n].equal(&got[n]), "{n}: LoRA update not merged");
    }
    for n in ["lm_head.weight", "model.language_model.embed_tokens.weight"] {
        assert!(base[n].equal(&got[n]), "{n}: changed but not a LoRA target");
    }

    let mut with_adapter = MllamaModel::load(&base_dir, LoadOptions::default()).unwrap();
    let lora = with_adapter.load_adapter(&adapter).unwrap();
    assert!(lora.lora.use_rslora);
    let want = logits(&with_adapter);
    let err = rel_err(
        &logits(&MllamaModel::load(&merged, LoadOptions::default()).unwrap()),
        &want,
    );
    let effect = rel_err(
        &logits(&MllamaModel::load(&base_dir, LoadOptions::default()).unwrap()),
        &want,
    );
    // infer/eval --checkpoint: the checkpoint's factors applied with the manifest's scaling
    let mut applied = MllamaModel::load(&base_dir, LoadOptions::default()).unwrap();
    CheckpointWeights::read(&ckpt)
        .unwrap()
        .apply(&mut applied)
        .unwrap();
    let err_applied = rel_err(&logits(&applied), &want);
    println!(
        "all-linear rslora merged vs base + adapter: rel {err:.2e}, checkpoint applied: \
         {err_applied:.2e} (base alone: {effect:.2e})"
    );
    assert!(
        err < 1e-5,
        "merged logits differ from base + adapter: {err}"
    );
    assert!(
        err_applied < 1e-5,
        "checkpoint applied differs from base + adapter: {err_applied}"
    );
    assert!(
        effect > 1e-4,
        "the adapter has no visible effect ({effect})"
    );
}

/// `--adapter`: a PEFT adapter folder merged without a checkpoint (PEFT's `merge_and_unload`).
/// One real PEFT made (all-linear, rslora) gives base + adapter's logits, its base taken from its
/// `base_model_name_or_path`; one of ours in transformers-4 naming merges to the very bytes the
/// checkpoint it came from merges to. `--format peft` refuses `--adapter`, and an adapter naming
/// no base folder asks for --model.
#[test]
fn a_peft_adapter_folder_merges_without_a_checkpoint() {
    let fx = common::repo().join("tests/fixtures/train");
    let out = fresh("merge-adapter");
    let run_export = |args: &[&std::ffi::OsStr]| -> Out {
        // from the repository root, which the fixture's base_model_name_or_path is relative to
        let o = Command::new(bin("trainer"))
            .current_dir(common::repo())
            .arg("export")
            .args(args)
            .output()
            .unwrap();
        Out {
            code: o.status.code(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    let peft_made = fx.join("adapter_all_linear_rslora");
    let merged = out.join("peft-made");
    ok(
        run_export(&[
            "--format".as_ref(),
            "merged".as_ref(),
            "--adapter".as_ref(),
            peft_made.as_os_str(),
            "--out".as_ref(),
            merged.as_os_str(),
        ]),
        "merge the PEFT-made adapter",
    );
    let mut with_adapter = MllamaModel::load(&fx.join("model"), LoadOptions::default()).unwrap();
    with_adapter.load_adapter(&peft_made).unwrap();
    let want = logits(&with_adapter);
    let err = rel_err(
        &logits(&MllamaModel::load(&merged, LoadOptions::default()).unwrap()),
        &want,
    );
    let effect = rel_err(
        &logits(&MllamaModel::load(&fx.join("model"), LoadOptions::default()).unwrap()),
        &want,
    );
    println!(
        "PEFT-made adapter merged vs base + adapter: rel {err:.2e} (base alone: {effect:.2e})"
    );
    assert!(
        err < 1e-5,
        "merged logits differ from base + adapter: {err}"
    );
    assert!(
        effect > 1e-4,
        "the adapter has no visible effect ({effect})"
    );

    // ours, transformers-4 naming: the bytes of the checkpoint's own merge
    let ckpt = lora_checkpoint();
    let (hf4, from_adapter, from_ckpt) = (
        out.join("adapter-hf4"),
        out.join("from-adapter"),
        out.join("from-ckpt"),
    );
    ok(
        export(ckpt, &hf4, "peft", &["--naming", "hf4"]),
        "export hf4",
    );
    ok(
        export(ckpt, &from_ckpt, "merged", &[]),
        "merge the checkpoint",
    );
    let base = setup().join("model");
    ok(
        run_export(&[
            "--format".as_ref(),
            "merged".as_ref(),
            "--adapter".as_ref(),
            hf4.as_os_str(),
            "--model".as_ref(),
            base.as_os_str(),
            "--out".as_ref(),
            from_adapter.as_os_str(),
        ]),
        "merge the hf4 adapter",
    );
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&from_adapter) == bytes(&from_ckpt), "merges differ");

    // --format peft has nothing to do with an adapter; a base-less adapter needs --model
    let o = run_export(&[
        "--adapter".as_ref(),
        hf4.as_os_str(),
        "--out".as_ref(),
        out.join("x").as_os_str(),
    ]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("--adapter is for --format merged"),
        "{}",
        o.stderr
    );
    let o = run_export(&[
        "--format".as_ref(),
        "merged".as_ref(),
        "--adapter".as_ref(),
        fx.join("adapter").as_os_str(),
        "--out".as_ref(),
        out.join("y").as_os_str(),
    ]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains(
            "names no base_model_name_or_path; pass the base model folder with --model DIR"
        ),
        "{}",
        o.stderr
    );
    assert!(!out.join("y").exists());
}

#[test]
fn sharded_merged_export_has_a_valid_index() {
    let ckpt = lora_checkpoint();
    let root = ckpt.parent().unwrap().parent().unwrap();
    let (single, sharded) = (root.join("merged-one"), root.join("merged-sharded"));
    ok(export(ckpt, &single, "merged", &[]), "export merged");
    // what a killed export leaves (only staging names: files are renamed into place at the end)
    // is cleared by the next export into the folder
    std::fs::create_dir_all(&sharded).unwrap();
    for stale in [
        ".model-00001-of-00007.safetensors.partial",
        ".config.json.partial",
    ] {
        std::fs::write(sharded.join(stale), b"torn").unwrap();
    }
    // ...and one killed while renaming its files into place: its list names what it renamed
    std::fs::write(sharded.join("model-00001-of-00099.safetensors"), b"renamed").unwrap();
    std::fs::write(
        sharded.join(".merged-export-renaming.json"),
        r#"["model-00001-of-00099.safetensors", "model-00002-of-00099.safetensors"]"#,
    )
    .unwrap();
    let max = 200_000u64; // the tiny model is ~1.1 MB: 6+ shards
    ok(
        export(
            ckpt,
            &sharded,
            "merged",
            &["--max-shard-size", &format!("{}KB", max / 1000)],
        ),
        "export merged sharded",
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let files: BTreeSet<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    let n = files.len();
    assert!(n >= 5, "expected several shards, got {n}");
    assert!(!sharded.join("model.safetensors").exists());
    let left: Vec<String> = std::fs::read_dir(&sharded)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "staging files left: {left:?}");
    assert!(!sharded.join("model-00001-of-00099.safetensors").exists());
    assert!(!sharded.join(".merged-export-renaming.json").exists());
    let want_names: BTreeSet<String> = (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect();
    assert_eq!(
        files.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
        want_names
    );
    // every tensor in exactly the file the index names, total_size = the data bytes
    let mut total = 0u64;
    let mut seen = BTreeSet::new();
    for f in &files {
        let bytes = std::fs::read(sharded.join(f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut data = 0u64;
        let names = st.names();
        for name in &names {
            assert_eq!(weight_map[name.as_str()].as_str(), Some(*f), "{name}");
            let t = st.tensor(name).unwrap();
            data += t.data().len() as u64;
            assert!(seen.insert(name.to_string()), "{name} in two shards");
        }
        assert!(
            data <= max || names.len() == 1,
            "{f}: {data} bytes of tensors over --max-shard-size {max}"
        );
        total += data;
    }
    assert_eq!(seen.len(), weight_map.len());
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));

    // our loader reads the index; the same weights as the single-file export
    let one = logits(&MllamaModel::load(&single, LoadOptions::default()).unwrap());
    let many = logits(&MllamaModel::load(&sharded, LoadOptions::default()).unwrap());
    assert!(one.equal(&many), "sharded export loads to other weights");

    // transformers loads the sharded folder to the same logits (text-only input)
    let Some(py) = venv_python("transformers, safetensors") else {
        println!("SKIP transformers check: .venv/bin/python cannot import transformers");
        return;
    };
    let ids = Tensor::from_slice(&[455i64, 12, 40, 77, 3, 250, 600, 9]).view([1, 8]);
    let ours = tch::no_grad(|| {
        MllamaModel::load(&sharded, LoadOptions::default())
            .unwrap()
            .forward(&trainer::model::Batch {
                input_ids: ids.shallow_clone(),
                attention_mask: None,
                labels: None,
                images: None,
            })
    })
    .unwrap();
    let io = root.join("transformers-check.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids), ("logits", &ours)], &io).unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration
d = load_file(sys.argv[2])
m = MllamaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    got = m(input_ids=d["input_ids"]).logits
err = ((got - d["logits"]).abs().max() / d["logits"].abs().max()).item()
print(f"transformers vs ours on the sharded export: rel {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
"#;
    let o = Command::new(py)
        .args(["-c", script])
        .arg(&sharded)
        .arg(&io)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    println!("{so}");
    assert!(o.status.success(), "transformers check failed:\n{so}\n{se}");
}

#[test]
fn merged_export_of_full_finetuning_holds_the_trained_weights() {
    let out = full_finetuned_one_step("merged-full", 2);
    let merged = out.join("merged");
    // (--format peft, the default, cannot hold it: the message names the format that can)
    let o = export(
        &out.join("ckpt/step-00000001"),
        &out.join("peft"),
        "peft",
        &[],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("--format peft needs a LoRA checkpoint; export its weights as a full model folder with --format merged"),
        "{}",
        o.stderr
    );
    ok(
        export(&out.join("ckpt/step-00000001"), &merged, "merged", &[]),
        "export merged",
    );
    let trained = weights(&out);
    let base = tensors(&setup().join("model/model.safetensors"));
    let got = tensors(&merged.join("model.safetensors"));
    assert_eq!(base.len(), got.len());
    let mut replaced = 0;
    for (n, t) in &got {
        match trained.get(n) {
            Some(w) => {
                assert!(t.equal(&w.to_kind(t.kind())), "{n}: not the trained weight");
                replaced += 1;
            }
            None => assert!(t.equal(&base[n]), "{n}: not trained but changed"),
        }
    }
    assert_eq!(
        replaced,
        trained.len(),
        "every trained weight is in the export"
    );
    assert!(replaced > 0);
    let changed = got.iter().filter(|(n, t)| !t.equal(&base[*n])).count();
    assert!(changed > 0, "training changed no weight: test is vacuous");
    println!("{replaced} trained weights replaced, {changed} differ from the base");
}

#[test]
fn merged_export_refuses_a_wrong_base_model_and_a_used_out_folder() {
    let ckpt = lora_checkpoint();
    let root = ckpt.parent().unwrap().parent().unwrap();
    // another model folder (other config): named by its config's hash, with the fix
    let other = root.join("other-model");
    if !other.join("config.json").exists() {
        common::tiny_model_folder(&other, 3, |c| {
            c["text_config"]["intermediate_size"] = 96.into();
        });
    }
    let o = export(
        ckpt,
        &root.join("merged-wrong"),
        "merged",
        &["--model", other.to_str().unwrap()],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("is not the model this checkpoint was trained on")
            && o.stderr.contains("--model"),
        "{}",
        o.stderr
    );
    // the run's base with its config.json re-indented and re-saved by another transformers: the
    // same model, merged; with a value changed, refused
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("manifest.json")).unwrap()).unwrap();
    let trained_on = std::path::PathBuf::from(manifest["model_path"].as_str().unwrap());
    let resaved = root.join("resaved-model");
    let mut cfg = common::resaved_model(&trained_on, &resaved);
    let o = export(
        ckpt,
        &root.join("merged-resaved"),
        "merged",
        &["--model", resaved.to_str().unwrap()],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    // this run's merged export as the base (the same config.json, the LoRA delta in its
    // weights): refused, as it would merge the delta twice
    let o = export(
        ckpt,
        &root.join("merged-twice"),
        "merged",
        &["--model", root.join("merged-resaved").to_str().unwrap()],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("samples of its tensors differ") && o.stderr.contains("--model DIR"),
        "{}",
        o.stderr
    );
    assert!(!root.join("merged-twice").exists());
    cfg["text_config"]["rms_norm_eps"] = 0.5.into();
    std::fs::write(resaved.join("config.json"), cfg.to_string()).unwrap();
    let o = export(
        ckpt,
        &root.join("merged-resaved-other"),
        "merged",
        &["--model", resaved.to_str().unwrap()],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("and its content differs too"),
        "{}",
        o.stderr
    );
    // an --out that already holds weights
    let used = root.join("merged-used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("model-00001-of-00002.safetensors"), b"old").unwrap();
    // (a model's folder holds the side files too: the weights are named, in any listing order)
    std::fs::write(used.join("tokenizer.json"), b"{}").unwrap();
    let o = export(ckpt, &used, "merged", &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("already holds model weights (model-00001-of-00002.safetensors)"),
        "{}",
        o.stderr
    );
    // pickled weights, and a PEFT adapter (transformers would load the folder as the adapter)
    for (name, why) in [
        (
            "pytorch_model.bin",
            "already holds model weights (pytorch_model.bin)",
        ),
        (
            "adapter_config.json",
            "already holds a PEFT adapter's file (adapter_config.json)",
        ),
        (
            "adapter_model.bin",
            "already holds a PEFT adapter's file (adapter_model.bin)",
        ),
    ] {
        let used = root.join(format!("merged-used-{name}"));
        std::fs::create_dir_all(&used).unwrap();
        std::fs::write(used.join(name), b"{}").unwrap();
        let o = export(ckpt, &used, "merged", &[]);
        assert_eq!(o.code, Some(1), "{}", o.stderr);
        assert!(o.stderr.contains(why), "{}", o.stderr);
        assert!(!used.join("config.json").exists());
    }
    // a Trainer's state beside where the model goes is not weights: the export goes ahead
    let state = root.join("merged-beside-state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("training_args.bin"), b"state").unwrap();
    let o = export(ckpt, &state, "merged", &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(
        std::fs::read(state.join("training_args.bin")).unwrap(),
        b"state"
    );
    // a folder another export is writing (a live process's lock) is refused before any file is written
    let busy = root.join("merged-busy");
    let _held = common::hold_export_lock(&busy);
    let o = export(ckpt, &busy, "merged", &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("being written by another export or eval"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_dir(&busy).unwrap().count(),
        1,
        "only the lock"
    );
    // a bad --max-shard-size
    let o = export(
        ckpt,
        &root.join("merged-bad-size"),
        "merged",
        &["--max-shard-size", "5 parsecs"],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("--max-shard-size"), "{}", o.stderr);
}

/// A hand-edited manifest (checksum file deleted, as an older trainer's checkpoint has none) with
/// a negative LoRA rank is an error naming the parameter, not a panic.
#[test]
fn merged_export_of_a_manifest_with_negative_shapes_is_an_error() {
    let ckpt = lora_checkpoint();
    let root = ckpt.parent().unwrap().parent().unwrap();
    let copy = root.join("edited-ckpt");
    copy_dir(ckpt, &copy);
    std::fs::remove_file(copy.join("manifest.sha256")).unwrap();
    let path = copy.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut edited = 0;
    for t in m["tensors"].as_array_mut().unwrap() {
        for p in t["params"].as_array_mut().unwrap() {
            let name = p["name"].as_str().unwrap().to_string();
            let shape = p["shape"].as_array_mut().unwrap();
            if name.contains("layers.0.self_attn.q_proj.lora_A") {
                shape[0] = (-shape[0].as_i64().unwrap()).into();
                edited += 1;
            } else if name.contains("layers.0.self_attn.q_proj.lora_B") {
                shape[1] = (-shape[1].as_i64().unwrap()).into();
                edited += 1;
            }
        }
    }
    assert!(edited >= 2, "{edited}");
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    let o = export(&copy, &root.join("merged-edited"), "merged", &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert!(o.stderr.contains("q_proj.lora_"), "{}", o.stderr);
}

/// An export that fails midway (here: the base folder's tokenizer.json cannot be copied, after
/// every shard was written) removes what it wrote, and the folder it made, so nothing looks like
/// a model nor refuses the retry; a file of the user's that the export would write is not overwritten.
#[test]
fn a_failed_merged_export_leaves_nothing_behind_and_user_files_are_kept() {
    let ckpt = lora_checkpoint();
    let root = ckpt.parent().unwrap().parent().unwrap();
    let base = setup().join("model");
    let broken = root.join("broken-base");
    copy_dir(&base, &broken);
    std::fs::remove_file(broken.join("tokenizer.json")).unwrap();
    std::fs::create_dir(broken.join("tokenizer.json")).unwrap(); // cannot be copied
    let out = root.join("merged-retry");
    let _ = std::fs::remove_dir_all(&out);
    let o = export(
        ckpt,
        &out,
        "merged",
        &[
            "--model",
            broken.to_str().unwrap(),
            "--max-shard-size",
            "200KB",
        ],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    // (the folder too: the export made it)
    let left: Vec<String> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()))
        .into_iter()
        .flatten()
        .collect();
    assert!(left.is_empty() && !out.exists(), "left behind: {left:?}");
    let o = export(ckpt, &out, "merged", &["--model", base.to_str().unwrap()]);
    assert_eq!(o.code, Some(0), "the retry: {}", o.stderr);
    // a folder holding a file of the user's that the export writes is refused, the file kept
    let mine = root.join("merged-user-files");
    let _ = std::fs::remove_dir_all(&mine);
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("chat_template.json"), "{\"edited\": true}").unwrap();
    let o = export(ckpt, &mine, "merged", &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("already holds chat_template.json"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("chat_template.json")).unwrap(),
        "{\"edited\": true}"
    );
}
