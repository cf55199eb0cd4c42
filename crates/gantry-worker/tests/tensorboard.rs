//! TensorBoard's own event loader (the PyPI `tensorboard` package, pinned in
//! scripts/test-tools-requirements.txt) reads `RUN_DIR/tensorboard/` of real `worker
//! --standalone` runs, fresh and resumed, and finds exactly what `metrics.jsonl`,
//! `quality.jsonl` and `samples/` hold.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv of scripts/install-test-tools.sh (`GANTRY_TOOLS_VENV` overrides), installed once
/// per test process (the script is idempotent; its first run needs PyPI).
fn tools_python() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = std::env::var_os("GANTRY_TOOLS_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".cache").join("tools-venv"));
        let output = Command::new(repo_root().join("scripts/install-test-tools.sh"))
            .arg(&venv)
            .output()
            .expect("running scripts/install-test-tools.sh");
        assert!(
            output.status.success(),
            "{}",
            describe("scripts/install-test-tools.sh", &output)
        );
        venv
    })
    .join("bin")
    .join("python")
}

fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Everything TensorBoard's loader makes of a run's `tensorboard/` folder (restart purging
/// on, as in TensorBoard), plus each file's raw events (step and kind) in file order.
const READER: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import event_file_loader

logdir = sys.argv[1]
acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
acc.Reload()
tags = acc.Tags()
files = {}
for name in sorted(os.listdir(logdir)):
    events = []
    for event in event_file_loader.EventFileLoader(os.path.join(logdir, name)).Load():
        kind = event.WhichOneof("what")
        if kind == "session_log":
            kind = "session_log:" + str(event.session_log.status)
        events.append([event.step, kind])
    files[name] = events
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "images": {
        t: [{"step": e.step, "width": e.width, "height": e.height,
             "png": e.encoded_image_string.hex()} for e in acc.Images(t)]
        for t in tags["images"]
    },
    "files": files,
}))
"#;

fn read_tensorboard(run: &Path) -> Value {
    let output = Command::new(tools_python())
        .arg("-c")
        .arg(READER)
        .arg(run.join("tensorboard"))
        .output()
        .expect("running the venv's python");
    assert!(
        output.status.success(),
        "{}",
        describe("the TensorBoard reader", &output)
    );
    serde_json::from_slice(&output.stdout).expect("the reader prints JSON")
}

/// `worker --standalone` on the CPU with a tiny batch and the given extra flags.
fn worker(dir: &Path, args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--standalone", "--device", "cpu", "--batch-size", "8"])
        .args([
            "--set",
            "train.threads=1",
            "--set",
            "collective.verify_every=0",
        ])
        .args(["--set", "metrics.worker_addr=127.0.0.1:0"])
        .arg("--run-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running the worker");
    assert!(output.status.success(), "{}", describe("worker", &output));
}

fn json_lines(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(row)) => row,
                other => panic!("{}: {line}: {other:?}", path.display()),
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// (step, value) pairs of a scalar series as TensorBoard shows it.
fn series(tb: &Value, tag: &str) -> Vec<(u64, f64)> {
    tb["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar tag {tag} in {:?}", tags(tb, "scalars")))
        .iter()
        .map(|point| (point[0].as_u64().unwrap(), point[1].as_f64().unwrap()))
        .collect()
}

fn tags(tb: &Value, kind: &str) -> BTreeSet<String> {
    tb[kind].as_object().unwrap().keys().cloned().collect()
}

/// A JSON-lines figure as TensorBoard stores it (a 32-bit float).
fn as_stored(value: &Value) -> f64 {
    f64::from(value.as_f64().expect("a number") as f32)
}

/// The steps of `dir`'s PNGs named `{prefix}NNNNNNNN.png`, with their bytes.
fn pngs(dir: &Path, prefix: &str) -> BTreeMap<u64, Vec<u8>> {
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if let Some(step) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".png"))
        {
            found.insert(step.parse().unwrap(), fs::read(&path).unwrap());
        }
    }
    found
}

