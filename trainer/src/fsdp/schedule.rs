//! The explicit FSDP schedule (DESIGN.md decision 3): the model's forward cut into stages, each
//! run by one unit. Forward runs the stages in order without a graph, keeping each stage's
//! inputs; backward walks them in reverse: gather, recompute with grad from the kept inputs,
//! `run_backward` on `(out * grad_out).sum()` for the input and trainable-parameter gradients,
//! reduce-scatter the parameter gradients into shard gradients, free.
//!
//! Stages (unit in brackets): stem [root] -> local layers [one each] -> post [root] -> global
//! layers [one each] -> head (drop padding, concat intermediates, projector) [root] -> embed
//! [root] -> text layers [one each] -> out (norm, lm_head, loss sum) [root]. The root stays
//! gathered for the whole micro-batch (as FSDP does for its root); layer units are gathered one
//! at a time, with the next one's all-gather in flight when `prefetch` is on. Every rank issues
//! the same collectives in the same order whatever its batch holds: a stage with nothing to do
//! (no images) still gathers its unit and reduce-scatters zero gradients.
//!
//! `fsdp.activation_checkpointing: false` ([`FsdpModel::keep_graphs`]): the forward runs every
//! stage whose output needs a gradient *with* a graph, from detached leaf copies of its inputs,
//! and keeps (inputs, output) with the unit still gathered; backward then runs `run_backward` on
//! the kept output instead of gathering and recomputing, and frees the unit after its gradients
//! are reduce-scattered. Same operations, same dropout seeds, so the same numbers; no recompute
//! and no backward all-gathers, for the memory of every gathered unit and every stage's
//! activations at once (see `FsdpConfig::activation_checkpointing`).
//!
//! `fsdp.sharding_strategy: shard_grad_op` ([`FsdpModel::keep_gathered`]): the forward leaves
//! the unit of every stage the backward will run gathered, and the backward recomputes it
//! without gathering again (one all-gather per unit and micro-batch instead of two, for the
//! memory of the gathered model). `no_shard`: the groups are whole on every rank, so the same
//! walk gathers without collectives and all-reduces the gradients (`flat`).
//!
//! The out stage with more supervised rows than `lm_loss_chunk` is differentiated by
//! [`out_backward`]: the LM head and the cross-entropy a chunk of rows at a time, in the forward
//! (its value) and in the backward, so the (N, vocab) fp32 logits, their softmax and their
//! gradient never exist whole. It is then recomputed in the backward even when graphs are kept
//! (one more LM-head forward); with one chunk's rows or fewer it is an ordinary stage.
use tch::{Kind, Tensor};

use crate::dist::ProcessGroup;
use crate::model::attn_tape;
use crate::model::text::TextContext;
use crate::model::vision::VisionPrep;
use crate::model::{
    lm_chunk_loss, lm_loss_chunked, row_chunks, supervised_rows, Batch, MllamaModel, ModelError,
};

use super::flat::{Gathering, Reducing};
use super::units::ROOT;
use super::{FsdpError, FsdpModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Stem,
    Local(usize),
    Post,
    Global(usize),
    Head,
    Embed,
    Text(usize),
    Out,
}

#[derive(Debug)]
struct Stage {
    op: Op,
    unit: usize,
    /// Value ids read (kept from forward for the recompute).
    inputs: Vec<usize>,
    output: usize,
    /// False: nothing to compute (no images): vision stages produce nothing, a cross-attention
    /// layer passes its hidden states through.
    active: bool,
}

