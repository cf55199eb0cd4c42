//! The training loop of one worker, standalone or as one rank of a data-parallel group.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use gantry_config::{Dataset as DatasetChoice, Settings};
use gantry_data::Dataset;
use gantry_data::sampler::GlobalSampler;
use gantry_metrics::WorkerMetrics;
use gantry_models::phases::Phase;
use gantry_models::{Gan, HostStats, Network, StepInput, latent, runtime};
use tch::{Device, Tensor};

use crate::checkpoint::{self, CheckpointDir, CheckpointState};
use crate::progress::Progress;
use crate::run_dir::{FinalFigures, MetricsRow, QualityReport, RunDir, Summary};
use crate::samples;
use crate::sync::Group;

/// Rows of the fixed latent batch behind every sample grid (8 × 8).
const GRID_IMAGES: usize = 64;

/// Loads the configured training set.
pub fn load_dataset(settings: &Settings) -> Result<Dataset> {
    let data = &settings.data;
    let remote = match &data.dataset {
        DatasetChoice::Folder(dir) => {
            let loaded =
                gantry_data::folder::load(dir, data.image_size, data.channels, data.max_bad_files)
                    .with_context(|| format!("loading data set {}", data.dataset))?;
            for (file, why) in &loaded.skipped {
                eprintln!(
                    "warning: skipped unreadable image {}: {why}",
                    file.display()
                );
            }
            return Ok(loaded.dataset);
        }
        DatasetChoice::Mnist10k => {
            return gantry_data::embedded::mnist_10k().context("loading the embedded MNIST-10k");
        }
        DatasetChoice::Mnist => gantry_data::download::Remote::Mnist,
        DatasetChoice::FashionMnist => gantry_data::download::Remote::FashionMnist,
    };
    let cache = data.resolved_cache_dir();
    gantry_data::download::load_remote(
        remote,
        gantry_data::download::Split::Train,
        &cache,
        &data.mirror,
    )
    .with_context(|| format!("loading data set {}", data.dataset))
}

/// What the driver of the loop wants done after a step. In a group every rank must get the
/// same directive at the same step, since checkpoints and stops involve collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Continue,
    /// Write a checkpoint now, then go on.
    Checkpoint,
    /// Write a checkpoint now, then end the run early.
    Stop,
}

/// What the loop tells whoever drives it after each step.
pub trait StepObserver {
    /// Called after every completed step with the group-averaged figures when the step was
    /// a logging step. Returning an error stops training with that error.
    fn after_step(&mut self, _step: u64, _figures: Option<&LoggedStep>) -> Result<Directive> {
        Ok(Directive::Continue)
    }
}

/// The observer of a standalone run: nothing to report to.
#[derive(Debug, Default)]
pub struct NoObserver;
impl StepObserver for NoObserver {}

/// Figures of one logging step, averaged over the group.
#[derive(Debug, Clone, Copy)]
pub struct LoggedStep {
    pub stats: HostStats,
    pub images_per_second: f64,
}

/// One rank's training state.
#[derive(Debug)]
pub struct Trainer {
    settings: Settings,
    dataset: Dataset,
    pub gan: Gan,
    sampler: GlobalSampler,
    pub group: Group,
    /// Only rank 0 writes the run directory.
    run: Option<RunDir>,
    grid_z: Tensor,
    grid_shape: [usize; 3],
    device: Device,
    threads: usize,
    /// In `simultaneous`, average D's gradient on a helper thread while G's backward pass
    /// runs (see [`Trainer::step_with`]); other schedules ignore it.
    overlap_allreduce: bool,
    started: Instant,
    /// Steps completed so far.
    pub step: u64,
    pixels: Vec<f32>,
    latents: Vec<f32>,
    alphas: Vec<f32>,
    /// Steps whose update was skipped for a non-finite loss or gradient, in all and in a row.
    pub nonfinite_total: u64,
    pub nonfinite_consecutive: u64,
    /// The step of the newest checkpoint this trainer wrote or restored.
    pub last_checkpoint: Option<u64>,
    /// Prometheus series this trainer keeps up to date, when the process exports them.
    metrics: Option<WorkerMetrics>,
}

