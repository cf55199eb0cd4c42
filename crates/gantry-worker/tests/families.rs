//! The model families behind the training-task seam (`model.family = "vae"`,
//! `"autoregressive"`), through the real training loop: finite statistics, every artefact of a
//! run, held-out likelihood figures, and world-size invariance (teacher-forced, as in
//! `world_size.rs`: 2 ranks × 8 average the gradient of 1 rank × 16 at the same parameters).
//! Exact resume is in `resume.rs`.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex;
use std::thread;

use gantry_collective::RingCollective;
use gantry_config::{Family, PixelOutput, Settings, VaeKind};
use gantry_worker::group::{Group, ring_config};
use gantry_worker::run_dir::MetricsRow;
use gantry_worker::train::{Trainer, run_standalone};

/// Trainers seed libtorch's global RNG while building; keep builds apart.
static SERIAL: Mutex<()> = Mutex::new(());

fn base(dir: &Path) -> Settings {
    let mut s = Settings::default();
    s.train.steps = 20;
    s.train.batch_size = 16;
    s.train.threads = 1;
    s.train.log_every = 5;
    s.samples.every = 10;
    s.checkpoint.every = 10;
    s.eval.samples = 0;
    s.eval.importance_samples = 10;
    s.collective.verify_every = 5;
    s.run.dir = dir.to_path_buf();
    s
}

fn vae(s: &mut Settings, kind: VaeKind) {
    s.model.family = Family::Vae;
    s.vae.kind = kind;
}

fn pixelcnn(s: &mut Settings, output: PixelOutput) {
    s.model.family = Family::Autoregressive;
    s.autoregressive.channels = 8;
    s.autoregressive.residual_blocks = 1;
    s.autoregressive.output = output;
}

/// A named configuration and the statistics its rows must carry.
type Case = (
    &'static str,
    Box<dyn Fn(&mut Settings)>,
    &'static [&'static str],
);

#[test]
fn each_family_trains_and_writes_every_artefact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases: [Case; 4] = [
        (
            "vae mlp",
            Box::new(|s| vae(s, VaeKind::Mlp)),
            &["kl", "neg_elbo", "reconstruction"],
        ),
        (
            "vae conv",
            Box::new(|s| vae(s, VaeKind::Conv)),
            &["kl", "neg_elbo", "reconstruction"],
        ),
        (
            "pixelcnn bernoulli",
            Box::new(|s| pixelcnn(s, PixelOutput::Bernoulli)),
            &["bits_per_dim", "nll"],
        ),
        (
            "pixelcnn softmax",
            Box::new(|s| pixelcnn(s, PixelOutput::Softmax)),
            &["bits_per_dim", "nll"],
        ),
    ];
    for (what, configure, names) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut s = base(dir.path());
        configure(&mut s);
        let summary = run_standalone(&s).unwrap();
        let root = dir.path();

        let rows: Vec<MetricsRow> = std::fs::read_to_string(root.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 4, "{what}");
        for row in &rows {
            assert_eq!(row.statistics.keys().collect::<Vec<_>>(), names, "{what}");
            assert!(
                row.statistics.values().all(|v| v.is_finite() && *v >= 0.0),
                "{what}: {row:?}"
            );
        }
        // The loss falls: nats per image at step 20 below step 5 (a 784-pixel image starts
        // far above what 20 steps reach).
        let loss = names
            .iter()
            .find(|n| **n == "neg_elbo" || **n == "nll")
            .unwrap();
        assert!(
            rows[3].statistics[*loss] < rows[0].statistics[*loss],
            "{what}: {loss} did not fall: {rows:?}"
        );

        assert_eq!(summary.family, s.model.family.to_string());
        let quality = summary.quality.as_ref().expect("held-out likelihood");
        let (elbo, nll, bits) = (
            quality.heldout_neg_elbo_nats.unwrap(),
            quality.heldout_nll_nats.unwrap(),
            quality.bits_per_dim.unwrap(),
        );
        assert!(nll.is_finite() && nll > 0.0, "{what}: {quality:?}");
        // The importance-weighted bound is at least as tight as the ELBO (exact for the
        // autoregressive model, where both are the NLL).
        assert!(nll <= elbo + 1e-6, "{what}: {quality:?}");
        assert!(
            (bits - nll / (784.0 * std::f64::consts::LN_2)).abs() < 1e-9,
            "{what}: {quality:?}"
        );

        for step in [0, 10, 20] {
            let grid = root.join(format!("samples/step-{step:08}.png"));
            assert!(grid.is_file(), "{what}: {} missing", grid.display());
        }
        let reconstruction = root.join("samples/reconstruction-00000020.png");
        assert_eq!(
            reconstruction.is_file(),
            s.model.family == Family::Vae,
            "{what}: reconstruction grids are the VAE's"
        );
        for step in [10, 20] {
            let checkpoint = root.join(format!("checkpoints/step-{step:08}"));
            gantry_worker::checkpoint::verify(&checkpoint)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

/// One step's parameters and averaged gradients of every part of the task (in
/// [`TrainTask::parts`] order, concatenated), per step.
///
/// [`TrainTask::parts`]: gantry_models::task::TrainTask::parts
type Trace = Vec<(Vec<f32>, Vec<f32>)>;

fn to_vec(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.reshape([-1])).unwrap()
}

