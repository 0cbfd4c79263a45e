//! `trainer bench step`: optimizer-step time (forward + backward of one global batch, clipping,
//! AdamW; fp32 on the CPU) of our trainer on random-weight Mllama models, LoRA (r 8, alpha 32,
//! q_proj + v_proj) and full finetuning, next to transformers + peft + torch.optim.AdamW
//! (scripts/bench_step.py from .venv) on the same model folder and the same batches, in the same
//! run. At world 1 ours is the plain trainer (`fsdp.enabled: false`) against one PyTorch
//! process; under the launcher at world W ours is the FSDP engine (sharded loading, graphs kept
//! as FSDP2 keeps them, CPU collectives) against PyTorch FSDP2 (`fully_shard`) over gloo at W processes
//! (DDP over gloo if fully_shard refuses the CPU; the engine column says which).
//!
//! Models: `tiny` and `100m` (`bench::decode::model_config`). Batches: `batch` samples of
//! `seq` tokens, each with one 4-tile image; rank r takes rows [r*b, (r+1)*b). Both sides use
//! `threads` intra-op threads per rank (cores / ranks on this host by default). Step time =
//! the median of `steps` timed steps after `warmup`; the peer runs right after ours for each
//! row (rank 0 only), so the two never compete for the cores and see the same load. Each side
//! also reports the median CPU time of its steps (this process, all threads): on a shared,
//! noisy host it moves far less with other processes' load than the wall time does. At world 1 the first step's loss is compared too
//! (LoRA's B starts at zero on both sides, so the initial function is the same).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::config::ShardingStrategy;
use crate::dist::{ProcessGroup, ReduceOp};
use crate::fsdp::{FsdpModel, PlainModel, Trainable, WrapOptions};
use crate::model::{
    Batch, Images, KeyLayout, LoadOptions, LoraConfig, MllamaConfig, MllamaModel, TargetModules,
    WeightSource,
};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

pub struct StepOptions {
    /// `tiny` and/or `100m`.
    pub models: Vec<String>,
    /// `lora` and/or `full`.
    pub modes: Vec<String>,
    /// Samples per optimizer step (the global batch; a multiple of the world size).
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Intra-op threads per rank (both sides).
    pub threads: usize,
    /// Where model folders and batches are written (kept for the peer, removed at the end).
    pub dir: PathBuf,
    /// Python with torch + transformers + peft, and scripts/bench_step.py; None = no peer.
    pub peer: Option<(PathBuf, PathBuf)>,
    /// Our engine's `fsdp.sharding_strategy` at world > 1 (the peer: DDP for no_shard, FSDP2
    /// otherwise).
    pub sharding: ShardingStrategy,
}

pub struct Measurement {
    pub model: String,
    pub mode: String,
    pub world: usize,
    pub engine: &'static str,
    /// What our collectives ran on (`ProcessGroup::transport`: `shm-cma`, `tcp`, ...; `single`
    /// at world 1): the peer runs over gloo's TCP, so the world-2 ratios measure engine and
    /// transport together unless this is `tcp` (`LLAVA_SCO_CPU_TRANSPORT=tcp`).
    pub transport: &'static str,
    pub params: i64,
    pub trainable: i64,
    pub ours_s: f64,
    /// Median CPU seconds per step (this rank's process, all threads).
    pub ours_cpu_s: f64,
    /// Every timed step's wall seconds, in order.
    pub ours_steps_s: Vec<f64>,
    pub ours_loss0: f64,
    pub peer: Option<PeerResult>,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
}

/// What scripts/bench_step.py reports.
pub struct PeerResult {
    /// Median wall seconds per step.
    pub s: f64,
    /// Median CPU seconds per step (NaN from an older script).
    pub cpu_s: f64,
    pub engine: String,
    /// The first step's loss.
    pub loss0: f64,
}

impl Measurement {
    /// ours / peer step time (lower is better for us).
    pub fn ratio(&self) -> Option<f64> {
        self.peer.as_ref().map(|p| self.ours_s / p.s)
    }

    /// ours / peer CPU time per step.
    pub fn cpu_ratio(&self) -> Option<f64> {
        self.peer.as_ref().map(|p| self.ours_cpu_s / p.cpu_s)
    }

