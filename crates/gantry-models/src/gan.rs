//! A generator and a discriminator with their optimisers, and one training step.

use gantry_config::{Loss, Schedule, Settings};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::optim::FlatOptimizer;
use crate::{FlatParams, ModelError, loss, mlp};

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

/// The GAN being trained: both networks, their flat parameters and their optimisers.
#[derive(Debug)]
pub struct Gan {
    pub device: Device,
    pub generator_vs: VarStore,
    pub discriminator_vs: VarStore,
    generator: Box<dyn ModuleT>,
    discriminator: Box<dyn ModuleT>,
    pub g_params: FlatParams,
    pub d_params: FlatParams,
    pub g_opt: FlatOptimizer,
    pub d_opt: FlatOptimizer,
    loss: Loss,
    schedule: Schedule,
    latent_dim: usize,
    image_shape: [i64; 3],
}

impl Gan {
    /// Builds both networks with weights drawn from `train.seed`.
    pub fn new(
        settings: &Settings,
        image_shape: [i64; 3],
        device: Device,
    ) -> Result<Self, ModelError> {
        if image_shape.iter().any(|&d| d <= 0) {
            return Err(ModelError::Invalid(format!(
                "invalid image shape {image_shape:?}"
            )));
        }
        let latent_dim = settings.model.latent_dim;
        let latent = i64::try_from(latent_dim).map_err(|e| ModelError::Invalid(e.to_string()))?;
        // Initial weights come from libtorch's global generator: hold it for the whole
        // initialisation, so trainers built concurrently in one process (tests, several
        // ranks as threads) each get exactly the seed's weights.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(settings.train.seed as i64);
        let generator_vs = VarStore::new(device);
        let discriminator_vs = VarStore::new(device);
        let generator: Box<dyn ModuleT> = Box::new(mlp::Generator::new(
            &generator_vs.root(),
            latent,
            image_shape,
            settings.model.batch_norm,
        ));
        let discriminator: Box<dyn ModuleT> = Box::new(mlp::Discriminator::new(
            &discriminator_vs.root(),
            image_shape,
        ));
        let g_params = FlatParams::new(&generator_vs);
        let d_params = FlatParams::new(&discriminator_vs);
        let t = &settings.train;
        let g_opt = FlatOptimizer::new(t.optimizer, t.lr_g, t.betas, &g_params.flat);
        let d_opt = FlatOptimizer::new(t.optimizer, t.lr_d, t.betas, &d_params.flat);
        Ok(Self {
            device,
            generator_vs,
            discriminator_vs,
            generator,
            discriminator,
            g_params,
            d_params,
            g_opt,
            d_opt,
            loss: t.loss,
            schedule: t.schedule,
            latent_dim,
            image_shape,
        })
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

    /// Images from the generator in inference mode (BatchNorm running statistics).
    pub fn generate(&self, z: &Tensor) -> Tensor {
        tch::no_grad(|| self.generator.forward_t(z, false))
    }

    /// Images as 8-bit grey/RGB values, NCHW, from the generator in inference mode.
    pub fn generate_u8(&self, z: &Tensor) -> Vec<u8> {
        let images = self.generate(z);
        let bytes = ((images + 1.0) * 127.5)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8);
        Vec::<u8>::try_from(bytes.to_device(Device::Cpu).reshape([-1])).unwrap_or_default()
    }

    /// One training step on this rank's slice of the global batch.
    ///
    /// `sync` is called with each network's flat gradient before that network's optimiser
    /// step; a data-parallel worker all-reduces (averages) it across ranks there, a single
    /// process leaves it as it is.
    pub fn train_step<E>(
        &mut self,
        real: &Tensor,
        z: &Tensor,
        sync: &mut impl FnMut(Network, &mut Tensor) -> Result<(), E>,
    ) -> Result<StepStats, E> {
        let fake = self.generator.forward_t(z, true);
        match self.schedule {
            Schedule::Simultaneous => {
                // One forward pass serves both losses, as in the reference tutorial; each
                // network then takes the gradient of its own loss.
                let (real_logits, fake_logits) = self.discriminate_pair(real, &fake);
                let d_loss = loss::discriminator(self.loss, &real_logits, &fake_logits);
                let g_loss = loss::generator(self.loss, &fake_logits);
                let d_grads = Tensor::run_backward(&[&d_loss], &self.d_params.tensors, true, false);
                let g_grads =
                    Tensor::run_backward(&[&g_loss], &self.g_params.tensors, false, false);
                let mut d_grad = self.d_params.flatten_grads(&d_grads);
                let mut g_grad = self.g_params.flatten_grads(&g_grads);
                sync(Network::Discriminator, &mut d_grad)?;
                sync(Network::Generator, &mut g_grad)?;
                self.d_opt.step(&self.d_params.flat, &d_grad);
                self.g_opt.step(&self.g_params.flat, &g_grad);
                Ok(stats(d_loss, g_loss, &real_logits, &fake_logits))
            }
            Schedule::Alternating => {
                // D steps on a detached fake batch, then G steps against the updated D.
                let (real_logits, fake_logits) = self.discriminate_pair(real, &fake.detach());
                let d_loss = loss::discriminator(self.loss, &real_logits, &fake_logits);
                let d_grads =
                    Tensor::run_backward(&[&d_loss], &self.d_params.tensors, false, false);
                let mut d_grad = self.d_params.flatten_grads(&d_grads);
                sync(Network::Discriminator, &mut d_grad)?;
                self.d_opt.step(&self.d_params.flat, &d_grad);

                let g_logits = self.discriminator.forward_t(&fake, true);
                let g_loss = loss::generator(self.loss, &g_logits);
                let g_grads =
                    Tensor::run_backward(&[&g_loss], &self.g_params.tensors, false, false);
                let mut g_grad = self.g_params.flatten_grads(&g_grads);
                sync(Network::Generator, &mut g_grad)?;
                self.g_opt.step(&self.g_params.flat, &g_grad);
                Ok(stats(d_loss, g_loss, &real_logits, &fake_logits))
            }
        }
    }

    /// D on the real and the fake batch. The discriminator has no BatchNorm, so both go
    /// through in one batch: one GEMM per layer instead of two.
    fn discriminate_pair(&self, real: &Tensor, fake: &Tensor) -> (Tensor, Tensor) {
        let n_real = real.size()[0];
        let logits = self
            .discriminator
            .forward_t(&Tensor::cat(&[real, fake], 0), true);
        let n_fake = logits.size()[0] - n_real;
        (
            logits.narrow(0, 0, n_real),
            logits.narrow(0, n_real, n_fake),
        )
    }
}

fn stats(d_loss: Tensor, g_loss: Tensor, real_logits: &Tensor, fake_logits: &Tensor) -> StepStats {
    tch::no_grad(|| StepStats {
        d_loss: d_loss.detach(),
        g_loss: g_loss.detach(),
        d_real: real_logits.sigmoid().mean(None),
        d_fake: fake_logits.sigmoid().mean(None),
    })
}
