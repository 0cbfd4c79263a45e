//! Sharded training of the Mllama model (DESIGN.md decision 3: FSDP without autograd hooks).
//! Module index:
//! - `units`:    which unit each parameter belongs to (root, vision local/global layers, text layers)
//! - `flat`:     a unit's flat parameter groups: shard, all-gather into views, free, reduce-scatter
//! - `schedule`: the forward (no graph, keep unit inputs) and reverse recompute-backward walks
//! - `plain`:    `fsdp.enabled: false`, single-process autograd training (the baseline)
//! - this file:  [`FsdpModel`] (wrap a loaded model) and [`Trainable`], the one interface the loop uses
//!
//! State that a checkpoint must save (issue 8): per unit and group, the shard (`FlatGroup::shard`:
//! fp32 master for trainable groups) with its layout (`FlatGroup::params`: name, shape, offset in
//! the unpadded flat buffer; `shard_len`, `shard_world`), and the optimizer moments, which are laid out
//! exactly like `Trainable::master_params()` (see `optim::AdamW::moments`).
pub mod flat;
pub mod plain;
pub mod schedule;
pub mod units;

use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::config::{DType, ShardingStrategy};
use crate::dist::{DistError, ProcessGroup, ReduceOp};
use crate::model::{KeyLayout, MllamaModel, ModelError, WeightSource};
use crate::optim::Segment;

pub use flat::{FlatGroup, ParamRef, Unit};
pub use plain::PlainModel;
pub use units::{UnitLayout, ROOT};

#[derive(Debug, thiserror::Error)]
pub enum FsdpError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    #[error("fsdp: {0}")]
    Invalid(String),
}

/// The dtype of a config value.
pub fn kind_of(d: DType) -> Kind {
    match d {
        DType::Bf16 => Kind::BFloat16,
        DType::Fp16 => Kind::Half,
        DType::Fp32 => Kind::Float,
    }
}

/// (trainable, dtype, parameters) of one flat group before sharding.
type GroupParams = (bool, Kind, Vec<(String, Tensor)>);

/// How to wrap.
#[derive(Debug, Clone, Copy)]
pub struct WrapOptions {
    /// Dtype of gathered parameters and of the computation (`fsdp.mixed_precision`).
    pub compute: Kind,
    /// Start the next unit's all-gather before computing the current one.
    pub prefetch: bool,
    /// `fsdp.activation_checkpointing`: recompute each unit in backward (true) or keep the
    /// forward's graphs and gathered units until backward (false).
    pub activation_checkpointing: bool,
    /// `fsdp.sharding_strategy`.
    pub sharding: ShardingStrategy,
    /// `hybrid_shard`: the ranks each shard group holds (`fsdp.sharding_group_size`, resolved:
    /// a divisor of the world size); the others ignore it.
    pub sharding_group_size: usize,
}

/// `hybrid_shard` (HSDP): parameters are sharded within a shard group of G consecutive ranks
/// (rank q * G + g holds shard g, as PyTorch's device mesh (replicate, shard) numbers them: one
/// node's ranks when G is the ranks per node) and replicated across the R = W / G shard groups;
/// gradients are reduce-scattered within the shard group in each backward, and the accumulated
/// shards all-reduced across the replica group (the ranks holding the same shard) once per
/// optimizer step (`FsdpModel::sync_replicas`: the sum is linear, so one all-reduce per step
/// replaces one per micro-batch).
#[derive(Clone)]
pub struct Hybrid {
    pub shard: Rc<ProcessGroup>,
    pub replicate: Rc<ProcessGroup>,
}

impl std::fmt::Debug for Hybrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Hybrid {{ shard: {} of {}, replicate: {} of {} }}",
            self.shard.rank(),
            self.shard.world_size(),
            self.replicate.rank(),
            self.replicate.world_size()
        )
    }
}

impl Hybrid {
    /// The shard and replica groups of this rank for shard groups of `g` ranks (every rank calls
    /// it; `g` divides the world size).
    pub fn new(pg: &ProcessGroup, g: usize) -> Result<Self, FsdpError> {
        // (groups of a second model wrapped in this process get names of their own: every rank
        // wraps in the same order, as torch numbers its new_group calls)
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (rank, world) = (pg.rank(), pg.world_size());
        let (q, i) = (rank / g, rank % g);
        let shard: Vec<usize> = (q * g..(q + 1) * g).collect();
        let replicate: Vec<usize> = (i..world).step_by(g).collect();
        Ok(Hybrid {
            shard: Rc::new(pg.new_group(&shard, &format!("hsdp{n}-shard-{q}"))?),
            replicate: Rc::new(pg.new_group(&replicate, &format!("hsdp{n}-replicate-{i}"))?),
        })
    }
}

