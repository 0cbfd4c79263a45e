//! Flat parameters of one unit. The unit's parameters are concatenated per (trainable, dtype)
//! group into one flat buffer padded to a multiple of the W ranks it is sharded over (the world,
//! or HSDP's shard group); rank r of them keeps elements [r*S, (r+1)*S) (S = padded / W), and
//! gathers and reduce-scatters over them. Frozen groups keep their storage dtype; trainable groups
//! keep an fp32 master shard and an fp32 gradient shard. The model's parameter tensors share
//! their TensorImpl with the handles here: gathering points them (`set_data`) at views of the
//! gathered buffer, freeing points them at an empty tensor. A group is built from materialized
//! parameters or, for sharded loading, straight from the safetensors map: a rank then reads only
//! the byte ranges of its slice. A replicated group (`fsdp.sharding_strategy: no_shard`) is
//! built as the one shard of a world of 1: every rank holds it whole, gathering binds views of it
//! without a collective, and gradients are all-reduced instead of reduce-scattered.
use tch::{Device, Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp, Work};
use crate::model::adapter::SavedInAdapter;
use crate::model::{KeyLayout, WeightSource};
use crate::optim::Segment;

use super::FsdpError;

/// One parameter inside a flat group.
#[derive(Debug)]
pub struct ParamRef {
    pub name: String,
    /// Shares its TensorImpl with the model's field.
    pub tensor: Tensor,
    pub shape: Vec<i64>,
    /// Offset in the unpadded flat buffer.
    pub offset: i64,
    pub numel: i64,
}

#[derive(Debug)]
pub struct FlatGroup {
    pub trainable: bool,
    pub params: Vec<ParamRef>,
    /// Unpadded element count.
    pub numel: i64,
    /// Elements per shard (padded / the ranks it is sharded over).
    pub shard_len: i64,
    /// This rank's shard (S,): storage dtype for frozen groups, fp32 master for trainable ones.
    pub shard: Tensor,
    /// Accumulated gradient of the shard (S,) fp32 (trainable groups).
    pub grad: Option<Tensor>,
    /// Per parameter: whether it got a gradient on this rank since the last `zero_grads` (else
    /// its part of `grad` holds zeros that stand for torch's None: see `AdamW::step_present`).
    pub got_grad: Vec<bool>,
    /// Whole on every rank (built with world 1; see the module comment).
    pub replicated: bool,
}

impl FlatGroup {
    /// Builds the group from fully materialized parameters and keeps this rank's slice; the
    /// parameters are left empty (freed).
    pub fn shard_from_full(
        params: Vec<(String, Tensor)>,
        trainable: bool,
        rank: usize,
        world: usize,
        compute: Kind,
    ) -> Self {
        Self::shard_from(params, None, None, trainable, rank, world, compute)
            .expect("slicing materialized tensors does not fail")
    }

    /// Builds the group and keeps this rank's slice [r*S, (r+1)*S) of the flat buffer, reading
    /// only that slice: a parameter of a module to save that `adapter` holds is read from the
    /// adapter's file, another found in `source` (by its file name) from the base's, both with
    /// `get_flat_range`; any other one (LoRA factors) is sliced from its materialized tensor.
    /// Values go through the parameter's dtype first (as a full load would convert them), then
    /// to the group's. The parameters are left empty (freed).
    pub fn shard_from(
        params: Vec<(String, Tensor)>,
        source: Option<(&WeightSource, KeyLayout)>,
        adapter: Option<&SavedInAdapter>,
        trainable: bool,
        rank: usize,
        world: usize,
        compute: Kind,
    ) -> Result<Self, FsdpError> {
        let kind = if trainable {
            Kind::Float
        } else {
            params[0].1.kind()
        };
        let device = params[0].1.device();
        let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let w = world as i64;
        let shard_len = (total + w - 1) / w;
        let (lo, hi) = (rank as i64 * shard_len, (rank as i64 + 1) * shard_len);
        let mut refs = Vec::with_capacity(params.len());
        let mut parts = Vec::with_capacity(params.len() + 1);
        let mut offset = 0;
        for (name, t) in params {
            let numel = t.numel() as i64;
            // this parameter's elements inside [lo, hi), relative to its start
            let (a, b) = (lo.max(offset) - offset, hi.min(offset + numel) - offset);
            if a < b {
                let in_adapter = adapter.and_then(|s| Some((&s.src, s.keys.get(&name)?.clone())));
                let file = in_adapter.or_else(|| {
                    let (src, layout) = source?;
                    let f = layout.file_name(&name);
                    src.entry(&f).map(|_| (src, f))
                });
                let piece = match file {
                    Some((src, f)) => src
                        .get_flat_range(&f, a, b - a, t.kind())?
                        .to_device(device),
                    None => t.detach().reshape([-1]).narrow(0, a, b - a),
                };
                parts.push(piece.to_kind(kind)); // (b - a,)
            }
            refs.push(ParamRef {
                name,
                shape: t.size(),
                tensor: t,
                offset,
                numel,
            });
            offset += numel;
        }
        let n_params = refs.len();
        let have: i64 = parts.iter().map(|p| p.numel() as i64).sum();
        parts.push(Tensor::zeros([shard_len - have], (kind, device))); // padding
        let shard = Tensor::cat(&parts, 0).contiguous(); // (S,)
        let grad = trainable.then(|| shard.zeros_like());
        let mut g = Self {
            trainable,
            params: refs,
            numel: total,
            shard_len,
            shard,
            grad,
            got_grad: vec![false; n_params],
            replicated: false,
        };
        g.free(compute);
        Ok(g)
    }

