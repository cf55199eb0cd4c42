//! Gantry's configuration: one typed [`Settings`] tree, filled in layers.
//!
//! Later layers win: built-in defaults < a TOML file (`--config FILE`) < environment variables
//! `GANTRY__SECTION__KEY` < the CLI's own flags < `--set section.key=value`. Unknown keys and
//! invalid values are errors that name the key, so a typo never silently trains with a default.
//!
//! The same tree is what a worker writes to `RUN_DIR/config.toml`, and what the cluster hashes
//! ([`Settings::fingerprint`]) to refuse workers that would train something else.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod cli;
mod layers;

pub use cli::ConfigArgs;

pub use layers::{Overrides, VAE_BATCH_SIZE, load};

/// Everything that can go wrong while assembling or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Layering(String),
    #[error("invalid --set {arg:?}: expected section.key=value")]
    BadOverride { arg: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("could not serialise the configuration: {0}")]
    Serialise(String),
}

/// The whole configuration of a Gantry job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Settings {
    pub train: Train,
    pub model: Model,
    pub data: Data,
    pub checkpoint: Checkpoint,
    pub samples: Samples,
    pub run: Run,
    pub collective: CollectiveSettings,
    pub cluster: Cluster,
    pub metrics: Metrics,
    pub logging: Logging,
    pub eval: Eval,
    /// The variational autoencoder's keys (`model.family = "vae"` only).
    pub vae: VaeSettings,
    /// The autoregressive model's keys (`model.family = "autoregressive"` only).
    pub autoregressive: AutoregressiveSettings,
}

/// Quality evaluation (FID / Inception Score against an MNIST classifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Eval {
    /// Generated images scored at the end of a run (0 = no evaluation).
    pub samples: usize,
    /// Also evaluate every this many steps (0 = only at the end).
    pub every: u64,
    /// Importance samples per held-out image for a VAE's likelihood bound (IWAE).
    pub importance_samples: usize,
}

impl Default for Eval {
    fn default() -> Self {
        Self {
            samples: 1000,
            every: 0,
            importance_samples: 100,
        }
    }
}

/// A variational autoencoder: an encoder to a Gaussian latent, a Bernoulli decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeSettings {
    /// `mlp` (784→hidden→μ, log σ²) or `conv` (strided convolutions sized like the DCGAN).
    pub kind: VaeKind,
    pub latent_dim: usize,
    /// Width of the MLP's hidden layer.
    pub hidden: usize,
    pub lr: f64,
    pub betas: [f64; 2],
}

impl Default for VaeSettings {
    fn default() -> Self {
        Self {
            kind: VaeKind::Mlp,
            latent_dim: 20,
            hidden: 400,
            lr: 1e-3,
            betas: [0.9, 0.999],
        }
    }
}

/// A PixelCNN over pixels in raster order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoregressiveSettings {
    /// Feature maps of every masked layer.
    pub channels: usize,
    /// Residual blocks of masked 3×3 type-B convolutions after the 7×7 type-A one.
    pub residual_blocks: usize,
    /// `bernoulli` (dynamically binarised pixels) or `softmax` (256-way, 8-bit intensities).
    pub output: PixelOutput,
    pub lr: f64,
    pub betas: [f64; 2],
}

impl Default for AutoregressiveSettings {
    fn default() -> Self {
        Self {
            channels: 32,
            residual_blocks: 5,
            output: PixelOutput::Bernoulli,
            lr: 1e-3,
            betas: [0.9, 0.999],
        }
    }
}