/// Asserts that what TensorBoard shows of `run` is exactly its JSON-lines files and sample
/// grids: every tag, at every step, once, in order, with the same values and bytes. Returns
/// the steps of `metrics.jsonl`.
fn assert_tensorboard_matches(run: &Path, tb: &Value) -> Vec<u64> {
    // Scalars of metrics.jsonl: every key but `step`, at its rows' steps.
    let rows = json_lines(&run.join("metrics.jsonl"));
    assert!(!rows.is_empty(), "no metrics rows in {}", run.display());
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    let mut expected_train = BTreeSet::new();
    for key in rows[0].keys().filter(|k| *k != "step") {
        let tag = format!("train/{key}");
        let expected: Vec<(u64, f64)> = rows
            .iter()
            .map(|r| (r["step"].as_u64().unwrap(), as_stored(&r[key])))
            .collect();
        assert_eq!(series(tb, &tag), expected, "{tag}");
        expected_train.insert(tag);
    }
    let shown = tags(tb, "scalars");
    let train: BTreeSet<String> = shown
        .iter()
        .filter(|t| t.starts_with("train/"))
        .cloned()
        .collect();
    assert_eq!(
        train, expected_train,
        "train/ tags are metrics.jsonl's keys"
    );

    // The step's phases and gradient norms: at exactly the logged steps.
    for prefix in ["phase_seconds/", "gradient_norm/"] {
        let of_kind: Vec<&String> = shown.iter().filter(|t| t.starts_with(prefix)).collect();
        assert!(!of_kind.is_empty(), "no {prefix} tags in {shown:?}");
        for tag in of_kind {
            let points = series(tb, tag);
            assert_eq!(
                points.iter().map(|p| p.0).collect::<Vec<_>>(),
                steps,
                "{tag}"
            );
            assert!(
                points.iter().all(|p| p.1.is_finite() && p.1 >= 0.0),
                "{tag}: {points:?}"
            );
        }
    }

    // Quality: every measured figure of quality.jsonl, at its rows' steps.
    let quality = json_lines(&run.join("quality.jsonl"));
    let mut expected_quality: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for row in &quality {
        let step = row["step"].as_u64().unwrap();
        for (key, value) in row.iter().filter(|(k, _)| *k != "step") {
            if value.is_number() {
                expected_quality
                    .entry(format!("quality/{key}"))
                    .or_default()
                    .push((step, as_stored(value)));
            }
        }
    }
    let quality_tags: BTreeSet<String> = shown
        .iter()
        .filter(|t| t.starts_with("quality/"))
        .cloned()
        .collect();
    assert_eq!(
        quality_tags,
        expected_quality.keys().cloned().collect::<BTreeSet<_>>(),
        "quality/ tags are quality.jsonl's measured figures"
    );
    for (tag, expected) in &expected_quality {
        assert_eq!(&series(tb, tag), expected, "{tag}");
    }
    let known = ["train/", "phase_seconds/", "gradient_norm/", "quality/"];
    for tag in &shown {
        assert!(known.iter().any(|p| tag.starts_with(p)), "unexpected {tag}");
    }

    // Images: the grids of samples/, byte for byte, at their steps.
    let samples = run.join("samples");
    let mut expected_images = BTreeSet::new();
    for (tag, prefix) in [
        ("samples/grid", "step-"),
        ("samples/reconstruction", "reconstruction-"),
    ] {
        let files = pngs(&samples, prefix);
        if files.is_empty() {
            continue;
        }
        expected_images.insert(tag.to_owned());
        let shown: Vec<(u64, Vec<u8>)> = tb["images"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no image tag {tag}"))
            .iter()
            .map(|image| {
                let png = hex::decode(image["png"].as_str().unwrap()).unwrap();
                let header = png::Decoder::new(std::io::Cursor::new(png.as_slice()))
                    .read_info()
                    .unwrap()
                    .info()
                    .size();
                assert_eq!(
                    (image["width"].as_u64(), image["height"].as_u64()),
                    (Some(u64::from(header.0)), Some(u64::from(header.1))),
                    "{tag}: the summary's size is the PNG's"
                );
                (image["step"].as_u64().unwrap(), png)
            })
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = files.into_iter().collect();
        assert_eq!(
            shown.iter().map(|s| s.0).collect::<Vec<_>>(),
            expected.iter().map(|e| e.0).collect::<Vec<_>>(),
            "{tag}: steps"
        );
        assert!(shown == expected, "{tag}: bytes differ from samples/");
    }
    assert_eq!(tags(tb, "images"), expected_images);
    steps
}

#[test]
fn a_fresh_and_a_resumed_run_read_back_as_their_metrics_quality_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let common = [
        "--set",
        "train.log_every=5",
        "--set",
        "checkpoint.every=20",
        "--set",
        "samples.every=10",
        "--set",
        "eval.every=10",
        "--set",
        "eval.samples=100",
    ];
    worker(run, &[&["--steps", "30"], &common[..]].concat());
    let fresh = read_tensorboard(run);
    let steps = assert_tensorboard_matches(run, &fresh);
    assert_eq!(steps, [5, 10, 15, 20, 25, 30]);
    for statistic in ["d_loss", "g_loss", "d_real", "d_fake"] {
        assert!(
            tags(&fresh, "scalars").contains(&format!("train/{statistic}")),
            "{statistic}"
        );
    }
    assert_eq!(
        tags(&fresh, "scalars")
            .into_iter()
            .filter(|t| t.starts_with("gradient_norm/"))
            .collect::<Vec<_>>(),
        ["gradient_norm/discriminator", "gradient_norm/generator"]
    );

    // A crash after step 30 and before its checkpoint: the newest checkpoint is step 20's,
    // and the events of steps 21-30 in the first file are orphans.
    fs::remove_dir_all(run.join("checkpoints/step-00000030")).unwrap();
    fs::remove_file(run.join("summary.json")).unwrap();
    worker(
        run,
        &[
            &["--resume", run.to_str().unwrap(), "--steps", "40"],
            &common[..],
        ]
        .concat(),
    );
    let resumed = read_tensorboard(run);

    // TensorBoard dropped the orphans: every series is exactly the run directory's again,
    // each step once and in order.
    let steps = assert_tensorboard_matches(run, &resumed);
    assert_eq!(steps, [5, 10, 15, 20, 25, 30, 35, 40]);
    let fid = series(&resumed, "quality/fid");
    assert_eq!(
        fid.iter().map(|p| p.0).collect::<Vec<_>>(),
        [10, 20, 30, 40],
        "quality before the checkpoint kept, after it re-evaluated"
    );

    // How: the first file still holds the orphans; the second starts with a START.
    let files = resumed["files"].as_object().unwrap();
    assert_eq!(files.len(), 2, "a new file for the resumed run: {files:?}");
    let (first, second) = (
        &files.values().next().unwrap(),
        &files.values().nth(1).unwrap(),
    );
    let summary_steps = |events: &Value| -> Vec<u64> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e[1] == "summary")
            .map(|e| e[0].as_u64().unwrap())
            .collect()
    };
    assert!(
        summary_steps(first).iter().any(|&s| s > 20),
        "the first file holds orphaned events after the checkpoint: {first}"
    );
    let head: Vec<(u64, &str)> = second.as_array().unwrap()[..2]
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_str().unwrap()))
        .collect();
    assert_eq!(
        head,
        [(21, "file_version"), (21, "session_log:1")],
        "the resumed file starts with a START just after the checkpoint"
    );
    assert!(summary_steps(second).iter().all(|&s| s > 20), "{second}");
}

