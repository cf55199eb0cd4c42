//! Writes a conditional checkpoint's samples to disk by class, as a data set that Gantry (and
//! other tools) read back: a PNG tree (`OUT/<class name>/NNNNNN.png`, `data.dataset =
//! "folder:OUT"`) or an IDX pair (`OUT/images-idx3-ubyte.gz`, `OUT/labels-idx1-ubyte.gz`).
//!
//! [`open_checkpoint`] reads only what the training run sealed: the MANIFEST must vouch for
//! every file it reads (`config.toml`, `state.json`, the family's tensor files), and every file
//! it lists must match it. [`export`] then asks the model for `labels[i]`-class images.
//!
//! The hidden contracts:
//! - image `i` is a pure function of `(checkpoint, seed, i, labels[i])`: it comes from row `i`
//!   of the seed's fixed latents ([`gantry_models::latent::fixed`]), whatever the other labels
//!   are, so `--per-class 3` and `--per-class 5` agree on the first three images of class 0
//!   only (class 1 starts at row 3 and row 5 respectively);
//! - nothing is overwritten: an output path that exists fails before any work, and the
//!   output appears complete under its final name or not at all (it is built in a
//!   `<name>.partial-<pid>-…` sibling and renamed at the end).

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry_config::{DeviceChoice, Overrides, Settings};
use gantry_data::DataError;
use gantry_models::ModelError;
use gantry_models::task::{self, ModelShape, TrainTask};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::EvalError;

/// The effective settings of the run that wrote a checkpoint.
pub const CONFIG_FILE: &str = "config.toml";
/// A checkpoint's scalar state: its step and, for a conditional model, the class names.
pub const STATE_FILE: &str = "state.json";
/// The images file of an IDX export, inside the output directory.
pub const IDX_IMAGES_FILE: &str = "images-idx3-ubyte.gz";
/// The labels file of an IDX export, inside the output directory.
pub const IDX_LABELS_FILE: &str = "labels-idx1-ubyte.gz";
/// The most pixel bytes one export generates. Everything is held in memory until written
/// (the writers take whole sets), so a mistyped count fails here instead of exhausting it;
/// 2 GiB is 2.7 million 28×28 digits.
pub const MAX_PIXEL_BYTES: usize = 2 << 30;

/// A checkpoint opened for sampling, its model loaded on the requested device.
#[derive(Debug)]
pub struct Checkpoint {
    /// `config.toml`: what the model was built from.
    pub settings: Settings,
    /// The model, with the checkpoint's weights (the GAN's EMA generator where it has one).
    pub task: Box<dyn TrainTask>,
    /// A conditional model's class names from `state.json`, label `i` being `class_names[i]`;
    /// `None` for an unconditional model.
    pub class_names: Option<Vec<String>>,
    /// Training steps completed when it was written.
    pub step: u64,
    pub dir: PathBuf,
}

impl Checkpoint {
    /// The number of classes of a conditional model; `None` for an unconditional one.
    pub fn classes(&self) -> Option<usize> {
        self.class_names.as_ref().map(Vec::len)
    }
}

/// Which classes to generate, and how many of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classes {
    /// This many images of every class, class 0's first: labels `0 × n, 1 × n, …`.
    PerClass(usize),
    /// One image of each listed class, in this order (repeats allowed).
    List(Vec<u8>),
}

/// How the images are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `OUT/` holding [`IDX_IMAGES_FILE`] and [`IDX_LABELS_FILE`] (gzip); grey images only.
    Idx,
    /// `OUT/<class name>/NNNNNN.png`, each class numbered from 0 in generation order.
    Png,
}

/// What [`export`] generates and where it writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub classes: Classes,
    /// Seeds the latents (the same seed gives the same images).
    pub seed: u64,
    pub format: Format,
    /// The output directory; it must not exist.
    pub out: PathBuf,
    /// Show a progress bar on stderr (only where stderr is a terminal).
    pub progress: bool,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exported {
    pub images: usize,
    /// Images per class, indexed by label (every class of the model, 0 where none).
    pub per_class: Vec<usize>,
    /// The IDX pair's two files; the PNG tree's root directory.
    pub paths: Vec<PathBuf>,
}

