//! The GAN engine on tiny batches: every loss × model × schedule, EMA, non-finite skips,
//! save/load.

use std::convert::Infallible;

use gantry_config::{Loss, ModelKind, Precision, Schedule, Settings};
use gantry_models::task::{Batch, ModelShape, TrainTask};
use gantry_models::{GENERATOR_EMA_FILE, Gan, Network, StepInput, StepSync, ema_update, latent};
use tch::{Device, Kind, Tensor};

fn settings(kind: ModelKind, loss: Loss, schedule: Schedule) -> Settings {
    let mut s = Settings::default();
    s.model.kind = kind;
    s.model.latent_dim = 8;
    s.train.loss = loss;
    s.train.schedule = schedule;
    s.train.batch_size = 4;
    s
}

fn input(gan: &Gan, step: u64) -> StepInput {
    let [c, h, w] = gan.image_shape();
    let n = 4;
    let mut z = Vec::new();
    latent::fill(1, step, gan.latent_dim(), 0, n, &mut z);
    let mut alpha = Vec::new();
    latent::interpolation(1, step, 0, n, &mut alpha);
    let pixels: Vec<f32> = (0..n * (c * h * w) as usize)
        .map(|i| ((i % 17) as f32 / 8.0) - 1.0)
        .collect();
    StepInput {
        real: gan.images(&pixels),
        z: gan.latents(&z),
        alpha: Some(gan.coefficients(&alpha)),
        labels: None,
    }
}

fn no_sync() -> impl FnMut(Network, &mut Tensor) -> Result<bool, Infallible> {
    |_, _| Ok(false)
}

fn finite(t: &Tensor) -> bool {
    bool::try_from(t.isfinite().all()).unwrap()
}

#[test]
fn every_loss_model_and_schedule_trains_with_finite_values() {
    for kind in [ModelKind::Mlp, ModelKind::Dcgan] {
        for loss in [Loss::Bce, Loss::Hinge, Loss::WganGp] {
            for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
                let what = format!("{kind} {loss} {schedule}");
                let mut gan =
                    Gan::new(&settings(kind, loss, schedule), [1, 28, 28], Device::Cpu).unwrap();
                let (g0, d0) = (gan.g_params.flat.copy(), gan.d_params.flat.copy());
                let mut grads_seen = Vec::new();
                let mut sync = |net: Network, g: &mut Tensor| -> Result<bool, Infallible> {
                    grads_seen.push((net, finite(g), g.abs().sum(Kind::Float).double_value(&[])));
                    Ok(false)
                };
                let stats = gan.train_step(&input(&gan, 0), &mut sync).unwrap();
                let critic = gan.critic_step(&input(&gan, 1), &mut no_sync()).unwrap();
                assert!(stats.applied && critic.applied, "{what}");
                let host = stats.to_host();
                assert!(
                    host.d_loss.is_finite() && host.g_loss.is_finite(),
                    "{what}: {host:?}"
                );
                assert_eq!(grads_seen.len(), 2, "{what}");
                for (net, ok, size) in grads_seen {
                    assert!(
                        ok && size > 0.0,
                        "{what}: {net:?} gradient finite {ok}, |g|₁ {size}"
                    );
                }
                assert!(
                    !gan.g_params.flat.equal(&g0) && !gan.d_params.flat.equal(&d0),
                    "{what}: no update"
                );
            }
        }
    }
}

/// `train.precision = "bf16"`: every model, loss and schedule trains with finite fp32
/// gradients, and each gradient points where the fp32 one does (cosine > 0.98) without being
/// equal to it, which shows the forward passes really ran in bfloat16. (`alternating` updates
/// D between its two forward passes: a bf16 cast of D's weights kept across that update
/// would send G's gradient through the old D.)
#[test]
fn bf16_autocast_gradients_follow_fp32_ones() {
    for (kind, schedule) in [
        (ModelKind::Mlp, Schedule::Simultaneous),
        (ModelKind::Dcgan, Schedule::Simultaneous),
        (ModelKind::Mlp, Schedule::Alternating),
    ] {
        for loss in [Loss::Bce, Loss::Hinge, Loss::WganGp] {
            let what = format!("{kind} {loss} {schedule:?}");
            let mut grads = Vec::new();
            for precision in [Precision::Fp32, Precision::Bf16] {
                let mut s = settings(kind, loss, schedule);
                s.train.precision = precision;
                let mut gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
                let mut seen = Vec::new();
                let mut sync = |_: Network, g: &mut Tensor| -> Result<bool, Infallible> {
                    seen.push(g.copy());
                    Ok(false)
                };
                let stats = gan.train_step(&input(&gan, 0), &mut sync).unwrap();
                assert!(stats.applied, "{what} {precision}");
                assert_eq!(stats.d_loss.kind(), Kind::Float, "{what} {precision}");
                for g in &seen {
                    assert_eq!(g.kind(), Kind::Float, "{what} {precision}");
                    assert!(finite(g), "{what} {precision}");
                }
                assert_eq!(gan.g_params.flat.kind(), Kind::Float);
                grads.push(seen);
            }
            for (net, (full, half)) in grads[0].iter().zip(&grads[1]).enumerate() {
                let cosine = (full * half).sum(Kind::Double).double_value(&[])
                    / (full.norm().double_value(&[]) * half.norm().double_value(&[]));
                assert!(cosine > 0.98, "{what}: gradient {net} cosine {cosine}");
                assert!(
                    !full.equal(half),
                    "{what}: gradient {net} identical in bf16"
                );
            }
        }
    }
}

