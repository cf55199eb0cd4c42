//! Gantry's GAN engine on libtorch: networks, losses, optimisers and the latent stream.
//!
//! - [`runtime`] prepares libtorch for a process: intra-op threads and, where a GPU and the
//!   CUDA libraries are present, loading `libtorch_cuda.so` (which the linker would otherwise
//!   drop, leaving CUDA invisible).
//! - [`mlp`] holds the classic MLP GAN, [`dcgan`] the convolutional one; [`Gan`] bundles a generator and a discriminator, each
//!   in its own `VarStore` whose trainable parameters live in one flat tensor, so that gradient
//!   all-reduce and the optimiser step each touch one contiguous buffer per network.
//!   [`Gan`] also keeps an EMA copy of the generator (samples and evaluation use it), skips
//!   updates whose averaged gradient is non-finite, and saves/loads its tensors.
//! - [`loss`] and [`optim`] are the objectives and the (flat) optimisers.
//! - [`latent`] makes the latent batch of a global step as a pure function of (seed, step), so
//!   that data-parallel runs do not depend on the world size and resumed runs replay exactly.
//!
//! This crate never opens a socket: moving gradients between ranks is the worker's job.

pub mod activation;
pub mod conditional;
pub mod dcgan;
pub mod latent;
pub mod loss;
pub mod matmul;
pub mod mlp;
pub mod optim;
pub mod phases;
pub mod pixelcnn;
pub mod precision;
pub mod runtime;
pub mod task;
pub mod vae;

mod flat;
mod gan;
mod shim;

pub use flat::{FlatParams, all_finite, gather_pieces};
pub use gan::{
    DISCRIMINATOR_FILE, Ema, GENERATOR_EMA_FILE, GENERATOR_FILE, Gan, HostStats, Network,
    OPTIMIZER_FILE, StepInput, StepStats, StepSync, buffers, ema_decay_at, ema_update,
};

/// Held while a model draws its initial weights from libtorch's global generator (seeded
/// with `train.seed` first), so models built concurrently in one process (tests, ranks as
/// threads) each get exactly their seed's weights, whatever their family.
pub(crate) static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A failure of what a step calls out to: the collective, the data.
    #[error(transparent)]
    External(#[from] task::ExternalError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("device `cuda` requested, but libtorch sees no CUDA device ({0})")]
    NoCuda(String),
    #[error("{0}")]
    Invalid(String),
}
