//! The validation pass: raw config -> resolved config. Leaves were checked while parsing
//! (`values.rs`); this pass adds required keys and the rules that involve several keys.
use super::raw::{RawCheckpoint, RawConfig, RawData, RawFsdp, RawModel, RawPeft, RawTrain};
use super::schema::{
    Attention, CheckpointConfig, Config, DType, DataConfig, FsdpConfig, LoraTargets, ModelConfig,
    PeftConfig, PeftMethod, Schedule, ScheduleKind, TrainConfig,
};
use super::values::Targets;
use super::ConfigError;
use crate::model::lora::ALL_LINEAR;

pub(crate) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    // Sections in file order, so that the first error reported is the first one in the file.
    let config = Config {
        model: model(raw.model)?,
        peft: peft(raw.peft)?,
        data: data(raw.data)?,
        train: train(raw.train)?,
        fsdp: fsdp(raw.fsdp),
        checkpoint: checkpoint(raw.checkpoint),
    };
    let (every_eval, every_save) = (config.train.eval_every_steps, config.checkpoint.every_steps);
    if every_eval > 0 && !config.train.validate {
        return Err(ConfigError::Conflict {
            path: "train.eval_every_steps".into(),
            message: format!(
                "{every_eval}, but train.validate is false; set train.validate: true (with \
                 data.eval) or eval_every_steps: 0"
            ),
        });
    }
    // a validated step's checkpoint is the adapter exported when it is the best, and carries
    // the result across a resume (HF's load_best_model_at_end asks the same of save_steps)
    if every_eval > 0 && every_save == 0 {
        return Err(ConfigError::Conflict {
            path: "train.eval_every_steps".into(),
            message: format!(
                "{every_eval} needs periodic checkpoints (checkpoint.every_steps is 0): each \
                 validated step needs its checkpoint; set checkpoint.every_steps to \
                 {every_eval} or a divisor of it"
            ),
        });
    }
    if every_eval > 0 && every_eval % every_save != 0 {
        return Err(ConfigError::Conflict {
            path: "train.eval_every_steps".into(),
            message: format!(
                "{every_eval} must be a multiple of checkpoint.every_steps ({every_save}): each \
                 validated step needs its checkpoint; set checkpoint.every_steps to \
                 {every_eval} or a divisor of it"
            ),
        });
    }
    if config.train.validate && config.data.eval.is_none() {
        return Err(ConfigError::Conflict {
            path: "train.validate".into(),
            message: "validation needs data.eval (a JSONL file of validation records); \
                      set data.eval or train.validate: false"
                .into(),
        });
    }
    Ok(config)
}

/// What `trainer train` refuses for a run of `world` ranks, `per_node` of them on each node:
/// checked by every rank as it starts, and once for the launch's layout by `config check --world
/// N --nproc-per-node P` (which the launcher runs before starting any rank). Returns the ranks
/// of a shard group (hybrid_shard's, else the world).
pub fn world_conflicts(
    config: &Config,
    world: usize,
    per_node: usize,
) -> Result<usize, ConfigError> {
    let conflict = |path: &str, message: String| ConfigError::Conflict {
        path: path.into(),
        message,
    };
    if !config.fsdp.enabled && world > 1 {
        return Err(conflict("fsdp.enabled", format!("false trains in one process, but this run has {world} ranks (launch one rank, or set fsdp.enabled: true)")));
    }
    if !config.fsdp.sharding_strategy.is_hybrid() || !config.fsdp.enabled {
        return Ok(world);
    }
    let g = config.fsdp.shard_group_size(world, per_node);
    g.map_err(|(key, e)| conflict(key, format!("{e} (fsdp.sharding_strategy: hybrid_shard)")))
}

