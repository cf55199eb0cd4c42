//! An autoregressive model (`model.family = "autoregressive"`): a PixelCNN over grey pixels
//! in raster order, p(x) = Π p(x_i | x_<i).
//!
//! A masked 7×7 convolution of type A (a pixel sees only the pixels before it), then
//! `autoregressive.residual_blocks` residual blocks `h + conv1×1(ReLU(maskB3×3(ReLU(h))))`
//! (type B: a pixel also sees its own features), then ReLU → 1×1 → ReLU → 1×1 to one Bernoulli
//! logit per pixel (`output = "bernoulli"`, on binarised digits) or 256 logits
//! (`output = "softmax"`, on 8-bit intensities). Every layer has `autoregressive.channels`
//! maps and PyTorch's default initialisation, so `bench/torch_pixelcnn.py` builds the same
//! network.
//!
//! The masked convolutions convolve only the kernel rows down to the centre (the mask zeroes
//! the rest) and every layer runs channels-last, the layout oneDNN's convolutions take without
//! reordering: the same sums, about a fifth of the step less than a masked full kernel in NCHW.
//!
//! Binarisation is dynamic: each training pixel is drawn afresh from Bernoulli(intensity) with
//! [`latent::uniforms`] of its (seed, stream, row), so the step stays world-size invariant and
//! exactly resumable; held-out digits are binarised once, with a fixed seed. Sampling runs the
//! network once per pixel for the whole batch, on the rows above and at the pixel only (the
//! masks make a pixel's logits independent of every later row, so this changes nothing).
//!
//! `model.conditional = true` (labels `0..k`) adds a learned class bias per layer: a `k × C`
//! table each for the type-A convolution, every residual block and the output head's hidden
//! layer (`input_class`, `block{i}_class`, `head_class`), whose row y is added at every
//! position of that layer's output for an image of class y. A constant over the image leaves
//! the masks' causality intact, and sampling a class adds the same biases. The tables start at
//! zero and are created after every unconditional variable, so an unconditional model keeps
//! exactly its variables and a seed's draws, and a conditional one starts as the unconditional
//! model of its seed. A conditional model has no held-out likelihood: the trait hands the
//! held-out images over without labels.

use std::path::Path;

use gantry_config::{Family, PixelOutput, Settings};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Reduction, Tensor};

use crate::gan::{averaged_update, load_into, load_moments, save_moments};
use crate::optim::FlatOptimizer;
use crate::phases::{Phase, PhaseClock};
use crate::precision::Autocast;
use crate::task::{
    BatchSource, GradReduce, Likelihood, ModelShape, Part, StepOutcome, TrainTask, cycled_labels,
};
use crate::vae::{check_batch_labels, torch_default};
use crate::{FlatParams, ModelError, OPTIMIZER_FILE, latent};

/// The network's tensors in a checkpoint.
pub const PIXELCNN_FILE: &str = "pixelcnn.safetensors";

/// The fixed binarisation of held-out images (one draw, never re-drawn).
pub const HELDOUT_BINARISATION_SEED: u64 = 0x6865_6c64;

/// A convolution whose kernel is multiplied by a fixed causal mask at every use; only the
/// kernel rows the mask keeps are convolved (see [`MaskedConv::forward`]).
#[derive(Debug)]
struct MaskedConv {
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    padding: i64,
}

impl MaskedConv {
    /// `include_centre`: type B (the pixel's own features) rather than type A.
    fn new(path: nn::Path<'_>, inputs: i64, outputs: i64, size: i64, include_centre: bool) -> Self {
        let init = torch_default(inputs * size * size);
        let weight = path.var("weight", &[outputs, inputs, size, size], init);
        let bias = path.var("bias", &[outputs], init);
        let centre = size / 2;
        let mut mask = vec![0f32; (size * size) as usize];
        for row in 0..size {
            for col in 0..size {
                let before = row < centre || (row == centre && col < centre);
                let at = row == centre && col == centre;
                if before || (include_centre && at) {
                    mask[(row * size + col) as usize] = 1.0;
                }
            }
        }
        let mask = Tensor::from_slice(&mask)
            .view([1, 1, size, size])
            .to_device(weight.device());
        Self {
            weight,
            bias,
            mask,
            padding: size / 2,
        }
    }

