//! Training data for Gantry, as plain bytes and `f32` buffers.
//!
//! This crate owns everything between "a data set exists somewhere" and "a
//! worker has a batch of pixels in memory":
//!
//! * [`idx`] reads and writes the IDX format that MNIST-style data sets ship
//!   in (raw or gzip-compressed), validating every header field and length so
//!   that a damaged file is reported by name instead of producing garbage.
//! * [`dataset`] holds a whole data set in memory as `u8` pixels and turns a
//!   list of indices into an NCHW `f32` batch scaled to `[-1, 1]`.
//! * [`embedded`] ships MNIST-10k inside the binary, so a run works on a
//!   machine with no network at all.
//! * [`download`] fetches full MNIST / Fashion-MNIST into a local cache, with
//!   resumable, MD5-verified, atomically renamed downloads and mirror
//!   fallback; once cached, loading never touches the network.
//! * [`folder`] reads a folder of PNG/JPEG files (grey or RGB), resized and
//!   centre-cropped to one square size, skipping a bounded number of
//!   unreadable files; a folder of class sub-folders becomes a labelled set.
//! * [`export`] writes a generated data set as an IDX pair or a tree of PNGs
//!   per class, atomically and never over an existing path; both read back
//!   through [`idx`] and [`folder`] unchanged.
//! * [`sampler`] decides which examples make up each global batch as a pure
//!   function of `(seed, step)`, so data order survives resume and does not
//!   depend on how many ranks share the batch.
//!
//! The crate deliberately knows nothing about tensors or devices: workers turn
//! the buffers it yields into tensors themselves, which keeps libtorch out of
//! this crate's build and tests.

pub mod dataset;
pub mod download;
pub mod embedded;
mod error;
pub mod export;
pub mod folder;
pub mod idx;
pub mod sampler;

pub use dataset::Dataset;
pub use download::{Remote, RemoteFile, Split, load_remote};
pub use embedded::mnist_10k;
pub use error::DataError;
pub use sampler::GlobalSampler;