/// Optimisation and the training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Train {
    /// Global steps to train (one step updates D and G once).
    pub steps: u64,
    /// Images per worker per step; the global batch is `batch_size × world size`.
    pub batch_size: usize,
    /// Images per step over the whole group; 0 = `batch_size ×` the requested worker count.
    /// It stays fixed when an elastic group shrinks (`cluster.min_workers`): the ranks
    /// present split it in contiguous slices that differ by at most one image, so data
    /// order, latents and the averaged gradient are those of the full group.
    pub global_batch_size: usize,
    /// Seeds initial weights, the data order and every latent batch.
    pub seed: u64,
    pub lr_g: f64,
    pub lr_d: f64,
    /// Adam's (beta1, beta2).
    pub betas: [f64; 2],
    pub optimizer: Optimizer,
    pub loss: Loss,
    pub schedule: Schedule,
    /// libtorch intra-op threads per worker; 0 = the machine's cores divided by the workers on it.
    pub threads: usize,
    /// Log a metrics line every this many steps.
    pub log_every: u64,
    /// Weight of the WGAN-GP gradient penalty (`loss = "wgan-gp"` only).
    pub gp_weight: f64,
    /// Critic (D) updates per generator update. Each critic update takes its own batch: step
    /// `s` (0-based) consumes data/latent/interpolation sub-streams `s × n_critic + i` for
    /// `i = 0..n_critic`, and G updates with the last one's latents. 5 is usual for WGAN-GP.
    pub n_critic: u32,
    /// Decay of the generator's exponential moving average (samples and evaluation use it);
    /// 0 disables it.
    pub ema_decay: f64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each one's
    /// update is skipped), after writing a checkpoint of the last good state.
    pub max_nonfinite: u32,
    /// Arithmetic of the forward passes: `fp32`, or `bf16` (autocast: matrix products and
    /// convolutions in bfloat16, parameters, gradients, losses and optimiser state in fp32).
    pub precision: Precision,
    /// Whether CUDA float32 convolutions (cuDNN) may use TF32 tensor cores: `true` keeps
    /// libtorch's defaults (cuDNN convolutions in TF32, cuBLAS matmuls in full fp32); `false`
    /// turns TF32 off for both cuDNN and cuBLAS. Set once per worker process at start; no
    /// effect on the CPU.
    pub tf32: bool,
    /// Which library multiplies the fully connected layers' fp32 matrices on a CPU: `blas`
    /// (libtorch's, MKL on x86), `onednn` (oneDNN's matmul, the same fp32 arithmetic), or
    /// `auto`: oneDNN on x86 CPUs not made by Intel, whose AVX-512 MKL leaves unused, the
    /// BLAS elsewhere. No effect on a GPU or under bf16 autocast.
    pub cpu_matmul: CpuMatmul,
}

impl Default for Train {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 64,
            global_batch_size: 0,
            seed: 42,
            lr_g: 1e-3,
            lr_d: 1e-3,
            betas: [0.5, 0.999],
            optimizer: Optimizer::Adam,
            loss: Loss::Bce,
            schedule: Schedule::Simultaneous,
            threads: 0,
            log_every: 10,
            gp_weight: 10.0,
            n_critic: 1,
            ema_decay: 0.999,
            max_nonfinite: 20,
            precision: Precision::Fp32,
            tf32: true,
            cpu_matmul: CpuMatmul::Auto,
        }
    }
}

/// The networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Model {
    /// Which generative model is trained: `gan`, `vae` or `autoregressive`. `model.kind`,
    /// `model.latent_dim`, `model.batch_norm` and the GAN's `train.*` keys are the GAN's;
    /// the other families have sections of their own (`[vae]`, `[autoregressive]`).
    pub family: Family,
    pub kind: ModelKind,
    pub latent_dim: usize,
    pub batch_norm: bool,
    /// Class-conditional generation, for every family: the data set's labels go into the
    /// model (the GAN's generator and projection discriminator, the VAE's encoder and decoder,
    /// a class bias in each autoregressive layer), samples are drawn by class, and the class
    /// names are saved in every checkpoint. Needs a labelled data set: the MNIST family's
    /// label files, or a `folder:` set with one sub-folder per class.
    pub conditional: bool,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            family: Family::Gan,
            kind: ModelKind::Mlp,
            latent_dim: 100,
            batch_norm: true,
            conditional: false,
        }
    }
}

/// Where the training images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Data {
    /// `mnist-10k` (embedded), `mnist` or `fashion-mnist` (downloaded once, then cached).
    pub dataset: Dataset,
    /// Download cache; empty = `$XDG_CACHE_HOME/gantry/data` or `~/.cache/gantry/data`.
    pub cache_dir: String,
    /// Mirror base URLs tried in order for downloaded data sets; empty = the built-in list.
    pub mirror: Vec<String>,
    /// Side of the square training images of a `folder:` data set (files are resized on the
    /// shortest side, then centre-cropped). The MNIST family is 28 × 28 and needs 28.
    pub image_size: usize,
    /// 1 (grey) or 3 (RGB) for a `folder:` data set; the MNIST family needs 1.
    pub channels: usize,
    /// A `folder:` data set skips (with a warning) at most this many unreadable files.
    pub max_bad_files: usize,
}