#[test]
fn a_vae_run_shows_its_statistics_and_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    worker(
        run,
        &[
            "--steps",
            "10",
            "--set",
            "model.family=vae",
            "--set",
            "train.log_every=5",
            "--set",
            "samples.every=5",
            "--set",
            "eval.samples=0",
            "--set",
            "eval.importance_samples=2",
        ],
    );
    let tb = read_tensorboard(run);
    assert_tensorboard_matches(run, &tb);
    let shown = tags(&tb, "scalars");
    for statistic in ["neg_elbo", "reconstruction", "kl"] {
        assert!(
            shown.contains(&format!("train/{statistic}")),
            "{statistic}: {shown:?}"
        );
    }
    assert!(shown.contains("quality/heldout_nll_nats"), "{shown:?}");
    assert_eq!(
        tags(&tb, "images"),
        BTreeSet::from([
            "samples/grid".to_owned(),
            "samples/reconstruction".to_owned()
        ])
    );
}

#[test]
fn logging_tensorboard_false_writes_no_events_and_a_fresh_run_replaces_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let short = [
        "--steps",
        "2",
        "--set",
        "samples.every=0",
        "--set",
        "eval.samples=0",
    ];
    worker(run, &short);
    let events = || -> Vec<String> {
        fs::read_dir(run.join("tensorboard"))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = events();
    assert_eq!(first.len(), 1, "{first:?}");

    // --overwrite starts afresh: the replaced run's events go with its metrics.
    worker(run, &[&short[..], &["--overwrite"]].concat());
    let second = events();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second);

    let off = tempfile::tempdir().unwrap();
    worker(
        off.path(),
        &[&short[..], &["--set", "logging.tensorboard=false"]].concat(),
    );
    assert!(
        !off.path().join("tensorboard").exists(),
        "logging.tensorboard = false writes no tensorboard/"
    );
    assert_eq!(json_lines(&off.path().join("metrics.jsonl")).len(), 1);
}
