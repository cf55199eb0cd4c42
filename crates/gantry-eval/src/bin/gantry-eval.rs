//! `gantry-eval`: scores digits from an IDX file or from a checkpoint of any model family,
//! writes a checkpoint's samples by class, and measures generated digits as training data.
//! Every form prints one JSON object on stdout (logs go to stderr).
//!
//! ```text
//! gantry-eval (--images FILE [--labels FILE] | --checkpoint DIR [--samples N] [--seed S])
//!             [--cache-dir DIR] [--threads T] [--log-format F]
//! gantry-eval sample --checkpoint DIR (--per-class N | --classes 0,3,7) [--seed S]
//!             [--device cpu|cuda|cuda:I] [--format idx|png] --out PATH
//! gantry-eval augment [--real-subset N] [--subset-seed S] [--generated PATH] [--steps K]
//!             [--seed S]
//! gantry-eval subset --size N [--subset-seed S] --out DIR
//! ```
//!
//! The flat form (no subcommand) is the original interface and stays as it was; its flags
//! cannot be mixed with a subcommand. `--threads` and `--log-format` are accepted by every
//! form (after the subcommand's name).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use gantry_config::Overrides;
use gantry_eval::export::{self, Checkpoint, Classes, ExportRequest, Format};
use gantry_eval::{Evaluator, IMAGE_PIXELS, LabelledQuality, NUM_CLASSES, Quality, augment};
use gantry_metrics::logs::{self, LogFormat};
use gantry_models::Gan;
use serde::Serialize;
use tch::Device;

/// Scores MNIST-like digits: FID and Inception Score against a small MNIST classifier.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// IDX image file (u8, N × 28 × 28; raw or gzip) to score.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "checkpoint",
        required_unless_present = "checkpoint"
    )]
    images: Option<PathBuf>,
    /// IDX label file (N digits 0-9; raw or gzip): the class each of --images was generated
    /// for. Adds label_accuracy and per-class scores.
    #[arg(
        long,
        value_name = "FILE",
        requires = "images",
        conflicts_with = "checkpoint"
    )]
    labels: Option<PathBuf>,
    /// Checkpoint directory (config.toml + the model's weights, sealed by its MANIFEST) whose
    /// model is sampled and scored; a conditional model's samples cycle through its classes
    /// (image i of class i mod classes) and get the labelled report.
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
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// How logs are written to stderr (level by RUST_LOG, default info).
    #[arg(long, global = true, env = "GANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes samples of a checkpoint, by class, as an IDX pair or a PNG tree.
    Sample(SampleArgs),
    /// Trains a fixed small classifier (the evaluator's architecture, fixed steps and seed) on
    /// real digits plus optional generated ones; prints its accuracy on the held-out digits.
    Augment(AugmentArgs),
    /// Writes the real-digit subset `augment --real-subset N --subset-seed S` trains on, as a
    /// PNG tree (`DIR/<digit>/*.png`) for `data.dataset = "folder:DIR"`.
    Subset(SubsetArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["per_class", "classes"])))]
struct SampleArgs {
    /// Checkpoint directory of a model (a conditional one to ask for classes).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// Images of every class of the model.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    per_class: Option<u64>,
    /// One image of each listed class, in this order (repeats allowed), e.g. 0,3,7.
    #[arg(long, value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    classes: Option<Vec<u8>>,
    /// Seed of the sampled latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: cpu, cuda (the first GPU) or cuda:I.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// idx: PATH/ holding an images and a labels IDX file; png: PATH/<class>/NNNNNN.png.
    #[arg(long, value_enum, default_value_t = FormatArg::Png)]
    format: FormatArg,
    /// Output directory; must not exist (nothing is overwritten).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Idx,
    Png,
}

