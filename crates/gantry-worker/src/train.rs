//! The training loop of one worker, standalone or as one rank of a data-parallel group.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use gantry_config::{Dataset as DatasetChoice, Settings};
use gantry_data::Dataset;
use gantry_data::sampler::GlobalSampler;
use gantry_metrics::WorkerMetrics;
use gantry_models::runtime;
use gantry_models::task::{Batch, BatchSource, ExternalError, ModelShape, StepOutcome, TrainTask};
use tch::{Device, Tensor};

use crate::batch::BatchSplit;
use crate::checkpoint::{self, CheckpointDir, CheckpointState};
use crate::group::Group;
use crate::progress::Progress;
use crate::run_dir::{MetricsRow, QualityReport, RunDir, Summary};
use crate::samples;
use crate::tensorboard::{self, StepDetail};

/// Images of every sample grid (8 × 8).
const GRID_IMAGES: usize = 64;
/// Columns of the sample grid: a conditional model's grid has one row of this many per class.
const GRID_COLUMNS: usize = 8;

/// Images a family with a likelihood never trains on: the last ones of the training set
/// (for the embedded MNIST-10k, the evaluator's 1,000 held-out digits), at most a tenth.
const HELDOUT_IMAGES: usize = 1000;

/// Named statistics of a step, averaged over the group (e.g. `d_loss` for the GAN).
pub type Statistics = Vec<(&'static str, f64)>;

/// Loads the configured training set.
pub fn load_dataset(settings: &Settings) -> Result<Dataset> {
    let data = &settings.data;
    let remote = match &data.dataset {
        DatasetChoice::Folder(dir) => {
            let loaded =
                gantry_data::folder::load(dir, data.image_size, data.channels, data.max_bad_files)
                    .with_context(|| format!("loading data set {}", data.dataset))?;
            for (file, why) in &loaded.skipped {
                tracing::warn!(
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
    /// Write a checkpoint now and leave the group: another group (a regroup) continues the
    /// run from that checkpoint. Runs the same collectives as [`Directive::Stop`] (so ranks
    /// told to stop and ranks told to leave at one step stay in step) and skips the final
    /// evaluation and summary, which are the finishing group's.
    Leave,
}

/// How [`Trainer::run_or_leave`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Trained to `train.steps`, or stopped: the run's summary.
    Finished(Box<Summary>),
    /// Left the group after checkpointing this step ([`Directive::Leave`]).
    Left { step: u64 },
}

/// What the loop tells whoever drives it after each step.
pub trait StepObserver {
    /// Called after every completed step with the group-averaged [`LoggedStep`] when the step was
    /// a logging step. Returning an error stops training with that error.
    fn after_step(&mut self, _step: u64, _logged: Option<&LoggedStep>) -> Result<Directive> {
        Ok(Directive::Continue)
    }
}

/// The observer of a standalone run: nothing to report to.
#[derive(Debug, Default)]
pub struct NoObserver;
impl StepObserver for NoObserver {}

/// Figures of one logging step, averaged over the group.
#[derive(Debug, Clone)]
pub struct LoggedStep {
    pub statistics: Statistics,
    pub images_per_second: f64,
}

impl LoggedStep {
    /// The statistic called `name`, if the family has one.
    pub fn statistic(&self, name: &str) -> Option<f64> {
        self.statistics
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// One rank's training state.
#[derive(Debug)]
pub struct Trainer {
    settings: Settings,
    /// The images trained on.
    dataset: Dataset,
    /// Images held out for the likelihood (families that have one).
    heldout: Option<Dataset>,
    /// The class names of a conditional model (label `i` is `class_names[i]`), saved in
    /// every checkpoint; `None` for an unconditional one.
    class_names: Option<Vec<String>>,
    /// What is trained: the family behind the seam.
    pub task: Box<dyn TrainTask>,
    sampler: GlobalSampler,
    /// This rank's share of every global batch.
    split: BatchSplit,
    pub group: Group,
    /// Only rank 0 writes the run directory.
    run: Option<RunDir>,
    grid_shape: [usize; 3],
    device: Device,
    threads: usize,
    started: Instant,
    /// Steps completed so far.
    pub step: u64,
    pixels: Vec<f32>,
    /// Steps whose update was skipped for a non-finite loss or gradient, in all and in a row.
    pub nonfinite_total: u64,
    pub nonfinite_consecutive: u64,
    /// The step of the newest checkpoint this trainer wrote or restored.
    pub last_checkpoint: Option<u64>,
    /// Prometheus series this trainer keeps up to date, when the process exports them.
    metrics: Option<WorkerMetrics>,
    /// The phases and gradient norms of the newest logging step, where they were measured.
    detail: StepDetail,
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
            checkpoint::check_resumable(c, settings, group.world)?;
        }
        let split = BatchSplit::new(&settings.train, group.rank, group.world)?;
        let started = Instant::now();
        let threads = runtime::set_threads(settings.train.threads, workers_on_host);
        let device = runtime::resolve_device(settings.run.device, device_ordinal)?;
        let dataset = load_dataset(settings)?;
        let (dataset, heldout) = match settings.model.family {
            gantry_config::Family::Gan => (dataset, None),
            _ => {
                let held = HELDOUT_IMAGES.min(dataset.len() / 10);
                let (train, heldout) = dataset.split(dataset.len() - held);
                (train, Some(heldout))
            }
        };
        let (c, h, w) = dataset.image_shape();
        check_batch_fits(&settings.train, &split, (c, h, w), device)?;
        if group.rank == 0 {
            warn_if_batch_norm_slices_changed(settings, &split);
        }
        let class_names = class_names(settings, &dataset)?;
        if let (Some(c), Some(names)) = (resume, &class_names) {
            check_same_classes(c, names)?;
        }
        let shape = ModelShape {
            image: [c as i64, h as i64, w as i64],
            classes: class_names.as_ref().map(Vec::len),
        };
        let task = gantry_models::task::build(settings, shape, device)?;
        let mut group = group;
        group.set_overlap(overlap_pays(threads, workers_on_host));
        group.set_gradient_weight(split.gradient_weight());
        group
            .synchronise_start(task.as_ref())
            .context("synchronising initial weights")?;
        let sampler = GlobalSampler::new(settings.train.seed, dataset.len(), split.global)?;
        let run = match (group.rank, resume) {
            (0, None) => Some(RunDir::create(&settings.run.dir, settings)?),
            // A resumed rank 0's run directory is opened by `restore`, once.
            _ => None,
        };
        let mut trainer = Self {
            settings: settings.clone(),
            dataset,
            heldout,
            class_names,
            task,
            sampler,
            split,
            group,
            run,
            grid_shape: [c, h, w],
            device,
            threads,
            started,
            step: 0,
            pixels: Vec::new(),
            nonfinite_total: 0,
            nonfinite_consecutive: 0,
            last_checkpoint: None,
            metrics: None,
            detail: StepDetail::default(),
        };
        if let Some(c) = resume {
            trainer.restore(c)?;
        }
        Ok(trainer)
    }

    /// Loads a checkpoint's tensors and state (every rank reads the files). Shape-changing
    /// setting changes are refused naming the key; others are warned about. On rank 0, rows
    /// of `metrics.jsonl` after the checkpoint's step are dropped, and TensorBoard's stream
    /// continues in a new file that supersedes the earlier ones after that step.
    pub fn restore(&mut self, checkpoint: &CheckpointDir) -> Result<()> {
        for warning in checkpoint::check_resumable(checkpoint, &self.settings, self.group.world)? {
            tracing::warn!("warning: resuming {}: {warning}", checkpoint.path.display());
        }
        let state = &checkpoint.state;
        self.task
            .load(&checkpoint.path)
            .with_context(|| format!("loading checkpoint {}", checkpoint.path.display()))?;
        for (part, steps) in &state.optimizer_steps {
            self.task
                .set_optimizer_steps(part, *steps)
                .with_context(|| format!("resuming {}", checkpoint.path.display()))?;
        }
        self.step = state.step;
        self.nonfinite_total = state.nonfinite_total;
        self.nonfinite_consecutive = state.nonfinite_consecutive;
        self.last_checkpoint = Some(state.step);
        if self.group.rank == 0 {
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
            format: checkpoint::FORMAT,
            step: self.step,
            seed: self.settings.train.seed,
            data_position: self.step * self.task.batches_per_step(),
            optimizer_steps: self
                .task
                .optimizer_steps()
                .into_iter()
                .map(|(part, steps)| (part.to_owned(), steps))
                .collect(),
            nonfinite_total: self.nonfinite_total,
            nonfinite_consecutive: self.nonfinite_consecutive,
            fingerprint: self.settings.fingerprint(),
            world_size: self.group.world,
            global_batch_size: Some(self.split.global),
            rng_state: None,
            classes: self.class_names.clone(),
        }
    }

    /// Writes a checkpoint of the current step. A collective call: every rank must call it at
    /// the same step (BatchNorm statistics are taken from rank 0 first); only rank 0 writes.
    pub fn write_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let started = Instant::now();
        self.group.broadcast_state(self.task.as_ref())?;
        self.last_checkpoint = Some(self.step);
        let written = match &self.run {
            Some(run) => Some(checkpoint::write(
                &run.root().join("checkpoints"),
                self.task.as_ref(),
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

    /// Forces background gradient averaging (the GAN's D average overlapped with G's
    /// backward pass) on or off, whatever the core count suggests (tests; experiments on
    /// other machines).
    pub fn set_overlap_allreduce(&mut self, overlap: bool) {
        self.group.set_overlap(overlap);
    }

    /// Keeps `metrics` up to date from now on.
    pub fn set_metrics(&mut self, metrics: WorkerMetrics) {
        self.metrics = Some(metrics);
    }

    /// Images per step over the whole group.
    pub fn global_batch(&self) -> usize {
        self.split.global
    }

    /// This rank's share of every global batch.
    pub fn batch_split(&self) -> &BatchSplit {
        &self.split
    }

    /// Runs step `self.step + 1`: the task's step on this rank's batches, with gradient
    /// averaging across the group. Counts the step as non-finite when its updates were
    /// skipped (`applied == false`).
    ///
    /// With metrics installed, also records the step's duration, its phases, the all-reduce
    /// traffic and, on logging steps, the gradient norms.
    pub fn step_once(&mut self) -> Result<StepOutcome> {
        let Some(metrics) = self.metrics.clone() else {
            return self.step_plain();
        };
        let started = Instant::now();
        let next = self.step + 1;
        let logging =
            next.is_multiple_of(self.settings.train.log_every) || next == self.settings.train.steps;
        // Timing phases on a GPU costs synchronisations: sample the logging steps only.
        let timed = logging || !self.task.clock().needs_sync();
        self.task.clock().start(timed);
        let outcome = self.step_plain()?;
        if logging {
            self.detail = StepDetail::default();
        }
        if let Some(phases) = self.task.clock().take() {
            let used = self.task.phases();
            let named: Vec<(&'static str, f64)> = phases
                .iter()
                .filter(|(phase, _)| used.contains(phase))
                .map(|(phase, seconds)| (phase.name(), *seconds))
                .collect();
            metrics.phases(&named);
            if logging {
                self.detail.phases = named;
            }
        }
        if logging {
            for (part, gradient) in self.task.gradients() {
                let norm = tch::no_grad(|| gradient.norm().double_value(&[]));
                metrics.gradient_norm(part, norm);
                self.detail.gradient_norms.push((part, norm));
            }
        }
        let traffic = self.group.take_traffic();
        metrics.allreduce(traffic.bytes, traffic.seconds);
        // This rank's images: its slice of each of the step's batches.
        let images = (self.split.local() as u64) * self.task.batches_per_step();
        metrics.step_done(
            self.step,
            started.elapsed().as_secs_f64(),
            images,
            outcome.applied,
        );
        Ok(outcome)
    }

    /// [`Self::step_once`] without metrics. Afterwards, [`TrainTask::gradients`] shows each
    /// part's group-averaged gradient of the step (for checking equivalences).
    pub fn step_plain(&mut self) -> Result<StepOutcome> {
        let mut source = RankBatches {
            dataset: &self.dataset,
            sampler: &mut self.sampler,
            rank: self.group.rank,
            world: self.group.world,
            first_row: self.split.rows.start,
            first_stream: self.step * self.task.batches_per_step(),
            pixels: &mut self.pixels,
            device: self.device,
            shape: self.grid_shape,
            labelled: self.class_names.is_some(),
        };
        let outcome = self.task.step(&mut source, &mut self.group)?;
        if outcome.applied {
            self.nonfinite_consecutive = 0;
        } else {
            self.nonfinite_total += 1;
            self.nonfinite_consecutive += 1;
        }
        self.step += 1;
        Ok(outcome)
    }

    /// Writes the sample grid for the current step (rank 0 only) and returns its path.
    pub fn write_samples(&mut self) -> Result<Option<PathBuf>> {
        let Some(run) = &mut self.run else {
            return Ok(None);
        };
        let seed = self.settings.train.seed;
        let images = match &self.class_names {
            None => self.task.sample_u8(GRID_IMAGES, seed),
            Some(names) => {
                // One row per class, the same fixed latents every time.
                let labels: Vec<u8> = (0..names.len())
                    .flat_map(|class| std::iter::repeat_n(class as u8, GRID_COLUMNS))
                    .collect();
                self.task.sample_labelled_u8(&labels, seed)?
            }
        };
        let written = samples::write_grid(&run.samples_dir(), self.step, &images, self.grid_shape)?;
        image_to_tensorboard(run, self.step, tensorboard::SAMPLES_TAG, &written)?;
        // A family that reconstructs also shows held-out originals beside their
        // reconstructions (original, reconstruction, … in each row of the grid).
        if let Some(heldout) = &self.heldout {
            let pixels = heldout.image_size();
            let originals = &heldout.images()[..(GRID_IMAGES / 2).min(heldout.len()) * pixels];
            if let Some(pairs) = self.task.reconstruct_u8(originals) {
                let path = samples::write_named_grid(
                    &run.samples_dir(),
                    &format!("reconstruction-{:08}.png", self.step),
                    &pairs,
                    self.grid_shape,
                )?;
                image_to_tensorboard(run, self.step, tensorboard::RECONSTRUCTION_TAG, &path)?;
            }
        }
        Ok(Some(written))
    }

    /// Trains until `train.steps`, logging, sampling and reporting to `observer`.
    pub fn run(&mut self, observer: &mut dyn StepObserver) -> Result<Summary> {
        match self.run_or_leave(observer)? {
            RunEnd::Finished(summary) => Ok(*summary),
            RunEnd::Left { step } => bail!("left the group at step {step} without finishing"),
        }
    }

    /// [`Trainer::run`], for an observer that may also tell this rank to leave the group.
    pub fn run_or_leave(&mut self, observer: &mut dyn StepObserver) -> Result<RunEnd> {
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
                "gantry: {} steps, {}, {} on {:?} with {} threads, data {} ({} images), run dir {}",
                total,
                self.split.describe(),
                self.task.describe(),
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
        let mut last: Option<Statistics> = None;
        let train_started = Instant::now();
        let (mut window_start, mut window_steps) = (Instant::now(), 0u64);

        // Set when the loop ends by Directive::Leave.
        let mut left = false;
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
                let statistics = self.group_mean(stats.to_host())?;
                let images_per_second =
                    (window_steps * global_batch) as f64 / window_start.elapsed().as_secs_f64();
                (window_start, window_steps) = (Instant::now(), 0);
                last = Some(statistics.clone());
                Some(LoggedStep {
                    statistics,
                    images_per_second,
                })
            } else {
                None
            };
            if let (Some(metrics), Some(logged)) = (&self.metrics, logged.as_ref()) {
                metrics.statistics(&logged.statistics);
            }
            if let (Some(run), Some(logged)) = (self.run.as_mut(), logged.as_ref()) {
                let row = MetricsRow {
                    step,
                    statistics: named(&logged.statistics),
                    images_per_second: logged.images_per_second,
                    wall_seconds: train_started.elapsed().as_secs_f64(),
                };
                run.append_metrics(&row, &self.detail)?;
            }
            if self.group.rank == 0 {
                progress.update(step, logged.as_ref().map(describe));
            }
            if verify_every > 0 && step.is_multiple_of(verify_every) {
                self.group.verify_identical(self.task.as_ref(), step)?;
            }
            let sample_due =
                (sample_every > 0 && step.is_multiple_of(sample_every)) || step == total;
            if sample_due {
                self.group.broadcast_state(self.task.as_ref())?;
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
            if matches!(directive, Directive::Stop | Directive::Leave) {
                left = directive == Directive::Leave;
                break;
            }
        }
        progress.finish();
        self.group.verify_identical(self.task.as_ref(), self.step)?;
        if left {
            return Ok(RunEnd::Left { step: self.step });
        }

        let train_seconds = train_started.elapsed().as_secs_f64();
        let host = last.context("no step was run")?;
        let quality = self.evaluate(true)?;
        let summary = Summary {
            steps: self.step,
            world_size: self.group.world,
            batch_size: self.split.largest(),
            global_batch_size: self.split.global,
            images_per_second: ((self.step - first_step) * global_batch) as f64 / train_seconds,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds,
            device: format!("{:?}", self.device),
            threads: self.threads,
            family: self.settings.model.family.to_string(),
            final_statistics: named(&host),
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
                "done: {} steps in {:.1} s, {:.0} images/s, {}; summary in {}",
                summary.steps,
                train_seconds,
                summary.images_per_second,
                host.iter()
                    .map(|(name, value)| format!("{name} {value:.4}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                run.root().join("summary.json").display()
            ));
        }
        Ok(RunEnd::Finished(Box::new(summary)))
    }

    /// Evaluates the model (rank 0 only): `eval.samples` samples (EMA weights where the
    /// family has them; 0 = none) scored with gantry-eval's MNIST classifier (trained once and
    /// cached) when the images are 28×28 grey digits, and for families with a likelihood the
    /// held-out negative ELBO, NLL and bits/dim (always: one pass over the held-out images). With `baseline`, also scores the untrained model of
    /// the same seed for `fid_initial`. `None` when there is nothing to evaluate.
    pub fn evaluate(&mut self, baseline: bool) -> Result<Option<QualityReport>> {
        if self.group.rank != 0 {
            return Ok(None);
        }
        let n = self.settings.eval.samples;
        let digits = self.grid_shape == [1, 28, 28] && n >= 2;
        let likelihood = match &self.heldout {
            Some(heldout) => self
                .task
                .likelihood(heldout.images(), &self.settings)
                .transpose()
                .context("held-out likelihood")?,
            _ => None,
        };
        if !digits && likelihood.is_none() {
            return Ok(None);
        }
        let mut report = QualityReport {
            fid: f64::NAN,
            fid_initial: f64::NAN,
            inception_score: f64::NAN,
            classes_covered: 0,
            class_histogram: [0; 10],
            samples: 0,
            classifier_accuracy: f64::NAN,
            heldout_neg_elbo_nats: likelihood.map(|l| l.neg_elbo_nats),
            heldout_nll_nats: likelihood.map(|l| l.nll_nats),
            bits_per_dim: likelihood.map(|l| l.bits_per_dim),
            label_accuracy: None,
        };
        if digits {
            let evaluator =
                gantry_eval::Evaluator::load_or_train(&gantry_eval::default_cache_dir())
                    .context("preparing the evaluation classifier")?;
            let seed = self.settings.train.seed.wrapping_add(1);
            let samples = self.task.sample_u8(n, seed);
            let quality = evaluator.score(&samples, n).context("scoring samples")?;
            // The classifier knows the ten digits: a conditional model of exactly those is
            // also scored on whether each sample is of the class it was drawn for.
            let digit_classes = (0..gantry_eval::NUM_CLASSES).map(|d| d.to_string());
            if let Some(names) = &self.class_names
                && names.iter().cloned().eq(digit_classes)
            {
                let labels = gantry_models::task::cycled_labels(n, names.len());
                report.label_accuracy = Some(
                    evaluator
                        .score_labelled(&samples, &labels)
                        .context("scoring samples by class")?
                        .label_accuracy,
                );
            }
            if baseline {
                // The untrained model is a pure function of the seed: rebuild it.
                let shape = ModelShape {
                    image: self.task.image_shape(),
                    classes: self.task.classes(),
                };
                let initial = gantry_models::task::build(&self.settings, shape, self.device)?;
                report.fid_initial = evaluator
                    .score(&initial.sample_u8(n, seed), n)
                    .context("scoring the untrained model")?
                    .fid;
            }
            report.fid = quality.fid;
            report.inception_score = quality.inception_score;
            report.classes_covered = quality.classes_covered;
            report.class_histogram = quality.class_histogram;
            report.samples = n;
            report.classifier_accuracy = evaluator.classifier_accuracy();
        }
        if let Some(run) = &mut self.run {
            run.append_quality(self.step, &report)?;
        }
        if let (Some(metrics), true) = (&self.metrics, digits) {
            metrics.quality(gantry_metrics::Quality {
                step: self.step,
                fid: report.fid,
                inception_score: report.inception_score,
                classes_covered: report.classes_covered,
            })?;
        }
        Ok(Some(report))
    }

    /// Averages a step's statistics over the group, so logs describe the global batch: the
    /// plain mean of the ranks' values with even slices, else weighted by each rank's slice
    /// (each value is a mean over the rank's slice, like the loss).
    fn group_mean(&mut self, mut statistics: Statistics) -> Result<Statistics> {
        if self.group.world == 1 {
            return Ok(statistics);
        }
        let weight = self.split.gradient_weight();
        let mut values: Vec<f32> = statistics
            .iter()
            .map(|(_, v)| weight.map_or(*v, |w| *v * w) as f32)
            .collect();
        self.group.sum_host(&mut values)?;
        let n = match weight {
            Some(_) => 1.0,
            None => self.group.world as f64,
        };
        for ((_, value), sum) in statistics.iter_mut().zip(values) {
            *value = f64::from(sum) / n;
        }
        Ok(statistics)
    }
}

/// This rank's rows of the global batches of one step, read from the training set.
struct RankBatches<'a> {
    dataset: &'a Dataset,
    sampler: &'a mut GlobalSampler,
    rank: usize,
    world: usize,
    /// The global row of this rank's first image ([`BatchSplit::rows`]).
    first_row: usize,
    /// The data stream of the step's first batch.
    first_stream: u64,
    pixels: &'a mut Vec<f32>,
    device: Device,
    shape: [usize; 3],
    /// Whether batches carry labels (a conditional task).
    labelled: bool,
}

impl BatchSource for RankBatches<'_> {
    fn batch(&mut self, i: u64) -> Result<Batch, ExternalError> {
        let stream = self.first_stream + i;
        let indices = self.sampler.indices(stream, self.rank, self.world)?;
        self.dataset.batch_f32(&indices, self.pixels);
        let [c, h, w] = self.shape.map(|d| d as i64);
        let images = Tensor::from_slice(self.pixels)
            .view([-1, c, h, w])
            .to_device(self.device);
        // The labels of the same indices: they follow the images through the sampler.
        let labels = self.labelled.then(|| {
            let wide: Vec<i64> = self
                .dataset
                .labels_of(&indices)
                .into_iter()
                .map(i64::from)
                .collect();
            Tensor::from_slice(&wide).to_device(self.device)
        });
        Ok(Batch {
            stream,
            first_row: self.first_row,
            images,
            labels,
        })
    }
}

/// Adds the grid just written to `path` to TensorBoard, when it is on: the file's own bytes,
/// so that TensorBoard shows exactly the PNG in `samples/` (read back from the page cache, not
/// encoded again).
fn image_to_tensorboard(run: &mut RunDir, step: u64, tag: &str, path: &Path) -> Result<()> {
    let Some(tensorboard) = run.tensorboard() else {
        return Ok(());
    };
    let png = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    tensorboard.image(step, tag, &png)
}

/// Statistics as the JSON object of `metrics.jsonl` rows and `summary.json`'s `final`.
fn named(statistics: &Statistics) -> std::collections::BTreeMap<String, f64> {
    statistics
        .iter()
        .map(|(name, value)| ((*name).to_owned(), *value))
        .collect()
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
    let mut line: Vec<String> = logged
        .statistics
        .iter()
        .map(|(name, value)| format!("{name} {value:.3}"))
        .collect();
    line.push(format!("{:.0} img/s", logged.images_per_second));
    line.join(" ")
}

/// The class names a conditional model is built for: the data set's own (a `folder:` set's
/// sub-folders) or its label values `0..k` as text; `None` for an unconditional model.
fn class_names(settings: &Settings, dataset: &Dataset) -> Result<Option<Vec<String>>> {
    if !settings.model.conditional {
        return Ok(None);
    }
    if let Some(names) = dataset.class_names() {
        return Ok(Some(names.to_vec()));
    }
    match dataset.classes() {
        // Zero-padded, so that the names sort in label order (an exported `folder:` tree
        // reads back with the same labels).
        Some(k) => {
            let width = (k - 1).max(1).to_string().len();
            Ok(Some((0..k).map(|c| format!("{c:0width$}")).collect()))
        }
        None => bail!(
            "model.conditional = true needs a labelled data set, and {} ({}) has no labels; \
             a folder: data set is labelled by its sub-folders (PATH/<class>/*.png)",
            settings.data.dataset,
            dataset.name()
        ),
    }
}

/// Refuses to resume a conditional model on a data set whose classes differ from the
/// checkpoint's: every label would mean something else.
fn check_same_classes(checkpoint: &CheckpointDir, names: &[String]) -> Result<()> {
    match &checkpoint.state.classes {
        Some(saved) if saved.as_slice() == names => Ok(()),
        Some(saved) => bail!(
            "cannot resume {}: it was trained on the classes {saved:?}, the data set has {names:?}",
            checkpoint.path.display()
        ),
        None => bail!(
            "cannot resume {}: it records no classes (an unconditional model's checkpoint)",
            checkpoint.path.display()
        ),
    }
}

/// BatchNorm normalises over the rank's own slice: when the slices are not the
/// `train.batch_size` images the full group would use (an elastic group that shrank), the
/// statistics, and so the math, differ from the full group's. Warned once, at the start of
/// each generation; see docs/elastic.md.
fn warn_if_batch_norm_slices_changed(settings: &Settings, split: &BatchSplit) {
    let batch_norm =
        settings.model.family == gantry_config::Family::Gan && settings.model.batch_norm;
    let full = settings.train.batch_size;
    if !batch_norm || settings.train.global_batch_size == 0 {
        return;
    }
    if split.smallest() == full && split.largest() == full {
        return;
    }
    let slices = if split.is_even() {
        split.smallest().to_string()
    } else {
        format!("{}–{}", split.smallest(), split.largest())
    };
    tracing::warn!(
        "warning: model.batch_norm is on and {} rank(s) share train.global_batch_size = {}:          BatchNorm's batch statistics are taken over each rank's slice of {slices} images, not          the train.batch_size = {full} of the full group, so this generation's math is not          identical to the full group's (see docs/elastic.md)",
        split.world,
        split.global
    );
}

/// Refuses a rank's slice of the global batch whose images alone, as floats, would take more
/// than half of the host's available memory (the activations of a step need several times
/// more): a clear error instead of an allocation failure that aborts the process. Checked on
/// the largest slice of any rank, naming the key that sets it.
fn check_batch_fits(
    train: &gantry_config::Train,
    split: &BatchSplit,
    (c, h, w): (usize, usize, usize),
    device: Device,
) -> Result<()> {
    let batch_size = split.largest();
    let bytes = (batch_size as u64)
        .saturating_mul((c * h * w) as u64)
        .saturating_mul(size_of::<f32>() as u64);
    let room = match device {
        // Without the device's figure (no driver call possible) libtorch's own error stands.
        Device::Cuda(ordinal) => gantry_collective::nccl::cuda_memory(ordinal)
            .ok()
            .map(|(free, _)| (free, format!("GPU cuda:{ordinal} has free"))),
        _ => gantry_store::host::available_memory_bytes()
            .map(|available| (available, "this host has available".to_owned())),
    };
    let Some((available, what)) = room else {
        return Ok(());
    };
    if bytes > available / 2 {
        let (setting, key) = match train.global_batch_size {
            0 => (
                format!("train.batch_size = {batch_size}"),
                "train.batch_size",
            ),
            global => (
                format!(
                    "train.global_batch_size = {global} over {} rank(s), {batch_size} per rank",
                    split.world
                ),
                "train.global_batch_size",
            ),
        };
        bail!(
            "{setting}: one batch of {c}×{h}×{w} images takes {} MiB as floats, more than half \
             of the {} MiB {what}; choose a smaller {key}",
            bytes >> 20,
            available >> 20
        );
    }
    Ok(())
}
