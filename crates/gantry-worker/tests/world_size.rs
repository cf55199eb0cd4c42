//! World-size invariance through the real training loop: with the data order and latents
//! defined per global step, 2 ranks × 32 and 4 ranks × 16 compute the same averaged gradients
//! as 1 rank × 64 and train to the same parameters (BatchNorm off: its batch statistics are
//! per rank by nature). Ranks run as threads joined by the real ring on 127.0.0.1, through
//! its shared-memory all-reduce (the default on one host) or over TCP.

use std::net::TcpListener;
use std::thread;

use gantry_collective::RingCollective;
use gantry_config::{Optimizer, Settings};
use gantry_models::Network;
use gantry_worker::sync::{Group, ring_config};
use gantry_worker::train::Trainer;

const STEPS: u64 = 30;
const GLOBAL_BATCH: usize = 64;

/// Per step: (discriminator gradient, generator gradient) as averaged across the group.
type Gradients = Vec<(Vec<f32>, Vec<f32>)>;

struct Outcome {
    gradients: Gradients,
    generator: Vec<f32>,
    discriminator: Vec<f32>,
    /// Collective operations the training steps took.
    operations: u64,
}

fn settings(world: usize, optimizer: Optimizer, run_dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.model.batch_norm = false;
    s.train.optimizer = optimizer;
    // Small steps, pinned rather than the defaults: the runs agree only to float rounding, and
    // once a LeakyReLU input lies between the two trajectories' values (one side of the kink
    // in one run, the other side in the other) the gradients differ by ~1e-3 from then on.
    // The further the parameters move per step, the likelier that is within STEPS steps.
    let lr = match optimizer {
        Optimizer::Sgd => 0.01,
        Optimizer::Adam => 2e-4,
    };
    s.train.lr_g = lr;
    s.train.lr_d = lr;
    s.train.batch_size = GLOBAL_BATCH / world;
    s.train.steps = STEPS;
    s.train.threads = 1;
    s.samples.every = 0;
    s.collective.verify_every = 10;
    s.run.dir = run_dir.to_path_buf();
    s
}

fn to_vec(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).reshape([-1])).unwrap()
}

fn train_rank(settings: &Settings, group: Group, overlap: bool) -> Outcome {
    let mut trainer = Trainer::new(settings, group, 1, 0).unwrap();
    trainer.set_overlap_allreduce(overlap);
    let mut gradients = Vec::new();
    let before = trainer.group.sequence();
    for _ in 0..STEPS {
        let (mut d, mut g) = (Vec::new(), Vec::new());
        trainer
            .step_with(&mut |network, grad| match network {
                Network::Discriminator => d = to_vec(grad),
                Network::Generator => g = to_vec(grad),
            })
            .unwrap();
        gradients.push((d, g));
    }
    let operations = trainer.group.sequence() - before;
    trainer.group.verify_identical(&trainer.gan, STEPS).unwrap();
    Outcome {
        operations,
        gradients,
        generator: to_vec(&trainer.gan.g_params.flat),
        discriminator: to_vec(&trainer.gan.d_params.flat),
    }
}

/// Trains `world` ranks as threads; returns every rank's outcome.
fn train_group(world: usize, optimizer: Optimizer) -> Vec<Outcome> {
    train_group_with(world, optimizer, false, true)
}

/// [`train_group`], with D's averaging overlapped with G's backward pass or not, and the
/// ring's all-reduce through shared memory or TCP.
fn train_group_with(
    world: usize,
    optimizer: Optimizer,
    overlap: bool,
    shared_memory: bool,
) -> Vec<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(world, optimizer, dir.path());
    settings.collective.shared_memory = shared_memory;
    if world == 1 {
        return vec![train_rank(&settings, Group::solo(), overlap)];
    }
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (settings, peers) = (settings.clone(), peers.clone());
            thread::spawn(move || {
                let ring = RingCollective::from_listener(
                    listener,
                    ring_config(&settings, rank, world, peers),
                )
                .unwrap();
                assert_eq!(ring.uses_shared_memory(), shared_memory);
                train_rank(&settings, Group::new(Box::new(ring), 25.0), overlap)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn assert_equivalent(world: usize, optimizer: Optimizer, param_tolerance: f64) {
    let single = train_group(1, optimizer).pop().unwrap();
    let group = train_group(world, optimizer);
    for (rank, outcome) in group.iter().enumerate() {
        for (step, ((d, g), (d1, g1))) in
            outcome.gradients.iter().zip(&single.gradients).enumerate()
        {
            let (rd, rg) = (relative_l2(d, d1), relative_l2(g, g1));
            assert!(
                rd <= 1e-5 && rg <= 1e-5,
                "world {world} rank {rank} step {}: relative L2 gradient difference D {rd:e}, G {rg:e}",
                step + 1
            );
        }
        let (dg, dd) = (
            max_abs(&outcome.generator, &single.generator),
            max_abs(&outcome.discriminator, &single.discriminator),
        );
        assert!(
            dg <= param_tolerance && dd <= param_tolerance,
            "world {world} rank {rank} ({optimizer}): max abs parameter difference G {dg:e}, D {dd:e}"
        );
    }
    // And the ranks agree with each other exactly: they applied identical averaged gradients.
    for outcome in &group[1..] {
        assert_eq!(outcome.generator, group[0].generator);
        assert_eq!(outcome.discriminator, group[0].discriminator);
    }
}

#[test]
fn two_ranks_match_one_with_sgd() {
    assert_equivalent(2, Optimizer::Sgd, 1e-5);
}

#[test]
fn four_ranks_match_one_with_sgd() {
    assert_equivalent(4, Optimizer::Sgd, 1e-5);
}

#[test]
fn two_ranks_match_one_with_adam() {
    assert_equivalent(2, Optimizer::Adam, 1e-3);
}

#[test]
fn four_ranks_match_one_with_adam() {
    assert_equivalent(4, Optimizer::Adam, 1e-3);
}

#[test]
fn overlapped_averaging_changes_nothing() {
    // The same sums in the same order, only on another thread: bit-identical training.
    let plain = train_group_with(2, Optimizer::Adam, false, true);
    let overlapped = train_group_with(2, Optimizer::Adam, true, true);
    for (a, b) in plain.iter().zip(&overlapped) {
        // Plainly, both gradients go in one all-reduce a step (the buckets hold both); the
        // overlapped D average is an operation of its own.
        assert_eq!(a.operations, STEPS);
        assert_eq!(b.operations, 2 * STEPS);
        assert_eq!(a.gradients, b.gradients);
        assert_eq!(a.generator, b.generator);
        assert_eq!(a.discriminator, b.discriminator);
    }
}

#[test]
fn shared_memory_and_tcp_rings_train_identically() {
    // Two ranks: both paths add the same two numbers (in either order, which float addition
    // does not mind) and divide by two, so training is bit-identical.
    let shared = train_group_with(2, Optimizer::Adam, false, true);
    let tcp = train_group_with(2, Optimizer::Adam, false, false);
    for (a, b) in shared.iter().zip(&tcp) {
        assert_eq!(a.gradients, b.gradients);
        assert_eq!(a.generator, b.generator);
        assert_eq!(a.discriminator, b.discriminator);
    }
}
