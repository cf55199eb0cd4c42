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

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;

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
        let weights_tmp = write_atomically(&self.weights, |tmp| {
            vs.save(tmp).map_err(|e| EvalError::CacheWrite {
                path: tmp.to_owned(),
                reason: e.to_string(),
            })
        })?;
        let manifest = Manifest {
            version: CLASSIFIER_VERSION.to_owned(),
            data_sha256: data_sha256.to_owned(),
            // Hash what was written, not a re-serialisation: that is what a later load reads.
            weights_sha256: sha256_hex(&weights_tmp),
            held_out_accuracy,
            train_seconds,
        };
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| EvalError::CacheWrite {
            path: self.manifest.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.manifest, |tmp| {
            fs::write(tmp, json.as_bytes()).map_err(|e| EvalError::io(tmp, e))
        })?;
        Ok(())
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Makes temporary names unique within a process (threads), the pid across processes.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Has `write` fill a temporary file next to `path`, fsyncs it, renames it to `path` and
/// fsyncs the directory, so `path` is always either absent, the old file or the whole new one.
/// Returns the bytes that were written.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), EvalError>,
) -> Result<Vec<u8>, EvalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The temporary keeps the extension: VarStore::save picks the format from it.
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp.{ext}", std::process::id()));
    let result = (|| -> Result<Vec<u8>, EvalError> {
        write(&tmp)?;
        let file = File::open(&tmp).map_err(|e| EvalError::io(&tmp, e))?;
        file.sync_all().map_err(|e| EvalError::io(&tmp, e))?;
        let bytes = fs::read(&tmp).map_err(|e| EvalError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp); // best effort: the error being returned matters more
    }
    let bytes = result?;
    // Makes the rename itself durable; without it a crash can resurrect the old entry.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EvalError::io(dir, e))?;
    Ok(bytes)
}
