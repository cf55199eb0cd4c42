//! Files every Gantry process shares.
//!
//! - [`atomic`]: crash-safe writes. A reader sees the old file or the whole new one, never a
//!   torn one, and the rename survives a power cut. The worker's run files and checkpoints,
//!   the coordinator's `summary.json`, the evaluator's classifier cache and the data
//!   downloader all write through it.
//! - [`checkpoint`]: a checkpoint directory's MANIFEST (SHA-256 and size of every file),
//!   verified before any checkpoint is read, by the worker and by `gantry-eval`.
//! - [`host`]: the memory the host has available (`/proc/meminfo`), for checks of sizes
//!   before anything big is allocated or started.
//! - [`run_dir`]: what a run directory already holds, so that a new run never silently
//!   replaces an old one and a resume without a checkpoint is refused up front.
//!
//! A leaf crate: it depends on no other Gantry crate; the binaries and every library that
//! writes files depend on it.

pub mod atomic;
pub mod checkpoint;
pub mod host;
pub mod run_dir;

use std::path::{Path, PathBuf};

/// Errors of the file layer: always the path and the operating system's reason.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that must not be trusted: torn, truncated, or not what its MANIFEST says.
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A fresh run was asked for in a directory that holds one.
    #[error(
        "the run directory {} already holds a run ({previous}): continue it with --resume {}, \
         replace it with --overwrite, or choose another --run-dir",
        dir.display(),
        dir.display()
    )]
    RunExists {
        dir: PathBuf,
        previous: run_dir::PreviousRun,
    },
    /// A resume was asked for where there is nothing to resume from.
    #[error(
        "--resume {}: no checkpoint in {} to continue from (start a new run without --resume)",
        dir.display(),
        dir.join("checkpoints").display()
    )]
    NoCheckpoint { dir: PathBuf },
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
