//! The files a run leaves behind in its run directory.
//!
//! ```text
//! config.toml        the effective configuration
//! metrics.jsonl      one JSON object per logged step
//! samples/step-NNNNNNNN.png
//! summary.json       the outcome, written when the run ends
//! quality.jsonl      one JSON object per evaluation
//! checkpoints/       see [`crate::checkpoint`]
//! tensorboard/       the same figures and grids as TensorBoard events (`logging.tensorboard`),
//!                    see [`crate::tensorboard`]
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gantry_config::Settings;
use serde::{Deserialize, Serialize};

use crate::tensorboard::{self, StepDetail, TensorBoard};

/// One line of `metrics.jsonl`: the step, the family's named statistics (e.g. `d_loss`,
/// `g_loss`, `d_real`, `d_fake` for the GAN; `neg_elbo`, `reconstruction`, `kl` for the VAE;
/// `nll`, `bits_per_dim` for the autoregressive model) and the throughput.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    #[serde(flatten)]
    pub statistics: BTreeMap<String, f64>,
    /// Images per second (all ranks) since the previous row.
    pub images_per_second: f64,
    /// Seconds since training started.
    pub wall_seconds: f64,
}

/// `summary.json`: what a run achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub world_size: usize,
    /// Images per rank per step: the largest rank's slice of the global batch (slices
    /// differ by at most one image when the world size does not divide it).
    pub batch_size: usize,
    /// Images per step over the whole group (`batch_size × world_size` with even slices).
    /// 0 in summaries written before it was recorded.
    #[serde(default)]
    pub global_batch_size: usize,
    /// Training images per second over the whole run, all ranks together.
    pub images_per_second: f64,
    /// Wall time from start-up to the end, set-up included.
    pub wall_seconds: f64,
    /// Wall time of the training loop alone.
    pub train_seconds: f64,
    pub device: String,
    pub threads: usize,
    /// `model.family`.
    pub family: String,
    /// The named statistics of the last logged step.
    #[serde(rename = "final")]
    pub final_statistics: BTreeMap<String, f64>,
    /// The last sample grid, relative to the run directory.
    pub last_sample: Option<String>,
    /// Sample quality of the final (EMA) generator, when evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualityReport>,
    /// Mean seconds per step in each phase on this rank (rank 0), over the timed steps.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub step_phases: std::collections::BTreeMap<String, f64>,
}

/// `summary.json`'s `quality`: the final generator scored by `gantry-eval`'s classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// Fréchet distance to held-out real digits in the classifier's feature space.
    pub fid: f64,
    /// The same for the untrained generator (same seed), the baseline.
    pub fid_initial: f64,
    pub inception_score: f64,
    pub classes_covered: u32,
    pub class_histogram: [u32; 10],
    pub samples: usize,
    pub classifier_accuracy: f64,
    /// Families with a likelihood: negative ELBO per held-out image, in nats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_neg_elbo_nats: Option<f64>,
    /// Negative log-likelihood per held-out image, in nats (exact, or an importance-weighted
    /// bound with `eval.importance_samples` for the VAE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_nll_nats: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_dim: Option<f64>,
    /// A conditional model of the ten digits: the fraction of its samples the classifier
    /// assigns to the class they were generated for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_accuracy: Option<f64>,
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
    metrics: BufWriter<File>,
    /// Rank 0's TensorBoard events, with `logging.tensorboard`.
    tensorboard: Option<TensorBoard>,
}

/// Creates the run directory's folders and writes the effective `config.toml`.
fn prepare(root: &Path, settings: &Settings) -> Result<()> {
    for dir in [
        root.to_path_buf(),
        root.join("samples"),
        root.join("checkpoints"),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let config = settings.to_toml()?;
    let path = root.join("config.toml");
    gantry_store::atomic::write(&path, config.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

impl RunDir {
    /// Creates (or reuses) `root`, writes `config.toml` and starts a fresh `metrics.jsonl`
    /// (and TensorBoard event stream).
    pub fn create(root: &Path, settings: &Settings) -> Result<Self> {
        prepare(root, settings)?;
        let metrics_path = root.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        let tensorboard = if settings.logging.tensorboard {
            Some(TensorBoard::create(&root.join(tensorboard::DIR))?)
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            metrics: BufWriter::new(metrics),
            tensorboard,
        })
    }

    /// Reopens `root` for a run resumed at `step`: writes `config.toml`, keeps the
    /// `metrics.jsonl` and `quality.jsonl` rows with `step ≤ step` (rewritten atomically) and
    /// appends after them; TensorBoard gets a new events file that supersedes the earlier
    /// files' events after `step`.
    pub fn resume(root: &Path, settings: &Settings, step: u64) -> Result<Self> {
        prepare(root, settings)?;
        let metrics_path = root.join("metrics.jsonl");
        keep_rows_up_to(&metrics_path, step)?;
        keep_rows_up_to(&root.join("quality.jsonl"), step)?;
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        let tensorboard = if settings.logging.tensorboard {
            Some(TensorBoard::resume(&root.join(tensorboard::DIR), step)?)
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            metrics: BufWriter::new(metrics),
            tensorboard,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn samples_dir(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// Appends one row and flushes it, so a crash loses at most the row being written; the
    /// row's figures and `detail` also go to TensorBoard.
    pub fn append_metrics(&mut self, row: &MetricsRow, detail: &StepDetail) -> Result<()> {
        serde_json::to_writer(&mut self.metrics, row)?;
        self.metrics.write_all(b"\n")?;
        self.metrics.flush().context("writing metrics.jsonl")?;
        if let Some(tensorboard) = &mut self.tensorboard {
            tensorboard.metrics(row, detail)?;
        }
        Ok(())
    }

    /// The TensorBoard event stream, with `logging.tensorboard`.
    pub fn tensorboard(&mut self) -> Option<&mut TensorBoard> {
        self.tensorboard.as_mut()
    }

    /// Appends one evaluation to `quality.jsonl` (quality over time), and to TensorBoard.
    pub fn append_quality(&mut self, step: u64, report: &QualityReport) -> Result<()> {
        let path = self.root.join("quality.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut row = serde_json::to_value(report)?;
        if let Some(object) = row.as_object_mut() {
            object.insert("step".into(), step.into());
        }
        writeln!(file, "{row}").with_context(|| format!("writing {}", path.display()))?;
        if let Some(tensorboard) = &mut self.tensorboard {
            tensorboard.quality(step, report)?;
        }
        Ok(())
    }

    pub fn write_summary(&self, summary: &Summary) -> Result<()> {
        let path = self.root.join("summary.json");
        let mut text = serde_json::to_string_pretty(summary)?;
        text.push('\n');
        gantry_store::atomic::write(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Rewrites the JSON-lines file at `path` (atomically) keeping the rows with `step ≤ step`: the
/// steps after a checkpoint are trained again. A torn last line (crash mid-write) has no
/// readable step and goes too. A missing file stays missing.
fn keep_rows_up_to(path: &Path, step: u64) -> Result<()> {
    let old = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::new();
    for line in old.lines() {
        let row_step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
        if row_step.is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    gantry_store::atomic::write(path, kept.as_bytes())
        .with_context(|| format!("rewriting {}", path.display()))
}