impl Trainer {
    /// Builds the networks and the data pipeline, and makes every rank start from rank 0's
    /// weights. `workers_on_host` shares the CPU cores between co-located workers.
    pub fn new(
        settings: &Settings,
        group: Group,
        workers_on_host: usize,
        device_ordinal: usize,
    ) -> Result<Self> {
        Self::with_resume(settings, group, workers_on_host, device_ordinal, None)
    }

    /// [`Trainer::new`], then [`Trainer::restore`] from `resume` if given. The settings are
    /// checked against the checkpoint's before anything is built, and rank 0's run directory
    /// keeps its metrics up to the checkpoint's step instead of starting afresh.
    pub fn with_resume(
        settings: &Settings,
        group: Group,
        workers_on_host: usize,
        device_ordinal: usize,
        resume: Option<&CheckpointDir>,
    ) -> Result<Self> {
        if let Some(c) = resume {
            checkpoint::check_compatible(&c.settings, settings)?;
        }
        let started = Instant::now();
        let threads = runtime::set_threads(settings.train.threads, workers_on_host);
        let device = runtime::resolve_device(settings.run.device, device_ordinal)?;
        let dataset = load_dataset(settings)?;
        let (c, h, w) = dataset.image_shape();
        let mut gan = Gan::new(settings, [c as i64, h as i64, w as i64], device)?;
        let mut group = group;
        group
            .synchronise_start(&mut gan)
            .context("synchronising initial weights")?;
        let global_batch = settings.train.batch_size * group.world;
        let sampler = GlobalSampler::new(settings.train.seed, dataset.len(), global_batch)?;
        let run = match (group.rank, resume) {
            (0, None) => Some(RunDir::create(&settings.run.dir, settings)?),
            (0, Some(c)) => Some(RunDir::resume(&settings.run.dir, settings, c.step())?),
            _ => None,
        };
        let grid_z = gan.latents(&latent::fixed(
            settings.train.seed,
            GRID_IMAGES,
            gan.latent_dim(),
        ));
        let mut trainer = Self {
            settings: settings.clone(),
            dataset,
            gan,
            sampler,
            group,
            run,
            grid_z,
            grid_shape: [c, h, w],
            device,
            threads,
            overlap_allreduce: overlap_pays(threads, workers_on_host),
            started,
            step: 0,
            pixels: Vec::new(),
            latents: Vec::new(),
            alphas: Vec::new(),
            nonfinite_total: 0,
            nonfinite_consecutive: 0,
            last_checkpoint: None,
            metrics: None,
        };
        if let Some(c) = resume {
            trainer.restore(c)?;
        }
        Ok(trainer)
    }

    /// Loads a checkpoint's tensors and state (every rank reads the files). Shape-changing
    /// setting changes are refused naming the key; others are warned about. On rank 0, rows
    /// of `metrics.jsonl` after the checkpoint's step are dropped.
    pub fn restore(&mut self, checkpoint: &CheckpointDir) -> Result<()> {
        for warning in checkpoint::check_compatible(&checkpoint.settings, &self.settings)? {
            eprintln!("warning: resuming {}: {warning}", checkpoint.path.display());
        }
        let state = &checkpoint.state;
        self.gan
            .load(&checkpoint.path)
            .with_context(|| format!("loading checkpoint {}", checkpoint.path.display()))?;
        self.gan.g_opt.step = state.g_optimizer_steps;
        self.gan.d_opt.step = state.d_optimizer_steps;
        self.step = state.step;
        self.nonfinite_total = state.nonfinite_total;
        self.nonfinite_consecutive = state.nonfinite_consecutive;
        self.last_checkpoint = Some(state.step);
        if self.run.is_some() {
            self.run = Some(RunDir::resume(
                &self.settings.run.dir,
                &self.settings,
                state.step,
            )?);
        }
        Ok(())
    }

