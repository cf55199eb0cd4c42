//! Checkpoints and resume, in-process: exact resume, corrupt and torn checkpoints, refused
//! config changes, the non-finite stop.

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use gantry_config::{Family, Loss, ModelKind, PixelOutput, Settings, VaeKind};
use gantry_worker::checkpoint::{self, resume_from, verify};
use gantry_worker::group::Group;
use gantry_worker::run_dir::MetricsRow;
use gantry_worker::train::{NoObserver, Trainer};
use tch::Tensor;

/// `Gan::new` seeds libtorch's global RNG; tests building networks concurrently would
/// interleave their draws.
static SERIAL: Mutex<()> = Mutex::new(());

fn settings(dir: &Path, steps: u64) -> Settings {
    let mut s = Settings::default();
    s.train.steps = steps;
    s.train.batch_size = 8;
    s.train.threads = 1;
    s.train.log_every = 5;
    s.checkpoint.every = 30;
    s.samples.every = 0;
    s.run.dir = dir.to_path_buf();
    s.run.device = gantry_config::DeviceChoice::Cpu;
    s.collective.verify_every = 0;
    s
}

fn train(s: &Settings, resume: Option<&Path>) -> anyhow::Result<Trainer> {
    let checkpoint = resume.map(|p| resume_from(p).unwrap().expect("a complete checkpoint"));
    let mut trainer = Trainer::with_resume(s, Group::solo(), 1, 0, checkpoint.as_ref())?;
    trainer.run(&mut NoObserver)?;
    Ok(trainer)
}

fn metrics(dir: &Path) -> Vec<MetricsRow> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn assert_exact_resume(configure: impl Fn(&mut Settings)) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = settings(a.path(), 60);
    configure(&mut full);
    train(&full, None).unwrap();

    let mut first = settings(b.path(), 30);
    configure(&mut first);
    train(&first, None).unwrap();
    let mut rest = first.clone();
    rest.train.steps = 60;
    let resumed = train(&rest, Some(b.path())).unwrap();
    assert_eq!(resumed.step, 60);

    let (ca, cb) = (
        a.path().join("checkpoints/step-00000060"),
        b.path().join("checkpoints/step-00000060"),
    );
    for file in gantry_models::task::checkpoint_files(full.model.family) {
        let (ta, tb) = (tensors(&ca.join(file)), tensors(&cb.join(file)));
        assert_eq!(ta.len(), tb.len(), "{file}");
        assert!(!ta.is_empty(), "{file}");
        for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            assert!(xa.equal(xb), "{file}: {na} differs after resume");
        }
    }
    let sa: serde_json::Value =
        serde_json::from_slice(&fs::read(ca.join("state.json")).unwrap()).unwrap();
    let sb: serde_json::Value =
        serde_json::from_slice(&fs::read(cb.join("state.json")).unwrap()).unwrap();
    for key in ["step", "optimizer_steps", "data_position", "fingerprint"] {
        assert!(!sa[key].is_null(), "state.json {key} missing");
        assert_eq!(sa[key], sb[key], "state.json {key}");
    }
    // A conditional model's class map is saved (the MNIST digits' names are their labels).
    let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let expected = full.model.conditional.then(|| serde_json::json!(digits));
    assert_eq!(sa.get("classes"), expected.as_ref(), "state.json classes");
    assert_eq!(sa["classes"], sb["classes"], "state.json classes");

    let strip = |rows: Vec<MetricsRow>| -> Vec<MetricsRow> {
        rows.into_iter()
            .map(|r| MetricsRow {
                images_per_second: 0.0,
                wall_seconds: 0.0,
                ..r
            })
            .collect()
    };
    let (ma, mb) = (strip(metrics(a.path())), strip(metrics(b.path())));
    assert_eq!(
        mb.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=12).map(|i| i * 5).collect::<Vec<_>>()
    );
    assert_eq!(ma, mb, "metrics rows differ (wall-clock fields aside)");
}

#[test]
fn resumed_mlp_run_is_bit_identical() {
    assert_exact_resume(|s| s.train.schedule = gantry_config::Schedule::Alternating);
}

#[test]
fn resumed_dcgan_wgan_gp_run_with_two_critic_steps_is_bit_identical() {
    assert_exact_resume(|s| {
        s.model.kind = ModelKind::Dcgan;
        s.train.loss = Loss::WganGp;
        s.train.n_critic = 2;
        s.train.batch_size = 4;
    });
}

#[test]
fn resumed_vae_runs_are_bit_identical() {
    for kind in [VaeKind::Mlp, VaeKind::Conv] {
        assert_exact_resume(|s| {
            s.model.family = Family::Vae;
            s.vae.kind = kind;
            s.eval.samples = 0;
        });
    }
}

