//! `trainer train` against PyTorch: the same tiny Mllama, the same LoRA adapter (A and B both
//! non-zero, loaded through peft.init_from), the same batches (made by our data pipeline), trained by
//! transformers + peft + torch.optim.AdamW in tests/fixtures/train/make_train_golden.py. The per-step
//! losses must agree within 1e-4 relative.
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use trainer::model::{LoadOptions, MllamaModel};

mod common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn losses_match_transformers_peft_adamw() {
    losses_match("golden_losses.json", &[]);
}

/// LoRA on every linear layer but lm_head with alpha / sqrt(r) scaling: PEFT's
/// `target_modules="all-linear"`, `use_rslora=True` (its adapter lists the module names it
/// resolved to, which the config's `all-linear` must choose alike).
#[test]
fn all_linear_rslora_losses_match_transformers_peft_adamw() {
    losses_match(
        "golden_losses_all_linear_rslora.json",
        &[
            "peft.init_from=tests/fixtures/train/adapter_all_linear_rslora",
            "peft.target_modules=all-linear",
            "peft.use_rslora=true",
        ],
    );
}

/// LoRA that varies by layer (tests/fixtures/train/make_peft_options_goldens.py, case patterns):
/// per-module ranks and alphas (`rank_pattern`, `alpha_pattern`), a module left out
/// (`exclude_modules`), layers 0 and 1 of every stack only (`layers_to_transform` +
/// `layers_pattern`). The peft section must choose
/// the layers, ranks and scalings of PEFT's adapter (init_from refuses any difference), the
/// losses must match, and the adapter the run exports must load as PEFT's layout again.
#[test]
fn per_layer_lora_losses_match_transformers_peft_adamw() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/train/golden_losses_patterns.json"))
            .unwrap(),
    )
    .unwrap();
    let check = |out: &std::path::Path| {
        // the adapter the run wrote to output_dir, loaded with PEFT's reading of its config
        let mut model = MllamaModel::load(
            &repo().join("tests/fixtures/train/model"),
            LoadOptions::default(),
        )
        .unwrap();
        model.load_adapter(out).unwrap();
        let mut layers = serde_json::Map::new();
        model.visit_linears(&mut |l| {
            if let Some(br) = &l.lora {
                let (rank, scaling) = (br.a.size()[0], br.scaling);
                layers.insert(l.path.clone(), json!({"rank": rank, "scaling": scaling}));
            }
        });
        assert_eq!(Value::Object(layers), golden["layers"]);
        // the patterns as written; the layers narrowed by exclude_modules and
        // layers_to_transform listed (what peft then wraps needs no base model to check)
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["rank_pattern"],
            json!({"gate_proj": 2, "layers\\.1\\.self_attn\\.q_proj": 6})
        );
        assert_eq!(
            cfg["alpha_pattern"],
            json!({"v_proj": 16.0, "cross_attn.q_proj": 4.0})
        );
        assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 14);
        assert_eq!(cfg["layers_to_transform"], Value::Null);
        assert!(cfg.get("exclude_modules").is_none(), "{cfg}");
    };
    losses_match_then(
        "golden_losses_patterns.json",
        &[
            "peft.init_from=tests/fixtures/train/adapter_patterns",
            "peft.target_modules=[q_proj, v_proj, gate_proj, fc1]",
            "peft.rank_pattern={gate_proj: 2, 'layers\\.1\\.self_attn\\.q_proj': 6}",
            "peft.alpha_pattern={v_proj: 16, cross_attn.q_proj: 4}",
            "peft.exclude_modules=[global_transformer.layers.0.mlp.fc1]",
            "peft.layers_to_transform=[0, 1]",
            "peft.layers_pattern=layers",
        ],
        &check,
    );
}

/// DoRA (tests/fixtures/train/make_peft_options_goldens.py, case dora): the learned magnitudes
/// train with A and B (peft detaches the norm of W + scaling B A), fc1's bias is left out of the
/// base output it scales; the losses must match PEFT's, and the adapter the run exports must load as DoRA again.
#[test]
fn dora_losses_match_transformers_peft_adamw() {
    losses_match_then(DORA_GOLDEN, DORA_SETS, &dora_exported);
}

/// The same from a 2-rank FSDP run (batch 1 per rank): every rank takes the adapter's magnitudes
/// whole (they were once summed over the ranks as a fresh adapter's are: doubled).
#[test]
fn dora_under_fsdp_losses_match_transformers_peft_adamw() {
    let mut sets = DORA_SETS.to_vec();
    sets.extend(["fsdp.enabled=true", "train.batch_size=1"]);
    losses_match_at(2, DORA_GOLDEN, &sets, &dora_exported);
}

