//! Full MNIST and Fashion-MNIST, downloaded once into a local cache.
//!
//! Files live in `CACHE_DIR/<remote name>/<file name>` (the two data sets use
//! the same file names, hence the sub-directory). Loading a file:
//!
//! 1. If the cached file exists and its MD5 is the published one, use it: a
//!    populated cache never touches the network. A cached file with a wrong
//!    MD5 is deleted and fetched again.
//! 2. Otherwise try each mirror in turn, downloading into `FILE.part`. An
//!    existing `.part` is resumed with `Range: bytes=N-`; a server answering
//!    `200` instead of `206` resends the whole file, so the download restarts
//!    from zero.
//! 3. The finished `.part` must match the published MD5, or it is deleted
//!    and the mirror counts as failed. A resumed download that fails the check
//!    is retried once from zero first, since the stale part may have come
//!    from elsewhere.
//! 4. The verified file is fsynced, renamed into place, and the directory
//!    fsynced, so that after a crash the final name holds either nothing or
//!    the complete, verified file.
//!
//! Concurrent callers sharing one cache directory are not coordinated: let
//! one process per machine populate the cache. The MD5 check still keeps a
//! garbled file from ever being used.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::idx::{parse_idx_images, parse_idx_labels};
use crate::{DataError, Dataset};

/// A data set that can be downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Remote {
    Mnist,
    FashionMnist,
}

/// Which half of a [`Remote`] data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// 60,000 examples.
    Train,
    /// 10,000 examples.
    Test,
}

/// A file to fetch and the MD5 (lowercase hex) it must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFile<'a> {
    pub name: &'a str,
    pub md5: &'a str,
}

const fn file(name: &'static str, md5: &'static str) -> RemoteFile<'static> {
    RemoteFile { name, md5 }
}

