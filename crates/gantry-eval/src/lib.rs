//! Scores generated MNIST-like digits, in the spirit of FID and the Inception Score.
//!
//! Inception-v3 weights are not available offline, so the feature extractor is a small CNN
//! trained here on the embedded MNIST-10k (first 9,000 images; the last 1,000 are held out).
//! Training is deterministic and takes seconds on a CPU; the weights are cached as
//! safetensors (see [`default_cache_dir`]) with a SHA-256 manifest, so a damaged cache is
//! retrained rather than trusted.
//!
//! For `n` images (`u8`, `n × 28 × 28`), [`Evaluator::score`] reports:
//! - `fid`: the Fréchet distance between Gaussian fits of the classifier's 128 penultimate
//!   features on the images and on the 1,000 held-out real digits ([`stats::frechet_distance`]).
//!   The numbers are on this classifier's scale, not comparable with Inception FIDs.
//! - `inception_score`: `exp(E_x KL(p(y|x) || p(y)))` with the classifier's softmax, from 1 to 10.
//! - `class_histogram` and `classes_covered`: argmax predictions per digit, and how many digits
//!   get at least [`stats::COVERAGE_PERCENT`]% of them (mode collapse shows here first).
//!
//! For images generated for known classes (a conditional model), [`Evaluator::score_labelled`]
//! adds how often the classifier agrees with the class asked for, and a Fréchet distance per
//! class against the held-out digits of that class.
//!
//! [`augment`] measures generated digits differently: as extra training data for a fresh copy
//! of the same classifier, scored by its accuracy on the held-out digits. [`export`] writes a
//! checkpoint's samples to disk.
//!
//! Everything runs on the CPU: scoring a thousand images takes a fraction of a second, and
//! the numbers then do not depend on which device a run trained on.

pub mod augment;
mod cache;
mod classifier;
pub mod export;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::Instant;

use gantry_data::{DataError, Dataset};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub use cache::{CLASSIFIER_VERSION, default_cache_dir};
pub use classifier::FEATURE_DIM;
use classifier::Net;
use stats::Gaussian;

/// Digits 0-9.
pub const NUM_CLASSES: usize = 10;
/// Pixels of one 28×28 image.
pub const IMAGE_PIXELS: usize = 28 * 28;
/// MNIST-10k images the classifier trains on; the rest are the held-out reference set.
pub const TRAIN_IMAGES: usize = 9_000;

/// Errors of evaluation. Messages name the file involved, if any.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] gantry_store::StoreError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Images (or other inputs) of the wrong size or shape.
    #[error("invalid input: {0}")]
    Input(String),
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// [`Evaluator::load`] found no cached classifier.
    #[error("no cached classifier at {0}")]
    NotCached(PathBuf),
    /// A cache file exists but cannot be trusted; [`Evaluator::load_or_train`] retrains.
    #[error("corrupt classifier cache {path}: {reason}")]
    CorruptCache { path: PathBuf, reason: String },
    #[error("cannot write classifier cache {path}: {reason}")]
    CacheWrite { path: PathBuf, reason: String },
}

impl EvalError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The scores of one set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Fréchet distance to the held-out real digits in classifier feature space (0 = same
    /// feature statistics; lower is better).
    pub fid: f64,
    /// `exp(E KL(p(y|x) || p(y)))`, between 1 and 10 (higher is better).
    pub inception_score: f64,
    /// Digits receiving at least [`stats::COVERAGE_PERCENT`]% of the argmax predictions.
    pub classes_covered: u32,
    /// Argmax predictions per digit 0-9.
    pub class_histogram: [u32; NUM_CLASSES],
}

/// The scores of images generated for given classes (see [`Evaluator::score_labelled`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledQuality {
    /// The scores of the images as a whole, as [`Evaluator::score`] gives them.
    #[serde(flatten)]
    pub quality: Quality,
    /// Fraction of the images the classifier assigns to the class they were generated for.
    pub label_accuracy: f64,
    /// One entry per class that occurs among the labels, in increasing class order.
    pub per_class: Vec<ClassScore>,
}

