//! The classic MLP GAN (the TensorFlow DCGAN tutorial's dense variant).
//!
//! Generator: latent → 256 → 512 → pixels, each hidden layer Linear (no bias) → BatchNorm →
//! LeakyReLU(0.3), output tanh. Discriminator: pixels → 512 → 256 → 1 logit, LeakyReLU(0.3),
//! every layer with a bias. Keras defaults throughout: Glorot-uniform kernels, zero biases,
//! LeakyReLU slope 0.3, BatchNorm momentum 0.99 / eps 1e-3 (libtorch's momentum is 1 − Keras').
//!
//! The discriminator's hidden biases matter: without them its logit is `b + f(x)` with `f`
//! positively homogeneous (`f(a·x) = a·f(x)` for `a > 0`), so it judges an image and every
//! lower-contrast copy of it (scaled towards mid-grey, the origin of the [-1, 1] pixel range)
//! alike up to scale, and the generator is left drawing speckled, grey-backed digits.

use tch::Tensor;
use tch::nn::{self, ModuleT};

use crate::activation::LeakyRelu;
use crate::conditional::Critic;
use crate::matmul::{Dense, Matmul};

const SLOPE: f64 = 0.3;

/// Keras' `glorot_uniform`, the reference model's kernel initialiser.
fn glorot(fan_in: i64, fan_out: i64) -> nn::Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn dense(path: nn::Path<'_>, fan_in: i64, fan_out: i64, bias: bool, matmul: Matmul) -> Dense {
    let config = nn::LinearConfig {
        ws_init: glorot(fan_in, fan_out),
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    Dense::new(nn::linear(path, fan_in, fan_out, config), matmul)
}

#[derive(Debug)]
pub struct Generator {
    layers: Vec<Dense>,
    norms: Vec<nn::BatchNorm>,
    activation: LeakyRelu,
    image_shape: [i64; 3],
}

impl Generator {
    /// `batch_norm = false` gives the hidden layers biases instead (nothing else centres them).
    pub fn new(
        path: &nn::Path<'_>,
        latent_dim: i64,
        image_shape: [i64; 3],
        batch_norm: bool,
        matmul: Matmul,
    ) -> Self {
        let pixels = image_shape.iter().product();
        let widths = [latent_dim, 256, 512, pixels];
        let mut layers = Vec::new();
        let mut norms = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let last = i == widths.len() - 2;
            layers.push(dense(
                path / format!("dense{i}"),
                pair[0],
                pair[1],
                !batch_norm && !last,
                matmul,
            ));
            if batch_norm && !last {
                let config = nn::BatchNormConfig {
                    momentum: 0.01,
                    eps: 1e-3,
                    ..Default::default()
                };
                norms.push(nn::batch_norm1d(path / format!("norm{i}"), pair[1], config));
            }
        }
        Self {
            layers,
            norms,
            activation: LeakyRelu::new(SLOPE),
            image_shape,
        }
    }
}

impl ModuleT for Generator {
    fn forward_t(&self, z: &Tensor, train: bool) -> Tensor {
        let mut xs = z.shallow_clone();
        let hidden = self.layers.len() - 1;
        for (i, layer) in self.layers[..hidden].iter().enumerate() {
            xs = xs.apply(layer);
            if let Some(norm) = self.norms.get(i) {
                xs = xs.apply_t(norm, train);
            }
            xs = self.activation.forward(&xs);
        }
        let [c, h, w] = self.image_shape;
        xs.apply(&self.layers[hidden]).tanh().view([-1, c, h, w])
    }
}

#[derive(Debug)]
pub struct Discriminator {
    layers: Vec<Dense>,
    activation: LeakyRelu,
}

impl Discriminator {
    pub fn new(path: &nn::Path<'_>, image_shape: [i64; 3], matmul: Matmul) -> Self {
        let pixels = image_shape.iter().product();
        let widths = [pixels, 512, 256, 1];
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, pair)| dense(path / format!("dense{i}"), pair[0], pair[1], true, matmul))
            .collect();
        Self {
            layers,
            activation: LeakyRelu::new(SLOPE),
        }
    }
}

impl ModuleT for Discriminator {
    fn forward_t(&self, images: &Tensor, _train: bool) -> Tensor {
        self.head(&self.features(images))
    }
}

impl Critic for Discriminator {
    /// The 256 activations of the last hidden layer.
    fn features(&self, images: &Tensor) -> Tensor {
        let mut xs = images.flatten(1, -1);
        let last = self.layers.len() - 1;
        for layer in &self.layers[..last] {
            xs = self.activation.forward(&xs.apply(layer));
        }
        xs
    }

    fn head(&self, features: &Tensor) -> Tensor {
        features
            .apply(&self.layers[self.layers.len() - 1])
            .view([-1])
    }

    fn feature_dim(&self) -> i64 {
        self.layers[self.layers.len() - 1].in_features()
    }
}
