//! The training-task seam: one trait, [`TrainTask`], that the worker's loop drives without
//! knowing which generative family it trains.
//!
//! A task owns its networks (each a [`Part`]: a `VarStore` whose trainable parameters are views
//! of one flat tensor, and that tensor's optimiser), and runs one data-parallel step given the
//! rank's batches ([`BatchSource`]) and a way to average gradients across ranks
//! ([`GradReduce`]). How many batches a step takes, when gradients are averaged and in how
//! many operations, which updates a non-finite value skips: all of that is the family's
//! business (the GAN's critic steps and its one all-reduce a step live in [`crate::Gan`]). What
//! comes back is named scalar statistics, so metrics, heartbeats and the status page need no
//! knowledge of what "d_loss" or "elbo" means.
//!
//! The hidden contracts every implementation keeps, and the worker's tests check:
//! - everything a step consumes is a pure function of (seed, stream index, global row): the
//!   batch, latents, binarisation draws. So a resumed run replays exactly, and n ranks × b/n
//!   rows compute the gradient of 1 rank × b;
//! - every rank calls `GradReduce` the same number of times in the same order, whatever
//!   happens (a non-finite value is decided on *averaged* gradients, identical everywhere);
//! - `save` then `load` restores the complete state but the optimisers' step counts, which
//!   the caller keeps in `state.json` ([`TrainTask::optimizer_steps`]).

use std::path::Path;

use gantry_config::{Family, Settings};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::optim::FlatOptimizer;
use crate::phases::{Phase, PhaseClock};
use crate::{FlatParams, ModelError};

/// A failure outside the model (a collective, the data), carried through a step.
pub type ExternalError = Box<dyn std::error::Error + Send + Sync>;

/// Averages gradients across the data-parallel group.
pub trait GradReduce {
    /// Averages `flat` (contiguous, 1-D, f32) across the ranks, in place.
    fn average(&mut self, flat: &mut Tensor) -> Result<(), ExternalError>;

    /// Whether [`GradReduce::average`] leaves every gradient exactly as it is (a world of one
    /// with no weighting): the finite check made while a gradient was gathered then still
    /// holds after, and the gradient is not scanned a second time.
    fn is_identity(&self) -> bool;

    /// Starts averaging `flat` in the background where that pays (a core to spare) and the
    /// backend can; `false` when nothing was started (then call [`GradReduce::average`]).
    /// Until [`GradReduce::finish_average`] returns, nothing may touch `flat`'s memory.
    fn start_average(&mut self, _flat: &Tensor) -> bool {
        false
    }

    /// Waits for the average [`GradReduce::start_average`] started (no-op if none).
    fn finish_average(&mut self) -> Result<(), ExternalError> {
        Ok(())
    }

    /// Whether [`GradReduce::average_pieces`] is the better way in for host gradients: the
    /// reducer moves the pieces autograd returned as they are (bf16 in half the bytes) and
    /// checks the average as it writes it, with no gather and no scan of the caller's.
    fn takes_pieces(&self) -> bool {
        false
    }

    /// Averages the concatenation of `pieces` (each a gradient of the parameter at that place
    /// in the flat layout, of its length) into `out` (contiguous, 1-D, f32, their total
    /// length) and returns whether every averaged element is finite. This default gathers
    /// the pieces into `out`, averages that and scans it.
    fn average_pieces(
        &mut self,
        pieces: &[Tensor],
        out: &mut Tensor,
    ) -> Result<bool, ExternalError> {
        crate::flat::gather_pieces(pieces, out);
        self.average(out)?;
        Ok(crate::flat::all_finite(out))
    }
}

/// The reduction of a world of one: nothing to average with.
#[derive(Debug, Default)]
pub struct Alone;

impl GradReduce for Alone {
    fn average(&mut self, _flat: &mut Tensor) -> Result<(), ExternalError> {
        Ok(())
    }

    fn is_identity(&self) -> bool {
        true
    }
}

/// One batch of this rank: its rows of a global batch.
#[derive(Debug)]
pub struct Batch {
    /// The data stream's index: step `s` (0-based) of a task taking `k` batches a step reads
    /// streams `s·k .. s·k + k`. Latents and other draws of the batch are keyed by it.
    pub stream: u64,
    /// The global row of this rank's first image.
    pub first_row: usize,
    /// This rank's images, NCHW in [-1, 1], on the task's device.
    pub images: Tensor,
    /// Their class labels (int64, one per image, on the task's device) when the task is
    /// conditional ([`TrainTask::classes`] is `Some`); `None` otherwise. They come from the
    /// same sampler indices as the images, so they obey the same contracts.
    pub labels: Option<Tensor>,
}

