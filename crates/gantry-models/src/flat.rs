//! A network's trainable parameters as views into one flat tensor.

use tch::{Device, Kind, Tensor, nn::VarStore};

/// The trainable parameters of one `VarStore`, re-pointed to views of a single contiguous
/// tensor. Gradients are flattened into the same layout, so one all-reduce and one fused
/// optimiser pass cover the whole network, with no per-tensor packing and unpacking.
#[derive(Debug)]
pub struct FlatParams {
    /// Parameter names in layout order (sorted, so every rank agrees).
    pub names: Vec<String>,
    /// The parameters themselves (shallow handles sharing the VarStore's tensors).
    pub tensors: Vec<Tensor>,
    /// All parameters, concatenated; updating it in place updates the network.
    pub flat: Tensor,
}

impl FlatParams {
    pub fn new(vs: &VarStore) -> Self {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let flat = tch::no_grad(|| {
            let pieces: Vec<Tensor> = named.iter().map(|(_, t)| t.reshape([-1])).collect();
            Tensor::cat(&pieces, 0)
        });
        let mut offset = 0;
        for (_, tensor) in &mut named {
            let numel = i64::try_from(tensor.numel()).unwrap_or(i64::MAX);
            let view = flat.narrow(0, offset, numel).view(tensor.size().as_slice());
            tensor.set_data(&view);
            offset += numel;
        }
        let (names, tensors) = named.into_iter().unzip();
        Self {
            names,
            tensors,
            flat,
        }
    }

    pub fn numel(&self) -> usize {
        self.flat.numel()
    }

    /// Concatenates per-parameter gradients (in `tensors` order) into `out` (`numel()`
    /// elements of the parameters' kind), without allocating. A parameter that got no
    /// gradient contributes zeros. On the host the finite check rides along with the copy
    /// (a gradient read once costs less than one copied and then scanned again) and its
    /// answer is returned; `None` where libtorch copied (device memory), unchecked, since
    /// reading the answer there would wait for the device.
    pub fn flatten_grads_into(&self, grads: &[Tensor], out: &Tensor) -> Option<bool> {
        let host = is_host_f32(out)
            && grads
                .iter()
                .zip(&self.tensors)
                .all(|(g, p)| !g.defined() || (is_host_gradient(g) && g.numel() == p.numel()));
        if !host {
            let pieces: Vec<Tensor> = grads
                .iter()
                .zip(&self.tensors)
                .map(|(g, p)| match g.defined() {
                    true => g.shallow_clone(),
                    false => p.zeros_like(),
                })
                .collect();
            gather_pieces(&pieces, out);
            return None;
        }
        // SAFETY: `out` is a contiguous f32 host tensor of numel() elements that only this
        // call writes while the slice lives.
        let all =
            unsafe { std::slice::from_raw_parts_mut(out.data_ptr().cast::<f32>(), out.numel()) };
        let mut rest = all;
        let mut finite = true;
        for (g, p) in grads.iter().zip(&self.tensors) {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(p.numel());
            rest = tail;
            if !g.defined() {
                piece.fill(0.0);
            } else if g.kind() == Kind::BFloat16 {
                // SAFETY: `g` is a contiguous bf16 host tensor (checked above), read only.
                let src = unsafe {
                    std::slice::from_raw_parts(g.data_ptr().cast::<u16>().cast_const(), g.numel())
                };
                finite &= widen_checked(piece, src);
            } else {
                // SAFETY: `g` is a contiguous f32 host tensor (checked above), read only.
                let src = unsafe {
                    std::slice::from_raw_parts(g.data_ptr().cast::<f32>().cast_const(), g.numel())
                };
                finite &= gather_checked(piece, src);
            }
        }
        Some(finite)
    }

    /// Per-parameter gradients (in `tensors` order) kept where autograd put them, for an
    /// optimiser that reads them there ([`crate::optim::Gradient::Pieces`]): a parameter that
    /// got no gradient gets zeros, and whether every value is finite is returned beside them.
    /// The gradients come back as `Err` unless every one is a contiguous f32 or bf16 host
    /// tensor of its parameter's length; [`FlatParams::flatten_grads_into`] is the way for
    /// those.
    pub fn checked_pieces(&self, grads: Vec<Tensor>) -> Result<(Vec<Tensor>, bool), Vec<Tensor>> {
        let pieces = self.pieces(grads)?;
        let finite = pieces.iter().all(all_finite);
        Ok((pieces, finite))
    }

