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
//! The loop is compiled for the widest vector instructions the CPU has (`gantry_simd::widest!`); every
//! version agrees bit for bit. A generator EMA can ride
//! along ([`FlatOptimizer::step_with_ema`]): the average is updated from each new parameter
//! while it is still in a register, instead of in a second pass over both buffers.
//! The same pass can write a bf16 copy of the updated parameters
//! ([`FlatOptimizer::write_bf16_copy`], for [`crate::precision::Bf16Weights`]) and read a
//! gradient that is partly bf16.
//! Other devices and dtypes take the libtorch kernels.

use gantry_config::Optimizer as OptimizerKind;
use tch::Tensor;

use crate::flat::{bf16_to_f32, is_host_bf16, is_host_gradient};

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
    /// Rewritten from the parameters after every update (see
    /// [`FlatOptimizer::write_bf16_copy`]).
    pub(crate) bf16_copy: Option<Tensor>,
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
            bf16_copy: None,
        }
    }

    /// From now on every update also writes the parameters, rounded to nearest-even, into
    /// `copy` (a bf16 tensor of their layout, [`crate::precision::Bf16Weights::flat`]): on
    /// the host in the same pass, elsewhere by one copy after it.
    pub fn write_bf16_copy(&mut self, copy: &Tensor) {
        self.bf16_copy = Some(copy.shallow_clone());
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Applies one update to `params` (flat, updated in place) from `grad` (same layout).
    pub fn step(&mut self, params: &Tensor, grad: &Tensor) {
        self.step_with_ema(params, Gradient::Flat(grad), None);
    }

    /// [`FlatOptimizer::step`], then `average ← lerp(average, params, 1 − decay)` for an
    /// exponential moving average of the parameters (same layout as `params`), where `decay`
    /// is `ema_decay(t)` of the step count after this update. On the CPU the average is
    /// updated in the same pass as Adam; elsewhere, or with SGD, by one `lerp_` afterwards.
    pub fn step_with_ema(
        &mut self,
        params: &Tensor,
        grad: Gradient<'_>,
        ema: Option<(&Tensor, &dyn Fn(u64) -> f64)>,
    ) {
        tch::no_grad(|| {
            let mut params = params.shallow_clone();
            self.step += 1;
            let ema = ema.map(|(average, decay)| (average.shallow_clone(), decay(self.step)));
            let fusable_state = self.kind == OptimizerKind::Adam
                && fusable(&params, &params, &self.exp_avg, &self.exp_avg_sq)
                && ema
                    .as_ref()
                    .is_none_or(|(average, _)| fusable(&params, average, average, average))
                && self
                    .bf16_copy
                    .as_ref()
                    .is_none_or(|copy| is_host_bf16(copy) && copy.numel() == params.numel());
            // Pieces are read where they lie by the fused pass only; the libtorch kernels
            // (SGD, a device, an odd layout) take one flat tensor, gathered here.
            let gathered = match grad {
                Gradient::Pieces(pieces) if !(fusable_state && pieces_fusable(&params, pieces)) => {
                    Some(crate::flat::concatenated(pieces))
                }
                _ => None,
            };
            let grad = gathered.as_ref().map_or(grad, Gradient::Flat);
            let fused = fusable_state
                && match grad {
                    Gradient::Flat(g) => fusable(&params, g, g, g),
                    Gradient::Pieces(_) => true,
                };
            match (self.kind, grad) {
                (OptimizerKind::Sgd, Gradient::Flat(grad)) => {
                    let _ = params.g_add_(&(grad * -self.lr));
                }
                (OptimizerKind::Adam, _) if fused => {
                    let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                    let constants = AdamConstants {
                        one_minus_beta1: (1.0 - self.beta1) as f32,
                        one_minus_beta2: (1.0 - self.beta2) as f32,
                        step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
                        bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
                        eps: self.eps as f32,
                        ema_weight: ema.as_ref().map_or(0.0, |(_, decay)| (1.0 - decay) as f32),
                    };
                    let n = params.numel();
                    let mut average = ema.map_or_else(Tensor::new, |(average, _)| average);
                    let mut copy = self.bf16_copy.as_ref().map(Tensor::shallow_clone);
                    // SAFETY: `fusable` (and `pieces_fusable`) checked that all of them are
                    // contiguous CPU tensors of the same length (the pieces' lengths sum to
                    // it), f32 but for the bf16 copy and bf16 pieces; they are distinct
                    // allocations (parameters, gradients, both moments, the average and the
                    // copy), and nothing else touches them meanwhile.
                    unsafe {
                        let whole = AdamBuffers {
                            p: as_mut_slice(&mut params, n),
                            g: GradientSlice::F32(&[]),
                            m: as_mut_slice(&mut self.exp_avg, n),
                            v: as_mut_slice(&mut self.exp_avg_sq, n),
                            ema: if average.defined() {
                                as_mut_slice(&mut average, n)
                            } else {
                                &mut []
                            },
                            bf16: copy.as_mut().map_or(&mut [], |copy| as_mut_bf16(copy, n)),
                        };
                        match grad {
                            Gradient::Flat(g) => adam_fused(
                                AdamBuffers {
                                    g: gradient_slice(g),
                                    ..whole
                                },
                                &constants,
                            ),
                            Gradient::Pieces(pieces) => {
                                let mut rest = whole;
                                for g in pieces {
                                    let (segment, tail) = rest.split_at(g.numel());
                                    adam_fused(
                                        AdamBuffers {
                                            g: gradient_slice(g),
                                            ..segment
                                        },
                                        &constants,
                                    );
                                    rest = tail;
                                }
                            }
                        }
                    }
                    return;
                }
                (OptimizerKind::Adam, Gradient::Flat(grad)) => {
                    let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                    let _ = self.exp_avg.lerp_(grad, 1.0 - self.beta1);
                    let _ = self.exp_avg_sq.lerp_(&grad.square(), 1.0 - self.beta2);
                    let bias1 = 1.0 - self.beta1.powi(t);
                    let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
                    let denom = self.exp_avg_sq.sqrt() / bias2_sqrt + self.eps;
                    let _ = params.addcdiv_(&(&self.exp_avg * (-self.lr / bias1)), &denom);
                }
                (_, Gradient::Pieces(_)) => unreachable!("unfusable pieces were gathered above"),
            }
            if let Some((mut average, decay)) = ema {
                let _ = average.lerp_(&params, 1.0 - decay);
            }
            if let Some(copy) = &self.bf16_copy {
                copy.shallow_clone().copy_(&params);
            }
        });
    }
}

