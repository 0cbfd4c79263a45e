//! Construction: the process group and device, the model (loaded, LoRA applied, sharded: with
//! FSDP each rank reads only its slices of the weights), and the data with the step counts.
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::config::{self, Config};
use crate::data::dataset::{Dataset, Split, DROPPING_KEYS};
use crate::dist::{self, ProcessGroup};
use crate::fsdp::{kind_of, FsdpModel, PlainModel, Trainable, WrapOptions};
use crate::model::adapter::DoraBase;
use crate::model::adapter_config::{AdapterConfig, AdapterLayout};
use crate::model::{
    AttentionImpl, LoadOptions, LoraConfig, MllamaConfig, MllamaModel, TargetModules, WeightSource,
};

use super::flops::FlopCount;
use super::metrics::log;

const MIB: f64 = 1024.0 * 1024.0;

/// The process group from torchrun's environment and this rank's device.
pub(super) fn process_group(config: &Config) -> Result<(ProcessGroup, Device)> {
    let pg = ProcessGroup::from_env(backend(config.fsdp.backend), Duration::from_secs(600))
        .context("setting up the process group")?;
    let world = pg.world_size();
    let device = if pg.backend_name() == "nccl" {
        Device::Cuda(launcher::env::RankEnv::from_env()?.local_rank)
    } else {
        Device::Cpu
    };
    // (hybrid_shard's group sizes before the data scan and the model load)
    let g = shard_group_size(config, world)?;
    if config.fsdp.enabled && g == world && hybrid(config) {
        log(pg.rank(), &format!("fsdp.sharding_strategy hybrid_shard: one shard group of all {world} ranks (one node, or fsdp.sharding_group_size {world}) is full_shard; give fsdp.sharding_group_size to make copies"));
    }
    // (a resumed run renders the date its first start rendered: `Manifest::template_clock`)
    let resumed = match pg.rank() {
        0 => crate::checkpoint::resumed_template_clock(config),
        _ => None,
    };
    crate::data::template::agree_template_clock(&pg, device, resumed)
        .context("agreeing on the chat template's date")?;
    Ok((pg, device))
}

fn hybrid(config: &Config) -> bool {
    config.fsdp.sharding_strategy.is_hybrid()
}

/// The ranks each shard group holds: hybrid_shard's (`FsdpConfig::shard_group_size`, a node's
/// ranks by default), else the world; an error for a layout the config cannot train
/// (`config::world_conflicts`).
fn shard_group_size(config: &Config, world: usize) -> Result<usize> {
    let per_node = launcher::env::RankEnv::from_env()?.local_world_size;
    Ok(config::world_conflicts(config, world, per_node)?)
}

/// The model (+ LoRA) ready to train: FSDP-sharded as it loads, or plain; and its FLOP count.
pub(super) fn model(
    config: &Config,
    pg: &ProcessGroup,
    device: Device,
) -> Result<(Trainable, FlopCount)> {
    let share = config.fsdp.enabled.then(|| (pg.rank(), pg.world_size()));
    // (agreed: a rank that failed to read its share of DoRA's base weights must not leave the
    // others in the sum below)
    let (mut model, src) =
        crate::checkpoint::agree(pg, device, load_model(config, device, share), || {
            "loading the model failed on another rank".into()
        })?;
    let p = &config.peft;
    let fresh_dora = p.is_lora() && p.use_dora && p.init_from.is_none();
    if src.is_some() && fresh_dora && pg.world_size() > 1 {
        // each rank read a share of the base weights for the fresh magnitudes (an init_from
        // adapter brings them whole to every rank)
        model
            .sum_dora_magnitudes(device, |flat| pg.all_reduce(flat, dist::ReduceOp::Sum))
            .context("peft.use_dora: adding up the ranks' DoRA magnitudes")?;
    }
    model.freeze_llm = config.peft.freeze_llm_only;
    log(
        pg.rank(),
        &super::params::trainable_summary(&mut model, false),
    );
    if pg.rank() == 0 {
        for w in super::params::layout_warnings(&mut model, config)? {
            tracing::warn!("{w}");
        }
    }
    let flops = FlopCount::of(&mut model);
    let trainable = match src {
        Some(src) => {
            let sharding_group_size = shard_group_size(config, pg.world_size())?;
            let opts = WrapOptions {
                compute: kind_of(config.fsdp.mixed_precision),
                prefetch: config.fsdp.prefetch,
                activation_checkpointing: config.fsdp.activation_checkpointing,
                sharding: config.fsdp.sharding_strategy,
                sharding_group_size,
            };
            let m = FsdpModel::wrap_from_source(model, &src, pg, opts)?;
            let share = match (m.replicated, m.hybrid.is_some()) {
                (true, _) => "a whole replica: fsdp.sharding_strategy no_shard".to_string(),
                (false, true) => format!(
                    "its 1/{} shard: fsdp.sharding_strategy hybrid_shard, {} copies of the model",
                    m.shard_world,
                    pg.world_size() / m.shard_world
                ),
                (false, false) => format!("its 1/{} shard", pg.world_size()),
            };
            log(
                pg.rank(),
                &format!(
                    "weights: this rank read {:.1} MiB of {:.1} MiB ({share})",
                    src.bytes_read() as f64 / MIB,
                    src.total_bytes() as f64 / MIB,
                ),
            );
            Trainable::Fsdp(Box::new(m))
        }
        None => {
            model.set_training(true);
            Trainable::Plain(Box::new(PlainModel::new(model)))
        }
    };
    Ok((trainable, flops))
}

