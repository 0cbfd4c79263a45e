//! Length-grouped distributed batch sampler (llama-recipes' DistributedLengthBasedBatchSampler,
//! fixed): per epoch, indices are shuffled from (seed, epoch); the first `len - len % global_batch`
//! of that shuffle are stably sorted by length, cut into global batches of
//! `batch_size * world_size * grad_accum`, and the global batches are shuffled. The last
//! `len % global_batch` of the shuffle, a random subset, are the epoch's last, partial global
//! batch (sorted by length), as llama-recipes and HF's Trainer train the last, incomplete
//! accumulation window; with `drop_last` they sit out the epoch instead (llama-recipes drops its
//! incomplete last batch after the sort: always the longest samples, never trained on). Rank r
//! takes the contiguous part `[r*batch_size, (r+1)*batch_size)` of each global batch, so the samples
//! of a step do not depend on the world size, and a `Position` (epoch, batch index) resumes
//! exactly, at any world size with the same global batch. (The whole global batches are the same
//! with and without `drop_last`.)
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// Where the loader stands: the next global batch to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    pub epoch: u64,
    pub batch: u64,
}

/// The sampler over a dataset's token lengths.
#[derive(Debug, Clone)]
pub struct LengthGroupedSampler {
    lengths: Vec<usize>,
    global_batch: usize,
    seed: u64,
    drop_last: bool,
}

/// Global batches per epoch of `samples` in global batches of `global_batch` (> 0): the whole
/// ones, and the partial one unless `drop_last`.
pub fn batches_per_epoch(samples: usize, global_batch: usize, drop_last: bool) -> usize {
    samples / global_batch + usize::from(!drop_last && !samples.is_multiple_of(global_batch))
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

impl LengthGroupedSampler {
    /// `global_batch`: samples per optimizer step over all ranks (`Dataset` uses
    /// batch_size x world_size x grad_accum and cuts each global batch into micro-steps).
    /// `drop_last`: the samples that do not fill a global batch sit out the epoch instead of
    /// being its last, partial global batch.
    pub fn new(lengths: Vec<usize>, global_batch: usize, seed: u64, drop_last: bool) -> Self {
        assert!(global_batch > 0, "global batch must be positive");
        Self {
            lengths,
            global_batch,
            seed,
            drop_last,
        }
    }

    /// Global batches per epoch (the partial one included unless `drop_last`).
    pub fn batches_per_epoch(&self) -> usize {
        batches_per_epoch(self.lengths.len(), self.global_batch, self.drop_last)
    }

    /// Samples of the epoch's last, partial global batch, or that sit out with `drop_last`.
    pub fn partial_batch_len(&self) -> usize {
        self.lengths.len() % self.global_batch
    }

    /// All global batches of an epoch, in order.
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut idx: Vec<usize> = (0..self.lengths.len()).collect();
        shuffle(&mut idx, &mut rng);
        // (a random subset: the partial batch, or left out)
        let mut partial = idx.split_off(idx.len() - self.partial_batch_len());
        idx.sort_by_key(|&i| self.lengths[i]);
        let mut batches: Vec<Vec<usize>> = idx
            .chunks_exact(self.global_batch)
            .map(|c| c.to_vec())
            .collect();
        shuffle(&mut batches, &mut rng);
        if !self.drop_last && !partial.is_empty() {
            partial.sort_by_key(|&i| self.lengths[i]);
            batches.push(partial);
        }
        batches
    }

    /// Rank `rank`'s part of global batch `pos` (`batch_size` = global / world).
    pub fn rank_part(global: &[usize], rank: usize, world: usize) -> &[usize] {
        let per = global.len() / world;
        &global[rank * per..(rank + 1) * per]
    }

    /// Rank `rank`'s part of the samples `batch` of any length (an evaluation's last, partial
    /// global batch): `world` contiguous parts as even as possible (the first `len % world` ranks
    /// take one more), and the number of filler rows ([`with_filler`]).
    pub fn even_part(batch: &[usize], rank: usize, world: usize) -> (Vec<usize>, usize) {
        let (per, extra) = (batch.len() / world, batch.len() % world);
        let start = rank * per + rank.min(extra);
        with_filler(
            batch,
            &batch[start..start + per + usize::from(rank < extra)],
        )
    }

    /// Rank `rank`'s part of a training micro-step `batch` (at most `batch_size` x world samples):
    /// its `rank`-th slice of `batch_size` (shorter or empty in an epoch's last, partial
    /// micro-step), and the number of filler rows ([`with_filler`]). Slice k of a step holds the
    /// same samples at any world size that keeps `batch_size`, where LoRA dropout seeds its masks
    /// by the slice, so a resume on another world size replays them in the partial step too.
    pub fn slice_part(batch: &[usize], rank: usize, batch_size: usize) -> (Vec<usize>, usize) {
        let start = (rank * batch_size).min(batch.len());
        with_filler(batch, &batch[start..(start + batch_size).min(batch.len())])
    }
}

/// `part` of `batch`, or for an empty part one filler row (the batch's first sample, its labels
/// to be masked), so all ranks run the same number of forward passes (FSDP's collectives) and
/// nothing is counted twice; and the number of filler rows.
fn with_filler(batch: &[usize], part: &[usize]) -> (Vec<usize>, usize) {
    match (part.is_empty(), batch.first()) {
        (true, Some(&first)) => (vec![first], 1),
        _ => (part.to_vec(), 0),
    }
}
