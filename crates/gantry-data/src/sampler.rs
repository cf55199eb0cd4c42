//! Which examples make up each global batch.
//!
//! Data-parallel training must see the same data order however many ranks
//! share a run, and a resumed run must replay exactly what an uninterrupted
//! one would have seen. So the order is a pure function of `(seed, step)`:
//!
//! * The data is an endless stream of positions `0, 1, 2, …` cut into epochs
//!   of `dataset_len` positions. Position `p` is in epoch `e = p / dataset_len`
//!   and maps to example `perm_e[p % dataset_len]`.
//! * The global batch of step `s` is positions
//!   `[s × global_batch, (s + 1) × global_batch)`. It may straddle two (or, if
//!   `global_batch > dataset_len`, more) epochs; no example is skipped or
//!   repeated at an epoch boundary.
//! * Rank `r` of `world` takes the contiguous slice
//!   `[⌊r × global_batch / world⌋, ⌊(r + 1) × global_batch / world⌋)` of that
//!   batch ([`rank_slice`]), so concatenating the slices of ranks `0..world`
//!   gives the world-1 batch. When `world` does not divide `global_batch` (an
//!   elastic group that lost ranks) the slices differ in length by at most one;
//!   when it does, every slice is `global_batch / world` long.
//!
//! `perm_e`, the permutation for epoch `e`, is defined exactly (changing any
//! of this changes every run's data order, and breaks resume across
//! versions):
//!
//! 1. `rng = ChaCha8Rng::seed_from_u64(seed ^ mix(e))` (`rand_chacha` 0.3,
//!    `rand_core` 0.6 `SeedableRng::seed_from_u64`), where `mix` is the
//!    SplitMix64 finaliser: `z = e + 0x9E3779B97F4A7C15;
//!    z = (z ^ (z >> 30)) × 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) × 0x94D049BB133111EB;
//!    mix(e) = z ^ (z >> 31)`, all wrapping `u64` arithmetic. Mixing keeps
//!    neighbouring epochs (and `seed`/`seed ^ 1` pairs) from getting related
//!    seeds.
//! 2. Start from `perm = [0, 1, …, n - 1]` and run Fisher-Yates from the
//!    top: for `i` from `n - 1` down to `1`, draw `j` uniform in `0..=i` and
//!    swap `perm[i]` and `perm[j]`.
//! 3. `j` uniform in `0..bound` (`bound = i + 1`) is drawn by rejection:
//!    `t = (2^64 - bound) mod bound`; repeat `x = rng.next_u64()` until
//!    `x >= t`; then `j = x mod bound`. This is unbiased and, unlike
//!    `rand::Rng::gen_range`, fixed by this crate rather than by a
//!    dependency's version.

use std::ops::Range;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::DataError;

/// The rows of a `global_batch`-row batch that rank `rank` of `world` owns:
/// `[⌊rank × global_batch / world⌋, ⌊(rank + 1) × global_batch / world⌋)`.
/// Every rank's slice, latents and other per-row draws are cut by this one
/// definition. Fails if `world` is 0 or larger than `global_batch` (a rank
/// would get no rows), or if `rank >= world`.
pub fn rank_slice(
    global_batch: usize,
    rank: usize,
    world: usize,
) -> Result<Range<usize>, DataError> {
    if world == 0 || world > global_batch {
        return Err(DataError::BatchSmallerThanWorld {
            global_batch,
            world,
        });
    }
    if rank >= world {
        return Err(DataError::RankOutOfRange { rank, world });
    }
    // u128: rank × global_batch may overflow usize for absurd batches.
    let bound = |r: usize| (r as u128 * global_batch as u128 / world as u128) as usize;
    Ok(bound(rank)..bound(rank + 1))
}

/// Maps `(step, rank, world)` to example indices; see the [module docs](self)
/// for the exact definition.
#[derive(Debug, Clone)]
pub struct GlobalSampler {
    seed: u64,
    dataset_len: usize,
    global_batch: usize,
    /// The most recently used epoch permutations, newest last. Two suffice
    /// for a batch straddling an epoch boundary, with sequential steps.
    cache: Vec<(u64, Vec<usize>)>,
}