/// The part of `state.json` sampling needs (the worker writes more; the rest is ignored).
#[derive(Debug, Deserialize)]
struct State {
    step: u64,
    #[serde(default)]
    classes: Option<Vec<String>>,
}

/// Opens the checkpoint directory `dir` and loads its model on `device` (the CPU or a CUDA
/// device; an error when that device is not there).
///
/// Verifies the MANIFEST first: every file it lists must match it, and it must list every file
/// read here. A conditional model (`model.conditional = true`) needs its class names in
/// `state.json`.
pub fn open_checkpoint(dir: &Path, device: Device) -> Result<Checkpoint, EvalError> {
    let config = dir.join(CONFIG_FILE);
    if !config.is_file() {
        return Err(EvalError::Input(format!(
            "{}: no such file (is {} a checkpoint directory?)",
            config.display(),
            dir.display()
        )));
    }
    // Sample only what the training run wrote: a torn or damaged checkpoint fails here.
    let listed = gantry_store::checkpoint::verify_manifest(dir).map_err(|e| {
        EvalError::Input(format!(
            "{} is not a complete, intact checkpoint: {e}",
            dir.display()
        ))
    })?;
    let vouch = |name: &str| -> Result<(), EvalError> {
        if listed.iter().any(|l| l == name) {
            Ok(())
        } else {
            Err(EvalError::Input(format!(
                "{}: the MANIFEST does not list {name}",
                dir.display()
            )))
        }
    };
    vouch(CONFIG_FILE)?;
    vouch(STATE_FILE)?;
    // No environment layer: the checkpoint's settings are what its tensors were built from.
    let settings = gantry_config::load(Some(&config), std::iter::empty(), &Overrides::new())
        .map_err(|e| {
            EvalError::Input(format!("{}: invalid configuration: {e}", config.display()))
        })?;

    let state_path = dir.join(STATE_FILE);
    let text = fs::read(&state_path).map_err(|e| io_error(&state_path, e))?;
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| EvalError::Input(format!("{}: {e}", state_path.display())))?;
    let class_names = match (settings.model.conditional, state.classes) {
        (true, None) => {
            return Err(EvalError::Input(format!(
                "{}: no `classes`, but {CONFIG_FILE} says model.conditional = true: without \
                 them no label can be named (written before conditioning existed?)",
                state_path.display()
            )));
        }
        (false, Some(_)) => {
            return Err(EvalError::Input(format!(
                "{}: lists `classes`, but {CONFIG_FILE} says model.conditional = false",
                state_path.display()
            )));
        }
        (_, classes) => classes,
    };

    let family = settings.model.family;
    for file in task::checkpoint_files(family) {
        vouch(file)?;
    }
    let device = resolve_device(device)?;
    let image = settings.data.image_shape().map(|d| d as i64);
    let shape = ModelShape {
        image,
        classes: class_names.as_ref().map(Vec::len),
    };
    let mut task = task::build(&settings, shape, device)
        .map_err(|e| model_error(&config, "building the model", e))?;
    task.load(dir)
        .map_err(|e| model_error(dir, "loading the model", e))?;
    tracing::info!(
        checkpoint = %dir.display(),
        model = %task.describe(),
        step = state.step,
        device = ?device,
        "opened the checkpoint"
    );
    Ok(Checkpoint {
        settings,
        task,
        class_names,
        step: state.step,
        dir: dir.to_owned(),
    })
}

