//! DCGAN (Radford et al. 2015) sized from the image shape.
//!
//! Square images of side `s0 × 2^k`, `k ≥ 2`, with `s0` the side left after halving while the
//! side is even and the half still ≥ 4: 28 → 7·2² (k = 2), 32 → 4·2³, 64 → 4·2⁴, 48 → 6·2³.
//! Sides such as 30 (= 15·2) or 20 (= 5·2²; allowed) show the rule; anything else is refused
//! with an error naming `data.image_size`.
//!
//! Generator: z → Linear → `F₀ × s0 × s0` → BatchNorm → ReLU, then `k − 1` blocks of
//! ConvTranspose(4, stride 2, pad 1) halving the channels → BatchNorm → ReLU, then a last
//! ConvTranspose to `c` channels → tanh. `F₀ = 64 · 2^(k−1)`, so 28×28 is 7×7×128 → 14×14×64 →
//! 28×28×c. Discriminator: `k` blocks Conv(4, stride 2, pad 1) → LeakyReLU(0.2) doubling the
//! channels from 64 (no BatchNorm: WGAN-GP's per-sample gradient penalty needs samples to be
//! independent of their batch), then Linear → one logit.
//!
//! Weights are N(0, 0.02) as in the paper; BatchNorm starts at scale 1, shift 0.

use tch::Tensor;
use tch::nn::{self, ModuleT};

use crate::ModelError;
use crate::activation::LeakyRelu;
use crate::conditional::Critic;

const SLOPE: f64 = 0.2;
/// Channels of the discriminator's first block and the generator's last hidden one.
const BASE: i64 = 64;

fn init() -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// `(s0, k)` for a square side, or an error naming the key to change.
pub fn geometry(image_shape: [i64; 3]) -> Result<(i64, u32), ModelError> {
    let [c, h, w] = image_shape;
    let unsupported = |why: &str| {
        ModelError::Invalid(format!(
            "model.kind = \"dcgan\" cannot build {c}×{h}×{w} images (data.image_size / data.channels): {why}; \
             supported sides are s·2^k with k ≥ 2 and 4 ≤ s ≤ 7, e.g. 28, 32, 48, 64, 128"
        ))
    };
    if h != w {
        return Err(unsupported("images must be square"));
    }
    let (mut side, mut k) = (h, 0u32);
    while side % 2 == 0 && side / 2 >= 4 {
        side /= 2;
        k += 1;
    }
    if k < 2 || !(4..=7).contains(&side) {
        return Err(unsupported("the side does not halve twice down to 4..7"));
    }
    Ok((side, k))
}

#[derive(Debug)]
pub struct Generator {
    project: nn::Linear,
    /// One norm per resolution below the output (absent without batch_norm).
    norms: Vec<nn::BatchNorm>,
    ups: Vec<nn::ConvTranspose2D>,
    start: [i64; 3],
}

impl Generator {
    /// `batch_norm = false` gives the hidden layers biases instead.
    pub fn new(
        path: &nn::Path<'_>,
        latent_dim: i64,
        image_shape: [i64; 3],
        batch_norm: bool,
    ) -> Result<Self, ModelError> {
        let (s0, k) = geometry(image_shape)?;
        let f0 = BASE << (k - 1);
        let linear = nn::LinearConfig {
            ws_init: init(),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: !batch_norm,
        };
        let project = nn::linear(path / "project", latent_dim, f0 * s0 * s0, linear);
        let norm = |i: usize, channels: i64| {
            nn::batch_norm2d(
                path / format!("norm{i}"),
                channels,
                nn::BatchNormConfig::default(),
            )
        };
        let mut norms = Vec::new();
        let mut ups = Vec::new();
        let mut channels = f0;
        for i in 0..k as usize {
            if batch_norm {
                norms.push(norm(i, channels));
            }
            let last = i == k as usize - 1;
            let out = if last { image_shape[0] } else { channels / 2 };
            let config = nn::ConvTransposeConfig {
                stride: 2,
                padding: 1,
                bias: last || !batch_norm,
                ws_init: init(),
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            };
            ups.push(nn::conv_transpose2d(
                path / format!("up{i}"),
                channels,
                out,
                4,
                config,
            ));
            channels = out;
        }
        Ok(Self {
            project,
            norms,
            ups,
            start: [f0, s0, s0],
        })
    }
}

