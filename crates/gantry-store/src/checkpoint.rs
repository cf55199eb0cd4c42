//! A checkpoint directory's MANIFEST: one `<sha256>  <size>  <file>` line per file, written
//! last, after every file it lists is fsynced. A directory whose MANIFEST is missing, or whose
//! files differ from it in size or digest, is torn or damaged and must never be read.
//! Which files a complete checkpoint has depends on the model family: the worker, which
//! writes them, checks that the MANIFEST lists them all.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::StoreError;

/// The name of the manifest file inside a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST";

/// SHA-256 (hex) and size of a file, read in 1 MiB blocks.
pub fn hash_file(path: &Path) -> Result<(String, u64), StoreError> {
    let mut file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// The MANIFEST line of a file.
pub fn manifest_line(dir: &Path, file: &str) -> Result<String, StoreError> {
    let (digest, size) = hash_file(&dir.join(file))?;
    Ok(format!("{digest}  {size}  {file}\n"))
}

/// Checks every file the MANIFEST of `dir` lists against its size and digest; returns the
/// listed names. The error names the file and what is wrong with it.
pub fn verify_manifest(dir: &Path) -> Result<Vec<String>, StoreError> {
    let manifest = dir.join(MANIFEST);
    let corrupt = |path: &Path, reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let text = fs::read_to_string(&manifest)
        .map_err(|e| corrupt(&manifest, format!("{e} (checkpoint incomplete)")))?;
    let mut listed = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.splitn(3, "  ").collect();
        let [digest, size, file] = parts[..] else {
            return Err(corrupt(&manifest, format!("malformed line {line:?}")));
        };
        if file.contains('/') || file.starts_with('.') {
            return Err(corrupt(
                &manifest,
                format!("lists {file:?}, outside the checkpoint"),
            ));
        }
        let path = dir.join(file);
        let (actual, actual_size) = match hash_file(&path) {
            Ok(found) => found,
            Err(StoreError::Io { source, .. }) => return Err(corrupt(&path, source.to_string())),
            Err(other) => return Err(other),
        };
        if actual_size.to_string() != size {
            return Err(corrupt(
                &path,
                format!("size {actual_size}, MANIFEST says {size}"),
            ));
        }
        if actual != digest {
            return Err(corrupt(
                &path,
                format!("SHA-256 {actual}, MANIFEST says {digest}"),
            ));
        }
        listed.push(file.to_owned());
    }
    Ok(listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_vouches_for_its_files_and_names_the_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("weights.safetensors"), b"0123456789").unwrap();
        fs::write(dir.path().join("state.json"), b"{}").unwrap();
        let manifest = manifest_line(dir.path(), "weights.safetensors").unwrap()
            + &manifest_line(dir.path(), "state.json").unwrap();
        fs::write(dir.path().join(MANIFEST), &manifest).unwrap();
        assert_eq!(
            verify_manifest(dir.path()).unwrap(),
            ["weights.safetensors", "state.json"]
        );

        // Same size, other bytes: only the digest can tell.
        fs::write(dir.path().join("weights.safetensors"), b"0123456780").unwrap();
        let err = verify_manifest(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("weights.safetensors") && err.contains("SHA-256"),
            "{err}"
        );

        fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        let err = verify_manifest(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("MANIFEST") && err.contains("incomplete"),
            "{err}"
        );
    }
}