impl Default for Data {
    fn default() -> Self {
        Self {
            dataset: Dataset::Mnist10k,
            cache_dir: String::new(),
            mirror: Vec::new(),
            image_size: 28,
            channels: 1,
            max_bad_files: 10,
        }
    }
}

impl Data {
    /// `[channels, height, width]` of the training images: what the networks are built for.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// The download cache directory after applying the default.
    pub fn resolved_cache_dir(&self) -> PathBuf {
        if !self.cache_dir.is_empty() {
            return PathBuf::from(&self.cache_dir);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("gantry").join("data")
    }
}

/// Checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checkpoint {
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub every: u64,
    /// Keep this many newest checkpoints.
    pub keep: usize,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            every: 500,
            keep: 3,
        }
    }
}

/// Sample grids written while training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Samples {
    /// Write `samples/step-NNNNNNNN.png` every this many steps (0 = only at the end).
    pub every: u64,
}

impl Default for Samples {
    fn default() -> Self {
        Self { every: 250 }
    }
}

/// Where and on what a run executes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Run {
    pub dir: PathBuf,
    pub device: DeviceChoice,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/latest"),
            device: DeviceChoice::Auto,
        }
    }
}

/// Gradient exchange between data-parallel ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectiveSettings {
    /// Gradients are all-reduced in buckets of at most this many MiB.
    pub bucket_mb: f64,
    /// Compare a checksum of every rank's parameters every this many steps (0 = never).
    pub verify_every: u64,
    /// Seconds any collective operation may wait for a peer before failing.
    pub timeout: f64,
    /// Ring backend: all-reduce through one shared-memory region when every rank is on the
    /// same host (and can map `/dev/shm`), instead of loopback TCP.
    pub shared_memory: bool,
}

impl Default for CollectiveSettings {
    fn default() -> Self {
        Self {
            bucket_mb: 25.0,
            verify_every: 100,
            timeout: 60.0,
            shared_memory: true,
        }
    }
}

/// The coordinator and its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// `auto` (nccl on CUDA devices, ring otherwise), `ring` or `nccl`.
    pub backend: Backend,
    /// The coordinator's gRPC listen address.
    pub listen: String,
    /// Join token every worker RPC must carry; empty = generated per job (local workers only).
    pub token: String,
    /// Operator token the `Status` and `Control` RPCs (`coordinator status|pause|resume|
    /// checkpoint|stop`) must carry instead, so that a worker (which holds only the join
    /// token) cannot stop or steer the job; empty = generated per job and written to
    /// `RUN_DIR/operator-token` (readable by its owner only).
    pub operator_token: String,
    /// Seconds between worker heartbeats.
    pub heartbeat_interval: f64,
    /// A worker silent for this many seconds is declared failed.
    pub heartbeat_timeout: f64,
    /// Restarts of the whole group from the newest checkpoint before the job fails.
    pub max_restarts: u32,
    /// Fewest workers a generation may run with; 0 = the requested count (no shrinking).
    /// When a worker is lost and no replacement joins within `rejoin_grace` seconds, the
    /// next generation restarts from the newest checkpoint with the survivors, if there are
    /// at least this many.
    pub min_workers: u32,
    /// Seconds a generation that lost workers waits for replacements before it shrinks to
    /// the survivors (with `min_workers` below the requested count).
    pub rejoin_grace: f64,
    /// Seconds to wait for all workers to join.
    pub rendezvous_timeout: f64,
    /// Port of each worker's ring all-reduce listener (0 = any free port).
    pub ring_port: u16,
    /// TLS on the gRPC port: this side's certificate chain (PEM); empty = plaintext.
    pub tls_cert: String,
    /// This side's private key (PEM), with `tls_cert`.
    pub tls_key: String,
    /// CA bundle (PEM): the coordinator requires client certificates signed by it (mutual
    /// TLS); workers verify the coordinator against it.
    pub tls_ca: String,
    /// The name workers expect in the coordinator's certificate (default: the URL's host).
    pub tls_domain: String,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            listen: "0.0.0.0:7070".into(),
            token: String::new(),
            operator_token: String::new(),
            heartbeat_interval: 1.0,
            heartbeat_timeout: 10.0,
            max_restarts: 3,
            min_workers: 0,
            rejoin_grace: 30.0,
            rendezvous_timeout: 300.0,
            ring_port: 7071,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            tls_domain: String::new(),
        }
    }
}

