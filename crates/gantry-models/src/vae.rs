//! A variational autoencoder (`model.family = "vae"`): an encoder maps an image to a Gaussian
//! posterior q(z|x) = N(μ, σ²), a decoder maps z to per-pixel Bernoulli logits, and training
//! minimises the negative ELBO, E_q[−log p(x|z)] + KL(q(z|x) ‖ N(0, I)), in nats per image.
//!
//! - `vae.kind = "mlp"`: the classic PyTorch example, pixels → hidden (ReLU) → μ, log σ²;
//!   z → hidden (ReLU) → pixel logits.
//! - `vae.kind = "conv"`: two stride-2 4×4 convolutions (32, 64 maps, ReLU) → μ, log σ², and
//!   the mirror image with transposed convolutions; image sides divisible by 4.
//!
//! Pixel intensities in [0, 1] are the Bernoulli targets (summed binary cross-entropy), the KL
//! term is analytic, and the reparameterisation noise ε of row r of stream s is
//! [`crate::latent::fill`]'s row r of stream s: a pure function of (seed, s, r), so the step is
//! world-size invariant and resumes exactly. Every layer is initialised as PyTorch's default
//! (weights and biases U(±1/√fan_in)), so `bench/torch_vae.py` builds the same network.
//!
//! `model.conditional = true` (labels `0..k`) gives both networks the label's one-hot y: the
//! encoder reads [x, y] and the decoder [z, y]. The mlp encoder takes y at its first layer
//! (joined to the flattened pixels); the conv encoder at its μ and log σ² heads (joined to the
//! flattened conv features, rather than as k constant input planes, which would cost the
//! convolutions k mostly-zero channels); both decoders at their first layer. Each such layer
//! keeps its unconditional weights and gains y's columns as a bias-free linear map of its own,
//! W·[a; y] = W_a·a + W_y·y, named `<layer>_class` and created after every unconditional
//! variable: an unconditional model keeps exactly its variables and a seed's draws, and a
//! conditional one starts from the same unconditional weights. y's columns take the bound of a
//! PyTorch layer over the concatenation, U(±1/√(fan_in + k)).
//!
//! A conditional VAE neither reconstructs nor scores held-out images: the trait hands those
//! images over without labels, and both need q(z|x, y).

use std::path::Path;

use gantry_config::{Family, Settings, VaeKind};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Reduction, Tensor};

use crate::gan::{averaged_update, load_into, load_moments, save_moments};
use crate::matmul::{Dense, Matmul};
use crate::optim::FlatOptimizer;
use crate::phases::{Phase, PhaseClock};
use crate::precision::Autocast;
use crate::task::{
    BatchSource, GradReduce, Likelihood, ModelShape, Part, StepOutcome, TrainTask, cycled_labels,
};
use crate::{FlatParams, ModelError, OPTIMIZER_FILE, latent};

/// The encoder and decoder's tensors in a checkpoint.
pub const VAE_FILE: &str = "vae.safetensors";

/// Separates the evaluation's importance samples from the training noise.
const IMPORTANCE_SEED: u64 = 0x6977_6165;

/// PyTorch's default initialisation of a layer with `fan_in` inputs.
pub(crate) fn torch_default(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn linear(path: nn::Path<'_>, inputs: i64, outputs: i64, matmul: Matmul) -> Dense {
    let init = torch_default(inputs);
    let layer = nn::linear(
        path,
        inputs,
        outputs,
        nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias: true,
        },
    );
    Dense::new(layer, matmul)
}

fn conv(path: nn::Path<'_>, inputs: i64, outputs: i64) -> nn::Conv2D {
    let init = torch_default(inputs * 16);
    let config = nn::ConvConfig {
        stride: 2,
        padding: 1,
        ws_init: init,
        bs_init: init,
        ..Default::default()
    };
    nn::conv2d(path, inputs, outputs, 4, config)
}

fn deconv(path: nn::Path<'_>, inputs: i64, outputs: i64) -> nn::ConvTranspose2D {
    // PyTorch takes a transposed convolution's fan-in from its weight's second dimension.
    let init = torch_default(outputs * 16);
    let config = nn::ConvTransposeConfig {
        stride: 2,
        padding: 1,
        ws_init: init,
        bs_init: init,
        ..Default::default()
    };
    nn::conv_transpose2d(path, inputs, outputs, 4, config)
}

