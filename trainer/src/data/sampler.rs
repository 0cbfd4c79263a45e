//! Length-grouped distributed batch sampler (llama-recipes' DistributedLengthBasedBatchSampler,
//! fixed): per epoch, indices are shuffled from (seed, epoch), the last `len % global_batch` of
//! that shuffle left out for the epoch (llama-recipes drops the incomplete last batch after the
//! sort: always the longest samples, never trained on), the rest stably sorted by length, cut
//! into global batches of `batch_size * world_size`, and the global batches are shuffled. Rank r
//! takes the contiguous part `[r*batch_size, (r+1)*batch_size)` of each global batch, so the samples
//! of a step do not depend on the world size, and a `Position` (epoch, batch index) resumes
//! exactly, at any world size with the same global batch.
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
    pub fn new(lengths: Vec<usize>, global_batch: usize, seed: u64) -> Self {
        assert!(global_batch > 0, "global batch must be positive");
        Self {
            lengths,
            global_batch,
            seed,
        }
    }

    /// Global batches per epoch (drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        self.lengths.len() / self.global_batch
    }

    /// All global batches of an epoch, in order.
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut idx: Vec<usize> = (0..self.lengths.len()).collect();
        shuffle(&mut idx, &mut rng);
        idx.truncate(self.batches_per_epoch() * self.global_batch); // a random subset left out
        idx.sort_by_key(|&i| self.lengths[i]);
        let mut batches: Vec<Vec<usize>> = idx
            .chunks_exact(self.global_batch)
            .map(|c| c.to_vec())
            .collect();
        shuffle(&mut batches, &mut rng);
        batches
    }

    /// Rank `rank`'s part of global batch `pos` (`batch_size` = global / world).
    pub fn rank_part(global: &[usize], rank: usize, world: usize) -> &[usize] {
        let per = global.len() / world;
        &global[rank * per..(rank + 1) * per]
    }
}