/// What a task is built for: the data's image shape and, for a conditional model, how many
/// classes its labels range over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// `[channels, height, width]`.
    pub image: [i64; 3],
    /// `Some(k)` builds a class-conditional model over labels `0..k` (`model.conditional`);
    /// `None` an unconditional one.
    pub classes: Option<usize>,
}

impl From<[i64; 3]> for ModelShape {
    /// An unconditional model of images of this shape.
    fn from(image: [i64; 3]) -> Self {
        Self {
            image,
            classes: None,
        }
    }
}

impl ModelShape {
    /// Checks the shape against `model.conditional`: a conditional model needs classes (at
    /// least two; one class is no condition), an unconditional one none.
    pub fn check(&self, conditional: bool) -> Result<(), ModelError> {
        if self.image.iter().any(|&d| d <= 0) {
            return Err(ModelError::Invalid(format!(
                "invalid image shape {:?}",
                self.image
            )));
        }
        match (conditional, self.classes) {
            (true, None) => Err(ModelError::Invalid(
                "model.conditional = true needs a labelled data set".into(),
            )),
            (true, Some(k)) if !(2..=256).contains(&k) => Err(ModelError::Invalid(format!(
                "model.conditional = true needs 2 to 256 classes, the data set has {k}"
            ))),
            (false, Some(_)) => Err(ModelError::Invalid(
                "class labels given to an unconditional model (model.conditional = false)".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The labels as a device tensor for a conditional model, checked against its classes.
    pub fn labels(&self, labels: &[u8], device: Device) -> Result<Tensor, ModelError> {
        self.check_labels(labels)?;
        let wide: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        Ok(Tensor::from_slice(&wide).to_device(device))
    }

    /// Fails for an unconditional model, or on the first label out of `0..classes`.
    pub fn check_labels(&self, labels: &[u8]) -> Result<(), ModelError> {
        let Some(k) = self.classes else {
            return Err(ModelError::Invalid(
                "this model is unconditional: it cannot generate by class".into(),
            ));
        };
        if let Some(&bad) = labels.iter().find(|&&l| usize::from(l) >= k) {
            return Err(ModelError::Invalid(format!(
                "class {bad} is out of range: the model has {k} classes (0..{})",
                k - 1
            )));
        }
        Ok(())
    }
}

/// The labels [`TrainTask::sample_u8`] draws for a conditional model of `classes` classes:
/// image `i` is of class `i mod classes`, so a grid `classes` wide shows one class a column
/// and equal numbers of every class.
pub fn cycled_labels(n: usize, classes: usize) -> Vec<u8> {
    (0..n).map(|i| (i % classes.max(1)) as u8).collect()
}

/// Where a step gets its batches from.
pub trait BatchSource {
    /// Batch `i` (0-based) of the current step.
    fn batch(&mut self, i: u64) -> Result<Batch, ExternalError>;
}

/// One network of a task, as the group sees it.
#[derive(Debug)]
pub struct Part<'a> {
    /// Its name in checkpoints, metrics (`network` label) and messages.
    pub name: &'static str,
    /// Whoever writes into it (not through the task) calls [`TrainTask::parameters_written`]
    /// after.
    pub params: &'a FlatParams,
    /// Parameters and buffers (BatchNorm statistics), for broadcasting state.
    pub vs: &'a VarStore,
    pub optimizer: &'a FlatOptimizer,
}

/// Named scalar statistics of a step, on the device until read.
#[derive(Debug)]
pub struct StepOutcome {
    /// In the family's order, e.g. `d_loss, g_loss, d_real, d_fake` for the GAN.
    pub statistics: Vec<(&'static str, Tensor)>,
    /// False when a non-finite loss or averaged gradient made the step skip its updates.
    pub applied: bool,
}

/// Host values of [`StepOutcome::statistics`].
pub type Statistics = Vec<(&'static str, f64)>;

impl StepOutcome {
    /// Reads the statistics (a device synchronisation on a GPU: call on logging steps).
    pub fn to_host(&self) -> Statistics {
        self.statistics
            .iter()
            .map(|(name, value)| (*name, value.double_value(&[])))
            .collect()
    }
}

/// Held-out likelihood of a family that has one, in nats per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Likelihood {
    /// Negative ELBO (VAE); equal to the NLL where the likelihood is exact.
    pub neg_elbo_nats: f64,
    /// Negative log-likelihood: an importance-weighted bound (VAE) or exact (autoregressive).
    pub nll_nats: f64,
    /// `nll_nats / (pixels · ln 2)`.
    pub bits_per_dim: f64,
    pub images: usize,
}

/// A generative model being trained: the seam between the worker's loop and a family.
pub trait TrainTask: std::fmt::Debug + Send {
    fn family(&self) -> Family;

    /// What is trained, for the start-up line (e.g. "mlp GAN").
    fn describe(&self) -> String;

    /// The networks, in a fixed order that every rank shares.
    fn parts(&self) -> Vec<Part<'_>>;

    /// The phases its steps mark (see [`PhaseClock`]), for metrics.
    fn phases(&self) -> &'static [Phase] {
        &[
            Phase::Data,
            Phase::ForwardBackward,
            Phase::AllReduce,
            Phase::Optimizer,
        ]
    }

    /// Batches one step reads (the GAN's `train.n_critic`; 1 elsewhere).
    fn batches_per_step(&self) -> u64 {
        1
    }

    /// One data-parallel step (see the module docs for the contracts).
    fn step(
        &mut self,
        data: &mut dyn BatchSource,
        reduce: &mut dyn GradReduce,
    ) -> Result<StepOutcome, ModelError>;

    /// Called after something other than the task's own steps wrote its parameters (a
    /// broadcast of rank 0's into [`Part::params`]), so that what it derives from them (the
    /// GAN's bf16 copies) follows.
    fn parameters_written(&self) {}

    /// Each part's group-averaged flat gradient of the latest step, by part name.
    fn gradients(&self) -> Vec<(&'static str, Tensor)>;

    /// The number of classes of a conditional model; `None` for an unconditional one.
    fn classes(&self) -> Option<usize>;

    /// `n` samples as 8-bit pixels, NCHW, a pure function of `seed` (EMA weights where the
    /// family has them). A conditional model draws the classes of [`cycled_labels`].
    fn sample_u8(&self, n: usize, seed: u64) -> Vec<u8>;

    /// One sample of each of `labels`' classes, as 8-bit pixels, NCHW: image `i` is the
    /// image [`TrainTask::sample_u8`] would draw at position `i` for the seed, but of class
    /// `labels[i]`. A pure function of `(seed, labels)`. An error for an unconditional model
    /// or a class out of range.
    fn sample_labelled_u8(&self, labels: &[u8], seed: u64) -> Result<Vec<u8>, ModelError>;

    /// Side by side: `images` (8-bit, NCHW) and the model's reconstructions of them, for
    /// families that reconstruct (the VAE).
    fn reconstruct_u8(&self, _images: &[u8]) -> Option<Vec<u8>> {
        None
    }

    /// Held-out likelihood of `images` (8-bit, NCHW), for families that have one.
    fn likelihood(
        &self,
        _images: &[u8],
        _settings: &Settings,
    ) -> Option<Result<Likelihood, ModelError>> {
        None
    }

    /// Writes the complete state but the optimisers' step counts into `dir`.
    fn save(&self, dir: &Path) -> Result<(), ModelError>;

    /// Loads what `save` wrote, in place, checking every name and shape.
    fn load(&mut self, dir: &Path) -> Result<(), ModelError>;

    /// Each part's optimiser step count, by part name.
    fn optimizer_steps(&self) -> Vec<(&'static str, u64)> {
        self.parts()
            .iter()
            .map(|p| (p.name, p.optimizer.step))
            .collect()
    }

    /// Restores the step count of part `name`'s optimiser.
    fn set_optimizer_steps(&mut self, name: &str, steps: u64) -> Result<(), ModelError>;

    /// The phase clock the caller starts and reads.
    fn clock(&mut self) -> &mut PhaseClock;

    fn device(&self) -> Device;

    /// `[channels, height, width]` of the images it models.
    fn image_shape(&self) -> [i64; 3];
}

/// The tensor files a task of `family` saves into a checkpoint directory.
pub fn checkpoint_files(family: Family) -> &'static [&'static str] {
    match family {
        Family::Gan => &[
            crate::GENERATOR_FILE,
            crate::DISCRIMINATOR_FILE,
            crate::GENERATOR_EMA_FILE,
            crate::OPTIMIZER_FILE,
        ],
        Family::Vae => &[crate::vae::VAE_FILE, crate::OPTIMIZER_FILE],
        Family::Autoregressive => &[crate::pixelcnn::PIXELCNN_FILE, crate::OPTIMIZER_FILE],
    }
}

/// Builds the task `settings.model.family` names, with weights drawn from `train.seed`.
pub fn build(
    settings: &Settings,
    shape: impl Into<ModelShape>,
    device: Device,
) -> Result<Box<dyn TrainTask>, ModelError> {
    let shape = shape.into();
    // `train.tf32` is process-wide in libtorch; every worker builds its task once at start.
    crate::runtime::set_tf32(settings.train.tf32);
    Ok(match settings.model.family {
        Family::Gan => Box::new(crate::Gan::new(settings, shape, device)?),
        Family::Vae => Box::new(crate::vae::Vae::new(settings, shape, device)?),
        Family::Autoregressive => {
            Box::new(crate::pixelcnn::PixelCnn::new(settings, shape, device)?)
        }
    })
}