impl GlobalSampler {
    /// A sampler over `dataset_len` examples taking `global_batch` of them
    /// per step. Both must be positive.
    pub fn new(seed: u64, dataset_len: usize, global_batch: usize) -> Result<Self, DataError> {
        if dataset_len == 0 {
            return Err(DataError::InvalidSampler("empty data set".into()));
        }
        if global_batch == 0 {
            return Err(DataError::InvalidSampler("global batch of 0".into()));
        }
        Ok(GlobalSampler {
            seed,
            dataset_len,
            global_batch,
            cache: Vec::with_capacity(2),
        })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn dataset_len(&self) -> usize {
        self.dataset_len
    }

    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// The examples rank `rank` of `world` uses at `step`: its contiguous
    /// [`rank_slice`] of the global batch.
    ///
    /// Fails if `world` is 0 or larger than `global_batch`, or if
    /// `rank >= world`.
    pub fn indices(
        &mut self,
        step: u64,
        rank: usize,
        world: usize,
    ) -> Result<Vec<usize>, DataError> {
        let rows = rank_slice(self.global_batch, rank, world)?;
        // u128 because step × global_batch can exceed u64 for absurd steps,
        // and wrapping would silently reuse early batches.
        let start = u128::from(step) * self.global_batch as u128 + rows.start as u128;
        let len = self.dataset_len as u128;
        let mut out = Vec::with_capacity(rows.len());
        let mut pos = start;
        let end = start + rows.len() as u128;
        while pos < end {
            let epoch = u64::try_from(pos / len).expect("epoch number overflows u64");
            let offset = (pos % len) as usize;
            let take = (self.dataset_len - offset).min((end - pos) as usize);
            let perm = self.permutation(epoch);
            out.extend_from_slice(&perm[offset..offset + take]);
            pos += take as u128;
        }
        Ok(out)
    }

    /// The permutation of `0..dataset_len` used for `epoch`.
    pub fn epoch_permutation(&mut self, epoch: u64) -> &[usize] {
        self.permutation(epoch)
    }

    fn permutation(&mut self, epoch: u64) -> &[usize] {
        let at = match self.cache.iter().position(|(e, _)| *e == epoch) {
            Some(at) => at,
            None => {
                if self.cache.len() == 2 {
                    self.cache.remove(0);
                }
                let perm = permutation(self.seed, epoch, self.dataset_len);
                self.cache.push((epoch, perm));
                self.cache.len() - 1
            }
        };
        &self.cache[at].1
    }
}

fn mix(e: u64) -> u64 {
    let mut z = e.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform_below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let x = rng.next_u64();
        if x >= threshold {
            return x % bound;
        }
    }
}

fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ mix(epoch));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(xs: &[usize], n: usize) -> bool {
        let mut sorted = xs.to_vec();
        sorted.sort_unstable();
        sorted == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn ranks_concatenate_to_the_world_one_batch() {
        // 10 examples, batch 8: steps straddle epoch boundaries at various offsets.
        let mut s = GlobalSampler::new(42, 10, 8).unwrap();
        for step in 0..20 {
            let whole = s.indices(step, 0, 1).unwrap();
            assert_eq!(whole.len(), 8);
            for world in [2, 4, 8] {
                let joined: Vec<usize> = (0..world)
                    .flat_map(|r| s.indices(step, r, world).unwrap())
                    .collect();
                assert_eq!(joined, whole, "step {step}, world {world}");
            }
        }
    }

    #[test]
    fn uneven_slices_concatenate_to_the_world_one_batch() {
        // 64 images over 3 ranks: 21, 21, 22 (an elastic group of 4 × 16 that lost one);
        // 10 over 4 straddles epoch boundaries of a 7-example set.
        for (dataset_len, global, world, lengths) in [
            (100, 64, 3, vec![21, 21, 22]),
            (7, 10, 4, vec![2, 3, 2, 3]),
            (50, 5, 5, vec![1; 5]),
        ] {
            let mut s = GlobalSampler::new(11, dataset_len, global).unwrap();
            for step in 0..12 {
                let whole = s.indices(step, 0, 1).unwrap();
                let slices: Vec<Vec<usize>> = (0..world)
                    .map(|r| s.indices(step, r, world).unwrap())
                    .collect();
                let got: Vec<usize> = slices.iter().map(Vec::len).collect();
                assert_eq!(got, lengths, "global {global}, world {world}");
                assert_eq!(slices.concat(), whole, "step {step}, world {world}");
            }
        }
        // Even splits keep their old bounds: rank r of w owns [r·G/w, (r+1)·G/w).
        assert_eq!(rank_slice(64, 1, 2).unwrap(), 32..64);
        assert_eq!(rank_slice(64, 2, 3).unwrap(), 42..64);
    }

    #[test]
    fn the_stream_is_a_sequence_of_permutations() {
        // 60 positions of a 10-example set = 6 whole epochs, read through
        // batches of 4 that straddle every other boundary.
        let mut s = GlobalSampler::new(7, 10, 4).unwrap();
        let stream: Vec<usize> = (0..15)
            .flat_map(|step| s.indices(step, 0, 1).unwrap())
            .collect();
        for (e, epoch) in stream.chunks(10).enumerate() {
            assert!(is_permutation(epoch, 10), "epoch {e}: {epoch:?}");
            assert_eq!(epoch, s.epoch_permutation(e as u64), "epoch {e}");
        }
        // Successive epochs are shuffled differently.
        assert_ne!(stream[..10], stream[10..20]);
    }

    #[test]
    fn batches_larger_than_the_data_set_span_several_epochs() {
        let mut s = GlobalSampler::new(3, 5, 12).unwrap();
        let b = s.indices(0, 0, 1).unwrap();
        assert!(is_permutation(&b[..5], 5));
        assert!(is_permutation(&b[5..10], 5));
        assert_eq!(b[10..], s.epoch_permutation(2)[..2]);
    }

    #[test]
    fn big_permutations_are_permutations() {
        let mut s = GlobalSampler::new(1, 60_000, 64).unwrap();
        let perm = s.epoch_permutation(123).to_vec();
        assert!(is_permutation(&perm, 60_000));
        assert_ne!(perm, (0..60_000).collect::<Vec<_>>());
    }

    #[test]
    fn same_seed_is_deterministic_in_any_query_order() {
        let mut a = GlobalSampler::new(9, 100, 16).unwrap();
        let forward: Vec<Vec<usize>> = (0..30).map(|s| a.indices(s, 1, 2).unwrap()).collect();
        // A fresh sampler queried backwards (as after a resume, or with a
        // cold cache) must give the same batches.
        let mut b = GlobalSampler::new(9, 100, 16).unwrap();
        for s in (0..30).rev() {
            assert_eq!(b.indices(s, 1, 2).unwrap(), forward[s as usize], "step {s}");
        }
    }

    #[test]
    fn different_seeds_differ() {
        let mut a = GlobalSampler::new(1, 1000, 32).unwrap();
        let mut b = GlobalSampler::new(2, 1000, 32).unwrap();
        assert_ne!(a.indices(0, 0, 1).unwrap(), b.indices(0, 0, 1).unwrap());
        assert_ne!(a.epoch_permutation(5), b.epoch_permutation(5));
    }

    #[test]
    fn the_order_is_pinned() {
        // The exact algorithm is part of the resume contract: if this
        // changes, checkpoints from older versions replay different data.
        let mut s = GlobalSampler::new(0, 10, 10).unwrap();
        assert_eq!(s.epoch_permutation(0), [7, 8, 2, 9, 4, 1, 0, 6, 5, 3]);
        let mut s = GlobalSampler::new(0xDEAD_BEEF, 10, 10).unwrap();
        assert_eq!(s.epoch_permutation(3), [0, 9, 8, 3, 4, 6, 2, 1, 5, 7]);
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let mut s = GlobalSampler::new(0, 10, 6).unwrap();
        let err = s.indices(0, 0, 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            "global batch 6 cannot be shared by 7 ranks: every rank needs at least one image"
        );
        assert!(matches!(
            s.indices(0, 0, 0),
            Err(DataError::BatchSmallerThanWorld { .. })
        ));
        assert!(matches!(
            s.indices(0, 3, 3),
            Err(DataError::RankOutOfRange { rank: 3, world: 3 })
        ));
        assert!(GlobalSampler::new(0, 0, 6).is_err());
        assert!(GlobalSampler::new(0, 10, 0).is_err());
    }
}
