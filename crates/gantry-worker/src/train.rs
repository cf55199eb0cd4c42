//! The training loop of one worker, standalone or as one rank of a data-parallel group.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use gantry_config::{Dataset as DatasetChoice, Settings};
use gantry_data::Dataset;
use gantry_data::sampler::GlobalSampler;
use gantry_models::{Gan, HostStats, Network, latent, runtime};
use tch::{Device, Tensor};

use crate::progress::Progress;
use crate::run_dir::{FinalFigures, MetricsRow, RunDir, Summary};
use crate::samples;
use crate::sync::Group;

/// Rows of the fixed latent batch behind every sample grid (8 × 8).
const GRID_IMAGES: usize = 64;

/// Loads the configured training set.
pub fn load_dataset(settings: &Settings) -> Result<Dataset> {
    let data = &settings.data;
    let remote = match data.dataset {
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
    started: Instant,
    /// Steps completed so far.
    pub step: u64,
    pixels: Vec<f32>,
    latents: Vec<f32>,
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
        let run = if group.rank == 0 {
            Some(RunDir::create(&settings.run.dir, settings)?)
        } else {
            None
        };
        let grid_z = gan.latents(&latent::fixed(
            settings.train.seed,
            GRID_IMAGES,
            gan.latent_dim(),
        ));
        Ok(Self {
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
            started,
            step: 0,
            pixels: Vec::new(),
            latents: Vec::new(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn global_batch(&self) -> usize {
        self.settings.train.batch_size * self.group.world
    }

    /// Runs step `self.step + 1`: this rank's slice of the global batch, gradient averaging
    /// across the group, both optimiser steps.
    pub fn step_once(&mut self) -> Result<gantry_models::StepStats> {
        self.step_with(&mut |_, _| {})
    }

    /// [`Self::step_once`], showing `tap` each network's group-averaged flat gradient just
    /// before its optimiser step (for gradient statistics and for checking equivalences).
    pub fn step_with(
        &mut self,
        tap: &mut dyn FnMut(Network, &Tensor),
    ) -> Result<gantry_models::StepStats> {
        let t = &self.settings.train;
        let (rank, world, local) = (self.group.rank, self.group.world, t.batch_size);
        // Step s consumes global batch s − 1 of the data stream and latent stream s − 1.
        let index = self.step;
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
        let real = self.gan.images(&self.pixels);
        let z = self.gan.latents(&self.latents);
        let group = &mut self.group;
        let stats = self.gan.train_step(&real, &z, &mut |network, grad| {
            group.average(grad)?;
            tap(network, grad);
            anyhow::Ok(())
        })?;
        self.step += 1;
        Ok(stats)
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
        let global_batch = self.global_batch() as u64;
        let first_step = self.step;

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
            window_steps += 1;

            let logged = if step % log_every == 0 || step == total {
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
            if verify_every > 0 && step % verify_every == 0 {
                self.group.verify_identical(&self.gan, step)?;
            }
            let sample_due = (sample_every > 0 && step % sample_every == 0) || step == total;
            if sample_due {
                self.group.broadcast_state(&mut self.gan)?;
                if let Some(path) = self.write_samples()? {
                    last_sample = Some(path);
                }
            }
            match observer.after_step(step, logged.as_ref())? {
                Directive::Continue => {}
                Directive::Checkpoint => self.checkpoint_now()?,
                Directive::Stop => {
                    self.checkpoint_now()?;
                    break;
                }
            }
        }
        progress.finish();
        self.group.verify_identical(&self.gan, self.step)?;

        let train_seconds = train_started.elapsed().as_secs_f64();
        let host = last.context("no step was run")?;
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

    /// Continues from the newest complete checkpoint in the run directory, if there is one.
    pub fn resume_latest(&mut self) -> Result<()> {
        // Checkpoints arrive with the engine's checkpoint module.
        Ok(())
    }

    /// Writes a checkpoint of the current state (all ranks call this at the same step).
    pub fn checkpoint_now(&mut self) -> Result<()> {
        // Checkpoints arrive with the engine's checkpoint module; until then state is
        // only made consistent across ranks.
        self.group.broadcast_state(&mut self.gan)
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

/// Trains on one process (world size 1) and writes the run directory.
pub fn run_standalone(settings: &Settings) -> Result<Summary> {
    let mut trainer = Trainer::new(settings, Group::solo(), 1, 0)?;
    trainer.run(&mut NoObserver)
}

fn describe(logged: &LoggedStep) -> String {
    let s = &logged.stats;
    format!(
        "d_loss {:.3} g_loss {:.3} D(x) {:.2} D(G(z)) {:.2} {:.0} img/s",
        s.d_loss, s.g_loss, s.d_real, s.d_fake, logged.images_per_second
    )
}
