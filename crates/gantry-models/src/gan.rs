//! A generator and a discriminator with their optimisers, the generator's EMA, and one
//! training step.

use std::collections::HashMap;
use std::path::Path;

use gantry_config::{Family, Loss, ModelKind, Optimizer, Schedule, Settings};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::conditional::{self, Critic};
use crate::flat::all_finite;
use crate::matmul::Matmul;
use crate::optim::{FlatOptimizer, Gradient};
use crate::phases::{Phase, PhaseClock};
use crate::precision::{Autocast, Bf16Weights, LentWeights};
use crate::task::{
    Batch, BatchSource, ExternalError, GradReduce, ModelShape, Part, StepOutcome, TrainTask,
    cycled_labels,
};
use crate::{FlatParams, ModelError, dcgan, latent, loss, mlp};

/// File names of a saved [`Gan`] (see [`Gan::save`]).
pub const GENERATOR_FILE: &str = "generator.safetensors";
pub const DISCRIMINATOR_FILE: &str = "discriminator.safetensors";
/// The EMA generator under the generator `VarStore`'s variable names: load it with
/// `gan.generator_vs.load(dir.join(GENERATOR_EMA_FILE))` to sample from the EMA weights.
pub const GENERATOR_EMA_FILE: &str = "generator_ema.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Which of the two networks a gradient belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Generator,
    Discriminator,
}

/// Scalars of one step, still on the device: reading them forces a device sync, so callers
/// read them only when they log.
#[derive(Debug)]
pub struct StepStats {
    pub d_loss: Tensor,
    pub g_loss: Tensor,
    /// Mean of D(x) = sigmoid(logit) over the real batch.
    pub d_real: Tensor,
    /// Mean of D(G(z)) over the fake batch.
    pub d_fake: Tensor,
    /// False when a loss or an averaged gradient was non-finite and the step's remaining
    /// updates were skipped (see [`Gan::train_step`]).
    pub applied: bool,
}

/// Host copies of [`StepStats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostStats {
    pub d_loss: f64,
    pub g_loss: f64,
    pub d_real: f64,
    pub d_fake: f64,
}

impl StepStats {
    pub fn to_host(&self) -> HostStats {
        HostStats {
            d_loss: self.d_loss.double_value(&[]),
            g_loss: self.g_loss.double_value(&[]),
            d_real: self.d_real.double_value(&[]),
            d_fake: self.d_fake.double_value(&[]),
        }
    }
}

/// One (sub-)step's inputs, this rank's rows of the global batch.
#[derive(Debug)]
pub struct StepInput {
    /// Real images, NCHW in [-1, 1].
    pub real: Tensor,
    /// Latents, `rows × latent_dim`.
    pub z: Tensor,
    /// Per-image interpolation coefficients in [0, 1) for the WGAN-GP penalty (`wgan-gp`
    /// only; see [`crate::latent::interpolation`]).
    pub alpha: Option<Tensor>,
    /// The real images' labels (int64) for a conditional GAN; its fake images are generated
    /// for the same labels, so D sees the data's class mix on both sides.
    pub labels: Option<Tensor>,
}

/// An exponential moving average of the generator: a second generator module of the same
/// architecture (so its `VarStore` has the generator's variable names) whose flat parameters
/// follow the live ones.
#[derive(Debug)]
pub struct Ema {
    pub decay: f64,
    pub vs: VarStore,
    module: conditional::Generator,
    pub params: FlatParams,
    /// BatchNorm running statistics, copied (not averaged) from the live generator.
    buffers: Vec<Tensor>,
}

/// The EMA decay used after the generator's `t`-th update: `min(decay, (1 + t) / (10 + t))`.
/// Early on the average follows the generator closely; with a fixed 0.999 a 2,000-step run
/// would still carry 13% of the untrained initial weights (0.999^2000). A function of the
/// step count alone, so resumed runs replay it exactly.
pub fn ema_decay_at(decay: f64, t: u64) -> f64 {
    let t = t as f64;
    decay.min((1.0 + t) / (10.0 + t))
}

/// `ema ← decay · ema + (1 − decay) · live`, in place, as one kernel over the flat tensor.
pub fn ema_update(ema: &Tensor, live: &Tensor, decay: f64) {
    tch::no_grad(|| {
        let _ = ema.shallow_clone().lerp_(live, 1.0 - decay);
    });
}

/// The GAN being trained: both networks, their flat parameters, their optimisers and the
/// generator's EMA.
#[derive(Debug)]
pub struct Gan {
    pub device: Device,
    pub generator_vs: VarStore,
    pub discriminator_vs: VarStore,
    generator: conditional::Generator,
    discriminator: conditional::Discriminator,
    /// `Some(k)` for a conditional GAN over labels `0..k`.
    shape: ModelShape,
    pub g_params: FlatParams,
    pub d_params: FlatParams,
    pub g_opt: FlatOptimizer,
    pub d_opt: FlatOptimizer,
    /// `None` when `train.ema_decay = 0`.
    pub ema: Option<Ema>,
    /// The generator's non-trainable tensors (BatchNorm running statistics), sorted by name.
    g_buffers: Vec<Tensor>,
    loss: Loss,
    schedule: Schedule,
    gp_weight: f64,
    latent_dim: usize,
    image_shape: [i64; 3],
    /// bf16 forward passes in training steps (`train.precision`); sampling and evaluation
    /// stay fp32.
    autocast: Autocast,
    /// D's and G's bf16 copies, which their optimisers keep current, for bf16 training of
    /// the MLP on the host (`None` in fp32, for DCGAN and on a GPU, where autocast casts the
    /// weights each step).
    bf16_copies: Option<[Bf16Weights; 2]>,
    /// Both networks' flat gradients, D's then G's (see [`Gan::gradients`]).
    gradients: Tensor,
    /// D's and G's latest gradients where they were left in pieces, not gathered into
    /// `gradients` (see [`StepSync::gathers`]); empty otherwise.
    latest_pieces: [Vec<Tensor>; 2],
    /// Times the phases of a step; the caller starts it and takes the result.
    pub clock: PhaseClock,
    kind: ModelKind,
    /// Keys the latent and interpolation streams.
    seed: u64,
    n_critic: u32,
    /// Host staging of a batch's latents and interpolation coefficients.
    host_latents: Vec<f32>,
    host_alphas: Vec<f32>,
}

fn build_generator(
    settings: &Settings,
    path: &tch::nn::Path<'_>,
    shape: ModelShape,
    matmul: Matmul,
) -> Result<conditional::Generator, ModelError> {
    let latent =
        i64::try_from(settings.model.latent_dim).map_err(|e| ModelError::Invalid(e.to_string()))?;
    // A conditional generator's first layer also reads the label embedding.
    let inputs = latent + shape.classes.map_or(0, |_| conditional::EMBEDDING_DIM);
    let bn = settings.model.batch_norm;
    let image_shape = shape.image;
    let net: Box<dyn tch::nn::ModuleT> = match settings.model.kind {
        ModelKind::Mlp => Box::new(mlp::Generator::new(path, inputs, image_shape, bn, matmul)),
        ModelKind::Dcgan => Box::new(dcgan::Generator::new(path, inputs, image_shape, bn)?),
    };
    Ok(conditional::Generator::new(path, net, shape.classes))
}

/// A network's non-trainable tensors (BatchNorm running statistics), sorted by name, so every
/// rank and every copy of the network lists them in the same order.
pub fn buffers(vs: &VarStore) -> Vec<Tensor> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

/// Where a network's gradient goes after its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gather {
    /// Into the flat gradient ([`Gan::gradients`]), for a reducer of flat tensors.
    Flat,
    /// Left in autograd's tensors and checked there, for the optimiser to read (nothing to
    /// combine it with: [`StepSync::gathers`] is false).
    ForOptimiser,
    /// Left in autograd's tensors, unchecked, for a reducer that takes them
    /// ([`StepSync::takes_pieces`]) and checks the combined gradient.
    ForReducer,
}

