//! Class-conditional VAEs (mlp and conv) and PixelCNNs (Bernoulli and softmax) through the
//! `TrainTask` seam: building, the world-size invariance of a labelled step, that the label
//! changes the samples, label checks, save → load, and training in bf16.

use std::sync::{Arc, Barrier, Mutex};

use gantry_config::{Family, PixelOutput, Precision, Settings, VaeKind};
use gantry_models::task::{
    self, Batch, BatchSource, ExternalError, GradReduce, ModelShape, TrainTask, cycled_labels,
};
use tch::{Device, Kind, Tensor};

const IMAGE: [i64; 3] = [1, 8, 8];
const CLASSES: usize = 3;
/// Rows of a global batch.
const ROWS: usize = 8;

/// The conditional families under test, by name.
fn variants() -> Vec<(&'static str, Settings)> {
    let mut base = Settings::default();
    base.model.conditional = true;
    base.vae.latent_dim = 4;
    base.vae.hidden = 16;
    base.autoregressive.channels = 4;
    base.autoregressive.residual_blocks = 1;
    let with = |family: Family, edit: &dyn Fn(&mut Settings)| {
        let mut s = base.clone();
        s.model.family = family;
        edit(&mut s);
        s
    };
    vec![
        ("mlp vae", with(Family::Vae, &|s| s.vae.kind = VaeKind::Mlp)),
        (
            "conv vae",
            with(Family::Vae, &|s| s.vae.kind = VaeKind::Conv),
        ),
        (
            "bernoulli pixelcnn",
            with(Family::Autoregressive, &|s| {
                s.autoregressive.output = PixelOutput::Bernoulli
            }),
        ),
        (
            "softmax pixelcnn",
            with(Family::Autoregressive, &|s| {
                s.autoregressive.output = PixelOutput::Softmax
            }),
        ),
    ]
}

fn shape(classes: Option<usize>) -> ModelShape {
    ModelShape {
        image: IMAGE,
        classes,
    }
}

fn build(settings: &Settings) -> Box<dyn TrainTask> {
    task::build(settings, shape(Some(CLASSES)), Device::Cpu).unwrap()
}

/// Global batch `step`: row r is of class (r + step) mod 3, and its pixels tell the classes
/// apart (dark, bright, a checkerboard), with a little variation by row and pixel. Pixels are
/// on the 8-bit grid, in [-1, 1], as the data pipeline gives them.
fn global_batch(step: u64) -> (Tensor, Tensor) {
    let pixels = (IMAGE[1] * IMAGE[2]) as usize;
    let mut images = Vec::with_capacity(ROWS * pixels);
    let mut labels = Vec::with_capacity(ROWS);
    for r in 0..ROWS {
        let class = (r + step as usize) % CLASSES;
        labels.push(class as i64);
        for p in 0..pixels {
            let base: f64 = match class {
                0 => 20.0,
                1 => 235.0,
                _ if (p + p / IMAGE[2] as usize).is_multiple_of(2) => 235.0,
                _ => 20.0,
            };
            let byte = (base + 15.0 * ((r * 7 + p) as f64).sin()).round();
            images.push((byte / 127.5 - 1.0) as f32);
        }
    }
    let images = Tensor::from_slice(&images).view([ROWS as i64, IMAGE[0], IMAGE[1], IMAGE[2]]);
    (images, Tensor::from_slice(&labels))
}

/// Rows `first..first + rows` of [`global_batch`]`(step)`, as one rank sees them.
struct Rows {
    step: u64,
    first: usize,
    rows: usize,
    labelled: bool,
}

impl BatchSource for Rows {
    fn batch(&mut self, i: u64) -> Result<Batch, ExternalError> {
        let (images, labels) = global_batch(self.step);
        let (first, rows) = (self.first as i64, self.rows as i64);
        Ok(Batch {
            stream: self.step + i,
            first_row: self.first,
            images: images.narrow(0, first, rows),
            labels: self.labelled.then(|| labels.narrow(0, first, rows)),
        })
    }
}

fn rows(step: u64, first: usize, rows: usize) -> Rows {
    Rows {
        step,
        first,
        rows,
        labelled: true,
    }
}

/// A world of one.
struct Alone;

impl GradReduce for Alone {
    fn average(&mut self, _flat: &mut Tensor) -> Result<(), ExternalError> {
        Ok(())
    }

    fn is_identity(&self) -> bool {
        true
    }
}

/// One of two ranks run as threads: each average waits for both ranks' gradients, and both
/// get their mean.
struct TwoRanks {
    rank: usize,
    shared: Arc<(Mutex<[Vec<f32>; 2]>, Barrier)>,
}

impl GradReduce for TwoRanks {
    fn is_identity(&self) -> bool {
        false
    }