    /// [`FlatParams::checked_pieces`] without the finite check, for a reducer that checks the
    /// combined gradient instead ([`crate::task::GradReduce::takes_pieces`]).
    pub fn pieces(&self, grads: Vec<Tensor>) -> Result<Vec<Tensor>, Vec<Tensor>> {
        let usable = grads
            .iter()
            .zip(&self.tensors)
            .all(|(g, p)| !g.defined() || (is_host_gradient(g) && g.numel() == p.numel()));
        if !usable || grads.len() != self.tensors.len() {
            return Err(grads);
        }
        Ok(grads
            .into_iter()
            .zip(&self.tensors)
            .map(|(g, p)| match g.defined() {
                true => g,
                false => p.zeros_like().detach(),
            })
            .collect())
    }

    /// (name, shape, kind) of every parameter, to check that ranks built the same network.
    pub fn signature(&self) -> Vec<(String, Vec<i64>, Kind)> {
        self.names
            .iter()
            .zip(&self.tensors)
            .map(|(n, t)| (n.clone(), t.size(), t.kind()))
            .collect()
    }
}

/// Per-parameter tensors (every one defined) as one flat fp32 tensor, in their order.
pub(crate) fn concatenated(pieces: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> = pieces
        .iter()
        .map(|g| g.reshape([-1]).to_kind(Kind::Float))
        .collect();
    Tensor::cat(&flat, 0)
}

