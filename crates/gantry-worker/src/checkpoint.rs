//! Crash-safe checkpoints and resuming from them.
//!
//! ```text
//! RUN_DIR/checkpoints/step-NNNNNNNN/
//!   <the family's tensor files>  GAN: generator, discriminator, generator_ema and
//!                                optimizer .safetensors; VAE: vae + optimizer;
//!                                autoregressive: pixelcnn + optimizer
//!                                (`gantry_models::task::checkpoint_files`)
//!   config.toml                  the effective settings
//!   state.json                   step, seed, data position, counters, fingerprint
//!   MANIFEST                     "<sha256>  <size>  <file>" per file above; written last
//! ```
//!
//! A checkpoint is written into `checkpoints/.tmp-step-NNNNNNNN-<pid>/`, every file fsynced,
//! `MANIFEST` written and fsynced last, the directory fsynced, renamed to its final name and
//! `checkpoints/` fsynced. A directory is *complete* when its MANIFEST exists and every file
//! it lists has the listed size and SHA-256; resume only ever accepts complete ones, so a
//! crash at any point leaves either the previous checkpoint or the new one.
//!
//! No RNG state is stored: data order, latents and WGAN-GP interpolates are pure functions of
//! (seed, sub-step) and nothing in a step draws from libtorch's generator, so (tensors, step)
//! determine the rest of the run exactly.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use gantry_config::{ConfigArgs, Settings};
use gantry_models::task::{TrainTask, checkpoint_files};
use serde::{Deserialize, Serialize};

use gantry_store::atomic::sync_dir;

pub use gantry_store::checkpoint::MANIFEST;
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";
/// Every file a complete checkpoint of `family` holds besides MANIFEST.
pub fn files(family: gantry_config::Family) -> Vec<&'static str> {
    let mut files = checkpoint_files(family).to_vec();
    files.extend([CONFIG_FILE, STATE_FILE]);
    files
}
/// 2: optimiser step counts by part name (`optimizer_steps`), for every model family.
pub const FORMAT: u32 = 2;

/// Settings keys whose change alters tensor shapes (or the optimiser state's layout): a
/// checkpoint cannot be loaded across them.
pub const SHAPE_KEYS: &[&str] = &[
    "model.family",
    "model.kind",
    "model.latent_dim",
    "model.batch_norm",
    "model.conditional",
    "data.image_size",
    "data.channels",
    "train.optimizer",
    "vae.kind",
    "vae.latent_dim",
    "vae.hidden",
    "autoregressive.channels",
    "autoregressive.residual_blocks",
    "autoregressive.output",
];

/// `state.json`: the scalar state next to the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// Steps completed.
    pub step: u64,
    pub seed: u64,
    /// The next data/latent/interpolation sub-stream index (`step × train.n_critic`).
    pub data_position: u64,
    /// Adam's `t` of each part's optimiser (lower than `step` after skipped updates), by
    /// part name (`generator`, `discriminator`; `vae`; `pixelcnn`).
    pub optimizer_steps: std::collections::BTreeMap<String, u64>,
    pub nonfinite_total: u64,
    pub nonfinite_consecutive: u64,
    /// [`Settings::fingerprint`] of the run that wrote it.
    pub fingerprint: String,
    /// Ranks of the group that wrote it. A group of another size may resume it when the
    /// global batch is the same ([`check_resumable`]).
    pub world_size: usize,
    /// Images per step over the whole group; absent in checkpoints written before it was
    /// recorded, where it is `train.batch_size × world_size` of the saved settings (or their
    /// `train.global_batch_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    /// RNG state the run still depends on: none (see the module docs); kept explicit so a
    /// future stateful RNG has an obvious home.
    pub rng_state: Option<String>,
    /// A conditional model's class names, label `i` being `classes[i]`; absent for an
    /// unconditional one (and in checkpoints written before conditioning existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

