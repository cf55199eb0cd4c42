//! `gantry-eval augment` and `gantry-eval subset`: classifiers trained for a few hundred steps
//! (seconds each), through the binary, and the subset's round trip through a PNG tree.

mod common;
use common::{assert_fails_with, json_of};
use std::path::Path;
use std::process::{Command, Output};

use gantry_data::Dataset;
use gantry_eval::IMAGE_PIXELS;
use gantry_eval::augment::{self, Report};

/// Few steps, but enough for 9,000 digits to pull clearly ahead of 100.
const STEPS: &str = "200";

fn run_bin(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-eval"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn augment_report(extra: &[&std::ffi::OsStr]) -> Report {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["augment".as_ref(), "--steps".as_ref(), STEPS.as_ref()];
    args.extend_from_slice(extra);
    let v = json_of(&run_bin(&args));
    for key in [
        "test_accuracy",
        "train_images",
        "real_images",
        "generated_images",
        "steps",
        "seed",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn more_real_digits_train_a_better_classifier_at_the_same_steps() {
    let all = augment_report(&["--real-subset".as_ref(), "9000".as_ref()]);
    let few = augment_report(&[
        "--real-subset".as_ref(),
        "100".as_ref(),
        "--subset-seed".as_ref(),
        "3".as_ref(),
    ]);
    eprintln!("9000 real: {all:?}\n 100 real: {few:?}");
    assert_eq!(
        (
            all.train_images,
            all.real_images,
            all.generated_images,
            all.steps,
            all.seed
        ),
        (9000, 9000, 0, 200, 0)
    );
    assert_eq!(
        (few.train_images, few.real_images, few.generated_images),
        (100, 100, 0)
    );
    assert!(all.test_accuracy > few.test_accuracy, "{all:?} vs {few:?}");
    assert!(all.test_accuracy > 0.85, "{all:?}");
    assert!(
        few.test_accuracy > 0.2,
        "100 digits still teach something: {few:?}"
    );
}

/// `subset` pixels and labels in the order a PNG tree loads back: grouped by digit, in order
/// within a digit.
fn by_class(d: &Dataset) -> Vec<(u8, Vec<u8>)> {
    let mut rows: Vec<(u8, Vec<u8>)> = (0..d.len())
        .map(|i| (d.labels().unwrap()[i], d.image(i).to_vec()))
        .collect();
    rows.sort_by_key(|(l, _)| *l); // stable: keeps the order within a class
    rows
}

#[test]
fn subset_writes_exactly_the_digits_augment_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("subset");
    let v = json_of(&run_bin(&[
        "subset".as_ref(),
        "--size".as_ref(),
        "250".as_ref(),
        "--subset-seed".as_ref(),
        "4".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]));
    assert_eq!(v["images"], 250);
    assert_eq!(
        v["per_class"],
        serde_json::json!([25, 25, 25, 25, 25, 25, 25, 25, 25, 25])
    );

    let expected = augment::real_subset(250, 4).unwrap();
    assert_eq!(expected.len(), 250);
    let back = gantry_data::folder::load(&out, 28, 1, 0).unwrap();
    assert!(back.skipped.is_empty());
    let back = back.dataset;
    assert_eq!(back.class_names(), Some(&augment::digit_names()[..]));
    assert_eq!(by_class(&back), by_class(&expected));
    // What augment reads back from the tree is the same, too.
    assert_eq!(
        by_class(&augment::read_generated(&out).unwrap()),
        by_class(&expected)
    );
    // Another seed, another subset.
    assert_ne!(
        by_class(&augment::real_subset(250, 5).unwrap()),
        by_class(&expected)
    );

    // An existing output is refused and left as it was.
    let before = std::fs::read_dir(out.join("3")).unwrap().count();
    let again = run_bin(&[
        "subset".as_ref(),
        "--size".as_ref(),
        "10".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_fails_with(&again, &[&out.display().to_string(), "already exists"]);
    assert_eq!(std::fs::read_dir(out.join("3")).unwrap().count(), before);
}

/// Writes `d` as an IDX pair in `dir` (which must exist), as `sample --format idx` does.
fn write_idx_dir(dir: &Path, d: &Dataset) {
    gantry_data::export::write_idx_pair(
        &dir.join("generated-images-idx3-ubyte.gz"),
        &dir.join("generated-labels-idx1-ubyte.gz"),
        d.images(),
        d.labels().unwrap(),
        28,
        28,
        true,
    )
    .unwrap();
}

#[test]
fn generated_digits_are_added_from_a_png_tree_or_an_idx_pair_alike() {
    // "Generated" digits here are real ones the small real subset lacks: what matters is that
    // they are read, labelled and counted right, whichever format holds them.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let extra = augment::write_subset(1000, 9, &tree).unwrap();
    let idx = dir.path().join("idx");
    std::fs::create_dir(&idx).unwrap();
    let rows = by_class(&extra);
    let images: Vec<u8> = rows.iter().flat_map(|(_, p)| p.clone()).collect();
    let labels: Vec<u8> = rows.iter().map(|(l, _)| *l).collect();
    let grouped = Dataset::new("grouped", images, Some(labels), 1, 28, 28).unwrap();
    write_idx_dir(&idx, &grouped);

    let base = [
        "--real-subset".as_ref(),
        "100".as_ref(),
        "--subset-seed".as_ref(),
        "3".as_ref(),
    ];
    let alone = augment_report(&base);
    let with = |path: &Path| {
        let mut args: Vec<&std::ffi::OsStr> = base.to_vec();
        args.extend(["--generated".as_ref(), path.as_os_str()]);
        augment_report(&args)
    };
    let from_tree = with(&tree);
    let from_idx = with(&idx);
    eprintln!("100 real: {alone:?}\n+1000 from PNGs: {from_tree:?}\n+1000 from IDX: {from_idx:?}");
    assert_eq!(
        (
            from_tree.train_images,
            from_tree.real_images,
            from_tree.generated_images
        ),
        (1100, 100, 1000)
    );
    // Same digits in the same order: the same training run.
    assert_eq!(from_idx, from_tree);
    assert!(
        from_tree.test_accuracy > alone.test_accuracy,
        "{from_tree:?} vs {alone:?}"
    );
}

#[test]
fn a_tree_of_some_digits_keeps_its_digits_as_labels() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let pixels: Vec<u8> = (0..4 * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect();
    let names = vec!["3".to_owned(), "7".to_owned()];
    gantry_data::export::write_png_tree(&tree, &pixels, &[1, 0, 1, 1], (1, 28, 28), &names)
        .unwrap();
    let d = augment::read_generated(&tree).unwrap();
    assert_eq!(d.labels(), Some(&[3u8, 7, 7, 7][..]));

    // Folders that are not digits cannot be digit labels.
    let cats = dir.path().join("cats");
    gantry_data::export::write_png_tree(
        &cats,
        &pixels,
        &[0, 0, 1, 1],
        (1, 28, 28),
        &["cat".to_owned(), "dog".to_owned()],
    )
    .unwrap();
    let err = augment::read_generated(&cats).unwrap_err().to_string();
    assert!(err.contains("\"cat\" is not a digit"), "{err}");
}

#[test]
fn augment_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    assert_fails_with(
        &run_bin(&[
            "augment".as_ref(),
            "--generated".as_ref(),
            missing.as_os_str(),
        ]),
        &[&missing.display().to_string()],
    );
    assert_fails_with(
        &run_bin(&[
            "augment".as_ref(),
            "--real-subset".as_ref(),
            "9001".as_ref(),
        ]),
        &["--real-subset"],
    );
    assert_fails_with(
        &run_bin(&["augment".as_ref(), "--real-subset".as_ref(), "0".as_ref()]),
        &["nothing to train on"],
    );
    assert_fails_with(
        &run_bin(&["augment".as_ref(), "--steps".as_ref(), "0".as_ref()]),
        &["--steps"],
    );
    // Flat-form flags do not mix with a subcommand.
    assert_fails_with(
        &run_bin(&["--images".as_ref(), "x".as_ref(), "augment".as_ref()]),
        &["augment"],
    );
}
