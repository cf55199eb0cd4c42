//! What a run directory already holds.
//!
//! A run directory (`run.dir`) collects one run's `config.toml`, `metrics.jsonl`,
//! `summary.json`, `samples/` and `checkpoints/step-NNNNNNNN/`. Starting a fresh run there
//! would truncate the metrics and sweep the checkpoints away as abandoned, so the binaries ask
//! [`previous_run`] first and refuse unless the user said `--resume` or `--overwrite`; and
//! `--resume` asks [`checkpoint_steps`], so a resume with nothing to resume from is refused
//! instead of quietly starting at step 0.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use crate::StoreError;

/// A checkpoint directory's name: `step-` and the step, zero-padded to eight digits.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The evidence that `dir` holds a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousRun {
    /// Lines of `metrics.jsonl`.
    pub metrics_rows: usize,
    /// Steps of the checkpoint directories that have a MANIFEST (complete or not), ascending.
    pub checkpoints: Vec<u64>,
    pub summary: bool,
}

impl fmt::Display for PreviousRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.metrics_rows > 0 {
            parts.push(format!("metrics.jsonl with {} rows", self.metrics_rows));
        }
        match self.checkpoints.as_slice() {
            [] => {}
            [only] => parts.push(format!("a checkpoint of step {only}")),
            [.., newest] => parts.push(format!(
                "{} checkpoints up to step {newest}",
                self.checkpoints.len()
            )),
        }
        if self.summary {
            parts.push("summary.json".to_owned());
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// What `dir` holds of an earlier run: `None` when it does not exist or holds nothing a new
/// run would destroy (an empty `metrics.jsonl`, a bare `config.toml` of a run that never
/// logged a step).
pub fn previous_run(dir: &Path) -> Result<Option<PreviousRun>, StoreError> {
    let metrics = dir.join("metrics.jsonl");
    let metrics_rows = match fs::read_to_string(&metrics) {
        Ok(text) => text.lines().filter(|l| !l.trim().is_empty()).count(),
        Err(e) if e.kind() == ErrorKind::NotFound => 0,
        Err(e) => return Err(StoreError::io(&metrics, e)),
    };
    let checkpoints = checkpoint_steps(dir)?;
    let summary = dir.join("summary.json").is_file();
    Ok(
        (metrics_rows > 0 || !checkpoints.is_empty() || summary).then_some(PreviousRun {
            metrics_rows,
            checkpoints,
            summary,
        }),
    )
}

/// Refuses a fresh run in `dir` when it holds an earlier one ([`StoreError::RunExists`]).
pub fn ensure_fresh(dir: &Path) -> Result<(), StoreError> {
    match previous_run(dir)? {
        None => Ok(()),
        Some(previous) => Err(StoreError::RunExists {
            dir: dir.to_owned(),
            previous,
        }),
    }
}

/// Refuses a resume of `dir` when it has no checkpoint at all ([`StoreError::NoCheckpoint`]).
/// The newest one that verifies is then the worker's to find.
pub fn ensure_resumable(dir: &Path) -> Result<(), StoreError> {
    if checkpoint_steps(dir)?.is_empty() {
        return Err(StoreError::NoCheckpoint {
            dir: dir.to_owned(),
        });
    }
    Ok(())
}

/// Steps of `dir/checkpoints/step-*` directories with a MANIFEST, ascending. Whether their
/// files are intact is the worker's to verify (it knows the model's files); a directory
/// without a MANIFEST is a torn write and never counts.
pub fn checkpoint_steps(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let checkpoints = dir.join("checkpoints");
    let entries = match fs::read_dir(&checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&checkpoints, e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&checkpoints, e))?;
        let name = entry.file_name();
        let step = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step
            && entry.path().join("MANIFEST").is_file()
        {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_missing_directory_holds_no_run() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous_run(&dir.path().join("absent")).unwrap(), None);
        fs::write(dir.path().join("config.toml"), "").unwrap();
        fs::write(dir.path().join("metrics.jsonl"), "").unwrap();
        assert_eq!(previous_run(dir.path()).unwrap(), None);
    }

    #[test]
    fn metrics_checkpoints_and_a_summary_are_a_run() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":5}\n{\"step\":10}\n",
        )
        .unwrap();
        for step in [500, 1000] {
            let ck = dir.path().join("checkpoints").join(checkpoint_name(step));
            fs::create_dir_all(&ck).unwrap();
            fs::write(ck.join("MANIFEST"), "").unwrap();
        }
        // Torn (no MANIFEST) and foreign directories are not checkpoints.
        fs::create_dir_all(dir.path().join("checkpoints/step-00001500")).unwrap();
        fs::create_dir_all(dir.path().join("checkpoints/notes")).unwrap();
        fs::write(dir.path().join("summary.json"), "{}").unwrap();
        let found = previous_run(dir.path()).unwrap().unwrap();
        assert_eq!(found.metrics_rows, 2);
        assert_eq!(found.checkpoints, [500, 1000]);
        assert!(found.summary);
        assert_eq!(
            found.to_string(),
            "metrics.jsonl with 2 rows, 2 checkpoints up to step 1000, summary.json"
        );
        let refused = ensure_fresh(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains("already holds a run (metrics.jsonl with 2 rows")
                && refused.contains("--resume")
                && refused.contains("--overwrite"),
            "{refused}"
        );
        ensure_resumable(dir.path()).unwrap();
    }

    #[test]
    fn a_directory_without_checkpoints_cannot_be_resumed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("metrics.jsonl"), "{\"step\":5}\n").unwrap();
        fs::create_dir_all(dir.path().join("checkpoints/step-00000010")).unwrap();
        let refused = ensure_resumable(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("no checkpoint in"), "{refused}");
    }
}