    fn average(&mut self, flat: &mut Tensor) -> Result<(), ExternalError> {
        let (slots, barrier) = &*self.shared;
        slots.lock().unwrap()[self.rank] = Vec::<f32>::try_from(&*flat)?;
        barrier.wait();
        let mean: Vec<f32> = {
            let slots = slots.lock().unwrap();
            slots[0]
                .iter()
                .zip(&slots[1])
                .map(|(a, b)| (a + b) / 2.0)
                .collect()
        };
        // Neither rank overwrites its slot before both have read.
        barrier.wait();
        flat.copy_(&Tensor::from_slice(&mean));
        Ok(())
    }
}

fn flat_params(task: &dyn TrainTask) -> Vec<f32> {
    Vec::<f32>::try_from(&task.parts()[0].params.flat).unwrap()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn train(task: &mut dyn TrainTask, steps: u64) {
    for step in 0..steps {
        let outcome = task.step(&mut rows(step, 0, ROWS), &mut Alone).unwrap();
        assert!(outcome.applied, "{}: step {step} skipped", task.describe());
        for (name, value) in outcome.to_host() {
            assert!(value.is_finite(), "{}: {name} = {value}", task.describe());
        }
    }
}

#[test]
fn conditioning_needs_classes_and_an_unconditional_model_refuses_them() {
    for (name, settings) in variants() {
        let err = task::build(&settings, IMAGE, Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("labelled data set"),
            "{name}: {err}"
        );
        let mut plain = settings.clone();
        plain.model.conditional = false;
        let err = task::build(&plain, shape(Some(CLASSES)), Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("unconditional"), "{name}: {err}");

        let conditional = build(&settings);
        assert_eq!(conditional.classes(), Some(CLASSES), "{name}");
        assert!(conditional.describe().contains("conditional"), "{name}");
        let unconditional = task::build(&plain, IMAGE, Device::Cpu).unwrap();
        assert_eq!(unconditional.classes(), None, "{name}");
    }
}

/// An unconditional model's variables are untouched by the conditional design (names, shapes,
/// the seed's draws): a conditional model has all of them with the same initial values, and
/// only `*_class` variables besides.
#[test]
fn a_conditional_model_adds_class_variables_after_the_unconditional_ones() {
    for (name, settings) in variants() {
        let conditional = build(&settings);
        let mut plain = settings.clone();
        plain.model.conditional = false;
        let unconditional = task::build(&plain, IMAGE, Device::Cpu).unwrap();
        let ours = conditional.parts()[0].vs.variables();
        let theirs = unconditional.parts()[0].vs.variables();
        assert!(theirs.keys().all(|k| !k.contains("class")), "{name}");
        for (var, value) in &theirs {
            let got = ours
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no `{var}`"));
            assert!(got.equal(value), "{name}: `{var}` differs");
        }
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(!extra.is_empty(), "{name}: no class variables");
        assert!(
            extra.iter().all(|k| k.contains("_class")),
            "{name}: {extra:?}"
        );
    }
}

/// One world of 1 × 8 rows and two ranks × 4 rows (threads, gradients averaged) reach the same
/// parameters after each of 4 labelled steps.
#[test]
fn two_ranks_of_a_conditional_model_step_as_one() {
    for (name, settings) in variants() {
        let mut alone = build(&settings);
        let reference: Vec<Vec<f32>> = (0..4)
            .map(|step| {
                alone.step(&mut rows(step, 0, ROWS), &mut Alone).unwrap();
                flat_params(alone.as_ref())
            })
            .collect();

        let shared = Arc::new((Mutex::new([Vec::new(), Vec::new()]), Barrier::new(2)));
        let ranks: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let mut task = build(&settings);
                    let mut reduce = TwoRanks {
                        rank,
                        shared: Arc::clone(&shared),
                    };
                    scope.spawn(move || {
                        let half = ROWS / 2;
                        (0..4)
                            .map(|step| {
                                let mut data = rows(step, rank * half, half);
                                task.step(&mut data, &mut reduce).unwrap();
                                flat_params(task.as_ref())
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for step in 0..4 {
            assert_eq!(ranks[0][step], ranks[1][step], "{name}: ranks diverge");
            let gap = max_difference(&reference[step], &ranks[0][step]);
            assert!(gap < 1e-5, "{name}: step {step} off by {gap}");
        }
        // The model moved: the comparison is not of two untouched initialisations.
        let initial = flat_params(build(&settings).as_ref());
        assert!(max_difference(&initial, &reference[3]) > 1e-4, "{name}");
    }
}

/// The mean intensity of `images` (8-bit), in [0, 255].
fn mean(images: &[u8]) -> f64 {
    images.iter().map(|&p| f64::from(p)).sum::<f64>() / images.len().max(1) as f64
}

#[test]
fn the_label_changes_the_samples_and_sampling_is_deterministic() {
    let n = 6;
    let pixels = (IMAGE[1] * IMAGE[2]) as usize;
    for (name, mut settings) in variants() {
        // A larger step size makes a few steps enough to tell dark from bright digits.
        settings.vae.lr = 1e-2;
        settings.autoregressive.lr = 1e-2;
        let mut task = build(&settings);
        if settings.model.family == Family::Autoregressive {
            // The class biases start at zero: the label cannot matter yet.
            assert_eq!(
                task.sample_labelled_u8(&[0; 6], 3).unwrap(),
                task.sample_labelled_u8(&[1; 6], 3).unwrap(),
                "{name}"
            );
        }
        train(task.as_mut(), 30);
        let dark = task.sample_labelled_u8(&[0; 6], 3).unwrap();
        let bright = task.sample_labelled_u8(&[1; 6], 3).unwrap();
        assert_eq!(dark.len(), n * pixels, "{name}");
        assert_ne!(dark, bright, "{name}: the label is ignored");
        assert!(
            mean(&bright) > mean(&dark) + 10.0,
            "{name}: class 1 (bright) {} vs class 0 (dark) {}",
            mean(&bright),
            mean(&dark)
        );
        // A pure function of (seed, labels); image i depends on its own label only.
        assert_eq!(dark, task.sample_labelled_u8(&[0; 6], 3).unwrap(), "{name}");
        let mixed = task.sample_labelled_u8(&[0, 1, 0, 1, 0, 1], 3).unwrap();
        for (i, image) in mixed.chunks(pixels).enumerate() {
            let alike = if i.is_multiple_of(2) { &dark } else { &bright };
            assert_eq!(image, &alike[i * pixels..][..pixels], "{name}: image {i}");
        }
        // sample_u8 cycles the classes.
        assert_eq!(
            task.sample_u8(n, 3),
            task.sample_labelled_u8(&cycled_labels(n, CLASSES), 3)
                .unwrap(),
            "{name}"
        );
        if settings.model.family == Family::Vae {
            // Decoder means of the prior's z: another seed, other images.
            assert_ne!(dark, task.sample_labelled_u8(&[0; 6], 4).unwrap(), "{name}");
        }
    }
}

#[test]
fn bad_labels_are_refused_with_their_class_and_unlabelled_batches_fail() {
    for (name, settings) in variants() {
        let mut task = build(&settings);
        let err = task.sample_labelled_u8(&[0, 3], 1).unwrap_err().to_string();
        assert!(err.contains("class 3"), "{name}: {err}");
        assert!(
            task.sample_labelled_u8(&[], 1).unwrap().is_empty(),
            "{name}"
        );

        let before = flat_params(task.as_ref());
        let mut unlabelled = Rows {
            labelled: false,
            ..rows(0, 0, ROWS)
        };
        let err = task.step(&mut unlabelled, &mut Alone).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a conditional model needs labelled batches",
            "{name}"
        );
        assert_eq!(
            before,
            flat_params(task.as_ref()),
            "{name}: a failed step moved"
        );
        // Labels of the wrong kind or count are refused too, not a panic.
        let mut short = rows(0, 0, ROWS);
        let (images, labels) = global_batch(0);
        let mut wrong = |labels: Tensor| {
            struct One(Option<Batch>);
            impl BatchSource for One {
                fn batch(&mut self, _: u64) -> Result<Batch, ExternalError> {
                    Ok(self.0.take().expect("one batch"))
                }
            }
            let batch = Batch {
                stream: 0,
                first_row: 0,
                images: images.shallow_clone(),
                labels: Some(labels),
            };
            task.step(&mut One(Some(batch)), &mut Alone).unwrap_err()
        };
        let err = wrong(labels.narrow(0, 0, 3)).to_string();
        assert!(err.contains("one per image"), "{name}: {err}");
        let err = wrong(labels.to_kind(Kind::Float)).to_string();
        assert!(err.contains("int64"), "{name}: {err}");
        let err = wrong(labels.ones_like() * 7).to_string();
        assert!(!err.is_empty(), "{name}");
        task.step(&mut short, &mut Alone).unwrap();

        // Held-out images come without labels: no reconstructions, no likelihood.
        let images = vec![0u8; 2 * IMAGE.iter().product::<i64>() as usize];
        assert!(task.reconstruct_u8(&images).is_none(), "{name}");
        assert!(task.likelihood(&images, &settings).is_none(), "{name}");

        // An unconditional model refuses classes and labelled batches.
        let mut plain_settings = settings.clone();
        plain_settings.model.conditional = false;
        let mut plain = task::build(&plain_settings, IMAGE, Device::Cpu).unwrap();
        let err = plain.sample_labelled_u8(&[0], 1).unwrap_err().to_string();
        assert!(err.contains("unconditional"), "{name}: {err}");
        let err = plain.step(&mut rows(0, 0, ROWS), &mut Alone).unwrap_err();
        assert!(err.to_string().contains("unconditional"), "{name}: {err}");
        assert!(
            plain.likelihood(&images, &plain_settings).is_some(),
            "{name}"
        );
    }
}

#[test]
fn a_saved_conditional_model_loads_to_the_same_samples() {
    let labels = [2, 0, 1, 2];
    for (name, settings) in variants() {
        let mut task = build(&settings);
        train(task.as_mut(), 3);
        let dir = tempfile::tempdir().unwrap();
        task.save(dir.path()).unwrap();
        let expected = task.sample_labelled_u8(&labels, 5).unwrap();

        let mut other_seed = settings.clone();
        other_seed.train.seed += 1;
        let mut other = build(&other_seed);
        assert_ne!(
            other.sample_labelled_u8(&labels, 5).unwrap(),
            expected,
            "{name}: the seeds' models already agree"
        );
        other.load(dir.path()).unwrap();
        assert_eq!(
            other.sample_labelled_u8(&labels, 5).unwrap(),
            expected,
            "{name}"
        );
        assert!(
            flat_params(other.as_ref()) == flat_params(task.as_ref()),
            "{name}: parameters differ after loading"
        );
        // Training resumes identically from the loaded state (moments included), given the
        // seed that keys the step's draws.
        let mut resumed = build(&settings);
        resumed.load(dir.path()).unwrap();
        resumed
            .set_optimizer_steps(task.parts()[0].name, 3)
            .unwrap();
        task.step(&mut rows(3, 0, ROWS), &mut Alone).unwrap();
        resumed.step(&mut rows(3, 0, ROWS), &mut Alone).unwrap();
        assert!(
            flat_params(resumed.as_ref()) == flat_params(task.as_ref()),
            "{name}: the resumed step differs"
        );

        // Another class count, or an unconditional checkpoint, does not load.
        let mut four = task::build(&settings, shape(Some(4)), Device::Cpu).unwrap();
        assert!(four.load(dir.path()).is_err(), "{name}");
        let mut plain_settings = settings.clone();
        plain_settings.model.conditional = false;
        let plain = task::build(&plain_settings, IMAGE, Device::Cpu).unwrap();
        let plain_dir = tempfile::tempdir().unwrap();
        plain.save(plain_dir.path()).unwrap();
        let err = task.load(plain_dir.path()).unwrap_err().to_string();
        assert!(err.contains("_class"), "{name}: {err}");
    }
}

/// Keeps a copy of every gradient it is handed (a world of one otherwise).
#[derive(Default)]
struct Recorded(Vec<Tensor>);

impl GradReduce for Recorded {
    fn average(&mut self, flat: &mut Tensor) -> Result<(), ExternalError> {
        self.0.push(flat.copy());
        Ok(())
    }

    fn is_identity(&self) -> bool {
        true
    }
}

/// `train.precision = "bf16"` for the VAEs and PixelCNNs: a step's fp32 gradient and
/// statistics are finite, and the gradient points where the fp32 step's does (cosine > 0.98)
/// without being equal to it, which shows the networks really ran in bfloat16. The class
/// biases (fp32 tables added to bf16 features) are on the way in each of them.
#[test]
fn bf16_steps_follow_fp32_ones() {
    for (name, settings) in variants() {
        let mut grads = Vec::new();
        for precision in [Precision::Fp32, Precision::Bf16] {
            let mut s = settings.clone();
            s.train.precision = precision;
            let mut task = build(&s);
            let mut recorded = Recorded::default();
            let outcome = task.step(&mut rows(0, 0, ROWS), &mut recorded).unwrap();
            assert!(outcome.applied, "{name} {precision}");
            for (statistic, value) in outcome.to_host() {
                assert!(
                    value.is_finite(),
                    "{name} {precision}: {statistic} = {value}"
                );
            }
            let [grad] = <[Tensor; 1]>::try_from(recorded.0).unwrap();
            assert_eq!(grad.kind(), Kind::Float, "{name} {precision}");
            assert!(
                bool::try_from(grad.isfinite().all()).unwrap(),
                "{name} {precision}"
            );
            assert_eq!(task.parts()[0].params.flat.kind(), Kind::Float);
            grads.push(grad);
        }
        let (full, half) = (&grads[0], &grads[1]);
        let cosine = (full * half).sum(Kind::Double).double_value(&[])
            / (full.norm().double_value(&[]) * half.norm().double_value(&[]));
        assert!(cosine > 0.98, "{name}: gradient cosine {cosine}");
        assert!(!full.equal(half), "{name}: gradient identical in bf16");
    }
}
