//! Which library multiplies the fully connected layers' fp32 matrices on a CPU
//! (`train.cpu_matmul`).
//!
//! libtorch sends an fp32 `linear` to its BLAS, Intel's MKL on x86. MKL picks its kernels by
//! CPU vendor, not by instruction set: on an AMD EPYC with AVX-512 it runs its AVX2 kernels,
//! about 110 GFLOP/s on one core, where oneDNN (also inside libtorch, and vendor-neutral) runs
//! the same products at 200–250 GFLOP/s with AVX-512. [`Dense`] is a `Linear` layer whose
//! products go through oneDNN's matmul primitive when [`Matmul::OneDnn`] is chosen, forward
//! and backward, in full fp32 (no reduced-precision math mode); the same gradients as
//! libtorch's, up to the summation order of each dot product.
//!
//! Where oneDNN does not apply the layer is libtorch's own `linear`: a GPU, bf16 autocast
//! (libtorch then multiplies through oneDNN itself), and products with a dimension under 16
//! (a 1-logit head, where oneDNN's blocking loses to MKL).

use std::ffi::c_char;

use gantry_config::CpuMatmul;
use tch::Tensor;
use tch::nn::{self, Module};
use torch_sys::C_tensor;

use crate::precision::lent_copy;

unsafe extern "C" {
    fn gantry_linear(
        input: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        onednn: i32,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
}

/// The library a run's fp32 CPU products go through: `train.cpu_matmul` resolved on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matmul {
    /// libtorch's BLAS (MKL on x86).
    Blas,
    /// oneDNN's matmul primitive.
    OneDnn,
}