/// A network's gradient in its flat parameter layout (see [`crate::FlatParams`]): the flat
/// tensor, or the per-parameter tensors autograd returned, in layout order, every one defined
/// (where nothing needs them gathered, a world of one, the copy is saved).
#[derive(Debug, Clone, Copy)]
pub enum Gradient<'a> {
    Flat(&'a Tensor),
    Pieces(&'a [Tensor]),
}

/// Whether the fused pass can read `pieces` where they lie: contiguous f32 or bf16 CPU
/// tensors whose lengths sum to the parameters'.
fn pieces_fusable(params: &Tensor, pieces: &[Tensor]) -> bool {
    pieces.iter().all(|g| g.defined() && is_host_gradient(g))
        && pieces.iter().map(Tensor::numel).sum::<usize>() == params.numel()
}

/// A gradient (or a piece of one) as the fused pass reads it.
#[derive(Clone, Copy)]
enum GradientSlice<'a> {
    F32(&'a [f32]),
    /// bf16 values, by their bits.
    Bf16(&'a [u16]),
}

/// # Safety
/// `g` is a contiguous CPU tensor, f32 or bf16, that nothing writes while the slice lives.
unsafe fn gradient_slice(g: &Tensor) -> GradientSlice<'_> {
    let n = g.numel();
    // SAFETY: the caller's contract.
    unsafe {
        if g.kind() == tch::Kind::BFloat16 {
            GradientSlice::Bf16(std::slice::from_raw_parts(
                g.data_ptr().cast::<u16>().cast_const(),
                n,
            ))
        } else {
            GradientSlice::F32(as_slice(g, n))
        }
    }
}

/// Adam's per-step constants in f32, as the fused loop uses them.
struct AdamConstants {
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
    /// `1 − decay` of the EMA riding along (unused without one).
    ema_weight: f32,
}

/// The slices one fused Adam pass reads and writes, all of one length (`ema` empty when no
/// average rides along, `bf16` when no copy is written).
struct AdamBuffers<'a> {
    p: &'a mut [f32],
    g: GradientSlice<'a>,
    m: &'a mut [f32],
    v: &'a mut [f32],
    ema: &'a mut [f32],
    /// The bf16 copy of `p` (bits), written after the update.
    bf16: &'a mut [u16],
}

