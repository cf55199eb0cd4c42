//! Optimisers over a network's flat parameter tensor.
//!
//! Because every parameter of a network is a view into one flat tensor (see [`crate::FlatParams`]),
//! an optimiser step is a handful of kernels over one buffer instead of a loop over tensors.
//! The arithmetic is PyTorch's `torch.optim.Adam` (single-tensor path) and plain SGD.

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
    fn sgd_steps_against_the_gradient() {
        let params = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let mut opt = FlatOptimizer::new(OptimizerKind::Sgd, 0.5, [0.9, 0.999], &params);
        opt.step(&params, &Tensor::from_slice(&[1.0f32, -2.0, 0.0]));
        let got: Vec<f32> = Vec::try_from(&params).unwrap();
        assert_eq!(got, vec![0.5, 2.0, 1.0]);
    }
}
