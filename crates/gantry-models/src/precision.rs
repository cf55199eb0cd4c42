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
//!
//! Autocast casts every fp32 weight to bf16 once a step, and its backward pass converts each
//! bf16 weight gradient back to fp32: two passes over every weight that do no arithmetic.
//! [`Bf16Weights`] saves both on the host: the optimiser writes a bf16 copy of the
//! parameters in the same pass that updates them, [`crate::matmul::Dense`] layers multiply
//! by that copy, and the gradient comes back in bf16 to be read, widened, by the optimiser
//! (or widened by the copy that gathers it for an all-reduce). The values are autocast's:
//! the copy is the parameters rounded to nearest-even, exactly autocast's cast, and
//! widening a bf16 gradient is exact.

use std::cell::RefCell;
use std::marker::PhantomData;

use gantry_config::Precision;
use tch::{Device, Kind, Tensor};

use crate::FlatParams;

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

/// A bf16 copy of one network's parameters, in their [`FlatParams`] layout, for the forward
/// passes of training steps under bf16 autocast (see the module's overview).
///
/// Hidden contract: the copy is current only while every change to the parameters goes
/// through the optimiser that writes it ([`crate::optim::FlatOptimizer::write_bf16_copy`]);
/// whoever writes the parameters otherwise (a checkpoint loaded, a broadcast from rank 0)
/// calls [`Bf16Weights::refresh`] after.
#[derive(Debug)]
pub struct Bf16Weights {
    /// Every copy, concatenated as the parameters are.
    flat: Tensor,
    /// Per parameter, in layout order: the address of its fp32 data (how a layer finds its
    /// copy) and the copy, a leaf of its own whose data lies in `flat`, so that autograd
    /// returns its gradient.
    leaves: Vec<(usize, Tensor)>,
}

thread_local! {
    /// The copies lent to the forward passes on this thread ([`Bf16Weights::lend`]).
    static LENT: RefCell<Vec<(usize, Tensor)>> = const { RefCell::new(Vec::new()) };
}

impl Bf16Weights {
    pub fn new(params: &FlatParams) -> Self {
        let flat = tch::no_grad(|| params.flat.to_kind(Kind::BFloat16));
        let mut offset = 0;
        let leaves = params
            .tensors
            .iter()
            .map(|param| {
                let numel = param.numel() as i64;
                let mut leaf =
                    Tensor::empty(param.size().as_slice(), (Kind::BFloat16, param.device()))
                        .set_requires_grad(true);
                leaf.set_data(&flat.narrow(0, offset, numel).view(param.size().as_slice()));
                offset += numel;
                (param.data_ptr() as usize, leaf)
            })
            .collect();
        Self { flat, leaves }
    }

    /// The whole copy (one bf16 tensor in the parameters' layout), for the optimiser to write.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Rounds the parameters into the copy again, after they changed other than through the
    /// optimiser.
    pub fn refresh(&self, params: &FlatParams) {
        tch::no_grad(|| {
            self.flat.shallow_clone().copy_(&params.flat);
        });
    }

    /// Makes these copies the weights of every [`crate::matmul::Dense`] forward pass on this
    /// thread that runs under autocast, until the guard drops.
    pub fn lend(&self) -> LentWeights {
        LENT.with_borrow_mut(|lent| {
            let before = lent.len();
            lent.extend(
                self.leaves
                    .iter()
                    .map(|(at, leaf)| (*at, leaf.shallow_clone())),
            );
            LentWeights {
                before,
                _same_thread: PhantomData,
            }
        })
    }

    /// The gradient of `loss` with respect to each of `params` (these copies' network), in
    /// layout order: where a forward pass multiplied by a parameter's copy, the bf16 gradient
    /// of the copy; where it used the parameter itself (a BatchNorm scale, an embedding), its
    /// fp32 gradient; where both, their sum in fp32; undefined where neither.
    pub fn gradients(&self, loss: &Tensor, params: &FlatParams, keep_graph: bool) -> Vec<Tensor> {
        let wrt: Vec<&Tensor> = params
            .tensors
            .iter()
            .chain(self.leaves.iter().map(|(_, leaf)| leaf))
            .collect();
        let mut own = Tensor::run_backward(&[loss], &wrt, keep_graph, false);
        let of_copies = own.split_off(params.tensors.len());
        own.into_iter()
            .zip(of_copies)
            .map(|(own, of_copy)| match (own.defined(), of_copy.defined()) {
                (_, false) => own,
                (false, true) => of_copy,
                (true, true) => tch::no_grad(|| own + of_copy.to_kind(Kind::Float)),
            })
            .collect()
    }
}

/// The copy lent for `param` on this thread, if any ([`Bf16Weights::lend`]).
pub(crate) fn lent_copy(param: &Tensor) -> Option<Tensor> {
    LENT.with_borrow(|lent| {
        if lent.is_empty() {
            return None;
        }
        let at = param.data_ptr() as usize;
        lent.iter()
            .find(|(of, _)| *of == at)
            .map(|(_, leaf)| leaf.shallow_clone())
    })
}

/// Runs `f` with no copies lent on this thread (they are lent again after): its products
/// cast the fp32 weights, as under autocast alone, and their weight gradients reach the fp32
/// parameters apart from the copies' ones.
pub(crate) fn without_lent_copies<T>(f: impl FnOnce() -> T) -> T {
    struct LendAgain(Vec<(usize, Tensor)>);
    impl Drop for LendAgain {
        fn drop(&mut self) {
            LENT.with_borrow_mut(|lent| *lent = std::mem::take(&mut self.0));
        }
    }
    let _again = LendAgain(LENT.with_borrow_mut(std::mem::take));
    f()
}

/// Lent copies ([`Bf16Weights::lend`]); dropping it takes them back. Guards drop in the
/// reverse order of their lending (each takes back what was lent after it, too).
#[derive(Debug)]
pub struct LentWeights {
    before: usize,
    /// The loan is in a thread-local list: it must end where it began.
    _same_thread: PhantomData<*const ()>,
}

impl Drop for LentWeights {
    fn drop(&mut self) {
        LENT.with_borrow_mut(|lent| lent.truncate(self.before));
    }
}

#[cfg(test)]
mod tests {
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
