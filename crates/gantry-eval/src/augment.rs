//! Generated digits as training data: how much does adding them help a classifier?
//!
//! [`run`] trains a fresh copy of the evaluator's classifier (same architecture, optimiser,
//! dropout and batch size, see [`crate::classifier`]) on a training set made of
//! - `real_subset` labelled digits from the evaluator's training split (the first 9,000
//!   embedded MNIST-10k digits), chosen by [`real_subset`], plus
//! - optionally, generated digits read from disk ([`read_generated`]),
//!
//! and reports its accuracy on the evaluator's 1,000 held-out digits (images 9000..10000), which
//! neither part can contain. Every arm of a comparison trains the same fixed number of steps
//! ([`DEFAULT_STEPS`] batches of [`BATCH`]) from the same seed, whatever its size, so the only
//! thing that differs between arms is the data. Training is on the CPU, one libtorch thread,
//! deterministic for a given libtorch build and CPU: about 20 ms a step.
//!
//! [`write_subset`] writes the digits `real_subset` chooses as a PNG tree, so a conditional
//! model can be trained on exactly the real data the "real only" arm saw.

use std::path::{Path, PathBuf};

use gantry_data::Dataset;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::classifier::{self, Recipe, Schedule};
use crate::{EvalError, IMAGE_PIXELS, NUM_CLASSES, Reference, TRAIN_IMAGES};

/// Steps [`run`] trains by default: about 10 passes over the full 9,000 digits, enough for the
/// classifier to converge on them, so a small training set is not beaten by a large one only
/// for having been seen more often.
pub const DEFAULT_STEPS: usize = 1500;
/// Images per training step (an epoch's last batch holds the remainder).
pub const BATCH: usize = classifier::TRAIN_BATCH;
/// Real digits a subset is drawn from: the evaluator's training split.
pub const REAL_POOL: usize = TRAIN_IMAGES;

/// What [`run`] trains on, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Real digits to train on, `0..=REAL_POOL` (see [`real_subset`]).
    pub real_subset: usize,
    pub subset_seed: u64,
    /// Generated digits to add: a PNG tree or an IDX pair directory (see [`read_generated`]).
    pub generated: Option<PathBuf>,
    /// Training steps (batches), at least 1.
    pub steps: usize,
    /// Seeds the classifier's initial weights, dropout and batch order.
    pub seed: u64,
}

/// What [`run`] measured (printed by `gantry-eval augment`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Fraction of the 1,000 held-out digits the trained classifier gets right.
    pub test_accuracy: f64,
    /// `real_images + generated_images`.
    pub train_images: usize,
    pub real_images: usize,
    pub generated_images: usize,
    pub steps: usize,
    pub seed: u64,
}

/// Trains on the request's data and tests on the held-out digits.
///
/// The generated digits are read before anything trains, so a bad path fails at once.
pub fn run(request: &Request) -> Result<Report, EvalError> {
    let generated = request
        .generated
        .as_deref()
        .map(read_generated)
        .transpose()?;
    let reference = Reference::load()?;
    let real = subset_of(&reference.train, request.real_subset, request.subset_seed)?;
    let generated_images = generated.as_ref().map_or(0, Dataset::len);
    let train = match &generated {
        None => real,
        Some(extra) => concat(&real, extra)?,
    };
    if train.is_empty() {
        return Err(EvalError::Input(
            "nothing to train on: --real-subset 0 and no generated digits".into(),
        ));
    }
    tracing::info!(
        real = request.real_subset,
        generated = generated_images,
        steps = request.steps,
        seed = request.seed,
        "training a classifier"
    );
    let test_accuracy = train_and_test(&train, &reference.held_out, request.steps, request.seed)?;
    Ok(Report {
        test_accuracy,
        train_images: train.len(),
        real_images: request.real_subset,
        generated_images,
        steps: request.steps,
        seed: request.seed,
    })
}

/// The accuracy on `test` of a classifier trained on `train` for `steps` steps from `seed`.
fn train_and_test(
    train: &Dataset,
    test: &Dataset,
    steps: usize,
    seed: u64,
) -> Result<f64, EvalError> {
    let recipe = Recipe {
        seed,
        schedule: Schedule::Steps(steps),
    };
    let (_vs, net) = classifier::train(train, recipe)?;
    let labels = test.labels().unwrap_or_default();
    let (_, logits) = net.infer(test.images(), test.len())?;
    let predicted = crate::argmax(&logits)?;
    let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(correct as f64 / test.len() as f64)
}