    /// Marks a group built as rank 0 of world 1 as replicated over the process group.
    pub fn replicated(mut self) -> Self {
        self.replicated = true;
        self
    }

    /// Each parameter's elements within this rank's shard (len 0 outside it), as the optimizer
    /// steps them (a replicated group's: every parameter whole).
    pub fn segments(&self, rank: usize) -> Vec<Segment> {
        let rank = if self.replicated { 0 } else { rank };
        let lo = self.shard_len * rank as i64;
        let hi = lo + self.shard_len;
        self.params
            .iter()
            .map(|p| {
                let (a, b) = (p.offset.max(lo), (p.offset + p.numel).min(hi));
                Segment {
                    start: if a < b { a - lo } else { 0 },
                    len: (b - a).max(0),
                }
            })
            .collect()
    }

    /// Starts the all-gather of the group in `compute` dtype; returns the full buffer (W*S,) (W: the ranks of `pg`).
    /// A replicated group's buffer is its shard in `compute` dtype (the shard itself when that
    /// is its dtype), with no collective.
    fn start_gather(&self, pg: &ProcessGroup, compute: Kind) -> Result<(Tensor, Work), FsdpError> {
        if self.replicated {
            return Ok((self.shard.to_kind(compute), Work::ready())); // (S,)
        }
        let src = self.shard.to_kind(compute).contiguous(); // (S,)
        let full = Tensor::empty(
            [self.shard_len * pg.world_size() as i64],
            (compute, self.shard.device()),
        ); // (W*S,)
        let work = pg.all_gather_into_async(&full, &src)?;
        Ok((full, work))
    }

    /// Points every parameter at its view of the gathered buffer.
    fn bind(&mut self, full: &Tensor) {
        for p in &mut self.params {
            let view = full.narrow(0, p.offset, p.numel).view(p.shape.as_slice());
            p.tensor.set_data(&view);
        }
    }

    /// Points every parameter at an empty tensor: only the shard stays resident.
    pub fn free(&mut self, compute: Kind) {
        let empty = Tensor::empty([0], (compute, self.shard.device()));
        for p in &mut self.params {
            p.tensor.set_data(&empty);
        }
    }

    /// Starts reduce-scattering the full-size gradients `grads` (one per parameter; undefined =
    /// zero) into this rank's gradient shard (summed over ranks, fp32); `finish_reduce` adds the
    /// result to what accumulated. A replicated group all-reduces them instead.
    fn start_reduce(
        &mut self,
        pg: &ProcessGroup,
        grads: &[Option<Tensor>],
    ) -> Result<(Tensor, Work), FsdpError> {
        let device = self.shard.device();
        let world = if self.replicated { 1 } else { pg.world_size() };
        let padded = self.shard_len * world as i64;
        // each gradient is cast straight into its range (one fp32 buffer of the unit, not a
        // converted copy per gradient and then their concatenation: ~2.5x the unit's gradient
        // at once, ~11 GB for a fully finetuned root unit); absent gradients and padding stay 0
        let flat = Tensor::zeros([padded], (Kind::Float, device)); // (W*S,) fp32 ((S,) replicated)
        tch::no_grad(|| {
            for ((p, g), got) in self.params.iter().zip(grads).zip(&mut self.got_grad) {
                if let Some(g) = g.as_ref().filter(|g| g.defined()) {
                    *got = true;
                    flat.narrow(0, p.offset, p.numel).copy_(&g.reshape([-1]));
                }
            }
        });
        // (the Work keeps its tensors alive until it is waited for)
        if self.replicated {
            let work = pg.all_reduce_async(&flat, ReduceOp::Sum)?;
            return Ok((flat, work));
        }
        let out = Tensor::zeros([self.shard_len], (Kind::Float, device)); // (S,)
        let work = pg.reduce_scatter_async(&out, &flat, ReduceOp::Sum)?;
        Ok((out, work))
    }

    /// Waits for the reduction `start_reduce` began and adds it to the gradient shard.
    fn finish_reduce(&mut self, (out, work): (Tensor, Work)) -> Result<(), FsdpError> {
        work.wait()?;
        if let Some(acc) = &mut self.grad {
            *acc += out;
        }
        Ok(())
    }