/// What `trainer train` refuses in a config that parses: settings that cannot train, checked
/// before anything loads (and by `trainer config check`, which the launcher runs once before
/// starting ranks, so they are one error, not one per rank and restart).
/// - fp16 compute: training in fp16 needs loss scaling (PyTorch FSDP's ShardedGradScaler), which
///   this trainer does not have: gradients below fp16's smallest normal (6e-5; the loss seed alone
///   is 1 / tokens) flush to zero and training stalls without a sign;
/// - `model.attention: fused` without FSDP (it trains through the FSDP schedule's explicit
///   attention backward) or in fp32 (the kernels compute in bf16 or fp16).
pub fn training_conflicts(config: &Config) -> Result<(), ConfigError> {
    let conflict = |path: &str, message: String| {
        Err(ConfigError::Conflict {
            path: path.into(),
            message,
        })
    };
    let (key, compute) = config.compute_dtype();
    if compute == DType::Fp16 {
        return conflict(
            key,
            "fp16 training needs loss scaling, which this trainer does not have (gradients below \
             6e-5 would flush to zero); use bf16 (fp32's range, same memory) or fp32"
                .into(),
        );
    }
    if config.model.attention == Attention::Fused {
        if !config.fsdp.enabled {
            return conflict(
                "model.attention",
                "fused trains through the FSDP schedule's explicit attention backward, which \
                 fsdp.enabled: false does not run; set fsdp.enabled: true (it works at world 1 \
                 too), or model.attention: sdpa"
                    .into(),
            );
        }
        if compute == DType::Fp32 {
            return conflict(
                "model.attention",
                format!(
                    "fused computes in bf16 or fp16, but {key} is fp32; set {key}: bf16, or \
                     model.attention: sdpa"
                ),
            );
        }
    }
    Ok(())
}

/// What to do with a Hugging Face Hub id given as a folder.
pub const HUB_ID_NOTE: &str = "a Hub id is not downloaded: give the folder it was downloaded to (`huggingface-cli download ID --local-dir DIR`)";