/// A complete checkpoint, found and verified.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub path: PathBuf,
    pub state: CheckpointState,
    /// The settings it was written with.
    pub settings: Settings,
    /// Newer checkpoints that were passed over, with the reason (already warned about).
    pub skipped: Vec<(PathBuf, String)>,
}

impl CheckpointDir {
    pub fn step(&self) -> u64 {
        self.state.step
    }
}

/// Bytes of the files directly inside a checkpoint directory (0 where unreadable).
pub fn size_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Writes the checkpoint of `step` into `checkpoints/` (see the module docs), then keeps only
/// the newest `keep` complete ones. Returns the final directory.
pub fn write(
    checkpoints: &Path,
    task: &dyn TrainTask,
    settings: &Settings,
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    fs::create_dir_all(checkpoints)
        .with_context(|| format!("creating {}", checkpoints.display()))?;
    let name = gantry_store::run_dir::checkpoint_name(state.step);
    let tmp = checkpoints.join(format!(".tmp-{name}-{}", std::process::id()));
    let target = checkpoints.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        task.save(&tmp).context("writing tensors")?;
        fs::write(tmp.join(CONFIG_FILE), settings.to_toml()?)?;
        fs::write(
            tmp.join(STATE_FILE),
            serde_json::to_string_pretty(state)? + "\n",
        )?;
        let mut manifest = String::new();
        for file in files(settings.model.family) {
            let path = tmp.join(file);
            File::open(&path)?
                .sync_all()
                .with_context(|| format!("fsync {}", path.display()))?;
            manifest.push_str(&gantry_store::checkpoint::manifest_line(&tmp, file)?);
        }
        let mut f = File::create(tmp.join(MANIFEST))?;
        f.write_all(manifest.as_bytes())?;
        f.sync_all()?;
        sync_dir(&tmp)?;
        if target.exists() {
            // Same step written again (e.g. a rerun): the old copy goes only once the new one
            // is complete on disk.
            fs::remove_dir_all(&target)
                .with_context(|| format!("replacing {}", target.display()))?;
        }
        fs::rename(&tmp, &target)?;
        sync_dir(checkpoints)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", target.display())));
    }
    prune(checkpoints, keep, state.step)?;
    Ok(target)
}

/// Checks that `dir` is complete; the error says which file is wrong and how.
pub fn verify(dir: &Path) -> std::result::Result<(), String> {
    let manifest_path = dir.join(MANIFEST);
    let listed = gantry_store::checkpoint::verify_manifest(dir).map_err(|e| e.to_string())?;
    // The listed config.toml has been verified: it names the family, and so the files.
    let config = dir.join(CONFIG_FILE);
    let family = fs::read_to_string(&config)
        .ok()
        .and_then(|text| toml::from_str::<Settings>(&text).ok())
        .map(|s| s.model.family)
        .ok_or_else(|| format!("{}: unreadable (checkpoint incomplete)", config.display()))?;
    if let Some(missing) = files(family)
        .iter()
        .find(|f| !listed.iter().any(|l| l == *f))
    {
        return Err(format!(
            "{}: does not list {missing}",
            manifest_path.display()
        ));
    }
    Ok(())
}

/// Reads a directory that [`verify`] accepted.
fn open(dir: &Path, skipped: Vec<(PathBuf, String)>) -> Result<CheckpointDir> {
    let state_path = dir.join(STATE_FILE);
    let state: CheckpointState = serde_json::from_slice(&fs::read(&state_path)?)
        .with_context(|| format!("parsing {}", state_path.display()))?;
    if state.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this worker reads {FORMAT})",
            state_path.display(),
            state.format
        );
    }
    let config_path = dir.join(CONFIG_FILE);
    let settings: Settings = toml::from_str(&fs::read_to_string(&config_path)?)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    Ok(CheckpointDir {
        path: dir.to_path_buf(),
        state,
        settings,
        skipped,
    })
}