    /// The mask zeroes every kernel row below the centre, so only the rows down to the centre
    /// are convolved: 2 of 3 rows for 3×3, 4 of 7 for 7×7, the same sums with a third to
    /// almost half fewer multiplications. With the full padding above and below, output row r
    /// of the cropped kernel sees input rows r − padding ..= r, which is exactly row r of the
    /// masked full kernel; the `padding` extra rows at the bottom are cut off. The cropped-away
    /// weights get zero gradients, as the mask gave them before.
    fn forward(&self, x: &Tensor) -> Tensor {
        let rows = self.padding + 1;
        let kernel = self.weight.narrow(2, 0, rows) * self.mask.narrow(2, 0, rows);
        x.conv2d(
            &kernel,
            Some(&self.bias),
            [1, 1],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
        .narrow(2, 0, x.size()[2])
    }
}

fn pointwise(path: nn::Path<'_>, inputs: i64, outputs: i64) -> nn::Conv2D {
    let init = torch_default(inputs);
    let config = nn::ConvConfig {
        ws_init: init,
        bs_init: init,
        ..Default::default()
    };
    nn::conv2d(path, inputs, outputs, 1, config)
}

#[derive(Debug)]
struct Block {
    masked: MaskedConv,
    mix: nn::Conv2D,
}

/// A conditional PixelCNN's class biases (see the module docs): `classes × channels` each.
#[derive(Debug)]
struct ClassBiases {
    input: Tensor,
    blocks: Vec<Tensor>,
    head: Tensor,
}

/// The class biases of a batch's images, `N × C × 1 × 1` each (broadcast over any crop).
#[derive(Debug)]
struct Biases {
    input: Tensor,
    blocks: Vec<Tensor>,
    head: Tensor,
}

/// `h` plus its rows' class bias, when conditional.
fn biased(h: Tensor, bias: Option<&Tensor>) -> Tensor {
    match bias {
        Some(b) => h + b,
        None => h,
    }
}

/// `x` (N×1×H×W) with channels-last strides. With one channel a dense tensor is contiguous in
/// both layouts, so no copy or permute makes the strides say so; libtorch picks a
/// convolution's layout from its input's strides, and these say NHWC.
fn channels_last_grey(x: &Tensor) -> Tensor {
    let [n, c, h, w] = x.size()[..] else {
        unreachable!("the PixelCNN's inputs are N×1×H×W")
    };
    debug_assert_eq!(c, 1, "the PixelCNN models grey images");
    x.contiguous()
        .as_strided([n, 1, h, w], [h * w, 1, w, 1], None)
}

/// The PixelCNN being trained.
#[derive(Debug)]
pub struct PixelCnn {
    device: Device,
    pub vs: VarStore,
    input: MaskedConv,
    blocks: Vec<Block>,
    head: nn::Conv2D,
    out: nn::Conv2D,
    /// `Some` for a conditional model.
    class_biases: Option<ClassBiases>,
    pub params: FlatParams,
    pub optimizer: FlatOptimizer,
    gradient: Tensor,
    output: PixelOutput,
    channels: i64,
    shape: ModelShape,
    seed: u64,
    host_draws: Vec<f32>,
    /// bf16 forward passes in training steps (`train.precision`); sampling and the held-out
    /// likelihood stay fp32.
    autocast: Autocast,
    pub clock: PhaseClock,
}

impl PixelCnn {
    /// Builds the PixelCNN for `shape` (conditional when `model.conditional`, which needs the
    /// shape's classes), with weights drawn from `train.seed`.
    pub fn new(
        settings: &Settings,
        shape: impl Into<ModelShape>,
        device: Device,
    ) -> Result<Self, ModelError> {
        let shape = shape.into();
        shape.check(settings.model.conditional)?;
        let image_shape = shape.image;
        let a = &settings.autoregressive;
        if image_shape[0] != 1 {
            return Err(ModelError::Invalid(format!(
                "model.family = \"autoregressive\" models grey images (data.channels = 1), got {} channels",
                image_shape[0]
            )));
        }
        let c = a.channels as i64;
        let _init = crate::INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(settings.train.seed as i64);
        let vs = VarStore::new(device);
        let root = vs.root();
        let input = MaskedConv::new(&root / "input", 1, c, 7, false);
        let blocks = (0..a.residual_blocks)
            .map(|i| Block {
                masked: MaskedConv::new(&root / format!("block{i}_masked"), c, c, 3, true),
                mix: pointwise(&root / format!("block{i}_mix"), c, c),
            })
            .collect();
        let head = pointwise(&root / "head", c, c);
        let logits = match a.output {
            PixelOutput::Bernoulli => 1,
            PixelOutput::Softmax => 256,
        };
        let out = pointwise(&root / "out", c, logits);
        // After every unconditional variable (zeros draw nothing, but the order is the
        // contract either way).
        let class_biases = shape.classes.map(|k| {
            let table =
                |name: String| (&root / name).var("weight", &[k as i64, c], nn::Init::Const(0.0));
            ClassBiases {
                input: table("input_class".into()),
                blocks: (0..a.residual_blocks)
                    .map(|i| table(format!("block{i}_class")))
                    .collect(),
                head: table("head_class".into()),
            }
        });
        let params = FlatParams::new(&vs);
        let optimizer = FlatOptimizer::new(settings.train.optimizer, a.lr, a.betas, &params.flat);
        let gradient = params.flat.zeros_like();
        Ok(Self {
            device,
            vs,
            input,
            blocks,
            head,
            out,
            class_biases,
            params,
            optimizer,
            gradient,
            output: a.output,
            channels: c,
            shape,
            seed: settings.train.seed,
            host_draws: Vec::new(),
            autocast: Autocast::new(settings.train.precision, device),
            clock: PhaseClock::new(device),
        })
    }