impl Gather {
    fn of<E>(sync: &impl StepSync<E>) -> Self {
        match (sync.gathers(), sync.takes_pieces()) {
            (false, _) => Gather::ForOptimiser,
            (true, true) => Gather::ForReducer,
            (true, false) => Gather::Flat,
        }
    }
}

/// A network's gradient of one step, and whether it was found finite when gathered (`None`:
/// not checked, see [`FlatParams::flatten_grads_into`]).
struct FlatGradient {
    /// The flat gradient (a view of [`Gan::gradients`]): gathered there, unless `pieces` holds
    /// the gradient instead.
    grad: Tensor,
    /// autograd's per-parameter gradients where they were left ungathered (see [`Gather`]);
    /// empty when gathered into `grad`, or once a reducer has written their average there.
    pieces: Vec<Tensor>,
    /// The pieces are for the reducer ([`Gather::ForReducer`]), not (yet) the optimiser's.
    for_reducer: bool,
    finite: Option<bool>,
    /// The reducer's answer for the combined gradient, where it gave one.
    combined_finite: Option<bool>,
    /// The reducer deferred this gradient into the next network's call
    /// ([`StepSync::sync_pieces`] returned `None`); that call's answer covers it.
    deferred: bool,
}

impl FlatGradient {
    /// The gradient as the optimiser reads it.
    fn gradient(&self) -> Gradient<'_> {
        if self.pieces.is_empty() {
            Gradient::Flat(&self.grad)
        } else {
            Gradient::Pieces(&self.pieces)
        }
    }

    /// Hands the gradient to `sync` for `network` (see [`Gan::train_step`]): a gathered one
    /// by [`StepSync::sync`], one in pieces for the reducer by [`StepSync::sync_pieces`]
    /// (its average then lies in `grad`). One left in pieces for the optimiser is, by
    /// [`StepSync::gathers`], nobody else's: not combined with anything.
    fn sync<E>(&mut self, network: Network, sync: &mut impl StepSync<E>) -> Result<bool, E> {
        if self.pieces.is_empty() {
            return sync.sync(network, &mut self.grad);
        }
        if !self.for_reducer {
            return Ok(false);
        }
        let answer = sync.sync_pieces(network, &self.pieces, &mut self.grad)?;
        self.pieces = Vec::new();
        self.for_reducer = false;
        self.combined_finite = answer;
        self.deferred = answer.is_none();
        Ok(true)
    }

    /// Takes `later`'s answer where this gradient's average was deferred into its call.
    fn adopt_answer_of(&mut self, later: &FlatGradient) {
        if self.deferred && self.combined_finite.is_none() {
            self.combined_finite = later.combined_finite;
        }
    }

    /// Whether the update may be applied: every element finite. `averaged` says whether the
    /// gradient was combined with other ranks' (or weighted) since it was gathered; if not,
    /// the check made while gathering still holds and the gradient is not read again; if the
    /// reducer checked the combined gradient, its answer holds.
    fn is_finite(&self, averaged: bool) -> bool {
        if let Some(finite) = self.combined_finite {
            return finite;
        }
        match self.finite {
            Some(finite) if !averaged => finite,
            _ => all_finite(&self.grad),
        }
    }
}

/// The gradient of `loss` with respect to `params`, from autograd's per-parameter `grads`:
/// written into `out` (a view of [`Gan::gradients`]), with a non-finite loss folded in (see
/// [`poison_with`]), or left in the tensors autograd returned as `gather` says (host f32 or
/// bf16; otherwise gathered after all), a non-finite loss marking it non-finite: checked for
/// the optimiser, filled with NaN for a reducer, which then finds the combined gradient
/// non-finite on every rank.
fn flat_gradient(
    loss: &Tensor,
    params: &FlatParams,
    grads: Vec<Tensor>,
    out: Tensor,
    gather: Gather,
) -> FlatGradient {
    let pieces = |pieces: Vec<Tensor>, for_reducer: bool, finite: Option<bool>| FlatGradient {
        grad: out.shallow_clone(),
        pieces,
        for_reducer,
        finite,
        combined_finite: None,
        deferred: false,
    };
    let grads = match gather {
        Gather::Flat => grads,
        Gather::ForOptimiser => match params.checked_pieces(grads) {
            Ok((kept, finite)) => {
                let loss_finite = loss.double_value(&[]).is_finite();
                return pieces(kept, false, Some(finite && loss_finite));
            }
            Err(grads) => grads,
        },
        Gather::ForReducer => match params.pieces(grads) {
            Ok(kept) => {
                if !loss.double_value(&[]).is_finite() {
                    tch::no_grad(|| {
                        for piece in &kept {
                            let _ = piece.shallow_clone().fill_(f64::NAN);
                        }
                    });
                }
                return pieces(kept, true, None);
            }
            Err(grads) => grads,
        },
    };
    let mut grad = out.shallow_clone();
    let gathered = tch::no_grad(|| params.flatten_grads_into(&grads, &grad));
    let loss_finite = poison_with(&mut grad, loss);
    FlatGradient {
        grad,
        pieces: Vec::new(),
        for_reducer: false,
        finite: gathered.zip(loss_finite).map(|(a, b)| a && b),
        combined_finite: None,
        deferred: false,
    }
}

/// One network's data-parallel update from `loss`, for the families with a single part: its
/// flat gradient written into `gradient` (a non-finite loss folded in), averaged across the
/// ranks, and applied only if every averaged element is finite (the same decision on every
/// rank). A reducer that takes pieces ([`GradReduce::takes_pieces`]) gets autograd's host
/// gradients as they are and writes their average into `gradient` itself. Marks the
/// forward/backward, all-reduce and optimiser phases; returns whether the update was applied.
pub(crate) fn averaged_update(
    loss: &Tensor,
    params: &FlatParams,
    optimizer: &mut FlatOptimizer,
    gradient: &Tensor,
    clock: &mut PhaseClock,
    reduce: &mut dyn GradReduce,
) -> Result<bool, ModelError> {
    let grads = Tensor::run_backward(&[loss], &params.tensors, false, false);
    let gather = match reduce.takes_pieces() {
        true => Gather::ForReducer,
        false => Gather::Flat,
    };
    let mut flat = flat_gradient(loss, params, grads, gradient.shallow_clone(), gather);
    clock.lap(Phase::ForwardBackward);
    let averaged = !reduce.is_identity();
    if flat.for_reducer {
        flat.combined_finite = Some(reduce.average_pieces(&flat.pieces, &mut flat.grad)?);
        flat.pieces = Vec::new();
    } else {
        reduce.average(&mut flat.grad)?;
    }
    clock.lap(Phase::AllReduce);
    let applied = flat.is_finite(averaged);
    if applied {
        optimizer.step(&params.flat, &flat.grad);
    }
    clock.lap(Phase::Optimizer);
    Ok(applied)
}

/// Adds `0 · loss` to every gradient element: zero when the (local) loss is finite, NaN when
/// not. A rank whose loss overflowed then poisons the *averaged* gradient on every rank, so
/// the skip decision, taken on the averaged gradient, is the same everywhere.
/// Returns whether the loss was finite where that was read for free (`None` on a device).
fn poison_with(grad: &mut Tensor, loss: &Tensor) -> Option<bool> {
    tch::no_grad(|| {
        if grad.device() == Device::Cpu {
            // Reading a CPU scalar is free; a full pass over the gradient is not.
            let finite = loss.double_value(&[]).is_finite();
            if !finite {
                let _ = grad.fill_(f64::NAN);
            }
            Some(finite)
        } else {
            // On a GPU, reading the loss would wait for the device: stay on the stream.
            let _ = grad.g_add_(&(loss.detach().to_kind(Kind::Float) * 0.0));
            None
        }
    })
}

