//! The feature extractor: a small CNN trained on the embedded MNIST-10k.

use gantry_data::Dataset;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::{EvalError, IMAGE_PIXELS, NUM_CLASSES};

/// Width of the penultimate layer, the features FID is computed on.
pub const FEATURE_DIM: usize = 128;

/// Seeds weight initialisation, dropout and the data order, so every cache miss trains the same
/// network (bit-identical for a given libtorch build and CPU; training always uses one thread).
const SEED: u64 = 0x6761_6e74_7279_4556;
const EPOCHS: usize = 4;
const BATCH: usize = 64;
const LEARNING_RATE: f64 = 2e-3;
/// Dropout on the features while training: regularises the 9,000-image training set.
const DROPOUT: f64 = 0.25;
/// Rows per forward pass at inference: bounds the activations (about 20 MB) for any `n`.
const INFER_BATCH: i64 = 500;

/// conv5×5(16) → pool → conv5×5(32) → pool → fc128 (features) → fc10.
///
/// Two pooled 5×5 convolutions instead of the classic unpooled 3×3 32/64 pair: about 1 M
/// multiply-adds per image instead of 12 M, which is what keeps a cache miss to seconds on a
/// couple of cores, while still reaching ~98% on MNIST.
#[derive(Debug)]
pub(crate) struct Net {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Net {
    pub(crate) fn new(root: &nn::Path<'_>) -> Self {
        Self {
            conv1: nn::conv2d(root / "conv1", 1, 16, 5, Default::default()),
            conv2: nn::conv2d(root / "conv2", 16, 32, 5, Default::default()),
            fc1: nn::linear(
                root / "fc1",
                32 * 4 * 4,
                FEATURE_DIM as i64,
                Default::default(),
            ),
            fc2: nn::linear(
                root / "fc2",
                FEATURE_DIM as i64,
                NUM_CLASSES as i64,
                Default::default(),
            ),
        }
    }

    /// Penultimate features (after the ReLU) of NCHW images in [-1, 1].
    fn features(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv1)
            .max_pool2d_default(2)
            .relu()
            .apply(&self.conv2)
            .max_pool2d_default(2)
            .relu()
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
    }

    fn logits(&self, features: &Tensor) -> Tensor {
        features.apply(&self.fc2)
    }

    /// Features (`n × FEATURE_DIM`) and logits (`n × 10`) of `n` 28×28 `u8` images.
    pub(crate) fn infer(&self, images: &[u8], n: usize) -> Result<(Tensor, Tensor), EvalError> {
        let x = to_input(images, n)?;
        tch::no_grad(|| {
            let mut features = Vec::new();
            let mut logits = Vec::new();
            for chunk in x.f_split(INFER_BATCH, 0)? {
                let f = self.features(&chunk);
                logits.push(self.logits(&f));
                features.push(f);
            }
            Ok((Tensor::f_cat(&features, 0)?, Tensor::f_cat(&logits, 0)?))
        })
    }
}

/// `n` 28×28 `u8` images as an `n × 1 × 28 × 28` float tensor in [-1, 1], the scaling the GAN
/// trains on.
fn to_input(images: &[u8], n: usize) -> Result<Tensor, EvalError> {
    if images.len() != n * IMAGE_PIXELS {
        return Err(EvalError::Input(format!(
            "expected {n} × 28 × 28 = {} bytes of pixels, got {}",
            n * IMAGE_PIXELS,
            images.len()
        )));
    }
    Ok(Tensor::from_slice(images)
        .f_view([n as i64, 1, 28, 28])?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(2.0 / 255.0)?
        .f_sub_scalar(1.0)?)
}

/// How long a training run lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// Whole passes over the data; the last one at half the learning rate. The evaluator's
    /// recipe: its number of steps follows from the training set's size.
    Epochs(usize),
    /// Exactly this many batches (passes repeat, reshuffled, as often as needed); the last
    /// quarter of them at half the learning rate. Training sets of different sizes then get
    /// the same number of updates, which is what comparing them needs.
    Steps(usize),
}

/// Everything but the data that decides the weights [`train`] produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recipe {
    pub seed: u64,
    pub schedule: Schedule,
}

impl Recipe {
    /// The evaluator's own classifier. Changing anything here changes the cached weights, so
    /// it needs a new [`crate::CLASSIFIER_VERSION`].
    pub(crate) const EVALUATOR: Recipe = Recipe {
        seed: SEED,
        schedule: Schedule::Epochs(EPOCHS),
    };
}

/// Batch size of every training run.
pub(crate) const TRAIN_BATCH: usize = BATCH;