    /// Logits for every pixel of `x` (N×1×H×W network inputs in [0, 1]): N×1×H×W
    /// (Bernoulli) or N×256×H×W (softmax). `labels` (int64, one per image) exactly when the
    /// model is conditional.
    pub fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let biases = self.biases(labels, x.size()[0] as usize)?;
        Ok(self.logits_with(x, biases.as_ref()))
    }

    /// The class biases of images of `labels` for a conditional model (`None` for an
    /// unconditional one, which must get no labels).
    fn biases(&self, labels: Option<&Tensor>, rows: usize) -> Result<Option<Biases>, ModelError> {
        check_batch_labels(self.shape.classes, labels, rows)?;
        let (Some(tables), Some(labels)) = (&self.class_biases, labels) else {
            return Ok(None);
        };
        let rows = |table: &Tensor| -> Result<Tensor, ModelError> {
            Ok(table
                .f_index_select(0, labels)?
                .view([-1, self.channels, 1, 1]))
        };
        Ok(Some(Biases {
            input: rows(&tables.input)?,
            blocks: tables.blocks.iter().map(rows).collect::<Result<_, _>>()?,
            head: rows(&tables.head)?,
        }))
    }

    fn logits_with(&self, x: &Tensor, biases: Option<&Biases>) -> Tensor {
        self.output_head(&self.features(x, biases), biases)
    }

    /// The masked layers' features (N×C×H×W), with the images' class biases when conditional.
    ///
    /// The layers run channels-last (NHWC strides behind the NCHW shape): oneDNN's convolutions
    /// take that layout as it is, where NCHW costs a reorder into its blocked layout and back
    /// around every convolution and its two backward passes, a third of the step. Setting it on
    /// the input is enough: each convolution, ReLU and sum hands its output on in its input's
    /// layout, and the gradients come back in it.
    fn features(&self, x: &Tensor, biases: Option<&Biases>) -> Tensor {
        use tch::nn::Module;
        let x = channels_last_grey(x);
        let mut h = biased(self.input.forward(&x), biases.map(|b| &b.input));
        for (i, block) in self.blocks.iter().enumerate() {
            h = biased(
                &h + block.mix.forward(&block.masked.forward(&h.relu()).relu()),
                biases.map(|b| &b.blocks[i]),
            );
        }
        h
    }