/// The model sharded over the process group: every parameter lives in its unit's flat shard.
#[derive(Debug)]
pub struct FsdpModel {
    /// The single-device model whose parameter tensors are views of gathered units (or empty).
    pub model: MllamaModel,
    pub layout: UnitLayout,
    pub units: Vec<Unit>,
    pub compute: Kind,
    pub prefetch: bool,
    /// No activation checkpointing: keep each stage's graph (and its unit gathered) from the
    /// forward to its backward instead of recomputing (see `schedule`).
    pub keep_graphs: bool,
    /// `shard_grad_op`: a layer unit gathered for the forward stays gathered until its backward
    /// (which then recomputes without gathering again).
    pub keep_gathered: bool,
    /// `no_shard`: every group is whole on every rank (`FlatGroup::replicated`).
    pub replicated: bool,
    /// `hybrid_shard`: the shard and replica groups (set by `wrap`; `shard` leaves it None).
    pub hybrid: Option<Hybrid>,
    /// The shards this rank's groups are cut into: W, 1 replicated, G for `hybrid_shard` (this
    /// rank holds shard `rank mod shard_world`).
    pub shard_world: usize,
    /// Supervised rows per LM-head chunk in the loss (`model::lm_loss_chunk_rows` of the vocabulary;
    /// tests set fewer to make the chunking visible on small fixtures).
    pub lm_loss_chunk: i64,
    pub rank: usize,
    pub world: usize,
}

/// Trainable parameters of the model as (name, tensor sharing storage with the model), after
/// marking them as requiring gradients: the LoRA factors when LoRA is applied, else the base
/// parameters full finetuning trains (every one, or `MllamaModel::full_finetune_trains`'s).
pub fn mark_trainable(model: &mut MllamaModel) -> Vec<(String, Tensor)> {
    let v = if model.lora.is_some() {
        model.trainable_parameters()
    } else {
        let mut v = vec![];
        model.visit_params(&mut |n, t| {
            if model.full_finetune_trains(n) {
                v.push((n.to_string(), t.shallow_clone()))
            }
        });
        v
    };
    for (_, t) in &v {
        let _ = t.set_requires_grad(true);
    }
    retie(model);
    v
}

/// With tied embeddings, lm_head's weight is a view of the embedding: rebuild it after the
/// embedding's data changed (FSDP gather) or started requiring grad.
pub fn retie(model: &mut MllamaModel) {
    if model.lm_head_tied {
        let v = model.config.text.vocab_size;
        model.lm_head.weight = model.text.embed_tokens.narrow(0, 0, v);
    }
}

/// Drops the tied lm_head view of the embedding (after the embedding's gathered buffer is freed);
/// `retie` rebuilds it after the next gather.
pub fn untie(model: &mut MllamaModel) {
    if model.lm_head_tied {
        let w = &model.lm_head.weight;
        model.lm_head.weight = Tensor::empty([0], (w.kind(), w.device()));
    }
}

impl FsdpModel {
    /// Shards a fully loaded model (LoRA already applied) over `pg`: groups every parameter by
    /// unit and (trainable, dtype), keeps this rank's slice, and frees the rest.
    pub fn wrap(
        model: MllamaModel,
        pg: &ProcessGroup,
        opts: WrapOptions,
    ) -> Result<FsdpModel, FsdpError> {
        Self::shard(model, None, pg.rank(), pg.world_size(), opts)?.with_groups(pg, opts)
    }

    /// `hybrid_shard`: sets up the shard and replica groups (every rank takes part). One shard
    /// group of every rank is full_shard: no groups then.
    fn with_groups(mut self, pg: &ProcessGroup, opts: WrapOptions) -> Result<Self, FsdpError> {
        if opts.sharding.is_hybrid() && self.shard_world < self.world {
            self.hybrid = Some(Hybrid::new(pg, self.shard_world)?);
        }
        Ok(self)
    }