/// The columns of a layer that read a conditional model's one-hot label (see the module docs).
fn class_columns(
    path: nn::Path<'_>,
    classes: i64,
    outputs: i64,
    fan_in: i64,
    matmul: Matmul,
) -> Dense {
    let layer = nn::linear(
        path,
        classes,
        outputs,
        nn::LinearConfig {
            ws_init: torch_default(fan_in + classes),
            bs_init: None,
            bias: false,
        },
    );
    Dense::new(layer, matmul)
}

/// Checks a conditional (`classes` is `Some`) or unconditional model's `labels` for `rows`
/// images: present exactly when the model is conditional, int64, one per image. Their range is
/// the data's contract ([`ModelShape::labels`]); one out of range still comes back as
/// libtorch's error where the labels are used, not as a panic.
pub(crate) fn check_batch_labels(
    classes: Option<usize>,
    labels: Option<&Tensor>,
    rows: usize,
) -> Result<(), ModelError> {
    match (classes, labels) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(ModelError::Invalid(
            "a conditional model needs labelled batches".into(),
        )),
        (None, Some(_)) => Err(ModelError::Invalid(
            "an unconditional model was given labelled batches".into(),
        )),
        (Some(_), Some(labels)) => {
            if labels.kind() != Kind::Int64 || labels.size() != [rows as i64] {
                return Err(ModelError::Invalid(format!(
                    "labels must be int64, one per image: got {:?} of shape {:?} for {rows} images",
                    labels.kind(),
                    labels.size()
                )));
            }
            Ok(())
        }
    }
}

/// The one-hot label's columns of the layers that read it, in a conditional VAE.
#[derive(Debug)]
struct ClassInputs {
    classes: i64,
    /// The encoder's: of `enc_hidden` (mlp), or of the μ then the log σ² head (conv).
    encoder: Vec<Dense>,
    /// The decoder's first layer's (`dec_hidden` / `dec_expand`).
    decoder: Dense,
}

/// `layer` applied to `[input, y]`: its own weights on `input`, plus y's `columns`.
fn joined(layer: &Dense, input: &Tensor, class: Option<(&Dense, &Tensor)>) -> Tensor {
    let out = layer.forward(input);
    match class {
        Some((columns, y)) => out + columns.forward(y),
        None => out,
    }
}

/// Width of the conv encoder's flattened features: 64 maps of a quarter of each side.
fn conv_features([_, h, w]: [i64; 3]) -> i64 {
    64 * (h / 4) * (w / 4)
}

/// The encoder and decoder of either kind (built once; the size difference is irrelevant).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Networks {
    Mlp {
        hidden: Dense,
        mu: Dense,
        log_var: Dense,
        expand: Dense,
        out: Dense,
    },
    Conv {
        down1: nn::Conv2D,
        down2: nn::Conv2D,
        mu: Dense,
        log_var: Dense,
        expand: Dense,
        up1: nn::ConvTranspose2D,
        up2: nn::ConvTranspose2D,
    },
}

/// The variational autoencoder being trained.
#[derive(Debug)]
pub struct Vae {
    device: Device,
    pub vs: VarStore,
    networks: Networks,
    /// `Some` for a conditional model.
    class_inputs: Option<ClassInputs>,
    pub params: FlatParams,
    pub optimizer: FlatOptimizer,
    /// The latest step's (averaged) flat gradient.
    gradient: Tensor,
    kind: VaeKind,
    latent_dim: usize,
    shape: ModelShape,
    seed: u64,
    host_noise: Vec<f32>,
    /// bf16 forward passes in training steps (`train.precision`); sampling, reconstruction
    /// and the held-out likelihood stay fp32.
    autocast: Autocast,
    pub clock: PhaseClock,
}