    /// Per-pixel logits of features: 1×1 layers (and biases constant over the image), so any
    /// crop of `h` gives its own pixels'.
    fn output_head(&self, h: &Tensor, biases: Option<&Biases>) -> Tensor {
        use tch::nn::Module;
        let hidden = biased(self.head.forward(&h.relu()), biases.map(|b| &b.head));
        self.out.forward(&hidden.relu())
    }

    /// Per-image negative log-likelihood in nats of `targets` (binary pixels as 0/1 floats,
    /// or 8-bit intensities as integer classes), from the logits of `inputs`, in fp32.
    fn nll(&self, inputs: &Tensor, targets: &Tensor, biases: Option<&Biases>) -> Tensor {
        self.nll_of(&self.logits_with(inputs, biases), targets)
    }

    /// [`Self::nll`] of a training step: the network in `train.precision`, the likelihood
    /// from fp32 logits.
    fn training_nll(&self, inputs: &Tensor, targets: &Tensor, biases: Option<&Biases>) -> Tensor {
        let logits = self.autocast.run(|| self.logits_with(inputs, biases));
        self.nll_of(&logits.to_kind(Kind::Float), targets)
    }

    fn nll_of(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let n = logits.size()[0];
        let per_pixel = match self.output {
            PixelOutput::Bernoulli => logits.binary_cross_entropy_with_logits::<Tensor>(
                targets,
                None,
                None,
                Reduction::None,
            ),
            PixelOutput::Softmax => logits.cross_entropy_loss::<Tensor>(
                &targets.to_kind(Kind::Int64).squeeze_dim(1),
                None,
                Reduction::None,
                -100,
                0.0,
            ),
        };
        per_pixel
            .reshape([n, -1])
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
    }

    /// (network input, target) of 8-bit-scale intensities `v` (N×1×H×W floats in [0, 255]);
    /// Bernoulli pixels are `v / 255 > u` for the uniform draws `u`.
    fn inputs_and_targets(&self, v: &Tensor, draws: Option<&Tensor>) -> (Tensor, Tensor) {
        match (self.output, draws) {
            (PixelOutput::Bernoulli, Some(u)) => {
                let binary = (v / 255.0).gt_tensor(u).to_kind(Kind::Float);
                (binary.shallow_clone(), binary)
            }
            _ => (v / 255.0, v.round()),
        }
    }

    fn draws(&mut self, seed: u64, stream: u64, first_row: usize, rows: usize) -> Tensor {
        let [c, h, w] = self.shape.image;
        latent::uniforms(
            seed,
            stream,
            (c * h * w) as usize,
            first_row,
            rows,
            &mut self.host_draws,
        );
        Tensor::from_slice(&self.host_draws)
            .view([rows as i64, c, h, w])
            .to_device(self.device)
    }