    /// `hybrid_shard`: sums the gradient shards over the replica group (after the backwards of
    /// an optimizer step's micro-batches, before the gradient norm); nothing otherwise.
    pub fn sync_replicas(&mut self) -> Result<(), FsdpError> {
        let Some(h) = &self.hybrid else {
            return Ok(());
        };
        let works = self
            .trainable_groups()
            .filter_map(|g| g.grad.as_ref())
            .map(|grad| h.replicate.all_reduce_async(grad, ReduceOp::Sum))
            .collect::<Result<Vec<_>, _>>()?;
        for w in works {
            w.wait()?;
        }
        Ok(())
    }

    /// The group the units gather and reduce-scatter over: `pg`, or HSDP's shard group. A model
    /// sharded in fewer pieces than `pg` has ranks (`shard` with hybrid_shard, without the
    /// groups `wrap` sets up) is an error, not gradients reduced over the wrong ranks.
    pub(crate) fn unit_group<'a>(
        hybrid: Option<&'a Hybrid>,
        pg: &'a ProcessGroup,
        shard_world: usize,
        replicated: bool,
    ) -> Result<&'a ProcessGroup, FsdpError> {
        let group = hybrid.map_or(pg, |h| &*h.shard);
        if !replicated && group.world_size() != shard_world {
            return Err(FsdpError::Invalid(format!(
                "the model is sharded in {shard_world} pieces but the group has {} ranks (wrap it with FsdpModel::wrap, which sets up hybrid_shard's groups)",
                group.world_size()
            )));
        }
        Ok(group)
    }

    /// Sharded loading: `model` is a [`MllamaModel::skeleton`] of `src` (placeholder base
    /// weights; LoRA factors materialized), and this rank reads only its slices of every base
    /// parameter from `src`, so a rank materializes about 1/W of the model's bytes.
    pub fn wrap_from_source(
        model: MllamaModel,
        src: &WeightSource,
        pg: &ProcessGroup,
        opts: WrapOptions,
    ) -> Result<FsdpModel, FsdpError> {
        Self::shard(model, Some(src), pg.rank(), pg.world_size(), opts)?.with_groups(pg, opts)
    }

    /// Shards `model` as rank `rank` of `world` (no collective is involved, so tests can build
    /// every rank's shards in one process). Base parameters found in `src` are read from it
    /// slice by slice; all other parameters are sliced from their tensors.
    pub fn shard(
        mut model: MllamaModel,
        src: Option<&WeightSource>,
        rank: usize,
        world: usize,
        opts: WrapOptions,
    ) -> Result<FsdpModel, FsdpError> {
        let layout = UnitLayout::new(&model.config);
        let trainable = mark_trainable(&mut model);
        let trainable_names: std::collections::HashSet<String> =
            trainable.iter().map(|(n, _)| n.clone()).collect();
        // every parameter, in module order: base parameters, then LoRA factors
        let mut all: Vec<(String, Tensor, bool)> = vec![];
        model.visit_params(&mut |n, t| {
            all.push((
                n.to_string(),
                t.shallow_clone(),
                trainable_names.contains(n),
            ))
        });
        if model.lora.is_some() {
            // (the factors: parameters of modules to save are base parameters, listed above)
            let factors = trainable
                .into_iter()
                .filter(|(n, _)| !model.saved_params.contains(n));
            all.extend(factors.map(|(n, t)| (n, t, true)));
        }
        // group per unit, then per (trainable, kind), keeping first-seen order
        let mut per_unit: Vec<Vec<GroupParams>> = (0..layout.count()).map(|_| vec![]).collect();
        for (name, t, tr) in all {
            let u = layout.unit_of(&name);
            let kind = if tr { Kind::Float } else { t.kind() };
            let groups = &mut per_unit[u];
            match groups.iter_mut().find(|g| g.0 == tr && g.1 == kind) {
                Some(g) => g.2.push((name, t)),
                None => groups.push((tr, kind, vec![(name, t)])),
            }
        }
        model.options.dtype = opts.compute;
        let replicated = opts.sharding == ShardingStrategy::NoShard;
        let (shard_rank, shard_world) = match opts.sharding {
            ShardingStrategy::NoShard => (0, 1),
            ShardingStrategy::HybridShard | ShardingStrategy::HybridShardZero2 => {
                let g = opts.sharding_group_size;
                if g == 0 || !world.is_multiple_of(g) {
                    return Err(FsdpError::Invalid(format!(
                        "hybrid_shard: shard groups of {g} ranks do not divide the {world} ranks"
                    )));
                }
                (rank % g, g)
            }
            _ => (rank, world),
        };
        let source = src.map(|s| {
            let names = s.names_and_shapes().map(|(n, _)| n);
            (s, KeyLayout::detect(names))
        });
        let mut units = Vec::with_capacity(per_unit.len());
        for (u, groups) in per_unit.into_iter().enumerate() {
            let groups = groups
                .into_iter()
                .map(|(tr, _, params)| {
                    let g = FlatGroup::shard_from(
                        params,
                        source,
                        model.saved_in_adapter.as_ref(),
                        tr,
                        shard_rank,
                        shard_world,
                        opts.compute,
                    )?;
                    Ok::<_, FsdpError>(if replicated { g.replicated() } else { g })
                })
                .collect::<Result<_, _>>()?;
            units.push(Unit {
                name: layout.name(u),
                groups,
                gathered: false,
            });
        }
        model.set_training(true);
        // a tied lm_head is a view of the whole unsharded embedding (vocab x hidden) until it is
        // rebuilt after the first gather: drop it now, not at the end of the first step
        untie(&mut model);
        let lm_loss_chunk = crate::model::lm_loss_chunk_rows(model.config.text.vocab_size);
        Ok(FsdpModel {
            model,
            layout,
            units,
            compute: opts.compute,
            prefetch: opts.prefetch,
            keep_graphs: !opts.activation_checkpointing,
            keep_gathered: opts.sharding.keeps_gathered(),
            replicated,
            hybrid: None,
            shard_world,
            lm_loss_chunk,
            rank,
            world,
        })
    }

    pub(crate) fn retie(&mut self) {
        retie(&mut self.model);
    }

    /// Trainable fp32 master shards, in unit order (the optimizer's parameters).
    pub fn master_params(&self) -> Vec<Tensor> {
        self.trainable_groups()
            .map(|g| g.shard.shallow_clone())
            .collect()
    }

    /// Gradient shards, same order as `master_params`.
    pub fn grads(&self) -> Vec<Tensor> {
        self.trainable_groups()
            .map(|g| g.grad.as_ref().expect("trainable group").shallow_clone())
            .collect()
    }

    /// Per gradient shard (`grads` order) and parameter: whether it got a gradient from this
    /// rank since `zero_grads` (combine over ranks before use: a parameter may train on another
    /// rank only).
    pub fn grad_present(&self) -> Vec<Vec<bool>> {
        self.trainable_groups()
            .map(|g| g.got_grad.clone())
            .collect()
    }

    /// Per master shard, its parameters' elements (`AdamW::with_segments`).
    pub fn optimizer_segments(&self) -> Vec<Vec<Segment>> {
        self.trainable_groups()
            .map(|g| g.segments(self.rank % self.shard_world))
            .collect()
    }

    pub fn zero_grads(&mut self) {
        for g in self.units.iter_mut().flat_map(|u| u.groups.iter_mut()) {
            if let Some(gr) = &mut g.grad {
                let _ = gr.zero_();
            }
            g.got_grad.iter_mut().for_each(|f| *f = false);
        }
    }

    fn trainable_groups(&self) -> impl Iterator<Item = &FlatGroup> {
        self.units
            .iter()
            .flat_map(|u| u.groups.iter())
            .filter(|g| g.trainable)
    }

    /// Bytes of parameters resident on this rank (shards plus any gathered parameter views).
    pub fn resident_param_bytes(&self) -> i64 {
        self.units.iter().map(Unit::resident_bytes).sum()
    }

    /// Full trainable parameters (fp32, CPU) by name; every rank must call it.
    pub fn gather_trainable(&self, pg: &ProcessGroup) -> Result<Vec<(String, Tensor)>, FsdpError> {
        let pg = Self::unit_group(self.hybrid.as_ref(), pg, self.shard_world, self.replicated)?;
        let mut v = vec![];
        for u in &self.units {
            v.extend(u.gather_trainable_full(pg)?);
        }
        Ok(v)
    }
}

