//! MNIST-10k, compiled into the binary.
//!
//! 10,000 MNIST digits (28×28, labels 0-9) from `data/mnist-10k/` at the
//! repository root; see the README there for provenance and SHA-256 sums.
//! Embedding them (about 1.6 MB) means training works with no network and no
//! data directory, which is what the default configuration relies on.

use crate::idx::{parse_idx_images, parse_idx_labels};
use crate::{DataError, Dataset};

/// File name of the embedded images, used in error messages.
pub const MNIST_10K_IMAGES_NAME: &str = "mnist-10k-images-idx3-ubyte.gz";
/// File name of the embedded labels, used in error messages.
pub const MNIST_10K_LABELS_NAME: &str = "mnist-10k-labels-idx1-ubyte.gz";

/// The embedded image file, gzip-compressed IDX.
pub static MNIST_10K_IMAGES_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/mnist-10k/mnist-10k-images-idx3-ubyte.gz"
));
/// The embedded label file, gzip-compressed IDX.
pub static MNIST_10K_LABELS_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/mnist-10k/mnist-10k-labels-idx1-ubyte.gz"
));

/// Parses the embedded MNIST-10k: 10,000 single-channel 28×28 images with
/// labels, named `mnist-10k`.
///
/// Decompresses on every call (tens of milliseconds); keep the result rather
/// than calling this per step.
pub fn mnist_10k() -> Result<Dataset, DataError> {
    let images = parse_idx_images(MNIST_10K_IMAGES_NAME, MNIST_10K_IMAGES_GZ)?;
    let labels = parse_idx_labels(MNIST_10K_LABELS_NAME, MNIST_10K_LABELS_GZ)?;
    Dataset::from_idx("mnist-10k", images, Some(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn embedded_bytes_match_the_readme_checksums() {
        assert_eq!(
            hex::encode(Sha256::digest(MNIST_10K_IMAGES_GZ)),
            "f39d0f7d2bcc31628a7b30bf6f034eb8c3fdb4f4f37a394711d45be88350ab57"
        );
        assert_eq!(
            hex::encode(Sha256::digest(MNIST_10K_LABELS_GZ)),
            "51ddaa567040c855557b00885623b489bdeb3fb1fee84580231173cd16a70992"
        );
    }

    #[test]
    fn mnist_10k_has_the_documented_shape_and_classes() {
        let d = mnist_10k().unwrap();
        assert_eq!(d.name(), "mnist-10k");
        assert_eq!(d.len(), 10_000);
        assert_eq!(d.image_shape(), (1, 28, 28));
        assert_eq!(d.images().len(), 10_000 * 28 * 28);
        let mut counts = [0usize; 10];
        for &l in d.labels().unwrap() {
            counts[usize::from(l)] += 1; // panics on a label > 9
        }
        assert_eq!(
            counts,
            [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
        );
    }

    #[test]
    fn mnist_10k_pixels_look_like_digits() {
        // Guards against e.g. decoding the wrong bytes: MNIST digits have
        // black borders and ink in the middle.
        let d = mnist_10k().unwrap();
        let img = d.image(0);
        assert!(img[..28].iter().all(|&p| p == 0), "top row not blank");
        assert!(img.iter().any(|&p| p > 200), "no ink");
    }
}