#[test]
fn wgan_gp_penalty_is_added_to_the_critic_loss() {
    let mut with = settings(ModelKind::Dcgan, Loss::WganGp, Schedule::Alternating);
    // Without BatchNorm the generator's train and eval outputs agree, so the penalty can be
    // recomputed here on exactly the critic step's fake batch.
    with.model.batch_norm = false;
    with.train.gp_weight = 10.0;
    let mut without = with.clone();
    without.train.gp_weight = 0.0;
    let mut a = Gan::new(&with, [1, 28, 28], Device::Cpu).unwrap();
    let mut b = Gan::new(&without, [1, 28, 28], Device::Cpu).unwrap();
    let inp = input(&a, 0);
    let gp = a
        .gradient_penalty(
            &inp.real,
            &a.generate_live(&inp.z, None),
            inp.alpha.as_ref().unwrap(),
            None,
        )
        .double_value(&[]);
    assert!(gp.is_finite() && gp > 0.0, "penalty {gp}");
    let la = a
        .critic_step(&inp, &mut no_sync())
        .unwrap()
        .to_host()
        .d_loss;
    let lb = b
        .critic_step(&inp, &mut no_sync())
        .unwrap()
        .to_host()
        .d_loss;
    assert!(
        (la - lb - 10.0 * gp).abs() < 1e-3 * (1.0 + la.abs()),
        "{la} - {lb} vs 10 × {gp}"
    );
}

#[test]
fn ema_after_k_updates_matches_the_closed_form() {
    let ema = Tensor::from_slice(&[1.0f64, -2.0, 0.5]);
    let live = Tensor::from_slice(&[3.0f64, 0.0, 0.5]);
    let (decay, k) = (0.9, 7);
    for _ in 0..k {
        ema_update(&ema, &live, decay);
    }
    // e_k = d^k e_0 + (1 − d^k) x for a constant target x.
    let dk = f64::powi(decay, k);
    let want = [dk * 1.0 + (1.0 - dk) * 3.0, dk * -2.0, 0.5];
    let got: Vec<f64> = Vec::try_from(&ema).unwrap();
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
}

#[test]
fn gan_ema_follows_the_generator_and_samples_use_it() {
    let mut s = settings(ModelKind::Mlp, Loss::Bce, Schedule::Simultaneous);
    s.train.ema_decay = 0.5;
    let mut gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
    let ema = gan.ema.as_ref().unwrap();
    assert!(ema.params.flat.equal(&gan.g_params.flat), "EMA starts at G");
    let before = gan.g_params.flat.copy();
    gan.train_step(&input(&gan, 0), &mut no_sync()).unwrap();
    let d = gantry_models::ema_decay_at(0.5, 1);
    assert!(d < 0.5, "warm-up applies on the first update");
    let want = &before * d + &gan.g_params.flat * (1.0 - d);
    let ema = gan.ema.as_ref().unwrap();
    assert!(ema.params.flat.allclose(&want, 1e-6, 1e-7, false));
    let z = input(&gan, 5).z;
    assert!(
        !gan.generate(&z, None).equal(&gan.generate_live(&z, None)),
        "samples come from the EMA"
    );

    s.train.ema_decay = 0.0;
    let gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
    assert!(gan.ema.is_none());
    assert!(gan.generate(&z, None).equal(&gan.generate_live(&z, None)));
}