/// The scores of the images generated for one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: u8,
    /// Images labelled with this class.
    pub samples: usize,
    /// Fraction of them the classifier assigns to this class.
    pub accuracy: f64,
    /// Fréchet distance in the classifier's feature space between them and the held-out real
    /// digits of this class (about 100 of each). On the same scale as [`Quality::fid`] but
    /// from far fewer samples, so biased upwards more: compare classes and models at equal
    /// sample counts.
    pub fid: f64,
}

/// Where the evaluator's classifier came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClassifierSource {
    /// Loaded from a valid cache entry.
    Cache,
    /// Trained by this call (cache missing or corrupt), in `seconds`.
    Trained { seconds: f64 },
}

/// A trained classifier and the reference statistics of the held-out digits.
///
/// `Send` but not `Sync` (libtorch tensors are not); share one behind a `Mutex`.
#[derive(Debug)]
pub struct Evaluator {
    net: Net,
    /// Owns the weights `net` uses.
    _vs: VarStore,
    reference: Gaussian,
    /// The held-out digits' fit per digit, indexed by digit.
    class_reference: Vec<Gaussian>,
    accuracy: f64,
    source: ClassifierSource,
    weights_path: PathBuf,
}

impl Evaluator {
    /// Loads the cached classifier from `cache_dir`, or trains one (seconds on a CPU) when the
    /// cache has none or a corrupt one, and caches it.
    ///
    /// A cache that cannot be written (read-only directory, full disk) is logged and
    /// otherwise ignored: the evaluator is still good, only the next call trains again.
    /// Training runs libtorch on one intra-op thread and restores the count afterwards; the
    /// BLAS thread count is process-wide, so other threads' libtorch work may run on one thread
    /// for those seconds.
    pub fn load_or_train(cache_dir: &Path) -> Result<Self, EvalError> {
        let data = Reference::load()?;
        let entry = cache::Entry::new(cache_dir, &data.sha256);
        match Self::from_cache(&data, &entry) {
            Ok(evaluator) => return Ok(evaluator),
            Err(EvalError::NotCached(_)) => {
                tracing::info!(cache = %cache_dir.display(), "no cached MNIST classifier; training one");
            }
            Err(e @ EvalError::CorruptCache { .. }) => {
                tracing::warn!("{e}; retraining");
            }
            Err(e) => return Err(e),
        }

        let start = Instant::now();
        let (vs, net) = classifier::train(&data.train, classifier::Recipe::EVALUATOR)?;
        let seconds = start.elapsed().as_secs_f64();
        let evaluator = Self::new(
            vs,
            net,
            &data,
            ClassifierSource::Trained { seconds },
            &entry.weights,
        )?;
        tracing::info!(
            seconds = format!("{seconds:.1}"),
            held_out_accuracy = evaluator.accuracy,
            "trained the MNIST classifier"
        );
        if let Err(e) = entry.store(&evaluator._vs, &data.sha256, evaluator.accuracy, seconds) {
            tracing::warn!("{e}; the classifier will be retrained next time");
        }
        Ok(evaluator)
    }

    /// Loads the cached classifier from `cache_dir`, never training:
    /// [`EvalError::NotCached`] or [`EvalError::CorruptCache`] when there is none to trust.
    pub fn load(cache_dir: &Path) -> Result<Self, EvalError> {
        let data = Reference::load()?;
        Self::from_cache(&data, &cache::Entry::new(cache_dir, &data.sha256))
    }