impl Matmul {
    /// `auto` is oneDNN on x86 CPUs not made by Intel (where MKL holds back its AVX-512
    /// kernels) and the BLAS elsewhere. The answer depends only on the CPU, so every run of a
    /// job on one machine (and a resumed one) multiplies the same way.
    pub fn resolve(choice: CpuMatmul) -> Self {
        match choice {
            CpuMatmul::Blas => Self::Blas,
            CpuMatmul::Onednn => Self::OneDnn,
            CpuMatmul::Auto if x86_not_intel() => Self::OneDnn,
            CpuMatmul::Auto => Self::Blas,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_not_intel() -> bool {
    // CPUID leaf 0: the vendor string, in EBX, EDX, ECX.
    let id = std::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
    &vendor != b"GenuineIntel"
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_not_intel() -> bool {
    false
}

/// A fully connected layer (`nn::Linear`'s parameters, under the same variable names) that
/// multiplies through the chosen [`Matmul`].
#[derive(Debug)]
pub struct Dense {
    pub linear: nn::Linear,
    matmul: Matmul,
}

impl Dense {
    pub fn new(linear: nn::Linear, matmul: Matmul) -> Self {
        Self { linear, matmul }
    }

    /// Inputs per output (the weight's columns).
    pub fn in_features(&self) -> i64 {
        self.linear.ws.size()[1]
    }
}

impl Module for Dense {
    /// # Panics
    /// When libtorch refuses the input (a shape that does not fit the weight), with its
    /// message, as `nn::Linear` does.
    ///
    /// Where bf16 copies of the weights are lent on this thread
    /// ([`crate::precision::Bf16Weights::lend`], only ever under bf16 autocast), the product
    /// takes those instead of casting the fp32 weights.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (lent_weight, lent_bias) = (
            lent_copy(&self.linear.ws),
            self.linear.bs.as_ref().and_then(lent_copy),
        );
        let weight = lent_weight.as_ref().unwrap_or(&self.linear.ws);
        let bias = lent_bias
            .as_ref()
            .or(self.linear.bs.as_ref())
            .map_or(std::ptr::null(), |b| b.as_ptr());
        let onednn = i32::from(self.matmul == Matmul::OneDnn);
        // SAFETY: the three pointers are live at::Tensors (or null for no bias) for the call;
        // `gantry_linear` keeps `new_tensor`'s contract.
        unsafe {
            crate::shim::new_tensor("linear", |error, error_len| {
                gantry_linear(xs.as_ptr(), weight.as_ptr(), bias, onednn, error, error_len)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    use super::*;

    fn layer(vs: &VarStore, inputs: i64, outputs: i64, bias: bool, matmul: Matmul) -> Dense {
        let config = nn::LinearConfig {
            bias,
            ..Default::default()
        };
        Dense::new(nn::linear(vs.root() / "l", inputs, outputs, config), matmul)
    }

    /// Forward output and the input, weight and bias gradients of `sum(y · r)`.
    fn run(dense: &Dense, x: &Tensor, r: &Tensor) -> Vec<Tensor> {
        let x = x.copy().set_requires_grad(true);
        let y = dense.forward(&x);
        let mut wrt = vec![&x, &dense.linear.ws];
        wrt.extend(dense.linear.bs.as_ref());
        let grads = Tensor::run_backward(&[&(&y * r).sum(Kind::Float)], &wrt, false, false);
        std::iter::once(y.detach()).chain(grads).collect()
    }

    fn max_relative_error(got: &Tensor, want: &Tensor) -> f64 {
        let scale = want.abs().max().double_value(&[]).max(1e-30);
        (got - want).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn onednn_gives_libtorchs_values_and_gradients() {
        tch::manual_seed(3);
        // Sizes above and below oneDNN's minimum, with and without a bias.
        for (rows, inputs, outputs, bias) in [(64, 100, 256, false), (48, 96, 1, true)] {
            let vs = VarStore::new(Device::Cpu);
            let fast = layer(&vs, inputs, outputs, bias, Matmul::OneDnn);
            if let Some(b) = &fast.linear.bs {
                let _ = tch::no_grad(|| b.shallow_clone().uniform_(-1.0, 1.0));
            }
            let x = Tensor::randn([rows, inputs], (Kind::Float, Device::Cpu));
            let r = Tensor::randn([rows, outputs], (Kind::Float, Device::Cpu));
            let got = run(&fast, &x, &r);
            let want = {
                let x = x.copy().set_requires_grad(true);
                let y = x.linear(&fast.linear.ws, fast.linear.bs.as_ref());
                let mut wrt = vec![&x, &fast.linear.ws];
                wrt.extend(fast.linear.bs.as_ref());
                let grads =
                    Tensor::run_backward(&[&(&y * &r).sum(Kind::Float)], &wrt, false, false);
                std::iter::once(y.detach()).chain(grads).collect::<Vec<_>>()
            };
            assert_eq!(got.len(), if bias { 4 } else { 3 });
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.size(), w.size(), "output {i}");
                let err = max_relative_error(g, w);
                // fp32 products of up to 100 terms in another order: a few ulps of the largest.
                assert!(
                    err < 1e-5,
                    "{rows}x{inputs}->{outputs}: output {i} off by {err:e}"
                );
            }
        }
    }

    #[test]
    fn a_second_derivative_goes_through_the_onednn_layer() {
        // The WGAN-GP penalty differentiates the input gradient's norm by the weights.
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let fast = layer(&vs, 32, 24, true, Matmul::OneDnn);
        let slow = Dense::new(
            nn::Linear {
                ws: fast.linear.ws.shallow_clone(),
                bs: fast.linear.bs.as_ref().map(Tensor::shallow_clone),
            },
            Matmul::Blas,
        );
        let x = Tensor::randn([20, 32], (Kind::Float, Device::Cpu));
        let penalty_grad = |dense: &Dense| {
            let x = x.copy().set_requires_grad(true);
            let y = dense.forward(&x).tanh().sum(Kind::Float);
            let dx = Tensor::run_backward(&[&y], &[&x], true, true);
            let penalty = dx[0].square().sum(Kind::Float);
            Tensor::run_backward(&[&penalty], &[&dense.linear.ws], false, false).remove(0)
        };
        let got = penalty_grad(&fast);
        let want = penalty_grad(&slow);
        assert!(got.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let err = max_relative_error(&got, &want);
        assert!(err < 1e-4, "second derivative off by {err:e}");
    }

    #[test]
    fn a_mismatched_input_is_libtorchs_error() {
        let vs = VarStore::new(Device::Cpu);
        let fast = layer(&vs, 32, 24, true, Matmul::OneDnn);
        let bad = Tensor::zeros([4, 31], (Kind::Float, Device::Cpu));
        let caught = std::panic::catch_unwind(|| fast.forward(&bad));
        assert!(caught.is_err());
    }

    #[test]
    fn explicit_choices_are_kept_and_auto_resolves() {
        assert_eq!(Matmul::resolve(CpuMatmul::Blas), Matmul::Blas);
        assert_eq!(Matmul::resolve(CpuMatmul::Onednn), Matmul::OneDnn);
        let auto = Matmul::resolve(CpuMatmul::Auto);
        assert_eq!(
            auto,
            Matmul::resolve(CpuMatmul::Auto),
            "auto depends on the CPU only"
        );
    }
}