impl Gan {
    /// Builds both networks (and the EMA generator) with weights drawn from `train.seed`.
    pub fn new(
        settings: &Settings,
        shape: impl Into<ModelShape>,
        device: Device,
    ) -> Result<Self, ModelError> {
        let shape = shape.into();
        shape.check(settings.model.conditional)?;
        let image_shape = shape.image;
        let latent_dim = settings.model.latent_dim;
        // Initial weights come from libtorch's global generator: hold it for the whole
        // initialisation, so trainers built concurrently in one process (tests, several
        // ranks as threads) each get exactly the seed's weights.
        let _init = crate::INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(settings.train.seed as i64);
        let generator_vs = VarStore::new(device);
        let discriminator_vs = VarStore::new(device);
        // One choice for the whole model, so its generator, EMA copy and critic multiply alike.
        let matmul = Matmul::resolve(settings.train.cpu_matmul);
        let generator = build_generator(settings, &generator_vs.root(), shape, matmul)?;
        let critic: Box<dyn Critic> = match settings.model.kind {
            ModelKind::Mlp => Box::new(mlp::Discriminator::new(
                &discriminator_vs.root(),
                image_shape,
                matmul,
            )),
            ModelKind::Dcgan => Box::new(dcgan::Discriminator::new(
                &discriminator_vs.root(),
                image_shape,
            )?),
        };
        let discriminator =
            conditional::Discriminator::new(&discriminator_vs.root(), critic, shape.classes);
        let g_params = FlatParams::new(&generator_vs);
        let d_params = FlatParams::new(&discriminator_vs);
        let g_buffers = buffers(&generator_vs);
        let t = &settings.train;
        // Built after G and D so their initial weights do not depend on whether EMA is on;
        // its own random init is overwritten with G's values at once.
        let ema = if t.ema_decay > 0.0 {
            let vs = VarStore::new(device);
            let module = build_generator(settings, &vs.root(), shape, matmul)?;
            let params = FlatParams::new(&vs);
            let ema_buffers = buffers(&vs);
            tch::no_grad(|| {
                params.flat.shallow_clone().copy_(&g_params.flat);
                for (dst, src) in ema_buffers.iter().zip(&g_buffers) {
                    dst.shallow_clone().copy_(src);
                }
            });
            Some(Ema {
                decay: t.ema_decay,
                vs,
                module,
                params,
                buffers: ema_buffers,
            })
        } else {
            None
        };
        let mut g_opt = FlatOptimizer::new(t.optimizer, t.lr_g, t.betas, &g_params.flat);
        let gradients = Tensor::zeros(
            [(d_params.numel() + g_params.numel()) as i64],
            (Kind::Float, device),
        );
        let mut d_opt = FlatOptimizer::new(t.optimizer, t.lr_d, t.betas, &d_params.flat);
        let autocast = Autocast::new(t.precision, device);
        // The MLP's products are all `Dense` layers, which take the copies; DCGAN's
        // convolutions are cast by autocast.
        let keeps_copies =
            autocast.is_enabled() && device == Device::Cpu && settings.model.kind == ModelKind::Mlp;
        let bf16_copies = keeps_copies.then(|| {
            let copies = [Bf16Weights::new(&d_params), Bf16Weights::new(&g_params)];
            d_opt.write_bf16_copy(copies[0].flat());
            g_opt.write_bf16_copy(copies[1].flat());
            copies
        });
        Ok(Self {
            device,
            generator_vs,
            discriminator_vs,
            generator,
            discriminator,
            shape,
            g_params,
            d_params,
            g_opt,
            d_opt,
            ema,
            g_buffers,
            loss: t.loss,
            schedule: t.schedule,
            gp_weight: t.gp_weight,
            latent_dim,
            image_shape,
            autocast,
            bf16_copies,
            gradients,
            latest_pieces: [Vec::new(), Vec::new()],
            clock: PhaseClock::new(device),
            kind: settings.model.kind,
            seed: t.seed,
            n_critic: t.n_critic,
            host_latents: Vec::new(),
            host_alphas: Vec::new(),
        })
    }

    /// Both networks' flat gradients of the current step in one tensor: D's first, then G's.
    /// The tensors `train_step`'s `sync` receives are views of it, so in `simultaneous` (where
    /// neither is read before G's `sync` returns) a caller may average both in one operation:
    /// keep D's, and at G's call average this tensor instead. Overwritten by every step whose
    /// `sync` gathers (see [`StepSync::gathers`]).
    pub fn gradients(&self) -> &Tensor {
        &self.gradients
    }

    fn d_gradient(&self) -> Tensor {
        self.gradients.narrow(0, 0, self.d_params.numel() as i64)
    }

    fn g_gradient(&self) -> Tensor {
        let d = self.d_params.numel() as i64;
        self.gradients.narrow(0, d, self.g_params.numel() as i64)
    }

    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    pub fn image_shape(&self) -> [i64; 3] {
        self.image_shape
    }

    /// Turns host latents (`rows × latent_dim`, row-major) into a tensor on the device.
    pub fn latents(&self, host: &[f32]) -> Tensor {
        let rows = (host.len() / self.latent_dim.max(1)) as i64;
        Tensor::from_slice(host)
            .view([rows, self.latent_dim as i64])
            .to_device(self.device)
    }

    /// Turns host pixels (NCHW in [-1, 1]) into a batch tensor on the device.
    pub fn images(&self, host: &[f32]) -> Tensor {
        let [c, h, w] = self.image_shape;
        Tensor::from_slice(host)
            .view([-1, c, h, w])
            .to_device(self.device)
    }

    /// Turns host interpolation coefficients into a tensor on the device.
    pub fn coefficients(&self, host: &[f32]) -> Tensor {
        Tensor::from_slice(host).to_device(self.device)
    }

    /// This rank's step input for `batch`: its images, and the latents (and WGAN-GP
    /// coefficients) of its rows of the batch's global stream.
    pub fn step_input(&mut self, batch: Batch) -> Result<StepInput, ModelError> {
        let rows = usize::try_from(batch.images.size()[0]).unwrap_or(0);
        crate::vae::check_batch_labels(self.shape.classes, batch.labels.as_ref(), rows)?;
        latent::fill(
            self.seed,
            batch.stream,
            self.latent_dim,
            batch.first_row,
            rows,
            &mut self.host_latents,
        );
        let alpha = (self.loss == Loss::WganGp).then(|| {
            latent::interpolation(
                self.seed,
                batch.stream,
                batch.first_row,
                rows,
                &mut self.host_alphas,
            );
            self.coefficients(&self.host_alphas)
        });
        Ok(StepInput {
            real: batch.images,
            z: self.latents(&self.host_latents),
            alpha,
            labels: batch.labels,
        })
    }

    /// Images from the EMA generator (the live one when EMA is off), in inference mode;
    /// `labels` (int64, one per row of `z`) for a conditional GAN, `None` otherwise.
    ///
    /// # Panics
    /// If `labels` is given to an unconditional GAN or missing for a conditional one.
    pub fn generate(&self, z: &Tensor, labels: Option<&Tensor>) -> Tensor {
        match &self.ema {
            Some(ema) => tch::no_grad(|| ema.module.forward_t(z, labels, false)),
            None => self.generate_live(z, labels),
        }
    }

    /// Images from the live (trained) generator in inference mode.
    pub fn generate_live(&self, z: &Tensor, labels: Option<&Tensor>) -> Tensor {
        tch::no_grad(|| self.generator.forward_t(z, labels, false))
    }