/// Per data set: train images, train labels, test images, test labels.
const MNIST_FILES: [RemoteFile<'static>; 4] = [
    file(
        "train-images-idx3-ubyte.gz",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    file(
        "train-labels-idx1-ubyte.gz",
        "d53e105ee54ea40749a09fcbcd1e9432",
    ),
    file(
        "t10k-images-idx3-ubyte.gz",
        "9fb629c4189551a2d022fa330f9573f3",
    ),
    file(
        "t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
];
const FASHION_MNIST_FILES: [RemoteFile<'static>; 4] = [
    file(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    file(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    file(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    file(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
];

impl Remote {
    /// Short name, used for the cache sub-directory and the data set name.
    pub fn name(self) -> &'static str {
        match self {
            Remote::Mnist => "mnist",
            Remote::FashionMnist => "fashion-mnist",
        }
    }

    /// Mirror base URLs used when the caller gives none, in order of preference.
    pub fn default_mirrors(self) -> &'static [&'static str] {
        match self {
            Remote::Mnist => &[
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
            ],
            Remote::FashionMnist => {
                &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
            }
        }
    }

    /// All four files: train images, train labels, test images, test labels.
    pub fn files(self) -> &'static [RemoteFile<'static>; 4] {
        match self {
            Remote::Mnist => &MNIST_FILES,
            Remote::FashionMnist => &FASHION_MNIST_FILES,
        }
    }

    /// The `(images, labels)` files of one split.
    pub fn split_files(self, split: Split) -> (RemoteFile<'static>, RemoteFile<'static>) {
        let f = self.files();
        match split {
            Split::Train => (f[0], f[1]),
            Split::Test => (f[2], f[3]),
        }
    }
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Loads one split of a remote data set through the cache in
/// `cache_dir/<remote name>/`, downloading what is missing.
///
/// `mirrors` are base URLs tried in order (a trailing `/` is optional); an
/// empty list means [`Remote::default_mirrors`]. The data set is named e.g.
/// `mnist-train`.
pub fn load_remote(
    remote: Remote,
    split: Split,
    cache_dir: &Path,
    mirrors: &[String],
) -> Result<Dataset, DataError> {
    let defaults: Vec<String>;
    let mirrors = if mirrors.is_empty() {
        defaults = remote
            .default_mirrors()
            .iter()
            .map(|m| m.to_string())
            .collect();
        &defaults
    } else {
        mirrors
    };
    let (images, labels) = remote.split_files(split);
    load_files(
        &format!("{}-{}", remote.name(), split.name()),
        images,
        labels,
        &cache_dir.join(remote.name()),
        mirrors,
    )
}

/// [`load_remote`] for any pair of IDX files: fetches `images` and `labels`
/// into `dir` (no sub-directory added) and parses them into a data set
/// called `name`.
pub fn load_files(
    name: &str,
    images: RemoteFile<'_>,
    labels: RemoteFile<'_>,
    dir: &Path,
    mirrors: &[String],
) -> Result<Dataset, DataError> {
    let images_path = fetch_file(images, dir, mirrors)?;
    let labels_path = fetch_file(labels, dir, mirrors)?;
    let read = |p: &Path| fs::read(p).map_err(|e| DataError::io(p.display(), e));
    let images = parse_idx_images(&images_path.display().to_string(), &read(&images_path)?)?;
    let labels = parse_idx_labels(&labels_path.display().to_string(), &read(&labels_path)?)?;
    Dataset::from_idx(name, images, Some(labels))
}

/// Makes `dir/<file.name>` exist with the right MD5, downloading it from the
/// first mirror that delivers it if needed; returns its path.
pub fn fetch_file(
    file: RemoteFile<'_>,
    dir: &Path,
    mirrors: &[String],
) -> Result<PathBuf, DataError> {
    let target = dir.join(file.name);
    if target.exists() {
        let actual = md5_file(&target)?;
        if actual.eq_ignore_ascii_case(file.md5) {
            return Ok(target);
        }
        tracing::warn!(
            path = %target.display(),
            expected = file.md5,
            actual,
            "cached file has the wrong MD5; deleting and downloading again"
        );
        fs::remove_file(&target).map_err(|e| DataError::io(target.display(), e))?;
    }
    fs::create_dir_all(dir).map_err(|e| DataError::io(dir.display(), e))?;

    let agent = agent();
    let mut failures = Vec::new();
    for mirror in mirrors {
        let url = format!("{}/{}", mirror.trim_end_matches('/'), file.name);
        match download(&agent, &url, file, dir, &target) {
            Ok(()) => return Ok(target),
            Err(err) => {
                tracing::warn!(%url, error = %err, "mirror failed");
                failures.push((mirror.clone(), err));
            }
        }
    }
    Err(DataError::AllMirrorsFailed {
        file: file.name.to_owned(),
        failures,
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(30)))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // A per-read timeout rather than a total one: a slow link may take
        // minutes for 10 MB, but a stalled one should not hang training.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn part_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    target.with_file_name(name)
}

/// Downloads `url` into `target` via its `.part` file, verifying the MD5.
fn download(
    agent: &ureq::Agent,
    url: &str,
    file: RemoteFile<'_>,
    dir: &Path,
    target: &Path,
) -> Result<(), DataError> {
    let part = part_path(target);
    let mut resumed = download_part(agent, url, &part)?;
    loop {
        let actual = md5_file(&part)?;
        if actual.eq_ignore_ascii_case(file.md5) {
            break;
        }
        remove_if_exists(&part)?;
        if resumed {
            tracing::info!(%url, "resumed download has the wrong MD5; restarting from zero");
            resumed = download_part(agent, url, &part)?;
            continue;
        }
        return Err(DataError::Md5Mismatch {
            file: file.name.to_owned(),
            url: url.to_owned(),
            expected: file.md5.to_owned(),
            actual,
        });
    }
    fs::rename(&part, target).map_err(|e| DataError::io(target.display(), e))?;
    sync_dir(dir)?;
    tracing::info!(path = %target.display(), "downloaded and verified");
    Ok(())
}

/// Completes `part` from `url`, resuming if it already holds bytes; returns
/// whether it resumed (kept earlier bytes). The file is fsynced on success.
fn download_part(agent: &ureq::Agent, url: &str, part: &Path) -> Result<bool, DataError> {
    let part_err = |e| DataError::io(part.display(), e);
    let http_err = |reason: String| DataError::Http {
        url: url.to_owned(),
        reason,
    };
    let mut offset = match fs::metadata(part) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(part_err(e)),
    };
    loop {
        // `identity` keeps a server from gzip-encoding the (already gzipped)
        // file in transit, which the client would transparently undo.
        let mut request = agent.get(url).header("Accept-Encoding", "identity");
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let response = request.call().map_err(|e| http_err(e.to_string()))?;
        let status = response.status().as_u16();
        let append = match status {
            206 if offset > 0 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                // Appending a range that does not start where the part ends
                // would splice the file; restart instead.
                if !range.starts_with(&format!("bytes {offset}-")) {
                    tracing::info!(%url, range, offset, "unexpected Content-Range; restarting");
                    remove_if_exists(part)?;
                    offset = 0;
                    continue;
                }
                true
            }
            200 => false,
            // The part is already as long as the file (or longer, if stale):
            // the MD5 check or a fresh download sorts it out.
            416 if offset > 0 => {
                remove_if_exists(part)?;
                offset = 0;
                continue;
            }
            _ => return Err(http_err(format!("HTTP status {status}"))),
        };
        if offset > 0 && !append {
            tracing::info!(%url, offset, "server ignored the Range request; restarting from zero");
        }
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(part_err)?;
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The bytes so far stay in `.part` for the next attempt to resume.
                Err(e) => return Err(http_err(format!("reading the body: {e}"))),
            };
            out.write_all(&buf[..n]).map_err(part_err)?;
        }
        out.sync_all().map_err(part_err)?;
        return Ok(append);
    }
}

fn md5_file(path: &Path) -> Result<String, DataError> {
    let err = |e| DataError::io(path.display(), e);
    let mut f = File::open(path).map_err(err)?;
    let mut hasher = Md5::new();
    io::copy(&mut f, &mut hasher).map_err(err)?;
    Ok(hex::encode(hasher.finalize()))
}

fn remove_if_exists(path: &Path) -> Result<(), DataError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataError::io(path.display(), e)),
        _ => Ok(()),
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), DataError> {
    gantry_store::atomic::sync_dir(dir).map_err(|e| DataError::io(dir.display(), e))
}

#[cfg(test)]
mod tests;