/// Labels are a pure function of (seed, step) like the images: a resumed conditional run
/// replays exactly, for every family.
#[test]
fn resumed_conditional_runs_are_bit_identical() {
    assert_exact_resume(|s| s.model.conditional = true);
    assert_exact_resume(|s| {
        s.model.conditional = true;
        s.model.family = Family::Vae;
        s.eval.samples = 0;
    });
    assert_exact_resume(|s| {
        s.model.conditional = true;
        s.model.family = Family::Autoregressive;
        s.autoregressive.channels = 8;
        s.autoregressive.residual_blocks = 1;
        s.eval.samples = 0;
    });
}

#[test]
fn resumed_autoregressive_runs_are_bit_identical() {
    for output in [PixelOutput::Bernoulli, PixelOutput::Softmax] {
        assert_exact_resume(|s| {
            s.model.family = Family::Autoregressive;
            s.autoregressive.channels = 8;
            s.autoregressive.residual_blocks = 1;
            s.autoregressive.output = output;
            s.eval.samples = 0;
        });
    }
}

fn flip_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_or_torn_checkpoints_fall_back_to_older_ones() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 40);
    s.checkpoint.every = 10;
    s.checkpoint.keep = 4;
    train(&s, None).unwrap();
    let ck = |step: u64| dir.path().join(format!("checkpoints/step-{step:08}"));
    assert_eq!(resume_from(dir.path()).unwrap().unwrap().step(), 40);

    // A kill mid-write: a temp dir with partial files, a final-named dir with no MANIFEST.
    let tmp = dir.path().join("checkpoints/.tmp-step-00000050-4242");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join("generator.safetensors"), b"partial").unwrap();
    fs::create_dir(ck(60)).unwrap();
    fs::copy(
        ck(40).join("generator.safetensors"),
        ck(60).join("generator.safetensors"),
    )
    .unwrap();
    let found = resume_from(dir.path()).unwrap().unwrap();
    assert_eq!(found.step(), 40);
    assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
    assert!(
        found.skipped[0].1.contains("MANIFEST"),
        "{:?}",
        found.skipped
    );

    flip_byte(&ck(40).join("generator.safetensors"));
    let found = resume_from(dir.path()).unwrap().unwrap();
    assert_eq!(found.step(), 30);
    let why = &found.skipped[1].1;
    assert!(
        why.contains("generator.safetensors") && why.contains("SHA-256"),
        "{why}"
    );

    fs::remove_file(ck(30).join("MANIFEST")).unwrap();
    let found = resume_from(dir.path()).unwrap().unwrap();
    assert_eq!(found.step(), 20);
    assert!(
        found.skipped[2].1.contains("MANIFEST"),
        "{:?}",
        found.skipped
    );

    let state = ck(20).join("optimizer.safetensors");
    let len = fs::metadata(&state).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let found = resume_from(dir.path()).unwrap().unwrap();
    assert_eq!(found.step(), 10);
    assert!(
        found.skipped[3].1.contains("optimizer.safetensors") && found.skipped[3].1.contains("size")
    );

    // An explicitly named broken checkpoint is an error, not a fallback.
    assert!(
        resume_from(&ck(20))
            .unwrap_err()
            .to_string()
            .contains("optimizer.safetensors")
    );
    // Resuming from step 10 works and the next write sweeps the torn leftovers away.
    let mut more = s.clone();
    more.train.steps = 11;
    more.checkpoint.keep = 2;
    let found = resume_from(&ck(10)).unwrap().unwrap();
    let mut trainer = Trainer::with_resume(&more, Group::solo(), 1, 0, Some(&found)).unwrap();
    trainer.run(&mut NoObserver).unwrap();
    let mut left: Vec<String> = fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // Abandoned later checkpoints and torn leftovers are gone; the newest two remain.
    assert_eq!(left, ["step-00000010", "step-00000011"]);
    // Rows after step 10 were dropped before the resumed run appended step 11.
    let steps: Vec<u64> = metrics(dir.path()).iter().map(|r| r.step).collect();
    assert_eq!(steps, [5, 10, 11]);
}

#[test]
fn shape_changes_are_refused_by_key_and_others_allowed() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 30);
    train(&s, None).unwrap();
    for (key, change) in [
        (
            "model.latent_dim",
            Box::new(|s: &mut Settings| s.model.latent_dim = 64) as Box<dyn Fn(&mut Settings)>,
        ),
        (
            "model.kind",
            Box::new(|s: &mut Settings| s.model.kind = ModelKind::Dcgan),
        ),
        (
            "model.batch_norm",
            Box::new(|s: &mut Settings| s.model.batch_norm = false),
        ),
    ] {
        let mut changed = s.clone();
        change(&mut changed);
        let found = resume_from(dir.path()).unwrap().unwrap();
        let err = Trainer::with_resume(&changed, Group::solo(), 1, 0, Some(&found))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let mut changed = s.clone();
    changed.train.lr_g = 1e-4;
    changed.train.steps = 35;
    let found = resume_from(dir.path()).unwrap().unwrap();
    let warnings = checkpoint::check_compatible(&found.settings, &changed).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("train.lr_g")));
    let trainer = train(&changed, Some(dir.path())).unwrap();
    assert_eq!(trainer.step, 35);
}