    /// [`Gan::generate`]'s images as 8-bit grey/RGB values, NCHW.
    pub fn generate_u8(&self, z: &Tensor, labels: Option<&Tensor>) -> Vec<u8> {
        let images = self.generate(z, labels);
        let bytes = ((images + 1.0) * 127.5)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8);
        Vec::<u8>::try_from(bytes.to_device(Device::Cpu).reshape([-1])).unwrap_or_default()
    }

    /// One full step (D and G updates) on this rank's slice of the global batch.
    ///
    /// `sync` is called with each network's flat gradient before that network's optimiser
    /// step; a data-parallel worker all-reduces (averages) it across ranks there, a single
    /// process leaves it as it is, or says with [`StepSync::gathers`] that it would, and the
    /// gradient is then neither gathered nor handed to it. In `simultaneous`, D's call comes right after D's
    /// backward pass and G's after G's, and neither gradient is read until G's call has
    /// returned: an implementation may return from D's call early and finish averaging D's
    /// gradient (overlapped with G's backward pass) before it returns from G's.
    ///
    /// `sync` returns whether it combined the gradient with other ranks' (or weighted it):
    /// `false` promises the gradient is exactly as it was passed in.
    ///
    /// Non-finite values: a gradient is checked *after* `sync` (a rank's non-finite local loss
    /// is folded into its gradient first), so every rank takes the same decision; where `sync`
    /// returned `false`, the check made while gathering the gradient stands for it. At the first
    /// non-finite gradient the step stops: that update and the later ones of the step are
    /// skipped (in `simultaneous` both gradients are checked before either is applied), the
    /// generator's BatchNorm statistics are put back, and `applied` is false. Every rank calls
    /// `sync` the same number of times whatever happens.
    ///
    /// # Panics
    /// With `loss = "wgan-gp"` and no `input.alpha`.
    pub fn train_step<E>(
        &mut self,
        input: &StepInput,
        sync: &mut impl StepSync<E>,
    ) -> Result<StepStats, E> {
        let gather = Gather::of(sync);
        let saved = self.snapshot_buffers();
        let labels = input.labels.as_ref();
        let _lent = self.lend_bf16_copies();
        // In `simultaneous` no weight changes before the last forward pass, so G's and both
        // of D's passes share one autocast region: each weight is cast to bf16 once a step
        // (not once per pass), and D's real and fake weight gradients meet in bf16 before
        // one conversion back. `alternating` updates D between its passes: a region each.
        let forward_region = (self.schedule == Schedule::Simultaneous)
            .then(|| self.autocast.enter())
            .flatten();
        let fake = self.generate_for_training(&input.z, labels);
        self.clock.lap(Phase::GeneratorForwardBackward);
        let (d_loss, g_loss, real_logits, fake_logits, applied) = match self.schedule {
            Schedule::Simultaneous => {
                // One forward pass serves both losses, as in the reference tutorial; each
                // network then takes the gradient of its own loss. D sees the real and the
                // fake batch apart here: G's backward pass through D then runs over the fake
                // rows alone, where through one concatenated batch its input-gradient GEMMs
                // would also cover the real rows, whose gradient is zero (a tenth of the
                // step's multiplications).
                let real_logits = self.discriminate(&input.real, labels);
                let fake_logits = self.discriminate(&fake, labels);
                drop(forward_region);
                let d_loss = self.critic_loss(input, &fake, &real_logits, &fake_logits);
                let g_loss = loss::generator(self.loss, &fake_logits);
                let mut d = self.gradient_of(Network::Discriminator, &d_loss, true, gather);
                self.clock.lap(Phase::DiscriminatorForwardBackward);
                // D's gradient is final here: its averaging may overlap G's backward pass.
                let d_averaged = d.sync(Network::Discriminator, sync)?;
                self.clock.lap(Phase::AllReduce);
                let mut g = self.gradient_of(Network::Generator, &g_loss, false, gather);
                self.clock.lap(Phase::GeneratorForwardBackward);
                let g_averaged = g.sync(Network::Generator, sync)?;
                d.adopt_answer_of(&g);
                self.clock.lap(Phase::AllReduce);
                let applied = d.is_finite(d_averaged) && g.is_finite(g_averaged);
                if applied {
                    self.d_opt
                        .step_with_ema(&self.d_params.flat, d.gradient(), None);
                    self.step_generator(g.gradient());
                }
                self.clock.lap(Phase::Optimizer);
                // Kept for `TrainTask::gradients` until the next step's.
                self.latest_pieces = [d.pieces, g.pieces];
                (d_loss, g_loss, real_logits, fake_logits, applied)
            }
            Schedule::Alternating => {
                // D steps on a detached fake batch, then G steps against the updated D.
                let (real_logits, fake_logits, d_loss, d_applied) =
                    self.critic_update(input, &fake.detach(), sync)?;
                if d_applied {
                    let g_logits = self.discriminate(&fake, labels);
                    let g_loss = loss::generator(self.loss, &g_logits);
                    let mut g = self.gradient_of(Network::Generator, &g_loss, false, gather);
                    self.clock.lap(Phase::GeneratorForwardBackward);
                    let averaged = g.sync(Network::Generator, sync)?;
                    self.clock.lap(Phase::AllReduce);
                    let applied = g.is_finite(averaged);
                    if applied {
                        self.step_generator(g.gradient());
                    }
                    self.clock.lap(Phase::Optimizer);
                    self.latest_pieces[1] = g.pieces;
                    (d_loss, g_loss, real_logits, fake_logits, applied)
                } else {
                    let g_loss = tch::no_grad(|| loss::generator(self.loss, &fake_logits));
                    (d_loss, g_loss, real_logits, fake_logits, false)
                }
            }
        };
        if !applied {
            self.restore_buffers(&saved);
        }
        Ok(stats(d_loss, g_loss, &real_logits, &fake_logits, applied))
    }

    /// One extra critic (D only) update, for `train.n_critic > 1`: the fake batch comes from
    /// the generator in training mode without gradients. Non-finite handling as in
    /// [`Gan::train_step`].
    pub fn critic_step<E>(
        &mut self,
        input: &StepInput,
        sync: &mut impl StepSync<E>,
    ) -> Result<StepStats, E> {
        let saved = self.snapshot_buffers();
        let _lent = self.lend_bf16_copies();
        let fake = tch::no_grad(|| self.generate_for_training(&input.z, input.labels.as_ref()));
        self.clock.lap(Phase::GeneratorForwardBackward);
        let (real_logits, fake_logits, d_loss, applied) = self.critic_update(input, &fake, sync)?;
        if !applied {
            self.restore_buffers(&saved);
        }
        let g_loss = tch::no_grad(|| loss::generator(self.loss, &fake_logits));
        Ok(stats(d_loss, g_loss, &real_logits, &fake_logits, applied))
    }

    /// Computes, syncs, checks and (if finite) applies D's gradient on a detached fake batch.
    fn critic_update<E>(
        &mut self,
        input: &StepInput,
        fake: &Tensor,
        sync: &mut impl StepSync<E>,
    ) -> Result<(Tensor, Tensor, Tensor, bool), E> {
        let (real_logits, fake_logits) =
            self.discriminate_pair(&input.real, fake, input.labels.as_ref());
        let d_loss = self.critic_loss(input, fake, &real_logits, &fake_logits);
        let gather = Gather::of(sync);
        let mut d = self.gradient_of(Network::Discriminator, &d_loss, false, gather);
        self.clock.lap(Phase::DiscriminatorForwardBackward);
        let averaged = d.sync(Network::Discriminator, sync)?;
        self.clock.lap(Phase::AllReduce);
        let applied = d.is_finite(averaged);
        if applied {
            self.d_opt
                .step_with_ema(&self.d_params.flat, d.gradient(), None);
        }
        self.clock.lap(Phase::Optimizer);
        self.latest_pieces[0] = d.pieces;
        Ok((real_logits, fake_logits, d_loss, applied))
    }

    /// D's loss, with the gradient penalty for `wgan-gp`.
    fn critic_loss(
        &self,
        input: &StepInput,
        fake: &Tensor,
        real_logits: &Tensor,
        fake_logits: &Tensor,
    ) -> Tensor {
        let base = loss::discriminator(self.loss, real_logits, fake_logits);
        if self.loss != Loss::WganGp || self.gp_weight == 0.0 {
            return base;
        }
        let alpha = input
            .alpha
            .as_ref()
            .expect("wgan-gp needs interpolation coefficients (StepInput::alpha)");
        base + self.gradient_penalty(&input.real, fake, alpha, input.labels.as_ref())
            * self.gp_weight
    }

    /// `E[(‖∇D(x̂)‖₂ − 1)²]` on `x̂ = α·real + (1 − α)·fake`, differentiable w.r.t. D's
    /// parameters (the inner gradient is taken with `create_graph`). A conditional critic is
    /// taken at the real rows' labels (the fake rows share them).
    pub fn gradient_penalty(
        &self,
        real: &Tensor,
        fake: &Tensor,
        alpha: &Tensor,
        labels: Option<&Tensor>,
    ) -> Tensor {
        let n = real.size()[0];
        let a = alpha.to_kind(real.kind()).view([n, 1, 1, 1]);
        let x_hat = (real * &a + fake.detach() * (a.ones_like() - &a))
            .detach()
            .set_requires_grad(true);
        // In bf16 the penalty's pass is an autocast region of its own, its own cast of each
        // weight, so its weight gradient meets the losses' in fp32: with the copies lent it
        // would meet them in bf16 instead, and lose precision the loss never lost.
        let out = crate::precision::without_lent_copies(|| self.discriminate(&x_hat, labels));
        let grads = Tensor::run_backward(&[&out.sum(Kind::Float)], &[&x_hat], true, true);
        // sqrt(sum + ε) rather than norm(): finite derivative where the gradient is zero.
        let norm = (grads[0].square().flatten(1, -1).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        ) + 1e-12)
            .sqrt();
        (norm - 1.0).square().mean(Kind::Float)
    }

    /// `network`'s gradient of `loss` (see [`flat_gradient`]), through its bf16 copy where it
    /// has one; `keep_graph` keeps the graph for a second backward pass.
    fn gradient_of(
        &self,
        network: Network,
        loss: &Tensor,
        keep_graph: bool,
        gather: Gather,
    ) -> FlatGradient {
        let (params, out, index) = match network {
            Network::Discriminator => (&self.d_params, self.d_gradient(), 0),
            Network::Generator => (&self.g_params, self.g_gradient(), 1),
        };
        let grads = match &self.bf16_copies {
            Some(copies) => copies[index].gradients(loss, params, keep_graph),
            None => Tensor::run_backward(&[loss], &params.tensors, keep_graph, false),
        };
        flat_gradient(loss, params, grads, out, gather)
    }

    /// Lends both networks' bf16 copies (if kept) to the forward passes of a training step.
    fn lend_bf16_copies(&self) -> Option<[LentWeights; 2]> {
        self.bf16_copies.as_ref().map(|[d, g]| [d.lend(), g.lend()])
    }

    /// Rounds both networks' parameters into their bf16 copies (if kept) again, after they
    /// were written other than by the optimisers.
    fn refresh_bf16_copies(&self) {
        if let Some([d, g]) = &self.bf16_copies {
            d.refresh(&self.d_params);
            g.refresh(&self.g_params);
        }
    }

    /// The generator in training mode, in `train.precision`; fp32 images.
    fn generate_for_training(&self, z: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let images = self
            .autocast
            .run(|| self.generator.forward_t(z, labels, true));
        images.to_kind(Kind::Float)
    }

    /// D's logits in `train.precision`, as fp32 (losses and the penalty are taken in fp32).
    fn discriminate(&self, images: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let logits = self
            .autocast
            .run(|| self.discriminator.forward(images, labels));
        logits.to_kind(Kind::Float)
    }

    /// D on the real and a detached fake batch. The discriminator has no BatchNorm, so both
    /// go through in one batch: one GEMM per layer instead of two.
    fn discriminate_pair(
        &self,
        real: &Tensor,
        fake: &Tensor,
        labels: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let n_real = real.size()[0];
        // The fake rows are of the real rows' classes.
        let both = labels.map(|l| Tensor::cat(&[l, l], 0));
        let logits = self.discriminate(&Tensor::cat(&[real, fake], 0), both.as_ref());
        let n_fake = logits.size()[0] - n_real;
        (
            logits.narrow(0, 0, n_real),
            logits.narrow(0, n_real, n_fake),
        )
    }

    /// G's optimiser step from `grad`, with the generator EMA (when kept) updated in the same
    /// pass over the parameters, and the EMA's BatchNorm statistics copied from G's.
    fn step_generator(&mut self, grad: Gradient<'_>) {
        let Some(ema) = &self.ema else {
            self.g_opt.step_with_ema(&self.g_params.flat, grad, None);
            return;
        };
        let decay = |t| ema_decay_at(ema.decay, t);
        self.g_opt
            .step_with_ema(&self.g_params.flat, grad, Some((&ema.params.flat, &decay)));
        tch::no_grad(|| {
            for (dst, src) in ema.buffers.iter().zip(&self.g_buffers) {
                dst.shallow_clone().copy_(src);
            }
        });
    }

    fn snapshot_buffers(&self) -> Vec<Tensor> {
        tch::no_grad(|| self.g_buffers.iter().map(Tensor::copy).collect())
    }

    fn restore_buffers(&self, saved: &[Tensor]) {
        tch::no_grad(|| {
            for (dst, src) in self.g_buffers.iter().zip(saved) {
                dst.shallow_clone().copy_(src);
            }
        });
    }

    /// Writes the four tensor files into `dir`: both networks (parameters and buffers), the
    /// EMA generator under the generator's variable names (the live generator when EMA is
    /// off), and both optimisers' moment tensors. Adam's step counts are not in them: they go
    /// with the rest of the scalar state.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.generator_vs.save(dir.join(GENERATOR_FILE))?;
        self.discriminator_vs.save(dir.join(DISCRIMINATOR_FILE))?;
        match &self.ema {
            Some(ema) => ema.vs.save(dir.join(GENERATOR_EMA_FILE))?,
            None => self.generator_vs.save(dir.join(GENERATOR_EMA_FILE))?,
        }
        save_moments(
            &[("generator", &self.g_opt), ("discriminator", &self.d_opt)],
            &dir.join(OPTIMIZER_FILE),
        )
    }

    /// Loads what [`Gan::save`] wrote, in place (the flat parameter layout is kept), checking
    /// every name and shape. Optimiser step counts are set separately.
    pub fn load(&mut self, dir: &Path) -> Result<(), ModelError> {
        load_into(&self.generator_vs, &dir.join(GENERATOR_FILE))?;
        load_into(&self.discriminator_vs, &dir.join(DISCRIMINATOR_FILE))?;
        if let Some(ema) = &self.ema {
            load_into(&ema.vs, &dir.join(GENERATOR_EMA_FILE))?;
        }
        self.refresh_bf16_copies();
        load_moments(
            &[("generator", &self.g_opt), ("discriminator", &self.d_opt)],
            &dir.join(OPTIMIZER_FILE),
        )
    }
}

