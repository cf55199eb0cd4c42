//! Mixed precision: `train.precision = "bf16"` runs the forward passes under autocast.
//!
//! Inside an [`Autocast`] region libtorch casts the inputs of matrix products and
//! convolutions to bfloat16 (their fp32 weights too, cached for the region) and keeps
//! precision-sensitive operators (losses, softmax, norms) in fp32, exactly as
//! `torch.autocast(device_type, dtype=torch.bfloat16)` does. Parameters, gradients, the
//! all-reduce and the optimiser state stay fp32, so nothing else in Gantry changes. bfloat16
//! has fp32's exponent range, so no loss scaling is needed (unlike float16).
//!
//! tch's `autocast` only enables CUDA's float16 autocast; this goes through the C++ shim in
//! `src/kernels.cpp` and works for CPU (AMX/AVX-512 bf16 kernels through oneDNN) and CUDA.

use gantry_config::Precision;
use tch::Device;

unsafe extern "C" {
    fn gantry_autocast_enter(cuda: i32, prev_enabled: *mut i32, prev_dtype: *mut i32);
    fn gantry_autocast_exit(cuda: i32, prev_enabled: i32, prev_dtype: i32);
}

/// Whether (and on which device type) forward passes run in bfloat16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autocast {
    /// `Some(is_cuda)` when enabled.
    device: Option<bool>,
}

impl Autocast {
    pub fn new(precision: Precision, device: Device) -> Self {
        Self {
            device: match precision {
                Precision::Fp32 => None,
                Precision::Bf16 => Some(device.is_cuda()),
            },
        }
    }

    pub fn is_enabled(self) -> bool {
        self.device.is_some()
    }

    /// Runs `f` with autocast on (when enabled) on this thread; the previous state comes back
    /// afterwards, also when `f` panics.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        let Some(cuda) = self.device else {
            return f();
        };
        let _region = Region::enter(cuda);
        f()
    }
}

struct Region {
    cuda: i32,
    prev_enabled: i32,
    prev_dtype: i32,
}

impl Region {
    fn enter(cuda: bool) -> Self {
        let mut region = Self {
            cuda: i32::from(cuda),
            prev_enabled: 0,
            prev_dtype: 0,
        };
        // SAFETY: plain calls into libtorch's thread-local autocast state; the two pointers
        // are valid for the call.
        unsafe {
            gantry_autocast_enter(
                region.cuda,
                &mut region.prev_enabled,
                &mut region.prev_dtype,
            );
        }
        region
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: restores the state saved by `enter` on the same thread (a Region is !Send
        // only by convention: it never leaves `Autocast::run`'s stack frame).
        unsafe { gantry_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;

    #[test]
    fn bf16_region_casts_matrix_products_and_restores_fp32_after() {
        let a = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([8, 2], (Kind::Float, Device::Cpu));
        let bf16 = Autocast::new(Precision::Bf16, Device::Cpu);
        assert!(bf16.is_enabled());
        let inside = bf16.run(|| a.matmul(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(f64::try_from(inside.sum(Kind::Float)).unwrap(), 64.0);
        // Losses stay fp32 inside the region.
        let loss = bf16.run(|| {
            inside.binary_cross_entropy_with_logits::<Tensor>(
                &inside.ones_like(),
                None,
                None,
                tch::Reduction::Mean,
            )
        });
        assert_eq!(loss.kind(), Kind::Float);
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        // Nested regions and a panic inside one leave autocast off afterwards.
        let nested = bf16.run(|| bf16.run(|| a.matmul(&b)).kind());
        assert_eq!(nested, Kind::BFloat16);
        let caught = std::panic::catch_unwind(|| bf16.run(|| panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
    }

    #[test]
    fn fp32_changes_nothing() {
        let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let fp32 = Autocast::new(Precision::Fp32, Device::Cpu);
        assert!(!fp32.is_enabled());
        assert_eq!(fp32.run(|| a.matmul(&a)).kind(), Kind::Float);
    }
}