fn is_host_f32(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

/// Writes the concatenation of `pieces` (flattened, converted to `out`'s kind) into `out`.
pub fn gather_pieces(pieces: &[Tensor], out: &Tensor) {
    tch::no_grad(|| {
        let flat: Vec<Tensor> = pieces
            .iter()
            .map(|p| p.reshape([-1]).to_kind(out.kind()))
            .collect();
        let _ = Tensor::cat_out(out, &flat, 0);
    });
}

/// A contiguous bf16 host tensor, which the host loops read (and write) by its bits.
pub(crate) fn is_host_bf16(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::BFloat16 && t.is_contiguous()
}

/// A gradient the host loops read where it lies: f32, or bf16 (the gradient of a
/// [`crate::precision::Bf16Weights`] copy), contiguous in host memory.
pub(crate) fn is_host_gradient(t: &Tensor) -> bool {
    is_host_f32(t) || is_host_bf16(t)
}

/// A bf16 value (its bits) as f32: exact.
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// An exponent of all ones: an infinity or a NaN.
const EXPONENT: u32 = 0x7f80_0000;

/// Whether every element of `t` is finite.
pub fn all_finite(t: &Tensor) -> bool {
    if is_host_f32(t) {
        // libtorch's isfinite().all() materialises a bool tensor and costs ~5 ns an element
        // on one core; a scan of the host memory costs a tenth of that.
        // SAFETY: a contiguous f32 host tensor of numel() elements, only read while `t` lives.
        let values = unsafe {
            std::slice::from_raw_parts(t.data_ptr().cast::<f32>().cast_const(), t.numel())
        };
        return values.chunks(4096).all(|block| non_finite_in(block) == 0);
    }
    if is_host_bf16(t) {
        // SAFETY: a contiguous bf16 host tensor of numel() elements, only read while `t` lives.
        let values = unsafe {
            std::slice::from_raw_parts(t.data_ptr().cast::<u16>().cast_const(), t.numel())
        };
        return values
            .chunks(4096)
            .all(|block| non_finite_bf16_in(block) == 0);
    }
    bool::try_from(t.isfinite().all()).unwrap_or(false)
}

gantry_simd::widest! {
    /// Non-zero when a value of `block` is infinite or NaN.
    fn non_finite_in(block: &[f32]) -> u32 => or_exponents
}

/// Branch-free, so it vectorises; callers exit early per block.
#[inline(always)]
fn or_exponents(block: &[f32]) -> u32 {
    block.iter().fold(0, |bad, v| {
        bad | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    })
}

/// bf16's exponent field (fp32's upper half).
const BF16_EXPONENT: u16 = 0x7f80;

gantry_simd::widest! {
    /// Non-zero when a bf16 value (its bits) of `block` is infinite or NaN.
    fn non_finite_bf16_in(block: &[u16]) -> u32 => or_bf16_exponents
}

#[inline(always)]
fn or_bf16_exponents(block: &[u16]) -> u32 {
    block.iter().fold(0, |bad, v| {
        bad | u32::from(v & BF16_EXPONENT == BF16_EXPONENT)
    })
}

/// Widens bf16 values (their bits) into `dst`, exactly; false if one is not finite.
fn widen_checked(dst: &mut [f32], src: &[u16]) -> bool {
    dst.chunks_mut(4096)
        .zip(src.chunks(4096))
        .fold(0, |bad, (d, s)| bad | widen_block(d, s))
        == 0
}

gantry_simd::widest! {
    fn widen_block(dst: &mut [f32], src: &[u16]) -> u32 => widen_or_exponents
}

#[inline(always)]
fn widen_or_exponents(dst: &mut [f32], src: &[u16]) -> u32 {
    dst.iter_mut().zip(src).fold(0, |bad, (d, s)| {
        *d = bf16_to_f32(*s);
        bad | u32::from(s & BF16_EXPONENT == BF16_EXPONENT)
    })
}

/// Copies `src` into `dst` (same length) and returns whether every value was finite.
fn gather_checked(dst: &mut [f32], src: &[f32]) -> bool {
    dst.chunks_mut(4096)
        .zip(src.chunks(4096))
        .fold(0, |bad, (d, s)| bad | copy_block(d, s))
        == 0
}

gantry_simd::widest! {
    fn copy_block(dst: &mut [f32], src: &[f32]) -> u32 => copy_or_exponents
}

#[inline(always)]
fn copy_or_exponents(dst: &mut [f32], src: &[f32]) -> u32 {
    dst.iter_mut().zip(src).fold(0, |bad, (d, s)| {
        *d = *s;
        bad | u32::from(s.to_bits() & EXPONENT == EXPONENT)
    })
}

#[cfg(test)]
mod tests {
    use tch::nn::{self, Module};
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// A small network's parameters, and one gradient per parameter (`tensors` order).
    fn params_and_grads() -> (VarStore, FlatParams, Vec<Tensor>) {
        let vs = VarStore::new(Device::Cpu);
        let layer = nn::linear(vs.root() / "layer", 70, 90, Default::default());
        let _ = layer.forward(&Tensor::zeros([1, 70], (Kind::Float, Device::Cpu)));
        let params = FlatParams::new(&vs);
        let grads = params
            .tensors
            .iter()
            .map(|t| Tensor::randn(t.size(), (Kind::Float, Device::Cpu)))
            .collect();
        (vs, params, grads)
    }

    fn concatenated(grads: &[Tensor]) -> Tensor {
        Tensor::cat(
            &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
            0,
        )
    }

    #[test]
    fn gathering_copies_every_gradient_and_reports_non_finite_values() {
        let (_vs, params, mut grads) = params_and_grads();
        let out = Tensor::full([params.numel() as i64], 7.0, (Kind::Float, Device::Cpu));
        assert_eq!(params.flatten_grads_into(&grads, &out), Some(true));
        assert!(out.equal(&concatenated(&grads)));

        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let poisoned = grads[1].copy();
            let _ = poisoned
                .view([-1])
                .get(4000.min(poisoned.numel() as i64 - 1))
                .fill_(bad);
            let with_bad = vec![grads[0].shallow_clone(), poisoned];
            assert_eq!(
                params.flatten_grads_into(&with_bad, &out),
                Some(false),
                "{bad}"
            );
            assert!(!all_finite(&out), "{bad} was copied too");
        }

        // No gradient for a parameter: zeros in its place.
        grads[0] = Tensor::new();
        assert_eq!(params.flatten_grads_into(&grads, &out), Some(true));
        let n0 = params.tensors[0].numel() as i64;
        assert_eq!(
            out.narrow(0, 0, n0)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert!(
            out.narrow(0, n0, out.numel() as i64 - n0)
                .equal(&grads[1].reshape([-1]))
        );
    }

    #[test]
    fn a_strided_gradient_is_copied_by_libtorch_and_left_unchecked() {
        let (_vs, params, grads) = params_and_grads();
        let strided: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                let wide = Tensor::zeros([g.numel() as i64, 2], (Kind::Float, Device::Cpu));
                wide.select(1, 1).copy_(&g.reshape([-1]));
                wide.select(1, 1).view(g.size().as_slice())
            })
            .collect();
        assert!(!strided[0].is_contiguous());
        let out = Tensor::zeros([params.numel() as i64], (Kind::Float, Device::Cpu));
        assert_eq!(params.flatten_grads_into(&strided, &out), None);
        assert!(out.equal(&concatenated(&grads)));
    }
}