/// What [`Gan::train_step`] and [`Gan::critic_step`] hand each network's gradient to.
/// Closures `FnMut(Network, &mut Tensor) -> Result<bool, E>` are one, with every gradient
/// gathered.
pub trait StepSync<E> {
    /// Whether the step gathers each gradient into [`Gan::gradients`] and calls
    /// [`StepSync::sync`] with it. `false` (nothing to combine it with: a world of one) lets a
    /// host gradient stay in the tensors autograd returned, read there by the optimiser, with
    /// no copy; `sync` is then not called for it, and [`Gan::gradients`] is left as it was.
    fn gathers(&self) -> bool {
        true
    }

    /// Combines `grad` (flat, a view of [`Gan::gradients`]) with other ranks' in place, as
    /// [`Gan::train_step`] describes; returns whether it did.
    fn sync(&mut self, network: Network, grad: &mut Tensor) -> Result<bool, E>;

    /// Whether the step hands host gradients to [`StepSync::sync_pieces`] as autograd left
    /// them, ungathered (only where [`StepSync::gathers`]).
    fn takes_pieces(&self) -> bool {
        false
    }

    /// [`StepSync::sync`] for a gradient in `pieces` (autograd's host tensors, in the flat
    /// layout's order, a non-finite loss already written into them as NaN): combines it with
    /// other ranks' into `grad` and returns whether every element of the result is finite,
    /// or `None` for D's call in `simultaneous` when the result will be in `grad` once G's
    /// call has returned, whose answer then covers both. Always counts as combined. This
    /// default gathers the pieces and calls [`StepSync::sync`].
    fn sync_pieces(
        &mut self,
        network: Network,
        pieces: &[Tensor],
        grad: &mut Tensor,
    ) -> Result<Option<bool>, E> {
        crate::flat::gather_pieces(pieces, grad);
        self.sync(network, grad)?;
        Ok(Some(all_finite(grad)))
    }
}