impl Vae {
    /// Builds the VAE for `shape` (conditional when `model.conditional`, which needs the
    /// shape's classes), with weights drawn from `train.seed`.
    pub fn new(
        settings: &Settings,
        shape: impl Into<ModelShape>,
        device: Device,
    ) -> Result<Self, ModelError> {
        let shape = shape.into();
        shape.check(settings.model.conditional)?;
        let v = &settings.vae;
        let [c, h, w] = shape.image;
        let pixels = c * h * w;
        let latent = v.latent_dim as i64;
        let hidden = v.hidden as i64;
        let _init = crate::INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(settings.train.seed as i64);
        let vs = VarStore::new(device);
        let root = vs.root();
        let matmul = Matmul::resolve(settings.train.cpu_matmul);
        let networks = match v.kind {
            VaeKind::Mlp => Networks::Mlp {
                hidden: linear(&root / "enc_hidden", pixels, hidden, matmul),
                mu: linear(&root / "enc_mu", hidden, latent, matmul),
                log_var: linear(&root / "enc_log_var", hidden, latent, matmul),
                expand: linear(&root / "dec_hidden", latent, hidden, matmul),
                out: linear(&root / "dec_out", hidden, pixels, matmul),
            },
            VaeKind::Conv => {
                if h % 4 != 0 || w % 4 != 0 {
                    return Err(ModelError::Invalid(format!(
                        "vae.kind = \"conv\" needs image sides divisible by 4 (data.image_size), got {h}×{w}"
                    )));
                }
                let flat = conv_features(shape.image);
                Networks::Conv {
                    down1: conv(&root / "enc_conv1", c, 32),
                    down2: conv(&root / "enc_conv2", 32, 64),
                    mu: linear(&root / "enc_mu", flat, latent, matmul),
                    log_var: linear(&root / "enc_log_var", flat, latent, matmul),
                    expand: linear(&root / "dec_expand", latent, flat, matmul),
                    up1: deconv(&root / "dec_deconv1", 64, 32),
                    up2: deconv(&root / "dec_deconv2", 32, c),
                }
            }
        };
        // After every unconditional variable: their draws stay those of the seed.
        let class_inputs = shape.classes.map(|k| {
            let k = k as i64;
            match v.kind {
                VaeKind::Mlp => ClassInputs {
                    classes: k,
                    encoder: vec![class_columns(
                        &root / "enc_hidden_class",
                        k,
                        hidden,
                        pixels,
                        matmul,
                    )],
                    decoder: class_columns(&root / "dec_hidden_class", k, hidden, latent, matmul),
                },
                VaeKind::Conv => {
                    let flat = conv_features(shape.image);
                    ClassInputs {
                        classes: k,
                        encoder: vec![
                            class_columns(&root / "enc_mu_class", k, latent, flat, matmul),
                            class_columns(&root / "enc_log_var_class", k, latent, flat, matmul),
                        ],
                        decoder: class_columns(&root / "dec_expand_class", k, flat, latent, matmul),
                    }
                }
            }
        });
        let params = FlatParams::new(&vs);
        let t = &settings.train;
        let optimizer = FlatOptimizer::new(t.optimizer, v.lr, v.betas, &params.flat);
        let gradient = params.flat.zeros_like();
        Ok(Self {
            device,
            vs,
            networks,
            class_inputs,
            params,
            optimizer,
            gradient,
            kind: v.kind,
            latent_dim: v.latent_dim,
            shape,
            seed: t.seed,
            host_noise: Vec::new(),
            autocast: Autocast::new(t.precision, device),
            clock: PhaseClock::new(device),
        })
    }

    /// The one-hot (float, `rows × classes`) of `labels` (int64, one per row) that a
    /// conditional model's networks read; `None` for an unconditional model (which must get
    /// no labels). An error for labels that do not fit the model.
    fn condition(
        &self,
        labels: Option<&Tensor>,
        rows: usize,
    ) -> Result<Option<Tensor>, ModelError> {
        check_batch_labels(self.shape.classes, labels, rows)?;
        match (&self.class_inputs, labels) {
            (Some(inputs), Some(labels)) => {
                Ok(Some(labels.f_one_hot(inputs.classes)?.to_kind(Kind::Float)))
            }
            _ => Ok(None),
        }
    }