    fn from_cache(data: &Reference, entry: &cache::Entry) -> Result<Self, EvalError> {
        let mut vs = VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root());
        entry.load(&mut vs, &data.sha256)?;
        Self::new(vs, net, data, ClassifierSource::Cache, &entry.weights)
    }

    /// Computes the held-out accuracy and reference statistics in one pass.
    fn new(
        vs: VarStore,
        net: Net,
        data: &Reference,
        source: ClassifierSource,
        weights_path: &Path,
    ) -> Result<Self, EvalError> {
        let held = &data.held_out;
        let (features, logits) = net.infer(held.images(), held.len())?;
        let labels = held.labels().unwrap_or_default();
        let predicted = argmax(&logits)?;
        let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        let class_reference = (0..NUM_CLASSES as u8)
            .map(|digit| Gaussian::fit_tensor(&rows_of(&features, labels, digit)?))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            net,
            _vs: vs,
            reference: Gaussian::fit_tensor(&features)?,
            class_reference,
            accuracy: correct as f64 / held.len() as f64,
            source,
            weights_path: weights_path.to_owned(),
        })
    }

    /// Fraction of the 1,000 held-out digits the classifier labels correctly.
    pub fn classifier_accuracy(&self) -> f64 {
        self.accuracy
    }

    pub fn source(&self) -> ClassifierSource {
        self.source
    }

    /// The cache file the weights were loaded from or (attempted to be) written to.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// Scores `n` images given as `n × 28 × 28` bytes (0 = background, 255 = ink, as in
    /// MNIST). `n` must be at least 2 (a covariance needs two samples); FID is biased upwards
    /// for small `n`, so compare scores of equal `n` (1,000 is customary here).
    pub fn score(&self, images_u8: &[u8], n: usize) -> Result<Quality, EvalError> {
        if n < 2 {
            return Err(EvalError::Input(format!(
                "scoring needs at least 2 images, got {n}"
            )));
        }
        let (features, logits) = self.net.infer(images_u8, n)?;
        self.quality(&features, &logits)
    }

    /// [`Evaluator::score`] of images that were generated for known classes: `labels[i]` is
    /// the digit image `i` was asked to be (`images` holds `labels.len()` images).
    ///
    /// Every label must be a digit 0-9, and every class that occurs must occur at least twice
    /// (its Fréchet distance needs a covariance); classes that do not occur are left out of
    /// `per_class`. The whole-set scores compare against all held-out digits, so a set
    /// generated for only some digits has a high `fid` by design; read `per_class` then.
    pub fn score_labelled(
        &self,
        images_u8: &[u8],
        labels: &[u8],
    ) -> Result<LabelledQuality, EvalError> {
        check_labelled(images_u8, labels)?;
        let n = labels.len();
        let mut counts = [0usize; NUM_CLASSES];
        for &l in labels {
            counts[usize::from(l)] += 1;
        }

        let (features, logits) = self.net.infer(images_u8, n)?;
        let quality = self.quality(&features, &logits)?;
        let predicted = argmax(&logits)?;
        let agrees = |class: Option<u8>| {
            predicted
                .iter()
                .zip(labels)
                .filter(|&(p, l)| p == l && class.is_none_or(|c| c == *l))
                .count()
        };
        let mut per_class = Vec::new();
        for (class, &samples) in (0u8..).zip(&counts) {
            if samples == 0 {
                continue;
            }
            let fit = Gaussian::fit_tensor(&rows_of(&features, labels, class)?)?;
            let fid = stats::frechet_distance(&fit, &self.class_reference[usize::from(class)])?;
            per_class.push(ClassScore {
                class,
                samples,
                accuracy: agrees(Some(class)) as f64 / samples as f64,
                fid,
            });
        }
        Ok(LabelledQuality {
            quality,
            label_accuracy: agrees(None) as f64 / n as f64,
            per_class,
        })
    }

    /// The whole-set scores from the images' features and logits.
    fn quality(&self, features: &Tensor, logits: &Tensor) -> Result<Quality, EvalError> {
        let n = features.size()[0] as usize;
        let fid = stats::frechet_distance(&Gaussian::fit_tensor(features)?, &self.reference)?;
        let probs = stats::to_host(
            &logits
                .f_to_kind(Kind::Double)?
                .f_softmax(-1, Kind::Double)?,
        )?;
        let inception_score = stats::inception_score(&probs, n, NUM_CLASSES)?;
        let class_histogram = stats::class_histogram(&argmax(logits)?);
        Ok(Quality {
            fid,
            inception_score,
            classes_covered: stats::classes_covered(&class_histogram),
            class_histogram,
        })
    }

    /// The classifier's digit for each of `n` images (`n × 28 × 28` bytes).
    pub fn classify(&self, images_u8: &[u8], n: usize) -> Result<Vec<u8>, EvalError> {
        let (_, logits) = self.net.infer(images_u8, n)?;
        argmax(&logits)
    }
}