/// Whether a path that is not there reads as a Hub id ("meta-llama/Llama-3.2-11B-Vision": two
/// plain names; not "./model" nor "a/b/c").
pub fn is_hub_id(path: &std::path::Path) -> bool {
    path.components().count() == 2
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The files and folders a run reads that are not there: `model.path` (a folder with
/// config.json), `data.train` (and `data.eval` under `train.validate`), `peft.init_from`.
/// Checked by `trainer config check`, which the launcher runs once before starting any rank of a
/// single-node run (a typo in a path is one error naming its key, not a failure on every rank and
/// restart after a model load; across nodes the paths are each node's, so the ranks check them),
/// and by `train` before anything loads. Relative paths are read from the working folder, as the
/// ranks read them.
pub fn missing_paths(config: &Config) -> Result<(), ConfigError> {
    let model = &config.model.path;
    if !model.is_dir() {
        let hub = match is_hub_id(model) {
            true => format!("; {HUB_ID_NOTE}"),
            false => String::new(),
        };
        return missing(
            "model.path",
            format!("{}: no such folder{} (a Hugging Face model folder: config.json, *.safetensors, tokenizer files){hub}", model.display(), read_from(model)),
        );
    }
    if !model.join("config.json").is_file() {
        return missing(
            "model.path",
            format!(
                "{} has no config.json: not a Hugging Face model folder",
                model.display()
            ),
        );
    }
    missing_data_paths(config)?;
    // the run's outputs in the base model's folder: the adapter's adapter_config.json there
    // would make transformers load the base as that adapter from then on
    output_folders(config, model)
}

/// Where a path that is not there was looked for, when that may be the surprise: a relative
/// path's working folder (a job started from another folder), a `~` the shell did not expand.
fn read_from(path: &std::path::Path) -> String {
    if path.starts_with("~") {
        return " (a leading ~ is not expanded in a config: write the full path)".into();
    }
    match (path.is_relative(), std::env::current_dir()) {
        (true, Ok(cwd)) => format!(
            " (relative paths are read from the working folder, {})",
            cwd.display()
        ),
        _ => String::new(),
    }
}

/// The error for a path of config key `path` that is not there (or not what it must be).
fn missing(path: &str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::NoSuchPath {
        path: path.into(),
        message,
    })
}

/// The data's paths of `missing_paths` (what `trainer data check` reads too): data.train,
/// data.eval under train.validate, data.image_root.
pub fn missing_data_paths(config: &Config) -> Result<(), ConfigError> {
    let eval = config.data.eval.as_ref().filter(|_| config.train.validate);
    for (key, files) in [
        ("data.train", Some(&config.data.train)),
        ("data.eval", eval),
    ] {
        for f in files.map_or(&[][..], |f| f.files()) {
            if !f.is_file() {
                let what = match f.is_dir() {
                    true => "a folder, not a JSONL file".to_string(),
                    false => format!("no such file{}", read_from(f)),
                };
                return missing(key, format!("{}: {what}", f.display()));
            }
            // llama-recipes' custom_dataset.file is a Python loader: the records are what it reads
            if f.extension().is_some_and(|e| e == "py") {
                return Err(ConfigError::Conflict {
                    path: key.into(),
                    message: format!(
                        "{} is a Python file (llama-recipes' custom_dataset.file, a dataset \
                         loader): give the JSONL records it reads (its data_path) as {key}, and \
                         their images' folder (its image_base_path) as data.image_root",
                        f.display()
                    ),
                });
            }
        }
    }
    // (a folder named that is not there; records with absolute image paths do not read it, but
    // one of them each named as missing by the data scan says less)
    if let Some(dir) = config.data.image_root.as_ref().filter(|d| !d.is_dir()) {
        let what = match dir.exists() {
            true => "not a folder".to_string(),
            false => format!("no such folder{}", read_from(dir)),
        };
        return missing(
            "data.image_root",
            format!(
                "{}: {what} (the folder the records' relative image paths are joined to; unset, \
                 they are used as written)",
                dir.display()
            ),
        );
    }
    Ok(())
}

/// The run's output folders: not model.path (`model`), not a checkpoint, not another model's.
fn output_folders(config: &Config, model: &std::path::Path) -> Result<(), ConfigError> {
    let model_real = model.canonicalize().ok();
    let same = |a: &std::path::Path| a.canonicalize().ok().is_some_and(|a| Some(a) == model_real);
    for (key, dir) in [
        ("train.output_dir", &config.train.output_dir),
        ("checkpoint.dir", &config.checkpoint.dir),
    ] {
        if same(dir) {
            return Err(ConfigError::Conflict {
                path: key.into(),
                message: format!(
                    "{} is model.path: the run's files (an adapter_config.json, checkpoints) \
                     do not go into the base model's folder; give a folder of their own",
                    dir.display()
                ),
            });
        }
    }
    // nor into a checkpoint (a copied `step-N` folder given to resume from, most likely): a run
    // there starts over inside it, and retention deletes that checkpoint with what it holds
    for (key, dir) in [
        ("checkpoint.dir", &config.checkpoint.dir),
        ("train.output_dir", &config.train.output_dir),
    ] {
        let Some(ckpt) = crate::checkpoint::enclosing_checkpoint(dir) else {
            continue;
        };
        let (what, fix) = match key {
            "checkpoint.dir" => (
                "the folder that holds the run's step-N folders",
                format!(
                    "to resume from that checkpoint, set checkpoint.resume={} and checkpoint.dir \
                     to a folder of this run's (its parent, {}, to go on beside it)",
                    ckpt.display(),
                    ckpt.parent().unwrap_or(&ckpt).display()
                ),
            ),
            _ => (
                "the run's metrics and adapter",
                "give a folder outside it".to_string(),
            ),
        };
        let place = match dir.join("manifest.json").is_file() {
            true => "is the checkpoint folder".to_string(),
            false => format!("is inside the checkpoint folder {}", ckpt.display()),
        };
        return Err(ConfigError::Conflict {
            path: key.into(),
            message: format!(
                "{} {place} (it holds manifest.json): {key} is {what}, and retention \
                 (checkpoint.keep_last) deletes a checkpoint with whatever is put in it; {fix}",
                dir.display()
            ),
        });
    }
    // nor into another model's (a merged export): the same, found by its config.json
    let out = &config.train.output_dir;
    if config.peft.is_lora() && out.join("config.json").is_file() {
        return Err(ConfigError::Conflict {
            path: "train.output_dir".into(),
            message: format!(
                "{} holds a model (config.json): the run's adapter_config.json beside it would \
                 make transformers load the folder as the adapter; give a folder of its own",
                out.display()
            ),
        });
    }
    if let Some(dir) = config.peft.init_from.as_ref().filter(|d| !d.is_dir()) {
        return missing(
            "peft.init_from",
            format!("{}: no such folder", dir.display()),
        );
    }
    Ok(())
}

fn required<T>(value: Option<T>, path: &str, what: &'static str) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::Missing {
        path: path.into(),
        what,
    })
}

fn model(raw: RawModel) -> Result<ModelConfig, ConfigError> {
    Ok(ModelConfig {
        path: required(raw.path, "model.path", "the Hugging Face model folder")?.0,
        dtype: raw.dtype,
        attention: raw.attention,
    })
}

