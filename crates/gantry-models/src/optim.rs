//! Optimisers over a network's flat parameter tensor.
//!
//! Because every parameter of a network is a view into one flat tensor (see [`crate::FlatParams`]),
//! an optimiser step is a handful of kernels over one buffer instead of a loop over tensors.
//! The arithmetic is PyTorch's `torch.optim.Adam` (single-tensor path) and plain SGD.
//!
//! On the CPU, Adam runs as one fused pass in Rust over the f32 buffers: libtorch's
//! single-tensor path makes eight passes over memory (two lerps, a square, a sqrt, a
//! division, an addition, a product, addcdiv) with four temporaries; the fused loop reads each
//! element once, which is what makes the update memory-bound instead of allocation-bound.
//! Other devices and dtypes take the libtorch kernels.

use gantry_config::Optimizer as OptimizerKind;
use tch::Tensor;

/// Adam's or SGD's state for one network.
#[derive(Debug)]
pub struct FlatOptimizer {
    kind: OptimizerKind,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Steps taken (Adam's `t`).
    pub step: u64,
    /// First moment (Adam only; empty for SGD).
    pub exp_avg: Tensor,
    /// Second moment (Adam only; empty for SGD).
    pub exp_avg_sq: Tensor,
}

impl FlatOptimizer {
    pub fn new(kind: OptimizerKind, lr: f64, betas: [f64; 2], params: &Tensor) -> Self {
        let (exp_avg, exp_avg_sq) = match kind {
            OptimizerKind::Adam => (params.zeros_like(), params.zeros_like()),
            OptimizerKind::Sgd => (Tensor::new(), Tensor::new()),
        };
        Self {
            kind,
            lr,
            beta1: betas[0],
            beta2: betas[1],
            eps: 1e-8,
            step: 0,
            exp_avg,
            exp_avg_sq,
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Applies one update to `params` (flat, updated in place) from `grad` (same layout).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor) {
        tch::no_grad(|| {
            let mut params = params.shallow_clone();
            self.step += 1;
            match self.kind {
                OptimizerKind::Sgd => {
                    let _ = params.g_add_(&(grad * -self.lr));
                }
                OptimizerKind::Adam if fusable(&params, grad, &self.exp_avg, &self.exp_avg_sq) => {
                    let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                    let constants = AdamConstants {
                        one_minus_beta1: (1.0 - self.beta1) as f32,
                        one_minus_beta2: (1.0 - self.beta2) as f32,
                        step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
                        bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
                        eps: self.eps as f32,
                    };
                    // SAFETY: `fusable` checked that all four are contiguous f32 CPU tensors
                    // of the same length; they are distinct allocations (parameters,
                    // gradient and both moments), and nothing else touches them meanwhile.
                    unsafe {
                        let n = params.numel();
                        adam_fused(
                            as_mut_slice(&mut params, n),
                            as_slice(grad, n),
                            as_mut_slice(&mut self.exp_avg, n),
                            as_mut_slice(&mut self.exp_avg_sq, n),
                            &constants,
                        );
                    }
                }
                OptimizerKind::Adam => {
                    let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                    let _ = self.exp_avg.lerp_(grad, 1.0 - self.beta1);
                    let _ = self.exp_avg_sq.lerp_(&grad.square(), 1.0 - self.beta2);
                    let bias1 = 1.0 - self.beta1.powi(t);
                    let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
                    let denom = self.exp_avg_sq.sqrt() / bias2_sqrt + self.eps;
                    let _ = params.addcdiv_(&(&self.exp_avg * (-self.lr / bias1)), &denom);
                }
            }
        });
    }
}

/// Adam's per-step constants in f32, as the fused loop uses them.
struct AdamConstants {
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
}

/// One Adam update, element by element: `m ← lerp(m, g, 1−β1)`, `v ← lerp(v, g², 1−β2)`,
/// `p ← p − step_size · m / (√v / √(1−β2ᵗ) + ε)`.
fn adam_fused(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConstants) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = lerp(*m, *g, c.one_minus_beta1);
        *v = lerp(*v, g * g, c.one_minus_beta2);
        let denom = v.sqrt() / c.bias2_sqrt + c.eps;
        *p -= c.step_size * *m / denom;
    }
}