/// Which of the root unit's stages hold a trainable parameter (the root unit holds the vision
/// stem and post-norm, the projector, the embedding and the LM head): LoRA on the projector alone
/// then marks only the head stage as training, not the stem, so the 40 vision layers are not
/// recomputed with a graph and differentiated down to a stem that takes no gradient. `None`
/// (every root stage trains, as the unit does) for a trainable parameter of no known stage, and
/// for tied embeddings (the LM head's gradient reaches the embedding).
fn root_ops_training(fm: &FsdpModel) -> Option<Vec<Op>> {
    if fm.model.lm_head_tied {
        return None;
    }
    let mut ops = vec![];
    for g in fm.units[ROOT].groups.iter().filter(|g| g.trainable) {
        for p in &g.params {
            let name = p.name.strip_prefix("base_model.model.").unwrap_or(&p.name);
            let vision = |parts: &[&str]| {
                name.strip_prefix("model.vision_model.")
                    .is_some_and(|rest| parts.iter().any(|x| rest.starts_with(x)))
            };
            let op = if vision(&[
                "patch_embedding",
                "class_embedding",
                "gated_positional_embedding",
                "pre_tile_positional_embedding",
                "layernorm_pre",
            ]) {
                Op::Stem
            } else if vision(&["layernorm_post", "post_tile_positional_embedding"]) {
                Op::Post
            } else if name.starts_with("model.multi_modal_projector") {
                Op::Head
            } else if name.starts_with("model.language_model.embed_tokens") {
                Op::Embed
            } else if name.starts_with("model.language_model.norm") || name.starts_with("lm_head") {
                Op::Out
            } else {
                return None;
            };
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
    }
    Some(ops)
}

/// One micro-batch's stage list and the constants its stages read.
struct Plan {
    stages: Vec<Stage>,
    n_values: usize,
    /// Whether a value needs a gradient (something upstream trains).
    needs_grad: Vec<bool>,
    /// Whether a value may need one on some rank: `needs_grad` as if this micro-batch had images
    /// (so the same on every rank). A layer stage whose output never does is skipped by the
    /// backward, gathers included (a frozen vision tower, frozen leading layers).
    may_need_grad: Vec<bool>,
    vision: Option<VisionPrep>,
    pixel_values: Option<Tensor>,
    input_ids: Tensor,
    /// The labels' supervised rows (N,) and their targets (N,) (`model::supervised_rows`).
    supervised: Option<(Tensor, Tensor)>,
    ctx: TextContext,
    /// Supervised rows per LM-head chunk in the out stage.
    lm_chunk: i64,
}

impl Plan {
    fn new(fm: &FsdpModel, batch: &Batch) -> Result<Plan, FsdpError> {
        let model = &fm.model;
        let device = model.options.device;
        let lay = fm.layout;
        let (b, s) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
        let images = batch.images.as_ref();
        let has_img = images.is_some();
        let vision = images
            .map(|im| {
                model.vision.prepare(
                    &im.pixel_values.to_device(device),
                    &im.aspect_ratio_ids.to_device(device),
                    &im.aspect_ratio_mask.to_device(device),
                )
            })
            .transpose()?;
        let ctx = model.text_context(
            b,
            s,
            0,
            None,
            batch.attention_mask.as_ref(),
            images.map(|i| &i.cross_attention_mask),
            None,
        );
        let trains: Vec<bool> = fm.units.iter().map(|u| u.trains()).collect();
        let root_ops = root_ops_training(fm);
        let op_trains = |op: Op, unit: usize| {
            if unit == ROOT {
                root_ops
                    .as_ref()
                    .map_or(trains[ROOT], |ops| ops.contains(&op))
            } else {
                trains[unit]
            }
        };
        let mut stages = vec![];
        let mut needs: Vec<bool> = vec![];
        let mut add = |op, unit: usize, inputs: Vec<usize>, active: bool| -> usize {
            let out = needs.len();
            let op_trains = op_trains(op, unit);
            let n = if active {
                op_trains || inputs.iter().any(|&i| needs[i])
            } else {
                inputs.first().is_some_and(|&i| needs[i])
            };
            needs.push(n);
            stages.push(Stage {
                op,
                unit,
                inputs,
                output: out,
                active,
            });
            out
        };
        let mut h = add(Op::Stem, ROOT, vec![], has_img);
        // the intermediate features are layer INPUTS (as MllamaVisionModel::forward)
        let mut states = vec![];
        for i in 0..lay.local {
            states.push(h);
            h = add(Op::Local(i), lay.local(i), vec![h], has_img);
        }
        h = add(Op::Post, ROOT, vec![h], has_img);
        for j in 0..lay.global {
            h = add(Op::Global(j), lay.global(j), vec![h], has_img);
        }
        let mut head_in = vec![h];
        head_in.extend(
            model
                .config
                .vision
                .intermediate_layers_indices
                .iter()
                .map(|&i| states[i]),
        );
        let cross = add(Op::Head, ROOT, head_in, has_img);
        h = add(Op::Embed, ROOT, vec![], true);
        for (k, layer) in model.text.layers.iter().enumerate() {
            if layer.is_cross() {
                let inputs = if has_img { vec![h, cross] } else { vec![h] };
                h = add(Op::Text(k), lay.text(k), inputs, has_img);
            } else {
                h = add(Op::Text(k), lay.text(k), vec![h], true);
            }
        }
        add(Op::Out, ROOT, vec![h], true);
        // (every stage active, cross-attention reading the vision states)
        let mut may_need_grad = vec![false; needs.len()];
        for st in &stages {
            let cross_in = match st.op {
                Op::Text(k) if !has_img && model.text.layers[k].is_cross() => Some(cross),
                _ => None,
            };
            may_need_grad[st.output] = op_trains(st.op, st.unit)
                || st.inputs.iter().chain(&cross_in).any(|&i| may_need_grad[i]);
        }
        Ok(Plan {
            n_values: needs.len(),
            needs_grad: needs,
            may_need_grad,
            stages,
            vision,
            pixel_values: images.map(|i| i.pixel_values.to_device(device)),
            input_ids: batch.input_ids.to_device(device),
            supervised: batch
                .labels
                .as_ref()
                .map(|l| supervised_rows(&l.to_device(device))),
            ctx,
            lm_chunk: fm.lm_loss_chunk,
        })
    }

    /// (rows, targets) of the supervised positions.
    fn supervised(&self) -> Result<(&Tensor, &Tensor), ModelError> {
        self.supervised
            .as_ref()
            .map(|(r, t)| (r, t))
            .ok_or_else(|| ModelError::Input("training needs labels".into()))
    }

    /// Whether the out stage needs more than one chunk (then it is never kept, see out_backward).
    fn out_chunked(&self) -> bool {
        self.supervised
            .as_ref()
            .is_some_and(|(rows, _)| rows.size()[0] > self.lm_chunk)
    }

    /// Runs one stage's computation on `x` (the stage's inputs) with the unit gathered.
    fn run(&mut self, model: &MllamaModel, op: Op, x: &[Tensor]) -> Result<Tensor, ModelError> {
        let prep = || {
            self.vision
                .as_ref()
                .ok_or_else(|| ModelError::Input("vision stage without images".into()))
        };
        match op {
            Op::Stem => {
                let px = self.pixel_values.as_ref().expect("images present");
                Ok(model.vision.stem(prep()?, px))
            }
            Op::Local(i) => model.vision.transformer[i].forward(&x[0], &prep()?.mask),
            Op::Post => Ok(model.vision.post_local(prep()?, &x[0])),
            Op::Global(j) => model.vision.global_transformer[j].forward(&x[0], &prep()?.mask),
            Op::Head => {
                let inter: Vec<&Tensor> = x[1..].iter().collect();
                let v = model.vision.assemble(prep()?, &x[0], &inter); // (B, M, T, P1, Dv)
                let b = v.size()[0];
                Ok(model.multi_modal_projector.forward(&v).reshape([
                    b,
                    -1,
                    model.config.text.hidden_size,
                ])) // (B, N, H)
            }
            Op::Embed => Ok(model.text.embed(&self.input_ids)),
            Op::Text(k) => {
                self.ctx.cross_states = x.get(1).map(Tensor::shallow_clone);
                let r = model.text.layers[k].forward(&x[0], &self.ctx, None);
                self.ctx.cross_states = None;
                r
            }
            Op::Out => {
                // (B, S, H), then the LM head only at supervised positions (= causal_lm_loss of
                // the full logits), a chunk of them at a time (several: the value only, as
                // out_backward differentiates them)
                let hidden = model.text.norm.forward(&x[0]);
                let (rows, targets) = self.supervised()?;
                Ok(lm_loss_chunked(
                    &hidden,
                    &model.lm_head,
                    rows,
                    targets,
                    self.lm_chunk,
                ))
            }
        }
    }
}

/// Gradients of the out stage's loss sum times `go` with respect to `targets` (as
/// `attn_tape::backward` returns them; None where a target is not reached): the final norm on `x`
/// (B, S, H) once, then the LM head and cross-entropy at the supervised `rows` (N,) with their
/// token targets `t` (N,), `chunk` rows at a time, from a
/// detached copy of its output, each chunk its own autograd pass (its logits freed before the
/// next), and last the norm's backward with the summed hidden-state gradient. The chunks'
/// gradients are added in place, in the target's dtype: with the LM head trained in full, two
/// weight-sized gradients at a time (the sum and a chunk's), and for a bf16 head one rounding per
/// chunk where one matmul over all rows rounds once.
fn out_backward(
    model: &MllamaModel,
    x: &Tensor,
    (rows, t): (&Tensor, &Tensor),
    go: &Tensor,
    targets: &[Tensor],
    chunk: i64,
) -> Result<Vec<Option<Tensor>>, ModelError> {
    let hidden = model.text.norm.forward(x); // (B, S, H), a graph from x and the norm's weight
    let hn = hidden.detach().set_requires_grad(true); // the LM head's input
    let flat = hn.reshape([-1, hidden.size()[2]]); // (B*S, H)
    let mut all: Vec<Tensor> = targets.iter().map(Tensor::shallow_clone).collect();
    all.push(hn.shallow_clone());
    let mut grads: Vec<Option<Tensor>> = (0..all.len()).map(|_| None).collect();
    for (start, len) in row_chunks(rows.size()[0], chunk) {
        let sum = lm_chunk_loss(
            &flat.index_select(0, &rows.narrow(0, start, len)),
            &model.lm_head,
            &t.narrow(0, start, len),
        );
        let root = sum * go.to_kind(Kind::Float);
        let new = Tensor::f_run_backward(&[root], &all, false, false)?;
        for (slot, g) in grads.iter_mut().zip(new) {
            match slot {
                _ if !g.defined() => {}
                // the first chunk's gradient copied: autograd may hand one tensor to two targets
                None => *slot = Some(g.copy()),
                Some(sum) => {
                    let _ = sum.f_add_(&g)?;
                }
            }
        }
    }
    if let (Some(g_hidden), true) = (grads.pop().flatten(), hidden.requires_grad()) {
        let root = (&hidden * g_hidden.to_kind(hidden.kind())).sum(Kind::Float);
        attn_tape::add_defined(
            &mut grads,
            Tensor::f_run_backward(&[root], targets, false, false)?,
        );
    }
    Ok(grads)
}

/// A stage's graph kept from the forward (`keep_graphs`): its leaf inputs, its output and its
/// fused attention calls (cut points of the graph, see `model::attn_tape`).
struct Kept {
    xs: Vec<Tensor>,
    y: Tensor,
    tape: Vec<attn_tape::Entry>,
}

/// A forward's plan, every value (detached) and each stage's kept graph.
type Forward = (Plan, Vec<Option<Tensor>>, Vec<Option<Kept>>);

/// Per-stage generator seed, so that dropout in the recompute draws the forward's mask.
fn stage_seed(seed: u64, stage: usize) -> i64 {
    (seed ^ (stage as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64 & i64::MAX
}

impl FsdpModel {
    fn gather_now(&mut self, pg: &ProcessGroup, unit: usize) -> Result<(), FsdpError> {
        let g = self.units[unit].start_gather(unit, pg, self.compute)?;
        self.units[unit].finish_gather(g)?;
        self.after_gather(unit);
        Ok(())
    }

    fn after_gather(&mut self, unit: usize) {
        if unit == ROOT {
            self.retie();
        }
    }

    /// Frees `unit`'s gathered parameters; for the root unit also the tied lm_head view, which
    /// otherwise kept the whole gathered root buffer (embedding, vision stem, projector) alive
    /// between steps.
    fn free_unit(&mut self, unit: usize) {
        self.units[unit].free(self.compute);
        if unit == ROOT {
            super::untie(&mut self.model);
        }
    }

    /// Makes `unit` gathered, using the prefetched gather when it is that unit's, then starts
    /// the gather of `next` (prefetch). Returns the new in-flight gather.
    fn ensure_gathered(
        &mut self,
        pg: &ProcessGroup,
        unit: usize,
        inflight: Option<Gathering>,
        next: Option<usize>,
    ) -> Result<Option<Gathering>, FsdpError> {
        match inflight {
            Some(g) if g.unit == unit => {
                self.units[unit].finish_gather(g)?;
                self.after_gather(unit);
            }
            Some(g) => {
                // never happens with the schedules below; finish it to keep collectives paired
                let u = g.unit;
                self.units[u].finish_gather(g)?;
                self.free_unit(u);
                self.gather_now(pg, unit)?;
            }
            None => self.gather_now(pg, unit)?,
        }
        match next {
            Some(n) if self.prefetch => {
                Ok(Some(self.units[n].start_gather(n, pg, self.compute)?))
            }
            _ => Ok(None),
        }
    }

    /// Forward of one micro-batch; returns the plan, every value (detached) and, with `keep`
    /// (no activation checkpointing), each stage's graph. Without `keep` the forward builds no
    /// graph and frees every layer unit after its stage; with `keep` the units of kept stages
    /// stay gathered until their backward, the others (cross-attention without images, frozen
    /// layers) are freed at once: a stage without a graph gets no output gradient, so its
    /// backward needs no parameters. `hold` (`shard_grad_op`, without `keep`): the unit of every
    /// stage whose backward will use its parameters (active, and its output needs a gradient on
    /// this rank) stays gathered for it too; holding is no collective, so ranks may differ.
    fn forward_values(
        &mut self,
        pg: &ProcessGroup,
        batch: &Batch,
        seed: u64,
        keep: bool,
        hold: bool,
    ) -> Result<Forward, FsdpError> {
        let mut plan = Plan::new(self, batch)?;
        let mut values: Vec<Option<Tensor>> = nones(plan.n_values);
        let mut kept: Vec<Option<Kept>> = Vec::with_capacity(plan.stages.len()); // per stage
        self.gather_now(pg, ROOT)?;
        let layer_stages: Vec<usize> = (0..plan.stages.len())
            .filter(|&i| plan.stages[i].unit != ROOT)
            .collect();
        let mut inflight = None;
        let mut li = 0;
        for si in 0..plan.stages.len() {
            let (op, unit, active) = {
                let st = &plan.stages[si];
                (st.op, st.unit, st.active)
            };
            if unit != ROOT {
                li += 1;
                let next = layer_stages.get(li).map(|&n| plan.stages[n].unit);
                inflight = self.ensure_gathered(pg, unit, inflight.take(), next)?;
            }
            let st = &plan.stages[si];
            let output = st.output;
            // (an out stage of several chunks is recomputed chunk by chunk in backward, never kept)
            let chunked = matches!(op, Op::Out) && plan.out_chunked();
            let graph = keep && active && plan.needs_grad[output] && !chunked;
            let out = if graph {
                // leaf copies of the inputs, as the recompute in backward makes them
                let xs: Vec<Tensor> = st
                    .inputs
                    .iter()
                    .map(|&i| {
                        let x = values[i].as_ref().expect("input computed").detach();
                        if plan.needs_grad[i] {
                            x.set_requires_grad(true)
                        } else {
                            x
                        }
                    })
                    .collect();
                tch::manual_seed(stage_seed(seed, si));
                let (y, tape) = attn_tape::record(|| plan.run(&self.model, op, &xs));
                let y = y?;
                (Some(y.detach()), Some(Kept { xs, y, tape }))
            } else if active {
                let xs: Vec<Tensor> = st
                    .inputs
                    .iter()
                    .map(|&i| values[i].as_ref().expect("input computed").shallow_clone())
                    .collect();
                tch::manual_seed(stage_seed(seed, si));
                (Some(tch::no_grad(|| plan.run(&self.model, op, &xs))?), None)
            } else {
                let pass = plan.stages[si]
                    .inputs
                    .first()
                    .and_then(|&i| values[i].as_ref());
                (pass.map(Tensor::shallow_clone), None)
            };
            let (value, graph_kept) = out;
            values[output] = value;
            let no_graph = graph_kept.is_none();
            kept.push(graph_kept);
            let held = hold && !keep && active && plan.needs_grad[output];
            if unit != ROOT && !held && (!keep || no_graph) {
                self.units[unit].free(self.compute);
            }
        }
        debug_assert!(inflight.is_none());
        Ok((plan, values, kept))
    }

    /// Loss sum of a micro-batch without gradients (validation). Frees everything after.
    pub fn forward_loss(&mut self, pg: &ProcessGroup, batch: &Batch) -> Result<f64, FsdpError> {
        let hybrid = self.hybrid.clone();
        let pg = Self::unit_group(hybrid.as_ref(), pg, self.shard_world, self.replicated)?;
        self.model.set_training(false);
        let r = self.forward_values(pg, batch, 0, false, false);
        if r.is_err() {
            self.free_all(); // a layer unit may be left gathered
        } else {
            self.free_unit(ROOT);
        }
        self.model.set_training(true);
        let (plan, values, _) = r?;
        let out = plan.stages.last().expect("out stage").output;
        Ok(values[out].as_ref().expect("loss").double_value(&[]))
    }

    /// Forward and backward of one micro-batch; the loss sum is scaled by `loss_scale` (1 / the
    /// global supervised-token count) before differentiation, and the gradients are added to the
    /// shard gradients. Returns the (unscaled) loss sum of this rank's micro-batch.
    pub fn forward_backward(
        &mut self,
        pg: &ProcessGroup,
        batch: &Batch,
        loss_scale: f64,
        seed: u64,
    ) -> Result<f64, FsdpError> {
        let (keep, hold) = (self.keep_graphs, self.keep_gathered);
        // hybrid_shard: units gather and reduce-scatter within the shard group (the gradient
        // shards are summed across the replica group once per step: `sync_replicas`)
        let hybrid = self.hybrid.clone();
        let pg = Self::unit_group(hybrid.as_ref(), pg, self.shard_world, self.replicated)?;
        let r = self
            .forward_values(pg, batch, seed, keep, hold)
            .and_then(|fwd| self.backward(pg, fwd, loss_scale, seed));
        if r.is_err() {
            // (an in-flight prefetch was waited for when it was dropped: `dist::Work`)
            self.free_all();
        }
        r
    }

    /// The backward of `forward_backward` over the forward's plan, values and kept graphs.
    fn backward(
        &mut self,
        pg: &ProcessGroup,
        (mut plan, mut values, mut kept): Forward,
        loss_scale: f64,
        seed: u64,
    ) -> Result<f64, FsdpError> {
        let keep = self.keep_graphs;
        let out_id = plan.stages.last().expect("out stage").output;
        let loss = values[out_id].as_ref().expect("loss").double_value(&[]);
        let device = self.model.options.device;
        let mut grads: Vec<Option<Tensor>> = nones(plan.n_values);
        grads[out_id] = Some(Tensor::from(loss_scale as f32).to_device(device));
        let root_trainable = self.units[ROOT].trainable_tensors();
        let mut root_acc: Vec<Option<Tensor>> = nones(root_trainable.len());
        // (stages that cannot get a gradient on any rank are skipped, gathers included)
        let runs: Vec<bool> = (plan.stages.iter())
            .map(|st| plan.may_need_grad[st.output])
            .collect();
        let layer_stages: Vec<usize> = (0..plan.stages.len())
            .rev()
            .filter(|&i| plan.stages[i].unit != ROOT && runs[i])
            .collect();
        let mut inflight = None;
        // the previous unit's gradient reduce-scatter, waited for once this unit's backward is
        // queued (so it runs alongside it)
        let mut reducing: Option<(usize, Reducing)> = None;
        let mut li = 0;
        for si in (0..plan.stages.len()).rev() {
            let (op, unit, active, output) = {
                let st = &plan.stages[si];
                (st.op, st.unit, st.active, st.output)
            };
            if unit != ROOT && !runs[si] {
                debug_assert!(grads[output].is_none() && !self.units[unit].trains());
                values[output] = None;
                kept[si] = None;
                continue;
            }
            if unit != ROOT && !keep && !self.keep_gathered {
                li += 1;
                let next = layer_stages.get(li).map(|&n| plan.stages[n].unit);
                inflight = self.ensure_gathered(pg, unit, inflight.take(), next)?;
            }
            let params = if unit == ROOT {
                root_trainable.iter().map(Tensor::shallow_clone).collect()
            } else {
                self.units[unit].trainable_tensors()
            };
            let mut param_grads: Vec<Option<Tensor>> = nones(params.len());
            let go = grads[output].take();
            let inputs = plan.stages[si].inputs.clone();
            match (active, go) {
                (true, Some(go)) => {
                    debug_assert!(unit == ROOT || self.units[unit].gathered);
                    let xs: Vec<Tensor> = match &kept[si] {
                        Some(k) => k.xs.iter().map(Tensor::shallow_clone).collect(),
                        None => inputs
                            .iter()
                            .map(|&i| {
                                let x = values[i].as_ref().expect("kept input").detach();
                                if plan.needs_grad[i] {
                                    x.set_requires_grad(true)
                                } else {
                                    x
                                }
                            })
                            .collect(),
                    };
                    let mut targets: Vec<Tensor> = vec![];
                    let mut slots: Vec<usize> = vec![]; // input positions with a gradient
                    for (pos, &i) in inputs.iter().enumerate() {
                        if plan.needs_grad[i] {
                            targets.push(xs[pos].shallow_clone());
                            slots.push(pos);
                        }
                    }
                    let n_in = targets.len();
                    targets.extend(params.iter().map(Tensor::shallow_clone));
                    let res = if targets.is_empty() {
                        None
                    } else if matches!(op, Op::Out) && plan.out_chunked() {
                        tch::manual_seed(stage_seed(seed, si));
                        Some(out_backward(
                            &self.model,
                            &xs[0],
                            plan.supervised()?,
                            &go,
                            &targets,
                            plan.lm_chunk,
                        )?)
                    } else {
                        let (y, tape) = match kept[si].take() {
                            // the forward's graph, from the same leaves `xs`
                            Some(k) => (k.y, k.tape),
                            None => {
                                tch::manual_seed(stage_seed(seed, si));
                                let (y, tape) =
                                    attn_tape::record(|| plan.run(&self.model, op, &xs));
                                (y?, tape)
                            }
                        };
                        if y.requires_grad() {
                            let root = (&y * go.to_kind(y.kind())).sum(y.kind());
                            // one run_backward, or several cut at fused attention calls
                            Some(attn_tape::backward(&root, &targets, &tape)?)
                        } else {
                            None
                        }
                    };
                    for (k, g) in res.into_iter().flatten().enumerate() {
                        let Some(g) = g else { continue };
                        if k < n_in {
                            let id = inputs[slots[k]];
                            accumulate(&mut grads[id], g);
                        } else {
                            param_grads[k - n_in] = Some(g);
                        }
                    }
                }
                (false, Some(go)) => {
                    // pass-through stage (cross-attention layer without images)
                    if let Some(&i) = inputs.first() {
                        accumulate(&mut grads[i], go);
                    }
                }
                (_, None) => {}
            }
            if unit == ROOT {
                for (acc, g) in root_acc.iter_mut().zip(param_grads) {
                    if let Some(g) = g {
                        accumulate(acc, g);
                    }
                }
            } else {
                if self.units[unit].trains() {
                    let started = self.units[unit].start_reduce(pg, &param_grads)?;
                    drop(param_grads);
                    if let Some((prev, r)) = reducing.replace((unit, started)) {
                        self.units[prev].finish_reduce(r)?;
                    }
                }
                self.units[unit].free(self.compute);
            }
            values[output] = None;
            kept[si] = None;
        }
        debug_assert!(inflight.is_none());
        if let Some((prev, r)) = reducing.take() {
            self.units[prev].finish_reduce(r)?;
        }
        if self.units[ROOT].trains() {
            self.units[ROOT].reduce_grads(pg, &root_acc)?;
        }
        self.free_unit(ROOT);
        drop(root_trainable);
        Ok(loss)
    }
}

impl FsdpModel {
    /// Frees every unit (after an error left some gathered).
    fn free_all(&mut self) {
        for u in 0..self.units.len() {
            self.free_unit(u);
        }
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) {
    *slot = Some(match slot.take() {
        Some(a) => a + g,
        None => g,
    });
}

fn nones(n: usize) -> Vec<Option<Tensor>> {
    (0..n).map(|_| None).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tch::{Kind, Tensor};

    use super::*;
    use crate::config::ShardingStrategy;
    use crate::dist::{Backend, ProcessGroup};
    use crate::fsdp::WrapOptions;
    use crate::model::{Images, LoadOptions, LoraConfig, MllamaModel, TargetModules};

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
    }

    /// The tiny fixture model with LoRA on `targets`, wrapped at world 1.
    fn wrapped(targets: &[&str], activation_checkpointing: bool) -> (ProcessGroup, FsdpModel) {
        wrapped_as(
            targets,
            activation_checkpointing,
            ShardingStrategy::FullShard,
        )
    }

    fn wrapped_as(
        targets: &[&str],
        activation_checkpointing: bool,
        sharding: ShardingStrategy,
    ) -> (ProcessGroup, FsdpModel) {
        let mut m =
            MllamaModel::load(&fixtures().join("model_hf5"), LoadOptions::default()).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(targets.iter().map(|t| t.to_string()).collect()),
            use_rslora: false,
        };
        m.apply_lora(&lora, 7).unwrap();
        let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
        let opts = WrapOptions {
            compute: Kind::Float,
            prefetch: false,
            activation_checkpointing,
            sharding,
            sharding_group_size: 1,
        };
        let f = FsdpModel::wrap(m, &pg, opts).unwrap();
        (pg, f)
    }

    /// A golden batch of the fixtures (`text`, `image1`, ...).
    fn golden(case: &str) -> Batch {
        let path = fixtures().join(format!("golden_{case}.safetensors"));
        let g: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .unwrap()
            .into_iter()
            .collect();
        let images = g.get("pixel_values").map(|pv| Images {
            pixel_values: pv.shallow_clone(),
            aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
            aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
            cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
        });
        Batch {
            input_ids: g["input_ids"].shallow_clone(),
            attention_mask: g.get("attention_mask").map(Tensor::shallow_clone),
            labels: g.get("labels").map(Tensor::shallow_clone),
            images,
        }
    }

    /// Keep mode (no activation checkpointing) on a text-only batch: a layer whose stage kept no
    /// graph (cross-attention without images) is freed in the forward, not held gathered until
    /// the end of the backward; the kept ones stay gathered.
    #[test]
    fn keep_mode_frees_the_units_of_stages_without_a_graph() {
        let (pg, mut f) = wrapped(&["q_proj", "v_proj"], false);
        let (plan, _, kept) = f
            .forward_values(&pg, &golden("text"), 1, true, false)
            .unwrap();
        assert_held(&f, &plan, |si, _| kept[si].is_some());
        f.free_all();
    }

    /// After a forward: each layer stage's unit is gathered exactly when `held(stage index,
    /// stage)` says, and some are while others are not.
    fn assert_held(f: &FsdpModel, plan: &Plan, held: impl Fn(usize, &Stage) -> bool) {
        let (mut freed, mut kept) = (0, 0);
        for (si, st) in plan.stages.iter().enumerate() {
            if st.unit == ROOT {
                continue;
            }
            let gathered = f.units[st.unit].gathered;
            let unit = &f.units[st.unit].name;
            assert_eq!(
                gathered,
                held(si, st),
                "stage {si} {:?} (unit {unit})",
                st.op
            );
            if gathered {
                kept += 1;
            } else {
                freed += 1;
            }
        }
        assert!(freed > 0 && kept > 0, "freed {freed}, held {kept}");
    }

    /// Gradients of one micro-batch (`forward_backward` at loss scale 1), by master shard.
    fn grads_of(f: &mut FsdpModel, pg: &ProcessGroup, batch: &Batch) -> Vec<Tensor> {
        f.zero_grads();
        f.forward_backward(pg, batch, 1.0, 3).unwrap();
        f.grads().iter().map(Tensor::copy).collect()
    }

    /// `shard_grad_op` (and `hybrid_shard_zero2`, here in one group of the one rank): after the
    /// forward, exactly the layer units of the stages whose backward uses their parameters are
    /// still gathered (LoRA on the cross-attention: not the vision layers nor the text layers
    /// before the first cross-attention one); the backward recomputes them without a second
    /// gather, frees everything, and gives full_shard's gradients.
    #[test]
    fn shard_grad_op_holds_the_units_the_backward_runs_and_matches_full_shard() {
        for strategy in [
            ShardingStrategy::ShardGradOp,
            ShardingStrategy::HybridShardZero2,
        ] {
            shard_grad_op_holds_as(strategy);
        }
    }

    fn shard_grad_op_holds_as(strategy: ShardingStrategy) {
        let targets = ["cross_attn.q_proj", "cross_attn.v_proj"];
        let (pg, mut f) = wrapped_as(&targets, true, strategy);
        let batch = golden("image1");
        let (plan, _, _) = f.forward_values(&pg, &batch, 1, false, true).unwrap();
        assert_held(&f, &plan, |_, st| st.active && plan.needs_grad[st.output]);
        f.free_all();
        let got = grads_of(&mut f, &pg, &batch);
        assert!(f.units.iter().all(|u| !u.gathered), "freed after backward");
        let (_, mut reference) = wrapped(&targets, true);
        let want = grads_of(&mut reference, &pg, &batch);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.equal(w),
                "shard_grad_op's gradients differ from full_shard's"
            );
        }
        let total: f64 = got
            .iter()
            .map(|g| g.abs().sum(Kind::Double).double_value(&[]))
            .sum();
        assert!(
            total > 0.0,
            "the cross-attention LoRA factors got gradients"
        );
    }

    /// `no_shard` at world 1: every group is replicated (whole, optimizer segments covering every
    /// parameter), gathering binds views without a collective, and the gradients are full_shard's.
    #[test]
    fn no_shard_replicates_every_group_and_matches_full_shard() {
        let targets = ["q_proj", "v_proj"];
        let (pg, mut f) = wrapped_as(&targets, true, ShardingStrategy::NoShard);
        let groups = || f.units.iter().flat_map(|u| u.groups.iter());
        assert!(groups().all(|g| g.replicated && g.shard_len == g.numel));
        let batch = golden("image1");
        let got = grads_of(&mut f, &pg, &batch);
        let (_, mut reference) = wrapped(&targets, true);
        let want = grads_of(&mut reference, &pg, &batch);
        for (g, w) in got.iter().zip(&want) {
            assert!(g.equal(w), "no_shard's gradients differ from full_shard's");
        }
    }

    /// LoRA on the text cross-attention alone: no vision value, nor any text value before the
    /// first cross-attention layer, may need a gradient on any rank, with or without images in
    /// this micro-batch (the backward skips those stages, gathers included); the cross-attention
    /// layers' outputs may, also in a text-only micro-batch (another rank's may have images).
    #[test]
    fn frozen_stages_before_the_first_trained_one_are_skipped_on_every_rank() {
        let (_pg, f) = wrapped(&["cross_attn.q_proj", "cross_attn.v_proj"], true);
        for case in ["image1", "text"] {
            let plan = Plan::new(&f, &golden(case)).unwrap();
            let mut seen_cross = false;
            for st in &plan.stages {
                let may = plan.may_need_grad[st.output];
                if let Op::Text(k) = st.op {
                    seen_cross |= f.model.text.layers[k].is_cross();
                }
                if st.unit != ROOT {
                    assert_eq!(may, seen_cross, "{case}: {:?}", st.op);
                }
                assert!(may || !plan.needs_grad[st.output], "{case}: {:?}", st.op);
            }
            assert!(seen_cross);
        }
    }

    /// LoRA on the projector alone: only the head stage trains among the root unit's stages, so
    /// no vision value needs a gradient (the vision tower is not differentiated), while the
    /// projector's output and everything after it does.
    #[test]
    fn lora_on_the_projector_alone_does_not_differentiate_the_vision_tower() {
        let (_pg, f) = wrapped(&["multi_modal_projector"], true);
        assert_eq!(root_ops_training(&f), Some(vec![Op::Head]));
        let plan = Plan::new(&f, &golden("image1")).unwrap();
        for st in &plan.stages {
            let vision = matches!(st.op, Op::Stem | Op::Local(_) | Op::Post | Op::Global(_));
            if vision {
                assert!(!plan.needs_grad[st.output], "{:?} needs a gradient", st.op);
            }
            if matches!(st.op, Op::Head | Op::Out) {
                assert!(plan.needs_grad[st.output], "{:?} needs none", st.op);
            }
        }
    }
}