fn peft(raw: RawPeft) -> Result<PeftConfig, ConfigError> {
    let lora = raw.method == PeftMethod::Lora;
    if lora && raw.target_modules == Targets::Names(vec![]) {
        return Err(ConfigError::Invalid {
            path: "peft.target_modules".into(),
            expected: "at least one module name for LoRA, like [q_proj, v_proj]".into(),
            got: "[]".into(),
        });
    }
    if lora && raw.freeze_llm_only {
        return Err(ConfigError::Conflict {
            path: "peft.freeze_llm_only".into(),
            message: "is for full finetuning (peft.method: none); LoRA trains only its factors \
                      (choose them with peft.target_modules)"
                .into(),
        });
    }
    if !lora && raw.use_rslora {
        return Err(ConfigError::Conflict {
            path: "peft.use_rslora".into(),
            message: "scales a LoRA update; it needs peft.method: lora".into(),
        });
    }
    // the options that choose LoRA's layers or vary it by layer
    let layer_options = [
        ("peft.use_dora", raw.use_dora),
        ("peft.rank_pattern", !raw.rank_pattern.0.is_empty()),
        ("peft.alpha_pattern", !raw.alpha_pattern.0.is_empty()),
        ("peft.exclude_modules", raw.exclude_modules.is_some()),
        (
            "peft.layers_to_transform",
            !raw.layers_to_transform.0.is_empty(),
        ),
        ("peft.layers_pattern", !raw.layers_pattern.0.is_empty()),
        ("peft.modules_to_save", !raw.modules_to_save.0.is_empty()),
    ];
    if let Some((key, _)) = layer_options.iter().find(|(_, set)| *set && !lora) {
        return Err(ConfigError::Conflict {
            path: key.to_string(),
            message: "shapes a LoRA adapter; it needs peft.method: lora".into(),
        });
    }
    // (as PEFT's LoraConfig refuses them)
    if let Targets::Pattern(re) = &raw.target_modules {
        let by_index =
            (layer_options.iter()).find(|(key, set)| *set && key.starts_with("peft.layers_"));
        if let Some((key, _)) = by_index {
            return Err(ConfigError::Conflict {
                path: key.to_string(),
                message: format!(
                    "selects layers by index, which PEFT does only for a list of target_modules \
                     names; with the regular expression {re:?} as target_modules, write the \
                     layer numbers into it (PEFT refuses this too)"
                ),
            });
        }
    }
    if !raw.layers_pattern.0.is_empty() && raw.layers_to_transform.0.is_empty() {
        return Err(ConfigError::Conflict {
            path: "peft.layers_pattern".into(),
            message: "names the layer lists peft.layers_to_transform indexes, which is not set: \
                      give the layer indices too"
                .into(),
        });
    }
    if raw.exclude_modules == Some(Targets::Pattern(ALL_LINEAR.into())) {
        return Err(ConfigError::Invalid {
            path: "peft.exclude_modules".into(),
            expected: "a list of module names or a regular expression (all-linear is a \
                       target_modules value)"
                .into(),
            got: ALL_LINEAR.into(),
        });
    }
    if !lora && raw.init_from.is_some() {
        return Err(ConfigError::Conflict {
            path: "peft.init_from".into(),
            message: "starting from an adapter needs peft.method: lora \
                      (method none trains every weight and has no adapter)"
                .into(),
        });
    }
    Ok(PeftConfig {
        method: raw.method,
        r: raw.r.size(),
        alpha: raw.alpha.get(),
        dropout: raw.dropout.get(),
        target_modules: lora_targets(raw.target_modules),
        use_rslora: raw.use_rslora,
        use_dora: raw.use_dora,
        rank_pattern: (raw.rank_pattern.0.into_iter())
            .map(|(k, r)| (k, r.size()))
            .collect(),
        alpha_pattern: (raw.alpha_pattern.0.into_iter())
            .map(|(k, a)| (k, a.get()))
            .collect(),
        exclude_modules: raw.exclude_modules.map(lora_targets),
        layers_to_transform: raw.layers_to_transform.0,
        layers_pattern: raw.layers_pattern.0,
        modules_to_save: raw.modules_to_save.0,
        init_from: raw.init_from.map(|p| p.0),
        freeze_llm_only: raw.freeze_llm_only,
    })
}

fn lora_targets(t: Targets) -> LoraTargets {
    match t {
        Targets::Names(names) => LoraTargets::Names(names),
        Targets::Pattern(p) => LoraTargets::Pattern(p),
    }
}