/// `step-NNNNNNNN` directories under `checkpoints/`, newest first.
fn candidates(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("listing {}", checkpoints.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
            && entry.file_type()?.is_dir()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(found)
}

/// Finds the checkpoint to resume from. `path` is a checkpoint directory (it must be
/// complete), a run directory or its `checkpoints/` directory (the newest complete checkpoint
/// wins; incomplete or corrupt newer ones are skipped with a warning naming the file and the
/// reason). `Ok(None)`: no complete checkpoint there.
pub fn resume_from(path: &Path) -> Result<Option<CheckpointDir>> {
    let is_checkpoint = path.join(MANIFEST).exists()
        || path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("step-"));
    if is_checkpoint {
        verify(path)
            .map_err(|why| anyhow::anyhow!("cannot resume from {}: {why}", path.display()))?;
        return open(path, Vec::new()).map(Some);
    }
    let checkpoints = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let mut skipped = Vec::new();
    for (_, dir) in candidates(&checkpoints)? {
        match verify(&dir) {
            Ok(()) => return open(&dir, skipped).map(Some),
            Err(why) => {
                tracing::warn!("warning: skipping checkpoint {}: {why}", dir.display());
                skipped.push((dir, why));
            }
        }
    }
    Ok(None)
}

/// Keeps the newest `keep` checkpoints up to step `current` that have a MANIFEST; removes
/// every other `step-*` directory and every leftover `.tmp-*` directory. Checkpoints after
/// `current` belong to a timeline a resume abandoned (its metrics rows are dropped too);
/// left in place they would outrank, and so prune, the new run's checkpoints.
pub fn prune(checkpoints: &Path, keep: usize, current: u64) -> Result<()> {
    let mut kept = 0;
    for (step, dir) in candidates(checkpoints)? {
        if step > current {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("removing abandoned checkpoint {}", dir.display()))?;
            continue;
        }
        if kept < keep && dir.join(MANIFEST).exists() {
            kept += 1;
            continue;
        }
        if kept >= keep || !dir.join(MANIFEST).exists() {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
        }
    }
    for entry in fs::read_dir(checkpoints)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Compares a checkpoint's settings with the current ones. Changes to [`SHAPE_KEYS`] are
/// refused naming the key; other changes come back as warnings, one per key, except those
/// under `run`, `cluster`, `metrics` and `logging`, which only say where and how a run is
/// run and observed.
pub fn check_compatible(saved: &Settings, current: &Settings) -> Result<Vec<String>> {
    compare(saved, current, &[])
}

/// The keys that set the global batch: when it is unchanged, how it is spelt (a per-rank
/// `train.batch_size` or a fixed `train.global_batch_size`) changes nothing.
const GLOBAL_BATCH_KEYS: &[&str] = &["train.batch_size", "train.global_batch_size"];

/// [`check_compatible`] for a group of `world` ranks resuming `checkpoint`, which may have
/// been written by a group of another size (an elastic job that shrank or grew back). The
/// global batch must be the same (it fixes the data order and what each gradient averages
/// over); a different one is refused naming `train.global_batch_size`. With the same global
/// batch, changes of `train.batch_size` / `train.global_batch_size` are not warned about.
pub fn check_resumable(
    checkpoint: &CheckpointDir,
    current: &Settings,
    world: usize,
) -> Result<Vec<String>> {
    let saved = saved_global_batch(checkpoint);
    let now = crate::batch::global_batch_size(&current.train, world);
    if saved != now {
        let how = |train: &gantry_config::Train, world: usize| match train.global_batch_size {
            0 => format!("train.batch_size {} × {world} rank(s)", train.batch_size),
            _ => "train.global_batch_size".to_owned(),
        };
        bail!(
            "cannot resume {}: its global batch was {saved} images ({}), this run's is {now} \
             ({}); the data order and the averaged gradient depend on it, so set \
             train.global_batch_size = {saved} to continue the same run, or start a new run",
            checkpoint.path.display(),
            how(&checkpoint.settings.train, checkpoint.state.world_size),
            how(&current.train, world)
        );
    }
    compare(&checkpoint.settings, current, GLOBAL_BATCH_KEYS)
}

