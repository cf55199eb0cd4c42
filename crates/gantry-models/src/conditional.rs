//! Class conditioning of the GAN (`model.conditional = true`).
//!
//! - Generator: G(z, y) = G'([z, e_y]): a learned embedding of the label, [`EMBEDDING_DIM`]
//!   wide, concatenated to the latent; G' is the unconditional architecture built for
//!   `latent_dim + EMBEDDING_DIM` inputs.
//! - Discriminator: a projection discriminator (Miyato & Koyama, "cGANs with Projection
//!   Discriminator", 2018): D(x, y) = ψ(φ(x)) + ⟨p_y, φ(x)⟩, with φ the unconditional
//!   discriminator's features before its last linear layer ψ, and p a learned embedding of
//!   the label as wide as φ. Unlike concatenating the label to the input, the label enters
//!   D's logit as an inner product, which is what keeps class-conditional FIDs near the
//!   unconditional ones.
//!
//! An unconditional model builds exactly the variables it always had (same names, same
//! random draws for a seed): the embeddings are created only when conditional, under names
//! of their own (`class_embedding`, `class_projection`).

use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

/// Width of the generator's label embedding.
pub const EMBEDDING_DIM: i64 = 50;

/// A discriminator split at its last linear layer, so a projection can join the logit.
pub trait Critic: std::fmt::Debug + Send {
    /// φ(x): `rows × feature_dim` features of `images` (NCHW).
    fn features(&self, images: &Tensor) -> Tensor;
    /// ψ(φ): one logit per row, shape `[rows]`.
    fn head(&self, features: &Tensor) -> Tensor;
    /// Width of [`Critic::features`].
    fn feature_dim(&self) -> i64;
}

/// Glorot-uniform, the scale of the networks' own layers: a projection that starts small
/// leaves the early logits to ψ, as an unconditional model's.
fn glorot(rows: i64, cols: i64) -> nn::Init {
    let bound = (6.0 / (rows + cols) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn embedding(path: nn::Path<'_>, classes: i64, dim: i64) -> nn::Embedding {
    let config = nn::EmbeddingConfig {
        ws_init: glorot(classes, dim),
        ..Default::default()
    };
    nn::embedding(path, classes, dim, config)
}

/// The generator, conditional or not.
#[derive(Debug)]
pub struct Generator {
    net: Box<dyn ModuleT>,
    /// `Some` for a conditional generator.
    embedding: Option<nn::Embedding>,
}

impl Generator {
    /// Wraps `net`, built for `latent_dim + EMBEDDING_DIM` inputs when `classes` is `Some`.
    pub fn new(path: &nn::Path<'_>, net: Box<dyn ModuleT>, classes: Option<usize>) -> Self {
        let embedding =
            classes.map(|k| embedding(path / "class_embedding", k as i64, EMBEDDING_DIM));
        Self { net, embedding }
    }

    /// Images of `z` (and of `labels`, int64, for a conditional generator).
    ///
    /// # Panics
    /// If a conditional generator gets no labels, or an unconditional one gets some: callers
    /// check labels against [`crate::task::ModelShape`] first.
    pub fn forward_t(&self, z: &Tensor, labels: Option<&Tensor>, train: bool) -> Tensor {
        match (&self.embedding, labels) {
            (None, None) => self.net.forward_t(z, train),
            (Some(embedding), Some(labels)) => {
                let e = embedding.forward(labels).to_kind(z.kind());
                self.net.forward_t(&Tensor::cat(&[z, &e], 1), train)
            }
            (Some(_), None) => panic!("a conditional generator needs labels"),
            (None, Some(_)) => panic!("an unconditional generator takes no labels"),
        }
    }
}

/// The discriminator, with a class projection when conditional.
#[derive(Debug)]
pub struct Discriminator {
    net: Box<dyn Critic>,
    projection: Option<nn::Embedding>,
}

impl Discriminator {
    pub fn new(path: &nn::Path<'_>, net: Box<dyn Critic>, classes: Option<usize>) -> Self {
        let dim = net.feature_dim();
        let projection = classes.map(|k| embedding(path / "class_projection", k as i64, dim));
        Self { net, projection }
    }

    /// One logit per image: ψ(φ(x)), plus ⟨p_y, φ(x)⟩ when conditional.
    ///
    /// # Panics
    /// As [`Generator::forward_t`], on labels that do not match the model.
    pub fn forward(&self, images: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let features = self.net.features(images);
        let logits = self.net.head(&features);
        match (&self.projection, labels) {
            (None, None) => logits,
            (Some(projection), Some(labels)) => {
                let p = projection.forward(labels).to_kind(features.kind());
                let kind = features.kind();
                logits + (features * p).sum_dim_intlist([1i64].as_slice(), false, kind)
            }
            (Some(_), None) => panic!("a conditional discriminator needs labels"),
            (None, Some(_)) => panic!("an unconditional discriminator takes no labels"),
        }
    }
}
