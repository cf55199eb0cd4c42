//! The configuration flags every Gantry binary shares (`worker`, `coordinator`).

use std::path::PathBuf;

use clap::Args;

use crate::{ConfigError, DeviceChoice, Overrides, Settings};

/// Flags that feed the configuration layers. Flatten into a binary's clap parser.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file (layered over the built-in defaults).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Training steps (train.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per worker per step (train.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed for weights, data order and latents (train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu or cuda (run.device).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceChoice>,
    /// Where the run writes its artifacts (run.dir).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Override any key: --set train.lr_g=1e-4 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The overrides these flags stand for, `--set` last.
    pub fn overrides(&self) -> Result<Overrides, ConfigError> {
        let mut o = Overrides::new();
        if let Some(v) = self.steps {
            o.set("train.steps", i64::try_from(v).unwrap_or(i64::MAX));
        }
        if let Some(v) = self.batch_size {
            o.set("train.batch_size", i64::try_from(v).unwrap_or(i64::MAX));
        }
        if let Some(v) = self.seed {
            // TOML integers are signed; keep the seed's bits.
            o.set("train.seed", v as i64);
        }
        if let Some(v) = self.device {
            o.set("run.device", v.as_str());
        }
        if let Some(v) = &self.run_dir {
            o.set("run.dir", v.display().to_string());
        }
        for arg in &self.set {
            o.push_assignment(arg)?;
        }
        Ok(o)
    }

    /// Loads the effective settings from the file, the process environment and these flags.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        crate::load(self.config.as_deref(), std::env::vars(), &self.overrides()?)
    }
}