/// The model (+ LoRA). With `shard` (this rank, world size), a skeleton (placeholder base
/// weights) and its weight source, from which FSDP reads each rank's slices (and a fresh DoRA
/// adapter this rank's share of its magnitudes, `DoraBase`); otherwise fully loaded.
fn load_model(
    config: &Config,
    device: Device,
    shard: Option<(usize, usize)>,
) -> Result<(MllamaModel, Option<WeightSource>)> {
    let attention = match config.model.attention {
        config::Attention::Eager => AttentionImpl::Eager,
        config::Attention::Sdpa => AttentionImpl::Sdpa,
        config::Attention::Fused => AttentionImpl::Fused,
    };
    let opts = LoadOptions {
        dtype: kind_of(config.model.dtype),
        device,
        attention,
    };
    let dir = &config.model.path;
    let what = || format!("loading model.path {}", dir.display());
    let (mut model, src) = if shard.is_some() {
        let mc = MllamaConfig::from_file(&dir.join("config.json")).with_context(what)?;
        let src = WeightSource::open_dir(dir).with_context(what)?;
        let model = MllamaModel::skeleton(mc, &src, opts).with_context(what)?;
        (model, Some(src))
    } else {
        (MllamaModel::load(dir, opts).with_context(what)?, None)
    };
    let p = &config.peft;
    if p.is_lora() {
        match &p.init_from {
            Some(dir) => {
                // fp32 factors (FSDP's masters, the plain trainer's parameters) are the
                // adapter's values, not a bf16 rounding of them. PEFT keeps adapters in fp32 over
                // a bf16 base too (autocast_adapter_dtype).
                check_init_from(dir, &mut model, p)?;
                model.set_lora_kind(Kind::Float);
                model
                    .load_adapter(dir)
                    .with_context(|| format!("loading peft.init_from {}", dir.display()))?;
            }
            None => {
                model
                    .apply_adapter(
                        &adapter_config(p),
                        config.train.seed as i64,
                        src.as_ref()
                            .zip(shard)
                            .map(|(src, (rank, world))| DoraBase { src, rank, world }),
                    )
                    .context("peft")?;
                if !config.fsdp.enabled {
                    // the plain trainer as PEFT without FSDP (autocast_adapter_dtype): fp32
                    // factors (their bf16-rounded init, as PEFT's), an fp32 branch added in fp32,
                    // fp32 gradients summed over micro-batches (FSDP instead computes with bf16
                    // copies of fp32 masters, as FSDP's mixed precision casts every parameter)
                    model.set_lora_kind(Kind::Float);
                }
            }
        }
    }
    Ok((model, src))
}

fn backend(b: config::Backend) -> dist::Backend {
    match b {
        config::Backend::Auto => dist::Backend::Auto,
        config::Backend::Nccl => dist::Backend::Nccl,
        config::Backend::Cpu => dist::Backend::Cpu,
    }
}

/// The training data and how many optimizer steps it gives.
pub(super) struct Data {
    pub train: Dataset,
    pub eval: Option<Dataset>,
    /// The samples validation reads (`eval_set_fingerprint`), with `eval`.
    pub eval_set: Option<u64>,
    pub steps_per_epoch: u64,
    /// All epochs' steps, capped by `train.max_steps`.
    pub total_steps: u64,
}

pub(super) fn data(config: &Config, world: usize) -> Result<Data> {
    let t = &config.train;
    let train = Dataset::open(config, &config.model.path, Split::Train)?;
    let eval = t
        .validate
        .then(|| Dataset::open(config, &config.model.path, Split::Eval))
        .transpose()?;
    if train.is_empty() {
        bail!(
            "data.train {}: no usable sample ({}); `trainer data check CONFIG` lists each record's problem; {DROPPING_KEYS}",
            train.report().file,
            skip_reasons(&train)
        );
    }
    if let Some(eval) = &eval {
        if eval.report().supervised_tokens == 0 {
            bail!(
                "data.eval {}: no supervised tokens to validate on ({} usable samples; {}); fix the file, or set train.validate: false",
                eval.report().file,
                eval.len(),
                skip_reasons(eval)
            );
        }
    }
    // (0 only with train.drop_last: otherwise the samples are one partial step)
    let steps_per_epoch = train.batches_per_epoch(t.global_batch(world));
    if steps_per_epoch == 0 {
        // (records the data keys dropped are the likelier cause: say how many, and which keys)
        let dropped = match train.report().skipped_total() {
            0 => String::new(),
            _ => format!(" ({}; {DROPPING_KEYS})", skip_reasons(&train)),
        };
        bail!(
            "data.train {}: {} usable samples{dropped} do not fill one global batch of {} (batch_size {} x world {world} x grad_accum {}) and train.drop_last is true; lower train.batch_size or train.grad_accum, or set train.drop_last: false (they are then one step, a partial one)",
            train.report().file,
            train.len(),
            t.global_batch(world),
            t.batch_size,
            t.grad_accum
        );
    }
    let total_steps = t
        .step_limit()
        .unwrap_or(u64::MAX)
        .min(steps_per_epoch * t.epochs as u64);
    let eval_set = eval.as_ref().map(|ds| eval_set_fingerprint(ds, config));
    Ok(Data {
        train,
        eval,
        eval_set,
        steps_per_epoch,
        total_steps,
    })
}