impl<E, F: FnMut(Network, &mut Tensor) -> Result<bool, E>> StepSync<E> for F {
    fn sync(&mut self, network: Network, grad: &mut Tensor) -> Result<bool, E> {
        self(network, grad)
    }
}

/// How a GAN step hands its gradients to the group. In `simultaneous`, neither gradient is
/// read before G's sync returns (see [`Gan::train_step`]), so on the last sub-step D's average
/// may wait: overlapped with G's backward pass in the background where the reducer offers
/// that, or (by default) joined with G's into one average over [`Gan::gradients`], one
/// synchronisation of the ranks a step instead of two.
struct GanSync<'r> {
    reduce: &'r mut dyn GradReduce,
    /// [`Gan::gradients`]: D's flat gradient, then G's.
    joint: Tensor,
    defer_discriminator: bool,
    /// D's gradient, waiting for G's: gathered, or in pieces with the flat view their
    /// average goes to.
    deferred: Option<Tensor>,
    deferred_pieces: Option<(Vec<Tensor>, Tensor)>,
    /// D's average runs in the background.
    pending: bool,
}

impl StepSync<ExternalError> for GanSync<'_> {
    /// A group of one (no collective, nothing in the background) leaves gradients as they are.
    fn gathers(&self) -> bool {
        !self.reduce.is_identity()
    }

    /// Returns whether the gradient is (or, for D's deferred call, will be once G's call
    /// returns) combined with other ranks', as [`Gan::train_step`] asks.
    fn sync(&mut self, network: Network, grad: &mut Tensor) -> Result<bool, ExternalError> {
        let averaged = !self.reduce.is_identity();
        if self.defer_discriminator && network == Network::Discriminator {
            if self.reduce.start_average(grad) {
                self.pending = true;
            } else {
                self.deferred = Some(grad.shallow_clone());
            }
            return Ok(averaged);
        }
        self.finish()?;
        self.average_deferred_pieces()?;
        match self.deferred.take() {
            Some(d_grad) if spans(&self.joint, &d_grad, grad) => {
                self.reduce.average(&mut self.joint.shallow_clone())?;
            }
            Some(mut d_grad) => {
                self.reduce.average(&mut d_grad)?;
                self.reduce.average(grad)?;
            }
            None => self.reduce.average(grad)?,
        }
        Ok(averaged)
    }

    fn takes_pieces(&self) -> bool {
        self.reduce.takes_pieces()
    }

    /// D's pieces wait for G's (in `simultaneous`, on the last sub-step); G's call then
    /// averages both into [`Gan::gradients`] in one operation.
    fn sync_pieces(
        &mut self,
        network: Network,
        pieces: &[Tensor],
        grad: &mut Tensor,
    ) -> Result<Option<bool>, ExternalError> {
        if self.defer_discriminator && network == Network::Discriminator {
            let kept = pieces.iter().map(Tensor::shallow_clone).collect();
            self.deferred_pieces = Some((kept, grad.shallow_clone()));
            return Ok(None);
        }
        self.finish()?;
        if let Some(mut d_grad) = self.deferred.take() {
            self.reduce.average(&mut d_grad)?;
        }
        let finite = match self.deferred_pieces.take() {
            Some((mut both, d_grad)) if spans(&self.joint, &d_grad, grad) => {
                both.extend(pieces.iter().map(Tensor::shallow_clone));
                self.reduce
                    .average_pieces(&both, &mut self.joint.shallow_clone())?
            }
            Some((d_pieces, mut d_grad)) => {
                let d_finite = self.reduce.average_pieces(&d_pieces, &mut d_grad)?;
                self.reduce.average_pieces(pieces, grad)? && d_finite
            }
            None => self.reduce.average_pieces(pieces, grad)?,
        };
        Ok(Some(finite))
    }
}

impl GanSync<'_> {
    /// Collects a background average (also after an error between the two syncs).
    fn finish(&mut self) -> Result<(), ExternalError> {
        if std::mem::take(&mut self.pending) {
            self.reduce.finish_average()?;
        }
        Ok(())
    }

    /// Averages D's pieces where they waited for a G gradient that came gathered (devices
    /// that differ in what they hand over); D's own check then scans the average.
    fn average_deferred_pieces(&mut self) -> Result<(), ExternalError> {
        if let Some((d_pieces, mut d_grad)) = self.deferred_pieces.take() {
            self.reduce.average_pieces(&d_pieces, &mut d_grad)?;
        }
        Ok(())
    }
}

/// Whether `first` and `second` are, in this order, exactly the two halves of `joint`'s
/// memory, so averaging `joint` averages both.
fn spans(joint: &Tensor, first: &Tensor, second: &Tensor) -> bool {
    let f32_bytes = std::mem::size_of::<f32>();
    let base = joint.data_ptr() as usize;
    [joint, first, second]
        .iter()
        .all(|t| t.kind() == Kind::Float && t.is_contiguous() && t.device() == joint.device())
        && first.data_ptr() as usize == base
        && second.data_ptr() as usize == base + first.numel() * f32_bytes
        && first.numel() + second.numel() == joint.numel()
}

impl Gan {
    /// `n` images from [`latent::fixed`]`(seed, n)`, of `labels` (checked by the caller) for a
    /// conditional GAN. Chunked only to bound memory: BatchNorm runs on running statistics in
    /// inference, so chunking does not change the images.
    fn sample_chunked(&self, n: usize, seed: u64, labels: Option<&[u8]>) -> Vec<u8> {
        const CHUNK: usize = 500;
        let z = latent::fixed(seed, n, self.latent_dim);
        z.chunks(CHUNK * self.latent_dim.max(1))
            .enumerate()
            .flat_map(|(i, chunk)| {
                let labels = labels.map(|l| {
                    let rows = &l[i * CHUNK..(i * CHUNK + CHUNK).min(l.len())];
                    self.shape
                        .labels(rows, self.device)
                        .expect("labels checked against the model's classes")
                });
                self.generate_u8(&self.latents(chunk), labels.as_ref())
            })
            .collect()
    }
}

impl TrainTask for Gan {
    fn family(&self) -> Family {
        Family::Gan
    }

    fn describe(&self) -> String {
        match self.shape.classes {
            None => format!("{} GAN", self.kind),
            Some(k) => format!("conditional {} GAN ({k} classes)", self.kind),
        }
    }

