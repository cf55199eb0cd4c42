//! End-to-end tests: one classifier, trained once into a cache shared by every test here
//! (and by the binary runs), plus one deliberate retraining in the corruption test.

mod common;
use common::{assert_fails_with, json_of};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use gantry_eval::{ClassifierSource, EvalError, Evaluator, IMAGE_PIXELS, Quality};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Shared {
    cache_dir: PathBuf,
    evaluator: Mutex<Evaluator>,
}

/// Trains the shared classifier into a fresh cache directory on first use.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Under target/: wiped here rather than kept, so a cache from an older build of this
        // crate (same version string, different recipe during development) is never reused.
        let cache_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gantry-eval-cache");
        let _ = std::fs::remove_dir_all(&cache_dir);
        let evaluator = Evaluator::load_or_train(&cache_dir).unwrap();
        let ClassifierSource::Trained { seconds } = evaluator.source() else {
            panic!("an empty cache must train, got {:?}", evaluator.source());
        };
        eprintln!(
            "classifier: held-out accuracy {:.4}, trained in {seconds:.1} s ({} libtorch threads)",
            evaluator.classifier_accuracy(),
            tch::get_num_threads()
        );
        Shared {
            cache_dir,
            evaluator: Mutex::new(evaluator),
        }
    })
}

fn evaluator() -> MutexGuard<'static, Evaluator> {
    shared().evaluator.lock().unwrap_or_else(|e| e.into_inner())
}

fn held_out() -> (Vec<u8>, Vec<u8>) {
    gantry_eval::held_out_digits().unwrap()
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * IMAGE_PIXELS).map(|_| rng.r#gen::<u8>()).collect()
}

#[test]
fn classifier_is_accurate_on_held_out_digits() {
    let acc = evaluator().classifier_accuracy();
    assert!(acc >= 0.97, "held-out accuracy {acc}");
}

#[test]
fn fid_orders_same_digits_other_digits_and_noise() {
    let ev = evaluator();
    let (held, _) = held_out();
    let same = ev.score(&held, 1000).unwrap();
    // Real digits the reference set does not contain: the first 1,000 of the training split.
    let all = gantry_data::mnist_10k().unwrap();
    let other = ev
        .score(&all.images()[..1000 * IMAGE_PIXELS], 1000)
        .unwrap();
    let random = ev.score(&noise(1000, 1), 1000).unwrap();
    eprintln!("held-out vs itself: {same:?}");
    eprintln!("other real digits:  {other:?}");
    eprintln!("uniform noise:      {random:?}");

    assert!(
        same.fid < 1e-3 * random.fid,
        "self FID {} vs noise {}",
        same.fid,
        random.fid
    );
    assert!(
        other.fid > same.fid,
        "other digits {} vs self {}",
        other.fid,
        same.fid
    );
    assert!(
        random.fid > 50.0 * other.fid,
        "noise {} vs real {}",
        random.fid,
        other.fid
    );
    assert_eq!(same.classes_covered, 10);
    assert_eq!(other.classes_covered, 10);
}

#[test]
fn inception_score_is_near_ten_for_real_digits_and_one_for_a_repeated_image() {
    let ev = evaluator();
    let (held, _) = held_out();
    let real = ev.score(&held, 1000).unwrap();
    assert!(
        real.inception_score > 8.0 && real.inception_score <= 10.0,
        "{real:?}"
    );

    let one = held[..IMAGE_PIXELS].repeat(500);
    let repeated = ev.score(&one, 500).unwrap();
    eprintln!("one image x 500: {repeated:?}");
    assert!(
        (repeated.inception_score - 1.0).abs() < 1e-3,
        "{repeated:?}"
    );
    assert_eq!(repeated.classes_covered, 1);
    assert_eq!(repeated.class_histogram.iter().sum::<u32>(), 500);
    assert!(
        repeated.fid > real.fid + 1.0,
        "one repeated digit is far from the real spread"
    );
}