/// Prometheus endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// The coordinator's HTTP address (/metrics, /healthz, /readyz, status page).
    pub addr: String,
    /// Each worker's HTTP address (/metrics, /healthz); port 0 = any free port.
    pub worker_addr: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:9090".into(),
            worker_addr: "0.0.0.0:9091".into(),
        }
    }
}

/// What rank 0 writes into the run directory for other tools, beside `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    /// TensorBoard event files in `RUN_DIR/tensorboard/`: every `metrics.jsonl` scalar, the
    /// step phases, gradient norms, quality figures and sample grids, at the same steps.
    pub tensorboard: bool,
}

impl Default for Logging {
    fn default() -> Self {
        Self { tensorboard: true }
    }
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every accepted spelling, for error messages and docs.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("{other:?} is not one of {}", Self::NAMES.join(", "))),
                }
            }
        }
    };
}

string_enum!(
    /// The GAN objective.
    Loss { Bce = "bce", Hinge = "hinge", WganGp = "wgan-gp" }
);
string_enum!(
    /// How D and G updates interleave within a step.
    Schedule { Simultaneous = "simultaneous", Alternating = "alternating" }
);
string_enum!(
    /// The optimiser used for both networks.
    Optimizer { Adam = "adam", Sgd = "sgd" }
);
string_enum!(
    /// Arithmetic of the forward passes (see [`Train::precision`]).
    Precision { Fp32 = "fp32", Bf16 = "bf16" }
);
string_enum!(
    /// The library of fp32 CPU matrix products (see [`Train::cpu_matmul`]).
    CpuMatmul { Auto = "auto", Blas = "blas", Onednn = "onednn" }
);
string_enum!(
    /// The GAN's networks.
    ModelKind { Mlp = "mlp", Dcgan = "dcgan" }
);
string_enum!(
    /// The generative model family a run trains.
    Family { Gan = "gan", Vae = "vae", Autoregressive = "autoregressive" }
);
string_enum!(
    /// The VAE's encoder and decoder.
    VaeKind { Mlp = "mlp", Conv = "conv" }
);
string_enum!(
    /// The autoregressive model's per-pixel distribution.
    PixelOutput { Bernoulli = "bernoulli", Softmax = "softmax" }
);
string_enum!(
    /// Which device a worker trains on.
    DeviceChoice { Auto = "auto", Cpu = "cpu", Cuda = "cuda" }
);
string_enum!(
    /// The gradient all-reduce backend.
    Backend { Auto = "auto", Ring = "ring", Nccl = "nccl" }
);
/// The training data set: `mnist-10k` (embedded), `mnist`, `fashion-mnist`, or `folder:PATH`
/// (PNG/JPEG files under PATH). Serialised as exactly these strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dataset {
    Mnist10k,
    Mnist,
    FashionMnist,
    Folder(PathBuf),
}

impl Dataset {
    /// Every accepted spelling, for error messages and docs.
    pub const NAMES: &'static [&'static str] =
        &["mnist-10k", "mnist", "fashion-mnist", "folder:PATH"];
    const FOLDER_PREFIX: &'static str = "folder:";
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mnist10k => f.write_str("mnist-10k"),
            Self::Mnist => f.write_str("mnist"),
            Self::FashionMnist => f.write_str("fashion-mnist"),
            Self::Folder(path) => write!(f, "{}{}", Self::FOLDER_PREFIX, path.display()),
        }
    }
}

impl std::str::FromStr for Dataset {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "mnist-10k" => Ok(Self::Mnist10k),
            "mnist" => Ok(Self::Mnist),
            "fashion-mnist" => Ok(Self::FashionMnist),
            other => match other.strip_prefix(Self::FOLDER_PREFIX) {
                Some("") => Err("folder: needs a path, e.g. folder:/data/faces".into()),
                Some(path) => Ok(Self::Folder(PathBuf::from(path))),
                None => Err(format!(
                    "{other:?} is not one of {}",
                    Self::NAMES.join(", ")
                )),
            },
        }
    }
}