    fn parts(&self) -> Vec<Part<'_>> {
        vec![
            Part {
                name: "generator",
                params: &self.g_params,
                vs: &self.generator_vs,
                optimizer: &self.g_opt,
            },
            Part {
                name: "discriminator",
                params: &self.d_params,
                vs: &self.discriminator_vs,
                optimizer: &self.d_opt,
            },
        ]
    }

    fn phases(&self) -> &'static [Phase] {
        &[
            Phase::Data,
            Phase::DiscriminatorForwardBackward,
            Phase::GeneratorForwardBackward,
            Phase::AllReduce,
            Phase::Optimizer,
        ]
    }

    fn batches_per_step(&self) -> u64 {
        u64::from(self.n_critic)
    }

    /// `train.n_critic` sub-steps, each on its own batch: the first ones update D only
    /// ([`Gan::critic_step`]), the last one runs the schedule ([`Gan::train_step`]). A
    /// skipped (non-finite) sub-step ends the step on every rank alike.
    fn step(
        &mut self,
        data: &mut dyn BatchSource,
        reduce: &mut dyn GradReduce,
    ) -> Result<StepOutcome, ModelError> {
        let n = u64::from(self.n_critic);
        let simultaneous = self.schedule == Schedule::Simultaneous;
        let mut latest = None;
        for i in 0..n {
            let input = self.step_input(data.batch(i)?)?;
            self.clock.lap(Phase::Data);
            let last = i + 1 == n;
            let mut sync = GanSync {
                reduce: &mut *reduce,
                joint: self.gradients.shallow_clone(),
                defer_discriminator: simultaneous && last,
                deferred: None,
                deferred_pieces: None,
                pending: false,
            };
            let result = if last {
                self.train_step(&input, &mut sync)
            } else {
                self.critic_step(&input, &mut sync)
            };
            let finished = sync.finish();
            let stats = result?;
            finished?;
            let applied = stats.applied;
            latest = Some(stats);
            if !applied {
                break;
            }
        }
        let stats = latest.ok_or_else(|| ModelError::Invalid("train.n_critic is 0".into()))?;
        Ok(StepOutcome {
            applied: stats.applied,
            statistics: vec![
                ("d_loss", stats.d_loss),
                ("g_loss", stats.g_loss),
                ("d_real", stats.d_real),
                ("d_fake", stats.d_fake),
            ],
        })
    }

    fn gradients(&self) -> Vec<(&'static str, Tensor)> {
        let latest = |pieces: &[Tensor], flat: Tensor| match pieces {
            [] => flat,
            pieces => crate::flat::concatenated(pieces),
        };
        vec![
            (
                "generator",
                latest(&self.latest_pieces[1], self.g_gradient()),
            ),
            (
                "discriminator",
                latest(&self.latest_pieces[0], self.d_gradient()),
            ),
        ]
    }

    fn classes(&self) -> Option<usize> {
        self.shape.classes
    }

    fn sample_u8(&self, n: usize, seed: u64) -> Vec<u8> {
        match self.shape.classes {
            None => self.sample_chunked(n, seed, None),
            Some(k) => self.sample_chunked(n, seed, Some(&cycled_labels(n, k))),
        }
    }

    fn sample_labelled_u8(&self, labels: &[u8], seed: u64) -> Result<Vec<u8>, ModelError> {
        // Range-checked (and refused for an unconditional GAN) before any work.
        self.shape.check_labels(labels)?;
        Ok(self.sample_chunked(labels.len(), seed, Some(labels)))
    }

    fn save(&self, dir: &Path) -> Result<(), ModelError> {
        Gan::save(self, dir)
    }

    fn load(&mut self, dir: &Path) -> Result<(), ModelError> {
        Gan::load(self, dir)
    }

    fn parameters_written(&self) {
        self.refresh_bf16_copies();
    }

    fn set_optimizer_steps(&mut self, name: &str, steps: u64) -> Result<(), ModelError> {
        match name {
            "generator" => self.g_opt.step = steps,
            "discriminator" => self.d_opt.step = steps,
            other => {
                return Err(ModelError::Invalid(format!(
                    "the GAN has no part `{other}`"
                )));
            }
        }
        Ok(())
    }

    fn clock(&mut self) -> &mut PhaseClock {
        &mut self.clock
    }

    fn device(&self) -> Device {
        self.device
    }

    fn image_shape(&self) -> [i64; 3] {
        self.image_shape
    }
}

/// Writes the optimisers' moment tensors (Adam's; SGD has none) as `<part>.exp_avg` and
/// `<part>.exp_avg_sq` into one file. Step counts go with the scalar state.
pub(crate) fn save_moments(
    optimizers: &[(&str, &FlatOptimizer)],
    path: &Path,
) -> Result<(), ModelError> {
    let mut moments: Vec<(String, &Tensor)> = Vec::new();
    for (part, opt) in optimizers {
        if opt.exp_avg.defined() {
            moments.push((format!("{part}.exp_avg"), &opt.exp_avg));
            moments.push((format!("{part}.exp_avg_sq"), &opt.exp_avg_sq));
        }
    }
    Tensor::write_safetensors(&moments, path)?;
    Ok(())
}