#[test]
fn histogram_and_coverage_on_only_ones_and_sevens() {
    let ev = evaluator();
    let (held, labels) = held_out();
    let predicted = ev.classify(&held, 1000).unwrap();
    // The classifier agrees with the labels on these digits (a sanity check of `classify`).
    let ones: Vec<usize> = (0..1000)
        .filter(|&i| labels[i] == 1 && predicted[i] == 1)
        .collect();
    let sevens: Vec<usize> = (0..1000)
        .filter(|&i| labels[i] == 7 && predicted[i] == 7)
        .collect();
    let n_ones = labels.iter().filter(|&&l| l == 1).count();
    assert!(
        ones.len() * 100 >= n_ones * 95,
        "{} of {n_ones} ones recognised",
        ones.len()
    );
    // 150 ones, 48 sevens and one digit predicted as 3: 1/199 < 1%, so 2 classes covered.
    let three = (0..1000).find(|&i| predicted[i] == 3).unwrap();
    let pick: Vec<usize> = ones[..100]
        .iter()
        .cycle()
        .take(150)
        .chain(&sevens[..48])
        .chain(std::iter::once(&three))
        .copied()
        .collect();
    let images: Vec<u8> = pick
        .iter()
        .flat_map(|&i| held[i * IMAGE_PIXELS..][..IMAGE_PIXELS].to_vec())
        .collect();
    let q = ev.score(&images, pick.len()).unwrap();
    assert_eq!(q.class_histogram, [0, 150, 0, 1, 0, 0, 0, 48, 0, 0]);
    assert_eq!(q.classes_covered, 2);
    assert!(q.inception_score > 1.5 && q.inception_score < 2.5, "{q:?}");
}

#[test]
fn score_rejects_wrong_sizes() {
    let ev = evaluator();
    assert!(matches!(
        ev.score(&[0; IMAGE_PIXELS * 3], 2),
        Err(EvalError::Input(_))
    ));
    assert!(matches!(
        ev.score(&[0; IMAGE_PIXELS], 1),
        Err(EvalError::Input(_))
    ));
}

#[test]
fn second_load_comes_from_the_cache_with_the_same_weights() {
    let (held, _) = held_out();
    let expected = evaluator().score(&held[..300 * IMAGE_PIXELS], 300).unwrap();
    let again = Evaluator::load_or_train(&shared().cache_dir).unwrap();
    assert_eq!(again.source(), ClassifierSource::Cache);
    assert_eq!(
        again.classifier_accuracy(),
        evaluator().classifier_accuracy()
    );
    let q = again.score(&held[..300 * IMAGE_PIXELS], 300).unwrap();
    assert_eq!(q.class_histogram, expected.class_histogram);
    // Same weights, but not necessarily bit-identical features: a retraining elsewhere in this
    // process (the corruption test) briefly sets libtorch's process-wide BLAS threads to 1,
    // which reorders f32 sums (measured: 2.6e-8 relative).
    assert!(
        (q.fid - expected.fid).abs() <= 1e-6 * expected.fid.max(1.0),
        "{q:?} vs {expected:?}"
    );
}

fn copy_cache(from: &Path, to: &Path) -> (PathBuf, PathBuf) {
    let (mut weights, mut manifest) = (None, None);
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let dest = to.join(&name);
        if name.starts_with('.') {
            continue; // a temporary: there should be none, and none is needed
        }
        std::fs::copy(&path, &dest).unwrap();
        if name.ends_with(".safetensors") {
            weights = Some(dest);
        } else if name.ends_with(".json") {
            manifest = Some(dest);
        }
    }
    (
        weights.expect("cached weights"),
        manifest.expect("cache manifest"),
    )
}

#[test]
fn damaged_cache_is_detected_and_a_truncated_one_retrained() {
    let original = shared();
    let dir = tempfile::tempdir().unwrap();
    let (weights, manifest) = copy_cache(&original.cache_dir, dir.path());
    let good = std::fs::read(&weights).unwrap();
    assert!(Evaluator::load(dir.path()).is_ok(), "an intact copy loads");

    // One flipped bit deep in the weights: still a well-formed safetensors file, so only the
    // digest can tell.
    let mut flipped = good.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x10;
    std::fs::write(&weights, &flipped).unwrap();
    let err = Evaluator::load(dir.path()).unwrap_err();
    assert!(matches!(err, EvalError::CorruptCache { .. }), "{err}");
    assert!(
        err.to_string().contains(&weights.display().to_string()),
        "{err}"
    );

    // A manifest that is not JSON.
    std::fs::write(&weights, &good).unwrap();
    let manifest_text = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{\"version\": ").unwrap();
    assert!(matches!(
        Evaluator::load(dir.path()),
        Err(EvalError::CorruptCache { .. })
    ));
    std::fs::write(&manifest, &manifest_text).unwrap();

    // Truncated weights: load_or_train retrains and repairs the entry.
    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        Evaluator::load(dir.path()),
        Err(EvalError::CorruptCache { .. })
    ));
    let retrained = Evaluator::load_or_train(dir.path()).unwrap();
    assert!(matches!(
        retrained.source(),
        ClassifierSource::Trained { .. }
    ));
    let repaired = Evaluator::load(dir.path()).unwrap();
    assert_eq!(repaired.source(), ClassifierSource::Cache);
    assert_eq!(
        repaired.classifier_accuracy(),
        retrained.classifier_accuracy()
    );
    // Training is seeded and single-threaded: on one machine it reproduces the weights.
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        good,
        "retraining gave other weights"
    );

    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn load_without_a_cache_says_so() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Evaluator::load(dir.path()),
        Err(EvalError::NotCached(_))
    ));
}