impl Serialize for Dataset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dataset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// Checks relations serde cannot express. Errors name the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        let t = &self.train;
        if t.steps == 0 {
            return invalid("train.steps", "must be at least 1");
        }
        if t.batch_size == 0 {
            return invalid("train.batch_size", "must be at least 1");
        }
        for (key, lr) in [("train.lr_g", t.lr_g), ("train.lr_d", t.lr_d)] {
            if !(lr.is_finite() && lr > 0.0) {
                return invalid(key, &format!("must be a positive number, got {lr}"));
            }
        }
        if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return invalid(
                "train.betas",
                &format!("each beta must be in [0, 1), got {:?}", t.betas),
            );
        }
        if t.log_every == 0 {
            return invalid("train.log_every", "must be at least 1");
        }
        if !(t.gp_weight.is_finite() && t.gp_weight >= 0.0) {
            return invalid(
                "train.gp_weight",
                &format!("must be a non-negative number, got {}", t.gp_weight),
            );
        }
        if t.n_critic == 0 {
            return invalid("train.n_critic", "must be at least 1");
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return invalid(
                "train.ema_decay",
                &format!("must be in [0, 1) (0 disables), got {}", t.ema_decay),
            );
        }
        if t.max_nonfinite == 0 {
            return invalid("train.max_nonfinite", "must be at least 1");
        }
        let d = &self.data;
        if !(d.channels == 1 || d.channels == 3) {
            return invalid(
                "data.channels",
                &format!("must be 1 (grey) or 3 (RGB), got {}", d.channels),
            );
        }
        if d.image_size < 4 {
            return invalid(
                "data.image_size",
                &format!("must be at least 4, got {}", d.image_size),
            );
        }
        if !matches!(d.dataset, Dataset::Folder(_)) {
            // The MNIST family has one shape; saying so here keeps config.toml a complete
            // description of the networks (the evaluator rebuilds them from it).
            if d.image_size != 28 {
                return invalid(
                    "data.image_size",
                    &format!("{} images are 28 × 28, got {}", d.dataset, d.image_size),
                );
            }
            if d.channels != 1 {
                return invalid(
                    "data.channels",
                    &format!(
                        "{} images are grey (1 channel), got {}",
                        d.dataset, d.channels
                    ),
                );
            }
        }
        if self.model.latent_dim == 0 {
            return invalid("model.latent_dim", "must be at least 1");
        }
        self.validate_family()?;
        if self.checkpoint.keep < 2 {
            return invalid(
                "checkpoint.keep",
                "must be at least 2, so a torn newest checkpoint never leaves none",
            );
        }
        let c = &self.collective;
        if !(c.bucket_mb.is_finite() && c.bucket_mb > 0.0) {
            return invalid("collective.bucket_mb", "must be a positive number of MiB");
        }
        if !(c.timeout.is_finite() && c.timeout > 0.0) {
            return invalid("collective.timeout", "must be a positive number of seconds");
        }
        let k = &self.cluster;
        for (key, secs) in [
            ("cluster.heartbeat_interval", k.heartbeat_interval),
            ("cluster.heartbeat_timeout", k.heartbeat_timeout),
            ("cluster.rendezvous_timeout", k.rendezvous_timeout),
            ("cluster.rejoin_grace", k.rejoin_grace),
        ] {
            if !(secs.is_finite() && secs > 0.0) {
                return invalid(
                    key,
                    &format!("must be a positive number of seconds, got {secs}"),
                );
            }
        }
        if k.heartbeat_timeout <= k.heartbeat_interval {
            return invalid(
                "cluster.heartbeat_timeout",
                "must be longer than cluster.heartbeat_interval",
            );
        }
        if k.tls_cert.is_empty() != k.tls_key.is_empty() {
            return invalid(
                "cluster.tls_key",
                "cluster.tls_cert and cluster.tls_key go together",
            );
        }
        for (key, path) in [
            ("cluster.tls_cert", &k.tls_cert),
            ("cluster.tls_key", &k.tls_key),
            ("cluster.tls_ca", &k.tls_ca),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return invalid(key, &format!("no such file: {path}"));
            }
        }
        if self.run.dir.as_os_str().is_empty() {
            return invalid("run.dir", "must not be empty");
        }
        Ok(())
    }

    /// Keys of one family set while another is trained are errors naming the key: the run
    /// would silently ignore them. "Set" means changed from its default, so a complete
    /// `config.toml` (which lists every key) reads back for any family.
    fn validate_family(&self) -> Result<(), ConfigError> {
        let family = self.model.family;
        let defaults = Settings::default();
        let gan_keys: [(&'static str, bool); 11] = [
            ("model.kind", self.model.kind != defaults.model.kind),
            (
                "model.latent_dim",
                self.model.latent_dim != defaults.model.latent_dim,
            ),
            (
                "model.batch_norm",
                self.model.batch_norm != defaults.model.batch_norm,
            ),
            ("train.lr_g", self.train.lr_g != defaults.train.lr_g),
            ("train.lr_d", self.train.lr_d != defaults.train.lr_d),
            ("train.betas", self.train.betas != defaults.train.betas),
            ("train.loss", self.train.loss != defaults.train.loss),
            (
                "train.schedule",
                self.train.schedule != defaults.train.schedule,
            ),
            (
                "train.gp_weight",
                self.train.gp_weight != defaults.train.gp_weight,
            ),
            (
                "train.n_critic",
                self.train.n_critic != defaults.train.n_critic,
            ),
            (
                "train.ema_decay",
                self.train.ema_decay != defaults.train.ema_decay,
            ),
        ];
        let sections: [(Family, &'static str, bool); 2] = [
            (Family::Vae, "vae", self.vae != defaults.vae),
            (
                Family::Autoregressive,
                "autoregressive",
                self.autoregressive != defaults.autoregressive,
            ),
        ];
        let misplaced = |key: &'static str, owner: Family| ConfigError::Invalid {
            key,
            message: format!(
                "applies to model.family = \"{owner}\" only, and this run trains \"{family}\""
            ),
        };
        if family != Family::Gan
            && let Some((key, _)) = gan_keys.iter().find(|(_, set)| *set)
        {
            return Err(misplaced(key, Family::Gan));
        }
        for (owner, section, set) in sections {
            if set && owner != family {
                return Err(misplaced(section, owner));
            }
        }
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let v = &self.vae;
        if v.latent_dim == 0 {
            return invalid("vae.latent_dim", "must be at least 1".into());
        }
        if v.hidden == 0 {
            return invalid("vae.hidden", "must be at least 1".into());
        }
        let a = &self.autoregressive;
        if a.channels < 2 {
            return invalid("autoregressive.channels", "must be at least 2".into());
        }
        for (key, lr) in [("vae.lr", v.lr), ("autoregressive.lr", a.lr)] {
            if !(lr.is_finite() && lr > 0.0) {
                return invalid(key, format!("must be a positive number, got {lr}"));
            }
        }
        for (key, betas) in [("vae.betas", v.betas), ("autoregressive.betas", a.betas)] {
            if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
                return invalid(key, format!("each beta must be in [0, 1), got {betas:?}"));
            }
        }
        Ok(())
    }

    /// Reads settings from TOML text alone (e.g. a coordinator's effective configuration),
    /// with the same unknown-key and value checks as [`load`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let settings: Settings =
            toml::from_str(text).map_err(|e| ConfigError::Layering(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The configuration as TOML, as written to `RUN_DIR/config.toml`.
    /// The join and operator tokens are left out: run directories and the configuration
    /// handed to workers must not leak them; each process takes them from its own environment
    /// or file.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        shown.cluster.token.clear();
        shown.cluster.operator_token.clear();
        toml::to_string_pretty(&shown).map_err(|e| ConfigError::Serialise(e.to_string()))
    }

    /// SHA-256 (hex) of everything that shapes what is trained. `run`, `cluster`, `metrics`
    /// and `logging` (where, on which device, behind which address, seen how) and
    /// `train.threads` (each host's CPU share) are left out: two workers on different hosts
    /// and devices train the same job.
    pub fn fingerprint(&self) -> String {
        let mut shaping = self.clone();
        shaping.train.threads = 0;
        shaping.run = Run::default();
        shaping.cluster = Cluster::default();
        shaping.metrics = Metrics::default();
        shaping.logging = Logging::default();
        shaping.eval = Eval::default();
        let canonical = serde_json::to_vec(&shaping).unwrap_or_default();
        hex::encode(Sha256::digest(canonical))
    }
}

#[cfg(test)]
mod tests;