/// `size` labelled digits from the evaluator's training split (the first [`REAL_POOL`]
/// embedded MNIST-10k digits), class-balanced, chosen by `subset_seed`.
///
/// Class-balanced as far as the pool allows: every digit gets `size / 10` (digits 0, 1, …
/// one more each for the remainder), and a digit that has fewer than its share in the pool
/// gives its shortfall to the others in the same way, so `size = REAL_POOL` is the whole pool.
/// Which digits of a class are taken is a seeded shuffle of that class; for one seed a smaller
/// subset is contained in a larger one. The digits are in pool order (increasing index), with
/// their labels and class names `"0"`..`"9"`.
pub fn real_subset(size: usize, subset_seed: u64) -> Result<Dataset, EvalError> {
    subset_of(&Reference::load()?.train, size, subset_seed)
}

fn subset_of(pool: &Dataset, size: usize, seed: u64) -> Result<Dataset, EvalError> {
    if size > pool.len() {
        return Err(EvalError::Input(format!(
            "a subset of {size} real digits: the pool has only {}",
            pool.len()
        )));
    }
    let labels = pool.labels().unwrap_or_default();
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); NUM_CLASSES];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    // Water-filling, one image a class a round: balanced while every class has images left.
    let mut quota = [0usize; NUM_CLASSES];
    let mut left = size;
    while left > 0 {
        for (q, members) in quota.iter_mut().zip(&by_class) {
            if left > 0 && *q < members.len() {
                *q += 1;
                left -= 1;
            }
        }
    }
    // One stream, classes in order, so the choice in one class does not depend on the quota
    // of another: this is what makes subsets of one seed nested.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(size);
    for (members, &q) in by_class.iter_mut().zip(&quota) {
        members.shuffle(&mut rng);
        chosen.extend_from_slice(&members[..q]);
    }
    chosen.sort_unstable();
    Ok(pool.subset(&chosen).with_class_names(digit_names())?)
}

/// `"0"`..`"9"`: the class names of digit data sets, as written to and read from PNG trees.
pub fn digit_names() -> Vec<String> {
    (0..NUM_CLASSES).map(|d| d.to_string()).collect()
}

/// Writes [`real_subset`]`(size, subset_seed)` to `out` as a PNG tree (`out/<digit>/….png`,
/// class names `"0"`..`"9"`), which `data.dataset = "folder:OUT"` reads back with the same
/// pixels and labels. `out` must not exist (nothing is overwritten). Returns the subset.
pub fn write_subset(size: usize, subset_seed: u64, out: &Path) -> Result<Dataset, EvalError> {
    let subset = real_subset(size, subset_seed)?;
    if subset.is_empty() {
        return Err(EvalError::Input(
            "a subset of 0 digits: nothing to write".into(),
        ));
    }
    gantry_data::export::write_png_tree(
        out,
        subset.images(),
        subset.labels().unwrap_or_default(),
        subset.image_shape(),
        &digit_names(),
    )?;
    Ok(subset)
}

/// Reads generated digits: either an IDX pair directory (exactly one `*idx3-ubyte*` image file
/// and one `*idx1-ubyte*` label file in `path`, raw or gzip, as `gantry-eval sample --format
/// idx` writes them; the labels are digits) or a PNG tree `path/<digit>/*.png` (as `--format
/// png` writes it; every class folder must be named by a digit 0-9). The images must be
/// 28×28 grey; a PNG tree's are loaded as `folder:` data sets are (other sizes resized).
pub fn read_generated(path: &Path) -> Result<Dataset, EvalError> {
    let entries = std::fs::read_dir(path).map_err(|e| EvalError::io(path, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EvalError::io(path, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let pick = |tag: &str| -> Vec<&String> { names.iter().filter(|n| n.contains(tag)).collect() };
    let (images, labels) = (pick("idx3-ubyte"), pick("idx1-ubyte"));
    let dataset = match (images.as_slice(), labels.as_slice()) {
        ([], []) => read_png_tree(path)?,
        ([images], [labels]) => read_idx_pair(&path.join(images), &path.join(labels))?,
        _ => {
            return Err(EvalError::Input(format!(
                "{}: expected one *idx3-ubyte* image file and one *idx1-ubyte* label file, \
                 found {images:?} and {labels:?}",
                path.display()
            )));
        }
    };
    if dataset.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no generated digits",
            path.display()
        )));
    }
    Ok(dataset)
}

fn read_idx_pair(images: &Path, labels: &Path) -> Result<Dataset, EvalError> {
    let idx = gantry_data::idx::read_idx_images(images)?;
    if (idx.rows, idx.cols) != (28, 28) {
        return Err(EvalError::Input(format!(
            "{}: images are {}×{}, expected 28×28",
            images.display(),
            idx.rows,
            idx.cols
        )));
    }
    let classes = gantry_data::idx::read_idx_labels(labels)?.labels;
    if classes.len() != idx.len {
        return Err(EvalError::Input(format!(
            "{} has {} labels for the {} images of {}",
            labels.display(),
            classes.len(),
            idx.len,
            images.display()
        )));
    }
    if let Some(bad) = classes.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
        return Err(EvalError::Input(format!(
            "{}: label {bad} is not a digit 0-9",
            labels.display()
        )));
    }
    let name = images.display().to_string();
    Ok(Dataset::new(name, idx.pixels, Some(classes), 1, 28, 28)?)
}