impl<'a> AdamBuffers<'a> {
    /// The first `len` elements of each buffer, and the rest (`g` is left empty in both: the
    /// caller gives each segment its own).
    fn split_at(self, len: usize) -> (Self, Self) {
        let (p, p_rest) = self.p.split_at_mut(len);
        let (m, m_rest) = self.m.split_at_mut(len);
        let (v, v_rest) = self.v.split_at_mut(len);
        let (ema, ema_rest) = split_optional(self.ema, len);
        let (bf16, bf16_rest) = split_optional(self.bf16, len);
        let head = AdamBuffers {
            p,
            g: GradientSlice::F32(&[]),
            m,
            v,
            ema,
            bf16,
        };
        let tail = AdamBuffers {
            p: p_rest,
            g: GradientSlice::F32(&[]),
            m: m_rest,
            v: v_rest,
            ema: ema_rest,
            bf16: bf16_rest,
        };
        (head, tail)
    }
}

gantry_simd::widest! {
    /// One Adam update, element by element: `m ← lerp(m, g, 1−β1)`, `v ← lerp(v, g², 1−β2)`,
    /// `p ← p − step_size · m / (√v / √(1−β2ᵗ) + ε)`, then (with an average) `ema ← lerp(ema,
    /// p, ema_weight)` and (with a copy) `bf16 ← round(p)`.
    fn adam_fused(b: AdamBuffers<'_>, c: &AdamConstants) => adam_loop
}

/// The loop itself, inlined into each instruction-set version: one loop per kind of gradient
/// and set of outputs, so that no test is left inside it.
#[inline(always)]
fn adam_loop(b: AdamBuffers<'_>, c: &AdamConstants) {
    match b.g {
        GradientSlice::F32(g) => adam_elements(b, g, |g| g, c),
        GradientSlice::Bf16(g) => adam_elements(b, g, bf16_to_f32, c),
    }
}

#[inline(always)]
fn adam_elements<G: Copy>(
    b: AdamBuffers<'_>,
    g: &[G],
    widen: impl Fn(G) -> f32,
    c: &AdamConstants,
) {
    let AdamBuffers {
        p, m, v, ema, bf16, ..
    } = b;
    // Each `lerp` picks its formula by a weight fixed for the whole pass, so that branch is
    // hoisted out of the loop too.
    let update = |p: &mut f32, g: G, m: &mut f32, v: &mut f32| {
        let g = widen(g);
        *m = lerp(*m, g, c.one_minus_beta1);
        *v = lerp(*v, g * g, c.one_minus_beta2);
        let denom = v.sqrt() / c.bias2_sqrt + c.eps;
        *p -= c.step_size * *m / denom;
    };
    let elements = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
    match (ema.is_empty(), bf16.is_empty()) {
        (true, true) => {
            for (((p, g), m), v) in elements {
                update(p, *g, m, v);
            }
        }
        (false, true) => {
            for ((((p, g), m), v), e) in elements.zip(ema.iter_mut()) {
                update(p, *g, m, v);
                *e = lerp(*e, *p, c.ema_weight);
            }
        }
        (true, false) => {
            for ((((p, g), m), v), low) in elements.zip(bf16.iter_mut()) {
                update(p, *g, m, v);
                *low = f32_to_bf16(*p);
            }
        }
        (false, false) => {
            for (((((p, g), m), v), e), low) in elements.zip(ema.iter_mut()).zip(bf16.iter_mut()) {
                update(p, *g, m, v);
                *e = lerp(*e, *p, c.ema_weight);
                *low = f32_to_bf16(*p);
            }
        }
    }
}

/// `x` rounded to the nearest bf16, ties to even, as libtorch's conversion (`c10::BFloat16`)
/// rounds, a NaN becoming the canonical quiet NaN; branch-free, so it vectorises.
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { 0x7fc0 } else { rounded }
}

/// `buffer`'s first `len` elements and the rest; an empty buffer (an output not written)
/// splits into two empty ones.
fn split_optional<T>(buffer: &mut [T], len: usize) -> (&mut [T], &mut [T]) {
    if buffer.is_empty() {
        (&mut [], &mut [])
    } else {
        buffer.split_at_mut(len)
    }
}