/// The global batch `checkpoint` was trained with: recorded in `state.json`, or (older
/// checkpoints) resolved from its settings and world size.
pub fn saved_global_batch(checkpoint: &CheckpointDir) -> usize {
    checkpoint.state.global_batch_size.unwrap_or_else(|| {
        crate::batch::global_batch_size(&checkpoint.settings.train, checkpoint.state.world_size)
    })
}

/// [`check_compatible`], not warning about the keys in `quiet`.
fn compare(saved: &Settings, current: &Settings, quiet: &[&str]) -> Result<Vec<String>> {
    let (old, new) = (leaves(saved)?, leaves(current)?);
    let mut warnings = Vec::new();
    for (key, value) in &new {
        let before = old.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        if before == Some(value) || quiet.contains(&key.as_str()) {
            continue;
        }
        let before = before.map_or_else(|| "(absent)".to_owned(), ToString::to_string);
        if SHAPE_KEYS.contains(&key.as_str()) {
            bail!(
                "cannot resume: `{key}` changed from {before} to {value}, which changes the networks' \
                 tensor shapes; use the checkpoint's value or start a new run"
            );
        }
        if !["run.", "cluster.", "metrics.", "logging."]
            .iter()
            .any(|p| key.starts_with(p))
        {
            warnings.push(format!(
                "`{key}` changed from {before} to {value} since the checkpoint"
            ));
        }
    }
    Ok(warnings)
}

fn leaves(settings: &Settings) -> Result<Vec<(String, serde_json::Value)>> {
    fn walk(prefix: &str, value: serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push((prefix.to_owned(), other)),
        }
    }
    let mut out = Vec::new();
    walk("", serde_json::to_value(settings)?, &mut out);
    Ok(out)
}

/// The `--resume PATH` and `--overwrite` flags, for any binary that runs a
/// [`crate::train::Trainer`].
#[derive(Debug, Clone, Default, Args)]
pub struct ResumeArgs {
    /// Continue from a checkpoint: a checkpoint directory, or a run directory (its newest
    /// complete checkpoint). Without --config, the checkpoint's config.toml is the base layer.
    #[arg(long, value_name = "PATH")]
    pub resume: Option<PathBuf>,
    /// Start afresh even where the run directory holds an earlier run, replacing its metrics
    /// and checkpoints (without it, such a directory is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

impl ResumeArgs {
    /// The checkpoint to resume from (`None` without `--resume`); an error when `--resume`
    /// names no complete checkpoint.
    pub fn checkpoint(&self) -> Result<Option<CheckpointDir>> {
        let Some(path) = &self.resume else {
            return Ok(None);
        };
        match resume_from(path)? {
            Some(checkpoint) => Ok(Some(checkpoint)),
            None => bail!("--resume {}: no complete checkpoint found", path.display()),
        }
    }

    /// Refuses a fresh run (no `--resume`) into a run directory that holds an earlier run,
    /// unless `--overwrite` was given.
    pub fn ensure_fresh(&self, run_dir: &Path) -> Result<()> {
        if self.resume.is_none() && !self.overwrite {
            gantry_store::run_dir::ensure_fresh(run_dir)?;
        }
        Ok(())
    }

    /// Settings for a resumed run: the usual layers, with the checkpoint's `config.toml` in
    /// place of `--config` when that flag is absent.
    pub fn settings(config: &ConfigArgs, checkpoint: Option<&CheckpointDir>) -> Result<Settings> {
        match checkpoint {
            Some(c) if config.config.is_none() => Ok(gantry_config::load(
                Some(&c.path.join(CONFIG_FILE)),
                std::env::vars(),
                &config.overrides()?,
            )?),
            _ => Ok(config.load()?),
        }
    }
}