/// What the training loop drives: the FSDP-sharded model or the plain single-process one.
#[derive(Debug)]
pub enum Trainable {
    Fsdp(Box<FsdpModel>),
    Plain(Box<PlainModel>),
}

impl Trainable {
    /// Forward + backward of one micro-batch, gradients accumulated; returns this rank's loss sum.
    pub fn forward_backward(
        &mut self,
        pg: &ProcessGroup,
        batch: &crate::model::Batch,
        loss_scale: f64,
        seed: u64,
    ) -> Result<f64, FsdpError> {
        match self {
            Self::Fsdp(m) => m.forward_backward(pg, batch, loss_scale, seed),
            Self::Plain(m) => {
                // dropout draws from the global generator: seeded per micro-batch as the FSDP
                // stages are, so a resumed run replays the same masks
                tch::manual_seed((seed & i64::MAX as u64) as i64);
                m.forward_backward(batch, loss_scale)
            }
        }
    }

    /// Loss sum of a micro-batch without gradients (validation).
    pub fn forward_loss(
        &mut self,
        pg: &ProcessGroup,
        batch: &crate::model::Batch,
    ) -> Result<f64, FsdpError> {
        match self {
            Self::Fsdp(m) => m.forward_loss(pg, batch),
            Self::Plain(m) => m.forward_loss(batch),
        }
    }