    /// The scalar state a checkpoint of the current step records.
    pub fn checkpoint_state(&self) -> CheckpointState {
        CheckpointState {
            format: 1,
            step: self.step,
            seed: self.settings.train.seed,
            data_position: self.step * u64::from(self.settings.train.n_critic),
            g_optimizer_steps: self.gan.g_opt.step,
            d_optimizer_steps: self.gan.d_opt.step,
            nonfinite_total: self.nonfinite_total,
            nonfinite_consecutive: self.nonfinite_consecutive,
            fingerprint: self.settings.fingerprint(),
            world_size: self.group.world,
            rng_state: None,
        }
    }

    /// Writes a checkpoint of the current step. A collective call: every rank must call it at
    /// the same step (BatchNorm statistics are taken from rank 0 first); only rank 0 writes.
    pub fn write_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let started = Instant::now();
        self.group.broadcast_state(&mut self.gan)?;
        self.last_checkpoint = Some(self.step);
        let written = match &self.run {
            Some(run) => Some(checkpoint::write(
                &run.root().join("checkpoints"),
                &self.gan,
                &self.settings,
                &self.checkpoint_state(),
                self.settings.checkpoint.keep,
            )?),
            None => None,
        };
        if let Some(metrics) = &self.metrics {
            let bytes = written.as_deref().map_or(0, checkpoint::size_on_disk);
            metrics.checkpoint(started.elapsed().as_secs_f64(), bytes);
        }
        Ok(written)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Forces D's gradient averaging to overlap G's backward pass (in `simultaneous`) or
    /// not, whatever the core count suggests (tests; experiments on other machines).
    pub fn set_overlap_allreduce(&mut self, overlap: bool) {
        self.overlap_allreduce = overlap;
    }

    /// Keeps `metrics` up to date from now on.
    pub fn set_metrics(&mut self, metrics: WorkerMetrics) {
        self.metrics = Some(metrics);
    }

    pub fn global_batch(&self) -> usize {
        self.settings.train.batch_size * self.group.world
    }

    /// Runs step `self.step + 1`: `train.n_critic` sub-steps, each on this rank's slice of
    /// its own global batch, with gradient averaging across the group. Counts the step as
    /// non-finite when an update was skipped (`stats.applied == false`).
    ///
    /// With metrics installed, also records the step's duration, its phases, the all-reduce
    /// traffic and, on logging steps, the gradient norms.
    pub fn step_once(&mut self) -> Result<gantry_models::StepStats> {
        let Some(metrics) = self.metrics.clone() else {
            return self.step_with(&mut |_, _| {});
        };
        let started = Instant::now();
        let next = self.step + 1;
        let logging =
            next.is_multiple_of(self.settings.train.log_every) || next == self.settings.train.steps;
        // Timing phases on a GPU costs synchronisations: sample the logging steps only.
        let timed = logging || !self.gan.clock.needs_sync();
        self.gan.clock.start(timed);
        let mut norms = [None, None];
        let stats = self.step_with(&mut |network, grad| {
            if logging {
                let slot = match network {
                    Network::Generator => 0,
                    Network::Discriminator => 1,
                };
                norms[slot] = Some(tch::no_grad(|| grad.norm().double_value(&[])));
            }
        })?;
        if let Some(phases) = self.gan.clock.take() {
            metrics.phases(&phases.map(|(phase, seconds)| (phase.name(), seconds)));
        }
        for (network, norm) in ["generator", "discriminator"].into_iter().zip(norms) {
            if let Some(norm) = norm {
                metrics.gradient_norm(network, norm);
            }
        }
        let traffic = self.group.take_traffic();
        metrics.allreduce(traffic.bytes, traffic.seconds);
        let images =
            (self.settings.train.batch_size as u64) * u64::from(self.settings.train.n_critic);
        metrics.step_done(
            self.step,
            started.elapsed().as_secs_f64(),
            images,
            stats.applied,
        );
        Ok(stats)
    }

