//! How the ranks present share each step's global batch.
//!
//! The global batch is `train.global_batch_size` images when that is set (an elastic job's
//! coordinator resolves it to `train.batch_size ×` the requested worker count), else
//! `train.batch_size ×` the group's world size. Rank `r` of `w` takes the contiguous
//! [`gantry_data::sampler::rank_slice`] of it; images, labels, latents and every other
//! per-row draw of the step are keyed by the global row, so the slices of any world
//! concatenate to the world-1 batch.
//!
//! Each rank's loss is a mean over its slice. With even slices the plain average of the
//! ranks' gradients is the global-batch mean; with uneven ones (3 ranks sharing 64 images:
//! 21, 21, 22) it is not, so each rank's gradient is weighted by `slice / global` and the
//! weighted gradients are summed ([`BatchSplit::gradient_weight`]). BatchNorm is the
//! exception no weighting fixes: its batch statistics are taken over the rank's own slice
//! (see docs/elastic.md).

use std::ops::Range;

use anyhow::{Result, bail};
use gantry_config::Train;
use gantry_data::sampler::rank_slice;

/// One rank's share of every step's global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSplit {
    /// Images per step over the whole group.
    pub global: usize,
    pub rank: usize,
    pub world: usize,
    /// This rank's rows of the global batch.
    pub rows: Range<usize>,
}

/// The global batch a group of `world` ranks trains with under `train`:
/// `train.global_batch_size`, or `train.batch_size × world` where that is 0.
pub fn global_batch_size(train: &Train, world: usize) -> usize {
    match train.global_batch_size {
        0 => train.batch_size * world,
        fixed => fixed,
    }
}

impl BatchSplit {
    /// Rank `rank` of `world`'s share. Fails, naming `train.global_batch_size`, when the
    /// global batch has fewer images than there are ranks.
    pub fn new(train: &Train, rank: usize, world: usize) -> Result<Self> {
        let global = global_batch_size(train, world);
        if train.global_batch_size != 0 && global < world {
            bail!(
                "train.global_batch_size = {global} is smaller than the world size {world}: \
                 every rank needs at least one image of the global batch; choose \
                 train.global_batch_size >= {world}"
            );
        }
        let rows = rank_slice(global, rank, world)?;
        Ok(Self {
            global,
            rank,
            world,
            rows,
        })
    }

    /// Images this rank trains on per batch.
    pub fn local(&self) -> usize {
        self.rows.len()
    }

    /// Whether every rank's slice has the same length (`world` divides the global batch).
    pub fn is_even(&self) -> bool {
        self.global.is_multiple_of(self.world)
    }

    /// The longest slice of any rank (slices differ by at most one image): what a rank's
    /// memory must hold.
    pub fn largest(&self) -> usize {
        self.global.div_ceil(self.world)
    }

    /// The shortest slice of any rank.
    pub fn smallest(&self) -> usize {
        self.global / self.world
    }

    /// The factor this rank's gradient (and its statistics) enter the group's sum with,
    /// `slice / global`, when slices are uneven; `None` when they are even, where the plain
    /// average is the same mean and stays bit-for-bit what it always was. Every rank of a
    /// group gets `None` or every rank gets `Some`: evenness is a property of the group.
    pub fn gradient_weight(&self) -> Option<f64> {
        (!self.is_even()).then(|| self.local() as f64 / self.global as f64)
    }

    /// Human-readable, for the start-up line: `4 rank(s) × batch 16`, or for uneven slices
    /// `3 rank(s) sharing global batch 64 (slices of 21–22)`.
    pub fn describe(&self) -> String {
        if self.is_even() {
            format!("{} rank(s) × batch {}", self.world, self.smallest())
        } else {
            format!(
                "{} rank(s) sharing global batch {} (slices of {}–{})",
                self.world,
                self.global,
                self.smallest(),
                self.largest()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(batch_size: usize, global_batch_size: usize) -> Train {
        Train {
            batch_size,
            global_batch_size,
            ..Train::default()
        }
    }

    #[test]
    fn zero_means_batch_size_times_world() {
        let split = BatchSplit::new(&train(16, 0), 3, 4).unwrap();
        assert_eq!((split.global, split.rows.clone()), (64, 48..64));
        assert!(split.is_even());
        assert_eq!(split.gradient_weight(), None);
    }

    #[test]
    fn a_fixed_global_batch_is_split_unevenly_and_weighted() {
        let t = train(16, 64);
        let splits: Vec<BatchSplit> = (0..3).map(|r| BatchSplit::new(&t, r, 3).unwrap()).collect();
        let lengths: Vec<usize> = splits.iter().map(BatchSplit::local).collect();
        assert_eq!(lengths, [21, 21, 22]);
        let weights: f64 = splits.iter().map(|s| s.gradient_weight().unwrap()).sum();
        assert!((weights - 1.0).abs() < 1e-12, "{weights}");
        assert_eq!((splits[0].smallest(), splits[0].largest()), (21, 22));
        assert_eq!(
            splits[2].describe(),
            "3 rank(s) sharing global batch 64 (slices of 21–22)"
        );
        // Shrunk evenly (4 → 2), the plain average stays.
        assert_eq!(BatchSplit::new(&t, 1, 2).unwrap().gradient_weight(), None);
    }

    #[test]
    fn a_global_batch_below_the_world_size_is_refused_by_name() {
        let err = BatchSplit::new(&train(16, 2), 0, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.global_batch_size = 2"), "{err}");
        assert!(err.contains("world size 3"), "{err}");
    }
}
