//! Crash-safe file writes: a reader sees the old file or the new one, never a torn one.
//!
//! The contract: the new content goes to a temporary file in the target's own directory (a
//! rename is only atomic within one file system), which is fsynced, renamed over the target,
//! and then the directory is fsynced, so the rename itself is durable. A failed write removes
//! its temporary file and leaves the target untouched.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::StoreError;

/// Makes temporary names unique among the threads of a process; the pid does it across
/// processes.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_with(path, |tmp| {
        File::create(tmp)
            .and_then(|mut file| file.write_all(bytes))
            .map_err(|e| StoreError::io(tmp, e))
    })
}

/// Has `fill` write the whole new content into a temporary path next to `path` (it keeps
/// `path`'s extension, for writers such as `VarStore::save` that pick a format from it), then
/// makes it `path` atomically. `fill`'s own error comes back as it is.
pub fn write_with<E>(path: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<StoreError>,
{
    let tmp = temporary_path(path).map_err(E::from)?;
    let result = fill(&tmp).and_then(|()| {
        let durable = || -> Result<(), StoreError> {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| StoreError::io(&tmp, e))?;
            fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))?;
            let dir = parent(path);
            sync_dir(dir).map_err(|e| StoreError::io(dir, e))
        };
        durable().map_err(E::from)
    });
    if result.is_err() {
        // Best effort: the error being returned matters more.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temporary_path(path: &Path) -> Result<PathBuf, StoreError> {
    let name = path
        .file_name()
        .ok_or_else(|| StoreError::io(path, std::io::Error::other("the path has no file name")))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id());
    if let Some(ext) = path.extension() {
        tmp.push('.');
        tmp.push_str(&ext.to_string_lossy());
    }
    Ok(parent(path).join(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["summary.json"]);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("no/such/file"), b"x").unwrap_err();
        assert!(err.to_string().contains("no/such"), "{err}");
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        write(&path, b"old").unwrap();
        let result = write_with(&path, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "safetensors", "extension kept");
            fs::write(tmp, b"half").map_err(|e| StoreError::io(tmp, e))?;
            Err(StoreError::io(tmp, std::io::Error::other("disk full")))
        });
        assert!(result.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["weights.safetensors"]);
    }
}