#[derive(Debug, clap::Args)]
struct AugmentArgs {
    /// Real labelled digits to train on, class-balanced, from the first 9,000 embedded
    /// MNIST-10k digits (9000 = all of them; 0 = generated digits only).
    #[arg(long, value_name = "N", default_value_t = augment::REAL_POOL as u64,
          value_parser = clap::value_parser!(u64).range(0..=augment::REAL_POOL as u64))]
    real_subset: u64,
    /// Chooses which digits of each class the subset takes.
    #[arg(long, value_name = "S", default_value_t = 0)]
    subset_seed: u64,
    /// Generated digits to add: a PNG tree (PATH/<digit>/*.png) or a directory holding an IDX
    /// images/labels pair, as `gantry-eval sample` writes them.
    #[arg(long, value_name = "PATH")]
    generated: Option<PathBuf>,
    /// Training steps (batches of 64), the same for every training set so arms compare.
    #[arg(long, value_name = "K", default_value_t = augment::DEFAULT_STEPS as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    steps: u64,
    /// Seeds the classifier's initial weights, dropout and batch order.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct SubsetArgs {
    /// Real digits to write (1..=9000), chosen as `augment --real-subset N` chooses them.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=augment::REAL_POOL as u64))]
    size: u64,
    #[arg(long, value_name = "S", default_value_t = 0)]
    subset_seed: u64,
    /// Output directory; must not exist (nothing is overwritten).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// What is printed: the scores plus what they were computed from.
#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    quality: Quality,
    samples: usize,
    classifier_accuracy: f64,
}

/// [`Report`] for images of known classes.
#[derive(Debug, Serialize)]
struct LabelledReport {
    #[serde(flatten)]
    quality: LabelledQuality,
    samples: usize,
    classifier_accuracy: f64,
}