    pub fn json(&self) -> Value {
        json!({
            "name": format!("step/{}/{}/world{}", self.model, self.mode, self.world),
            "model": self.model, "mode": self.mode, "world": self.world, "engine": self.engine,
            "transport": self.transport,
            "params": self.params, "trainable_params": self.trainable,
            "batch": self.batch, "seq": self.seq, "threads": self.threads,
            "seconds": self.ours_s, "figure": self.ours_s, "unit": "s/step",
            "cpu_seconds": self.ours_cpu_s, "steps_seconds": self.ours_steps_s,
            "loss0": self.ours_loss0,
            "peer": self.peer.as_ref().map(|p| p.engine.clone()),
            "peer_seconds": self.peer.as_ref().map(|p| p.s),
            "peer_cpu_seconds": self.peer.as_ref().map(|p| p.cpu_s),
            "peer_loss0": self.peer.as_ref().map(|p| p.loss0),
            "ratio": self.ratio(),
            "cpu_ratio": self.cpu_ratio(),
        })
    }
}

/// CPU seconds (user + system) of this process, all threads.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rank 0 writes `dir/<model>/` (random weights) and `dir/<model>-batches.safetensors`.
fn write_inputs(dir: &Path, model: &str, o: &StepOptions) -> Result<()> {
    let folder = dir.join(model);
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let config = crate::bench::decode::model_config(model)?;
    let text = serde_json::to_string_pretty(&config)?;
    let cfg = MllamaConfig::from_json_str(&text)?;
    let m = MllamaModel::random(cfg.clone(), LoadOptions::default(), 1)?;
    m.save_safetensors(&folder.join("model.safetensors"), KeyLayout::ModulePaths)?;
    std::fs::write(folder.join("config.json"), text)?;
    // (B, S) tokens below the vocabulary, the image token at position 1, the first half unsupervised
    let (b, s) = (o.batch as i64, o.seq as i64);
    tch::manual_seed(2);
    let ids = Tensor::randint_low(3, cfg.text.vocab_size, [b, s], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 1, 1).fill_(cfg.image_token_index);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, s / 2).fill_(-100);
    let tiles = cfg.vision.max_num_tiles;
    let px = cfg.vision.image_size;
    let pixel_values = Tensor::randn([b, 1, tiles, 3, px, px], (Kind::Float, Device::Cpu));
    // a 2x2 layout (id 6 of the supported ratios) uses all 4 tiles
    let aspect_ratio_ids = Tensor::full([b, 1], 6, (Kind::Int64, Device::Cpu));
    let aspect_ratio_mask = Tensor::ones([b, 1, tiles], (Kind::Int64, Device::Cpu));
    let cross_attention_mask = Tensor::ones([b, s, 1, tiles], (Kind::Int64, Device::Cpu));
    let attention_mask = Tensor::ones([b, s], (Kind::Int64, Device::Cpu));
    let named = [
        ("input_ids", &ids),
        ("attention_mask", &attention_mask),
        ("labels", &labels),
        ("pixel_values", &pixel_values),
        ("aspect_ratio_ids", &aspect_ratio_ids),
        ("aspect_ratio_mask", &aspect_ratio_mask),
        ("cross_attention_mask", &cross_attention_mask),
    ];
    let batches = dir.join(format!("{model}-batches.safetensors"));
    Tensor::write_safetensors(&named, &batches)?;
    // flush the ~0.5 GB just written, so that its writeback does not share the cores with the
    // first row's timed steps (the peer's row never had it)
    for f in [folder.join("model.safetensors"), batches] {
        std::fs::File::open(&f)
            .and_then(|h| h.sync_all())
            .with_context(|| format!("flushing {}", f.display()))?;
    }
    Ok(())
}

/// This rank's rows of the global batch, and the global supervised-token count.
fn read_batch(path: &Path, rank: usize, world: usize) -> Result<(Batch, i64)> {
    let t: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(path)?.into_iter().collect();
    let get = |k: &str| -> Result<Tensor> {
        let v = t
            .get(k)
            .with_context(|| format!("{}: no {k}", path.display()))?;
        let n = v.size()[0] / world as i64;
        Ok(v.narrow(0, rank as i64 * n, n))
    };
    let labels = &t["labels"];
    let tokens = labels
        .narrow(1, 1, labels.size()[1] - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]);
    let batch = Batch {
        input_ids: get("input_ids")?,
        attention_mask: Some(get("attention_mask")?),
        labels: Some(get("labels")?),
        images: Some(Images {
            pixel_values: get("pixel_values")?,
            aspect_ratio_ids: get("aspect_ratio_ids")?,
            aspect_ratio_mask: get("aspect_ratio_mask")?,
            cross_attention_mask: get("cross_attention_mask")?,
        }),
    };
    Ok((batch, tokens))
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
    }
}