#[test]
fn a_world_of_one_skips_a_non_finite_step_without_a_second_scan() {
    // A sync that leaves the gradients as they are (a world of one) relies on the check made
    // while they were gathered: a NaN pixel makes both losses NaN, and the step is skipped.
    for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
        let s = settings(ModelKind::Mlp, Loss::Bce, schedule);
        let mut gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
        let (g0, d0) = (gan.g_params.flat.copy(), gan.d_params.flat.copy());
        let bad = input(&gan, 0);
        let _ = bad.real.view([-1]).get(5).fill_(f64::NAN);
        let stats = gan.train_step(&bad, &mut no_sync()).unwrap();
        assert!(!stats.applied, "{schedule}");
        assert!(gan.g_params.flat.equal(&g0) && gan.d_params.flat.equal(&d0));
        let fine = gan.train_step(&input(&gan, 1), &mut no_sync()).unwrap();
        assert!(fine.applied, "{schedule}: a finite step after it trains");
        assert!(!gan.d_params.flat.equal(&d0), "{schedule}");
    }
}

/// A world of one that says so: the gradients stay where autograd put them.
struct Ungathered;

impl StepSync<Infallible> for Ungathered {
    fn gathers(&self) -> bool {
        false
    }

    fn sync(&mut self, _: Network, _: &mut Tensor) -> Result<bool, Infallible> {
        unreachable!("a gradient left in pieces is handed to nobody")
    }
}

#[test]
fn gradients_left_in_pieces_train_bit_identically_to_gathered_ones() {
    // The same process, the same kernels: every update, the EMA and the skip of a non-finite
    // step must match bit for bit, through both schedules and the extra critic step.
    for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
        for loss in [Loss::Bce, Loss::WganGp] {
            let s = settings(ModelKind::Mlp, loss, schedule);
            let mut gathered = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
            let mut pieces = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
            let d0 = pieces.d_params.flat.copy();
            for step in 0..4 {
                let batch = input(&gathered, step);
                if step == 2 {
                    let _ = batch.real.view([-1]).get(5).fill_(f64::NAN);
                }
                let a = gathered.critic_step(&batch, &mut no_sync()).unwrap();
                let b = pieces.critic_step(&batch, &mut Ungathered).unwrap();
                assert_eq!(
                    (a.applied, b.applied),
                    (step != 2, step != 2),
                    "{schedule} {loss}"
                );
                let a = gathered.train_step(&batch, &mut no_sync()).unwrap();
                let b = pieces.train_step(&batch, &mut Ungathered).unwrap();
                assert_eq!(
                    (a.applied, b.applied),
                    (step != 2, step != 2),
                    "{schedule} {loss}"
                );
            }
            let context = format!("{schedule} {loss}");
            assert!(!pieces.d_params.flat.equal(&d0), "{context}: D trained");
            assert!(
                gathered.d_params.flat.equal(&pieces.d_params.flat),
                "{context}: D"
            );
            assert!(
                gathered.g_params.flat.equal(&pieces.g_params.flat),
                "{context}: G"
            );
            let (ema_a, ema_b) = (gathered.ema.as_ref(), pieces.ema.as_ref());
            assert!(
                ema_a
                    .unwrap()
                    .params
                    .flat
                    .equal(&ema_b.unwrap().params.flat),
                "{context}: EMA"
            );
            // What a caller reads as the latest gradients: gathered, or put together.
            let latest = |gan: &Gan| TrainTask::gradients(gan);
            for ((part, a), (_, b)) in latest(&gathered).iter().zip(&latest(&pieces)) {
                assert!(a.equal(b), "{context}: the {part}'s latest gradient");
                assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{part}");
            }
        }
    }
}

#[test]
fn non_finite_averaged_gradient_skips_the_whole_update() {
    for schedule in [Schedule::Simultaneous, Schedule::Alternating] {
        let mut gan = Gan::new(
            &settings(ModelKind::Dcgan, Loss::Bce, schedule),
            [1, 28, 28],
            Device::Cpu,
        )
        .unwrap();
        let g_buffers: Vec<Tensor> = gan
            .generator_vs
            .variables()
            .into_values()
            .filter(|t| !t.requires_grad())
            .map(|t| t.copy())
            .collect();
        let g_sum: f64 = g_buffers
            .iter()
            .map(|t| t.sum(Kind::Double).double_value(&[]))
            .sum();
        let (g0, d0) = (gan.g_params.flat.copy(), gan.d_params.flat.copy());
        let ema0 = gan.ema.as_ref().unwrap().params.flat.copy();
        // What an all-reduce with one poisoned rank would hand back: NaN in D's gradient.
        let mut calls = 0;
        let mut poison = |net: Network, g: &mut Tensor| -> Result<bool, Infallible> {
            calls += 1;
            if net == Network::Discriminator {
                let _ = g.fill_(f64::NAN);
            }
            // Averaged: the step has to look at the gradient again.
            Ok(true)
        };
        let stats = gan.train_step(&input(&gan, 0), &mut poison).unwrap();
        assert!(!stats.applied, "{schedule}");
        assert!(
            gan.g_params.flat.equal(&g0) && gan.d_params.flat.equal(&d0),
            "{schedule}: parameters moved"
        );
        assert!(gan.ema.as_ref().unwrap().params.flat.equal(&ema0));
        assert_eq!((gan.g_opt.step, gan.d_opt.step), (0, 0), "{schedule}");
        let after: f64 = gan
            .generator_vs
            .variables()
            .into_values()
            .filter(|t| !t.requires_grad())
            .map(|t| t.sum(Kind::Double).double_value(&[]))
            .sum();
        assert_eq!(
            after, g_sum,
            "{schedule}: BatchNorm statistics were not restored"
        );
        let want_calls = if schedule == Schedule::Simultaneous {
            2
        } else {
            1
        };
        assert_eq!(calls, want_calls, "{schedule}");
        // The next, clean step applies.
        assert!(
            gan.train_step(&input(&gan, 1), &mut no_sync())
                .unwrap()
                .applied
        );
    }
}

