//! LeakyReLU with any slope, as PyTorch's own kernel.
//!
//! tch's `leaky_relu` fixes the slope at 0.01, and `max(x, s·x)` costs four kernels forward
//! and backward (a product, a maximum, their masks): a quarter of the MLP GAN's step on one
//! CPU core. `at::leaky_relu(x, s)` through the small C++ shim in `src/kernels.cpp` is one
//! kernel each way, twice differentiable (as the WGAN-GP penalty needs), and exactly
//! `torch.nn.functional.leaky_relu`.

use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn gantry_leaky_relu(
        input: *const C_tensor,
        negative_slope: f64,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
}

#[derive(Debug, Clone, Copy)]
pub struct LeakyRelu {
    slope: f64,
}

impl LeakyRelu {
    pub fn new(slope: f64) -> Self {
        Self { slope }
    }

    /// # Panics
    /// When libtorch refuses the input (e.g. an integer tensor), with its message; the
    /// networks only pass floating-point activations.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        // SAFETY: `xs.as_ptr()` is a live at::Tensor for the call; `gantry_leaky_relu` keeps
        // `new_tensor`'s contract.
        unsafe {
            crate::shim::new_tensor("leaky_relu", |error, error_len| {
                gantry_leaky_relu(xs.as_ptr(), self.slope, error, error_len)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn matches_max_of_x_and_slope_x_with_gradients() {
        let act = LeakyRelu::new(0.3);
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.25, 3.0]).set_requires_grad(true);
        let y = act.forward(&x);
        let want = x.maximum(&(&x * 0.3));
        assert_eq!(
            Vec::<f32>::try_from(&y).unwrap(),
            Vec::<f32>::try_from(&want).unwrap()
        );
        let grad = Tensor::run_backward(&[&y.sum(None)], &[&x], true, true);
        assert_eq!(
            Vec::<f32>::try_from(&grad[0]).unwrap(),
            vec![0.3, 0.3, 1.0, 1.0]
        );
        // Twice differentiable: the gradient of the squared input-gradient norm exists.
        let second = Tensor::run_backward(&[&grad[0].square().sum(None)], &[&x], false, false);
        assert_eq!(second[0].size(), [4]);
    }

    #[test]
    fn libtorch_errors_become_messages() {
        let act = LeakyRelu::new(0.3);
        let ints = Tensor::from_slice(&[1i64, -2]);
        let caught = std::panic::catch_unwind(|| act.forward(&ints));
        assert!(caught.is_err());
        let floats = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert_eq!(act.forward(&floats).size(), [2]);
    }
}