/// Generates the images `request` asks for and writes them; see the module docs.
///
/// Fails before generating anything when the checkpoint is unconditional, a class is out of
/// range, nothing is asked for, the output path exists or its parent does not, or the format
/// cannot hold the model's images (IDX: grey only).
pub fn export(checkpoint: &Checkpoint, request: &ExportRequest) -> Result<Exported, EvalError> {
    let Some(names) = checkpoint.class_names.as_deref() else {
        return Err(EvalError::Input(format!(
            "{} is an unconditional model: it cannot generate by class (its {CONFIG_FILE} has \
             model.conditional = false)",
            checkpoint.dir.display()
        )));
    };
    let [channels, height, width] = checkpoint.settings.data.image_shape();
    let labels = labels_for(
        checkpoint,
        names.len(),
        &request.classes,
        channels * height * width,
    )?;
    if request.format == Format::Idx && channels != 1 {
        return Err(EvalError::Input(format!(
            "{} makes {channels}-channel images, and IDX files hold grey (1-channel) images \
             only: write a PNG tree instead (format png)",
            checkpoint.dir.display()
        )));
    }
    check_out(&request.out)?;

    let n = labels.len();
    let mut per_class = vec![0usize; names.len()];
    for &l in &labels {
        per_class[usize::from(l)] += 1;
    }
    let bar = Bar::new(request.progress, n as u64);
    tracing::info!(
        checkpoint = %checkpoint.dir.display(),
        images = n,
        seed = request.seed,
        "generating"
    );
    bar.0.set_message("generating");
    let images = generate(checkpoint, &labels, request.seed)?;
    bar.0.set_position(n as u64);

    bar.0.set_message("writing");
    let out = &request.out;
    let paths = match request.format {
        Format::Png => {
            gantry_data::export::write_png_tree(
                out,
                &images,
                &labels,
                (channels, height, width),
                names,
            )?;
            vec![out.clone()]
        }
        Format::Idx => write_idx_dir(out, &images, &labels, height, width)?,
    };
    tracing::info!(out = %out.display(), images = n, "wrote the samples");
    Ok(Exported {
        images: n,
        per_class,
        paths,
    })
}

/// The labels `classes` asks for of a model of `k` classes, checked against them and against
/// [`MAX_PIXEL_BYTES`] (images of `per_image` bytes) before anything is allocated.
fn labels_for(
    checkpoint: &Checkpoint,
    k: usize,
    classes: &Classes,
    per_image: usize,
) -> Result<Vec<u8>, EvalError> {
    let n = match classes {
        Classes::PerClass(0) => {
            return Err(EvalError::Input(
                "0 images per class asked for: ask for at least 1".into(),
            ));
        }
        Classes::List(list) if list.is_empty() => {
            return Err(EvalError::Input(
                "an empty class list: name at least one class".into(),
            ));
        }
        Classes::PerClass(n) => n.checked_mul(k),
        Classes::List(list) => Some(list.len()),
    };
    match n.and_then(|n| n.checked_mul(per_image)) {
        Some(bytes) if bytes <= MAX_PIXEL_BYTES => {}
        _ => {
            let [c, h, w] = checkpoint.settings.data.image_shape();
            let n = n.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string());
            return Err(EvalError::Input(format!(
                "{n} images of {c}×{h}×{w} pixels are more than the {} GiB one export holds \
                 in memory: ask for fewer (exports with different seeds give independent images)",
                MAX_PIXEL_BYTES >> 30
            )));
        }
    }
    let labels: Vec<u8> = match classes {
        // k <= 256 (ModelShape::check), so every class is a u8.
        Classes::PerClass(n) => (0..k)
            .flat_map(|c| std::iter::repeat_n(c as u8, *n))
            .collect(),
        Classes::List(list) => list.clone(),
    };
    if let Some((i, &bad)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= k)
    {
        return Err(EvalError::Input(format!(
            "class {bad} (entry {i} of the list) is out of range: {} has {k} classes, 0 to {}",
            checkpoint.dir.display(),
            k - 1
        )));
    }
    Ok(labels)
}

/// The images of `labels`, image `i` from latent row `i` of `seed`.
///
/// One call for all of them: `sample_labelled_u8` gives image `i` from row `i` of the seed's
/// latents, so a call for a slice of the labels would restart at row 0 and change the images
/// (the trait has no offset). The models bound device memory themselves (the GAN generates
/// 500 rows at a time); host memory is bounded by [`MAX_PIXEL_BYTES`].
fn generate(checkpoint: &Checkpoint, labels: &[u8], seed: u64) -> Result<Vec<u8>, EvalError> {
    let images = checkpoint
        .task
        .sample_labelled_u8(labels, seed)
        .map_err(|e| model_error(&checkpoint.dir, "sampling the model", e))?;
    let [c, h, w] = checkpoint.settings.data.image_shape();
    let expected = labels.len() * c * h * w;
    if images.len() != expected {
        return Err(EvalError::Input(format!(
            "{}: the model produced {} bytes for {} images of {c}×{h}×{w} pixels ({expected})",
            checkpoint.dir.display(),
            images.len(),
            labels.len()
        )));
    }
    Ok(images)
}