    /// `n` samples, pixel by pixel in raster order, the whole batch at once, of class
    /// `labels[i]` for image `i` of a conditional model (`None` for an unconditional one); the
    /// draws of row r are [`latent::uniforms`]`(seed, 0, pixels, r, 1)`.
    fn sample_pixels(
        &self,
        n: usize,
        seed: u64,
        labels: Option<&[u8]>,
    ) -> Result<Vec<u8>, ModelError> {
        let [_, h, w] = self.shape.image;
        let pixels = (h * w) as usize;
        let mut out = Vec::with_capacity(n * pixels);
        let mut host = Vec::new();
        for first in (0..n).step_by(500) {
            let rows = 500.min(n - first);
            let labels = labels
                .map(|l| self.shape.labels(&l[first..first + rows], self.device))
                .transpose()?;
            let biases = self.biases(labels.as_ref(), rows)?;
            latent::uniforms(seed, 0, pixels, first, rows, &mut host);
            let u = Tensor::from_slice(&host).view([rows as i64, 1, h, w]);
            let x = Tensor::zeros([rows as i64, 1, h, w], (Kind::Float, self.device));
            tch::no_grad(|| {
                for i in 0..h {
                    for j in 0..w {
                        // One pass per pixel; rows after i do not affect its logits, so
                        // they are left out of the pass, and the 1×1 output layers run on
                        // the pixel alone.
                        let h = self.features(&x.narrow(2, 0, i + 1), biases.as_ref());
                        let at =
                            self.output_head(&h.narrow(2, i, 1).narrow(3, j, 1), biases.as_ref());
                        let draw = u.narrow(2, i, 1).narrow(3, j, 1).to_device(self.device);
                        let value = match self.output {
                            PixelOutput::Bernoulli => {
                                at.sigmoid().gt_tensor(&draw).to_kind(Kind::Float)
                            }
                            PixelOutput::Softmax => {
                                // Inverse-CDF draw from the 256-way softmax.
                                let cdf = at.softmax(1, Kind::Float).cumsum(1, Kind::Float);
                                let class = cdf
                                    .lt_tensor(&draw)
                                    .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
                                    .clamp_max(255.0);
                                class / 255.0
                            }
                        };
                        x.narrow(2, i, 1).narrow(3, j, 1).copy_(&value);
                    }
                }
            });
            let bytes = (x * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8);
            out.extend(
                Vec::<u8>::try_from(bytes.to_device(Device::Cpu).reshape([-1])).unwrap_or_default(),
            );
        }
        Ok(out)
    }
}

impl TrainTask for PixelCnn {
    fn family(&self) -> Family {
        Family::Autoregressive
    }

    fn describe(&self) -> String {
        let conditional = match self.shape.classes {
            Some(k) => format!("conditional on {k} classes, "),
            None => String::new(),
        };
        format!(
            "PixelCNN ({conditional}{} maps, {} residual blocks, {})",
            self.channels,
            self.blocks.len(),
            self.output
        )
    }

