use std::fmt::Write as _;
use std::io;

/// Everything that can go wrong in this crate.
///
/// Messages name the file (or URL) involved and say what is wrong with it,
/// because these errors usually end up in front of an operator who has to
/// decide whether to delete a cache, fix a mirror or fix a config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },

    /// The file starts like gzip but does not decompress.
    #[error("{name}: corrupt gzip stream: {source}")]
    Gzip {
        name: String,
        #[source]
        source: io::Error,
    },

    /// The IDX magic number is not the one expected for this kind of file.
    #[error(
        "{name}: bad magic number {found:#010x} ({found}), expected {expected:#010x} ({expected}) for IDX {kind}{hint}"
    )]
    BadMagic {
        name: String,
        kind: &'static str,
        expected: u32,
        found: u32,
        /// Extra explanation when the magic is a known, but wrong, one.
        hint: &'static str,
    },

    /// The file ends inside the IDX header.
    #[error("{name}: truncated header: IDX {kind} header is {expected} bytes, found {found}")]
    TruncatedHeader {
        name: String,
        kind: &'static str,
        expected: usize,
        found: usize,
    },

    /// The header is complete but describes an impossible shape.
    #[error("{name}: invalid header: {reason}")]
    BadHeader { name: String, reason: String },

    /// Fewer data bytes follow the header than it announces.
    #[error("{name}: truncated: header says {dims} = {expected} bytes of {kind}, found {found}")]
    TruncatedData {
        name: String,
        dims: String,
        kind: &'static str,
        expected: u64,
        found: u64,
    },

    /// More data bytes follow the header than it announces.
    #[error(
        "{name}: {extra} trailing bytes after the {dims} = {expected} bytes of {kind} the header announces"
    )]
    TrailingBytes {
        name: String,
        dims: String,
        kind: &'static str,
        expected: u64,
        extra: u64,
    },

    /// An image file and its label file disagree on the number of examples.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        images: String,
        n_images: usize,
        labels: String,
        n_labels: usize,
    },

    /// A buffer's length does not match the shape it is said to have.
    #[error("{name}: {reason}")]
    Shape { name: String, reason: String },

    /// A downloaded file's MD5 is not the published one.
    #[error("{file}: MD5 mismatch for the download from {url}: expected {expected}, got {actual}")]
    Md5Mismatch {
        file: String,
        url: String,
        expected: String,
        actual: String,
    },

    /// An HTTP request failed or was answered with an unusable status.
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },

    /// No mirror delivered a file; one `(mirror URL, error)` per mirror tried.
    #[error("{file}: all {} mirror(s) failed:{}", .failures.len(), list_failures(.failures))]
    AllMirrorsFailed {
        file: String,
        failures: Vec<(String, DataError)>,
    },

    /// The global batch has fewer images than there are ranks (or there are no ranks).
    #[error(
        "global batch {global_batch} cannot be shared by {world} ranks: every rank needs at least one image"
    )]
    BatchSmallerThanWorld { global_batch: usize, world: usize },

    /// A rank outside `0..world` asked for its share of a batch.
    #[error("rank {rank} is out of range for world size {world}")]
    RankOutOfRange { rank: usize, world: usize },

    /// A folder data set held more unreadable images than allowed.
    #[error("{dir}: {} unreadable image file(s), more than data.max_bad_files = {max}:{}", .files.len(), list_files(.files))]
    BadFiles {
        dir: String,
        max: usize,
        files: Vec<(std::path::PathBuf, String)>,
    },

    /// Sampler parameters that cannot produce any batch.
    #[error("invalid sampler: {0}")]
    InvalidSampler(String),

    /// Class names that do not fit a data set's labels (or a folder whose class
    /// sub-folders cannot be class names); `name` is the data set or folder.
    #[error("{name}: invalid class names: {reason}")]
    ClassNames { name: String, reason: String },

    /// An export's final path is already taken; nothing was written.
    #[error("{path}: already exists; not overwriting")]
    AlreadyExists { path: String },

    /// An export's input cannot be written as asked (shape, labels, class names);
    /// `path` is the final path, which was left absent.
    #[error("{path}: cannot export: {reason}")]
    Export { path: String, reason: String },
}

fn list_failures(failures: &[(String, DataError)]) -> String {
    let mut out = String::new();
    for (mirror, err) in failures {
        let _ = write!(out, "\n  {mirror}: {err}");
    }
    out
}

fn list_files(files: &[(std::path::PathBuf, String)]) -> String {
    let mut out = String::new();
    for (file, why) in files {
        let _ = write!(out, "\n  {}: {why}", file.display());
    }
    out
}

impl DataError {
    /// A network failure (an HTTP error, every mirror unreachable) that a later attempt may
    /// not meet; everything else (bad files, bad settings) fails the same way every time.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Http { .. } | Self::AllMirrorsFailed { .. })
    }

    pub(crate) fn io(path: impl std::fmt::Display, source: io::Error) -> Self {
        DataError::Io {
            path: path.to_string(),
            source,
        }
    }
}
