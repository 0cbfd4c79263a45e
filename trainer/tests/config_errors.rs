//! Config errors: each names the key path, the value and what is allowed, in full.
use std::path::Path;

use trainer::config::{self, LoraTargets};

const MINIMAL: &str = "model: {path: m}\ndata: {train: t.jsonl}\n";

/// The message for MINIMAL with one `--set`.
fn set_error(set: &str) -> String {
    match config::parse(MINIMAL, &[set.to_string()]) {
        Ok(_) => panic!("--set {set} was accepted"),
        Err(e) => e.to_string(),
    }
}

/// The message for MINIMAL plus `extra` YAML text.
fn yaml_error(extra: &str) -> String {
    match config::parse(&format!("{MINIMAL}{extra}"), &[]) {
        Ok(_) => panic!("accepted:\n{extra}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_types_name_key_value_and_what_is_allowed() {
    let cases = [
        (
            "train.lr=fast",
            r#"train.lr: expected a positive number, got "fast""#,
        ),
        (
            "train.epochs=three",
            r#"train.epochs: expected a positive integer, got "three""#,
        ),
        (
            "train.epochs=2.5",
            "train.epochs: expected a positive integer, got 2.5",
        ),
        (
            "train.validate=yes",
            r#"train.validate: expected a boolean, got "yes""#,
        ),
        (
            "train.seed=[1]",
            "train.seed: expected an integer >= 0, got a list",
        ),
        (
            "peft.target_modules=q_proj",
            r#"peft.target_modules: "q_proj" is a regular expression matched against whole module paths (as PEFT does), so it matches no layer; list names as [q_proj]"#,
        ),
        (
            "peft.target_modules='q_proj,v_proj'",
            r#"peft.target_modules: "q_proj,v_proj" is a regular expression matched against whole module paths (as PEFT does), so it matches no layer; list names as [q_proj, v_proj]"#,
        ),
        (
            "peft.target_modules=12",
            "peft.target_modules: expected a list of module names like [q_proj, v_proj], all-linear, or a regular expression, got 12",
        ),
        (
            "peft.target_modules=[q_proj, {a: 1}]",
            "peft.target_modules[1]: expected a module name, got a mapping",
        ),
        (
            "peft.target_modules=[q_proj, '']",
            r#"peft.target_modules[1]: expected a module name, got """#,
        ),
        (
            "model.path=[a, b]",
            "model.path: expected a path, got a list",
        ),
        ("model.path=''", r#"model.path: expected a path, got """#),
        (
            "train.output_dir=null",
            "train.output_dir: expected a path, got null",
        ),
        (
            "model.dtype=16",
            "model.dtype: expected one of bf16, fp16, fp32, got 16",
        ),
        (
            "train.schedule=cosine",
            r#"train.schedule: expected a section (a mapping of keys), got "cosine""#,
        ),
        (
            "checkpoint.resume=''",
            r#"checkpoint.resume: expected auto, never, or a checkpoint folder, got """#,
        ),
    ];
    for (set, message) in cases {
        assert_eq!(set_error(set), message, "--set {set}");
    }
}

/// `peft.target_modules` as PEFT takes it: a list, `all-linear` or a regular expression, which
/// is compiled while the config is read.
#[test]
fn target_modules_strings_are_checked_regexes() {
    let err = set_error(r"peft.target_modules='.*\.(q_proj'");
    assert!(
        err == r#"peft.target_modules: ".*\.(q_proj" is not a regular expression (unclosed group); a string is matched against whole module paths as PEFT does, names are listed as [q_proj, v_proj]"#,
        "{err}"
    );
    for (set, want) in [
        (
            "peft.target_modules=all-linear",
            LoraTargets::Pattern("all-linear".into()),
        ),
        (
            r"peft.target_modules='.*language_model.*\.(q|v)_proj'",
            LoraTargets::Pattern(r".*language_model.*\.(q|v)_proj".into()),
        ),
        (
            "peft.target_modules=[q_proj]",
            LoraTargets::Names(vec!["q_proj".into()]),
        ),
    ] {
        let c = config::parse(MINIMAL, &[set.into()]).unwrap_or_else(|e| panic!("{set}: {e}"));
        assert_eq!(c.peft.target_modules, want, "{set}");
    }
    assert_eq!(
        set_error("peft={method: none, use_rslora: true}"),
        "peft.use_rslora: scales a LoRA update; it needs peft.method: lora"
    );
}

#[test]
fn ranges_name_key_value_and_what_is_allowed() {
    let cases = [
        ("peft.r=0", "peft.r: expected a positive integer, got 0"),
        (
            "peft.alpha=0",
            "peft.alpha: expected a positive number, got 0",
        ),
        (
            "peft.dropout=1.5",
            "peft.dropout: expected a number in [0, 1), got 1.5",
        ),
        (
            "peft.dropout=1",
            "peft.dropout: expected a number in [0, 1), got 1",
        ),
        (
            "peft.dropout=-0.1",
            "peft.dropout: expected a number in [0, 1), got -0.1",
        ),
        (
            "data.max_seq_len=0",
            "data.max_seq_len: expected a positive integer, got 0",
        ),
        (
            "data.num_workers=-1",
            "data.num_workers: expected an integer from 0 to 256 (loader threads per rank; more \
             only contend for the cores), got -1",
        ),
        (
            "data.num_workers=100000",
            "data.num_workers: expected an integer from 0 to 256 (loader threads per rank; more \
             only contend for the cores), got 100000",
        ),
        (
            "train.epochs=0",
            "train.epochs: expected a positive integer, got 0",
        ),
        (
            "train.batch_size=0",
            "train.batch_size: expected a positive integer, got 0",
        ),
        (
            "train.grad_accum=0",
            "train.grad_accum: expected a positive integer, got 0",
        ),
        (
            "train.lr=-1e-5",
            "train.lr: expected a positive number, got -1e-5",
        ),
        ("train.lr=0", "train.lr: expected a positive number, got 0"),
        (
            "train.lr=.inf",
            "train.lr: expected a positive number, got inf",
        ),
        (
            "train.lr=.nan",
            "train.lr: expected a positive number, got NaN",
        ),
        (
            "train.weight_decay=-0.5",
            "train.weight_decay: expected a number >= 0, got -0.5",
        ),
        (
            "train.schedule.gamma=0",
            "train.schedule.gamma: expected a number in (0, 1], got 0",
        ),
        (
            "train.schedule.gamma=1.5",
            "train.schedule.gamma: expected a number in (0, 1], got 1.5",
        ),
        (
            "train.schedule.warmup_steps=-3",
            "train.schedule.warmup_steps: expected an integer >= 0, got -3",
        ),
        (
            "train.schedule.min_lr_ratio=2",
            "train.schedule.min_lr_ratio: expected a number in [0, 1], got 2",
        ),
        (
            "train.grad_clip=0",
            "train.grad_clip: expected a positive number (or null: no clipping), got 0",
        ),
        (
            "train.grad_clip=-1.0",
            "train.grad_clip: expected a positive number (or null: no clipping), got -1.0",
        ),
        (
            "train.max_steps=-1",
            "train.max_steps: expected an integer >= 0, got -1",
        ),
        (
            "train.seed=-42",
            "train.seed: expected an integer >= 0, got -42",
        ),
        (
            "train.log_every=0",
            "train.log_every: expected a positive integer, got 0",
        ),
        (
            "train.skip_nonfinite=-2",
            "train.skip_nonfinite: expected an integer >= 0, got -2",
        ),
        (
            "checkpoint.every_steps=-5",
            "checkpoint.every_steps: expected an integer >= 0, got -5",
        ),
        (
            "checkpoint.keep_last=-1",
            "checkpoint.keep_last: expected an integer >= 0, got -1",
        ),
    ];
    for (set, message) in cases {
        assert_eq!(set_error(set), message, "--set {set}");
    }
}

#[test]
fn enums_list_their_values() {
    let cases = [
        (
            "model.dtype=f32",
            r#"model.dtype: expected one of bf16, fp16, fp32, got "f32""#,
        ),
        (
            "model.attention=flash",
            r#"model.attention: expected one of eager, sdpa, fused, got "flash""#,
        ),
        (
            "peft.method=qlora",
            r#"peft.method: expected one of lora, none, got "qlora""#,
        ),
        (
            "data.max_seq_len_policy=cut",
            r#"data.max_seq_len_policy: expected one of truncate, skip, error, got "cut""#,
        ),
        (
            "data.bad_records=warn",
            r#"data.bad_records: expected one of error, skip, got "warn""#,
        ),
        (
            "data.text_only=drop",
            r#"data.text_only: expected one of skip, keep, got "drop""#,
        ),
        (
            "train.adam_beta2=1",
            "train.adam_beta2: expected a number in [0, 1), got 1",
        ),
        (
            "train.schedule.kind=exponential",
            r#"train.schedule.kind: expected one of step, cosine, linear, constant, got "exponential""#,
        ),
        (
            "fsdp.backend=gloo",
            r#"fsdp.backend: expected one of auto, nccl, cpu, got "gloo""#,
        ),
        (
            "fsdp.mixed_precision=fp8",
            r#"fsdp.mixed_precision: expected one of bf16, fp16, fp32, got "fp8""#,
        ),
        (
            "fsdp.enabled=on",
            r#"fsdp.enabled: expected a boolean, got "on""#,
        ),
        (
            "fsdp.sharding_strategy=zero3",
            r#"fsdp.sharding_strategy: expected one of full_shard, shard_grad_op, no_shard, hybrid_shard, hybrid_shard_zero2, got "zero3""#,
        ),
        (
            "fsdp.sharding_group_size=0",
            "fsdp.sharding_group_size: expected a positive integer, got 0",
        ),
    ];
    for (set, message) in cases {
        assert_eq!(set_error(set), message, "--set {set}");
    }
}

#[test]
fn unknown_keys_suggest_the_closest_valid_key() {
    assert_eq!(
        yaml_error("pef:\n  r: 8\n"),
        r#"pef: unknown key "pef" (did you mean "peft"?)"#
    );
    assert_eq!(
        yaml_error("train:\n  lrr: 1.0e-4\n"),
        r#"train.lrr: unknown key "lrr" (did you mean "lr"?)"#
    );
    assert_eq!(
        yaml_error("train:\n  schedule: {kind: cosine, warmup: 10}\n"),
        r#"train.schedule.warmup: unknown key "warmup" (did you mean "warmup_steps"?)"#
    );
    assert_eq!(
        yaml_error("checkpoint: {asynch: false}\n"),
        r#"checkpoint.asynch: unknown key "asynch" (did you mean "async"?)"#
    );
    // Nothing close: list what is valid at that level.
    assert_eq!(
        yaml_error("scheduler_zoo: {name: adamw}\n"),
        r#"scheduler_zoo: unknown key "scheduler_zoo" (valid keys: model, peft, data, train, fsdp, checkpoint)"#
    );
}

#[test]
fn unknown_keys_from_overrides_name_the_whole_key() {
    assert_eq!(
        set_error("pef.r=8"),
        r#"pef.r: unknown key "pef" (did you mean "peft"?)"#
    );
    assert_eq!(
        set_error("train.lrr=2e-5"),
        r#"train.lrr: unknown key "lrr" (did you mean "lr"?)"#
    );
    assert_eq!(
        set_error("fsdp.mixed_precison=bf16"),
        r#"fsdp.mixed_precison: unknown key "mixed_precison" (did you mean "mixed_precision"?)"#
    );
}

#[test]
fn required_keys_name_what_they_are() {
    assert_eq!(
        config::parse("data: {train: t}\n", &[])
            .unwrap_err()
            .to_string(),
        "model.path: required key is missing (the Hugging Face model folder)"
    );
    assert_eq!(
        config::parse("model: {path: m}\n", &[])
            .unwrap_err()
            .to_string(),
        "data.train: required key is missing (a JSONL file of training records, or a list of them)"
    );
    // null is "not given"; an empty file names the first missing key.
    assert_eq!(
        config::parse("model: {path: null}\ndata: {train: t}\n", &[])
            .unwrap_err()
            .to_string(),
        "model.path: required key is missing (the Hugging Face model folder)"
    );
    assert_eq!(
        config::parse("", &[]).unwrap_err().to_string(),
        "model.path: required key is missing (the Hugging Face model folder)"
    );
}

#[test]
fn rules_across_keys() {
    assert_eq!(
        set_error("train.validate=true"),
        "train.validate: validation needs data.eval (a JSONL file of validation records); \
         set data.eval or train.validate: false"
    );
    assert_eq!(
        set_error("train.schedule.warmup_steps=100"),
        "train.schedule.warmup_steps: 100 warmup steps, but kind step does not warm up \
         (cosine, linear and constant do); set train.schedule.kind: cosine or warmup_steps: 0"
    );
    assert_eq!(
        set_error("train.schedule.min_lr_ratio=0.1"),
        "train.schedule.min_lr_ratio: 0.1, but kind step has no floor (it multiplies by \
         gamma each epoch; cosine and linear decay to one); set train.schedule.kind: cosine or \
         min_lr_ratio: 0"
    );
    assert_eq!(
        set_error("peft.freeze_llm_only=true"),
        "peft.freeze_llm_only: is for full finetuning (peft.method: none); LoRA trains only its \
         factors (choose them with peft.target_modules)"
    );
    assert_eq!(
        set_error("train.eval_every_steps=100"),
        "train.eval_every_steps: 100, but train.validate is false; set train.validate: true (with \
         data.eval) or eval_every_steps: 0"
    );
    assert_eq!(
        set_error("train={validate: true, eval_every_steps: 100}"),
        "train.eval_every_steps: 100 needs periodic checkpoints (checkpoint.every_steps is 0): \
         each validated step needs its checkpoint; set checkpoint.every_steps to 100 or a divisor \
         of it"
    );
    let sets = [
        "train={validate: true, eval_every_steps: 100}".to_string(),
        "checkpoint.every_steps=30".to_string(),
    ];
    assert_eq!(
        config::parse(MINIMAL, &sets).unwrap_err().to_string(),
        "train.eval_every_steps: 100 must be a multiple of checkpoint.every_steps (30): each \
         validated step needs its checkpoint; set checkpoint.every_steps to 100 or a divisor of it"
    );
    assert_eq!(
        set_error("train.schedule={kind: constant, min_lr_ratio: 0.1}"),
        "train.schedule.min_lr_ratio: 0.1, but kind constant does not decay; set \
         train.schedule.kind: linear or cosine, or min_lr_ratio: 0"
    );
    assert_eq!(
        set_error("peft.target_modules=[]"),
        "peft.target_modules: expected at least one module name for LoRA, like [q_proj, v_proj], got []"
    );
    let err = config::parse(
        MINIMAL,
        &["peft.method=none".into(), "peft.init_from=adapter/".into()],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "peft.init_from: starting from an adapter needs peft.method: lora \
         (method none trains every weight and has no adapter)"
    );
    // The same keys are fine where the rule holds.
    config::parse(
        MINIMAL,
        &["peft.method=none".into(), "peft.target_modules=[]".into()],
    )
    .expect("full finetuning needs no target modules");
    config::parse(
        MINIMAL,
        &[
            "train.schedule.kind=cosine".into(),
            "train.schedule.warmup_steps=100".into(),
        ],
    )
    .expect("cosine warms up");
    config::parse(
        MINIMAL,
        &[
            "train.schedule.kind=cosine".into(),
            "train.schedule.min_lr_ratio=0.1".into(),
        ],
    )
    .expect("cosine decays to a floor");
}

#[test]
fn files() {
    let missing = Path::new("no/such/config.yaml");
    assert_eq!(
        config::load(missing, &[]).unwrap_err().to_string(),
        "no/such/config.yaml: config file does not exist"
    );

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config_errors");
    std::fs::create_dir_all(&dir).expect("tmp dir");

    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "model:\n  path: m\n data: oops\n").expect("write");
    let message = config::load(&broken, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("{}: invalid YAML: ", broken.display()))
            && message.contains("at line 3 column 2"),
        "{message}"
    );

    let list = dir.join("list.yaml");
    std::fs::write(&list, "- model\n- data\n").expect("write");
    assert_eq!(
        config::load(&list, &[]).unwrap_err().to_string(),
        format!(
            "{}: expected a mapping of sections (model, peft, data, train, fsdp, checkpoint), got a list",
            list.display()
        )
    );

    // A folder exists but is not a readable file.
    let message = config::load(&dir, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read config file: ", dir.display())),
        "{message}"
    );
}

#[test]
fn yaml_oddities() {
    assert_eq!(
        yaml_error("train: {lr: !fast 1}\n"),
        "train.lr: YAML tags are not supported (found !fast)"
    );
    assert_eq!(
        yaml_error("train: {1: 2}\n"),
        "train.1: unknown key \"1\" (valid keys: epochs, batch_size, grad_accum, drop_last, lr, weight_decay, \
         adam_beta1, adam_beta2, adam_epsilon, schedule, grad_clip, max_steps, seed, validate, \
         log_every, tensorboard, output_dir, save_adapter, skip_nonfinite, eval_every_steps, \
         val_batch_size, max_eval_samples, peak_tflops)"
    );
    assert_eq!(
        yaml_error("train: {null: 1}\n"),
        "train: expected text keys, got the key null"
    );
    assert_eq!(
        yaml_error("train: {lr: 1.0e-5, lr: 2.0e-5}\n"),
        r#"<string>: invalid YAML: train: duplicate entry with key "lr" at line 3 column 8"#
    );
    assert_eq!(
        yaml_error("fsdp: [a]\n"),
        "fsdp: expected a section (a mapping of keys), got a list"
    );
}

/// Words other tools use for "the latest" or "none", YAML's booleans and a miscapitalised keyword
/// are refused, not taken as a folder name (the run would load the model before finding no
/// checkpoint there); a folder of such a name is written `./NAME`.
#[test]
fn resume_keywords_of_other_tools_are_refused() {
    for (word, meant) in [
        ("latest", "auto"),
        ("Auto", "auto"),
        ("true", "auto"),
        ("false", "never"),
        ("none", "never"),
    ] {
        let err = set_error(&format!("checkpoint.resume={word}"));
        assert_eq!(
            err,
            format!("checkpoint.resume: expected auto, never, or a checkpoint folder, got \"{word}\" (did you mean {meant}? a folder of that name is ./{word})")
        );
    }
    let ok = config::parse(MINIMAL, &["checkpoint.resume=./latest".to_string()]).unwrap();
    assert_eq!(ok.checkpoint.resume.path(), Some(Path::new("./latest")));
}

/// A key's error in a file names the file, and the `--set` the value came from.
#[test]
fn file_errors_name_the_file_and_the_override() {
    let dir = std::env::temp_dir().join(format!("config-errors-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.yaml");
    std::fs::write(&path, format!("{MINIMAL}train: {{lr: -1}}\n")).unwrap();
    let err = config::load(&path, &[]).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: train.lr: expected a positive number, got -1",
            path.display()
        )
    );
    let err = config::load(&path, &["train.lr=fast".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            r#"train.lr: expected a positive number, got "fast" (from --set train.lr=fast)"#
        ),
        "{err}"
    );
    // an element of a list set on the command line: the --set is named too
    std::fs::write(&path, MINIMAL).unwrap();
    let set = r#"peft.target_modules=[q_proj, ""]"#;
    let err = config::load(&path, &[set.to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("peft.target_modules[1]") && err.ends_with(&format!("(from --set {set})")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Text fields take plain numbers as their text (`output_dir: 2024`), but not fractions: YAML
/// has parsed them, so `2024.10` would become the folder `2024.1`.
#[test]
fn a_fraction_where_text_belongs_asks_for_quotes() {
    let err = set_error("train.output_dir=2024.10");
    assert!(
        err.starts_with("train.output_dir: expected text (YAML read a number here")
            && err.contains("quote it")
            && err.contains("got the number 2024.1"),
        "{err}"
    );
    let c = config::parse(MINIMAL, &["train.output_dir=2024".to_string()]).unwrap();
    assert_eq!(c.train.output_dir, std::path::PathBuf::from("2024"));
    let c = config::parse(MINIMAL, &["train.output_dir=\"2024.10\"".to_string()]).unwrap();
    assert_eq!(c.train.output_dir, std::path::PathBuf::from("2024.10"));
    // data files, alone or listed, the same way
    let c = config::parse(MINIMAL, &["data.train=2024".to_string()]).unwrap();
    assert_eq!(c.data.train, config::DataFiles::one("2024"));
    let c = config::parse(MINIMAL, &["data.train=[2024, true]".to_string()]).unwrap();
    assert_eq!(
        c.data.train.files(),
        ["2024", "true"].map(std::path::PathBuf::from)
    );
    for set in ["data.train=2024.10", "data.train=[a, 2024.10]"] {
        let err = set_error(set);
        assert!(err.contains("quote it") && err.contains("2024.1"), "{err}");
    }
}

/// YAML merge keys (`<<: *anchor`) are resolved as PyYAML resolves them.
#[test]
fn merge_keys_are_resolved() {
    let c = config::parse(
        "model: {path: m}\ndata: {train: t.jsonl}\ntrain: &t {epochs: 2}\nfsdp: {}\npeft: {<<: {r: 16}, alpha: 8}\n",
        &[],
    )
    .unwrap();
    assert_eq!((c.peft.r, c.peft.alpha, c.train.epochs), (16, 8.0, 2));
}

/// PyTorch's upper-case `ShardingStrategy` names (also as llama-recipes prints them) are read as ours.
#[test]
fn sharding_strategies_take_pytorch_spellings() {
    for (text, want) in [
        ("full_shard", config::ShardingStrategy::FullShard),
        ("SHARD_GRAD_OP", config::ShardingStrategy::ShardGradOp),
        ("NO_SHARD", config::ShardingStrategy::NoShard),
        (
            "ShardingStrategy.NO_SHARD",
            config::ShardingStrategy::NoShard,
        ),
        (
            "ShardingStrategy.HYBRID_SHARD",
            config::ShardingStrategy::HybridShard,
        ),
        // (PyTorch's private name, with its underscore)
        (
            "ShardingStrategy._HYBRID_SHARD_ZERO2",
            config::ShardingStrategy::HybridShardZero2,
        ),
        (
            "hybrid_shard_zero2",
            config::ShardingStrategy::HybridShardZero2,
        ),
    ] {
        let c = config::parse(MINIMAL, &[format!("fsdp.sharding_strategy={text}")]).unwrap();
        assert_eq!(c.fsdp.sharding_strategy, want, "{text}");
    }
    let c = config::parse(MINIMAL, &[]).unwrap();
    assert_eq!(
        c.fsdp.sharding_strategy,
        config::ShardingStrategy::FullShard
    );
}

/// hybrid_shard's shard groups: `sharding_group_size`, else the world over `replica_group_size`,
/// else a node's ranks (as PyTorch's HYBRID_SHARD); sizes that do not make up the world are
/// errors naming the key.
#[test]
fn hybrid_shard_group_sizes_resolve_as_llama_recipes_names_them() {
    let fsdp = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        config::parse(MINIMAL, &sets).unwrap().fsdp
    };
    let hybrid = "fsdp.sharding_strategy=hybrid_shard";
    // 8 ranks, 4 per node
    assert_eq!(fsdp(&[hybrid]).shard_group_size(8, 4), Ok(4));
    let g2 = fsdp(&[hybrid, "fsdp.sharding_group_size=2"]);
    assert_eq!(g2.shard_group_size(8, 4), Ok(2));
    let r4 = fsdp(&[hybrid, "fsdp.replica_group_size=4"]);
    assert_eq!(r4.shard_group_size(8, 8), Ok(2));
    let both = fsdp(&[
        hybrid,
        "fsdp.sharding_group_size=2",
        "fsdp.replica_group_size=4",
    ]);
    assert_eq!(both.shard_group_size(8, 4), Ok(2));
    // each error names the key at fault (`config::in_file` blames its --set)
    let (key, err) = both.shard_group_size(16, 4).unwrap_err();
    assert_eq!(key, "fsdp.replica_group_size");
    assert!(err.contains("4 x sharding_group_size 2"), "{err}");
    let (key, err) = fsdp(&[hybrid, "fsdp.sharding_group_size=3"])
        .shard_group_size(8, 4)
        .unwrap_err();
    assert_eq!(key, "fsdp.sharding_group_size");
    assert!(err.contains("3 does not divide the 8 ranks"), "{err}");
    let (key, err) = fsdp(&[hybrid, "fsdp.replica_group_size=3"])
        .shard_group_size(8, 4)
        .unwrap_err();
    assert_eq!(key, "fsdp.replica_group_size");
    assert!(err.contains("3 does not divide"), "{err}");
}

/// llama-recipes', PEFT's and transformers' names for our keys (docs/config.md's last column)
/// are answered with our key, wherever it sits.
#[test]
fn other_tools_names_are_answered_with_ours() {
    for (set, ours) in [
        ("train.num_epochs=2", "train.epochs"),
        ("train.gradient_accumulation_steps=4", "train.grad_accum"),
        ("peft.lora_alpha=16", "peft.alpha"),
        ("train.enable_fsdp=true", "fsdp.enabled"),
        ("train.warmup_steps=10", "train.schedule.warmup_steps"),
        (
            "train.max_train_step=3",
            "train.max_steps, which counts optimizer steps, not micro-batches",
        ),
    ] {
        let e = set_error(set);
        assert!(
            e.contains(&format!(
                "that is llama-recipes', PEFT's or transformers' name; here it is {ours}"
            )),
            "{set}: {e}"
        );
    }
    // a typo of one of ours is still a typo
    assert!(set_error("train.epoch=2").contains("did you mean \"epochs\"?"));
    // llama-recipes' names of what has no key here say so
    set_errors_say([
        (
            "batching_strategy=packing",
            "no key: batches are always padded",
        ),
        (
            "quantization=true",
            "no key: quantized (4-bit or 8-bit) training",
        ),
        (
            "fsdp_cpu_offload=true",
            "no key: parameters and optimizer state stay",
        ),
        (
            "pure_bf16=true",
            "here it is fsdp.mixed_precision: bf16, the nearest",
        ),
        // (these got only the list of valid keys, or "did you mean checkpoint?")
        (
            "lora_config.r=8",
            "here it is peft (lora_config's r, lora_alpha",
        ),
        (
            "checkpoint_type=FULL_STATE_DICT",
            "no key: checkpoints are always sharded",
        ),
        (
            "save_optimizer=true",
            "no key: checkpoints always hold the optimizer state",
        ),
        ("optimizer=AdamW", "no key: the optimizer is AdamW"),
        (
            "num_freeze_layers=2",
            "no key: freezing a number of layers is not offered",
        ),
        (
            "one_gpu=true",
            "no key: the launcher's --nproc-per-node sets the ranks",
        ),
        (
            "low_cpu_fsdp=true",
            "no key: every rank always reads only its own shard",
        ),
        ("use_profiler=true", "no key: no profiler is built in"),
        (
            "flop_counter=true",
            "no key: the log and metrics.jsonl report TFLOP/s and MFU",
        ),
        (
            "save_metrics=true",
            "no key: metrics.jsonl in train.output_dir is always written",
        ),
    ]);
}

/// Each `--set` fails with an error that says its text.
fn set_errors_say<S: AsRef<str>>(cases: impl IntoIterator<Item = (&'static str, S)>) {
    for (set, says) in cases {
        let e = set_error(set);
        assert!(e.contains(says.as_ref()), "{set}: {e}");
    }
}

/// llama-recipes' booleans given to what is a choice here say which choice they mean.
#[test]
fn llama_recipes_booleans_name_the_choice() {
    set_errors_say([
        (
            "fsdp.mixed_precision=true",
            "(llama-recipes' mixed_precision: true is bf16 here, false fp32), got true",
        ),
        (
            "train.save_adapter=false",
            "(llama-recipes' save_model: true is hf5 here, false none), got false",
        ),
    ]);
}

/// One of our keys written in the wrong section, or at the top as llama-recipes' flat flags are
/// (`--lr`), is answered with its section: an exact name elsewhere beats a typo here.
#[test]
fn a_key_of_another_section_is_named_with_its_section() {
    set_errors_say(
        [
            ("lr=1e-5", "train.lr"),
            ("seed=3", "train.seed"),
            ("output_dir=out", "train.output_dir"),
            ("dropout=0.1", "peft.dropout"),
            ("peft.lr=1e-5", "train.lr"),
            ("train.kind=cosine", "train.schedule.kind"),
        ]
        .map(|(set, ours)| (set, format!("(it is a key of another section: {ours})"))),
    );
}

/// A section written twice is named with the lines it is on (serde_yaml gives no place for a
/// repeated top-level key).
#[test]
fn a_repeated_section_names_its_lines() {
    let e = yaml_error("train: {lr: 1.0e-5}\ntrain: {epochs: 2}\n");
    assert!(
        e.contains("duplicate entry with key \"train\" (lines 3, 4): merge them into one section"),
        "{e}"
    );
}

/// PEFT's per-layer options: each bad value or combination names its key (and, for the
/// combinations PEFT's LoraConfig refuses, refuses them too); the patterns keep their order.
#[test]
fn per_layer_lora_options_name_their_key() {
    let cases = [
        (
            "peft={method: none, rank_pattern: {q_proj: 2}}",
            "peft.rank_pattern: shapes a LoRA adapter; it needs peft.method: lora",
        ),
        (
            "peft={target_modules: '.*q_proj', layers_to_transform: 0}",
            "peft.layers_to_transform: selects layers by index, which PEFT does only for a list \
             of target_modules names; with the regular expression \".*q_proj\" as \
             target_modules, write the layer numbers into it (PEFT refuses this too)",
        ),
        (
            "peft.layers_pattern=layers",
            "peft.layers_pattern: names the layer lists peft.layers_to_transform indexes, which \
             is not set: give the layer indices too",
        ),
        (
            "peft.rank_pattern={q_proj: 0}",
            "peft.rank_pattern.q_proj: expected a positive integer, got 0",
        ),
        (
            "peft.alpha_pattern={q_proj: fast}",
            "peft.alpha_pattern.q_proj: expected a positive number, got \"fast\"",
        ),
        (
            "peft.rank_pattern={'(q_proj': 2}",
            "peft.rank_pattern: the key \"(q_proj\" is not a regular expression",
        ),
        (
            "peft.rank_pattern=[q_proj]",
            "peft.rank_pattern: expected a mapping of module patterns to values, like \
             {gate_proj: 4}, got a list",
        ),
        (
            "peft.layers_to_transform=-1",
            "peft.layers_to_transform: expected a layer index (an integer >= 0) or a list of \
             them, got -1",
        ),
        (
            "peft.layers_to_transform=[0, -1]",
            "peft.layers_to_transform[1]: expected an integer >= 0, got -1",
        ),
        (
            "peft.exclude_modules=all-linear",
            "peft.exclude_modules: expected a list of module names or a regular expression \
             (all-linear is a target_modules value), got all-linear",
        ),
        (
            "peft={method: none, modules_to_save: [lm_head]}",
            "peft.modules_to_save: shapes a LoRA adapter; it needs peft.method: lora",
        ),
        (
            "peft.modules_to_save=lm_head",
            "peft.modules_to_save: expected a list of module names like [multi_modal_projector], \
             got \"lm_head\"",
        ),
        (
            "peft={layers_to_transform: [0], layers_pattern: '(layers'}",
            "peft.layers_pattern: \"(layers\" is not a regular expression; name the layer list, \
             like layers",
        ),
    ];
    for (set, want) in cases {
        let e = set_error(set);
        assert!(
            e.starts_with(want),
            "--set {set}:\n  got  {e}\n  want {want}"
        );
    }
    let c = config::parse(
        MINIMAL,
        &[
            "peft.rank_pattern={v_proj: 2, q_proj: 16, gate_proj: 4}".into(),
            "peft.alpha_pattern={q_proj: 8}".into(),
            "peft.layers_to_transform=3".into(),
            "peft.layers_pattern=[layers, global_layers]".into(),
            "peft.exclude_modules='.*vision.*'".into(),
        ],
    )
    .unwrap();
    let p = &c.peft;
    let ranks: Vec<(&str, usize)> = p
        .rank_pattern
        .iter()
        .map(|(k, r)| (k.as_str(), *r))
        .collect();
    assert_eq!(ranks, [("v_proj", 2), ("q_proj", 16), ("gate_proj", 4)]);
    assert_eq!(p.alpha_pattern, [("q_proj".to_string(), 8.0)]);
    assert_eq!(p.layers_to_transform, [3]);
    assert_eq!(p.layers_pattern, ["layers", "global_layers"]);
    assert_eq!(
        p.exclude_modules,
        Some(LoraTargets::Pattern(".*vision.*".into()))
    );
    // `config show` prints the keys, and what it prints reads back the same
    let yaml = c.to_yaml().unwrap();
    let again = config::parse(&yaml, &[]).unwrap();
    assert_eq!(again.peft, c.peft);
    let defaults = config::parse(MINIMAL, &[]).unwrap().to_yaml().unwrap();
    for key in [
        "rank_pattern:",
        "alpha_pattern:",
        "exclude_modules:",
        "layers_to_transform:",
    ] {
        assert!(defaults.contains(key), "{key} missing from\n{defaults}");
    }
}
