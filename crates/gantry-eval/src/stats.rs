//! The statistics behind the scores, on host `f64` buffers so that they can be checked against
//! hand-computed cases without a classifier.

use tch::{Kind, Tensor};

use crate::{EvalError, NUM_CLASSES};

/// A class counts as covered when it receives at least this percentage of the argmax
/// predictions. One stray misclassification in a thousand samples (0.1%) is classifier noise,
/// not a mode the generator covers; 1% is a tenth of the share each digit has in MNIST.
pub const COVERAGE_PERCENT: u32 = 1;

/// A Gaussian fit: mean and (unbiased, `n − 1`) covariance, row-major `dim × dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub mean: Vec<f64>,
    pub cov: Vec<f64>,
}

impl Gaussian {
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Fits `features` (`n × dim`, row-major) in `f64`.
    pub fn fit(features: &[f64], n: usize, dim: usize) -> Result<Self, EvalError> {
        if n < 2 || dim == 0 || features.len() != n * dim {
            return Err(EvalError::Input(format!(
                "a Gaussian fit needs at least 2 samples of a positive dimension; got {} values \
                 for {n} × {dim}",
                features.len()
            )));
        }
        let x = Tensor::from_slice(features).view([n as i64, dim as i64]);
        Self::fit_tensor(&x)
    }

    /// Fits the rows of a 2-D tensor (converted to `f64` first: features are `f32`, and a
    /// covariance accumulated in `f32` over thousands of rows loses digits FID needs).
    pub(crate) fn fit_tensor(x: &Tensor) -> Result<Self, EvalError> {
        let x = x.f_to_kind(Kind::Double)?;
        let n = x.size()[0];
        if n < 2 {
            return Err(EvalError::Input(format!(
                "a Gaussian fit needs at least 2 samples, got {n}"
            )));
        }
        let mean = x.f_mean_dim(0, false, Kind::Double)?;
        let centred = x.f_sub(&mean)?;
        let cov = centred
            .f_tr()?
            .f_matmul(&centred)?
            .f_div_scalar((n - 1) as f64)?;
        Ok(Self {
            mean: to_host(&mean)?,
            cov: to_host(&cov)?,
        })
    }
}

/// The Fréchet distance between two Gaussians,
/// `||mu1 − mu2||² + Tr(S1 + S2 − 2·sqrt(S1·S2))`.
///
/// `S1·S2` is not symmetric, and a general matrix square root of it is unstable when the
/// covariances are singular (ReLU features often have dead dimensions). Instead
/// `Tr sqrt(S1·S2) = Tr sqrt(sqrt(S1)·S2·sqrt(S1))`: the two products have the same non-zero
/// eigenvalues, and the second is symmetric positive semi-definite, so both square roots come
/// from symmetric eigendecompositions. Eigenvalues that rounding pushes below zero are clamped
/// to zero, and so is the final distance (it is a squared distance; a tiny negative value is
/// rounding of two equal fits).
///
/// Rank-deficient covariances need no ridge: with ~100 samples in 128 dimensions (the per-class
/// scores) a fit has rank ≤ 99, but the Fréchet distance of degenerate Gaussians is still well
/// defined, and both square roots above are of symmetric positive semi-definite matrices, whose
/// zero eigenvalues only become rounding-sized values, clamped at zero. The error they add to
/// `Tr sqrt(·)` is about `dim · sqrt(ε) · sqrt(λ_max)` (ε the `f64` epsilon), some 1e-6 of the
/// features' spread, far below any difference a score is read for; the unit tests check the
/// result against an independent (non-symmetric) eigenvalue route on fits with `n < dim`.
/// Adding `ε·I` would instead bias every distance by `2·dim·ε` minus a data-dependent term.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64, EvalError> {
    let d = a.dim();
    if d == 0 || b.dim() != d || a.cov.len() != d * d || b.cov.len() != d * d {
        return Err(EvalError::Input(format!(
            "Fréchet distance of Gaussians of different or invalid shapes ({} and {})",
            a.dim(),
            b.dim()
        )));
    }
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |cov: &[f64]| (0..d).map(|i| cov[i * d + i]).sum::<f64>();

    let shape = [d as i64, d as i64];
    let s1 = symmetrised(&Tensor::from_slice(&a.cov).view(shape))?;
    let s2 = symmetrised(&Tensor::from_slice(&b.cov).view(shape))?;
    let (w, v) = s1.f_linalg_eigh("L")?;
    let sqrt_s1 = v
        .f_mul(&w.f_clamp_min(0.0)?.f_sqrt()?.f_unsqueeze(0)?)?
        .f_matmul(&v.f_tr()?)?;
    let m = symmetrised(&sqrt_s1.f_matmul(&s2)?.f_matmul(&sqrt_s1)?)?;
    let tr_sqrt = m
        .f_linalg_eigvalsh("L")?
        .f_clamp_min(0.0)?
        .f_sqrt()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?;

    let fid = mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * tr_sqrt;
    if !fid.is_finite() {
        return Err(EvalError::Numerical(format!("Fréchet distance is {fid}")));
    }
    Ok(fid.max(0.0))
}