/// What `subset` prints.
#[derive(Debug, Serialize)]
struct SubsetReport {
    images: usize,
    /// Images per digit 0-9.
    per_class: [usize; NUM_CLASSES],
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    gantry_models::runtime::tune_host_allocator();
    let args = Args::parse();
    if let Err(e) = logs::init(args.log_format) {
        // There is no log to report through.
        eprintln!("gantry-eval: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // A one-shot tool: use the whole machine (a cache miss trains the classifier).
    gantry_models::runtime::set_threads(args.threads, 1);
    let result = match args.command {
        None => score(args),
        Some(Command::Sample(sample_args)) => sample(sample_args),
        Some(Command::Augment(augment_args)) => run_augment(augment_args),
        Some(Command::Subset(subset_args)) => subset(subset_args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gantry-eval: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes the message before already quotes
/// (data errors embed their I/O error), and without anyhow's backtrace: bad input is not a bug.
/// Line breaks inside a message (lists of failures) become "; ", so one error is one log line.
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
    let mut joined = String::with_capacity(line.len());
    for part in line.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !joined.is_empty() {
            joined.push_str(if joined.ends_with(':') { " " } else { "; " });
        }
        joined.push_str(part);
    }
    joined
}

/// The flat form: scores `--images` (with `--labels`) or samples of `--checkpoint`.
fn score(args: Args) -> Result<()> {
    // Read the input before the (possibly slow) classifier, so bad input fails at once.
    let (images, labels) = match (&args.images, &args.checkpoint) {
        (Some(path), _) => {
            let images = read_images(path)?;
            let labels = args
                .labels
                .as_deref()
                .map(|labels| read_labels(labels, path, &images))
                .transpose()?;
            (images, labels)
        }
        (None, Some(dir)) => {
            let n = usize::try_from(args.samples).context("--samples too large")?;
            generate(dir, n, args.seed)?
        }
        (None, None) => bail!("give --images FILE or --checkpoint DIR"),
    };
    let n = images.len() / IMAGE_PIXELS;

    let cache_dir = args
        .cache_dir
        .unwrap_or_else(gantry_eval::default_cache_dir);
    let evaluator = Evaluator::load_or_train(&cache_dir)
        .with_context(|| format!("loading the classifier (cache {})", cache_dir.display()))?;
    let classifier_accuracy = evaluator.classifier_accuracy();
    let json = match labels {
        None => serde_json::to_string(&Report {
            quality: evaluator.score(&images, n)?,
            samples: n,
            classifier_accuracy,
        })?,
        Some(labels) => serde_json::to_string(&LabelledReport {
            quality: evaluator.score_labelled(&images, &labels)?,
            samples: n,
            classifier_accuracy,
        })?,
    };
    println!("{json}");
    Ok(())
}

fn read_images(path: &Path) -> Result<Vec<u8>> {
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
    Ok(idx.pixels)
}

/// Reads `--labels` and checks them against the images of `images_path`.
fn read_labels(path: &Path, images_path: &Path, images: &[u8]) -> Result<Vec<u8>> {
    let labels = gantry_data::idx::read_idx_labels(path)?.labels;
    let n = images.len() / IMAGE_PIXELS;
    if labels.len() != n {
        bail!(
            "{} has {} labels, but {} has {n} images",
            path.display(),
            labels.len(),
            images_path.display()
        );
    }
    gantry_eval::check_labelled(images, &labels).with_context(|| path.display().to_string())?;
    Ok(labels)
}

/// Samples `n` digits from the checkpoint's model (a GAN's EMA generator if present), on
/// the CPU, with `TrainTask::sample_u8`'s images for the seed; for a conditional model also
/// their labels (cycled through the classes), as digits.
///
/// A conditional checkpoint is opened by [`export::open_checkpoint`], which needs the complete
/// checkpoint a training run writes (its `state.json` names the classes). An unconditional
/// one is read as it always was: from `config.toml` and the model's weights alone, so a GAN
/// directory holding only (EMA) generator weights still scores.
fn generate(dir: &Path, n: usize, seed: u64) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
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
    if settings.model.conditional {
        return generate_conditional(dir, n, seed);
    }
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
        return Ok((task.sample_u8(n, seed), None));
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
        images.extend(gan.generate_u8(&gan.latents(chunk), None));
    }
    if images.len() != n * IMAGE_PIXELS {
        bail!(
            "{}: the generator produced {} bytes for {n} 28×28 images",
            weights.display(),
            images.len()
        );
    }
    Ok((images, None))
}

/// [`generate`] for a conditional checkpoint.
fn generate_conditional(dir: &Path, n: usize, seed: u64) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let checkpoint = export::open_checkpoint(dir, Device::Cpu)?;
    let labels = match checkpoint.task.classes() {
        None => None,
        Some(classes) => {
            let digits = class_digits(&checkpoint, classes)?;
            let labels: Vec<u8> = gantry_models::task::cycled_labels(n, classes)
                .iter()
                .map(|&l| digits[usize::from(l)])
                .collect();
            if n < 2 * classes {
                bail!(
                    "--samples {n} gives some of the model's {classes} classes fewer than 2 \
                     images; per-class scores need at least {}",
                    2 * classes
                );
            }
            Some(labels)
        }
    };
    tracing::info!(
        family = %checkpoint.settings.model.family,
        samples = n,
        seed,
        conditional = labels.is_some(),
        "sampling the model"
    );
    let images = checkpoint.task.sample_u8(n, seed);
    if images.len() != n * IMAGE_PIXELS {
        bail!(
            "{}: the model produced {} bytes for {n} 28×28 images",
            dir.display(),
            images.len()
        );
    }
    Ok((images, labels))
}

/// The digit each of a conditional model's `classes` labels stands for: its class name
/// ("0".."9"), or the label itself when the checkpoint names no classes (MNIST-style data).
fn class_digits(checkpoint: &Checkpoint, classes: usize) -> Result<Vec<u8>> {
    let Some(names) = &checkpoint.class_names else {
        if classes > NUM_CLASSES {
            bail!(
                "{}: the model has {classes} classes; the classifier scores digits 0-9",
                checkpoint.dir.display()
            );
        }
        return Ok((0..classes as u8).collect());
    };
    names
        .iter()
        .map(|name| {
            name.parse::<u8>()
                .ok()
                .filter(|&d| usize::from(d) < NUM_CLASSES && *name == d.to_string())
                .with_context(|| {
                    format!(
                        "{}: class {name:?} is not a digit 0-9, which is all the classifier \
                         scores",
                        checkpoint.dir.display()
                    )
                })
        })
        .collect()
}

