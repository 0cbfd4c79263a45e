//! Config schema: every key parses, every default, the shipped configs, YAML round trip.
use std::path::{Path, PathBuf};

use trainer::config::{
    self, Attention, Backend, BadRecords, Config, DType, DataFiles, LengthPolicy, LoraTargets,
    PeftMethod, Resume, ScheduleKind, TextOnly,
};

/// The two keys without a default; everything else is left out.
const MINIMAL: &str = "model: {path: m}\ndata: {train: t.jsonl}\n";

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn minimal() -> Config {
    config::parse(MINIMAL, &[]).expect("minimal config")
}

#[test]
fn every_default() {
    let c = minimal();

    assert_eq!(c.model.path, PathBuf::from("m"));
    assert_eq!(c.model.dtype, DType::Bf16);
    assert_eq!(c.model.attention, Attention::Sdpa);

    assert_eq!(c.peft.method, PeftMethod::Lora);
    assert_eq!(c.peft.r, 8);
    assert_eq!(c.peft.alpha, 32.0);
    assert_eq!(c.peft.dropout, 0.05);
    assert_eq!(
        c.peft.target_modules,
        LoraTargets::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(c.peft.init_from, None);

    assert_eq!(c.data.train, DataFiles::one("t.jsonl"));
    assert_eq!(c.data.eval, None);
    assert_eq!(c.data.image_root, None);
    assert_eq!(c.data.max_seq_len, 4096);
    assert_eq!(c.data.max_seq_len_policy, LengthPolicy::Skip);
    assert_eq!(c.data.num_workers, 2);
    assert_eq!(c.data.bad_records, BadRecords::Error);
    assert_eq!(c.data.text_only, TextOnly::Skip);
    assert!(!c.data.double_bos);
    assert_eq!(c.data.supervise, trainer::config::Supervise::All);

    assert_eq!(c.train.epochs, 3);
    assert_eq!(c.train.batch_size, 4);
    assert_eq!(c.train.grad_accum, 1);
    assert_eq!(c.train.lr, 1e-5);
    assert_eq!(c.train.weight_decay, 0.0);
    assert_eq!(
        (c.train.adam_beta1, c.train.adam_beta2, c.train.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(c.train.schedule.kind, ScheduleKind::Step);
    assert_eq!(c.train.schedule.gamma, 0.85);
    assert_eq!(c.train.schedule.warmup_steps, 0);
    assert_eq!(c.train.schedule.min_lr_ratio, 0.0);
    assert_eq!(c.train.grad_clip, None);
    assert_eq!(c.train.max_steps, 0);
    assert_eq!(c.train.seed, 42);
    assert!(!c.train.validate);
    assert_eq!(c.train.log_every, 1);
    assert_eq!(c.train.output_dir, PathBuf::from("./finetuned_model"));
    assert_eq!(c.train.skip_nonfinite, 0);
    assert_eq!(c.train.eval_every_steps, 0);

    assert!(c.fsdp.enabled);
    assert_eq!(c.fsdp.backend, Backend::Auto);
    assert_eq!(c.fsdp.mixed_precision, DType::Bf16);
    assert!(c.fsdp.activation_checkpointing);
    assert!(c.fsdp.prefetch);

    assert_eq!(
        c.checkpoint.dir,
        PathBuf::from("./finetuned_model/fine-tuned")
    );
    assert_eq!(c.checkpoint.every_steps, 0);
    assert_eq!(c.checkpoint.keep_last, 2);
    assert_eq!(c.checkpoint.resume, Resume::Auto);
    assert!(c.checkpoint.async_save);
}

/// Every key set to something other than its default.
const FULL: &str = r#"
model:
  path: /models/llava-cot
  dtype: fp16
  attention: fused
peft:
  method: lora
  r: 16
  alpha: 16.5
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
  init_from: adapters/start
data:
  train: d/train.jsonl
  eval: d/val.jsonl
  image_root: d/images
  max_seq_len: 2048
  max_seq_len_policy: truncate
  num_workers: 0
  bad_records: skip
  text_only: keep
  double_bos: true
  supervise: last
train:
  epochs: 1
  batch_size: 2
  grad_accum: 8
  lr: 2e-4
  weight_decay: 0.1
  adam_beta1: 0.8
  adam_beta2: 0.95
  adam_epsilon: 1e-6
  schedule: {kind: cosine, gamma: 0.5, warmup_steps: 100, min_lr_ratio: 0.1}
  grad_clip: 1.0
  max_steps: 500
  seed: 7
  validate: true
  log_every: 10
  output_dir: runs/x
  skip_nonfinite: 3
  eval_every_steps: 500
fsdp:
  enabled: false
  backend: nccl
  mixed_precision: fp32
  activation_checkpointing: false
  prefetch: false
checkpoint:
  dir: runs/x/ckpt
  every_steps: 250
  keep_last: 0
  resume: runs/old/step-000100
  async: false
"#;

#[test]
fn every_key_parses() {
    let c = config::parse(FULL, &[]).expect("full config");

    assert_eq!(c.model.path, PathBuf::from("/models/llava-cot"));
    assert_eq!(c.model.dtype, DType::Fp16);
    assert_eq!(c.model.attention, Attention::Fused);

    assert_eq!(c.peft.method, PeftMethod::Lora);
    assert_eq!(c.peft.r, 16);
    assert_eq!(c.peft.alpha, 16.5);
    assert_eq!(c.peft.dropout, 0.0);
    assert_eq!(
        c.peft.target_modules,
        LoraTargets::Names(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec()
        )
    );
    assert_eq!(c.peft.init_from, Some(PathBuf::from("adapters/start")));

    assert_eq!(c.data.train, DataFiles::one("d/train.jsonl"));
    assert_eq!(c.data.eval, Some(DataFiles::one("d/val.jsonl")));
    assert_eq!(c.data.image_root, Some(PathBuf::from("d/images")));
    assert_eq!(c.data.max_seq_len, 2048);
    assert_eq!(c.data.max_seq_len_policy, LengthPolicy::Truncate);
    assert_eq!(c.data.num_workers, 0);
    assert_eq!(c.data.bad_records, BadRecords::Skip);
    assert_eq!(c.data.text_only, TextOnly::Keep);
    assert!(c.data.double_bos);
    assert_eq!(c.data.supervise, trainer::config::Supervise::Last);

    assert_eq!(c.train.epochs, 1);
    assert_eq!(c.train.batch_size, 2);
    assert_eq!(c.train.grad_accum, 8);
    assert_eq!(c.train.lr, 2e-4);
    assert_eq!(c.train.weight_decay, 0.1);
    assert_eq!(
        (c.train.adam_beta1, c.train.adam_beta2, c.train.adam_epsilon),
        (0.8, 0.95, 1e-6)
    );
    // ... and AdamW is built with them
    let adam = trainer::optim::AdamWConfig::for_training(&c).to_json();
    assert_eq!(adam["betas"], serde_json::json!([0.8, 0.95]));
    assert_eq!(adam["eps"], serde_json::json!(1e-6));
    assert_eq!(c.train.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.train.schedule.gamma, 0.5);
    assert_eq!(c.train.schedule.warmup_steps, 100);
    assert_eq!(c.train.schedule.min_lr_ratio, 0.1);
    assert_eq!(c.train.grad_clip, Some(1.0));
    assert_eq!(c.train.max_steps, 500);
    assert_eq!(c.train.seed, 7);
    assert!(c.train.validate);
    assert_eq!(c.train.log_every, 10);
    assert_eq!(c.train.output_dir, PathBuf::from("runs/x"));
    assert_eq!(c.train.skip_nonfinite, 3);
    assert_eq!(c.train.eval_every_steps, 500);

    assert!(!c.fsdp.enabled);
    assert_eq!(c.fsdp.backend, Backend::Nccl);
    assert_eq!(c.fsdp.mixed_precision, DType::Fp32);
    assert!(!c.fsdp.activation_checkpointing);
    assert!(!c.fsdp.prefetch);

    assert_eq!(c.checkpoint.dir, PathBuf::from("runs/x/ckpt"));
    assert_eq!(c.checkpoint.every_steps, 250);
    assert_eq!(c.checkpoint.keep_last, 0);
    assert_eq!(
        c.checkpoint.resume,
        Resume::From(PathBuf::from("runs/old/step-000100"))
    );
    assert_eq!(
        c.checkpoint.resume.path(),
        Some(Path::new("runs/old/step-000100"))
    );
    assert!(!c.checkpoint.async_save);
}

#[test]
fn every_enum_value_parses() {
    let cases: &[(&str, &str)] = &[
        ("model.dtype", "bf16"),
        ("model.dtype", "fp32"),
        ("model.attention", "eager"),
        ("model.attention", "sdpa"),
        ("peft.method", "none"),
        ("data.max_seq_len_policy", "skip"),
        ("data.max_seq_len_policy", "error"),
        ("data.bad_records", "error"),
        ("data.text_only", "skip"),
        ("train.schedule.kind", "step"),
        ("fsdp.backend", "auto"),
        ("fsdp.backend", "cpu"),
        ("fsdp.mixed_precision", "bf16"),
        ("fsdp.mixed_precision", "fp16"),
        ("checkpoint.resume", "never"),
        ("checkpoint.resume", "auto"),
    ];
    for (key, value) in cases {
        let c = config::parse(MINIMAL, &[format!("{key}={value}")])
            .unwrap_or_else(|e| panic!("{key}={value}: {e}"));
        // The printed config shows the value back under its key.
        let yaml = c.to_yaml().expect("to_yaml");
        let leaf = key.rsplit('.').next().unwrap_or(key);
        assert!(
            yaml.contains(&format!("{leaf}: {value}")),
            "{key}={value}:\n{yaml}"
        );
    }
    let full = config::parse(MINIMAL, &["peft.method=none".into()]).expect("none");
    assert!(!full.peft.is_lora());
}

#[test]
fn empty_sections_take_defaults() {
    let text = "model: {path: m}\ndata: {train: t}\npeft:\ntrain:\n  schedule:\n";
    let c = config::parse(text, &[]).expect("null sections");
    assert_eq!(c.peft, minimal().peft);
    assert_eq!(c.train, minimal().train);
}

#[test]
fn scalars_are_text_where_text_is_expected() {
    let c = config::parse(
        "model: {path: 2024}\ndata: {train: t, image_root: true}\n",
        &[],
    )
    .expect("numeric path");
    assert_eq!(c.model.path, PathBuf::from("2024"));
    assert_eq!(c.data.image_root, Some(PathBuf::from("true")));
}

#[test]
fn derived_facts() {
    let c = minimal();
    assert_eq!(c.peft.lora_scaling(), 4.0);
    assert_eq!(c.train.global_batch(1), 4);
    assert_eq!(c.train.global_batch(2), 8);
    assert_eq!(c.train.step_limit(), None);

    // world 2 x batch 2 sees the same samples per step as world 1 x batch 4.
    let split = config::parse(MINIMAL, &["train.batch_size=2".into()]).expect("batch 2");
    assert_eq!(split.train.global_batch(2), c.train.global_batch(1));

    let c = config::parse(
        MINIMAL,
        &[
            "train.grad_accum=4".into(),
            "train.max_steps=9".into(),
            "peft.r=16".into(),
        ],
    )
    .expect("overrides");
    assert_eq!(c.train.global_batch(2), 32);
    assert_eq!(c.train.step_limit(), Some(9));
    assert_eq!(c.peft.lora_scaling(), 2.0);
    let rs = config::parse(MINIMAL, &["peft={r: 16, use_rslora: true}".into()]).expect("rslora");
    assert_eq!(rs.peft.lora_scaling(), 8.0); // alpha 32 / sqrt(16)
}

#[test]
fn llava_sco_config_reproduces_the_seed() {
    let c = config::load(&configs_dir().join("llava-sco.yaml"), &[]).expect("llava-sco.yaml");
    assert_eq!(c.model.path, PathBuf::from("models/Llama-3.2V-11B-cot"));
    assert_eq!(c.model.attention, Attention::Sdpa);
    assert!(c.fsdp.enabled);
    assert_eq!(c.peft.method, PeftMethod::Lora);
    assert_eq!((c.peft.r, c.peft.alpha, c.peft.dropout), (8, 32.0, 0.05));
    assert_eq!(
        c.peft.target_modules,
        LoraTargets::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(c.train.lr, 1e-5);
    assert_eq!(c.train.epochs, 3);
    assert_eq!(c.train.batch_size, 4);
    assert_eq!(c.train.global_batch(2), 8);
    assert!(!c.train.validate);
    assert_eq!(c.data.eval, None);
    assert_eq!(
        c.checkpoint.dir,
        PathBuf::from("./finetuned_model/fine-tuned")
    );
    assert_eq!(c.data.train, DataFiles::one("data/llava-sco-100k.jsonl"));
    assert!(c.data.image_root.is_some());
    // The file spells out llama-recipes' defaults: it must agree with ours.
    let mut spelled = minimal();
    spelled.model = c.model.clone();
    spelled.data.train = c.data.train.clone();
    spelled.data.image_root = c.data.image_root.clone();
    assert_eq!(c, spelled);
}

#[test]
fn demo_config_loads() {
    let c = config::load(&configs_dir().join("demo.yaml"), &[]).expect("demo.yaml");
    assert_eq!(c.model.path, PathBuf::from("data/demo/model"));
    assert_eq!(c.data.train, DataFiles::one("data/demo/train.jsonl"));
    assert_eq!(c.data.eval, Some(DataFiles::one("data/demo/val.jsonl")));
    assert_eq!(c.data.image_root, Some(PathBuf::from("data/demo/images")));
    assert_eq!(c.data.max_seq_len, 256);
    assert_eq!(c.fsdp.backend, Backend::Cpu);
    assert_eq!(c.fsdp.mixed_precision, DType::Fp32);
    assert_eq!(
        (c.train.batch_size, c.train.epochs, c.train.lr),
        (4, 1, 2e-3)
    );
    assert_eq!(c.train.max_steps, 160);
    assert!(c.train.validate);
    assert_eq!(c.train.output_dir, PathBuf::from("runs/demo"));
    assert_eq!(c.checkpoint.dir, PathBuf::from("runs/demo/checkpoints"));
    assert_eq!(c.checkpoint.every_steps, 160);
}

/// `to_yaml` prints every key, and loading it back gives the same config.
#[test]
fn to_yaml_round_trips() {
    let sources = [
        config::parse(MINIMAL, &[]).expect("minimal"),
        config::parse(FULL, &[]).expect("full"),
        config::load(&configs_dir().join("llava-sco.yaml"), &[]).expect("llava-sco"),
        config::load(&configs_dir().join("demo.yaml"), &[]).expect("demo"),
        config::parse(
            MINIMAL,
            &[
                r"peft.target_modules='.*\.(q|v)_proj'".into(),
                "peft.use_rslora=true".into(),
            ],
        )
        .expect("regex targets"),
        config::parse(
            MINIMAL,
            &[
                "data.train=[a.jsonl, b.jsonl, a.jsonl]".into(),
                "data.eval=[e.jsonl]".into(),
                "fsdp.sharding_strategy=no_shard".into(),
            ],
        )
        .expect("several data files"),
        config::parse(
            MINIMAL,
            &["train.weight_decay=1e20".into(), "train.lr=3.5e-7".into()],
        )
        .expect("exponents"),
    ];
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config_round_trip");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    for (i, c) in sources.iter().enumerate() {
        let yaml = c.to_yaml().expect("to_yaml");
        let file = dir.join(format!("config-{i}.yaml"));
        std::fs::write(&file, &yaml).expect("write");
        let back = config::load(&file, &[]).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(&back, c, "{yaml}");
        // exponents as YAML 1.1 (PyYAML) reads floats: a point and a signed exponent
        for line in yaml.lines() {
            let value = line.rsplit(": ").next().unwrap_or("");
            if let Some((mantissa, exp)) = value.split_once('e') {
                if mantissa.parse::<f64>().is_ok() && exp.parse::<i32>().is_ok() {
                    assert!(
                        mantissa.contains('.') && (exp.starts_with('-') || exp.starts_with('+')),
                        "{line}"
                    );
                }
            }
        }
    }
    let yaml = sources.last().unwrap().to_yaml().unwrap();
    assert!(
        yaml.contains("weight_decay: 1.0e+20") && yaml.contains("lr: 3.5e-7"),
        "{yaml}"
    );
}

#[test]
fn to_yaml_prints_every_key() {
    let yaml = minimal().to_yaml().expect("to_yaml");
    for key in [
        "model:",
        "path:",
        "dtype:",
        "attention:",
        "peft:",
        "method:",
        "r:",
        "alpha:",
        "dropout:",
        "target_modules:",
        "use_rslora:",
        "init_from:",
        "freeze_llm_only:",
        "data:",
        "train:",
        "eval:",
        "image_root:",
        "max_seq_len:",
        "max_seq_len_policy:",
        "num_workers:",
        "bad_records:",
        "text_only:",
        "double_bos:",
        "supervise:",
        "epochs:",
        "batch_size:",
        "grad_accum:",
        "lr:",
        "weight_decay:",
        "adam_beta1:",
        "adam_beta2:",
        "adam_epsilon:",
        "schedule:",
        "kind:",
        "gamma:",
        "warmup_steps:",
        "min_lr_ratio:",
        "grad_clip:",
        "max_steps:",
        "seed:",
        "validate:",
        "log_every:",
        "tensorboard:",
        "output_dir:",
        "skip_nonfinite:",
        "eval_every_steps:",
        "fsdp:",
        "enabled:",
        "backend:",
        "mixed_precision:",
        "activation_checkpointing:",
        "prefetch:",
        "checkpoint:",
        "dir:",
        "every_steps:",
        "keep_last:",
        "resume:",
        "async:",
    ] {
        assert!(yaml.contains(key), "{key} missing from:\n{yaml}");
    }
}