/// Trains `steps` steps; with `teacher`, each step starts from the teacher's parameters.
fn trace(trainer: &mut Trainer, steps: usize, teacher: Option<&Trace>) -> Trace {
    let mut out = Vec::new();
    for step in 0..steps {
        let flats: Vec<tch::Tensor> = trainer
            .task
            .parts()
            .iter()
            .map(|p| p.params.flat.shallow_clone())
            .collect();
        if let Some(teacher) = teacher {
            let mut offset = 0;
            for flat in &flats {
                let n = flat.numel();
                let values = &teacher[step].0[offset..offset + n];
                tch::no_grad(|| flat.shallow_clone().copy_(&tch::Tensor::from_slice(values)));
                offset += n;
            }
        }
        let params: Vec<f32> = flats.iter().flat_map(to_vec).collect();
        trainer.step_plain().unwrap();
        let gradients = trainer.task.gradients();
        let mut gradient = Vec::new();
        for part in trainer.task.parts() {
            let (_, g) = gradients
                .iter()
                .find(|(name, _)| *name == part.name)
                .unwrap();
            gradient.extend(to_vec(g));
        }
        out.push((params, gradient));
    }
    out
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// `rounding`: the bound for steps where float32 summation order alone differs (see
/// `world_size.rs` for the reasoning), which grows with the number of terms a gradient
/// element sums: 16 images for a dense layer, 16 × 784 pixel positions for a convolution.
fn assert_world_size_invariant(what: &str, rounding: f64, configure: impl Fn(&mut Settings)) {
    const STEPS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base(dir.path());
    configure(&mut s);
    s.samples.every = 0;
    let single = {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut trainer = Trainer::new(&s, Group::solo(), 1, 0).unwrap();
        trace(&mut trainer, STEPS, None)
    };
    s.train.batch_size = 8;
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let ranks: Vec<Trace> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (s, peers, single) = (s.clone(), peers.clone(), single.clone());
            thread::spawn(move || {
                let ring = RingCollective::from_listener(listener, ring_config(&s, rank, 2, peers))
                    .unwrap();
                let group = Group::new(Box::new(ring), 25.0);
                // Not under SERIAL: both ranks must build at once (they exchange weights).
                let mut trainer = Trainer::new(&s, group, 1, 0).unwrap();
                trace(&mut trainer, STEPS, Some(&single))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // As in world_size.rs: rounding on almost every step, and a ReLU input crossing zero
    // (≤ 1e-2) on the rest; a wrong average is off by ≥ 1/n = 0.5.
    let mut at_rounding = 0;
    for trace in &ranks {
        for (step, ((params, gradient), (params1, gradient1))) in
            trace.iter().zip(&single).enumerate()
        {
            assert_eq!(params, params1, "{what}: teacher forcing failed");
            let d = relative_l2(gradient, gradient1);
            assert!(d <= 1e-2, "{what} step {}: relative L2 {d:e}", step + 1);
            at_rounding += usize::from(d <= rounding);
        }
    }
    assert!(
        at_rounding * 10 >= 2 * STEPS * 9,
        "{what}: {at_rounding} of {} steps at rounding",
        2 * STEPS
    );
    // The ranks applied identical averaged gradients.
    assert_eq!(ranks[0], ranks[1], "{what}: ranks differ");
}

#[test]
fn two_vae_ranks_average_the_gradient_of_one() {
    // Dense layers summing 16 rows: measured ≤ 1.1e-7.
    assert_world_size_invariant("vae", 1e-5, |s| vae(s, VaeKind::Mlp));
}

#[test]
fn two_pixelcnn_ranks_average_the_gradient_of_one() {
    // Convolutions summing 16 × 784 = 12,544 terms per weight, in an order oneDNN picks per
    // batch shape: √12544 · 2⁻²⁴ ≈ 7e-6 typical, 12544 · 2⁻²⁴ ≈ 7.5e-4 at worst; measured
    // 1.2e-5 to 6.3e-5 over 8 steps.
    assert_world_size_invariant("pixelcnn", 5e-4, |s| pixelcnn(s, PixelOutput::Bernoulli));
}

/// A conditional model's labels follow its images through the sampler: 2 ranks × 8 still
/// average the gradient of 1 rank × 16, for every family. (BatchNorm off for the GAN: its
/// batch statistics are per rank by nature.)
#[test]
fn conditional_ranks_average_the_gradient_of_one() {
    assert_world_size_invariant("conditional gan", 1e-5, |s| {
        s.model.conditional = true;
        s.model.batch_norm = false;
    });
    assert_world_size_invariant("conditional vae", 1e-5, |s| {
        vae(s, VaeKind::Mlp);
        s.model.conditional = true;
    });
    assert_world_size_invariant("conditional pixelcnn", 5e-4, |s| {
        pixelcnn(s, PixelOutput::Bernoulli);
        s.model.conditional = true;
    });
}