    fn parts(&self) -> Vec<Part<'_>> {
        vec![Part {
            name: "pixelcnn",
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
        let biases = self.biases(batch.labels.as_ref(), rows)?;
        // [-1, 1] back to the 8-bit scale the images came from.
        let v = (&batch.images + 1.0) * 127.5;
        let draws = (self.output == PixelOutput::Bernoulli)
            .then(|| self.draws(self.seed, batch.stream, batch.first_row, rows));
        let (inputs, targets) = self.inputs_and_targets(&v, draws.as_ref());
        self.clock.lap(Phase::Data);
        let nll = self
            .training_nll(&inputs, &targets, biases.as_ref())
            .mean(Kind::Float);
        let applied = averaged_update(
            &nll,
            &self.params,
            &mut self.optimizer,
            &self.gradient,
            &mut self.clock,
            reduce,
        )?;
        let pixels = self.shape.image.iter().product::<i64>() as f64;
        Ok(StepOutcome {
            applied,
            statistics: tch::no_grad(|| {
                let nll = nll.detach();
                let bits = &nll / (pixels * std::f64::consts::LN_2);
                vec![("nll", nll), ("bits_per_dim", bits)]
            }),
        })
    }

    fn gradients(&self) -> Vec<(&'static str, Tensor)> {
        vec![("pixelcnn", self.gradient.shallow_clone())]
    }

    fn classes(&self) -> Option<usize> {
        self.shape.classes
    }

    /// [`PixelCnn::sample_pixels`] of the classes of [`cycled_labels`] when conditional.
    fn sample_u8(&self, n: usize, seed: u64) -> Vec<u8> {
        let labels = self.shape.classes.map(|k| cycled_labels(n, k));
        self.sample_pixels(n, seed, labels.as_deref())
            .expect("cycled labels are within the model's classes")
    }

    fn sample_labelled_u8(&self, labels: &[u8], seed: u64) -> Result<Vec<u8>, ModelError> {
        // Refused for an unconditional model, or on a class out of range, before any work.
        self.shape.check_labels(labels)?;
        self.sample_pixels(labels.len(), seed, Some(labels))
    }

    fn likelihood(
        &self,
        images: &[u8],
        _settings: &Settings,
    ) -> Option<Result<Likelihood, ModelError>> {
        // A conditional model's likelihood is of (x, y), and the images come without labels.
        if self.shape.classes.is_some() {
            return None;
        }
        let [c, h, w] = self.shape.image;
        let pixels = (c * h * w) as usize;
        let n = images.len() / pixels;
        let mut host = Vec::new();
        let mut total = 0.0;
        tch::no_grad(|| {
            for first in (0..n).step_by(250) {
                let rows = 250.min(n - first);
                let v = Tensor::from_slice(&images[first * pixels..][..rows * pixels])
                    .to_device(self.device)
                    .to_kind(Kind::Float)
                    .view([rows as i64, c, h, w]);
                let draws = (self.output == PixelOutput::Bernoulli).then(|| {
                    latent::uniforms(HELDOUT_BINARISATION_SEED, 0, pixels, first, rows, &mut host);
                    Tensor::from_slice(&host)
                        .view([rows as i64, c, h, w])
                        .to_device(self.device)
                });
                let (inputs, targets) = self.inputs_and_targets(&v, draws.as_ref());
                total += self
                    .nll(&inputs, &targets, None)
                    .sum(Kind::Double)
                    .double_value(&[]);
            }
        });
        let nll = total / n.max(1) as f64;
        Some(Ok(Likelihood {
            neg_elbo_nats: nll,
            nll_nats: nll,
            bits_per_dim: nll / (pixels as f64 * std::f64::consts::LN_2),
            images: n,
        }))
    }

    fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.vs.save(dir.join(PIXELCNN_FILE))?;
        save_moments(&[("pixelcnn", &self.optimizer)], &dir.join(OPTIMIZER_FILE))
    }

    fn load(&mut self, dir: &Path) -> Result<(), ModelError> {
        load_into(&self.vs, &dir.join(PIXELCNN_FILE))?;
        load_moments(&[("pixelcnn", &self.optimizer)], &dir.join(OPTIMIZER_FILE))
    }