/// Our model at this rank: plain at world 1, FSDP (sharded loading) otherwise.
fn build(
    pg: &ProcessGroup,
    folder: &Path,
    mode: &str,
    sharding: ShardingStrategy,
) -> Result<(Trainable, i64, i64)> {
    let opts = LoadOptions::default();
    let world = pg.world_size();
    let mut model = if world == 1 {
        MllamaModel::load(folder, opts)?
    } else {
        let src = WeightSource::open_dir(folder)?;
        let cfg = MllamaConfig::from_file(&folder.join("config.json"))?;
        MllamaModel::skeleton(cfg, &src, opts)?
    };
    if mode == "lora" {
        model.apply_lora(&lora(), 0)?;
    }
    let mut params = 0i64;
    model.visit_params(&mut |_, t| params += t.numel() as i64);
    let lora_params: i64 = model
        .trainable_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let trainable = if mode == "lora" { lora_params } else { params };
    let t = if world == 1 {
        Trainable::Plain(Box::new(PlainModel::new(model)))
    } else {
        let src = WeightSource::open_dir(folder)?;
        let wrap = WrapOptions {
            compute: Kind::Float,
            prefetch: true,
            // FSDP2's peer keeps its graphs too (no activation checkpointing), and each layer
            // gathered from its forward to its backward (reshard_after_forward=False), as ours
            // does when it keeps graphs
            activation_checkpointing: false,
            sharding,
            sharding_group_size: world, // (hybrid_shard is refused above)
        };
        Trainable::Fsdp(Box::new(FsdpModel::wrap_from_source(
            model, &src, pg, wrap,
        )?))
    };
    Ok((t, params + lora_params, trainable))
}

/// Our step times at this rank's share.
struct OursTimes {
    /// Wall seconds of each timed step.
    steps: Vec<f64>,
    /// CPU seconds of each timed step.
    cpu: Vec<f64>,
    loss0: f64,
}

/// Our step times at this rank's share, and the first step's loss.
fn time_ours(
    pg: &ProcessGroup,
    trainable: &mut Trainable,
    batch: &Batch,
    tokens: i64,
    o: &StepOptions,
) -> Result<OursTimes> {
    let params = trainable.master_params();
    // no weight decay, as the peer's torch.optim.AdamW(weight_decay=0.0)
    let config = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(config, &params);
    let (mut times, mut cpu, mut loss0) = (vec![], vec![], None);
    for i in 0..o.warmup + o.steps {
        pg.barrier()?;
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        trainable.zero_grads();
        let sum = trainable.forward_backward(pg, batch, 1.0 / tokens as f64, i as u64)?;
        let grads = trainable.grads();
        clip_grad_norm(&grads, Some(1.0), trainable.norm_group(pg))?;
        opt.step(&params, &grads, 1e-5);
        trainable.after_update();
        let (dt, dc) = (t0.elapsed().as_secs_f64(), process_cpu_seconds() - c0);
        if loss0.is_none() {
            let t = Tensor::from_slice(&[sum]);
            pg.all_reduce(&t, ReduceOp::Sum)?;
            loss0 = Some(t.double_value(&[0]) / tokens as f64);
        }
        if i >= o.warmup {
            times.push(dt);
            cpu.push(dc);
        }
    }
    Ok(OursTimes {
        steps: times,
        cpu,
        loss0: loss0.unwrap_or(f64::NAN),
    })
}

