//! The on-disk classifier cache.
//!
//! An entry is two files named by a key (`CLASSIFIER_VERSION` + the first 16 hex digits of the
//! training data's SHA-256): `<key>.safetensors` (the weights) and `<key>.json` (a manifest
//! holding the weights' SHA-256). Both are written to a temporary file, fsynced, renamed into
//! place and the directory fsynced, weights first, so a crash leaves either no entry, an old
//! one, or weights without a matching manifest, which reads as corrupt and is retrained.
//! The digest catches what renames cannot: truncation, bit rot, a half-copied cache.
//!
//! Two processes missing the cache at once both train and both write; each rename is atomic,
//! so a reader sees whole files, and a manifest that ends up describing the other writer's
//! weights fails its digest and costs one retraining, never a wrong classifier.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;

use gantry_store::atomic::write_with;

use crate::EvalError;

/// Names the classifier's architecture and training recipe. Bump it whenever either changes,
/// so that caches written by older builds are ignored instead of loaded into a different
/// network (or silently kept with a different recipe).
pub const CLASSIFIER_VERSION: &str = "mnist-cnn-v1";

/// `$XDG_CACHE_HOME/gantry/eval`, else `~/.cache/gantry/eval`, else `<tmp>/gantry/eval`.
pub fn default_cache_dir() -> PathBuf {
    // The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("gantry").join("eval")
}

/// What the manifest records about the weights next to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub version: String,
    pub data_sha256: String,
    pub weights_sha256: String,
    /// Informational: accuracy is recomputed on every load.
    pub held_out_accuracy: f64,
    pub train_seconds: f64,
}

/// The two files of one cache entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub weights: PathBuf,
    pub manifest: PathBuf,
}

impl Entry {
    pub fn new(dir: &Path, data_sha256: &str) -> Self {
        let key = format!("{CLASSIFIER_VERSION}-{}", &data_sha256[..16]);
        Self {
            weights: dir.join(format!("{key}.safetensors")),
            manifest: dir.join(format!("{key}.json")),
        }
    }

    /// Loads the entry into `vs`, after checking the manifest and the weights' digest.
    pub fn load(&self, vs: &mut VarStore, data_sha256: &str) -> Result<Manifest, EvalError> {
        let text = match fs::read_to_string(&self.manifest) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(EvalError::NotCached(self.manifest.clone()));
            }
            Err(e) => return Err(EvalError::io(&self.manifest, e)),
        };
        let corrupt = |path: &Path, reason: String| EvalError::CorruptCache {
            path: path.to_owned(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| corrupt(&self.manifest, e.to_string()))?;
        if manifest.version != CLASSIFIER_VERSION || manifest.data_sha256 != data_sha256 {
            // The key in the file name should make this impossible; a renamed file is not ours.
            return Err(corrupt(
                &self.manifest,
                "manifest is for another version or data set".into(),
            ));
        }
        let bytes = match fs::read(&self.weights) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(corrupt(&self.weights, "manifest without weights".into()));
            }
            Err(e) => return Err(EvalError::io(&self.weights, e)),
        };
        let digest = sha256_hex(&bytes);
        if digest != manifest.weights_sha256 {
            return Err(corrupt(
                &self.weights,
                format!(
                    "SHA-256 {digest} of {} bytes, manifest says {}",
                    bytes.len(),
                    manifest.weights_sha256
                ),
            ));
        }
        // Loaded by path (tch reads safetensors only from files). Should a concurrent writer
        // rename new weights in between, they are another whole classifier of the same key,
        // and the accuracy the caller recomputes is that of the weights actually loaded.
        vs.load(&self.weights)
            .map_err(|e| corrupt(&self.weights, e.to_string()))?;
        Ok(manifest)
    }

    /// Writes the entry: weights, then the manifest describing them.
    pub fn store(
        &self,
        vs: &VarStore,
        data_sha256: &str,
        held_out_accuracy: f64,
        train_seconds: f64,
    ) -> Result<(), EvalError> {
        let dir = self.weights.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let mut written = Vec::new();
        write_with(&self.weights, |tmp| -> Result<(), EvalError> {
            vs.save(tmp).map_err(|e| EvalError::CacheWrite {
                path: tmp.to_owned(),
                reason: e.to_string(),
            })?;
            written = fs::read(tmp).map_err(|e| EvalError::io(tmp, e))?;
            Ok(())
        })?;
        let manifest = Manifest {
            version: CLASSIFIER_VERSION.to_owned(),
            data_sha256: data_sha256.to_owned(),
            // Hash what was written, not a re-serialisation: that is what a later load reads.
            weights_sha256: sha256_hex(&written),
            held_out_accuracy,
            train_seconds,
        };
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| EvalError::CacheWrite {
            path: self.manifest.clone(),
            reason: e.to_string(),
        })?;
        gantry_store::atomic::write(&self.manifest, json.as_bytes())?;
        Ok(())
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