/// `torch.lerp`'s formula: the form that is exact at the nearer end point.
#[inline]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

fn fusable(params: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let n = params.numel();
    [params, grad, m, v].iter().all(|t| {
        t.device() == tch::Device::Cpu
            && t.kind() == tch::Kind::Float
            && t.is_contiguous()
            && t.numel() == n
    })
}

/// # Safety
/// `t` is a contiguous f32 CPU tensor of `n` elements that nothing else accesses while the
/// slice lives.
unsafe fn as_mut_slice(t: &mut Tensor, n: usize) -> &mut [f32] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) }
}

/// # Safety
/// As [`as_mut_slice`], read-only.
unsafe fn as_slice(t: &Tensor, n: usize) -> &[f32] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<f32>().cast_const(), n) }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    /// Adam written out element by element, as in the paper and torch.optim.Adam.
    fn reference_adam(p: &mut [f64], grads: &[Vec<f64>], lr: f64, b1: f64, b2: f64) {
        let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
    }

    #[test]
    fn adam_matches_the_written_out_formula() {
        let start = [0.5f64, -1.0, 2.0, 0.0];
        let grads: Vec<Vec<f64>> = (0..5)
            .map(|s| {
                start
                    .iter()
                    .enumerate()
                    .map(|(i, _)| (s as f64 - i as f64) * 0.3)
                    .collect()
            })
            .collect();
        let mut want = start.to_vec();
        reference_adam(&mut want, &grads, 1e-2, 0.5, 0.999);

        let params = Tensor::from_slice(&start).to_kind(Kind::Double);
        let mut opt = FlatOptimizer::new(OptimizerKind::Adam, 1e-2, [0.5, 0.999], &params);
        for g in &grads {
            opt.step(&params, &Tensor::from_slice(g));
        }
        let got: Vec<f64> = Vec::try_from(&params).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.step, 5);
    }

    #[test]
    fn the_fused_cpu_path_matches_the_libtorch_kernels() {
        let n = 10_000i64;
        let start = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let fused = start.copy();
        let mut fused_opt = FlatOptimizer::new(OptimizerKind::Adam, 2e-4, [0.5, 0.999], &fused);
        // A strided view is not fusable: that instance runs libtorch's kernels.
        let wide = Tensor::zeros([n, 2], (Kind::Float, Device::Cpu));
        wide.select(1, 0).copy_(&start);
        let kernels = wide.select(1, 0);
        let mut kernel_opt = FlatOptimizer::new(OptimizerKind::Adam, 2e-4, [0.5, 0.999], &kernels);
        for step in 0..20 {
            let grad = Tensor::randn([n], (Kind::Float, Device::Cpu)) * (1.0 + step as f64);
            fused_opt.step(&fused, &grad);
            kernel_opt.step(&kernels, &grad);
        }
        let diff = (&fused - &kernels).abs().max().double_value(&[]);
        let moved = (&fused - &start).abs().max().double_value(&[]);
        assert!(moved > 1e-4, "the parameters moved ({moved})");
        assert!(diff < 1e-6, "fused and libtorch Adam differ by {diff}");
    }

    #[test]
    fn sgd_steps_against_the_gradient() {
        let params = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let mut opt = FlatOptimizer::new(OptimizerKind::Sgd, 0.5, [0.9, 0.999], &params);
        opt.step(&params, &Tensor::from_slice(&[1.0f32, -2.0, 0.0]));
        let got: Vec<f32> = Vec::try_from(&params).unwrap();
        assert_eq!(got, vec![0.5, 2.0, 1.0]);
    }
}
