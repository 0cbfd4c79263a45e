//! `trainer infer --checkpoint DIR`: a training checkpoint's weights applied in memory equal the
//! weights the run ended with, and generate exactly what its exported PEFT adapter generates; a
//! checkpoint of another base model is a clear error.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::ckpt::*;
use common::{bin, copy_dir, repo, tiny_model_folder};
use serde_json::Value;
use trainer::checkpoint::PROMPT_FILE;
use trainer::infer::{CheckpointWeights, PromptSettings};
use trainer::model::{LoadOptions, MllamaModel};

fn trainer(args: &[&str], paths: &[(&str, &Path)]) -> (Option<i32>, String, String) {
    let mut c = Command::new(bin("trainer"));
    c.args(args).env("RUST_LOG", "info");
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    let o = c.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const INFER: [&str; 11] = [
    "infer",
    "--question",
    "How many red shapes?",
    "--turns",
    "2",
    "--temperature",
    "0",
    "--max-new-tokens",
    "8",
    "--json",
    "--seed=1",
];

fn texts(stdout: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn lora_checkpoint_weights_and_generation_equal_the_exported_adapter() {
    let out = fresh("infer-lora");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    ok(
        run(&out, 1, train, &["checkpoint.every_steps=2"], &[]),
        "train",
    );
    let ckpt = out.join("ckpt/step-00000002");

    // in memory: the applied factors are the ones the run ended with, bit for bit
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    let weights_ckpt = CheckpointWeights::read(&ckpt).unwrap();
    assert_eq!(weights_ckpt.model_path(), setup().join("model"));
    assert_eq!(weights_ckpt.prompt_settings(), PromptSettings::default());
    let n = weights_ckpt.apply(&mut model).unwrap();
    assert_eq!(n, weights(&out).len());
    let applied = applied_as_trained(&mut model, &out);
    assert!(
        applied
            .iter()
            .any(|(n, t)| n.contains("lora_B")
                && t.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0),
        "training moved lora_B off zero"
    );

    // the CLI: --checkpoint alone (model.path from the manifest) = --model + exported --adapter
    let image = repo().join("tests/fixtures/data/images/small.png");
    let (code, from_ckpt, err) = trainer(&INFER, &[("--checkpoint", &ckpt), ("--image", &image)]);
    assert_eq!(code, Some(0), "{err}");
    let adapter = out.join("adapter");
    let (code, _, err) = trainer(
        &["export", "--format", "peft"],
        &[("--checkpoint", &ckpt), ("--out", &adapter)],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, from_adapter, err) = trainer(
        &INFER,
        &[
            ("--model", &setup().join("model")),
            ("--adapter", &adapter),
            ("--image", &image),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(texts(&from_ckpt), texts(&from_adapter));
    assert_eq!(texts(&from_ckpt).len(), 2);
    let v: Value = serde_json::from_str(&from_ckpt).unwrap();
    assert_eq!(v["checkpoint"].as_str().unwrap(), ckpt.to_str().unwrap());

    // eval --checkpoint scores with the weights eval --model --adapter scores with
    let bench = out.join("bench.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"a\", \"image\": \"small.png\", \"question\": \"How many red shapes?\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    let images = repo().join("tests/fixtures/data/images");
    let base = setup().join("model");
    let eval = |name: &str, extra: &[(&str, &Path)]| -> Vec<String> {
        let dir = out.join(name);
        let mut paths: Vec<(&str, &Path)> = vec![
            ("--data", &bench),
            ("--image-root", &images),
            ("--out", &dir),
        ];
        paths.extend_from_slice(extra);
        let (code, _, err) = trainer(&["eval", "--turns", "2", "--max-new-tokens", "8"], &paths);
        assert_eq!(code, Some(0), "{err}");
        common::prediction_texts(&dir).remove(0)
    };
    let with_ckpt = eval("eval-ckpt", &[("--checkpoint", &ckpt)]);
    assert_eq!(with_ckpt.len(), 2);
    assert_eq!(
        with_ckpt,
        eval(
            "eval-adapter",
            &[("--model", &base), ("--adapter", &adapter)]
        )
    );

    // another base model: refused, naming the fix
    let other = out.join("other-model");
    tiny_model_folder(&other, 3, |cfg| {
        cfg["text_config"]["hidden_size"] = 96.into()
    });
    let (code, _, err) = trainer(&INFER, &[("--checkpoint", &ckpt), ("--model", &other)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not the model this checkpoint was trained on")
            && err.contains("pass the right folder with --model DIR"),
        "{err}"
    );
    // --adapter and --checkpoint together: a usage error
    let (code, _, err) = trainer(&INFER, &[("--checkpoint", &ckpt), ("--adapter", &adapter)]);
    assert_eq!(code, Some(2), "{err}");
    // a damaged rank file (read parameter by parameter now): its checksum still stops it
    let damaged = out.join("damaged-ckpt");
    copy_dir(&ckpt, &damaged);
    let file = damaged.join("rank-0-of-1.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let (code, _, err) = trainer(&INFER, &[("--checkpoint", &damaged)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rank-0-of-1.safetensors"), "{err}");
}

/// The base with `ckpt`'s weights applied, as `infer --checkpoint` applies them.
fn checkpoint_model(ckpt: &Path) -> MllamaModel {
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    CheckpointWeights::read(ckpt)
        .unwrap()
        .apply(&mut model)
        .unwrap();
    model
}

/// `trainer export --format peft --naming NAMING` of `ckpt` into `out/adapter-NAMING`, loaded
/// onto the base as `infer --adapter` loads it; and the adapter_config.json it wrote.
fn exported_adapter(out: &Path, ckpt: &Path, naming: &str) -> (MllamaModel, Value) {
    let adapter = out.join(format!("adapter-{naming}"));
    let (code, _, err) = trainer(
        &["export", "--format", "peft", "--naming", naming],
        &[("--checkpoint", ckpt), ("--out", &adapter)],
    );
    assert_eq!(code, Some(0), "{err}");
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    model.load_adapter(&adapter).unwrap();
    let cfg = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    (model, serde_json::from_str(&cfg).unwrap())
}

/// One training step (world 1) with `sets` and a checkpoint after it: the run's folder and the
/// checkpoint.
fn one_step_checkpoint(name: &str, sets: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = fresh(name);
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    let mut sets = sets.to_vec();
    sets.push("checkpoint.every_steps=1");
    ok(run(&out, 1, train, &sets, &[]), "train");
    let ckpt = out.join("ckpt/step-00000001");
    (out, ckpt)
}

/// The model's trainable parameters, each asserted bitwise equal to the value the run in `out`
/// ended with (its TRAINER_DUMP_TRAINABLE file), and no more of them.
fn applied_as_trained(model: &mut MllamaModel, out: &Path) -> Vec<(String, tch::Tensor)> {
    let trained = weights(out);
    let applied = model.trainable_parameters();
    assert_eq!(applied.len(), trained.len());
    for (name, t) in &applied {
        assert!(
            t.equal(&trained[name]),
            "{name} differs from the trained value"
        );
    }
    applied
}

/// Each wrapped layer of a model: (rank, scaling).
fn lora_layout(model: &mut MllamaModel) -> BTreeMap<String, (i64, f64)> {
    let mut layout = BTreeMap::new();
    model.visit_linears(&mut |l| {
        if let Some(br) = &l.lora {
            layout.insert(l.path.clone(), (br.a.size()[0], br.scaling));
        }
    });
    layout
}

/// DoRA that varies by layer (rank_pattern, alpha_pattern, exclude_modules) beside a module
/// trained in full (modules_to_save), trained on two FSDP ranks: `infer --checkpoint` applies the
/// factors, magnitudes and module the run ended with on the layers, ranks and scalings it
/// trained, and generates what its exported adapter generates; its
/// PEFT exports in either naming load (peft's reading of the config written) as that same
/// adapter; the merged export of the checkpoint equals the adapter's; a resume with other
/// patterns is refused.
#[test]
fn per_layer_lora_checkpoints_load_export_and_merge_as_trained() {
    let out = fresh("infer-patterns");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    let sets = [
        "checkpoint.every_steps=2",
        "peft.target_modules=[q_proj, v_proj, fc1]",
        // a partial path of this naming: peft would not match it in transformers-4 naming
        "peft.rank_pattern={'language_model\\.layers\\.0\\..*': 2, fc1: 6}",
        "peft.alpha_pattern={v_proj: 8}",
        "peft.exclude_modules=.*global_transformer.*",
        "peft.use_dora=true",
        "peft.modules_to_save=[multi_modal_projector]",
    ];
    ok(run(&out, 2, train, &sets, &[]), "train");
    let ckpt = out.join("ckpt/step-00000002");
    let base = setup().join("model");
    let mut model = checkpoint_model(&ckpt);
    let applied = applied_as_trained(&mut model, &out);
    let layout = lora_layout(&mut model);
    let (q0, v1) = (
        "model.language_model.layers.0.self_attn.q_proj",
        "model.vision_model.transformer.layers.1.self_attn.v_proj",
    );
    assert_eq!(layout[q0], (2, 16.0 / 2.0));
    assert_eq!(
        layout["model.vision_model.transformer.layers.0.mlp.fc1"],
        (6, 16.0 / 6.0)
    );
    assert_eq!(layout[v1], (4, 8.0 / 4.0));
    assert!(!layout.keys().any(|p| p.contains("global_transformer")));
    assert!(layout.keys().any(|p| p.contains("cross_attn")));
    let magnitudes = applied
        .iter()
        .filter(|(n, _)| n.ends_with(".lora_magnitude_vector"));
    assert_eq!(magnitudes.count(), layout.len());
    let saved: Vec<&str> = (applied.iter())
        .filter(|(n, _)| !n.starts_with("base_model.model."))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        saved,
        [
            "model.multi_modal_projector.weight",
            "model.multi_modal_projector.bias"
        ]
    );

    for naming in ["hf5", "hf4"] {
        let (mut from_adapter, cfg) = exported_adapter(&out, &ckpt, naming);
        assert_eq!(lora_layout(&mut from_adapter), layout, "{naming}");
        for ((n, a), (m, b)) in from_adapter.trainable_parameters().iter().zip(&applied) {
            assert_eq!(n, m);
            assert!(a.equal(b), "{naming}: {n}");
        }
        // exclude_modules narrowed the targets: listed, in the naming written
        assert_eq!(
            cfg["target_modules"].as_array().unwrap().len(),
            layout.len()
        );
        assert!(cfg.get("exclude_modules").is_none(), "{cfg}");
        assert_eq!(cfg["use_dora"], Value::Bool(true));
        assert_eq!(
            cfg["modules_to_save"],
            serde_json::json!(["multi_modal_projector"])
        );
        let patterns = cfg["rank_pattern"].as_object().unwrap();
        match naming {
            "hf5" => assert_eq!(patterns.len(), 2, "{cfg}"),
            // the partial path became one full-path key per module that differs from r
            _ => {
                assert!(
                    patterns
                        .contains_key("language_model\\.model\\.layers\\.0\\.self_attn\\.q_proj"),
                    "{cfg}"
                );
                assert_eq!(
                    patterns.len(),
                    layout.values().filter(|(r, _)| *r != 4).count(),
                    "{cfg}"
                );
            }
        }
    }

    // generation: --checkpoint = --model + the exported adapter
    let image = repo().join("tests/fixtures/data/images/small.png");
    let (code, from_ckpt, err) = trainer(&INFER, &[("--checkpoint", &ckpt), ("--image", &image)]);
    assert_eq!(code, Some(0), "{err}");
    let (code, from_adapter, err) = trainer(
        &INFER,
        &[
            ("--model", &base),
            ("--adapter", &out.join("adapter-hf5")),
            ("--image", &image),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(texts(&from_ckpt), texts(&from_adapter));

    // the merged model of the checkpoint = that of its exported adapter
    let merged = |name: &str, source: (&str, &Path)| {
        let dir = out.join(name);
        let (code, _, err) = trainer(
            &["export", "--format", "merged"],
            &[source, ("--model", &base), ("--out", &dir)],
        );
        assert_eq!(code, Some(0), "{err}");
        let mut t: Vec<(String, tch::Tensor)> =
            tch::Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let from_ckpt = merged("merged-ckpt", ("--checkpoint", &ckpt));
    let from_adapter = merged("merged-adapter", ("--adapter", &out.join("adapter-hf5")));
    assert_eq!(from_ckpt.len(), from_adapter.len());
    for ((n, a), (_, b)) in from_ckpt.iter().zip(&from_adapter) {
        assert!(a.equal(b), "merged {n} differs");
    }

    // a resume with other patterns would load factors of other shapes: refused by key
    let mut other = sets.to_vec();
    other[2] = "peft.rank_pattern={fc1: 6}";
    let o = run(&out, 1, train, &other, &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("peft.rank_pattern"), "{}", o.stderr);
}

/// Targets and pattern keys written as partial transformers-5 paths match nothing in
/// transformers-4 naming: the hf4 export writes them out by module, so the adapter still loads
/// as trained (the hf5 export keeps them as written).
#[test]
fn an_hf4_export_spells_out_partial_paths() {
    let (out, ckpt) = one_step_checkpoint(
        "infer-partial-paths",
        &[
            "peft.target_modules=[language_model.layers.0.self_attn.q_proj, v_proj]",
            "peft.rank_pattern={language_model.layers.1.cross_attn.v_proj: 2}",
        ],
    );
    let layout = lora_layout(&mut checkpoint_model(&ckpt));
    assert_eq!(
        layout["model.language_model.layers.1.cross_attn.v_proj"].0,
        2
    );
    for (naming, spelled_out) in [("hf5", false), ("hf4", true)] {
        let (mut from_adapter, cfg) = exported_adapter(&out, &ckpt, naming);
        assert_eq!(lora_layout(&mut from_adapter), layout, "{naming}");
        let listed = cfg["target_modules"].as_array().unwrap().len() == layout.len();
        assert_eq!(listed, spelled_out, "{naming}: {cfg}");
    }
}

/// A module to save named by a path that means another module in transformers-4 naming
/// (`model.language_model`, whose transformers-4 `language_model` also holds lm_head): the hf4
/// export names the module the run saved, in that naming, and both exports load as trained.
#[test]
fn exports_name_the_modules_the_run_saved() {
    let (out, ckpt) = one_step_checkpoint(
        "infer-saved-modules",
        &["peft.modules_to_save=[model.language_model]"],
    );
    let mut model = checkpoint_model(&ckpt);
    let trained = model.trainable_parameters();
    assert!(trained
        .iter()
        .any(|(n, _)| n == "model.language_model.norm.weight"));
    assert!(!trained.iter().any(|(n, _)| n.starts_with("lm_head")));
    for (naming, saves) in [
        ("hf5", "model.language_model"),
        ("hf4", "language_model.model"),
    ] {
        let (mut from_adapter, cfg) = exported_adapter(&out, &ckpt, naming);
        assert_eq!(
            cfg["modules_to_save"],
            serde_json::json!([saves]),
            "{naming}"
        );
        let loaded = from_adapter.trainable_parameters();
        assert_eq!(loaded.len(), trained.len(), "{naming}");
        for ((n, a), (m, b)) in loaded.iter().zip(&trained) {
            assert_eq!(n, m);
            assert!(a.equal(b), "{naming}: {n}");
        }
    }
}

/// A checkpoint records how its run built prompts; `infer --checkpoint` follows it.
#[test]
fn a_checkpoint_records_its_prompt_settings() {
    let (out, ckpt) = one_step_checkpoint(
        "infer-prompt-settings",
        &["data.double_bos=true", "data.image_placeholder=keep"],
    );
    let settings = CheckpointWeights::read(&ckpt).unwrap().prompt_settings();
    assert_eq!(
        settings,
        PromptSettings {
            double_bos: true,
            keep_image_placeholder: true,
            correction_prompt: None,
        }
    );
    // the adapter the run leaves in train.output_dir carries them too, and infer --adapter
    // prompts that way
    assert!(out.join("adapter_config.json").is_file());
    assert_eq!(PromptSettings::read_folder(&out).unwrap(), Some(settings));
    let model = setup().join("model");
    let (code, _, err) = trainer(&INFER, &[("--model", &model), ("--adapter", &out)]);
    assert_eq!(code, Some(0), "{err}");
    let applied = format!(
        "prompts as the run of {} trained on them: double_bos true, image placeholder kept",
        out.join(PROMPT_FILE).display()
    );
    assert!(err.contains(&applied), "{err}");
    // an adapter without the file (peft's) is not prompted by its base folder's file
    let base = out.join("base-with-settings");
    copy_dir(&model, &base);
    std::fs::copy(out.join(PROMPT_FILE), base.join(PROMPT_FILE)).unwrap();
    let plain = out.join("peft-adapter");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(out.join(f), plain.join(f)).unwrap();
    }
    let (code, _, err) = trainer(&INFER, &[("--model", &base), ("--adapter", &plain)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("prompts as the run of"), "{err}");
    assert!(
        err.contains("describes the base model's own training, not the adapter's"),
        "{err}"
    );
    // other adapter weights saved over the export (a Python run into the same folder): the file
    // describes the weights it was exported with, so it is not applied
    std::fs::copy(out.join(PROMPT_FILE), plain.join(PROMPT_FILE)).unwrap();
    let w = plain.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // (the lowest bit of the last factor's last value)
    std::fs::write(&w, bytes).unwrap();
    let (code, _, err) = trainer(&INFER, &[("--model", &model), ("--adapter", &plain)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("prompts as the run of"), "{err}");
    assert!(err.contains("written for other adapter weights"), "{err}");
    // and infer --checkpoint prompts that way
    let (code, _, err) = trainer(&INFER, &[("--checkpoint", &ckpt)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("prompts as the checkpoint's run trained on them: double_bos true, image placeholder kept"),
        "{err}"
    );
}

/// The data's self-correction turn (its most common second user turn) is recorded in the
/// checkpoint, and `infer --checkpoint` asks with it unless --correction-prompt says otherwise.
#[test]
fn a_checkpoint_records_its_datas_correction_prompt() {
    let out = fresh("infer-correction-prompt");
    std::fs::create_dir_all(&out).unwrap();
    let text = std::fs::read_to_string(setup().join("train.jsonl")).unwrap();
    let lines: Vec<String> = (text.lines().enumerate())
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let ask = if i == 0 {
                "Check it."
            } else {
                "  Look again.\n"
            };
            let turns = v["conversations"].as_array_mut().unwrap();
            turns.push(serde_json::json!({"from": "human", "value": ask}));
            turns.push(serde_json::json!({"from": "gpt", "value": "<CONCLUSION> 3 </CONCLUSION>"}));
            v.to_string()
        })
        .collect();
    let data = out.join("two-turns.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let set = format!("data.train={}", data.display());
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    let o = ok(
        run(&out, 1, train, &["checkpoint.every_steps=1", &set], &[]),
        "train",
    );
    assert!(
        o.stderr.contains(
            "the data's correction turn (47 of the 48 samples with a second turn): \"Look again.\""
        ),
        "{}",
        o.stderr
    );
    let ckpt = out.join("ckpt/step-00000001");
    let settings = CheckpointWeights::read(&ckpt).unwrap().prompt_settings();
    assert_eq!(settings.correction_prompt.as_deref(), Some("Look again."));
    let (code, _, err) = trainer(&INFER, &[("--checkpoint", &ckpt)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("correction prompt as the checkpoint's run trained on it: \"Look again.\""),
        "{err}"
    );
    let mut given = INFER.to_vec();
    given.extend(["--correction-prompt", "Again?"]);
    let (code, _, err) = trainer(&given, &[("--checkpoint", &ckpt)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("--correction-prompt differs"), "{err}");
    // an exported adapter carries it (and says so), and infer --adapter asks with it
    let adapter = out.join("adapter");
    let (code, stdout, err) = trainer(
        &["export", "--format", "peft"],
        &[("--checkpoint", &ckpt), ("--out", &adapter)],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        stdout.contains("the run's prompt settings, which `trainer infer` / `trainer eval` follow with this export (as --correction-prompt 'Look again.')"),
        "{stdout}"
    );
    assert_eq!(
        PromptSettings::read_folder(&adapter).unwrap(),
        Some(settings.clone())
    );
    let model = setup().join("model");
    let (code, _, err) = trainer(&INFER, &[("--model", &model), ("--adapter", &adapter)]);
    assert_eq!(code, Some(0), "{err}");
    let from_file = format!(
        "correction prompt as the run of {} trained on it: \"Look again.\"",
        adapter.join(PROMPT_FILE).display()
    );
    assert!(err.contains(&from_file), "{err}");
    // so does a folder merged from that adapter, for infer --model
    let merged = out.join("merged");
    let (code, _, err) = trainer(
        &["export", "--format", "merged"],
        &[
            ("--adapter", &adapter),
            ("--model", &model),
            ("--out", &merged),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        PromptSettings::read_folder(&merged).unwrap(),
        Some(settings.clone())
    );
    // (an adapter's file names its weights; a merged folder's, with other weights, does not)
    let text = |dir: &Path| std::fs::read_to_string(dir.join(PROMPT_FILE)).unwrap();
    assert!(text(&adapter).contains("adapter_sha256"));
    assert!(!text(&merged).contains("adapter_sha256"));
    let (code, _, err) = trainer(&INFER, &[("--model", &merged)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("correction prompt as the run of"), "{err}");
    // a broken settings file is an error that names it, not defaults used silently
    std::fs::write(merged.join(PROMPT_FILE), "[1, 2]").unwrap();
    let (code, _, err) = trainer(&INFER, &[("--model", &merged)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(PROMPT_FILE) && err.contains("export again"),
        "{err}"
    );
    // second turns that are further questions, none shared by most samples: nothing recorded
    let asks: Vec<String> = (lines.iter().enumerate())
        .map(|(i, l)| l.replace("Look again.", &format!("And question {i}?")))
        .collect();
    std::fs::write(&data, asks.join("\n") + "\n").unwrap();
    let other = fresh("infer-correction-prompt-none");
    let o = ok(
        run(&other, 1, train, &["checkpoint.every_steps=1", &set], &[]),
        "train",
    );
    assert!(
        o.stderr
            .contains("no second user turn is shared by most of the 48 two-turn samples"),
        "{}",
        o.stderr
    );
    let ckpt = other.join("ckpt/step-00000001");
    let settings = CheckpointWeights::read(&ckpt).unwrap().prompt_settings();
    assert_eq!(settings.correction_prompt, None);
}

#[test]
fn full_finetuning_checkpoint_replaces_the_base_weights() {
    let out = full_finetuned_one_step("infer-full", 1);
    let mut model = MllamaModel::load(&setup().join("model"), LoadOptions::default()).unwrap();
    let n = CheckpointWeights::read(&out.join("ckpt/step-00000001"))
        .unwrap()
        .apply(&mut model)
        .unwrap();
    let trained = weights(&out);
    assert_eq!(n, trained.len());
    let mut checked = 0;
    model.visit_params(&mut |name, t| {
        if let Some(w) = trained.get(name) {
            assert!(t.equal(w), "{name} differs from the trained value");
            checked += 1;
        }
    });
    assert_eq!(checked, trained.len());
}

/// `eval --checkpoint` under the launcher: the ranks of a node split the hashing of the
/// checkpoint's files (each reads its share); a damaged file stops every rank before anything is
/// generated, the one that found it naming the file.
#[test]
fn ranks_split_the_checkpoint_check_and_all_stop_on_a_damaged_file() {
    let out = fresh("eval-ckpt-world2");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    ok(
        run(&out, 2, train, &["checkpoint.every_steps=1"], &[]),
        "train",
    );
    let ckpt = out.join("ckpt/step-00000001");
    let bench = out.join("bench.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"a\", \"image\": \"small.png\", \"question\": \"How many?\", \"answer\": \"2\"}\n\
         {\"id\": \"b\", \"image\": \"small.png\", \"question\": \"What color?\", \"answer\": \"red\"}\n",
    )
    .unwrap();
    let eval = |ckpt: &Path, name: &str| {
        let o = common::launcher()
            .args(["--standalone", "--nproc-per-node", "2", "--"])
            .arg(bin("trainer"))
            .args(["eval", "--turns", "1", "--max-new-tokens", "4"])
            .arg("--checkpoint")
            .arg(ckpt)
            .arg("--data")
            .arg(&bench)
            .arg("--image-root")
            .arg(repo().join("tests/fixtures/data/images"))
            .arg("--out")
            .arg(out.join(name))
            .env("TMPDIR", out.join("tmp"))
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (good, err) = eval(&ckpt, "eval-good");
    assert!(good, "{err}");
    // each rank hashed its own share (one file of two), not every file
    assert_eq!(
        err.matches("checked 1 of the 2 files of checkpoint")
            .count(),
        2,
        "{err}"
    );
    assert!(out.join("eval-good/predictions.jsonl").exists());

    let damaged = out.join("damaged-ckpt");
    copy_dir(&ckpt, &damaged);
    let file = damaged.join("rank-1-of-2.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let (good, err) = eval(&damaged, "eval-damaged");
    assert!(!good, "{err}");
    assert!(err.contains("rank-1-of-2.safetensors"), "{err}");
    assert!(!out.join("eval-damaged/predictions.jsonl").exists());
    assert!(!out.join("eval-damaged/predictions.rank-0.jsonl").exists());
}