    /// y's columns of the encoder's layer `i` (see [`ClassInputs::encoder`]) with y, when
    /// conditional. [`Vae::condition`] made `y` for exactly the conditional models.
    fn encoder_class<'a>(
        &'a self,
        i: usize,
        y: Option<&'a Tensor>,
    ) -> Option<(&'a Dense, &'a Tensor)> {
        self.class_inputs
            .as_ref()
            .zip(y)
            .map(|(c, y)| (&c.encoder[i], y))
    }

    /// μ and log σ² of q(z|x) (q(z|x, y) for a conditional model: `labels`, int64, one per
    /// image, exactly when conditional) for intensities `x` (NCHW in [0, 1]).
    pub fn encode(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let y = self.condition(labels, x.size()[0] as usize)?;
        Ok(self.encode_with(x, y.as_ref()))
    }

    /// Per-pixel Bernoulli logits of p(x|z) (p(x|z, y) with `labels` for a conditional model,
    /// as [`Vae::encode`]), NCHW.
    pub fn decode(&self, z: &Tensor, labels: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let y = self.condition(labels, z.size()[0] as usize)?;
        Ok(self.decode_with(z, y.as_ref()))
    }

    /// [`Vae::encode`] with the labels' one-hot `y` from [`Vae::condition`].
    fn encode_with(&self, x: &Tensor, y: Option<&Tensor>) -> (Tensor, Tensor) {
        let n = x.size()[0];
        match &self.networks {
            Networks::Mlp {
                hidden,
                mu,
                log_var,
                ..
            } => {
                let h = joined(hidden, &x.view([n, -1]), self.encoder_class(0, y)).relu();
                (mu.forward(&h), log_var.forward(&h))
            }
            Networks::Conv {
                down1,
                down2,
                mu,
                log_var,
                ..
            } => {
                let h = down2.forward(&down1.forward(x).relu()).relu().view([n, -1]);
                (
                    joined(mu, &h, self.encoder_class(0, y)),
                    joined(log_var, &h, self.encoder_class(1, y)),
                )
            }
        }
    }

    /// [`Vae::decode`] with the labels' one-hot `y` from [`Vae::condition`].
    fn decode_with(&self, z: &Tensor, y: Option<&Tensor>) -> Tensor {
        let n = z.size()[0];
        let [c, h, w] = self.shape.image;
        let class = self
            .class_inputs
            .as_ref()
            .zip(y)
            .map(|(i, y)| (&i.decoder, y));
        match &self.networks {
            Networks::Mlp { expand, out, .. } => out
                .forward(&joined(expand, z, class).relu())
                .view([n, c, h, w]),
            Networks::Conv {
                expand, up1, up2, ..
            } => {
                let h0 = joined(expand, z, class).relu().view([n, 64, h / 4, w / 4]);
                up2.forward(&up1.forward(&h0).relu())
            }
        }
    }

    /// Per-image −log p(x|z) (summed Bernoulli cross-entropy) and KL(q ‖ N(0, I)), in nats,
    /// for intensities `x`, noise `eps` (`n × latent`) and, when conditional, the labels'
    /// one-hot `y`. The training step's: the networks run in `train.precision`; the
    /// sampling of `z`, the KL term and the likelihood take fp32 values.
    fn terms(&self, x: &Tensor, eps: &Tensor, y: Option<&Tensor>) -> (Tensor, Tensor) {
        let (mu, log_var) = self.autocast.run(|| self.encode_with(x, y));
        let (mu, log_var) = (mu.to_kind(Kind::Float), log_var.to_kind(Kind::Float));
        let z = &mu + (&log_var * 0.5).exp() * eps;
        let logits = self.autocast.run(|| self.decode_with(&z, y));
        let reconstruction = self.reconstruction_nats(x, &logits.to_kind(Kind::Float));
        let kl = ((&log_var + 1.0) - mu.square() - log_var.exp()).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Float,
        ) * -0.5;
        (reconstruction, kl)
    }

    fn reconstruction_nats(&self, x: &Tensor, logits: &Tensor) -> Tensor {
        let n = x.size()[0];
        logits
            .binary_cross_entropy_with_logits::<Tensor>(x, None, None, Reduction::None)
            .view([n, -1])
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
    }

    /// Host 8-bit pixels as intensities in [0, 1] on the device.
    fn intensities(&self, images: &[u8]) -> Tensor {
        let [c, h, w] = self.shape.image;
        Tensor::from_slice(images)
            .to_device(self.device)
            .to_kind(Kind::Float)
            .view([-1, c, h, w])
            / 255.0
    }

    fn to_u8(probabilities: &Tensor) -> Vec<u8> {
        let bytes = (probabilities * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8);
        Vec::<u8>::try_from(bytes.to_device(Device::Cpu).reshape([-1])).unwrap_or_default()
    }

    /// Decoder means of z drawn from the prior with [`latent::fixed`]`(seed, n)`, of class
    /// `labels[i]` for image `i` of a conditional model (`None` for an unconditional one).
    fn sample_means(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[u8]>,
    ) -> Result<Vec<u8>, ModelError> {
        const CHUNK: usize = 500;
        let dim = self.latent_dim.max(1);
        let z = latent::fixed(seed, n, self.latent_dim);
        let mut out = Vec::new();
        for (i, chunk) in z.chunks(CHUNK * dim).enumerate() {
            let rows = chunk.len() / dim;
            let labels = labels
                .map(|l| {
                    self.shape
                        .labels(&l[i * CHUNK..i * CHUNK + rows], self.device)
                })
                .transpose()?;
            let y = self.condition(labels.as_ref(), rows)?;
            let z = Tensor::from_slice(chunk)
                .view([rows as i64, self.latent_dim as i64])
                .to_device(self.device);
            out.extend(Self::to_u8(&tch::no_grad(|| {
                self.decode_with(&z, y.as_ref()).sigmoid()
            })));
        }
        Ok(out)
    }

    /// Held-out negative ELBO (with the posterior mean's noise drawn from `IMPORTANCE_SEED`)
    /// and the importance-weighted bound on −log p(x) with `k` samples, nats per image, of an
    /// unconditional model.
    fn heldout(&self, images: &[u8], k: usize) -> Likelihood {
        let pixels: i64 = self.shape.image.iter().product();
        let n = images.len() / pixels as usize;
        let dim = self.latent_dim;
        let (mut elbo_sum, mut nll_sum) = (0.0, 0.0);
        let chunk_rows = (20_000 / k.max(1)).clamp(1, 500);
        tch::no_grad(|| {
            for first in (0..n).step_by(chunk_rows) {
                let rows = chunk_rows.min(n - first);
                let x =
                    self.intensities(&images[first * pixels as usize..][..rows * pixels as usize]);
                let (mu, log_var) = self.encode_with(&x, None);
                let std = (&log_var * 0.5).exp();
                // k noise draws per image: stream j of the evaluation seed, rows = images.
                let mut log_weights = Vec::with_capacity(k);
                let mut noise = Vec::new();
                for j in 0..k.max(1) {
                    latent::fill(IMPORTANCE_SEED, j as u64, dim, first, rows, &mut noise);
                    let eps = Tensor::from_slice(&noise)
                        .view([rows as i64, dim as i64])
                        .to_device(self.device);
                    let z = &mu + &std * &eps;
                    let log_px_z = -self.reconstruction_nats(&x, &self.decode_with(&z, None));
                    let sum1 = |t: Tensor| t.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
                    // log N(z; 0, I) − log N(z; μ, σ²); the 2π terms cancel.
                    let log_pz = sum1(z.square()) * -0.5;
                    let log_qz = sum1(eps.square() + &log_var) * -0.5;
                    if j == 0 {
                        let kl = sum1((&log_var + 1.0) - mu.square() - log_var.exp()) * -0.5;
                        elbo_sum += (-&log_px_z + kl).sum(Kind::Double).double_value(&[]);
                    }
                    log_weights.push(log_px_z + log_pz - log_qz);
                }
                let stacked = Tensor::stack(&log_weights, 1);
                let log_px = stacked.logsumexp([1i64].as_slice(), false) - (k.max(1) as f64).ln();
                nll_sum -= log_px.sum(Kind::Double).double_value(&[]);
            }
        });
        let nll = nll_sum / n.max(1) as f64;
        Likelihood {
            neg_elbo_nats: elbo_sum / n.max(1) as f64,
            nll_nats: nll,
            bits_per_dim: nll / (pixels as f64 * std::f64::consts::LN_2),
            images: n,
        }
    }
}