/// Every rank reads the JSONL and checks the images itself, so a record dropped on some ranks
/// only (an image missing from one node's copy, a read error, under `data.bad_records: skip`)
/// would give the ranks other samples at the same index (global batches that are no longer a
/// partition, without a word) or other step counts (a hang at the epoch's end). The ranks compare
/// each split's samples and fingerprint (`data_fingerprint`) and stop together, naming who kept
/// what.
pub(super) fn agree_data(pg: &ProcessGroup, device: Device, data: &Data) -> Result<()> {
    let world = pg.world_size();
    if world == 1 {
        return Ok(());
    }
    let mine: Vec<i64> = [Some(&data.train), data.eval.as_ref()]
        .into_iter()
        .flat_map(|ds| ds.map_or([0, 0], |d| [d.len() as i64, data_fingerprint(d)]))
        .collect();
    let gathered = Tensor::zeros([world as i64 * 4], (Kind::Int64, device));
    pg.all_gather_into(&gathered, &Tensor::from_slice(&mine).to_device(device))?;
    let all = Vec::<i64>::try_from(gathered.to_device(Device::Cpu))?;
    let per_rank: Vec<[i64; 4]> = all.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    match data_disagreement(&per_rank) {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

/// A split's fingerprint: the first 8 bytes of the sha256 over each kept record's file (its place
/// in the list), line number and token length, in order (not the file's path, which may differ
/// between nodes' mounts).
fn data_fingerprint(ds: &Dataset) -> i64 {
    fingerprint_of_first(ds, ds.len())
}

/// The validation set: the fingerprint of the eval split's first `train.max_eval_samples` (all
/// without a limit), the samples validation reads (`Dataset::eval_plan`).
pub(super) fn eval_set_fingerprint(ds: &Dataset, config: &Config) -> u64 {
    let n = config
        .train
        .eval_sample_limit()
        .map_or(ds.len(), |l| l.min(ds.len()));
    fingerprint_of_first(ds, n) as u64
}

/// `data_fingerprint` of the split's first `n` samples.
fn fingerprint_of_first(ds: &Dataset, n: usize) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let files = &ds.report().file;
    for i in 0..n {
        let file = files.position(&ds.record(i).file).unwrap_or(usize::MAX);
        h.update((file as u64).to_le_bytes());
        h.update((ds.record(i).line as u64).to_le_bytes());
        h.update((ds.length(i) as u64).to_le_bytes());
    }
    let d = h.finalize();
    i64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

/// The error for ranks whose (train samples, train fingerprint, eval samples, eval fingerprint)
/// differ, or None when all agree.
fn data_disagreement(per_rank: &[[i64; 4]]) -> Option<String> {
    let first = per_rank.first()?;
    for (s, split) in ["train", "eval"].into_iter().enumerate() {
        let of = |r: &[i64; 4]| (r[2 * s], r[2 * s + 1]);
        if per_rank.iter().all(|r| of(r) == of(first)) {
            continue;
        }
        let listing: Vec<String> = per_rank
            .iter()
            .enumerate()
            .map(|(rank, r)| {
                let (n, fp) = of(r);
                format!("rank {rank}: {n} samples, fingerprint {:016x}", fp as u64)
            })
            .collect();
        return Some(format!(
            "data.{split}: the ranks kept different samples ({}). Each rank reads the file and checks the images itself, so records dropped on some nodes only (an image missing or unreadable there, under data.bad_records: skip) give them other data; make every node see the same data.{split} and data.image_root (`trainer data check CONFIG` on each node lists the records it drops)",
            listing.join("; ")
        ));
    }
    None
}

/// Log lines for settings that do nothing in this config (notes, not errors: a config shared
/// between runs may set them):
/// - without FSDP the model computes in `model.dtype`, so an `fsdp.mixed_precision` that differs
///   from it is not applied (both have defaults);
/// - `data.eval` without `train.validate` is never read (llama-recipes validates by default,
///   this trainer does not).
pub(super) fn unused_settings_notes(config: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    if !config.fsdp.enabled && config.fsdp.mixed_precision != config.model.dtype {
        notes.push(format!(
            "fsdp.enabled is false: fsdp.mixed_precision ({}) is not applied; the model computes in model.dtype ({})",
            config.fsdp.mixed_precision, config.model.dtype
        ));
    }
    if !config.fsdp.enabled && config.fsdp.sharding_strategy != config::ShardingStrategy::FullShard
    {
        notes.push(format!(
            "fsdp.enabled is false: fsdp.sharding_strategy ({}) is not applied; one process holds the whole model",
            config.fsdp.sharding_strategy.name()
        ));
    }
    if !hybrid(config) {
        for (key, v) in [
            ("sharding_group_size", config.fsdp.sharding_group_size),
            ("replica_group_size", config.fsdp.replica_group_size),
        ] {
            if let Some(v) = v {
                notes.push(format!("fsdp.{key} ({v}) is read by fsdp.sharding_strategy hybrid_shard and hybrid_shard_zero2 only; {} ignores it", config.fsdp.sharding_strategy.name()));
            }
        }
    }
    // (no note for fsdp.prefetch under no_shard: it is on by default, and there is nothing to do)
    let strategy = config.fsdp.sharding_strategy;
    if config.fsdp.enabled && strategy.keeps_gathered() && !config.fsdp.activation_checkpointing {
        let as_ = match strategy.is_hybrid() {
            true => "hybrid_shard",
            false => "full_shard",
        };
        notes.push(format!(
            "fsdp.sharding_strategy {} keeps units gathered from the forward to the backward, which fsdp.activation_checkpointing: false does already: it runs as {as_}",
            strategy.name()
        ));
    }
    // (a warmup or floor the kind ignores is refused by the config; gamma has a default, so only
    // another value is noted, not refused: configs that carry one for another kind still load)
    let s = &config.train.schedule;
    if s.kind != config::ScheduleKind::Step && s.gamma != config::Schedule::DEFAULT_GAMMA {
        let kind = serde_json::to_value(s.kind).unwrap_or_default();
        notes.push(format!(
            "train.schedule.gamma ({}) is read by kind step only (it multiplies the learning rate once per epoch); kind {} ignores it",
            s.gamma,
            kind.as_str().unwrap_or("?")
        ));
    }
    if let (Some(eval), false) = (&config.data.eval, config.train.validate) {
        notes.push(format!(
            "data.eval is set ({}) but train.validate is false: no validation runs, and the best-epoch adapter is not chosen by it; set train.validate: true to validate after each epoch",
            eval
        ));
    }
    let t = &config.train;
    if !t.validate {
        let set = [
            ("val_batch_size", t.val_batch_size.map(|b| b as u64)),
            (
                "max_eval_samples",
                (t.max_eval_samples > 0).then_some(t.max_eval_samples),
            ),
        ];
        for (key, v) in set {
            if let Some(v) = v {
                notes.push(format!(
                    "train.{key} ({v}) is read by validation only, and train.validate is false"
                ));
            }
        }
    }
    notes
}

/// After a resume, what the chat template's date means for the run's `text_only` samples (their
/// system turn says "Today Date"): it is the run's first day's, not today's, so they keep their
/// tokens (`Manifest::template_clock`); or, where the checkpoint resumed holds another date than
/// the one agreed before the data was read (not the checkpoint found then), that they changed.
pub(super) fn template_date_note(saved: Option<i64>, text_only: usize) -> Option<String> {
    use crate::data::template::{local_now, strftime, template_clock};
    let day = |t: i64| strftime("%d %b %Y", t);
    let (saved, rendered) = (saved?, template_clock());
    if text_only == 0 {
        return None;
    }
    if day(saved) != day(rendered) {
        return Some(format!(
            "note: the checkpoint resumed was trained with the chat template dated {}, this run renders {} (it is not the checkpoint found before the data was read): the system turn of its {text_only} text-only samples changed",
            day(saved),
            day(rendered)
        ));
    }
    let today = local_now();
    (day(rendered) != day(today)).then(|| {
        format!(
            "the system turn of the {text_only} text-only samples keeps the run's date, {} (its checkpoint's), not today's ({}): they are the tokens the run trained on before",
            day(rendered),
            day(today)
        )
    })
}

/// The log line naming the attention kernels `model.attention: fused` runs on a GPU, so a run's
/// log says which kernel variant produced it; a bad `LLAVA_SCO_ATTN_VARIANT` fails here, before the
/// model loads, instead of at the first attention call.
pub(super) fn fused_attention_note(config: &Config, device: Device) -> Result<Option<String>> {
    if config.model.attention != config::Attention::Fused || !device.is_cuda() {
        return Ok(None);
    }
    let variant = kernels::attention::variant()
        .map_err(|e| anyhow::anyhow!("model.attention: fused: {e}"))?;
    let head_dims = check_fused_config(config)?;
    // the kernels compiled and loaded now (NVRTC, the GPU's compute capability, the cache), but
    // not for a vision tower that runs SDPA (model::vision_attention: where it is faster)
    let mut sdpa_tower = String::new();
    if let Device::Cuda(ordinal) = device {
        let kind = crate::fsdp::kind_of(config.compute_dtype().1);
        let mut prepared = Vec::new();
        for (part, d) in head_dims {
            if part == "vision"
                && kernels::attention::sdpa_faster_on(ordinal as i32, d).unwrap_or(false)
            {
                sdpa_tower = format!("; the vision tower (head dim {d}) runs libtorch SDPA, faster than the kernels there");
                continue;
            }
            if prepared.contains(&d) {
                continue;
            }
            kernels::attention::prepare(ordinal as i32, kind, d).map_err(|e| {
                anyhow::anyhow!("model.attention: fused: {e}; or set model.attention: sdpa")
            })?;
            prepared.push(d);
        }
    }
    let all = kernels::attention::Variant::ALL;
    Ok(Some(format!(
        "model.attention: fused runs attention kernel variant {} ({}={} ... {} selects another; kernels/BENCHMARKS.md has each one's speed){sdpa_tower}",
        variant.name(),
        kernels::attention::VARIANT_ENV,
        all[0].name(),
        all[all.len() - 1].name()
    )))
}

/// What `model.attention: fused` needs besides a GPU, checked before the model loads (the kernels
/// would refuse at the first attention call, minutes into loading an 11B model): head dims the
/// kernels take (FSDP and a bf16 or fp16 compute dtype are `config::training_conflicts`', checked
/// first). Returns the model's head dims by part ("text", "vision"), when its config.json reads.
fn check_fused_config(config: &Config) -> Result<Vec<(&'static str, i64)>> {
    // (an unreadable config.json is the model load's error, with its own message)
    let mut head_dims = Vec::new();
    if let Ok(mc) = MllamaConfig::from_file(&config.model.path.join("config.json")) {
        let dims = kernels::attention::HEAD_DIMS;
        for (part, d) in [
            ("text", mc.text.head_dim()),
            ("vision", mc.vision.head_dim()),
        ] {
            if !dims.contains(&d) {
                bail!("model.attention: fused supports head dims {}, but the {part} model of {} has {d}; use model.attention: sdpa", dims.map(|d| d.to_string()).join(", "), config.model.path.display());
            }
            head_dims.push((part, d));
        }
    }
    Ok(head_dims)
}

/// "N of M records skipped (reason: n, ...)" for a dataset's scan.
fn skip_reasons(ds: &Dataset) -> String {
    let r = ds.report();
    let reasons: Vec<String> = r.skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "{} of {} records skipped{}",
        r.skipped_total(),
        r.lines,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    )
}

/// The log line about the records a split left out, when it left any out.
pub(super) fn skipped_note(split: &str, ds: &Dataset) -> Option<String> {
    let r = ds.report();
    // (text-only records are left out as the seed's loader leaves them, not named one by one)
    let text_only = r.skipped.get("text-only").copied().unwrap_or(0);
    let named = match (r.skipped_total() - text_only, text_only) {
        (0, _) => "",
        (_, 0) => "; `trainer data check CONFIG` names them",
        _ => "; `trainer data check CONFIG` names those not text-only",
    };
    (r.skipped_total() > 0).then(|| format!("data.{split} {}: {}{named}", r.file, skip_reasons(ds)))
}

/// The `peft` section as the model's LoRA settings.
pub(crate) fn lora_config(p: &config::PeftConfig) -> LoraConfig {
    LoraConfig {
        r: p.r as i64,
        alpha: p.alpha,
        dropout: p.dropout,
        target_modules: target_modules(&p.target_modules),
        use_rslora: p.use_rslora,
    }
}

/// The `peft` section as PEFT adapter settings (the layers, ranks and alphas of its LoRA).
pub(crate) fn adapter_config(p: &config::PeftConfig) -> AdapterConfig {
    let mut a = AdapterConfig::plain(lora_config(p));
    a.rank_pattern = (p.rank_pattern.iter())
        .map(|(k, r)| (k.clone(), *r as i64))
        .collect();
    a.alpha_pattern = p.alpha_pattern.clone();
    a.exclude_modules = p.exclude_modules.as_ref().map(target_modules);
    a.layers_to_transform = p.layers_to_transform.iter().map(|i| *i as i64).collect();
    a.layers_pattern = p.layers_pattern.clone();
    a.use_dora = p.use_dora;
    a.modules_to_save = p.modules_to_save.clone();
    a
}

fn target_modules(t: &config::LoraTargets) -> TargetModules {
    match t {
        config::LoraTargets::Names(n) => TargetModules::Names(n.clone()),
        config::LoraTargets::Pattern(re) => TargetModules::Regex(re.clone()),
    }
}

/// The adapter `peft.init_from` names fits the `peft` section and `model` (a skeleton will do:
/// only its module paths are read), before anything of it loads: `check_init_adapter` on what
/// its config chooses (peft's reading, in its tensors' naming).
pub(crate) fn check_init_from(
    dir: &std::path::Path,
    model: &mut MllamaModel,
    p: &config::PeftConfig,
) -> Result<()> {
    let (settings, layout) = crate::model::adapter::adapter_layout(dir)
        .with_context(|| format!("reading peft.init_from {}", dir.display()))?;
    let (mut paths, mut params) = (vec![], vec![]);
    model.visit_linears(&mut |l| paths.push(l.path.clone()));
    model.visit_params(&mut |n, _| params.push(n.to_string()));
    // (the section's modules_to_save must each name a module, as for a fresh adapter)
    let section = adapter_config(p);
    let section_layout = section.training_layout()?;
    model.saved_by(&section, &section_layout)?;
    check_init_adapter(dir, &paths, &params, &settings, &layout, &section_layout, p)
}

/// The adapter `peft.init_from` loaded must match the `peft` config: training runs with the
/// adapter's shapes and scaling, but checkpoints, their identity check and `export` record the
/// config's (an adapter of r 16 exported as r 8 does not load in PEFT; a different alpha merges
/// with the wrong scaling). Differences are an error naming each key and both values.
fn check_init_adapter(
    dir: &std::path::Path,
    paths: &[String],
    params: &[String],
    found: &AdapterConfig,
    found_layout: &AdapterLayout,
    layout: &AdapterLayout,
    p: &config::PeftConfig,
) -> Result<()> {
    let (adapter, found) = (found, &found.lora);
    let mut diffs = vec![];
    // (the config's patterns (`layout`) may not overlap: checkpoints record them without their
    // order, and a fresh adapter refuses them in `apply_adapter`)
    let overlaps: Vec<String> = (paths.iter())
        .filter(|path| layout.wraps(path))
        .filter_map(|path| layout.overlap(path))
        .collect();
    if let Some(first) = overlaps.first() {
        bail!(
            "peft: {first}: patterns that give a module different values must not overlap \
             (peft takes the first in order, which a checkpoint does not record); narrow the \
             keys"
        );
    }
    if found.r != p.r as i64 {
        diffs.push(format!("peft.r: adapter {}, config {}", found.r, p.r));
    }
    if found.alpha != p.alpha {
        diffs.push(format!(
            "peft.alpha: adapter lora_alpha {}, config {}",
            found.alpha, p.alpha
        ));
    }
    if found.dropout != p.dropout {
        diffs.push(format!(
            "peft.dropout: adapter lora_dropout {}, config {}",
            found.dropout, p.dropout
        ));
    }
    // the same layers with the same ranks and scalings, however each names them (PEFT saves
    // `all-linear` as the full paths it resolved to; a regex and a list may choose alike)
    let (mut only_adapter, mut only_config, mut other_lora) = (vec![], vec![], vec![]);
    for path in paths {
        match (found_layout.wraps(path), layout.wraps(path)) {
            (true, false) => only_adapter.push(path.clone()),
            (false, true) => only_config.push(path.clone()),
            (true, true) => {
                let (r, scaling) = (layout.rank(path), layout.scaling(path));
                let (ar, ascaling) = (found_layout.rank(path), found_layout.scaling(path));
                if ar != r || ascaling != scaling {
                    other_lora.push(format!(
                        "{path}: the adapter's rank {ar} and scaling {ascaling}, the config's \
                         {r} and {scaling}"
                    ));
                }
            }
            (false, false) => {}
        }
    }
    if let [first, rest @ ..] = &other_lora[..] {
        diffs.push(format!(
            "peft.rank_pattern / peft.alpha_pattern: {first}{}",
            match rest.len() {
                0 => String::new(),
                n => format!(" (and {n} more layers)"),
            }
        ));
    }
    if !only_adapter.is_empty() || !only_config.is_empty() {
        let show = |v: &[String]| match v {
            [] => "none".to_string(),
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} and {} more", rest.len()),
        };
        let adapter_targets = match &found.target_modules {
            TargetModules::Names(n) => serde_json::to_string(n)?,
            TargetModules::Regex(r) => serde_json::to_string(r)?,
        };
        // (exclude_modules and layers_to_transform narrow the choice, when either sets them)
        let keys = match p.exclude_modules.is_some()
            || !p.layers_to_transform.is_empty()
            || adapter.exclude_modules.is_some()
            || !adapter.layers_to_transform.is_empty()
        {
            true => "peft.target_modules / exclude_modules / layers_to_transform",
            false => "peft.target_modules",
        };
        diffs.push(format!(
            "{keys}: the adapter targets {adapter_targets}; layers only it wraps: {}; only the config's {}: {}",
            show(&only_adapter),
            serde_json::to_string(&p.target_modules)?,
            show(&only_config)
        ));
    }
    // the same modules saved, however each names them
    let saved_by = |l: &AdapterLayout| -> Vec<String> {
        let saved: Vec<String> = params.iter().filter(|n| l.saves(n)).cloned().collect();
        l.saved_modules(&saved)
    };
    let (adapter_saves, config_saves) = (saved_by(found_layout), saved_by(layout));
    if adapter_saves != config_saves {
        diffs.push(format!(
            "peft.modules_to_save: the adapter's {:?} save {adapter_saves:?}, the config's {:?} \
             save {config_saves:?}",
            adapter.modules_to_save, p.modules_to_save
        ));
    }
    if adapter.use_dora != p.use_dora {
        diffs.push(format!(
            "peft.use_dora: adapter {}, config {}",
            adapter.use_dora, p.use_dora
        ));
    }
    if found.use_rslora != p.use_rslora {
        diffs.push(format!(
            "peft.use_rslora: adapter {}, config {}",
            found.use_rslora, p.use_rslora
        ));
    }
    if !diffs.is_empty() {
        bail!(
            "peft.init_from {}: its adapter_config.json differs from the peft config, which checkpoints and `trainer export` record ({}); set those peft keys to the adapter's values in the config or with --set",
            dir.display(),
            diffs.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Too few samples for one global batch: where records were dropped (too long here: 11 of
    /// the fixture's 12 at 30 tokens), the error says how many and which keys drop them.
    #[test]
    fn too_few_samples_for_a_global_batch_name_the_records_dropped() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        let sets = [
            format!("model.path={fixtures}/train/model"),
            format!("data.train={fixtures}/train/train.jsonl"),
            format!("data.image_root={fixtures}/data/images"),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let mut large = sets.clone();
        large.extend(["train.batch_size=8", "train.drop_last=true"]);
        let e = data(&parse(&large), 2).err().unwrap().to_string();
        assert!(
            e.contains("12 usable samples do not fill one global batch of 16 (batch_size 8 x world 2 x grad_accum 1) and train.drop_last is true; lower train.batch_size or train.grad_accum, or set train.drop_last: false"),
            "{e}"
        );
        // without drop_last they are one partial step per epoch
        large.pop();
        let d = data(&parse(&large), 2).unwrap();
        assert_eq!((d.steps_per_epoch, d.total_steps), (1, 3));
        let mut short = sets.clone();
        short.extend([
            "train.batch_size=2",
            "data.max_seq_len=30",
            "train.drop_last=true",
        ]);
        let e = data(&parse(&short), 2).err().unwrap().to_string();
        assert!(
            e.contains("1 usable samples (11 of 12 records skipped (too long: 11)")
                && e.contains("data.max_seq_len / data.max_seq_len_policy")
                && e.contains(
                    "do not fill one global batch of 4 (batch_size 2 x world 2 x grad_accum 1)"
                ),
            "{e}"
        );
    }

    #[test]
    fn ranks_that_kept_other_samples_are_named() {
        assert_eq!(data_disagreement(&[[10, 7, 0, 0], [10, 7, 0, 0]]), None);
        assert_eq!(data_disagreement(&[]), None);
        let e = data_disagreement(&[[10, 7, 3, 1], [10, 7, 3, 1], [9, 8, 3, 1]]).unwrap();
        assert!(e.starts_with("data.train: the ranks kept different samples (rank 0: 10 samples, fingerprint 0000000000000007; rank 1: 10 samples"), "{e}");
        assert!(
            e.contains("rank 2: 9 samples, fingerprint 0000000000000008)"),
            "{e}"
        );
        // the same count, other records: caught by the fingerprint
        let e = data_disagreement(&[[10, 7, 3, 1], [10, 7, 3, 2]]).unwrap();
        assert!(e.starts_with("data.eval:"), "{e}");
        assert!(e.contains("data.bad_records: skip"), "{e}");
    }

    fn parse(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        config::parse("model: {path: m}\ndata: {train: t.jsonl}\n", &sets).expect("config")
    }

    /// Without FSDP, LoRA factors over a bf16 model are fp32 (PEFT's autocast_adapter_dtype), so
    /// their branch and their summed gradients are fp32; under FSDP the masters are.
    #[test]
    fn the_plain_trainer_keeps_lora_factors_in_fp32_over_a_bf16_model() {
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/mllama_tiny/model_hf5"
        );
        let path = format!("model.path={model}");
        let c = parse(&[
            &path,
            "model.dtype=bf16",
            "fsdp.enabled=false",
            "peft.method=lora",
        ]);
        let (mut m, _) = load_model(&c, Device::Cpu, None).unwrap();
        let kinds: Vec<Kind> = m
            .trainable_parameters()
            .iter()
            .map(|(_, t)| t.kind())
            .collect();
        assert!(!kinds.is_empty(), "LoRA applied");
        assert!(kinds.iter().all(|k| *k == Kind::Float), "{kinds:?}");
    }

    #[test]
    fn fused_attention_names_its_kernel_variant_on_a_gpu_only() {
        let fused = parse(&["model.attention=fused"]);
        let note = fused_attention_note(&fused, Device::Cuda(0))
            .unwrap()
            .expect("a note");
        let variant = kernels::attention::variant().unwrap();
        assert!(
            note.contains(&format!("variant {}", variant.name())),
            "{note}"
        );
        assert!(note.contains(kernels::attention::VARIANT_ENV), "{note}");
        assert!(fused_attention_note(&fused, Device::Cpu).unwrap().is_none());
        // what the kernels would refuse at the first attention call is refused up front
        for (sets, want) in [
            (&["fsdp.enabled=false"][..], "set fsdp.enabled: true"),
            (
                &["fsdp.mixed_precision=fp32"][..],
                "fsdp.mixed_precision is fp32",
            ),
        ] {
            let mut all = vec!["model.attention=fused"];
            all.extend_from_slice(sets);
            // (config::training_conflicts, which `train` runs first)
            let err = crate::config::training_conflicts(&parse(&all)).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        let sdpa = parse(&["model.attention=sdpa"]);
        assert!(fused_attention_note(&sdpa, Device::Cuda(0))
            .unwrap()
            .is_none());
    }

    #[test]
    fn mixed_precision_without_fsdp_is_noted_and_model_dtype_computes() {
        let c = parse(&["fsdp.enabled=false", "model.dtype=fp32"]);
        let notes = unused_settings_notes(&c);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("fsdp.mixed_precision") && notes[0].contains("model.dtype"));
        assert_eq!(c.compute_dtype(), ("model.dtype", config::DType::Fp32));
        // the same dtypes, or FSDP on: nothing to note
        assert!(
            unused_settings_notes(&parse(&["fsdp.enabled=false", "model.dtype=bf16"])).is_empty()
        );
        let fsdp = parse(&["model.dtype=fp32"]);
        assert!(unused_settings_notes(&fsdp).is_empty());
        assert_eq!(
            fsdp.compute_dtype(),
            ("fsdp.mixed_precision", config::DType::Bf16)
        );
    }

    /// A sharding strategy that changes nothing is said so: any without FSDP, shard_grad_op
    /// without activation checkpointing (units stay gathered then anyway).
    #[test]
    fn sharding_strategies_that_change_nothing_are_noted() {
        let notes = unused_settings_notes(&parse(&[
            "fsdp.enabled=false",
            "model.dtype=bf16",
            "fsdp.sharding_strategy=no_shard",
        ]));
        assert!(
            notes.len() == 1 && notes[0].contains("(no_shard) is not applied"),
            "{notes:?}"
        );
        let keep = [
            "fsdp.sharding_strategy=shard_grad_op",
            "fsdp.activation_checkpointing=false",
        ];
        let notes = unused_settings_notes(&parse(&keep));
        assert!(
            notes.len() == 1 && notes[0].contains("runs as full_shard"),
            "{notes:?}"
        );
        for s in ["shard_grad_op", "no_shard"] {
            let set = format!("fsdp.sharding_strategy={s}");
            assert!(
                unused_settings_notes(&parse(&[set.as_str()])).is_empty(),
                "{s}"
            );
        }
    }

    /// HSDP's group sizes under another strategy are noted, not applied.
    #[test]
    fn hsdp_group_sizes_without_hybrid_shard_are_noted() {
        let notes = unused_settings_notes(&parse(&["fsdp.sharding_group_size=2"]));
        assert!(
            notes.len() == 1
                && notes[0].contains("fsdp.sharding_group_size (2) is read by fsdp.sharding_strategy hybrid_shard and hybrid_shard_zero2 only; full_shard ignores it"),
            "{notes:?}"
        );
        let hybrid = [
            "fsdp.sharding_strategy=hybrid_shard",
            "fsdp.sharding_group_size=2",
        ];
        assert!(unused_settings_notes(&parse(&hybrid)).is_empty());
    }

    /// A gamma other than the default under a kind that does not read it is noted.
    #[test]
    fn gamma_under_another_schedule_kind_is_noted() {
        let notes = unused_settings_notes(&parse(&[
            "train.schedule.kind=cosine",
            "train.schedule.gamma=0.5",
        ]));
        assert_eq!(notes, ["train.schedule.gamma (0.5) is read by kind step only (it multiplies the learning rate once per epoch); kind cosine ignores it"]);
        assert!(unused_settings_notes(&parse(&["train.schedule.kind=cosine"])).is_empty());
        assert!(unused_settings_notes(&parse(&["train.schedule.gamma=0.5"])).is_empty());
    }

    /// data.eval without train.validate is never read: said so.
    #[test]
    fn an_eval_file_without_validation_is_noted() {
        let notes = unused_settings_notes(&parse(&["data.eval=e.jsonl"]));
        assert!(
            notes.len() == 1 && notes[0].contains("train.validate is false"),
            "{notes:?}"
        );
        let validating = parse(&["data.eval=e.jsonl", "train.validate=true"]);
        assert!(unused_settings_notes(&validating).is_empty());
        // validation's own settings, likewise
        let notes = unused_settings_notes(&parse(&[
            "train.val_batch_size=8",
            "train.max_eval_samples=100",
        ]));
        assert_eq!(
            notes,
            [
                "train.val_batch_size (8) is read by validation only, and train.validate is false",
                "train.max_eval_samples (100) is read by validation only, and train.validate is false"
            ]
        );
        let validating = parse(&[
            "data.eval=e.jsonl",
            "train.validate=true",
            "train.val_batch_size=8",
            "train.max_eval_samples=100",
        ]);
        assert!(unused_settings_notes(&validating).is_empty());
        let t = &validating.train;
        assert_eq!((t.eval_batch_size(), t.eval_sample_limit()), (8, Some(100)));
        let t = parse(&["train.batch_size=3"]).train;
        assert_eq!((t.eval_batch_size(), t.eval_sample_limit()), (3, None));
    }

    /// A fresh DoRA adapter starts where PEFT's does: B zero and each magnitude the norm of a row
    /// of its base weight, so the model computes what the base does; FSDP's skeleton (which holds
    /// no weights) reads them from the weight files, to the same values.
    #[test]
    fn dora_magnitudes_start_at_the_base_weights_row_norms() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let model_path = format!("model.path={}", fixtures.join("model").display());
        let sets = [
            model_path.as_str(),
            "model.dtype=fp32",
            "peft={target_modules: [q_proj, fc1], use_dora: true}",
        ];
        let base = crate::model::MllamaModel::load(
            &fixtures.join("model"),
            crate::model::LoadOptions::default(),
        )
        .unwrap();
        let mut norms = std::collections::BTreeMap::new();
        base.visit_params(&mut |n, t| {
            if let Some(path) = n.strip_suffix(".weight").filter(|_| t.dim() == 2) {
                let norm = t.linalg_norm(2.0, [1i64].as_slice(), false, Kind::Float);
                norms.insert(path.to_string(), norm);
            }
        });
        for sharded in [false, true] {
            let (mut model, _) =
                load_model(&parse(&sets), Device::Cpu, sharded.then_some((0, 1))).unwrap();
            let mut n = 0;
            model.visit_linears(&mut |l| {
                if let Some(br) = &l.lora {
                    let m = br.magnitude.as_ref().expect("a DoRA magnitude");
                    assert!(m.equal(&norms[&l.path]), "{} (sharded {sharded})", l.path);
                    assert_eq!(br.b.abs().sum(Kind::Float).double_value(&[]), 0.0);
                    n += 1;
                }
            });
            // q_proj in 3 vision and 3 text layers, fc1 in the 3 vision layers
            assert_eq!(n, 9);
            let magnitudes = (model.trainable_parameters().into_iter())
                .filter(|(k, _)| k.ends_with(".lora_magnitude_vector"))
                .count();
            assert_eq!(magnitudes, n);
        }
        // FSDP's skeleton on two ranks: each reads every other wrapped layer's base weight (the
        // second rank layers 1, 3, ..., its others zero), and their sum is every magnitude
        let load = |rank| load_model(&parse(&sets), Device::Cpu, Some((rank, 2))).unwrap();
        let magnitudes = |model: &mut MllamaModel| {
            let mut all = vec![];
            model.visit_linears(&mut |l| {
                if let Some(br) = &l.lora {
                    all.push((l.path.clone(), br.magnitude.as_ref().unwrap().copy()));
                }
            });
            assert_eq!(all.len(), 9);
            all
        };
        let ((mut first, first_src), (mut second, second_src)) = (load(0), load(1));
        let (_, whole_src) = load_model(&parse(&sets), Device::Cpu, Some((0, 1))).unwrap();
        for (i, (path, m)) in magnitudes(&mut second).into_iter().enumerate() {
            match i % 2 {
                1 => assert!(m.equal(&norms[&path]), "{path}"),
                _ => assert_eq!(m.abs().sum(Kind::Float).double_value(&[]), 0.0, "{path}"),
            }
        }
        let read = |src: Option<WeightSource>| src.unwrap().bytes_read();
        let (first_read, second_read) = (read(first_src), read(second_src));
        assert!(first_read > 0 && second_read > 0);
        assert_eq!(first_read + second_read, read(whole_src), "the whole, once");
        let mut theirs = None;
        second
            .sum_dora_magnitudes(Device::Cpu, |flat| {
                theirs = Some(flat.copy());
                Ok::<_, ()>(())
            })
            .unwrap();
        first
            .sum_dora_magnitudes(Device::Cpu, |flat| {
                let _ = flat.shallow_clone().g_add_(theirs.as_ref().unwrap());
                Ok::<_, ()>(())
            })
            .unwrap();
        for (path, m) in magnitudes(&mut first) {
            assert!(m.equal(&norms[&path]), "{path} (summed)");
        }
    }

    /// peft.init_from an adapter with modules_to_save, on FSDP's skeleton: the module's
    /// parameters stay placeholders and FSDP reads each rank's slices from the adapter's file, so
    /// no rank holds the whole module (the values: train_golden's
    /// `modules_to_save_under_fsdp_losses_match_transformers_peft_adamw`).
    #[test]
    fn saved_modules_from_init_from_stay_in_the_adapter_file_on_a_skeleton() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let model_path = format!("model.path={}", fixtures.join("model").display());
        let init_from = format!(
            "peft.init_from={}",
            fixtures.join("adapter_saved").display()
        );
        let sets = [
            model_path.as_str(),
            "peft={method: lora, r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
            "peft.modules_to_save=[model.multi_modal_projector]",
            init_from.as_str(),
        ];
        let (model, _) = load_model(&parse(&sets), Device::Cpu, Some((0, 2))).unwrap();
        let saved = model
            .saved_in_adapter
            .as_ref()
            .expect("saved in the adapter");
        let names: Vec<&String> = saved.keys.keys().collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| model.saved_params.contains(n)));
        let mut placeholders = 0;
        model.visit_params(&mut |n, t| {
            if names.iter().any(|s| *s == n) {
                assert!(crate::model::weights::is_placeholder(t), "{n}");
                placeholders += 1;
            }
        });
        assert_eq!(placeholders, 2);
        // a whole model loads the values into its parameters, as before
        let (whole, _) = load_model(&parse(&sets), Device::Cpu, None).unwrap();
        assert!(whole.saved_in_adapter.is_none());
    }

    /// A fresh adapter from a peft section with per-layer options wraps the layers PEFT's
    /// get_peft_model wraps with the same LoraConfig, each with PEFT's rank and scaling (recorded
    /// by tests/fixtures/train/make_peft_options_goldens.py, case patterns), under FSDP's
    /// skeleton too.
    #[test]
    fn per_layer_options_wrap_what_peft_wraps() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join("golden_losses_patterns.json")).unwrap(),
        )
        .unwrap();
        let model_path = format!("model.path={}", fixtures.join("model").display());
        let sets = [
            model_path.as_str(),
            "peft={r: 4, alpha: 8, target_modules: [q_proj, v_proj, gate_proj, fc1]}",
            r"peft.rank_pattern={gate_proj: 2, 'layers\.1\.self_attn\.q_proj': 6}",
            "peft.alpha_pattern={v_proj: 16, cross_attn.q_proj: 4}",
            "peft.exclude_modules=[global_transformer.layers.0.mlp.fc1]",
            "peft.layers_to_transform=[0, 1]",
            "peft.layers_pattern=layers",
        ];
        for sharded in [false, true] {
            let (mut model, _) =
                load_model(&parse(&sets), Device::Cpu, sharded.then_some((0, 1))).unwrap();
            let mut layers = serde_json::Map::new();
            model.visit_linears(&mut |l| {
                if let Some(br) = &l.lora {
                    let (rank, scaling) = (br.a.size()[0], br.scaling);
                    layers.insert(
                        l.path.clone(),
                        serde_json::json!({"rank": rank, "scaling": scaling}),
                    );
                }
            });
            assert_eq!(serde_json::Value::Object(layers), golden["layers"]);
        }
        // patterns that give one module two values: refused, naming both (a checkpoint's
        // manifest does not keep their order, which peft would go by)
        let mut overlapping = sets.to_vec();
        overlapping[2] = "peft.rank_pattern={q_proj: 2, self_attn.q_proj: 6}";
        let e = load_model(&parse(&overlapping), Device::Cpu, None)
            .err()
            .expect("overlapping patterns accepted");
        let e = format!("{e:#}");
        assert!(
            e.contains(
                "peft: adapter: rank_pattern: \"q_proj\" gives \
                 model.vision_model.transformer.layers.0.self_attn.q_proj 2, \"self_attn.q_proj\" \
                 gives it 6 (and 3 more modules): patterns that give a module different values \
                 must not overlap"
            ),
            "{e}"
        );
        // the same value twice is no conflict
        overlapping[2] = "peft.rank_pattern={q_proj: 6, self_attn.q_proj: 6}";
        assert!(load_model(&parse(&overlapping), Device::Cpu, None).is_ok());
    }

    /// Under FSDP an init_from adapter's factors are read in fp32 over a bf16 model, so the fp32
    /// masters made from them hold the file's values exactly.
    #[test]
    fn init_from_factors_keep_the_files_fp32_values_under_fsdp() {
        use tch::Tensor;
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train");
        let sets = [
            format!("model.path={}", fixtures.join("model").display()),
            "model.dtype=bf16".to_string(),
            "peft.r=4".to_string(),
            "peft.alpha=8".to_string(),
            "peft.dropout=0.0".to_string(),
            format!("peft.init_from={}", fixtures.join("adapter").display()),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let file: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(fixtures.join("adapter/adapter_model.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let (mut model, _) = load_model(&parse(&sets), Device::Cpu, None).unwrap();
        let factors = model.trainable_parameters();
        assert!(!factors.is_empty());
        let mut rounded = 0;
        for (name, t) in &factors {
            let want = file
                .iter()
                .find(|(k, _)| name.ends_with(k.trim_start_matches("base_model.model.")))
                .map(|(_, v)| v.to_kind(Kind::Float))
                .unwrap_or_else(|| panic!("{name} not in the adapter file"));
            assert_eq!(t.kind(), Kind::Float, "{name}");
            assert!(t.equal(&want), "{name}: not the file's values");
            rounded += usize::from(
                !want
                    .to_kind(Kind::BFloat16)
                    .to_kind(Kind::Float)
                    .equal(&want),
            );
        }
        assert!(
            rounded > 0,
            "the fixture's values are not all bf16-representable"
        );
    }
}