/// `(m + mᵀ) / 2`: eigh reads one triangle only, so asymmetry from rounding would otherwise be
/// silently dropped from one side.
fn symmetrised(m: &Tensor) -> Result<Tensor, EvalError> {
    Ok(m.f_add(&m.f_tr()?)?.f_mul_scalar(0.5)?)
}

/// `exp(E_x KL(p(y|x) || p(y)))` over `n` rows of class probabilities (`n × classes`).
///
/// One split over all samples (the original IS averages ten splits; with a 10-class classifier
/// and ~1,000 samples, splits of 100 would mostly measure their own sampling noise). Ranges
/// from 1 (every sample gets the same prediction) to the number of classes (confident
/// predictions, spread evenly).
pub fn inception_score(probs: &[f64], n: usize, classes: usize) -> Result<f64, EvalError> {
    if n == 0 || classes == 0 || probs.len() != n * classes {
        return Err(EvalError::Input(format!(
            "inception score of {} probabilities for {n} × {classes}",
            probs.len()
        )));
    }
    let mut marginal = vec![0.0; classes];
    for row in probs.chunks_exact(classes) {
        for (m, &p) in marginal.iter_mut().zip(row) {
            *m += p / n as f64;
        }
    }
    let mean_kl = probs
        .chunks_exact(classes)
        .map(|row| {
            row.iter()
                .zip(&marginal)
                // p·log(p/q) → 0 as p → 0; q > 0 wherever p > 0, since q averages p.
                .filter(|&(&p, _)| p > 0.0)
                .map(|(&p, &q)| p * (p / q).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / n as f64;
    if !mean_kl.is_finite() {
        return Err(EvalError::Numerical(format!(
            "mean KL divergence is {mean_kl}"
        )));
    }
    Ok(mean_kl.exp())
}

/// Counts argmax predictions per class.
pub fn class_histogram(predictions: &[u8]) -> [u32; NUM_CLASSES] {
    let mut hist = [0u32; NUM_CLASSES];
    for &p in predictions {
        hist[usize::from(p)] += 1;
    }
    hist
}

/// The number of classes holding at least [`COVERAGE_PERCENT`] of the predictions (and at
/// least one). Integer arithmetic, so that "exactly 1%" is not at the mercy of rounding.
pub fn classes_covered(hist: &[u32; NUM_CLASSES]) -> u32 {
    let total: u64 = hist.iter().map(|&c| u64::from(c)).sum();
    let covered = |c: u64| c > 0 && c * 100 >= u64::from(COVERAGE_PERCENT) * total;
    hist.iter().filter(|&&c| covered(u64::from(c))).count() as u32
}

pub(crate) fn to_host(t: &Tensor) -> Result<Vec<f64>, EvalError> {
    let flat = t.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagonal(mean: &[f64], var: &[f64]) -> Gaussian {
        let d = var.len();
        let mut cov = vec![0.0; d * d];
        for (i, &v) in var.iter().enumerate() {
            cov[i * d + i] = v;
        }
        Gaussian {
            mean: mean.to_vec(),
            cov,
        }
    }

    #[test]
    fn frechet_distance_of_diagonal_gaussians_matches_the_closed_form() {
        // For diagonal S1, S2: Tr sqrt(S1·S2) = Σ sqrt(d1·d2), so the distance is
        // Σ (m1 − m2)² + Σ (sqrt(d1) − sqrt(d2))².
        let a = diagonal(&[0.0, 1.0, 2.0], &[1.0, 4.0, 9.0]);
        let b = diagonal(&[1.0, 1.0, 0.0], &[4.0, 1.0, 0.25]);
        let expected = (1.0 + 0.0 + 4.0) + (1.0 + 1.0 + 6.25);
        let got = frechet_distance(&a, &b).unwrap();
        assert!(
            (got - expected).abs() < 1e-9,
            "got {got}, expected {expected}"
        );
        // Symmetric in its arguments.
        let back = frechet_distance(&b, &a).unwrap();
        assert!((back - expected).abs() < 1e-9, "got {back}");
    }

    #[test]
    fn frechet_distance_handles_rotated_and_singular_covariances() {
        // The same distributions as above, rotated by 45° in the first two coordinates: the
        // distance is rotation invariant, but the covariances are no longer diagonal.
        let (c, s) = (
            std::f64::consts::FRAC_1_SQRT_2,
            std::f64::consts::FRAC_1_SQRT_2,
        );
        let r = [[c, -s], [s, c]];
        let rotate = |g: &Gaussian| {
            let mut out = g.clone();
            for i in 0..2 {
                out.mean[i] = r[i][0] * g.mean[0] + r[i][1] * g.mean[1];
                for j in 0..2 {
                    // R S Rᵀ restricted to the 2×2 block (S is diagonal there).
                    out.cov[i * 3 + j] =
                        r[i][0] * g.cov[0] * r[j][0] + r[i][1] * g.cov[4] * r[j][1];
                }
            }
            out
        };
        let a = diagonal(&[0.0, 1.0, 2.0], &[1.0, 4.0, 9.0]);
        let b = diagonal(&[1.0, 1.0, 0.0], &[4.0, 1.0, 0.0]); // singular
        let expected = 5.0 + (1.0 + 1.0 + 9.0);
        let got = frechet_distance(&rotate(&a), &rotate(&b)).unwrap();
        assert!(
            (got - expected).abs() < 1e-9,
            "got {got}, expected {expected}"
        );
        assert!(frechet_distance(&a, &a).unwrap() < 1e-12);
    }

    /// `n` rows of `dim` uniform values in `[offset, offset + scale)`.
    fn random_rows(n: usize, dim: usize, offset: f64, scale: f64, seed: u64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim)
            .map(|_| offset + scale * rng.r#gen::<f64>())
            .collect()
    }

    /// `Tr sqrt(S1·S2)` from the eigenvalues of the non-symmetric product itself: real and
    /// non-negative in exact arithmetic (the product is similar to a PSD matrix).
    fn trace_sqrt_via_general_eig(a: &Gaussian, b: &Gaussian) -> f64 {
        let d = a.dim() as i64;
        let s1 = Tensor::from_slice(&a.cov).view([d, d]);
        let s2 = Tensor::from_slice(&b.cov).view([d, d]);
        let eig = s1.matmul(&s2).linalg_eigvals().real();
        eig.clamp_min(0.0)
            .sqrt()
            .sum(Kind::Double)
            .double_value(&[])
    }

    #[test]
    fn frechet_distance_of_rank_deficient_fits_is_finite_and_matches_another_route() {
        // 30 and 40 samples in 64 dimensions: both covariances have rank < 64, as the
        // per-class scores' ~100 samples in 128 dimensions do.
        let dim = 64;
        let a = Gaussian::fit(&random_rows(30, dim, 0.0, 1.0, 1), 30, dim).unwrap();
        let b = Gaussian::fit(&random_rows(40, dim, 0.2, 1.5, 2), 40, dim).unwrap();
        let trace = |g: &Gaussian| (0..dim).map(|i| g.cov[i * dim + i]).sum::<f64>();
        let mean_term: f64 = a
            .mean
            .iter()
            .zip(&b.mean)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let expected = mean_term + trace(&a) + trace(&b) - 2.0 * trace_sqrt_via_general_eig(&a, &b);

        let got = frechet_distance(&a, &b).unwrap();
        assert!(got.is_finite() && got > 0.0, "{got}");
        assert!(
            (got - expected).abs() <= 1e-6 * expected,
            "got {got}, expected {expected}"
        );
        let back = frechet_distance(&b, &a).unwrap();
        assert!((back - got).abs() <= 1e-9 * got, "{back} vs {got}");
        // A degenerate fit against itself: zero up to rounding, relative to its spread.
        let own = frechet_distance(&a, &a).unwrap();
        assert!(own <= 1e-6 * trace(&a), "{own} vs trace {}", trace(&a));
        // The same samples scaled by 2 about their mean: S2 = 4·S1 (same null space), so
        // Tr sqrt(S1·S2) = 2·Tr S1 and the distance is exactly Tr S1 plus the mean term.
        let scaled: Vec<f64> = random_rows(30, dim, 0.0, 1.0, 1)
            .chunks(dim)
            .flat_map(|row| row.iter().zip(&a.mean).map(|(x, m)| m + 2.0 * (x - m)))
            .collect();
        let wide = Gaussian::fit(&scaled, 30, dim).unwrap();
        let got = frechet_distance(&a, &wide).unwrap();
        assert!(
            (got - trace(&a)).abs() <= 1e-6 * trace(&a),
            "got {got}, expected {}",
            trace(&a)
        );
    }

    #[test]
    fn gaussian_fit_is_unbiased_and_rejects_too_few_samples() {
        // Rows (0, 0), (2, 4): mean (1, 2); unbiased covariance [[2, 4], [4, 8]].
        let g = Gaussian::fit(&[0.0, 0.0, 2.0, 4.0], 2, 2).unwrap();
        assert_eq!(g.mean, vec![1.0, 2.0]);
        assert_eq!(g.cov, vec![2.0, 4.0, 4.0, 8.0]);
        assert!(Gaussian::fit(&[1.0, 2.0], 1, 2).is_err());
        assert!(Gaussian::fit(&[1.0, 2.0, 3.0], 2, 2).is_err());
    }

    #[test]
    fn inception_score_spans_one_to_the_number_of_classes() {
        // Confident and evenly spread: KL = log(classes) for every row.
        let mut eye = vec![0.0; 16];
        for i in 0..4 {
            eye[i * 4 + i] = 1.0;
        }
        assert!((inception_score(&eye, 4, 4).unwrap() - 4.0).abs() < 1e-12);
        // Identical rows: every KL is 0, whatever the row.
        let same = [0.7, 0.1, 0.1, 0.1].repeat(5);
        assert!((inception_score(&same, 5, 4).unwrap() - 1.0).abs() < 1e-12);
        // Two confident classes out of four, 50/50: exp(log 2) = 2.
        let two = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        assert!((inception_score(&two, 2, 4).unwrap() - 2.0).abs() < 1e-12);
        assert!(inception_score(&two, 3, 4).is_err());
    }

    #[test]
    fn coverage_counts_classes_at_or_above_one_percent() {
        let mut preds = vec![1u8; 150];
        preds.extend(std::iter::repeat_n(7u8, 48));
        preds.extend([3u8, 3]);
        preds.push(9);
        let hist = class_histogram(&preds);
        assert_eq!(hist, [0, 150, 0, 2, 0, 0, 0, 48, 0, 1]);
        assert_eq!(classes_covered(&hist), 2, "3 has 2/201 < 1%, 9 has 1/201");
        let hist = class_histogram(&preds[..200]);
        assert_eq!(classes_covered(&hist), 3, "3 has 2/200 = 1%");
        assert_eq!(classes_covered(&[0; 10]), 0);
    }
}