// ---- the binary ----

fn run_bin(args: &[&std::ffi::OsStr]) -> Output {
    let cache = shared().cache_dir.clone(); // trained before the binary needs it
    Command::new(env!("CARGO_BIN_EXE_gantry-eval"))
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn quality_of(v: &serde_json::Value) -> Quality {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn binary_scores_an_idx_file() {
    let (held, _) = held_out();
    let images = &held[..200 * IMAGE_PIXELS];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits-idx3-ubyte.gz");
    gantry_data::idx::write_idx_images_file(&path, images, 200, 28, 28, true).unwrap();
    let expected = evaluator().score(images, 200).unwrap();
    let accuracy = evaluator().classifier_accuracy();

    let v = json_of(&run_bin(&["--images".as_ref(), path.as_os_str()]));
    for key in [
        "fid",
        "inception_score",
        "classes_covered",
        "class_histogram",
        "samples",
        "classifier_accuracy",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    assert_eq!(v["samples"], 200);
    assert_eq!(v["classifier_accuracy"].as_f64(), Some(accuracy));
    let q = quality_of(&v);
    assert_eq!(q.class_histogram, expected.class_histogram);
    // The binary may run libtorch with another thread count: equal up to float rounding.
    assert!(
        (q.fid - expected.fid).abs() <= 1e-4 * expected.fid,
        "{q:?} vs {expected:?}"
    );
    assert!(
        (q.inception_score - expected.inception_score).abs() < 1e-4,
        "{q:?} vs {expected:?}"
    );
}

#[test]
fn binary_names_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-images.idx");
    let out = run_bin(&["--images".as_ref(), path.as_os_str()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn binary_rejects_images_that_are_not_28_by_28() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small-idx3-ubyte");
    gantry_data::idx::write_idx_images_file(&path, &[0; 10 * 20 * 20], 10, 20, 20, false).unwrap();
    let out = run_bin(&["--images".as_ref(), path.as_os_str()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("28×28"),
        "{stderr}"
    );

    // Not an IDX image file at all.
    std::fs::write(&path, b"not an idx file").unwrap();
    let out = run_bin(&["--images".as_ref(), path.as_os_str()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

/// Writes the MANIFEST of every file in `dir`, as the checkpoint writer does last.
fn seal(dir: &std::path::Path) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != gantry_store::checkpoint::MANIFEST)
        .collect();
    names.sort();
    let manifest: String = names
        .iter()
        .map(|n| gantry_store::checkpoint::manifest_line(dir, n).unwrap())
        .collect();
    std::fs::write(dir.join(gantry_store::checkpoint::MANIFEST), manifest).unwrap();
}

/// A generator with weights drawn from `seed`, as a checkpoint writer would save it.
fn generator(seed: u64) -> gantry_models::Gan {
    let mut settings = gantry_config::Settings::default();
    settings.train.seed = seed;
    gantry_models::Gan::new(&settings, [1, 28, 28], tch::Device::Cpu).unwrap()
}

/// What the binary should print for `--checkpoint` with `gan`'s weights.
fn expected_for(gan: &gantry_models::Gan, samples: usize, seed: u64) -> Quality {
    let z = gantry_models::latent::fixed(seed, samples, gan.latent_dim());
    let images = gan.generate_u8(&gan.latents(&z), None);
    evaluator().score(&images, samples).unwrap()
}

#[test]
fn binary_samples_a_checkpoint_preferring_ema_weights() {
    let dir = tempfile::tempdir().unwrap();
    // The config's seed differs from the weights' seeds, so only loading the weights can
    // reproduce the expected images.
    let mut settings = gantry_config::Settings::default();
    settings.train.seed = 99;
    std::fs::write(dir.path().join("config.toml"), settings.to_toml().unwrap()).unwrap();
    let plain = generator(1);
    plain
        .generator_vs
        .save(dir.path().join("generator.safetensors"))
        .unwrap();
    seal(dir.path());
    let args = [
        "--checkpoint".as_ref(),
        dir.path().as_os_str(),
        "--samples".as_ref(),
        "300".as_ref(),
        "--seed".as_ref(),
        "5".as_ref(),
    ];

    let v = json_of(&run_bin(&args));
    assert_eq!(v["samples"], 300);
    let q = quality_of(&v);
    let expected = expected_for(&plain, 300, 5);
    assert_eq!(q.class_histogram, expected.class_histogram);
    assert!(
        (q.fid - expected.fid).abs() <= 1e-4 * expected.fid,
        "{q:?} vs {expected:?}"
    );

    let ema = generator(2);
    ema.generator_vs
        .save(dir.path().join("generator_ema.safetensors"))
        .unwrap();
    // Unlisted weights are not trusted, even well-formed ones.
    let out = run_bin(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not list generator_ema.safetensors"),
        "{stderr}"
    );
    seal(dir.path());
    let q = quality_of(&json_of(&run_bin(&args)));
    let expected = expected_for(&ema, 300, 5);
    assert!(
        (q.fid - expected.fid).abs() <= 1e-4 * expected.fid,
        "{q:?} vs {expected:?}"
    );
    let other = expected_for(&plain, 300, 5);
    assert!(
        (q.fid - other.fid).abs() > 1e-3 * other.fid,
        "EMA weights were not used"
    );

    // Weight bytes overwritten after the MANIFEST was written: refused, naming the file.
    let weights = dir.path().join("generator_ema.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&weights, bytes).unwrap();
    let out = run_bin(&args);
    assert!(!out.status.success(), "a damaged checkpoint was scored");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("generator_ema.safetensors") && stderr.contains("SHA-256"),
        "{stderr}"
    );
}

#[test]
fn binary_names_a_directory_that_is_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_bin(&["--checkpoint".as_ref(), dir.path().as_os_str()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.toml"), "{stderr}");
}

#[test]
fn binary_samples_a_vae_checkpoint() {
    use gantry_models::task::TrainTask;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = gantry_config::Settings::default();
    settings.model.family = gantry_config::Family::Vae;
    settings.train.seed = 7;
    std::fs::write(dir.path().join("config.toml"), settings.to_toml().unwrap()).unwrap();
    let vae = gantry_models::vae::Vae::new(&settings, [1, 28, 28], tch::Device::Cpu).unwrap();
    vae.save(dir.path()).unwrap();
    seal(dir.path());
    let args = [
        "--checkpoint".as_ref(),
        dir.path().as_os_str(),
        "--samples".as_ref(),
        "200".as_ref(),
        "--seed".as_ref(),
        "3".as_ref(),
    ];
    let q = quality_of(&json_of(&run_bin(&args)));
    let expected = evaluator().score(&vae.sample_u8(200, 3), 200).unwrap();
    assert_eq!(q.class_histogram, expected.class_histogram);
    assert!(
        (q.fid - expected.fid).abs() <= 1e-4 * expected.fid,
        "{q:?} vs {expected:?}"
    );
}

// ---- labelled scoring ----

/// `labels` moved one digit on: every image is then scored as the wrong class.
fn rotated(labels: &[u8]) -> Vec<u8> {
    labels.iter().map(|&l| (l + 1) % 10).collect()
}

#[test]
fn labelled_scores_reward_the_class_each_digit_was_made_for() {
    let ev = evaluator();
    let (held, labels) = held_out();
    let right = ev.score_labelled(&held, &labels).unwrap();
    let wrong = ev.score_labelled(&held, &rotated(&labels)).unwrap();
    eprintln!("held-out, true labels:    {right:?}");
    eprintln!("held-out, rotated labels: {wrong:?}");
    // The whole-set scores do not look at the labels.
    assert_eq!(right.quality, ev.score(&held, 1000).unwrap());
    assert_eq!(wrong.quality, right.quality);
    assert!(right.label_accuracy >= 0.9, "{}", right.label_accuracy);
    assert!(wrong.label_accuracy < 0.1, "{}", wrong.label_accuracy);
    assert_eq!(right.per_class.len(), 10);
    let classes: Vec<u8> = right.per_class.iter().map(|c| c.class).collect();
    assert_eq!(classes, (0..10).collect::<Vec<u8>>());
    assert_eq!(
        right.per_class.iter().map(|c| c.samples).sum::<usize>(),
        1000
    );
    for (r, w) in right.per_class.iter().zip(&wrong.per_class) {
        let digit = usize::from(r.class);
        let count = labels.iter().filter(|&&l| usize::from(l) == digit).count();
        assert_eq!(r.samples, count);
        assert!(r.accuracy >= 0.8, "{r:?}");
        assert!(r.fid.is_finite() && w.fid.is_finite(), "{r:?} {w:?}");
        // The true class's digits are the class reference itself: a distance of rounding.
        assert!(r.fid < 1e-3 * w.fid, "{r:?} vs {w:?}");
    }
}

#[test]
fn labelled_scores_of_other_real_digits_are_far_lower_with_their_true_labels() {
    // Real digits the reference set does not contain, so no distance is trivially zero.
    let ev = evaluator();
    let all = gantry_data::mnist_10k().unwrap();
    let images = &all.images()[..1000 * IMAGE_PIXELS];
    let labels = &all.labels().unwrap()[..1000];
    let right = ev.score_labelled(images, labels).unwrap();
    let wrong = ev.score_labelled(images, &rotated(labels)).unwrap();
    assert!(right.label_accuracy >= 0.9, "{}", right.label_accuracy);
    for (r, w) in right.per_class.iter().zip(&wrong.per_class) {
        eprintln!(
            "digit {}: {} samples, FID {:.3} (true labels) vs {:.3} (rotated)",
            r.class, r.samples, r.fid, w.fid
        );
        assert!(r.fid > 0.0, "{r:?}");
        assert!(5.0 * r.fid < w.fid, "{r:?} vs {w:?}");
    }
}

#[test]
fn labelled_scoring_rejects_bad_labels() {
    let ev = evaluator();
    let (held, labels) = held_out();
    let images = &held[..100 * IMAGE_PIXELS];
    let mut bad = labels[..100].to_vec();
    bad[17] = 12;
    let err = ev.score_labelled(images, &bad).unwrap_err();
    assert!(matches!(err, EvalError::Input(_)), "{err}");
    assert!(err.to_string().contains("label 12 (image 17)"), "{err}");

    let err = ev.score_labelled(images, &labels[..99]).unwrap_err();
    assert!(matches!(err, EvalError::Input(_)), "{err}");
    assert!(err.to_string().contains("99 labels"), "{err}");

    // A class with one image has no covariance.
    let mut lonely = vec![0u8; 100];
    lonely[50] = 4;
    let err = ev.score_labelled(images, &lonely).unwrap_err();
    assert!(err.to_string().contains("class 4 has 1 image"), "{err}");
    // Absent classes are left out rather than refused.
    let mut two = vec![0u8; 100];
    two[50] = 4;
    two[51] = 4;
    let q = ev.score_labelled(images, &two).unwrap();
    let classes: Vec<u8> = q.per_class.iter().map(|c| c.class).collect();
    assert_eq!(classes, [0, 4]);
}

fn write_labelled(dir: &Path, images: &[u8], labels: &[u8]) -> (PathBuf, PathBuf) {
    let images_path = dir.join("digits-images-idx3-ubyte.gz");
    let labels_path = dir.join("digits-labels-idx1-ubyte");
    let n = images.len() / IMAGE_PIXELS;
    gantry_data::idx::write_idx_images_file(&images_path, images, n, 28, 28, true).unwrap();
    gantry_data::idx::write_idx_labels_file(&labels_path, labels, false).unwrap();
    (images_path, labels_path)
}

#[test]
fn binary_scores_an_idx_file_with_labels() {
    let (held, labels) = held_out();
    let (images, labels) = (&held[..300 * IMAGE_PIXELS], &labels[..300]);
    let dir = tempfile::tempdir().unwrap();
    let (images_path, labels_path) = write_labelled(dir.path(), images, labels);
    let expected = evaluator().score_labelled(images, labels).unwrap();

    let v = json_of(&run_bin(&[
        "--images".as_ref(),
        images_path.as_os_str(),
        "--labels".as_ref(),
        labels_path.as_os_str(),
    ]));
    assert_eq!(v["samples"], 300);
    assert!(v.get("classifier_accuracy").is_some(), "{v}");
    let got: gantry_eval::LabelledQuality = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(
        got.quality.class_histogram,
        expected.quality.class_histogram
    );
    assert_eq!(got.label_accuracy, expected.label_accuracy);
    assert_eq!(got.per_class.len(), expected.per_class.len());
    for (g, e) in got.per_class.iter().zip(&expected.per_class) {
        assert_eq!(
            (g.class, g.samples, g.accuracy),
            (e.class, e.samples, e.accuracy)
        );
        // Another libtorch thread count may round the features differently.
        assert!(
            (g.fid - e.fid).abs() <= 1e-4 * e.fid.max(1e-3),
            "{g:?} vs {e:?}"
        );
    }
}

#[test]
fn binary_rejects_labels_that_do_not_fit_the_images() {
    let (held, labels) = held_out();
    let dir = tempfile::tempdir().unwrap();
    let (images_path, labels_path) =
        write_labelled(dir.path(), &held[..50 * IMAGE_PIXELS], &labels[..49]);
    let args = [
        "--images".as_ref(),
        images_path.as_os_str(),
        "--labels".as_ref(),
        labels_path.as_os_str(),
    ];
    let out = run_bin(&args);
    assert_fails_with(
        &out,
        &[
            &labels_path.display().to_string(),
            &images_path.display().to_string(),
            "49 labels",
            "50 images",
        ],
    );
    // The error is one log line.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );

    let mut bad = labels[..50].to_vec();
    bad[3] = 10;
    std::fs::remove_file(&labels_path).unwrap();
    gantry_data::idx::write_idx_labels_file(&labels_path, &bad, false).unwrap();
    assert_fails_with(
        &run_bin(&args),
        &[&labels_path.display().to_string(), "label 10 (image 3)"],
    );

    // --labels belongs to --images.
    let out = run_bin(&["--labels".as_ref(), labels_path.as_os_str()]);
    assert_fails_with(&out, &["--images"]);
}

#[test]
fn binary_sample_rejects_zero_per_class_before_opening_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gantry-eval"))
        .args(["sample", "--per-class", "0", "--checkpoint"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_fails_with(&out, &["--per-class", "0"]);
    assert!(!dir.path().join("out").exists());
}

// ---- conditional checkpoints ----

/// Writes a sealed checkpoint of a fresh class-conditional GAN over the digits into `dir`, as
/// the worker would (config.toml, the model's files, state.json naming the classes, MANIFEST).
fn conditional_checkpoint(dir: &Path) -> Box<dyn gantry_models::task::TrainTask> {
    let mut settings = gantry_config::Settings::default();
    settings.model.conditional = true;
    settings.train.seed = 21;
    std::fs::write(dir.join("config.toml"), settings.to_toml().unwrap()).unwrap();
    let shape = gantry_models::task::ModelShape {
        image: [1, 28, 28],
        classes: Some(10),
    };
    let task = gantry_models::task::build(&settings, shape, tch::Device::Cpu).unwrap();
    task.save(dir).unwrap();
    let optimizer_steps: serde_json::Map<String, serde_json::Value> = task
        .optimizer_steps()
        .into_iter()
        .map(|(name, steps)| (name.to_owned(), steps.into()))
        .collect();
    let state = serde_json::json!({
        "format": 2,
        "step": 0,
        "seed": 21,
        "data_position": 0,
        "optimizer_steps": optimizer_steps,
        "nonfinite_total": 0,
        "nonfinite_consecutive": 0,
        "fingerprint": settings.fingerprint(),
        "world_size": 1,
        "rng_state": null,
        "classes": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    seal(dir);
    task
}

#[test]
fn binary_scores_a_conditional_checkpoint_by_class() {
    let dir = tempfile::tempdir().unwrap();
    let task = conditional_checkpoint(dir.path());
    let labels = gantry_models::task::cycled_labels(300, 10);
    let expected = evaluator()
        .score_labelled(&task.sample_u8(300, 4), &labels)
        .unwrap();

    let v = json_of(&run_bin(&[
        "--checkpoint".as_ref(),
        dir.path().as_os_str(),
        "--samples".as_ref(),
        "300".as_ref(),
        "--seed".as_ref(),
        "4".as_ref(),
    ]));
    assert_eq!(v["samples"], 300);
    let got: gantry_eval::LabelledQuality = serde_json::from_value(v).unwrap();
    assert_eq!(
        got.quality.class_histogram,
        expected.quality.class_histogram
    );
    assert_eq!(got.label_accuracy, expected.label_accuracy);
    assert_eq!(got.per_class.len(), 10);
    for (g, e) in got.per_class.iter().zip(&expected.per_class) {
        assert_eq!((g.class, g.samples), (e.class, 30));
        assert!((g.fid - e.fid).abs() <= 1e-4 * e.fid, "{g:?} vs {e:?}");
    }

    // Too few samples for every class to have two.
    let out = run_bin(&[
        "--checkpoint".as_ref(),
        dir.path().as_os_str(),
        "--samples".as_ref(),
        "15".as_ref(),
    ]);
    assert_fails_with(&out, &["--samples 15", "10 classes"]);
}

fn run_sample(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-eval"))
        .arg("sample")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Fails with one line on stderr and nothing on stdout.
fn assert_fails_on_one_line(out: &Output, needles: &[&str]) {
    assert_fails_with(out, needles);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn binary_sample_exports_by_class_for_labelled_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::create_dir(&checkpoint).unwrap();
    conditional_checkpoint(&checkpoint);
    let out = dir.path().join("idx");
    let args = [
        "--checkpoint".as_ref(),
        checkpoint.as_os_str(),
        "--per-class".as_ref(),
        "3".as_ref(),
        "--format".as_ref(),
        "idx".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    let v = json_of(&run_sample(&args));
    assert_eq!(v["images"], 30, "{v}");
    assert_eq!(v["per_class"], serde_json::json!(vec![3; 10]), "{v}");
    let paths: Vec<PathBuf> = serde_json::from_value(v["paths"].clone()).unwrap();
    let find = |tag: &str| {
        let found: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| p.to_string_lossy().contains(tag))
            .collect();
        assert_eq!(found.len(), 1, "one *{tag}* file in {paths:?}");
        found[0].clone()
    };
    let (images, labels) = (find("idx3"), find("idx1"));
    assert!(images.is_file() && labels.is_file(), "{paths:?}");

    // What `sample` wrote is what `--images --labels` scores.
    let report = json_of(&run_bin(&[
        "--images".as_ref(),
        images.as_os_str(),
        "--labels".as_ref(),
        labels.as_os_str(),
    ]));
    let q: gantry_eval::LabelledQuality = serde_json::from_value(report).unwrap();
    let samples: Vec<usize> = q.per_class.iter().map(|c| c.samples).collect();
    assert_eq!(samples, [3; 10]);

    // An existing output is refused, and left as it was.
    let before = std::fs::read(&images).unwrap();
    assert_fails_on_one_line(&run_sample(&args), &[&out.display().to_string()]);
    assert_eq!(std::fs::read(&images).unwrap(), before);

    // A class the model does not have.
    let other = dir.path().join("other");
    let out = run_sample(&[
        "--checkpoint".as_ref(),
        checkpoint.as_os_str(),
        "--classes".as_ref(),
        "0,12".as_ref(),
        "--out".as_ref(),
        other.as_os_str(),
    ]);
    assert_fails_on_one_line(&out, &["12"]);
    assert!(!other.exists());
}

#[test]
fn binary_sample_refuses_classes_of_an_unconditional_checkpoint() {
    use gantry_models::task::TrainTask;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    std::fs::create_dir(&checkpoint).unwrap();
    let mut settings = gantry_config::Settings::default();
    settings.model.family = gantry_config::Family::Vae;
    std::fs::write(checkpoint.join("config.toml"), settings.to_toml().unwrap()).unwrap();
    let vae = gantry_models::vae::Vae::new(&settings, [1, 28, 28], tch::Device::Cpu).unwrap();
    vae.save(&checkpoint).unwrap();
    seal(&checkpoint);
    let out = dir.path().join("out");
    let result = run_sample(&[
        "--checkpoint".as_ref(),
        checkpoint.as_os_str(),
        "--per-class".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_fails_on_one_line(&result, &[]);
    assert!(!out.exists());
}