#[test]
fn save_load_round_trips_and_the_ema_file_loads_into_a_fresh_generator() {
    let s = settings(ModelKind::Dcgan, Loss::WganGp, Schedule::Alternating);
    let mut gan = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
    for step in 0..3 {
        gan.train_step(&input(&gan, step), &mut no_sync()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    gan.save(dir.path()).unwrap();

    let mut other_settings = s.clone();
    other_settings.train.seed = 999;
    let mut other = Gan::new(&other_settings, [1, 28, 28], Device::Cpu).unwrap();
    other.load(dir.path()).unwrap();
    assert!(other.g_params.flat.equal(&gan.g_params.flat));
    assert!(other.d_params.flat.equal(&gan.d_params.flat));
    assert!(
        other.g_opt.exp_avg.equal(&gan.g_opt.exp_avg)
            && other.d_opt.exp_avg_sq.equal(&gan.d_opt.exp_avg_sq)
    );
    let z = input(&gan, 9).z;
    assert!(other.generate(&z, None).equal(&gan.generate(&z, None)));

    // The evaluator's path: Gan::new + generator_vs.load(generator_ema.safetensors).
    let mut eval = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
    eval.generator_vs
        .load(dir.path().join(GENERATOR_EMA_FILE))
        .unwrap();
    assert!(eval.generate_live(&z, None).equal(&gan.generate(&z, None)));

    // A different architecture is refused by name and shape.
    let mut mlp = Gan::new(
        &settings(ModelKind::Mlp, Loss::Bce, Schedule::Alternating),
        [1, 28, 28],
        Device::Cpu,
    )
    .unwrap();
    let err = mlp.load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("generator.safetensors")
            && (err.contains("no tensor") || err.contains("the model needs")),
        "{err}"
    );
}

/// A conditional GAN over `classes` classes (`model.conditional = true`).
fn conditional(kind: ModelKind, loss: Loss, classes: usize) -> Gan {
    let mut s = settings(kind, loss, Schedule::Simultaneous);
    s.model.conditional = true;
    let shape = ModelShape {
        image: [1, 28, 28],
        classes: Some(classes),
    };
    Gan::new(&s, shape, Device::Cpu).unwrap()
}

/// Labels 0, 1, 2, 0 for [`input`]'s four rows.
fn labelled(gan: &Gan, step: u64) -> StepInput {
    StepInput {
        labels: Some(Tensor::from_slice(&[0i64, 1, 2, 0])),
        ..input(gan, step)
    }
}

#[test]
fn conditioning_needs_classes_and_an_unconditional_model_refuses_them() {
    let mut s = settings(ModelKind::Mlp, Loss::Bce, Schedule::Simultaneous);
    s.model.conditional = true;
    let err = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("labelled data set"), "{err}");
    let shape = ModelShape {
        image: [1, 28, 28],
        classes: Some(1),
    };
    let err = Gan::new(&s, shape, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("2 to 256 classes"), "{err}");
    s.model.conditional = false;
    let shape = ModelShape {
        image: [1, 28, 28],
        classes: Some(10),
    };
    assert!(Gan::new(&s, shape, Device::Cpu).is_err());
    // The unconditional model keeps exactly its variables: no embedding appears.
    let plain = Gan::new(&s, [1, 28, 28], Device::Cpu).unwrap();
    assert!(
        plain
            .generator_vs
            .variables()
            .keys()
            .all(|k| !k.contains("class"))
    );
    assert_eq!(plain.classes(), None);
}