    fn set_optimizer_steps(&mut self, name: &str, steps: u64) -> Result<(), ModelError> {
        if name != "pixelcnn" {
            return Err(ModelError::Invalid(format!(
                "the PixelCNN has no part `{name}`"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The cropped kernel (rows down to the centre) gives the masked full kernel's output and
    /// weight gradient, for both mask types, in either input layout.
    #[test]
    fn cropped_kernels_equal_the_masked_full_kernel() {
        tch::manual_seed(7);
        let vs = VarStore::new(Device::Cpu);
        for (size, include_centre) in [(7, false), (3, true)] {
            let inputs = if include_centre { 5 } else { 1 };
            let conv = MaskedConv::new(
                &vs.root() / format!("k{size}"),
                inputs,
                6,
                size,
                include_centre,
            );
            let x = Tensor::randn([3, inputs, 9, 11], (Kind::Float, Device::Cpu));
            for x in [
                x.shallow_clone(),
                x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
            ] {
                let ours = conv.forward(&x);
                let full = x.conv2d(
                    &(&conv.weight * &conv.mask),
                    Some(&conv.bias),
                    [1, 1],
                    [conv.padding, conv.padding],
                    [1, 1],
                    1,
                );
                assert_eq!(ours.size(), full.size());
                // Relative to the largest value: the two kernels sum in other orders, and
                // the kernels oneDNN picks differ between CPUs.
                let relative = |a: &Tensor, b: &Tensor| {
                    f64::try_from((a - b).abs().max()).unwrap()
                        / f64::try_from(b.abs().max()).unwrap()
                };
                let gap = relative(&ours, &full);
                assert!(
                    gap < 1e-5,
                    "{size}×{size} output differs by {gap} (relative)"
                );
                let grads = |y: &Tensor| {
                    Tensor::run_backward(&[y.sum(Kind::Float)], &[&conv.weight], false, false)
                        .pop()
                        .unwrap()
                };
                let (g_ours, g_full) = (grads(&ours), grads(&full));
                let gap = relative(&g_ours, &g_full);
                assert!(
                    gap < 1e-5,
                    "{size}×{size} weight gradient differs by {gap} (relative)"
                );
                let outside = conv.mask.ones_like() - &conv.mask;
                let masked_out = f64::try_from((&g_ours * outside).abs().max()).unwrap();
                assert_eq!(masked_out, 0.0, "a masked-out weight got a gradient");
            }
        }
    }

    /// The features come out channels-last (see `features`): the layout the convolutions run in.
    #[test]
    fn features_are_channels_last() {
        let mut settings = Settings::default();
        settings.autoregressive.channels = 4;
        settings.autoregressive.residual_blocks = 1;
        let model = PixelCnn::new(&settings, [1, 6, 6], Device::Cpu).unwrap();
        let x = Tensor::rand([2, 1, 6, 6], (Kind::Float, Device::Cpu));
        let h = model.features(&x, None);
        assert_eq!(h.size(), [2, 4, 6, 6]);
        assert_eq!(h.stride(), [144, 1, 24, 4], "features are not NHWC");
    }

    /// A pixel's logit depends on the pixels before it in raster order and on nothing else,
    /// with or without (non-zero) class biases.
    #[test]
    fn every_logit_sees_only_earlier_pixels() {
        let mut settings = Settings::default();
        settings.autoregressive.channels = 4;
        settings.autoregressive.residual_blocks = 2;
        let plain = PixelCnn::new(&settings, [1, 10, 10], Device::Cpu).unwrap();
        settings.model.conditional = true;
        let shape = ModelShape {
            image: [1, 10, 10],
            classes: Some(3),
        };
        let conditional = PixelCnn::new(&settings, shape, Device::Cpu).unwrap();
        let tables = conditional.class_biases.as_ref().unwrap();
        tch::no_grad(|| {
            for table in [&tables.input, &tables.head]
                .into_iter()
                .chain(&tables.blocks)
            {
                table.shallow_clone().copy_(&table.randn_like());
            }
        });
        let labels = Tensor::from_slice(&[2i64]);
        let (h, w) = (10i64, 10i64);
        for (model, labels) in [(&plain, None), (&conditional, Some(&labels))] {
            for (i, j) in [(0, 0), (0, 5), (4, 0), (4, 7), (9, 9)] {
                // A fixed input (not the global generator, which tests on other threads
                // share): with ReLUs, some draws leave a pixel's every path dead.
                let x = (Tensor::arange(h * w, (Kind::Float, Device::Cpu)) / (h * w) as f64)
                    .view([1, 1, h, w])
                    .set_requires_grad(true);
                let logit = model
                    .logits(&x, labels)
                    .unwrap()
                    .get(0)
                    .get(0)
                    .get(i)
                    .get(j);
                let grad = Tensor::run_backward(&[logit], &[&x], false, false)
                    .pop()
                    .unwrap()
                    .abs()
                    .view([-1]);
                let grad = Vec::<f32>::try_from(grad).unwrap();
                let at = (i * w + j) as usize;
                assert!(
                    grad[at..].iter().all(|g| *g == 0.0),
                    "pixel ({i}, {j}) sees itself or a later pixel"
                );
                if at > 0 {
                    assert!(
                        grad[..at].iter().any(|g| *g != 0.0),
                        "pixel ({i}, {j}) sees none of the earlier pixels"
                    );
                }
            }
        }
        // The labels must match the model.
        let x = Tensor::rand([1, 1, h, w], (Kind::Float, Device::Cpu));
        assert!(plain.logits(&x, Some(&labels)).is_err());
        let err = conditional.logits(&x, None).unwrap_err().to_string();
        assert!(err.contains("needs labelled batches"), "{err}");
    }
}