    /// The fp32 tensors the optimizer updates (FSDP: this rank's master shards).
    pub fn master_params(&self) -> Vec<Tensor> {
        match self {
            Self::Fsdp(m) => m.master_params(),
            Self::Plain(m) => m.master_params(),
        }
    }

    /// Their fp32 gradients (FSDP: shard gradients, already summed over ranks).
    pub fn grads(&mut self) -> Vec<Tensor> {
        match self {
            Self::Fsdp(m) => m.grads(),
            Self::Plain(m) => m.grads(),
        }
    }

    /// The group over which the squared norms of `grads` add up to the gradient norm: the one
    /// whose ranks hold the shards of every gradient (all of `pg`, HSDP's shard group), or None
    /// where each rank holds whole gradients alike (`no_shard`, the plain trainer).
    pub fn norm_group<'a>(&'a self, pg: &'a ProcessGroup) -> Option<&'a ProcessGroup> {
        match self {
            Self::Fsdp(m) if m.replicated => None,
            Self::Fsdp(m) => Some(m.hybrid.as_ref().map_or(pg, |h| &*h.shard)),
            Self::Plain(_) => None,
        }
    }

    /// Per gradient (`grads` order) and parameter segment in it (`optimizer_segments`): whether
    /// it is one, or zeros standing for "no gradient" (the parameter took no part: cross-attention
    /// and vision on text-only micro-batches). FSDP: this rank's view; the caller takes the
    /// maximum over ranks.
    pub fn grad_present(&self) -> Vec<Vec<bool>> {
        match self {
            Self::Fsdp(m) => m.grad_present(),
            Self::Plain(m) => m.grad_present().into_iter().map(|p| vec![p]).collect(),
        }
    }

    /// Where each parameter lies in the optimizer's tensors (`master_params` order).
    pub fn optimizer_segments(&self) -> Vec<Vec<Segment>> {
        match self {
            Self::Fsdp(m) => m.optimizer_segments(),
            Self::Plain(m) => m
                .master_params()
                .iter()
                .map(|t| vec![Segment::whole(t)])
                .collect(),
        }
    }

    /// Before the gradient norm of a step: HSDP sums the gradient shards across its copies.
    pub fn sync_replicas(&mut self) -> Result<(), FsdpError> {
        match self {
            Self::Fsdp(m) => m.sync_replicas(),
            Self::Plain(_) => Ok(()),
        }
    }

    /// After the optimizer step (plain: copy fp32 masters into lower-precision parameters).
    pub fn after_update(&mut self) {
        if let Self::Plain(m) = self {
            m.after_update();
        }
    }

    pub fn zero_grads(&mut self) {
        match self {
            Self::Fsdp(m) => m.zero_grads(),
            Self::Plain(m) => m.zero_grads(),
        }
    }

    pub fn resident_param_bytes(&self) -> i64 {
        match self {
            Self::Fsdp(m) => m.resident_param_bytes(),
            Self::Plain(m) => m.resident_param_bytes(),
        }
    }

    pub fn model(&self) -> &MllamaModel {
        match self {
            Self::Fsdp(m) => &m.model,
            Self::Plain(m) => &m.model,
        }
    }

    /// Full trainable parameters (fp32, CPU) by name; every rank must call it.
    pub fn gather_trainable(&self, pg: &ProcessGroup) -> Result<Vec<(String, Tensor)>, FsdpError> {
        match self {
            Self::Fsdp(m) => m.gather_trainable(pg),
            Self::Plain(m) => Ok(m.trainable_full()),
        }
    }
}