fn sample(args: SampleArgs) -> Result<()> {
    let classes = match (args.per_class, args.classes) {
        (Some(n), _) => Classes::PerClass(usize::try_from(n).context("--per-class too large")?),
        (None, Some(list)) => Classes::List(list),
        // clap's group requires one of them.
        (None, None) => bail!("give --per-class N or --classes LIST"),
    };
    // Refused again by `export` at the last moment; checked here too so that a taken path
    // fails before the (possibly slow) model load.
    if args.out.symlink_metadata().is_ok() {
        bail!("{}: already exists; not overwriting", args.out.display());
    }
    let checkpoint = export::open_checkpoint(&args.checkpoint, args.device)?;
    let request = ExportRequest {
        classes,
        seed: args.seed,
        format: match args.format {
            FormatArg::Idx => Format::Idx,
            FormatArg::Png => Format::Png,
        },
        out: args.out,
        progress: std::io::stderr().is_terminal(),
    };
    let exported = export::export(&checkpoint, &request)?;
    println!("{}", serde_json::to_string(&exported)?);
    Ok(())
}

fn run_augment(args: AugmentArgs) -> Result<()> {
    let request = augment::Request {
        real_subset: usize::try_from(args.real_subset)?,
        subset_seed: args.subset_seed,
        generated: args.generated,
        steps: usize::try_from(args.steps)?,
        seed: args.seed,
    };
    let report = augment::run(&request)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn subset(args: SubsetArgs) -> Result<()> {
    let size = usize::try_from(args.size)?;
    let written = augment::write_subset(size, args.subset_seed, &args.out)?;
    let mut per_class = [0; NUM_CLASSES];
    for &l in written.labels().unwrap_or_default() {
        per_class[usize::from(l)] += 1;
    }
    let report = SubsetReport {
        images: written.len(),
        per_class,
        out: args.out,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `cpu`, `cuda` (device 0) or `cuda:I`.
fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("{s:?} is not cpu, cuda or cuda:I")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn flat_flags_and_subcommands_do_not_mix() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("gantry-eval").chain(args.iter().copied()))
        };
        assert!(parse(&["--images", "x"]).unwrap().command.is_none());
        assert!(parse(&["subset", "--size", "5", "--out", "d"]).is_ok());
        assert!(parse(&["--images", "x", "subset", "--size", "5", "--out", "d"]).is_err());
        assert!(parse(&["subset", "--size", "5", "--out", "d", "--threads", "2"]).is_ok());
        assert!(
            parse(&["--labels", "l"]).is_err(),
            "--labels needs --images"
        );
        assert!(parse(&["--checkpoint", "c", "--labels", "l"]).is_err());
        let sample = |extra: &[&str]| {
            let mut a = vec!["sample", "--checkpoint", "c", "--out", "o"];
            a.extend_from_slice(extra);
            parse(&a)
        };
        assert!(sample(&[]).is_err(), "--per-class or --classes is required");
        assert!(sample(&["--per-class", "0"]).is_err());
        assert!(sample(&["--per-class", "2", "--classes", "1"]).is_err());
        let Some(Command::Sample(s)) = sample(&["--classes", "0,3,7", "--device", "cuda:1"])
            .unwrap()
            .command
        else {
            panic!("not a sample command");
        };
        assert_eq!(s.classes, Some(vec![0, 3, 7]));
        assert_eq!(s.device, Device::Cuda(1));
        assert!(sample(&["--per-class", "1", "--device", "gpu"]).is_err());
    }

    #[test]
    fn describe_keeps_one_error_on_one_line() {
        let e = anyhow::anyhow!("two files failed:\n  a.png: bad\n  b.png: worse")
            .context("loading PATH");
        assert_eq!(
            describe(&e),
            "loading PATH: two files failed: a.png: bad; b.png: worse"
        );
    }
}