    /// [`Self::step_once`], showing `tap` each network's group-averaged flat gradient just
    /// before its optimiser step (for gradient statistics and for checking equivalences).
    pub fn step_with(
        &mut self,
        tap: &mut dyn FnMut(Network, &Tensor),
    ) -> Result<gantry_models::StepStats> {
        let n_critic = u64::from(self.settings.train.n_critic);
        // Step s (0-based) consumes sub-streams s·n_critic + i of the data, latent and
        // interpolation streams; the last sub-step also updates G. With n_critic = 1 this is
        // global batch s and latent stream s, as before.
        let first = self.step * n_critic;
        let mut stats = None;
        // In `simultaneous` neither gradient is read before G's sync returns (see
        // `Gan::train_step`), so D's averaging may wait: overlapped with G's backward pass on
        // a helper thread, or (by default) joined with G's into one all-reduce over
        // `Gan::gradients`: one synchronisation of the ranks a step instead of two.
        // Elsewhere each gradient is read right after its sync.
        let simultaneous = self.settings.train.schedule == gantry_config::Schedule::Simultaneous;
        let overlap = self.overlap_allreduce;
        for i in 0..n_critic {
            let input = self.sub_step_input(first + i)?;
            let last = i + 1 == n_critic;
            let joint = self.gan.gradients().shallow_clone();
            let (group, gan) = (&mut self.group, &mut self.gan);
            let sub = std::thread::scope(|scope| {
                let mut pending = None;
                let mut deferred: Option<Tensor> = None;
                let mut sync = |network, grad: &mut Tensor| {
                    let defer = simultaneous && last && network == Network::Discriminator;
                    if defer
                        && overlap
                        && let Some(started) = group.start_average(scope, grad)
                    {
                        pending = Some((started, grad.shallow_clone()));
                        return anyhow::Ok(());
                    }
                    if defer {
                        deferred = Some(grad.shallow_clone());
                        return anyhow::Ok(());
                    }
                    if let Some((started, d_grad)) = pending.take() {
                        group.finish_average(started)?;
                        tap(Network::Discriminator, &d_grad);
                    }
                    match deferred.take() {
                        Some(d_grad) if spans(&joint, &d_grad, grad) => {
                            group.average(&mut joint.shallow_clone())?;
                            tap(Network::Discriminator, &d_grad);
                        }
                        Some(mut d_grad) => {
                            group.average(&mut d_grad)?;
                            tap(Network::Discriminator, &d_grad);
                            group.average(grad)?;
                        }
                        None => group.average(grad)?,
                    }
                    tap(network, grad);
                    anyhow::Ok(())
                };
                let sub = if last {
                    gan.train_step(&input, &mut sync)
                } else {
                    gan.critic_step(&input, &mut sync)
                };
                // An error between the two calls leaves D's average running: collect it.
                if let Some((started, _)) = pending.take() {
                    group.finish_average(started)?;
                }
                sub
            })?;
            let applied = sub.applied;
            stats = Some(sub);
            if !applied {
                // The decision is the same on every rank (taken on averaged gradients), so
                // every rank leaves the step here together.
                break;
            }
        }
        let stats = stats.context("train.n_critic is 0")?;
        if stats.applied {
            self.nonfinite_consecutive = 0;
        } else {
            self.nonfinite_total += 1;
            self.nonfinite_consecutive += 1;
        }
        self.step += 1;
        Ok(stats)
    }