#[test]
fn a_conditional_gan_trains_on_every_loss_and_its_labels_change_the_samples() {
    for (kind, loss) in [
        (ModelKind::Mlp, Loss::Bce),
        (ModelKind::Mlp, Loss::Hinge),
        (ModelKind::Dcgan, Loss::WganGp),
    ] {
        let mut gan = conditional(kind, loss, 3);
        let before = gan.g_params.flat.copy();
        let d_before = gan.d_params.flat.copy();
        for step in 0..2 {
            let stats = gan
                .train_step(&labelled(&gan, step), &mut no_sync())
                .unwrap();
            assert!(stats.applied, "{kind:?} {loss:?}: step skipped");
            assert!(stats.to_host().d_loss.is_finite());
        }
        assert!(
            !gan.g_params.flat.equal(&before),
            "{kind:?} {loss:?}: G frozen"
        );
        assert!(
            !gan.d_params.flat.equal(&d_before),
            "{kind:?} {loss:?}: D frozen"
        );
        // The projection and the embedding were trained (they have gradients).
        let g_names = gan.generator_vs.variables();
        assert!(
            g_names.contains_key("class_embedding.weight"),
            "{g_names:?}"
        );
        assert!(
            gan.discriminator_vs
                .variables()
                .contains_key("class_projection.weight")
        );

        let zeros = gan.sample_labelled_u8(&[0; 4], 7).unwrap();
        let ones = gan.sample_labelled_u8(&[1; 4], 7).unwrap();
        assert_ne!(zeros, ones, "{kind:?} {loss:?}: the label is ignored");
        assert_eq!(zeros, gan.sample_labelled_u8(&[0; 4], 7).unwrap());
        assert_ne!(zeros, gan.sample_labelled_u8(&[0; 4], 8).unwrap());
        // Image i is position i of the seed's latents, whatever the other labels.
        let mixed = gan.sample_labelled_u8(&[0, 1, 0, 1], 7).unwrap();
        let pixels = 28 * 28;
        assert_eq!(mixed[..pixels], zeros[..pixels]);
        assert_eq!(mixed[pixels..2 * pixels], ones[pixels..2 * pixels]);
        // sample_u8 cycles the classes.
        assert_eq!(
            gan.sample_u8(4, 7),
            gan.sample_labelled_u8(&[0, 1, 2, 0], 7).unwrap()
        );
    }
}

#[test]
fn conditional_sampling_refuses_bad_classes_and_unlabelled_batches() {
    let gan = conditional(ModelKind::Mlp, Loss::Bce, 3);
    let err = gan.sample_labelled_u8(&[0, 3], 1).unwrap_err();
    assert!(err.to_string().contains("class 3 is out of range"), "{err}");
    let plain = Gan::new(
        &settings(ModelKind::Mlp, Loss::Bce, Schedule::Simultaneous),
        [1, 28, 28],
        Device::Cpu,
    )
    .unwrap();
    let err = plain.sample_labelled_u8(&[0], 1).unwrap_err();
    assert!(err.to_string().contains("unconditional"), "{err}");

    let mut gan = gan;
    let batch = |labels: Option<Tensor>| Batch {
        stream: 0,
        first_row: 0,
        images: Tensor::zeros([4, 1, 28, 28], (Kind::Float, Device::Cpu)),
        labels,
    };
    let err = gan.step_input(batch(None)).unwrap_err();
    assert!(err.to_string().contains("needs labelled batches"), "{err}");
    assert!(
        gan.step_input(batch(Some(Tensor::from_slice(&[0i64, 1, 2, 0]))))
            .is_ok()
    );
}

#[test]
fn a_saved_conditional_gan_loads_to_the_same_samples() {
    let mut gan = conditional(ModelKind::Mlp, Loss::Bce, 3);
    gan.train_step(&labelled(&gan, 0), &mut no_sync()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    gan.save(dir.path()).unwrap();
    let mut other = conditional(ModelKind::Mlp, Loss::Bce, 3);
    assert_ne!(
        other.sample_labelled_u8(&[2; 3], 5).unwrap(),
        gan.sample_labelled_u8(&[2; 3], 5).unwrap()
    );
    other.load(dir.path()).unwrap();
    assert_eq!(
        other.sample_labelled_u8(&[2; 3], 5).unwrap(),
        gan.sample_labelled_u8(&[2; 3], 5).unwrap()
    );
    // A model of another class count does not load it.
    let mut wrong = conditional(ModelKind::Mlp, Loss::Bce, 4);
    assert!(wrong.load(dir.path()).is_err());
}
