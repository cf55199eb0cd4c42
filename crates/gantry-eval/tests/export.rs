//! `gantry_eval::export` on tiny conditional GAN checkpoints written here the way the worker
//! writes them (tensors, config.toml, state.json, then the MANIFEST).

use std::convert::Infallible;
use std::fs;
use std::path::{Path, PathBuf};

use gantry_config::{Dataset, Family, Settings};
use gantry_eval::EvalError;
use gantry_eval::export::{
    self, Checkpoint, Classes, ExportRequest, Exported, Format, IDX_IMAGES_FILE, IDX_LABELS_FILE,
};
use gantry_models::task::{self, ModelShape, TrainTask};
use gantry_models::{Gan, Network, StepInput, latent};
use tch::{Device, Tensor};

const STEP: u64 = 2;

/// A small MLP GAN; high learning rates so two steps move the weights visibly away from the
/// seed's initial ones.
fn settings(conditional: bool) -> Settings {
    let mut s = Settings::default();
    s.model.latent_dim = 8;
    s.model.conditional = conditional;
    s.train.batch_size = 4;
    s.train.lr_g = 0.02;
    s.train.lr_d = 0.02;
    s
}

fn digit_names() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

/// Trains a GAN of `settings` for [`STEP`] steps and writes its checkpoint into `dir`
/// (conditional over `class_names` when they are given). Returns the trained model, which
/// samples what the checkpoint should.
fn write_checkpoint(dir: &Path, settings: &Settings, class_names: Option<&[String]>) -> Gan {
    let image = settings.data.image_shape().map(|d| d as i64);
    let shape = ModelShape {
        image,
        classes: class_names.map(<[String]>::len),
    };
    let mut gan = Gan::new(settings, shape, Device::Cpu).unwrap();
    let [c, h, w] = settings.data.image_shape();
    let rows = 4;
    for step in 0..STEP {
        let mut z = Vec::new();
        latent::fill(1, step, gan.latent_dim(), 0, rows, &mut z);
        let mut alpha = Vec::new();
        latent::interpolation(1, step, 0, rows, &mut alpha);
        let pixels: Vec<f32> = (0..rows * c * h * w)
            .map(|i| ((i % 17) as f32 / 8.0) - 1.0)
            .collect();
        let labels = class_names.map(|names| {
            let k = names.len() as i64;
            Tensor::from_slice(&[0, 1 % k, 2 % k, 3 % k])
        });
        let input = StepInput {
            real: gan.images(&pixels),
            z: gan.latents(&z),
            alpha: Some(gan.coefficients(&alpha)),
            labels,
        };
        let stats = gan
            .train_step(&input, &mut |_: Network, _: &mut Tensor| {
                Ok::<bool, Infallible>(false)
            })
            .unwrap();
        assert!(stats.applied);
    }
    fs::create_dir_all(dir).unwrap();
    TrainTask::save(&gan, dir).unwrap();
    fs::write(dir.join("config.toml"), settings.to_toml().unwrap()).unwrap();
    let mut state = serde_json::json!({
        "format": 2,
        "step": STEP,
        "seed": settings.train.seed,
        "data_position": STEP,
        "optimizer_steps": {"generator": STEP, "discriminator": STEP},
        "nonfinite_total": 0,
        "nonfinite_consecutive": 0,
        "fingerprint": "test",
        "world_size": 1,
        "rng_state": null,
    });
    if let Some(names) = class_names {
        state["classes"] = serde_json::json!(names);
    }
    fs::write(
        dir.join("state.json"),
        serde_json::to_string_pretty(&state).unwrap() + "\n",
    )
    .unwrap();
    seal(dir, settings.model.family);
    gan
}

/// (Re)writes the MANIFEST over every file of a complete checkpoint, as the worker does.
fn seal(dir: &Path, family: Family) {
    let mut manifest = String::new();
    for file in task::checkpoint_files(family)
        .iter()
        .chain(&["config.toml", "state.json"])
    {
        manifest.push_str(&gantry_store::checkpoint::manifest_line(dir, file).unwrap());
    }
    fs::write(dir.join("MANIFEST"), manifest).unwrap();
}