/// Loads what [`save_moments`] wrote, checking every name and shape.
pub(crate) fn load_moments(
    optimizers: &[(&str, &FlatOptimizer)],
    path: &Path,
) -> Result<(), ModelError> {
    let moments: HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
    for (part, opt) in optimizers {
        if needs_moments(opt) {
            for (field, dst) in [("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)] {
                let name = format!("{part}.{field}");
                copy_checked(dst, moments.get(&name), &name, path)?;
            }
        }
    }
    Ok(())
}

fn needs_moments(opt: &FlatOptimizer) -> bool {
    opt.kind() == Optimizer::Adam
}

fn copy_checked(
    dst: &Tensor,
    src: Option<&Tensor>,
    name: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let src =
        src.ok_or_else(|| ModelError::Invalid(format!("{}: no tensor `{name}`", path.display())))?;
    if src.size() != dst.size() || src.kind() != dst.kind() {
        return Err(ModelError::Invalid(format!(
            "{}: `{name}` is {:?} {:?}, the model needs {:?} {:?}",
            path.display(),
            src.kind(),
            src.size(),
            dst.kind(),
            dst.size()
        )));
    }
    tch::no_grad(|| dst.shallow_clone().copy_(src));
    Ok(())
}

/// Copies every variable of `vs` from `path` with `copy_`, so variables that are views into a
/// flat tensor stay views (tch's `VarStore::load` may re-point them).
pub(crate) fn load_into(vs: &VarStore, path: &Path) -> Result<(), ModelError> {
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
    for (name, var) in vs.variables() {
        copy_checked(&var, tensors.get(&name), &name, path)?;
    }
    Ok(())
}

fn stats(
    d_loss: Tensor,
    g_loss: Tensor,
    real_logits: &Tensor,
    fake_logits: &Tensor,
    applied: bool,
) -> StepStats {
    tch::no_grad(|| StepStats {
        d_loss: d_loss.detach(),
        g_loss: g_loss.detach(),
        d_real: real_logits.sigmoid().mean(None),
        d_fake: fake_logits.sigmoid().mean(None),
        applied,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use gantry_config::Precision;

    use super::*;

    /// Held by the tests that compare trainings bit for bit: two of them stepping bf16 GANs
    /// at once were seen to disagree now and then (libtorch state shared by the threads of
    /// one process; which was not found), never one alone.
    static BIT_EXACT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A world of one that says so: the gradients stay where autograd put them.
    struct Ungathered;

    impl StepSync<Infallible> for Ungathered {
        fn gathers(&self) -> bool {
            false
        }

        fn sync(&mut self, _: Network, _: &mut Tensor) -> Result<bool, Infallible> {
            unreachable!("a gradient left in pieces is handed to nobody")
        }
    }

    fn bf16_gan(loss: Loss, schedule: Schedule, copies: bool) -> Gan {
        let mut s = Settings::default();
        s.model.latent_dim = 8;
        s.train.loss = loss;
        s.train.schedule = schedule;
        s.train.batch_size = 4;
        s.train.precision = Precision::Bf16;
        let mut gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
        assert!(gan.bf16_copies.is_some(), "bf16 on the host keeps copies");
        if !copies {
            // What autocast does without them: a cast of every weight each step.
            gan.bf16_copies = None;
            gan.d_opt.bf16_copy = None;
            gan.g_opt.bf16_copy = None;
        }
        gan
    }

    fn input(gan: &Gan, step: u64) -> StepInput {
        let n = 4;
        let mut z = Vec::new();
        crate::latent::fill(1, step, gan.latent_dim(), 0, n, &mut z);
        let mut alpha = Vec::new();
        crate::latent::interpolation(1, step, 0, n, &mut alpha);
        let pixels: Vec<f32> = (0..n * 784)
            .map(|i| ((i % 17) as f32 / 8.0) - 1.0)
            .collect();
        StepInput {
            real: gan.images(&pixels),
            z: gan.latents(&z),
            alpha: Some(gan.coefficients(&alpha)),
            labels: None,
        }
    }

    /// Copies `from`'s parameters, buffers and EMA into `to` (and into its bf16 copies).
    fn same_start(from: &Gan, to: &Gan) {
        tch::no_grad(|| {
            fn ema(gan: &Gan) -> &Tensor {
                &gan.ema.as_ref().unwrap().params.flat
            }
            let tensors = [&from.d_params.flat, &from.g_params.flat, ema(from)];
            let targets = [&to.d_params.flat, &to.g_params.flat, ema(to)];
            let buffers = from.g_buffers.iter().zip(&to.g_buffers);
            for (src, dst) in tensors.into_iter().zip(targets).chain(buffers) {
                dst.shallow_clone().copy_(src);
            }
        });
        to.refresh_bf16_copies();
    }

    /// Whether each network's copy is its parameters rounded, as autocast would cast them.
    fn copies_current(gan: &Gan) -> bool {
        let [d, g] = gan.bf16_copies.as_ref().unwrap();
        d.flat().equal(&gan.d_params.flat.to_kind(Kind::BFloat16))
            && g.flat().equal(&gan.g_params.flat.to_kind(Kind::BFloat16))
    }

    #[test]
    fn bf16_copies_train_bit_identically_to_autocasts_casts() {
        let _serial = BIT_EXACT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The same process, the same kernels: the copies written by Adam are autocast's
        // casts and their bf16 gradients, widened, are its gradients, so every update, the
        // EMA and the skip of a non-finite step match bit for bit, gathered or in pieces,
        // through both schedules, the penalty's double backward and the extra critic step.
        for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
            for loss in [Loss::Bce, Loss::WganGp] {
                let mut casts = bf16_gan(loss, schedule, false);
                let mut gathered = bf16_gan(loss, schedule, true);
                let mut pieces = bf16_gan(loss, schedule, true);
                // Other tests of this binary draw from libtorch's global generator while
                // these are built: start all three from the first one's state.
                same_start(&casts, &gathered);
                same_start(&casts, &pieces);
                let d0 = casts.d_params.flat.copy();
                let no_sync =
                    |_: Network, _: &mut Tensor| -> Result<bool, Infallible> { Ok(false) };
                for step in 0..4 {
                    let batch = input(&casts, step);
                    if step == 2 {
                        let _ = batch.real.view([-1]).get(5).fill_(f64::NAN);
                    }
                    let applied = [
                        casts.critic_step(&batch, &mut { no_sync }).unwrap().applied,
                        gathered
                            .critic_step(&batch, &mut { no_sync })
                            .unwrap()
                            .applied,
                        pieces.critic_step(&batch, &mut Ungathered).unwrap().applied,
                        casts.train_step(&batch, &mut { no_sync }).unwrap().applied,
                        gathered
                            .train_step(&batch, &mut { no_sync })
                            .unwrap()
                            .applied,
                        pieces.train_step(&batch, &mut Ungathered).unwrap().applied,
                    ];
                    assert_eq!(applied, [step != 2; 6], "{schedule} {loss} step {step}");
                }
                let context = format!("{schedule} {loss}");
                assert!(!casts.d_params.flat.equal(&d0), "{context}: D trained");
                for (what, gan) in [("gathered", &gathered), ("pieces", &pieces)] {
                    assert!(
                        casts.d_params.flat.equal(&gan.d_params.flat),
                        "{context} {what}: D"
                    );
                    assert!(
                        casts.g_params.flat.equal(&gan.g_params.flat),
                        "{context} {what}: G"
                    );
                    let ema = |gan: &Gan| gan.ema.as_ref().unwrap().params.flat.copy();
                    assert!(ema(&casts).equal(&ema(gan)), "{context} {what}: EMA");
                    assert!(copies_current(gan), "{context} {what}: copies");
                }
            }
        }
    }

    /// A group whose average changes nothing, but which is not a world of one: the step
    /// gathers for it (`pieces` false) or hands it autograd's pieces (and only then calls
    /// `average_pieces`). Counts its averages.
    struct NoOpGroup {
        pieces: bool,
        averages: usize,
        of_pieces: usize,
    }

    impl GradReduce for NoOpGroup {
        fn average(&mut self, _: &mut Tensor) -> Result<(), ExternalError> {
            self.averages += 1;
            Ok(())
        }

        fn is_identity(&self) -> bool {
            false
        }

        fn takes_pieces(&self) -> bool {
            self.pieces
        }

        fn average_pieces(
            &mut self,
            pieces: &[Tensor],
            out: &mut Tensor,
        ) -> Result<bool, ExternalError> {
            assert!(
                self.pieces,
                "pieces for a group that takes the gathered gradient"
            );
            self.of_pieces += 1;
            crate::flat::gather_pieces(pieces, out);
            self.average(out)?;
            Ok(all_finite(out))
        }
    }

    fn step_with(gan: &mut Gan, batch: &StepInput, group: &mut NoOpGroup) -> bool {
        let mut sync = GanSync {
            reduce: group,
            joint: gan.gradients.shallow_clone(),
            defer_discriminator: gan.schedule == Schedule::Simultaneous,
            deferred: None,
            deferred_pieces: None,
            pending: false,
        };
        let applied = gan.train_step(batch, &mut sync).unwrap().applied;
        sync.finish().unwrap();
        applied
    }

    #[test]
    fn a_group_that_takes_pieces_trains_as_one_that_takes_the_gathered_gradient() {
        let _serial = BIT_EXACT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The pieces, concatenated in the flat layout (D's then G's into one joint average
        // in `simultaneous`), are the gathered gradient; a non-finite loss written into them
        // skips the same step; the answer for D's deferred pieces is G's call's.
        for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
            for copies in [true, false] {
                let mut flat = bf16_gan(Loss::Bce, schedule, copies);
                let mut pieces = bf16_gan(Loss::Bce, schedule, copies);
                same_start(&flat, &pieces);
                let mut flat_group = NoOpGroup {
                    pieces: false,
                    averages: 0,
                    of_pieces: 0,
                };
                let mut pieces_group = NoOpGroup {
                    pieces: true,
                    averages: 0,
                    of_pieces: 0,
                };
                for step in 0..4 {
                    let batch = input(&flat, step);
                    if step == 2 {
                        let _ = batch.real.view([-1]).get(5).fill_(f64::NAN);
                    }
                    let applied = [
                        step_with(&mut flat, &batch, &mut flat_group),
                        step_with(&mut pieces, &batch, &mut pieces_group),
                    ];
                    assert_eq!(
                        applied,
                        [step != 2; 2],
                        "{schedule} copies {copies} step {step}"
                    );
                }
                let context = format!("{schedule}, bf16 copies {copies}");
                assert!(
                    flat.d_params.flat.equal(&pieces.d_params.flat),
                    "{context}: D"
                );
                assert!(
                    flat.g_params.flat.equal(&pieces.g_params.flat),
                    "{context}: G"
                );
                // As many averages either way: one a step in `simultaneous` (D's and G's
                // joined), in `alternating` two, but one where D's is not finite (G's step
                // is skipped before its gradient).
                assert_eq!(pieces_group.averages, flat_group.averages, "{context}");
                let expected = match schedule {
                    Schedule::Simultaneous => 4,
                    Schedule::Alternating => 3 * 2 + 1,
                };
                assert_eq!(pieces_group.averages, expected, "{context}");
                assert_eq!(
                    pieces_group.of_pieces, expected,
                    "{context}: every one in pieces"
                );
            }
        }
    }

    #[test]
    fn parameters_written_from_outside_reach_the_bf16_copies() {
        let gan = bf16_gan(Loss::Bce, Schedule::Simultaneous, true);
        // A broadcast of rank 0's parameters writes them in place, behind the optimiser.
        tch::no_grad(|| {
            let _ = gan.d_params.flat.shallow_clone().uniform_(-1.0, 1.0);
            let _ = gan.g_params.flat.shallow_clone().uniform_(-1.0, 1.0);
        });
        assert!(!copies_current(&gan));
        TrainTask::parameters_written(&gan);
        assert!(copies_current(&gan));
    }

    #[test]
    fn all_finite_sees_every_kind_of_non_finite_value() {
        let fine = Tensor::from_slice(&[1.0f32, -2.0, 0.0, f32::MAX]);
        assert!(all_finite(&fine));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::from_slice(&[1.0f32, 2.0, bad, 4.0]);
            assert!(!all_finite(&t), "{bad} missed (host scan)");
            // A strided view and a double tensor take libtorch's kernels.
            let strided = Tensor::stack(&[&t, &t], 1).select(1, 0);
            assert!(!strided.is_contiguous());
            assert!(!all_finite(&strided), "{bad} missed (strided)");
            assert!(!all_finite(&t.to_kind(Kind::Double)), "{bad} missed (f64)");
        }
        assert!(all_finite(&Tensor::stack(&[&fine, &fine], 1).select(1, 1)));
    }
}