    /// This rank's real images, latents and interpolation coefficients of sub-stream `index`.
    fn sub_step_input(&mut self, index: u64) -> Result<StepInput> {
        let t = &self.settings.train;
        let (rank, world, local) = (self.group.rank, self.group.world, t.batch_size);
        let indices = self.sampler.indices(index, rank, world)?;
        self.dataset.batch_f32(&indices, &mut self.pixels);
        latent::fill(
            t.seed,
            index,
            self.gan.latent_dim(),
            rank * local,
            local,
            &mut self.latents,
        );
        let alpha = if t.loss == gantry_config::Loss::WganGp {
            latent::interpolation(t.seed, index, rank * local, local, &mut self.alphas);
            Some(self.gan.coefficients(&self.alphas))
        } else {
            None
        };
        let input = StepInput {
            real: self.gan.images(&self.pixels),
            z: self.gan.latents(&self.latents),
            alpha,
        };
        self.gan.clock.lap(Phase::Data);
        Ok(input)
    }

    /// Writes the sample grid for the current step (rank 0 only) and returns its path.
    pub fn write_samples(&mut self) -> Result<Option<PathBuf>> {
        let Some(run) = &self.run else {
            return Ok(None);
        };
        let images = self.gan.generate_u8(&self.grid_z);
        samples::write_grid(&run.samples_dir(), self.step, &images, self.grid_shape).map(Some)
    }