/// A conditional digit checkpoint in `root/ckpt`, opened, and the model it was written from.
fn digits(root: &Path) -> (Checkpoint, Gan) {
    let dir = root.join("ckpt");
    let gan = write_checkpoint(&dir, &settings(true), Some(&digit_names()));
    (export::open_checkpoint(&dir, Device::Cpu).unwrap(), gan)
}

fn request(classes: Classes, seed: u64, format: Format, out: PathBuf) -> ExportRequest {
    ExportRequest {
        classes,
        seed,
        format,
        out,
        progress: false,
    }
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn read_idx(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let images = gantry_data::idx::read_idx_images(&out.join(IDX_IMAGES_FILE)).unwrap();
    assert_eq!((images.rows, images.cols), (28, 28));
    let labels = gantry_data::idx::read_idx_labels(&out.join(IDX_LABELS_FILE)).unwrap();
    assert_eq!(images.len, labels.labels.len());
    (images.pixels, labels.labels)
}

fn input_error(e: EvalError) -> String {
    assert!(matches!(e, EvalError::Input(_)), "{e:?}");
    e.to_string()
}

#[test]
fn a_png_export_reads_back_as_the_models_samples_with_labels_and_class_names() {
    let root = tempfile::tempdir().unwrap();
    let (checkpoint, gan) = digits(root.path());
    assert_eq!(checkpoint.step, STEP);
    assert_eq!(checkpoint.class_names.as_deref(), Some(&digit_names()[..]));
    assert_eq!(checkpoint.classes(), Some(10));

    let out = root.path().join("png");
    let exported = export::export(
        &checkpoint,
        &request(Classes::PerClass(3), 7, Format::Png, out.clone()),
    )
    .unwrap();
    assert_eq!(
        exported,
        Exported {
            images: 30,
            per_class: vec![3; 10],
            paths: vec![out.clone()],
        }
    );

    let labels: Vec<u8> = (0..10u8).flat_map(|c| [c; 3]).collect();
    let expected = gan.sample_labelled_u8(&labels, 7).unwrap();
    let read = gantry_data::folder::load(&out, 28, 1, 0).unwrap();
    assert!(read.skipped.is_empty());
    let set = read.dataset;
    assert_eq!(set.len(), 30);
    assert_eq!(set.labels(), Some(&labels[..]));
    assert_eq!(set.class_names(), Some(&digit_names()[..]));
    assert!(set.images() == expected.as_slice(), "pixels differ");

    // The checkpoint's weights were loaded: the seed's untrained model samples otherwise.
    let fresh = task::build(
        &checkpoint.settings,
        ModelShape {
            image: [1, 28, 28],
            classes: Some(10),
        },
        Device::Cpu,
    )
    .unwrap();
    assert!(fresh.sample_labelled_u8(&labels, 7).unwrap() != expected);
    // Nothing but the checkpoint and the tree is left behind.
    assert_eq!(listing(root.path()), ["ckpt", "png"]);
}

#[test]
fn an_idx_export_holds_the_listed_classes_in_order() {
    let root = tempfile::tempdir().unwrap();
    let (checkpoint, gan) = digits(root.path());
    let list = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let out = root.path().join("idx");
    let exported = export::export(
        &checkpoint,
        &request(Classes::List(list.clone()), 11, Format::Idx, out.clone()),
    )
    .unwrap();
    assert_eq!(exported.images, 8);
    assert_eq!(exported.per_class, [0, 2, 1, 1, 1, 1, 1, 0, 0, 1]);
    assert_eq!(
        exported.paths,
        [out.join(IDX_IMAGES_FILE), out.join(IDX_LABELS_FILE)]
    );
    assert_eq!(listing(&out), [IDX_IMAGES_FILE, IDX_LABELS_FILE]);
    let (pixels, labels) = read_idx(&out);
    assert_eq!(labels, list);
    assert!(
        pixels == gan.sample_labelled_u8(&list, 11).unwrap(),
        "pixels differ"
    );
    assert_eq!(listing(root.path()), ["ckpt", "idx"]);
}

#[test]
fn images_depend_on_the_seed_and_their_own_position_and_class_only() {
    let root = tempfile::tempdir().unwrap();
    let (checkpoint, _) = digits(root.path());
    let run = |name: &str, classes: Classes, seed: u64| {
        let out = root.path().join(name);
        export::export(
            &checkpoint,
            &request(classes, seed, Format::Idx, out.clone()),
        )
        .unwrap();
        read_idx(&out).0
    };
    let first = run("a", Classes::PerClass(2), 5);
    assert!(
        first == run("b", Classes::PerClass(2), 5),
        "same seed, other images"
    );
    assert!(
        first != run("c", Classes::PerClass(2), 6),
        "the seed is ignored"
    );
    // Image i is row i of the seed's latents, of its own class: changing the others' classes
    // keeps it, and the labels of the list are really used.
    let pixels = 28 * 28;
    let mixed = run("d", Classes::List(vec![0, 0, 5, 5]), 5);
    assert_eq!(mixed[..2 * pixels], first[..2 * pixels]);
    assert!(mixed[2 * pixels..] != first[2 * pixels..4 * pixels]);
    let moved = run("e", Classes::List(vec![9, 0]), 5);
    assert_eq!(moved[pixels..], first[pixels..2 * pixels]);
}

#[test]
fn an_existing_output_is_refused_and_left_untouched() {
    let root = tempfile::tempdir().unwrap();
    let (checkpoint, _) = digits(root.path());
    let out = root.path().join("taken");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), b"mine").unwrap();
    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let file = root.path().join("file");
    fs::write(&file, b"also mine").unwrap();
    for format in [Format::Png, Format::Idx] {
        for path in [&out, &empty, &file] {
            let err = export::export(
                &checkpoint,
                &request(Classes::PerClass(1), 0, format, path.clone()),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("exists; not overwriting") && err.contains(&*path.to_string_lossy()),
                "{err}"
            );
        }
    }
    assert_eq!(listing(&out), ["keep.txt"]);
    assert_eq!(fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert!(listing(&empty).is_empty());
    assert_eq!(fs::read(&file).unwrap(), b"also mine");
    assert_eq!(listing(root.path()), ["ckpt", "empty", "file", "taken"]);

    // A missing parent is refused too, and not created.
    let deep = root.path().join("missing").join("out");
    let err = export::export(
        &checkpoint,
        &request(Classes::PerClass(1), 0, Format::Idx, deep),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
    assert!(!root.path().join("missing").exists());
}

#[test]
fn bad_class_requests_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let (checkpoint, _) = digits(root.path());
    let out = root.path().join("out");
    let fails = |classes: Classes| {
        let err = export::export(&checkpoint, &request(classes, 0, Format::Png, out.clone()))
            .unwrap_err();
        assert!(!out.exists());
        input_error(err)
    };
    let err = fails(Classes::List(vec![0, 10]));
    assert!(err.contains("class 10") && err.contains("0 to 9"), "{err}");
    let err = fails(Classes::PerClass(0));
    assert!(err.contains("at least 1"), "{err}");
    let err = fails(Classes::List(Vec::new()));
    assert!(err.contains("empty class list"), "{err}");
    // Counts the memory bound refuses, before allocating labels for them.
    for n in [10_000_000, usize::MAX] {
        let err = fails(Classes::PerClass(n));
        assert!(err.contains("GiB"), "{err}");
    }
    assert_eq!(listing(root.path()), ["ckpt"]);
}

