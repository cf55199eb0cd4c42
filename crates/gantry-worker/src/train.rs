//! The training loop of one worker.

use std::convert::Infallible;
use std::time::Instant;

use anyhow::{Context, Result};
use gantry_config::{Dataset as DatasetChoice, Settings};
use gantry_data::Dataset;
use gantry_data::sampler::GlobalSampler;
use gantry_models::{Gan, HostStats, latent, runtime};

use crate::progress::Progress;
use crate::run_dir::{FinalFigures, MetricsRow, RunDir, Summary};
use crate::samples;

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
    gantry_data::download::load_remote(remote, gantry_data::download::Split::Train, &cache, &data.mirror)
        .with_context(|| format!("loading data set {}", data.dataset))
}

/// Trains on one process (world size 1) and writes the run directory. Returns the summary.
pub fn run_standalone(settings: &Settings) -> Result<Summary> {
    let started = Instant::now();
    let threads = runtime::set_threads(settings.train.threads, 1);
    let device = runtime::resolve_device(settings.run.device, 0)?;
    let dataset = load_dataset(settings)?;
    let (c, h, w) = dataset.image_shape();
    let shape = [c as i64, h as i64, w as i64];

    let mut gan = Gan::new(settings, shape, device)?;
    let mut run = RunDir::create(&settings.run.dir, settings)?;
    let t = &settings.train;
    let (rank, world) = (0usize, 1usize);
    let local_batch = t.batch_size;
    let global_batch = local_batch * world;
    let mut sampler = GlobalSampler::new(t.seed, dataset.len(), global_batch)?;
    let grid_z = gan.latents(&latent::fixed(t.seed, GRID_IMAGES, gan.latent_dim()));
    let grid_shape = [c, h, w];

    let progress_line = format!(
        "gantry worker: {} steps, batch {local_batch}, {} on {device:?} with {threads} threads, data {} ({} images), run dir {}",
        t.steps,
        settings.model.kind,
        settings.data.dataset,
        dataset.len(),
        run.root().display()
    );
    let mut progress = Progress::new(t.steps, 0);
    progress.println(&progress_line);
    let mut last_sample = Some(samples::write_grid(&run.samples_dir(), 0, &gan.generate_u8(&grid_z), grid_shape)?);

    let mut pixels = Vec::new();
    let mut z = Vec::new();
    let mut last = None;
    let train_started = Instant::now();
    let (mut window_start, mut window_steps) = (Instant::now(), 0u64);
    for step in 1..=t.steps {
        // Step s consumes global batch s − 1 of the data stream and latent stream s − 1.
        let indices = sampler.indices(step - 1, rank, world)?;
        dataset.batch_f32(&indices, &mut pixels);
        latent::fill(t.seed, step - 1, gan.latent_dim(), rank * local_batch, local_batch, &mut z);
        let real = gan.images(&pixels);
        let latents = gan.latents(&z);
        let stats = gan
            .train_step(&real, &latents, &mut |_, _| Ok::<(), Infallible>(()))
            .unwrap_or_else(|never| match never {});
        window_steps += 1;

        if step % t.log_every == 0 || step == t.steps {
            let host = stats.to_host();
            let images_per_second = (window_steps * global_batch as u64) as f64 / window_start.elapsed().as_secs_f64();
            run.append_metrics(&MetricsRow {
                step,
                d_loss: host.d_loss,
                g_loss: host.g_loss,
                d_x: host.d_real,
                d_g_z: host.d_fake,
                images_per_second,
                wall_seconds: train_started.elapsed().as_secs_f64(),
            })?;
            progress.update(step, || describe(&host, images_per_second));
            (window_start, window_steps) = (Instant::now(), 0);
            last = Some(host);
        } else {
            progress.update(step, String::new);
        }

        let sample_every = settings.samples.every;
        if (sample_every > 0 && step % sample_every == 0) || step == t.steps {
            let images = gan.generate_u8(&grid_z);
            last_sample = Some(samples::write_grid(&run.samples_dir(), step, &images, grid_shape)?);
        }
    }
    progress.finish();

    let train_seconds = train_started.elapsed().as_secs_f64();
    let host = last.context("no step was run")?;
    let summary = Summary {
        steps: t.steps,
        world_size: world,
        batch_size: local_batch,
        images_per_second: (t.steps * global_batch as u64) as f64 / train_seconds,
        wall_seconds: started.elapsed().as_secs_f64(),
        train_seconds,
        device: format!("{device:?}"),
        threads,
        final_figures: FinalFigures {
            d_loss: host.d_loss,
            g_loss: host.g_loss,
            d_x: host.d_real,
            d_g_z: host.d_fake,
        },
        last_sample: last_sample
            .and_then(|p| p.strip_prefix(run.root()).ok().map(|p| p.display().to_string())),
    };
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
    Ok(summary)
}

fn describe(host: &HostStats, images_per_second: f64) -> String {
    format!(
        "d_loss {:.3} g_loss {:.3} D(x) {:.2} D(G(z)) {:.2} {:.0} img/s",
        host.d_loss, host.g_loss, host.d_real, host.d_fake, images_per_second
    )
}