    /// Trains until `train.steps`, logging, sampling and reporting to `observer`.
    pub fn run(&mut self, observer: &mut dyn StepObserver) -> Result<Summary> {
        let total = self.settings.train.steps;
        let log_every = self.settings.train.log_every;
        let sample_every = self.settings.samples.every;
        let verify_every = self.settings.collective.verify_every;
        let checkpoint_every = self.settings.checkpoint.every;
        let max_nonfinite = u64::from(self.settings.train.max_nonfinite);
        let global_batch = self.global_batch() as u64;
        let first_step = self.step;

        if let Some(metrics) = &self.metrics {
            metrics.start(first_step, total);
        }
        let mut progress = Progress::new(total, first_step);
        if self.group.rank == 0 {
            progress.println(&format!(
                "gantry: {} steps, {} rank(s) × batch {}, {} on {:?} with {} threads, data {} ({} images), run dir {}",
                total,
                self.group.world,
                self.settings.train.batch_size,
                self.settings.model.kind,
                self.device,
                self.threads,
                self.settings.data.dataset,
                self.dataset.len(),
                self.settings.run.dir.display()
            ));
        }
        let mut last_sample = if self.step == 0 {
            self.write_samples()?
        } else {
            None
        };
        let mut last: Option<HostStats> = None;
        let train_started = Instant::now();
        let (mut window_start, mut window_steps) = (Instant::now(), 0u64);

        while self.step < total {
            let stats = self.step_once()?;
            let step = self.step;
            if self.nonfinite_consecutive >= max_nonfinite {
                // Skipped updates left the networks at their last good state; save it.
                let saved = self.write_checkpoint()?;
                progress.finish();
                bail!(
                    "stopping at step {step}: {} consecutive steps with a non-finite loss or gradient \
                     (train.max_nonfinite = {max_nonfinite}; {} in all); the last good state is checkpointed{}",
                    self.nonfinite_consecutive,
                    self.nonfinite_total,
                    saved
                        .map(|p| format!(" in {}", p.display()))
                        .unwrap_or_default()
                );
            }
            window_steps += 1;

            let logged = if step.is_multiple_of(log_every) || step == total {
                let host = self.group_mean(&stats.to_host())?;
                let images_per_second =
                    (window_steps * global_batch) as f64 / window_start.elapsed().as_secs_f64();
                (window_start, window_steps) = (Instant::now(), 0);
                last = Some(host);
                Some(LoggedStep {
                    stats: host,
                    images_per_second,
                })
            } else {
                None
            };
            if let (Some(metrics), Some(logged)) = (&self.metrics, logged.as_ref()) {
                let s = &logged.stats;
                metrics.losses(s.d_loss, s.g_loss, s.d_real, s.d_fake);
            }
            if let (Some(run), Some(logged)) = (self.run.as_mut(), logged.as_ref()) {
                run.append_metrics(&MetricsRow {
                    step,
                    d_loss: logged.stats.d_loss,
                    g_loss: logged.stats.g_loss,
                    d_x: logged.stats.d_real,
                    d_g_z: logged.stats.d_fake,
                    images_per_second: logged.images_per_second,
                    wall_seconds: train_started.elapsed().as_secs_f64(),
                })?;
            }
            if self.group.rank == 0 {
                progress.update(step, logged.as_ref().map(describe));
            }
            if verify_every > 0 && step.is_multiple_of(verify_every) {
                self.group.verify_identical(&self.gan, step)?;
            }
            let sample_due =
                (sample_every > 0 && step.is_multiple_of(sample_every)) || step == total;
            if sample_due {
                self.group.broadcast_state(&mut self.gan)?;
                if let Some(path) = self.write_samples()? {
                    last_sample = Some(path);
                }
            }
            if (checkpoint_every > 0 && step.is_multiple_of(checkpoint_every)) || step == total {
                self.write_checkpoint()?;
            }
            let eval_every = self.settings.eval.every;
            let eval_due = eval_every > 0 && step.is_multiple_of(eval_every) && step != total;
            if eval_due && let Some(report) = self.evaluate(false)? {
                progress.println(&format!(
                    "step {step}: fid {:.2}, inception score {:.2}, {} classes",
                    report.fid, report.inception_score, report.classes_covered
                ));
            }
            let directive = observer.after_step(step, logged.as_ref())?;
            let saved_now = self.last_checkpoint == Some(step);
            if directive != Directive::Continue && !saved_now {
                self.write_checkpoint()?;
            }
            if directive == Directive::Stop {
                break;
            }
        }
        progress.finish();
        self.group.verify_identical(&self.gan, self.step)?;

        let train_seconds = train_started.elapsed().as_secs_f64();
        let host = last.context("no step was run")?;
        let quality = self.evaluate(true)?;
        let summary = Summary {
            steps: self.step,
            world_size: self.group.world,
            batch_size: self.settings.train.batch_size,
            images_per_second: ((self.step - first_step) * global_batch) as f64 / train_seconds,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds,
            device: format!("{:?}", self.device),
            threads: self.threads,
            final_figures: FinalFigures {
                d_loss: host.d_loss,
                g_loss: host.g_loss,
                d_x: host.d_real,
                d_g_z: host.d_fake,
            },
            last_sample: last_sample.as_ref().and_then(|p| {
                p.strip_prefix(&self.settings.run.dir)
                    .ok()
                    .map(|p| p.display().to_string())
            }),
            quality,
            step_phases: self
                .metrics
                .as_ref()
                .map(|m| m.phase_means().into_iter().collect())
                .unwrap_or_default(),
        };
        if let Some(run) = &self.run {
            run.write_summary(&summary)?;
            progress.println(&format!(
                "done: {} steps in {:.1} s, {:.0} images/s, d_loss {:.4}, g_loss {:.4}; summary in {}",
                summary.steps,
                train_seconds,
                summary.images_per_second,
                host.d_loss,
                host.g_loss,
                run.root().join("summary.json").display()
            ));
        }
        Ok(summary)
    }