impl ModuleT for Generator {
    fn forward_t(&self, z: &Tensor, train: bool) -> Tensor {
        let [f0, s0, _] = self.start;
        let mut xs = z.apply(&self.project).view([-1, f0, s0, s0]);
        for (i, up) in self.ups.iter().enumerate() {
            if let Some(norm) = self.norms.get(i) {
                xs = xs.apply_t(norm, train);
            }
            xs = xs.relu().apply(up);
        }
        xs.tanh()
    }
}

#[derive(Debug)]
pub struct Discriminator {
    convs: Vec<nn::Conv2D>,
    out: nn::Linear,
}

impl Discriminator {
    pub fn new(path: &nn::Path<'_>, image_shape: [i64; 3]) -> Result<Self, ModelError> {
        let (s0, k) = geometry(image_shape)?;
        let mut convs = Vec::new();
        let (mut channels, mut next) = (image_shape[0], BASE);
        for i in 0..k {
            let config = nn::ConvConfig {
                stride: 2,
                padding: 1,
                ws_init: init(),
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            };
            convs.push(nn::conv2d(
                path / format!("conv{i}"),
                channels,
                next,
                4,
                config,
            ));
            (channels, next) = (next, next * 2);
        }
        let linear = nn::LinearConfig {
            ws_init: init(),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let out = nn::linear(path / "out", channels * s0 * s0, 1, linear);
        Ok(Self { convs, out })
    }
}

impl ModuleT for Discriminator {
    fn forward_t(&self, images: &Tensor, _train: bool) -> Tensor {
        self.head(&self.features(images))
    }
}

impl Critic for Discriminator {
    /// The last block's maps, flattened.
    fn features(&self, images: &Tensor) -> Tensor {
        let mut xs = images.shallow_clone();
        for conv in &self.convs {
            // One ATen kernel each way, twice differentiable as the WGAN-GP penalty needs.
            xs = LeakyRelu::new(SLOPE).forward(&xs.apply(conv));
        }
        xs.flatten(1, -1)
    }

    fn head(&self, features: &Tensor) -> Tensor {
        features.apply(&self.out).view([-1])
    }

    fn feature_dim(&self) -> i64 {
        self.out.ws.size()[1]
    }
}

#[cfg(test)]
mod tests {
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn geometry_of_the_supported_sides() {
        assert_eq!(geometry([1, 28, 28]).unwrap(), (7, 2));
        assert_eq!(geometry([3, 32, 32]).unwrap(), (4, 3));
        assert_eq!(geometry([3, 64, 64]).unwrap(), (4, 4));
        assert_eq!(geometry([3, 48, 48]).unwrap(), (6, 3));
        for bad in [[1, 30, 30], [1, 28, 32], [1, 14, 14], [1, 36, 36]] {
            let err = geometry(bad).unwrap_err().to_string();
            assert!(err.contains("data.image_size"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn shapes_round_trip_for_each_size() {
        for shape in [[1i64, 28, 28], [3, 32, 32], [3, 64, 64]] {
            let (gvs, dvs) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
            let g = Generator::new(&gvs.root(), 16, shape, true).unwrap();
            let d = Discriminator::new(&dvs.root(), shape).unwrap();
            let z = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
            let images = g.forward_t(&z, true);
            assert_eq!(images.size(), [3, shape[0], shape[1], shape[2]]);
            assert_eq!(d.forward_t(&images, true).size(), [3]);
        }
    }
}