    /// The full (unsharded) fp32 values of the group's parameters, by name (all ranks take part).
    fn gather_full(&self, pg: &ProcessGroup) -> Result<Vec<(String, Tensor)>, FsdpError> {
        let (full, work) = self.start_gather(pg, Kind::Float)?;
        work.wait()?;
        Ok(self
            .params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    full.narrow(0, p.offset, p.numel)
                        .view(p.shape.as_slice())
                        .to_device(Device::Cpu)
                        .copy(),
                )
            })
            .collect())
    }

    fn resident_bytes(&self) -> i64 {
        // (a replicated group's parameters may be views of the shard itself: not counted twice)
        let aliased = |t: &Tensor| {
            let (lo, n) = (self.shard.data_ptr() as usize, self.shard.numel());
            let p = t.data_ptr() as usize;
            n > 0 && p >= lo && p < lo + n * self.shard.kind().elt_size_in_bytes()
        };
        let handles: i64 = self
            .params
            .iter()
            .filter(|p| !(self.replicated && aliased(&p.tensor)))
            .map(|p| p.tensor.numel() as i64 * p.tensor.kind().elt_size_in_bytes() as i64)
            .sum();
        self.shard.numel() as i64 * self.shard.kind().elt_size_in_bytes() as i64 + handles
    }
}

/// A unit: its flat groups and whether they are gathered.
#[derive(Debug)]
pub struct Unit {
    pub name: String,
    pub groups: Vec<FlatGroup>,
    pub gathered: bool,
}

/// An all-gather in flight (prefetch).
pub struct Gathering {
    pub unit: usize,
    parts: Vec<(Tensor, Work)>,
}

/// A unit's gradient reduce-scatter in flight: the backward goes on with the next unit while it
/// runs (torch FSDP overlaps it the same way, on its reduce-scatter stream). Dropped unwaited (an
/// error unwinding), each `Work` still waits for its collective.
pub struct Reducing {
    /// (trainable group index within the unit, its shard's result and the collective)
    parts: Vec<(usize, (Tensor, Work))>,
}

impl Unit {
    pub fn trains(&self) -> bool {
        self.groups.iter().any(|g| g.trainable)
    }

    pub fn start_gather(
        &self,
        unit: usize,
        pg: &ProcessGroup,
        compute: Kind,
    ) -> Result<Gathering, FsdpError> {
        let parts = self
            .groups
            .iter()
            .map(|g| g.start_gather(pg, compute))
            .collect::<Result<_, _>>()?;
        Ok(Gathering { unit, parts })
    }

    pub fn finish_gather(&mut self, g: Gathering) -> Result<(), FsdpError> {
        for (group, (full, work)) in self.groups.iter_mut().zip(g.parts) {
            work.wait()?;
            group.bind(&full);
        }
        self.gathered = true;
        Ok(())
    }

    pub fn free(&mut self, compute: Kind) {
        for g in &mut self.groups {
            g.free(compute);
        }
        self.gathered = false;
    }

    /// The trainable parameters (gathered views while gathered), in group order.
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        self.groups
            .iter()
            .filter(|g| g.trainable)
            .flat_map(|g| g.params.iter().map(|p| p.tensor.shallow_clone()))
            .collect()
    }

    /// Starts reduce-scattering full-size gradients given in `trainable_tensors` order.
    pub fn start_reduce(
        &mut self,
        pg: &ProcessGroup,
        grads: &[Option<Tensor>],
    ) -> Result<Reducing, FsdpError> {
        let mut at = 0;
        let mut parts = vec![];
        for (i, g) in self
            .groups
            .iter_mut()
            .enumerate()
            .filter(|(_, g)| g.trainable)
        {
            let n = g.params.len();
            parts.push((i, g.start_reduce(pg, &grads[at..at + n])?));
            at += n;
        }
        Ok(Reducing { parts })
    }

    /// Waits for this unit's reduce-scatter (`start_reduce`) and adds it to the gradient shards.
    pub fn finish_reduce(&mut self, r: Reducing) -> Result<(), FsdpError> {
        for (i, part) in r.parts {
            self.groups[i].finish_reduce(part)?;
        }
        Ok(())
    }

    /// Reduce-scatters full-size gradients given in `trainable_tensors` order (and waits).
    pub fn reduce_grads(
        &mut self,
        pg: &ProcessGroup,
        grads: &[Option<Tensor>],
    ) -> Result<(), FsdpError> {
        let r = self.start_reduce(pg, grads)?;
        self.finish_reduce(r)
    }

    pub fn gather_trainable_full(
        &self,
        pg: &ProcessGroup,
    ) -> Result<Vec<(String, Tensor)>, FsdpError> {
        let mut out = vec![];
        for g in self.groups.iter().filter(|g| g.trainable) {
            out.extend(g.gather_full(pg)?);
        }
        Ok(out)
    }

    pub fn resident_bytes(&self) -> i64 {
        self.groups.iter().map(FlatGroup::resident_bytes).sum()
    }
}