/// The optimizer path beyond plain steps, against torch (make_optim_golden.py): gradient
/// accumulation over 5 micro-batches of one sample (the loss the step's token mean), each epoch's
/// last, partial step of 2 (12 samples), clipping that clips every step, weight decay and StepLR
/// (gamma 0.5 per epoch) over 2 epochs: the per-step losses and the pre-clip gradient norms.
#[test]
fn accumulation_partial_steps_clipping_and_step_lr_match_torch() {
    const FILE: &str = "golden_losses_optim.json";
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/train").join(FILE)).unwrap(),
    )
    .unwrap();
    let sets: Vec<&str> = (golden["sets"].as_array().unwrap().iter())
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<f64> = (golden["grad_norms"].as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap())
        .collect();
    losses_match_then(FILE, &sets, &|out| {
        let got: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|m| m.get("grad_norm")?.as_f64())
            .collect();
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = (g - w).abs() / w.abs();
            assert!(rel < 1e-4, "step {}: grad norm {g} vs torch {w}", i + 1);
        }
    });
}

const DORA_GOLDEN: &str = "golden_losses_dora.json";
const DORA_SETS: &[&str] = &[
    "peft.init_from=tests/fixtures/train/adapter_dora",
    "peft.target_modules=[q_proj, v_proj, fc1]",
    "peft.use_dora=true",
];

/// The adapter a `DORA_SETS` run exports is DoRA and loads again, a magnitude per wrapped layer.
fn dora_exported(out: &std::path::Path) {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["use_dora"], json!(true));
    let mut model = MllamaModel::load(
        &repo().join("tests/fixtures/train/model"),
        LoadOptions::default(),
    )
    .unwrap();
    model.load_adapter(out).unwrap();
    let magnitudes = model
        .trainable_parameters()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(magnitudes, 15);
}

/// LoRA beside a module trained in full (tests/fixtures/train/make_peft_options_goldens.py, case
/// saved: peft's `modules_to_save`, the projector's weight and bias; the config names it by its
/// full path, the adapter by its last part: the same module): the losses must match PEFT's, and
/// the adapter the run exports must hold the trained projector under peft's names, which load
/// again.
#[test]
fn modules_to_save_losses_match_transformers_peft_adamw() {
    losses_match_then(
        SAVED_GOLDEN,
        SAVED_SETS,
        &saved_projector_trained_and_exported,
    );
}

/// The same from a 2-rank FSDP run (batch 1 per rank: the same global batch): each rank's model
/// skeleton takes the projector from the adapter, not from model.path, and slices it into its
/// fp32 shards as it slices the factors.
#[test]
fn modules_to_save_under_fsdp_losses_match_transformers_peft_adamw() {
    let mut sets = SAVED_SETS.to_vec();
    sets.extend(["fsdp.enabled=true", "train.batch_size=1"]);
    losses_match_at(
        2,
        SAVED_GOLDEN,
        &sets,
        &saved_projector_trained_and_exported,
    );
}

const SAVED_GOLDEN: &str = "golden_losses_saved.json";
const SAVED_SETS: &[&str] = &[
    "peft.init_from=tests/fixtures/train/adapter_saved",
    "peft.modules_to_save=[model.multi_modal_projector]",
];

/// The adapter a `SAVED_SETS` run exports names its module to save as the config does and holds
/// the trained projector, which loads again.
fn saved_projector_trained_and_exported(out: &std::path::Path) {
    {
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["modules_to_save"],
            json!(["model.multi_modal_projector"])
        );
        let exported: std::collections::HashMap<String, tch::Tensor> =
            tch::Tensor::read_safetensors(out.join("adapter_model.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let start: std::collections::HashMap<String, tch::Tensor> = tch::Tensor::read_safetensors(
            repo().join("tests/fixtures/train/adapter_saved/adapter_model.safetensors"),
        )
        .unwrap()
        .into_iter()
        .collect();
        let key = "base_model.model.model.multi_modal_projector.weight";
        assert!(
            !exported[key].equal(&start[key]),
            "the projector did not train"
        );
        let mut model = MllamaModel::load(
            &repo().join("tests/fixtures/train/model"),
            LoadOptions::default(),
        )
        .unwrap();
        model.load_adapter(out).unwrap();
        assert!(model.multi_modal_projector.weight.equal(&exported[key]));
    }
}

/// `trainer train` on the golden fixture config with `sets` gives the per-step losses of
/// tests/fixtures/train/`file` within 1e-4 relative.
fn losses_match(file: &str, sets: &[&str]) {
    losses_match_then(file, sets, &|_| {});
}

/// `losses_match`, then `check` on the run's output_dir.
fn losses_match_then(file: &str, sets: &[&str], check: &dyn Fn(&std::path::Path)) {
    losses_match_at(1, file, sets, check);
}