/// Checks what [`Evaluator::score_labelled`] needs of its input, without a classifier: one
/// 28×28 image per label, at least 2 images, every label a digit 0-9, and no class that
/// occurs only once.
pub fn check_labelled(images_u8: &[u8], labels: &[u8]) -> Result<(), EvalError> {
    let n = labels.len();
    if images_u8.len() != n * IMAGE_PIXELS {
        return Err(EvalError::Input(format!(
            "{n} labels need {n} × 28 × 28 = {} bytes of pixels, got {} ({} images)",
            n * IMAGE_PIXELS,
            images_u8.len(),
            images_u8.len() as f64 / IMAGE_PIXELS as f64
        )));
    }
    if n < 2 {
        return Err(EvalError::Input(format!(
            "scoring needs at least 2 images, got {n}"
        )));
    }
    if let Some((i, &bad)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= NUM_CLASSES)
    {
        return Err(EvalError::Input(format!(
            "label {bad} (image {i}) is not a digit: the classifier knows classes 0-9"
        )));
    }
    let mut counts = [0usize; NUM_CLASSES];
    for &l in labels {
        counts[usize::from(l)] += 1;
    }
    if let Some(single) = counts.iter().position(|&c| c == 1) {
        return Err(EvalError::Input(format!(
            "class {single} has 1 image; a per-class score needs at least 2"
        )));
    }
    Ok(())
}

/// The rows of `features` whose label is `class`.
fn rows_of(features: &Tensor, labels: &[u8], class: u8) -> Result<Tensor, EvalError> {
    let rows: Vec<i64> = (0..)
        .zip(labels)
        .filter(|&(_, &l)| l == class)
        .map(|(i, _)| i)
        .collect();
    Ok(features.f_index_select(0, &Tensor::from_slice(&rows))?)
}

fn argmax(logits: &Tensor) -> Result<Vec<u8>, EvalError> {
    let idx = logits.f_argmax(-1, false)?.f_to_kind(Kind::Uint8)?;
    Ok(Vec::<u8>::try_from(&idx)?)
}

/// MNIST-10k, split into the classifier's training set and the held-out reference digits.
pub(crate) struct Reference {
    pub(crate) train: Dataset,
    pub(crate) held_out: Dataset,
    /// SHA-256 of all images and labels: keys the cache, so other data means another entry.
    sha256: String,
}

impl Reference {
    pub(crate) fn load() -> Result<Self, EvalError> {
        let all = gantry_data::mnist_10k()?;
        let mut bytes = all.images().to_vec();
        bytes.extend_from_slice(all.labels().unwrap_or_default());
        let sha256 = cache::sha256_hex(&bytes);
        let (train, held_out) = all.split(TRAIN_IMAGES);
        Ok(Self {
            train,
            held_out,
            sha256,
        })
    }
}

/// The 1,000 held-out real digits FID compares against, `1000 × 28 × 28` bytes, with their
/// labels: for baselines and tests.
pub fn held_out_digits() -> Result<(Vec<u8>, Vec<u8>), EvalError> {
    let reference = Reference::load()?;
    let held = reference.held_out;
    Ok((
        held.images().to_vec(),
        held.labels().unwrap_or_default().to_vec(),
    ))
}