/// Refuses an output path that exists (a dangling symlink included) or whose parent is not a
/// directory, before any work.
fn check_out(out: &Path) -> Result<(), EvalError> {
    match fs::symlink_metadata(out) {
        Ok(_) => {
            return Err(EvalError::Data(DataError::AlreadyExists {
                path: out.display().to_string(),
            }));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(out, e)),
    }
    if out.file_name().is_none() {
        return Err(EvalError::Input(format!(
            "{}: not a path to a new directory",
            out.display()
        )));
    }
    let parent = parent_of(out);
    if !parent.is_dir() {
        return Err(EvalError::Input(format!(
            "{}: the directory to write {} into does not exist",
            parent.display(),
            out.display()
        )));
    }
    Ok(())
}

/// Writes the IDX pair into a staging sibling of `out` and renames it to `out`.
fn write_idx_dir(
    out: &Path,
    images: &[u8],
    labels: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<PathBuf>, EvalError> {
    let staging = Staging::create(out)?;
    // write_idx_pair fsyncs both files and the staging directory.
    gantry_data::export::write_idx_pair(
        &staging.path.join(IDX_IMAGES_FILE),
        &staging.path.join(IDX_LABELS_FILE),
        images,
        labels,
        rows,
        cols,
        true,
    )?;
    staging.persist(out)?;
    Ok(vec![out.join(IDX_IMAGES_FILE), out.join(IDX_LABELS_FILE)])
}

/// A directory next to the final output, removed on drop unless [`Staging::persist`] moved it
/// into place; only a killed process leaves one behind, never anything under the final name.
struct Staging {
    path: PathBuf,
    moved: bool,
}

impl Staging {
    fn create(out: &Path) -> Result<Self, EvalError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        let parent = parent_of(out);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!("{name}.partial-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, moved: false }),
                // Left by an earlier process of the same id: take the next number.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error(&path, e)),
            }
        }
    }

    fn persist(mut self, out: &Path) -> Result<(), EvalError> {
        let taken = || {
            EvalError::Data(DataError::AlreadyExists {
                path: out.display().to_string(),
            })
        };
        // Checked again at the last moment: `rename` would replace an empty directory.
        if fs::symlink_metadata(out).is_ok() {
            return Err(taken());
        }
        fs::rename(&self.path, out).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => taken(),
            _ => io_error(out, e),
        })?;
        self.moved = true;
        let parent = parent_of(out);
        gantry_store::atomic::sync_dir(parent).map_err(|e| io_error(parent, e))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.moved
            && let Err(e) = fs::remove_dir_all(&self.path)
        {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove a partial export");
        }
    }
}

/// The progress bar, cleared however the export ends; hidden unless asked for and stderr is
/// a terminal (a log or a pipe gets the `tracing` lines only).
struct Bar(ProgressBar);

impl Bar {
    fn new(show: bool, images: u64) -> Self {
        if !show || !std::io::stderr().is_terminal() {
            return Self(ProgressBar::hidden());
        }
        // ProgressBar::new draws on stderr.
        let bar = ProgressBar::new(images);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} images {spinner} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        // The images come from one call (see `generate`): the tick shows it is alive.
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(bar)
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Checks that `device` is there (CUDA support loaded, the ordinal in range).
fn resolve_device(device: Device) -> Result<Device, EvalError> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda(i) => {
            gantry_models::runtime::resolve_device(DeviceChoice::Cuda, i)
                .map_err(|e| EvalError::Input(format!("cuda:{i}: {e}")))?;
            let count = tch::Cuda::device_count();
            if i64::try_from(i).unwrap_or(i64::MAX) >= count {
                return Err(EvalError::Input(format!(
                    "device cuda:{i} requested, but libtorch sees {count} CUDA device(s)"
                )));
            }
            Ok(device)
        }
        other => Err(EvalError::Input(format!(
            "device {other:?}: checkpoints are sampled on the CPU or a CUDA device"
        ))),
    }
}

/// A model's error, with the file and what was being done. (`EvalError` has no variant for
/// model errors; their messages say what is wrong.)
fn model_error(path: &Path, doing: &str, e: ModelError) -> EvalError {
    EvalError::Input(format!("{}: {doing}: {e}", path.display()))
}

fn io_error(path: &Path, source: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
