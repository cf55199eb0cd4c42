//! `gantry-eval`: scores digits from an IDX file or from a checkpoint of any model family,
//! and prints one JSON object on stdout (logs go to stderr).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_config::Overrides;
use gantry_eval::{Evaluator, IMAGE_PIXELS, Quality};
use gantry_metrics::logs::{self, LogFormat};
use gantry_models::Gan;
use serde::Serialize;
use tch::Device;

/// Scores MNIST-like digits: FID and Inception Score against a small MNIST classifier.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// IDX image file (u8, N × 28 × 28; raw or gzip) to score.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    images: Option<PathBuf>,
    /// Checkpoint directory (config.toml + generator_ema.safetensors or generator.safetensors)
    /// whose generator is sampled and scored.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Images to generate from the checkpoint.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..))]
    samples: u64,
    /// Seed of the latent vectors sampled from the checkpoint.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier cache; default `$XDG_CACHE_HOME/gantry/eval` or `~/.cache/gantry/eval`.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// libtorch intra-op threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// How logs are written to stderr (level by RUST_LOG, default info).
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// What is printed: the scores plus what they were computed from.
#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    quality: Quality,
    samples: usize,
    classifier_accuracy: f64,
}

fn main() -> std::process::ExitCode {
    gantry_models::runtime::tune_host_allocator();
    let args = Args::parse();
    if let Err(e) = logs::init(args.log_format) {
        // There is no log to report through.
        eprintln!("gantry-eval: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gantry-eval: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes the message before already quotes
/// (data errors embed their I/O error), and without anyhow's backtrace: bad input is not a bug.
fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(args: Args) -> Result<()> {
    // A one-shot tool: use the whole machine (a cache miss trains the classifier).
    gantry_models::runtime::set_threads(args.threads, 1);

    // Read the input before the (possibly slow) classifier, so bad input fails at once.
    let (images, n) = match (&args.images, &args.checkpoint) {
        (Some(path), _) => read_images(path)?,
        (None, Some(dir)) => {
            let n = usize::try_from(args.samples).context("--samples too large")?;
            (generate(dir, n, args.seed)?, n)
        }
        (None, None) => bail!("give --images FILE or --checkpoint DIR"),
    };

    let cache_dir = args
        .cache_dir
        .unwrap_or_else(gantry_eval::default_cache_dir);
    let evaluator = Evaluator::load_or_train(&cache_dir)
        .with_context(|| format!("loading the classifier (cache {})", cache_dir.display()))?;
    let quality = evaluator.score(&images, n)?;
    let report = Report {
        quality,
        samples: n,
        classifier_accuracy: evaluator.classifier_accuracy(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn read_images(path: &Path) -> Result<(Vec<u8>, usize)> {
    // The reader's errors already name the file.
    let idx = gantry_data::idx::read_idx_images(path)?;
    if (idx.rows, idx.cols) != (28, 28) {
        bail!(
            "{}: images are {}×{}, expected 28×28",
            path.display(),
            idx.rows,
            idx.cols
        );
    }
    if idx.len < 2 {
        bail!(
            "{}: {} image(s); scoring needs at least 2",
            path.display(),
            idx.len
        );
    }
    debug_assert_eq!(idx.pixels.len(), idx.len * IMAGE_PIXELS);
    Ok((idx.pixels, idx.len))
}

/// Samples `n` digits from the checkpoint's model (a GAN's EMA generator if present), on
/// the CPU, with `TrainTask::sample_u8`'s images for the seed.
fn generate(dir: &Path, n: usize, seed: u64) -> Result<Vec<u8>> {
    let config = dir.join("config.toml");
    if !config.is_file() {
        bail!(
            "{}: no such file (is {} a checkpoint directory?)",
            config.display(),
            dir.display()
        );
    }
    // Score only what the training run wrote: every file the MANIFEST lists must match it,
    // and the files read below must be among them.
    let listed = gantry_store::checkpoint::verify_manifest(dir)
        .with_context(|| format!("{} is not a complete, intact checkpoint", dir.display()))?;
    let vouch = |name: &str| -> Result<()> {
        if !listed.iter().any(|l| l == name) {
            bail!("{}: the MANIFEST does not list {name}", dir.display());
        }
        Ok(())
    };
    vouch("config.toml")?;
    let mut settings = gantry_config::load(Some(&config), std::iter::empty(), &Overrides::new())
        .with_context(|| format!("{}: invalid configuration", config.display()))?;
    if settings.model.family != gantry_config::Family::Gan {
        // The other families sample from their complete saved state (no EMA to choose).
        for file in gantry_models::task::checkpoint_files(settings.model.family) {
            vouch(file)?;
        }
        let mut task = gantry_models::task::build(&settings, [1, 28, 28], Device::Cpu)
            .with_context(|| format!("{}: building the model", config.display()))?;
        task.load(dir)
            .with_context(|| format!("{}: loading the model", dir.display()))?;
        tracing::info!(family = %settings.model.family, samples = n, seed, "sampling the model");
        return Ok(task.sample_u8(n, seed));
    }
    // The weights file chosen below (EMA or live) is loaded into the generator itself, so the
    // Gan must sample from that generator rather than keep an EMA copy of its own.
    settings.train.ema_decay = 0.0;
    let weights = ["generator_ema.safetensors", "generator.safetensors"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{}: no generator_ema.safetensors or generator.safetensors in the checkpoint",
                dir.display()
            )
        })?;
    vouch(&weights.file_name().unwrap_or_default().to_string_lossy())?;
    let mut gan = Gan::new(&settings, [1, 28, 28], Device::Cpu)
        .with_context(|| format!("{}: building the generator", config.display()))?;
    gan.generator_vs
        .load(&weights)
        .with_context(|| format!("{}: loading the generator weights", weights.display()))?;
    tracing::info!(weights = %weights.display(), samples = n, seed, "sampling the generator");

    // Chunked only to bound memory; BatchNorm runs on running statistics, so chunking does not
    // change the images.
    let dim = gan.latent_dim();
    let latents = gantry_models::latent::fixed(seed, n, dim);
    let mut images = Vec::with_capacity(n * IMAGE_PIXELS);
    for chunk in latents.chunks(1000 * dim) {
        images.extend(gan.generate_u8(&gan.latents(chunk)));
    }
    if images.len() != n * IMAGE_PIXELS {
        bail!(
            "{}: the generator produced {} bytes for {n} 28×28 images",
            weights.display(),
            images.len()
        );
    }
    Ok(images)
}