#[test]
fn an_unconditional_checkpoint_opens_but_cannot_generate_by_class() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("plain");
    write_checkpoint(&dir, &settings(false), None);
    let checkpoint = export::open_checkpoint(&dir, Device::Cpu).unwrap();
    assert_eq!(checkpoint.class_names, None);
    assert_eq!(checkpoint.task.classes(), None);
    for classes in [Classes::PerClass(2), Classes::List(vec![0])] {
        let out = root.path().join("out");
        let err = export::export(&checkpoint, &request(classes, 0, Format::Idx, out.clone()))
            .unwrap_err();
        let err = input_error(err);
        assert!(
            err.contains("is an unconditional model: it cannot generate by class"),
            "{err}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn a_damaged_or_inconsistent_checkpoint_is_not_opened() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    write_checkpoint(&dir, &settings(true), Some(&digit_names()));

    // One flipped byte of the EMA generator: same size, other digest.
    let ema = dir.join(gantry_models::GENERATOR_EMA_FILE);
    let original = fs::read(&ema).unwrap();
    let mut damaged = original.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x01;
    fs::write(&ema, &damaged).unwrap();
    let err = export::open_checkpoint(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generator_ema.safetensors") && err.contains("SHA-256"),
        "{err}"
    );
    fs::write(&ema, &original).unwrap();
    assert!(export::open_checkpoint(&dir, Device::Cpu).is_ok());

    // A conditional model whose state.json names no classes (resealed, so only that is wrong).
    let state_path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("classes");
    fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    seal(&dir, Family::Gan);
    let err = input_error(export::open_checkpoint(&dir, Device::Cpu).unwrap_err());
    assert!(
        err.contains("state.json") && err.contains("model.conditional = true"),
        "{err}"
    );

    // A MANIFEST that leaves out a file the model reads (everything else intact).
    state["classes"] = serde_json::json!(digit_names());
    fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    seal(&dir, Family::Gan);
    assert!(export::open_checkpoint(&dir, Device::Cpu).is_ok());
    let manifest = fs::read_to_string(dir.join("MANIFEST")).unwrap();
    let without: String = manifest
        .lines()
        .filter(|l| !l.ends_with("  optimizer.safetensors"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, manifest);
    fs::write(dir.join("MANIFEST"), without).unwrap();
    let err = export::open_checkpoint(&dir, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not list optimizer.safetensors"), "{err}");

    // Not a checkpoint at all.
    let err = export::open_checkpoint(root.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.toml") && err.contains("checkpoint directory"),
        "{err}"
    );
}

#[test]
fn rgb_models_export_png_trees_but_not_idx() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    let mut s = settings(true);
    s.data.dataset = Dataset::Folder(root.path().join("unused"));
    s.data.channels = 3;
    s.data.image_size = 8;
    let names = vec!["cat".to_string(), "dog".to_string()];
    let gan = write_checkpoint(&dir, &s, Some(&names));
    let checkpoint = export::open_checkpoint(&dir, Device::Cpu).unwrap();

    let idx = root.path().join("idx");
    let err = export::export(
        &checkpoint,
        &request(Classes::PerClass(2), 3, Format::Idx, idx.clone()),
    )
    .unwrap_err();
    let err = input_error(err);
    assert!(err.contains("3-channel") && err.contains("png"), "{err}");
    assert!(!idx.exists());

    let png = root.path().join("png");
    let list = vec![1, 0, 1];
    let exported = export::export(
        &checkpoint,
        &request(Classes::List(list.clone()), 3, Format::Png, png.clone()),
    )
    .unwrap();
    assert_eq!(exported.per_class, [1, 2]);
    assert_eq!(listing(&png), ["cat", "dog"]);
    // folder::load groups by class, keeping the order within one.
    let expected = gan.sample_labelled_u8(&list, 3).unwrap();
    let size = 3 * 8 * 8;
    let grouped: Vec<u8> = [1, 0, 2]
        .iter()
        .flat_map(|&i| expected[i * size..(i + 1) * size].to_vec())
        .collect();
    let set = gantry_data::folder::load(&png, 8, 3, 0).unwrap().dataset;
    assert_eq!(set.labels(), Some(&[0u8, 1, 1][..]));
    assert_eq!(set.class_names(), Some(&names[..]));
    assert!(set.images() == grouped.as_slice(), "pixels differ");
}