fn data(raw: RawData) -> Result<DataConfig, ConfigError> {
    Ok(DataConfig {
        train: required(
            raw.train,
            "data.train",
            "a JSONL file of training records, or a list of them",
        )?,
        eval: raw.eval,
        image_root: raw.image_root.map(|p| p.0),
        max_seq_len: raw.max_seq_len.size(),
        max_seq_len_policy: raw.max_seq_len_policy,
        num_workers: raw.num_workers.size(),
        bad_records: raw.bad_records,
        text_only: raw.text_only,
        image_placeholder: raw.image_placeholder,
        double_bos: raw.double_bos,
        supervise: raw.supervise,
    })
}

fn train(raw: RawTrain) -> Result<TrainConfig, ConfigError> {
    let s = raw.schedule;
    // A warmup the step schedule would ignore is refused rather than dropped silently.
    if s.kind == ScheduleKind::Step && s.warmup_steps.get() > 0 {
        return Err(ConfigError::Conflict {
            path: "train.schedule.warmup_steps".into(),
            message: format!(
                "{} warmup steps, but kind step does not warm up (cosine, linear and \
                 constant do); set train.schedule.kind: cosine or warmup_steps: 0",
                s.warmup_steps.get()
            ),
        });
    }
    if s.kind == ScheduleKind::Constant && s.min_lr_ratio.get() > 0.0 {
        return Err(ConfigError::Conflict {
            path: "train.schedule.min_lr_ratio".into(),
            message: format!(
                "{}, but kind constant does not decay; set train.schedule.kind: linear or \
                 cosine, or min_lr_ratio: 0",
                s.min_lr_ratio.get()
            ),
        });
    }
    if s.kind == ScheduleKind::Step && s.min_lr_ratio.get() > 0.0 {
        return Err(ConfigError::Conflict {
            path: "train.schedule.min_lr_ratio".into(),
            message: format!(
                "{}, but kind step has no floor (it multiplies by gamma each epoch; cosine \
                 and linear decay to one); set train.schedule.kind: cosine or min_lr_ratio: 0",
                s.min_lr_ratio.get()
            ),
        });
    }
    Ok(TrainConfig {
        epochs: raw.epochs.size(),
        batch_size: raw.batch_size.size(),
        grad_accum: raw.grad_accum.size(),
        lr: raw.lr.get(),
        weight_decay: raw.weight_decay.get(),
        adam_beta1: raw.adam_beta1.get(),
        adam_beta2: raw.adam_beta2.get(),
        adam_epsilon: raw.adam_epsilon.get(),
        schedule: Schedule {
            kind: s.kind,
            gamma: s.gamma.get(),
            warmup_steps: s.warmup_steps.get(),
            min_lr_ratio: s.min_lr_ratio.get(),
        },
        grad_clip: raw.grad_clip.map(|c| c.get()),
        max_steps: raw.max_steps.get(),
        seed: raw.seed.get(),
        validate: raw.validate,
        drop_last: raw.drop_last,
        log_every: raw.log_every.get(),
        tensorboard: raw.tensorboard,
        output_dir: raw.output_dir.0,
        save_adapter: raw.save_adapter,
        skip_nonfinite: raw.skip_nonfinite.get(),
        eval_every_steps: raw.eval_every_steps.get(),
        val_batch_size: raw.val_batch_size.map(|b| b.size()),
        max_eval_samples: raw.max_eval_samples.get(),
        peak_tflops: raw.peak_tflops.map(|p| p.get()),
    })
}

fn fsdp(raw: RawFsdp) -> FsdpConfig {
    FsdpConfig {
        enabled: raw.enabled,
        backend: raw.backend,
        mixed_precision: raw.mixed_precision,
        activation_checkpointing: raw.activation_checkpointing,
        prefetch: raw.prefetch,
        sharding_strategy: raw.sharding_strategy,
        sharding_group_size: raw.sharding_group_size.map(|g| g.size()),
        replica_group_size: raw.replica_group_size.map(|r| r.size()),
    }
}

fn checkpoint(raw: RawCheckpoint) -> CheckpointConfig {
    CheckpointConfig {
        dir: raw.dir.0,
        every_steps: raw.every_steps.get(),
        keep_last: raw.keep_last.size(),
        resume: raw.resume,
        async_save: raw.async_save,
    }
}