/// `torch.lerp`'s formula: the form that is exact at the nearer end point.
#[inline(always)]
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
/// As [`as_mut_slice`], of a bf16 tensor (its values' bits).
unsafe fn as_mut_bf16(t: &mut Tensor, n: usize) -> &mut [u16] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u16>(), n) }
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

    /// Inputs for one fused pass: parameters, a gradient with both signs and zeros, moments
    /// already off zero, and an average.
    fn pass_inputs(n: usize) -> [Vec<f32>; 5] {
        let wave = |k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
        let v = wave(0.37).iter().map(|x| x * x).collect();
        [wave(0.11), wave(0.73), wave(0.29), v, wave(0.53)]
    }

    #[test]
    fn every_instruction_set_version_computes_the_same_bits() {
        // 1,000 elements: whole vectors of every width and a remainder; every kind of
        // gradient and set of outputs.
        for (ema_weight, bf16_gradient, bf16_copy) in [
            (0.0, false, false),
            (0.001, false, false),
            (0.82, false, true),
            (0.0, true, true),
            (0.001, true, false),
        ] {
            let constants = AdamConstants {
                one_minus_beta1: 0.5,
                one_minus_beta2: 0.001,
                step_size: 1e-3 / (1.0 - 0.5f32.powi(3)),
                bias2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
                eps: 1e-8,
                ema_weight,
            };
            let what = format!("EMA {ema_weight}, bf16 gradient {bf16_gradient}, copy {bf16_copy}");
            let run = |dispatched: bool| {
                let [mut p, g, mut m, mut v, mut e] = pass_inputs(1000);
                let g_bf16: Vec<u16> = g.iter().map(|x| f32_to_bf16(*x)).collect();
                let mut copy = vec![0u16; if bf16_copy { 1000 } else { 0 }];
                let buffers = AdamBuffers {
                    p: &mut p,
                    g: if bf16_gradient {
                        GradientSlice::Bf16(&g_bf16)
                    } else {
                        GradientSlice::F32(&g)
                    },
                    m: &mut m,
                    v: &mut v,
                    ema: if ema_weight > 0.0 { &mut e } else { &mut [] },
                    bf16: &mut copy,
                };
                if dispatched {
                    adam_fused(buffers, &constants);
                } else {
                    adam_loop(buffers, &constants);
                }
                let copy: Vec<f32> = copy.into_iter().map(bf16_to_f32).collect();
                [p, m, v, e, copy]
            };
            let (wide, baseline) = (run(true), run(false));
            for (a, b) in wide.iter().zip(&baseline) {
                let bits = |x: &Vec<f32>| x.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(a), bits(b), "{what}");
            }
            let [_, g, ..] = pass_inputs(1000);
            assert!(wide[0] != pass_inputs(1000)[0] && g.iter().any(|x| *x != 0.0));
            if bf16_copy {
                // The copy is the updated parameters, rounded.
                let rounded: Vec<f32> = wide[0]
                    .iter()
                    .map(|p| bf16_to_f32(f32_to_bf16(*p)))
                    .collect();
                assert_eq!(wide[4], rounded, "{what}");
            }
        }
    }

    #[test]
    fn parameters_round_to_bf16_as_libtorch_rounds_them() {
        // Random values over many binades, and exact ties (the bit below bf16's last one set,
        // nothing after it) that round to even both ways.
        let mut values: Vec<f32> = Tensor::randn([4096], (Kind::Float, Device::Cpu))
            .exp()
            .try_into()
            .unwrap();
        values.extend((0..64u32).map(|i| f32::from_bits(0x3f80_8000 + (i << 16))));
        values.extend([
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            -3.0e38,
        ]);
        let negated: Vec<f32> = values.iter().map(|x| -x).collect();
        values.extend(negated);
        let ours: Vec<u16> = values.iter().map(|x| f32_to_bf16(*x)).collect();
        let theirs = Tensor::from_slice(&values).to_kind(Kind::BFloat16);
        let theirs: Vec<f32> = theirs.to_kind(Kind::Float).try_into().unwrap();
        let theirs: Vec<u16> = theirs.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        assert_eq!(ours, theirs);
        assert_eq!(f32_to_bf16(f32::NAN) & 0x7fc0, 0x7fc0, "a NaN stays a NaN");
    }

    #[test]
    fn a_bf16_copy_follows_every_update_on_both_paths() {
        let n = 4099i64;
        let start = Tensor::randn([n], (Kind::Float, Device::Cpu));
        // Fused (contiguous, bf16 gradient pieces) and libtorch (strided view) paths.
        let wide = Tensor::zeros([n, 2], (Kind::Float, Device::Cpu));
        wide.select(1, 0).copy_(&start);
        for params in [start.copy(), wide.select(1, 0)] {
            let reference = params.copy();
            let copy = params.to_kind(Kind::BFloat16);
            let mut opt = FlatOptimizer::new(OptimizerKind::Adam, 1e-2, [0.5, 0.999], &params);
            opt.write_bf16_copy(&copy);
            let mut reference_opt =
                FlatOptimizer::new(OptimizerKind::Adam, 1e-2, [0.5, 0.999], &reference);
            for _ in 0..3 {
                let grad = Tensor::randn([n], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
                let pieces = [grad.narrow(0, 0, 1000), grad.narrow(0, 1000, n - 1000)];
                opt.step_with_ema(&params, Gradient::Pieces(&pieces), None);
                reference_opt.step(&reference, &grad.to_kind(Kind::Float));
            }
            assert!(!params.equal(&start), "the parameters moved");
            let diff = (&params - &reference).abs().max().double_value(&[]);
            assert!(
                diff < 1e-6,
                "bf16 pieces and their widened flat gradient differ by {diff}"
            );
            assert!(
                copy.equal(&params.to_kind(Kind::BFloat16)),
                "the copy is current"
            );
        }
    }

    #[test]
    fn an_ema_riding_along_equals_a_lerp_after_the_step() {
        let n = 4099i64;
        let start = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let decay = |t: u64| 1.0 - 1.0 / (t as f64 + 2.0);
        // Fused (contiguous) and libtorch (strided view) paths, each against step + lerp_.
        let wide = Tensor::zeros([n, 2], (Kind::Float, Device::Cpu));
        wide.select(1, 0).copy_(&start);
        let layouts = [start.copy(), wide.select(1, 0)];
        for params in layouts {
            let reference = params.copy();
            let (average, reference_average) = (start.copy() * 0.5, start.copy() * 0.5);
            let mut opt = FlatOptimizer::new(OptimizerKind::Adam, 1e-2, [0.5, 0.999], &params);
            let mut reference_opt =
                FlatOptimizer::new(OptimizerKind::Adam, 1e-2, [0.5, 0.999], &reference);
            for step in 1..=4u64 {
                let grad = Tensor::randn([n], (Kind::Float, Device::Cpu));
                opt.step_with_ema(&params, Gradient::Flat(&grad), Some((&average, &decay)));
                reference_opt.step(&reference, &grad);
                let _ = reference_average
                    .shallow_clone()
                    .lerp_(&reference, 1.0 - decay(step));
            }
            let diff = (&average - &reference_average)
                .abs()
                .max()
                .double_value(&[]);
            let moved = (&average - start.copy() * 0.5)
                .abs()
                .max()
                .double_value(&[]);
            assert!(moved > 1e-3, "the average moved ({moved})");
            assert!(diff < 1e-6, "average {diff} away from step + lerp_");
        }
    }

    #[test]
    fn gradient_pieces_step_exactly_as_their_flat_concatenation() {
        // Three pieces (one shaped like a weight) of a 4099-element network; every path: Adam
        // fused, Adam with an EMA riding along, and SGD (which gathers the pieces).
        let shapes: [&[i64]; 3] = [&[33, 61], &[2000], &[86]];
        let decay = |t: u64| 1.0 - 1.0 / (t as f64 + 2.0);
        for (kind, with_ema) in [
            (OptimizerKind::Adam, false),
            (OptimizerKind::Adam, true),
            (OptimizerKind::Sgd, false),
        ] {
            let start = Tensor::randn([4099], (Kind::Float, Device::Cpu));
            let (by_pieces, by_flat) = (start.copy(), start.copy());
            let (average_pieces, average_flat) = (start.copy(), start.copy());
            let mut pieces_opt = FlatOptimizer::new(kind, 1e-2, [0.5, 0.999], &by_pieces);
            let mut flat_opt = FlatOptimizer::new(kind, 1e-2, [0.5, 0.999], &by_flat);
            for _ in 0..3 {
                let pieces: Vec<Tensor> = shapes
                    .iter()
                    .map(|shape| Tensor::randn(*shape, (Kind::Float, Device::Cpu)))
                    .collect();
                let flat = Tensor::cat(
                    &pieces.iter().map(|p| p.reshape([-1])).collect::<Vec<_>>(),
                    0,
                );
                let (ema_pieces, ema_flat) = if with_ema {
                    (
                        Some((&average_pieces, &decay as &dyn Fn(u64) -> f64)),
                        Some((&average_flat, &decay as &dyn Fn(u64) -> f64)),
                    )
                } else {
                    (None, None)
                };
                pieces_opt.step_with_ema(&by_pieces, Gradient::Pieces(&pieces), ema_pieces);
                flat_opt.step_with_ema(&by_flat, Gradient::Flat(&flat), ema_flat);
            }
            assert!(!by_pieces.equal(&start), "{kind:?} moved the parameters");
            assert!(
                by_pieces.equal(&by_flat),
                "{kind:?}: pieces and flat differ"
            );
            assert!(
                average_pieces.equal(&average_flat),
                "{kind:?}: the averages differ"
            );
            assert_eq!(
                !average_pieces.equal(&start),
                with_ema,
                "{kind:?}: the average moved"
            );
        }
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