impl TrainTask for Vae {
    fn family(&self) -> Family {
        Family::Vae
    }

    fn describe(&self) -> String {
        match self.shape.classes {
            None => format!("{} VAE (latent {})", self.kind, self.latent_dim),
            Some(k) => format!(
                "conditional {} VAE (latent {}, {k} classes)",
                self.kind, self.latent_dim
            ),
        }
    }

    fn parts(&self) -> Vec<Part<'_>> {
        vec![Part {
            name: "vae",
            params: &self.params,
            vs: &self.vs,
            optimizer: &self.optimizer,
        }]
    }

    fn step(
        &mut self,
        data: &mut dyn BatchSource,
        reduce: &mut dyn GradReduce,
    ) -> Result<StepOutcome, ModelError> {
        let batch = data.batch(0)?;
        let rows = usize::try_from(batch.images.size()[0]).unwrap_or(0);
        let y = self.condition(batch.labels.as_ref(), rows)?;
        let x = (&batch.images + 1.0) * 0.5;
        latent::fill(
            self.seed,
            batch.stream,
            self.latent_dim,
            batch.first_row,
            rows,
            &mut self.host_noise,
        );
        let eps = Tensor::from_slice(&self.host_noise)
            .view([rows as i64, self.latent_dim as i64])
            .to_device(self.device);
        self.clock.lap(Phase::Data);
        let (reconstruction, kl) = self.terms(&x, &eps, y.as_ref());
        let loss = (&reconstruction + &kl).mean(Kind::Float);
        let applied = averaged_update(
            &loss,
            &self.params,
            &mut self.optimizer,
            &self.gradient,
            &mut self.clock,
            reduce,
        )?;
        Ok(StepOutcome {
            applied,
            statistics: tch::no_grad(|| {
                vec![
                    ("neg_elbo", loss.detach()),
                    ("reconstruction", reconstruction.mean(Kind::Float)),
                    ("kl", kl.mean(Kind::Float)),
                ]
            }),
        })
    }

    fn gradients(&self) -> Vec<(&'static str, Tensor)> {
        vec![("vae", self.gradient.shallow_clone())]
    }

    fn classes(&self) -> Option<usize> {
        self.shape.classes
    }

    /// Decoder means of z drawn from the prior with [`latent::fixed`]`(seed, n)` (of the
    /// classes of [`cycled_labels`] when conditional).
    fn sample_u8(&self, n: usize, seed: u64) -> Vec<u8> {
        let labels = self.shape.classes.map(|k| cycled_labels(n, k));
        self.sample_means(n, seed, labels.as_deref())
            .expect("cycled labels are within the model's classes")
    }

    fn sample_labelled_u8(&self, labels: &[u8], seed: u64) -> Result<Vec<u8>, ModelError> {
        // Refused for an unconditional model, or on a class out of range, before any work.
        self.shape.check_labels(labels)?;
        self.sample_means(labels.len(), seed, Some(labels))
    }

    /// Original, reconstruction (from the posterior mean), original, … image by image; `None`
    /// for a conditional model, whose encoder needs the images' labels.
    fn reconstruct_u8(&self, images: &[u8]) -> Option<Vec<u8>> {
        if self.shape.classes.is_some() {
            return None;
        }
        let pixels = self.shape.image.iter().product::<i64>() as usize;
        let x = self.intensities(images);
        let again = Self::to_u8(&tch::no_grad(|| {
            self.decode_with(&self.encode_with(&x, None).0, None)
                .sigmoid()
        }));
        Some(
            images
                .chunks(pixels)
                .zip(again.chunks(pixels))
                .flat_map(|(a, b)| a.iter().chain(b).copied())
                .collect(),
        )
    }

    fn likelihood(
        &self,
        images: &[u8],
        settings: &Settings,
    ) -> Option<Result<Likelihood, ModelError>> {
        // A conditional model's bound needs q(z|x, y), and the images come without labels.
        if self.shape.classes.is_some() {
            return None;
        }
        Some(Ok(self.heldout(images, settings.eval.importance_samples)))
    }

    fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.vs.save(dir.join(VAE_FILE))?;
        save_moments(&[("vae", &self.optimizer)], &dir.join(OPTIMIZER_FILE))
    }

    fn load(&mut self, dir: &Path) -> Result<(), ModelError> {
        load_into(&self.vs, &dir.join(VAE_FILE))?;
        load_moments(&[("vae", &self.optimizer)], &dir.join(OPTIMIZER_FILE))
    }

    fn set_optimizer_steps(&mut self, name: &str, steps: u64) -> Result<(), ModelError> {
        if name != "vae" {
            return Err(ModelError::Invalid(format!("the VAE has no part `{name}`")));
        }
        self.optimizer.step = steps;
        Ok(())
    }

    fn clock(&mut self) -> &mut PhaseClock {
        &mut self.clock
    }

    fn device(&self) -> Device {
        self.device
    }

    fn image_shape(&self) -> [i64; 3] {
        self.shape.image
    }
}