    /// Scores `eval.samples` images of the current (EMA) generator with gantry-eval's MNIST
    /// classifier (rank 0 only; trained once and cached). With `baseline`, also scores the
    /// untrained generator of the same seed for `fid_initial`. `None` when evaluation is off
    /// or the images are not 28×28 grey digits.
    pub fn evaluate(&self, baseline: bool) -> Result<Option<QualityReport>> {
        let n = self.settings.eval.samples;
        if self.group.rank != 0 || n < 2 {
            return Ok(None);
        }
        if self.grid_shape != [1, 28, 28] {
            return Ok(None);
        }
        let evaluator = gantry_eval::Evaluator::load_or_train(&gantry_eval::default_cache_dir())
            .context("preparing the evaluation classifier")?;
        let z = latent::fixed(
            self.settings.train.seed.wrapping_add(1),
            n,
            self.gan.latent_dim(),
        );
        let sample = |gan: &Gan| -> Vec<u8> {
            let dim = gan.latent_dim();
            z.chunks(500 * dim)
                .flat_map(|chunk| gan.generate_u8(&gan.latents(chunk)))
                .collect()
        };
        let quality = evaluator
            .score(&sample(&self.gan), n)
            .context("scoring samples")?;
        let fid_initial = if baseline {
            // The untrained generator is a pure function of the seed: rebuild it.
            let shape = self.gan.image_shape();
            let initial = Gan::new(&self.settings, shape, self.device)?;
            evaluator
                .score(&sample(&initial), n)
                .context("scoring the untrained generator")?
                .fid
        } else {
            f64::NAN
        };
        let report = QualityReport {
            fid: quality.fid,
            fid_initial,
            inception_score: quality.inception_score,
            classes_covered: quality.classes_covered,
            class_histogram: quality.class_histogram,
            samples: n,
            classifier_accuracy: evaluator.classifier_accuracy(),
        };
        if let Some(run) = &self.run {
            run.append_quality(self.step, &report)?;
        }
        if let Some(metrics) = &self.metrics {
            metrics.quality(gantry_metrics::Quality {
                step: self.step,
                fid: report.fid,
                inception_score: report.inception_score,
                classes_covered: report.classes_covered,
            })?;
        }
        Ok(Some(report))
    }

    /// Averages a step's figures over the group, so logs describe the global batch.
    fn group_mean(&mut self, host: &HostStats) -> Result<HostStats> {
        if self.group.world == 1 {
            return Ok(*host);
        }
        let mut values = [host.d_loss, host.g_loss, host.d_real, host.d_fake].map(|v| v as f32);
        self.group.sum_host(&mut values)?;
        let n = self.group.world as f64;
        let [d_loss, g_loss, d_real, d_fake] = values.map(|v| f64::from(v) / n);
        Ok(HostStats {
            d_loss,
            g_loss,
            d_real,
            d_fake,
        })
    }
}

/// Whether `first` and `second` are, in this order, exactly the two halves of `joint`'s
/// memory, so averaging `joint` averages both.
fn spans(joint: &Tensor, first: &Tensor, second: &Tensor) -> bool {
    let f32_bytes = std::mem::size_of::<f32>();
    let base = joint.data_ptr() as usize;
    [joint, first, second]
        .iter()
        .all(|t| t.kind() == tch::Kind::Float && t.is_contiguous() && t.device() == joint.device())
        && first.data_ptr() as usize == base
        && second.data_ptr() as usize == base + first.numel() * f32_bytes
        && first.numel() + second.numel() == joint.numel()
}

/// Whether averaging D's gradient on a helper thread, overlapped with G's backward pass,
/// pays (where the schedule allows it at all): only with a core to spare for the helper. On the CPU the ring's copies and sums are work too: with
/// every core busy training (2 workers × 1 thread on 2 cores), the helper thread takes its
/// time from the backward pass, and measured steps got 5–10% slower.
fn overlap_pays(threads: usize, workers_on_host: usize) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores >= workers_on_host.max(1) * (threads + 1)
}

/// Trains on one process (world size 1) and writes the run directory.
pub fn run_standalone(settings: &Settings) -> Result<Summary> {
    run_standalone_from(settings, None)
}

/// [`run_standalone`], continuing from `resume` when given.
pub fn run_standalone_from(settings: &Settings, resume: Option<&CheckpointDir>) -> Result<Summary> {
    let mut trainer = Trainer::with_resume(settings, Group::solo(), 1, 0, resume)?;
    trainer.run(&mut NoObserver)
}

fn describe(logged: &LoggedStep) -> String {
    let s = &logged.stats;
    format!(
        "d_loss {:.3} g_loss {:.3} D(x) {:.2} D(G(z)) {:.2} {:.0} img/s",
        s.d_loss, s.g_loss, s.d_real, s.d_fake, logged.images_per_second
    )
}