/// `losses_match_then` from `world` ranks (through the launcher when more than one).
fn losses_match_at(world: usize, file: &str, sets: &[&str], check: &dyn Fn(&std::path::Path)) {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/train").join(file)).unwrap(),
    )
    .unwrap();
    let want: Vec<f64> = golden["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let out = std::env::temp_dir().join(format!(
        "train-{}-w{world}-{}",
        file.trim_end_matches(".json"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = match world {
        1 => Command::new(env!("CARGO_BIN_EXE_trainer")),
        w => {
            let mut c = common::launcher();
            c.args(["--standalone", "--nproc-per-node", &w.to_string(), "--"]);
            c.arg(env!("CARGO_BIN_EXE_trainer"));
            c
        }
    };
    let o = cmd
        .current_dir(repo())
        .args(["train", "tests/fixtures/train/train.yaml"])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .arg("--set")
        .arg(format!("train.output_dir={}", out.display()))
        .args([
            "--set",
            &format!("checkpoint.dir={}", out.join("ckpt").display()),
        ])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m.get("step").is_some() && m.get("loss").is_some())
        .map(|m| m["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "steps: {got:?}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel < 1e-4,
            "step {}: ours {g} vs PyTorch {w} (relative {rel:e})",
            i + 1
        );
    }
    check(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// Runs `trainer train` on the golden fixture config with `sets`, expecting it to stop with exit
/// code 1 before training, and that stderr holds each of `wants`.
fn refused(name: &str, sets: &[&str], wants: &[&str]) {
    let out = std::env::temp_dir().join(format!("train-golden-{name}-{}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.current_dir(repo())
        .args(["train", "tests/fixtures/train/train.yaml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd
        .arg("--set")
        .arg(format!("train.output_dir={}", out.display()))
        .arg("--set")
        .arg(format!("checkpoint.dir={}", out.join("ckpt").display()))
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    for want in wants {
        assert!(stderr.contains(want), "missing {want:?} in\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
}

/// An init_from adapter whose r / alpha / target layers / scaling differ from the peft config is
/// refused before training
/// (training would run with the adapter's values while checkpoints and export record the config's).
#[test]
fn init_from_adapter_must_match_the_peft_config() {
    refused(
        "mismatch",
        &[
            "peft.r=8",
            "peft.alpha=16",
            "peft.target_modules=[q_proj, fc1]",
            "peft.use_rslora=true",
        ],
        &[
            "peft.init_from tests/fixtures/train/adapter",
            "peft.r: adapter 4, config 8",
            "peft.alpha: adapter lora_alpha 8, config 16",
            "peft.target_modules: the adapter targets [\"q_proj\",\"v_proj\"]; layers only it \
             wraps: model.vision_model.transformer.layers.0.self_attn.v_proj and 5 more; only the \
             config's [\"q_proj\",\"fc1\"]: model.vision_model.transformer.layers.0.mlp.fc1 and 2 more",
            "peft.use_rslora: adapter false, config true",
            "set those peft keys to the adapter's values",
        ],
    );
}

/// Data that leaves no sample (every record longer than data.max_seq_len, skipped by default)
/// fails with the reasons and the keys that drop records, not "lower train.batch_size".
#[test]
fn no_usable_sample_names_the_reasons() {
    refused(
        "empty",
        &["data.max_seq_len=8"],
        &[
            "data.train tests/fixtures/train/train.jsonl: no usable sample",
            "12 of 12 records skipped (too long: 12)",
            "data.max_seq_len",
        ],
    );
}

/// fp16 training (no loss scaling here) is refused up front with the way out.
#[test]
fn fp16_training_is_refused() {
    refused(
        "fp16",
        &["model.dtype=fp16"],
        &["model.dtype: fp16 training needs loss scaling", "use bf16"],
    );
}

/// Patterns that give one module two ranks are refused when training starts from an adapter too
/// (peft would take the first in order, which the checkpoint's manifest does not keep).
#[test]
fn init_from_with_overlapping_patterns_is_refused() {
    refused(
        "overlap",
        &[
            "peft.init_from=tests/fixtures/train/adapter_patterns",
            "peft.target_modules=[q_proj, v_proj, gate_proj, fc1]",
            "peft.rank_pattern={gate_proj: 2, 'layers\\.1\\.self_attn\\.q_proj': 6, self_attn.q_proj: 4}",
            "peft.alpha_pattern={v_proj: 16, cross_attn.q_proj: 4}",
            "peft.exclude_modules=[global_transformer.layers.0.mlp.fc1]",
            "peft.layers_to_transform=[0, 1]",
            "peft.layers_pattern=layers",
        ],
        &[
            "peft: rank_pattern: \"layers\\\\.1\\\\.self_attn\\\\.q_proj\" gives \
             model.vision_model.transformer.layers.1.self_attn.q_proj 6, \"self_attn.q_proj\" \
             gives it 4: patterns that give a module different values must not overlap",
        ],
    );
}

/// An init_from adapter whose DoRA, patterns and modules to save the peft section does not
/// give is refused naming each key.
#[test]
fn init_from_adapter_options_must_match() {
    refused(
        "dora",
        &["peft.init_from=tests/fixtures/peft_variants/dora"],
        &[
            "peft.init_from tests/fixtures/peft_variants/dora: its adapter_config.json differs \
             from the peft config",
            "peft.modules_to_save: the adapter's [\"transformer.layers.1.self_attn.o_proj\"] save \
             [\"model.vision_model.transformer.layers.1.self_attn.o_proj\"], the config's [] save []",
            "peft.use_dora: adapter true, config false",
            "peft.rank_pattern / peft.alpha_pattern:",
        ],
    );
}
