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

use std::marker::PhantomData;

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
        let _region = self.enter();
        f()
    }

    /// Holds an autocast region open on this thread until the guard drops (nothing when
    /// disabled). libtorch casts each fp32 weight to bfloat16 once per outermost region and
    /// reuses the cast for every later product in it, so forward passes that share weights
    /// inside one region share one cast, and their weight gradients meet in bfloat16 before
    /// one conversion back to fp32. Hidden contract: the cached casts are the weights as they
    /// were at their first use, so no weight may change while the region is open.
    pub fn enter(self) -> Option<AutocastRegion> {
        self.device.map(AutocastRegion::enter)
    }
}

/// An open autocast region ([`Autocast::enter`]); closing it restores the previous state and,
/// when it is the outermost one, drops libtorch's cache of cast weights.
#[derive(Debug)]
pub struct AutocastRegion {
    cuda: i32,
    prev_enabled: i32,
    prev_dtype: i32,
    /// libtorch's autocast state is per thread: the region must close where it opened.
    _same_thread: PhantomData<*const ()>,
}

impl AutocastRegion {
    fn enter(cuda: bool) -> Self {
        let mut region = Self {
            cuda: i32::from(cuda),
            prev_enabled: 0,
            prev_dtype: 0,
            _same_thread: PhantomData,
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

impl Drop for AutocastRegion {
    fn drop(&mut self) {
        // SAFETY: restores the state saved by `enter` on the same thread (the region is !Send).
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
    fn one_region_casts_a_weight_once_and_separate_regions_cast_it_again() {
        // A trainable (leaf) weight, used twice; between the uses it changes in place.
        let w = Tensor::ones([8, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
        let bump = || {
            let _ = tch::no_grad(|| w.shallow_clone().fill_(2.0));
        };
        let total = |y: &Tensor| f64::try_from(y.sum(Kind::Float)).unwrap();
        let bf16 = Autocast::new(Precision::Bf16, Device::Cpu);
        let (first, second) = {
            let _region = bf16.enter().expect("bf16 opens a region");
            let first = bf16.run(|| x.matmul(&w));
            bump();
            (first, bf16.run(|| x.matmul(&w)))
        };
        // Inside one region the second product reuses the first cast: the old weight.
        assert_eq!((total(&first), total(&second)), (64.0, 64.0));
        // Both uses feed one cast, whose gradient reaches the fp32 weight: each of its 16
        // elements met 4 rows of ones in each of the 2 products.
        let grad =
            Tensor::run_backward(&[&(&first + &second).sum(Kind::Float)], &[&w], false, false);
        assert_eq!(grad[0].kind(), Kind::Float);
        assert_eq!(total(&grad[0]), 128.0);
        // Once the region has closed, the next one casts the weight as it is now.
        assert_eq!(total(&bf16.run(|| x.matmul(&w))), 128.0);
        assert!(
            Autocast::new(Precision::Fp32, Device::Cpu)
                .enter()
                .is_none()
        );
    }

    #[test]
    fn fp32_changes_nothing() {
        let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let fp32 = Autocast::new(Precision::Fp32, Device::Cpu);
        assert!(!fp32.is_enabled());
        assert_eq!(fp32.run(|| a.matmul(&a)).kind(), Kind::Float);
    }
}
