//! The latent stream: z for every global step as a pure function of (seed, step).
//!
//! Each global step has its own ChaCha8 stream, so any rank can produce its slice of the global
//! batch without the others, a resumed run needs no RNG state, and a world of 2 × 32 draws
//! exactly the vectors a world of 1 × 64 draws.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Separates latent streams from other uses of the same seed.
const LATENT_DOMAIN: u64 = 0x6c61_7465_6e74_7a30;
/// Separates the gradient penalty's interpolation coefficients from the latents.
const INTERPOLATION_DOMAIN: u64 = 0x696e_7465_7270_6f6c;

/// Fills `out` with rows `[first_row, first_row + rows)` of the `global_rows × dim` standard
/// normal latent matrix of `step`.
pub fn fill(seed: u64, step: u64, dim: usize, first_row: usize, rows: usize, out: &mut Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ LATENT_DOMAIN);
    rng.set_stream(step);
    // ChaCha8 can seek: skip the rows other ranks own instead of drawing them. StandardNormal
    // (ziggurat) consumes a variable number of words per sample, so seek per row: every row
    // starts at its own fixed offset of the stream.
    out.clear();
    out.reserve(rows * dim);
    for row in first_row..first_row + rows {
        // 2^20 words per row is far more than any latent size needs (rejections included).
        rng.set_word_pos((row as u128) << 20);
        out.extend((0..dim).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
    }
}

/// Fills `out` with rows `[first_row, first_row + rows)` of the `global_rows` interpolation
/// coefficients (uniform in [0, 1)) of the WGAN-GP penalty at sub-step `step`: one per image,
/// from the 24 high bits of word `row` of the step's own ChaCha8 stream. Like [`fill`], a pure
/// function of (seed, step), so exact resume and world-size invariance hold for the penalty too.
pub fn interpolation(seed: u64, step: u64, first_row: usize, rows: usize, out: &mut Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ INTERPOLATION_DOMAIN);
    rng.set_stream(step);
    out.clear();
    out.extend((first_row..first_row + rows).map(|row| {
        rng.set_word_pos(row as u128);
        (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }));
}

/// Separates the autoregressive model's binarisation draws from the other streams.
const BINARISATION_DOMAIN: u64 = 0x6269_6e61_7269_7365;

/// Fills `out` with rows `[first_row, first_row + rows)` of the `global_rows × per_row`
/// uniform [0, 1) matrix of `step` (24-bit resolution): the dynamic binarisation of a batch
/// (pixel = `intensity > u`), or an autoregressive sampler's draws. A pure function of
/// (seed, step, row), like [`fill`].
pub fn uniforms(
    seed: u64,
    step: u64,
    per_row: usize,
    first_row: usize,
    rows: usize,
    out: &mut Vec<f32>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ BINARISATION_DOMAIN);
    rng.set_stream(step);
    out.clear();
    out.reserve(rows * per_row);
    for row in first_row..first_row + rows {
        rng.set_word_pos((row as u128) << 20);
        out.extend((0..per_row).map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32));
    }
}

/// A fixed latent batch (the sample grid's), independent of any step.
pub fn fixed(seed: u64, rows: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::new();
    fill(seed, u64::MAX, dim, 0, rows, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_slices_concatenate_and_streams_differ() {
        let mut whole = Vec::new();
        uniforms(7, 3, 10, 0, 6, &mut whole);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        uniforms(7, 3, 10, 0, 4, &mut a);
        uniforms(7, 3, 10, 4, 2, &mut b);
        a.extend(b);
        assert_eq!(a, whole);
        assert!(whole.iter().all(|u| (0.0..1.0).contains(u)));
        let mut other = Vec::new();
        uniforms(7, 4, 10, 0, 6, &mut other);
        assert_ne!(other, whole);
    }

    #[test]
    fn slices_concatenate_to_the_global_batch() {
        let mut whole = Vec::new();
        fill(7, 3, 100, 0, 64, &mut whole);
        let mut joined = Vec::new();
        let mut part = Vec::new();
        for rank in 0..4 {
            fill(7, 3, 100, rank * 16, 16, &mut part);
            joined.extend_from_slice(&part);
        }
        assert_eq!(whole, joined);
    }

    #[test]
    fn interpolation_slices_concatenate_and_are_uniform() {
        let mut whole = Vec::new();
        interpolation(7, 3, 0, 4096, &mut whole);
        let mut part = Vec::new();
        interpolation(7, 3, 1024, 1024, &mut part);
        assert_eq!(&whole[1024..2048], part.as_slice());
        assert!(whole.iter().all(|a| (0.0..1.0).contains(a)));
        let mean = whole.iter().map(|&a| f64::from(a)).sum::<f64>() / 4096.0;
        assert!((mean - 0.5).abs() < 0.03, "mean {mean}");
        interpolation(7, 4, 0, 4096, &mut part);
        assert_ne!(whole, part);
    }

    #[test]
    fn steps_and_seeds_differ_and_values_look_normal() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        fill(7, 3, 100, 0, 64, &mut a);
        fill(7, 4, 100, 0, 64, &mut b);
        fill(8, 3, 100, 0, 64, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