#[test]
fn non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Adam moves every weight by ~lr: 1e30 weights overflow the next forward pass to inf.
    type Overflow = fn(&mut Settings);
    let families: [(Family, Overflow); 3] = [
        (Family::Gan, |s| {
            s.train.lr_d = 1e30;
            s.train.lr_g = 1e30;
        }),
        (Family::Vae, |s| s.vae.lr = 1e30),
        (Family::Autoregressive, |s| {
            s.autoregressive.channels = 8;
            s.autoregressive.residual_blocks = 1;
            s.autoregressive.lr = 1e30;
        }),
    ];
    for (family, overflow) in families {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 100);
        s.model.family = family;
        overflow(&mut s);
        s.train.max_nonfinite = 3;
        let mut trainer = Trainer::with_resume(&s, Group::solo(), 1, 0, None).unwrap();
        let err = trainer.run(&mut NoObserver).unwrap_err().to_string();
        assert!(
            err.contains("non-finite") && err.contains("max_nonfinite"),
            "{family}: {err}"
        );
        assert_eq!(trainer.nonfinite_consecutive, 3, "{family}");
        assert!(trainer.nonfinite_total >= 3, "{family}");
        let applied_steps = trainer.step - trainer.nonfinite_total;
        assert!(
            applied_steps >= 1,
            "{family}: the first step(s) were finite"
        );
        for part in trainer.task.parts() {
            assert_eq!(
                part.optimizer.step, applied_steps,
                "{family}: skipped steps did not touch {}'s Adam",
                part.name
            );
        }
        let found = resume_from(dir.path()).unwrap().unwrap();
        assert_eq!(found.step(), trainer.step, "{family}");
        assert_eq!(found.state.nonfinite_consecutive, 3, "{family}");
        verify(&found.path).unwrap();
        // Every weight file of the stop checkpoint holds the last good, finite state.
        for file in gantry_models::task::checkpoint_files(family) {
            if *file == gantry_models::OPTIMIZER_FILE {
                continue;
            }
            let weights = Tensor::read_safetensors(found.path.join(file)).unwrap();
            assert!(
                weights
                    .iter()
                    .all(|(_, t)| bool::try_from(t.isfinite().all()).unwrap()),
                "{family}: {file} is not finite"
            );
        }
    }
}

#[test]
fn sigkill_during_checkpointing_never_leaves_an_accepted_torn_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "--standalone",
            "--device",
            "cpu",
            "--steps",
            "100000",
            "--batch-size",
            "8",
        ])
        .arg("--run-dir")
        .arg(dir.path())
        .args([
            "--set",
            "checkpoint.every=1",
            "--set",
            "checkpoint.keep=2",
            "--set",
            "samples.every=0",
        ])
        .args(["--set", "train.threads=1", "--set", "train.log_every=1000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then kill at whatever point of a write it happens to be.
    let checkpoints = dir.path().join("checkpoints");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while resume_from(dir.path())
        .ok()
        .flatten()
        .is_none_or(|c| c.step() < 3)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "worker made no checkpoints"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let found = resume_from(dir.path())
        .unwrap()
        .expect("a complete checkpoint survives");
    verify(&found.path).unwrap();
    for entry in fs::read_dir(&checkpoints).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("step-") && verify(&path).is_err() {
            assert!(
                found.skipped.iter().any(|(p, _)| *p == path)
                    || path.file_name() < found.path.file_name()
            );
        }
    }
}

#[test]
fn a_fresh_run_refuses_a_directory_holding_a_run_unless_told_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "{\"step\":5}\n{\"step\":10}\n";
    fs::write(dir.path().join("metrics.jsonl"), rows).unwrap();
    let old = dir.path().join("checkpoints/step-00000010");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("MANIFEST"), "").unwrap();
    let worker = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--standalone", "--device", "cpu", "--steps", "2"])
            .args(["--batch-size", "8", "--set", "samples.every=0"])
            .args(["--set", "eval.samples=0", "--set", "train.threads=1"])
            .args(["--set", "metrics.worker_addr=127.0.0.1:0"])
            .arg("--run-dir")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = worker(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("already holds a run (metrics.jsonl with 2 rows, a checkpoint of step 10)"),
        "{stderr}"
    );
    // Nothing was touched.
    assert_eq!(
        fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(),
        rows
    );
    assert!(old.join("MANIFEST").is_file());

    let replaced = worker(&["--overwrite"]);
    let stderr = String::from_utf8_lossy(&replaced.stderr);
    assert!(replaced.status.success(), "{stderr}");
    let steps: Vec<u64> = metrics(dir.path()).iter().map(|r| r.step).collect();
    assert_eq!(steps, [2], "the new run's rows replace the old ones");
}