/// Trains a fresh classifier on `train` (which must have labels `< 10`) with `recipe`.
///
/// The optimiser is Adam at 2e-3 with dropout 0.25 on the features and batches of 64 (an
/// epoch's last batch holds the remainder); only the schedule and the seed vary. Every random
/// choice (initial weights, dropout masks, data order) comes from one ChaCha8 stream seeded with
/// `recipe.seed`, never from libtorch's global RNG: training neither depends on nor disturbs
/// what other code in the process (a GAN being built, say) does with it. The stream is drawn in
/// the same order for both schedules (weights, then per pass a shuffle, then per batch a
/// dropout mask), so [`Recipe::EVALUATOR`] reproduces the cached weights of earlier builds.
pub(crate) fn train(train: &Dataset, recipe: Recipe) -> Result<(nn::VarStore, Net), EvalError> {
    let labels = train
        .labels()
        .ok_or_else(|| EvalError::Input(format!("{} has no labels to train on", train.name())))?;
    if let Some(&bad) = labels.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
        return Err(EvalError::Input(format!(
            "{}: label {bad} is not a digit 0-9",
            train.name()
        )));
    }
    let n = train.len();
    let empty = match recipe.schedule {
        Schedule::Epochs(e) => e == 0,
        Schedule::Steps(s) => s == 0,
    };
    if n == 0 || empty {
        return Err(EvalError::Input(format!(
            "training on {n} images for {:?} trains nothing",
            recipe.schedule
        )));
    }
    let x = to_input(train.images(), n)?;
    let y = Tensor::from_slice(labels).f_to_kind(Kind::Int64)?;

    // One intra-op thread: batches of 64 small images are too small to split, and on a busy
    // machine two threads waiting on each other's barriers were measured 5× slower (15 s
    // against 3 s per epoch). It also makes the weights independent of the core count.
    let _threads = OneThread::enter();
    let mut rng = ChaCha8Rng::seed_from_u64(recipe.seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root());
    initialise(&vs, &mut rng)?;
    let mut opt = nn::Adam::default().build(&vs, LEARNING_RATE)?;
    let mut order: Vec<i64> = (0..n as i64).collect();
    let keep_scale = (1.0 / (1.0 - DROPOUT)) as f32;
    let mut step = 0;
    'passes: for epoch in 0.. {
        if recipe.schedule == Schedule::Epochs(epoch) {
            break;
        }
        order.shuffle(&mut rng);
        // Halving the rate at the end settles the weights.
        if recipe.schedule == Schedule::Epochs(epoch + 1) {
            opt.set_lr(LEARNING_RATE / 2.0);
        }
        for batch in order.chunks(BATCH) {
            if let Schedule::Steps(steps) = recipe.schedule {
                if step == steps {
                    break 'passes;
                }
                if step == steps - steps / 4 {
                    opt.set_lr(LEARNING_RATE / 2.0);
                }
            }
            step += 1;
            let idx = Tensor::from_slice(batch);
            let xb = x.f_index_select(0, &idx)?;
            let yb = y.f_index_select(0, &idx)?;
            let mask: Vec<f32> = (0..batch.len() * FEATURE_DIM)
                .map(|_| {
                    if rng.r#gen::<f64>() < DROPOUT {
                        0.0
                    } else {
                        keep_scale
                    }
                })
                .collect();
            let mask =
                Tensor::from_slice(&mask).f_view([batch.len() as i64, FEATURE_DIM as i64])?;
            let features = net.features(&xb).f_mul(&mask)?;
            let loss = net.logits(&features).cross_entropy_for_logits(&yb);
            opt.backward_step(&loss);
        }
    }
    Ok((vs, net))
}

/// PyTorch's default initialisation (uniform in ±1/sqrt(fan_in) for weights and biases alike),
/// drawn from `rng` in the order of the variables' names.
fn initialise(vs: &nn::VarStore, rng: &mut ChaCha8Rng) -> Result<(), EvalError> {
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in names {
        let layer = name
            .rsplit_once('.')
            .map_or(name.as_str(), |(layer, _)| layer);
        let weight = variables
            .get(&format!("{layer}.weight"))
            .ok_or_else(|| EvalError::Input(format!("variable {name} has no layer weight")))?;
        let fan_in: i64 = weight.size()[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let var = &variables[name];
        let values: Vec<f32> = (0..var.numel())
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        let values = Tensor::from_slice(&values).f_view(var.size().as_slice())?;
        tch::no_grad(|| var.shallow_clone().f_copy_(&values))?;
    }
    Ok(())
}

/// Runs this thread's libtorch ops on one intra-op thread until dropped, then restores the
/// previous count (libtorch keeps the count per calling thread under OpenMP).
struct OneThread(i32);

impl OneThread {
    fn enter() -> Self {
        let previous = tch::get_num_threads();
        tch::set_num_threads(1);
        Self(previous)
    }
}

impl Drop for OneThread {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}