fn run_peer(
    python: &Path,
    script: &Path,
    folder: &Path,
    batches: &Path,
    mode: &str,
    world: usize,
    o: &StepOptions,
) -> Result<PeerResult> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--model")
        .arg(folder)
        .arg("--batches")
        .arg(batches)
        .args(["--mode", mode])
        .args(["--steps", &o.steps.to_string()])
        .args(["--warmup", &o.warmup.to_string()])
        .args(["--world", &world.to_string()])
        .args(["--threads", &o.threads.to_string()])
        .args(["--sharding", o.sharding.name()])
        // the peer's own rendezvous, not the launcher's
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("LOCAL_RANK");
    let v = super::peer_json(cmd, script)?;
    Ok(PeerResult {
        s: v["median_s"].as_f64().context("peer: no median_s")?,
        cpu_s: v["median_cpu_s"].as_f64().unwrap_or(f64::NAN),
        engine: v["engine"].as_str().unwrap_or("?").to_string(),
        loss0: v["loss0"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Every (model, mode) at this process group's world size; rank 0 returns the measurements
/// (after running the peer), other ranks an empty list.
pub fn run(pg: &ProcessGroup, o: &StepOptions) -> Result<Vec<Measurement>> {
    let (rank, world) = (pg.rank(), pg.world_size());
    if o.sharding.is_hybrid() {
        bail!("--sharding {}: bench step does not run HSDP (it needs shard groups of a node's ranks, and there is no HSDP peer); give full_shard, shard_grad_op or no_shard", o.sharding.name());
    }
    if o.batch == 0 || !o.batch.is_multiple_of(world) {
        bail!(
            "--batch {} must be a positive multiple of the world size {world}",
            o.batch
        );
    }
    tch::set_num_threads(o.threads as i32);
    if rank == 0 {
        for m in &o.models {
            write_inputs(&o.dir, m, o)?;
        }
    }
    pg.barrier()?;
    let mut ours = vec![];
    for m in &o.models {
        let batches = o.dir.join(format!("{m}-batches.safetensors"));
        let (batch, tokens) = read_batch(&batches, rank, world)?;
        for mode in &o.modes {
            if mode != "lora" && mode != "full" {
                bail!("--modes: unknown mode `{mode}` (expected lora or full)");
            }
            let (mut t, params, trainable) = build(pg, &o.dir.join(m), mode, o.sharding)?;
            let times = time_ours(pg, &mut t, &batch, tokens, o)?;
            drop(t);
            // the peer right after ours (rank 0 only; the other ranks wait at the barrier), so a
            // change in the machine's load hits both sides of a row alike
            pg.barrier()?;
            let peer = match (&o.peer, rank) {
                (Some((python, script)), 0) => Some(run_peer(
                    python,
                    script,
                    &o.dir.join(m),
                    &batches,
                    mode,
                    world,
                    o,
                )?),
                _ => None,
            };
            pg.barrier()?;
            ours.push(Measurement {
                model: m.clone(),
                mode: mode.clone(),
                world,
                engine: match (world, o.sharding) {
                    (1, _) => "plain",
                    (_, ShardingStrategy::NoShard) => "fsdp no_shard",
                    (_, ShardingStrategy::ShardGradOp | ShardingStrategy::HybridShardZero2) => {
                        "fsdp shard_grad_op"
                    }
                    (_, ShardingStrategy::FullShard | ShardingStrategy::HybridShard) => "fsdp",
                },
                transport: pg.transport(),
                params,
                trainable,
                ours_s: median(times.steps.clone()),
                ours_cpu_s: median(times.cpu),
                ours_steps_s: times.steps,
                ours_loss0: times.loss0,
                peer,
                threads: o.threads,
                batch: o.batch,
                seq: o.seq,
            });
        }
    }
    pg.barrier()?;
    if rank != 0 {
        return Ok(vec![]);
    }
    let _ = std::fs::remove_dir_all(&o.dir);
    Ok(ours)
}

pub fn table(ms: &[Measurement]) -> String {
    let mut s = format!(
        "{:<6} {:<5} {:>5} {:>11} {:>10} {:>10} {:>7} {:>9}  {}\n",
        "model", "mode", "world", "params", "ours s", "peer s", "ratio", "cpu ratio", "peer"
    );
    let x = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
    for m in ms {
        let (ps, engine) = m
            .peer
            .as_ref()
            .map_or(("-".to_string(), "-".to_string()), |p| {
                (format!("{:.4}", p.s), p.engine.clone())
            });
        s += &format!(
            "{:<6} {:<5} {:>5} {:>11} {:>10.4} {:>10} {:>7} {:>9}  {}\n",
            m.model,
            m.mode,
            m.world,
            m.params,
            m.ours_s,
            ps,
            x(m.ratio()),
            x(m.cpu_ratio()),
            engine
        );
    }
    s
}