fn read_png_tree(path: &Path) -> Result<Dataset, EvalError> {
    // No unreadable file is tolerated: a damaged export is not a data set to measure.
    let dataset = gantry_data::folder::load(path, 28, 1, 0)?.dataset;
    let Some(names) = dataset.class_names() else {
        return Err(EvalError::Input(format!(
            "{}: not a labelled PNG tree (images must sit in digit folders, PATH/<digit>/*.png)",
            path.display()
        )));
    };
    // The folder's labels index its sorted class folders; a tree holding only some digits
    // ("3" and "7") must still train on digits 3 and 7, not 0 and 1.
    let digit_of: Vec<u8> = names
        .iter()
        .map(|name| {
            name.parse::<u8>()
                .ok()
                .filter(|&d| usize::from(d) < NUM_CLASSES && *name == d.to_string())
                .ok_or_else(|| {
                    EvalError::Input(format!(
                        "{}: class folder {name:?} is not a digit 0-9",
                        path.display()
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let labels: Vec<u8> = dataset
        .labels()
        .unwrap_or_default()
        .iter()
        .map(|&l| digit_of[usize::from(l)])
        .collect();
    debug_assert_eq!(dataset.images().len(), labels.len() * IMAGE_PIXELS);
    Ok(Dataset::new(
        dataset.name().to_owned(),
        dataset.images().to_vec(),
        Some(labels),
        1,
        28,
        28,
    )?)
}

/// `a` followed by `b`, both labelled 1×28×28.
fn concat(a: &Dataset, b: &Dataset) -> Result<Dataset, EvalError> {
    let mut images = a.images().to_vec();
    images.extend_from_slice(b.images());
    let mut labels = a.labels().unwrap_or_default().to_vec();
    labels.extend_from_slice(b.labels().unwrap_or_default());
    let name = format!("{} + {}", a.name(), b.name());
    Ok(Dataset::new(name, images, Some(labels), 1, 28, 28)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of 30 "digits" of one distinct pixel each: class `c` has `c.min(4)` members, so
    /// 0 has none and every class from 4 up has 4.
    fn pool() -> Dataset {
        let labels: Vec<u8> = (0..10u8)
            .flat_map(|c| vec![c; usize::from(c.min(4))])
            .collect();
        let images: Vec<u8> = (0..labels.len() as u8).collect();
        Dataset::new("pool", images, Some(labels), 1, 1, 1).unwrap()
    }

    fn counts(d: &Dataset) -> [usize; NUM_CLASSES] {
        let mut c = [0; NUM_CLASSES];
        for &l in d.labels().unwrap() {
            c[usize::from(l)] += 1;
        }
        c
    }

    #[test]
    fn subsets_are_balanced_as_far_as_the_pool_allows() {
        let p = pool();
        assert_eq!(p.len(), 30);
        // 9 classes have members; 11 = 9 + 2: one each, then class 1 is full and classes 2
        // and 3 get the rest.
        assert_eq!(
            counts(&subset_of(&p, 11, 0).unwrap()),
            [0, 1, 2, 2, 1, 1, 1, 1, 1, 1]
        );
        // 20: two rounds give 1 + 8·2 = 17; class 2 is then full, and 3, 4, 5 get the rest.
        assert_eq!(
            counts(&subset_of(&p, 20, 0).unwrap()),
            [0, 1, 2, 3, 3, 3, 2, 2, 2, 2]
        );
        let all = subset_of(&p, 30, 5).unwrap();
        assert_eq!(all.images(), p.images(), "the whole pool, in pool order");
        assert!(subset_of(&p, 31, 0).is_err());
        assert!(subset_of(&p, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn subsets_of_one_seed_are_nested_and_seeds_differ() {
        let p = pool();
        let pixels = |d: &Dataset| d.images().to_vec();
        let small = pixels(&subset_of(&p, 12, 3).unwrap());
        let large = pixels(&subset_of(&p, 24, 3).unwrap());
        assert!(
            small.iter().all(|x| large.contains(x)),
            "{small:?} ⊄ {large:?}"
        );
        assert!(
            small.windows(2).all(|w| w[0] < w[1]),
            "pool order: {small:?}"
        );
        assert_eq!(
            small,
            pixels(&subset_of(&p, 12, 3).unwrap()),
            "deterministic"
        );
        let others: Vec<Vec<u8>> = (4..10)
            .map(|s| pixels(&subset_of(&p, 12, s).unwrap()))
            .collect();
        assert!(others.iter().any(|o| *o != small), "the seed chooses");
        // Labels stay with their images.
        let s = subset_of(&p, 12, 3).unwrap();
        for (i, &l) in s.labels().unwrap().iter().enumerate() {
            let at = usize::from(s.image(i)[0]);
            assert_eq!(p.labels().unwrap()[at], l);
        }
    }
}
