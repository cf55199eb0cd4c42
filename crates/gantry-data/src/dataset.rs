//! A whole data set held in memory as `u8` pixels.

use crate::DataError;
use crate::idx::{IdxImages, IdxLabels};

/// Images (and optionally labels) kept as raw `u8`, NCHW.
///
/// Pixels stay `u8` until a batch is requested: a quarter of the memory of
/// `f32`, and conversion per batch is far cheaper than a training step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    name: String,
    /// `len × channels × height × width` bytes.
    images: Vec<u8>,
    labels: Option<Vec<u8>>,
    len: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl Dataset {
    /// Builds a data set from NCHW pixels; the number of images is
    /// `images.len() / (channels × height × width)`, which must be exact, and
    /// `labels`, if given, must hold one byte per image.
    pub fn new(
        name: impl Into<String>,
        images: Vec<u8>,
        labels: Option<Vec<u8>>,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Self, DataError> {
        let name = name.into();
        let shape_err = |reason: String| DataError::Shape {
            name: name.clone(),
            reason,
        };
        let size = channels
            .checked_mul(height)
            .and_then(|v| v.checked_mul(width))
            .filter(|&s| s > 0)
            .ok_or_else(|| shape_err(format!("invalid image shape {channels}×{height}×{width}")))?;
        if !images.len().is_multiple_of(size) {
            return Err(shape_err(format!(
                "{} bytes of pixels is not a whole number of {channels}×{height}×{width} images",
                images.len()
            )));
        }
        let len = images.len() / size;
        if let Some(labels) = &labels
            && labels.len() != len
        {
            return Err(shape_err(format!(
                "{len} images but {} labels",
                labels.len()
            )));
        }
        Ok(Dataset {
            name,
            images,
            labels,
            len,
            channels,
            height,
            width,
        })
    }

    /// Builds a single-channel data set from parsed IDX files, checking that
    /// both files hold the same number of examples.
    pub fn from_idx(
        name: impl Into<String>,
        images: IdxImages,
        labels: Option<IdxLabels>,
    ) -> Result<Self, DataError> {
        if let Some(labels) = &labels
            && labels.labels.len() != images.len
        {
            return Err(DataError::CountMismatch {
                images: images.source,
                n_images: images.len,
                labels: labels.source.clone(),
                n_labels: labels.labels.len(),
            });
        }
        Dataset::new(
            name,
            images.pixels,
            labels.map(|l| l.labels),
            1,
            images.rows,
            images.cols,
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// `(channels, height, width)` of one image.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// Bytes (= elements) per image: `channels × height × width`.
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// All pixels, NCHW.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// The pixels of image `i`, CHW.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            i < self.len,
            "{}: image index {i} out of range (len {})",
            self.name,
            self.len
        );
        let size = self.image_size();
        &self.images[i * size..(i + 1) * size]
    }

    /// All labels, if the data set has any.
    pub fn labels(&self) -> Option<&[u8]> {
        self.labels.as_deref()
    }

    /// Splits by position into `[0, first_n)` and `[first_n, len)`, e.g. a
    /// training set and a held-out set. The parts are named
    /// `NAME[..first_n]` and `NAME[first_n..]`.
    ///
    /// # Panics
    /// If `first_n > len()`.
    pub fn split(&self, first_n: usize) -> (Dataset, Dataset) {
        assert!(
            first_n <= self.len,
            "{}: cannot split off {first_n} examples from {}",
            self.name,
            self.len
        );
        let at = first_n * self.image_size();
        let part = |name: String, images: &[u8], labels: Option<&[u8]>, len: usize| Dataset {
            name,
            images: images.to_vec(),
            labels: labels.map(<[u8]>::to_vec),
            len,
            channels: self.channels,
            height: self.height,
            width: self.width,
        };
        let (head_labels, tail_labels) = match &self.labels {
            Some(l) => (Some(&l[..first_n]), Some(&l[first_n..])),
            None => (None, None),
        };
        (
            part(
                format!("{}[..{first_n}]", self.name),
                &self.images[..at],
                head_labels,
                first_n,
            ),
            part(
                format!("{}[{first_n}..]", self.name),
                &self.images[at..],
                tail_labels,
                self.len - first_n,
            ),
        )
    }

    /// Writes the images at `indices` into `out` as NCHW `f32`, each pixel `p`
    /// mapped to `p / 127.5 - 1` (so 0 → -1 and 255 → 1, the range of a
    /// `tanh` generator). `out` is cleared first; its allocation is reused,
    /// so a loader calling this every step allocates only once.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn batch_f32(&self, indices: &[usize], out: &mut Vec<f32>) {
        // A table avoids a division per pixel and guarantees identical values
        // for identical bytes.
        let table: [f32; 256] = std::array::from_fn(|p| p as f32 / 127.5 - 1.0);
        out.clear();
        out.reserve(indices.len() * self.image_size());
        for &i in indices {
            out.extend(self.image(i).iter().map(|&p| table[usize::from(p)]));
        }
    }

    /// The labels of the examples at `indices`, in order.
    ///
    /// # Panics
    /// If the data set has no labels, or an index is `>= len()`.
    pub fn labels_of(&self, indices: &[usize]) -> Vec<u8> {
        let labels = self
            .labels
            .as_deref()
            .unwrap_or_else(|| panic!("{}: data set has no labels", self.name));
        indices
            .iter()
            .map(|&i| {
                assert!(
                    i < self.len,
                    "{}: label index {i} out of range (len {})",
                    self.name,
                    self.len
                );
                labels[i]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three 1×2×2 images whose pixels are 10*i + k.
    fn small() -> Dataset {
        let images: Vec<u8> = (0..3u8)
            .flat_map(|i| (0..4).map(move |k| 10 * i + k))
            .collect();
        Dataset::new("small", images, Some(vec![7, 8, 9]), 1, 2, 2).unwrap()
    }

    #[test]
    fn accessors_report_the_shape() {
        let d = small();
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.image_shape(), (1, 2, 2));
        assert_eq!(d.image_size(), 4);
        assert_eq!(d.image(1), &[10, 11, 12, 13]);
        assert_eq!(d.labels(), Some(&[7u8, 8, 9][..]));
        assert_eq!(d.name(), "small");
    }

    #[test]
    fn new_rejects_inconsistent_buffers() {
        let err = Dataset::new("d", vec![0; 7], None, 1, 2, 2).unwrap_err();
        assert!(err.to_string().contains("not a whole number"), "{err}");
        let err = Dataset::new("d", vec![0; 8], Some(vec![1]), 1, 2, 2).unwrap_err();
        assert_eq!(err.to_string(), "d: 2 images but 1 labels");
        let err = Dataset::new("d", vec![], None, 0, 2, 2).unwrap_err();
        assert!(matches!(err, DataError::Shape { .. }));
    }

    #[test]
    fn from_idx_rejects_count_mismatch_naming_both_files() {
        let images = IdxImages {
            source: "imgs.gz".into(),
            len: 2,
            rows: 1,
            cols: 1,
            pixels: vec![1, 2],
        };
        let labels = IdxLabels {
            source: "lbls.gz".into(),
            labels: vec![0, 1, 2],
        };
        let err = Dataset::from_idx("d", images.clone(), Some(labels)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "imgs.gz holds 2 images but lbls.gz holds 3 labels"
        );
        let d = Dataset::from_idx("d", images, None).unwrap();
        assert_eq!((d.len(), d.image_shape()), (2, (1, 1, 1)));
        assert_eq!(d.labels(), None);
    }

    #[test]
    fn batch_f32_scales_to_minus_one_one_in_nchw_order() {
        let d = Dataset::new("d", vec![0, 255, 51, 204], None, 1, 1, 2).unwrap();
        let mut out = Vec::new();
        d.batch_f32(&[1, 0], &mut out);
        assert_eq!(out, [51.0 / 127.5 - 1.0, 204.0 / 127.5 - 1.0, -1.0, 1.0]);
    }

    #[test]
    fn batch_f32_reuses_the_buffer() {
        let d = small();
        let mut out = Vec::with_capacity(64);
        out.push(42.0);
        let ptr = out.as_ptr();
        d.batch_f32(&[2, 2, 0], &mut out);
        assert_eq!(out.len(), 12);
        assert_eq!(out.as_ptr(), ptr, "allocation was replaced");
        assert_eq!(out[0], 20.0 / 127.5 - 1.0);
        assert_eq!(out[8], -1.0);
    }

    #[test]
    fn labels_of_follows_indices() {
        assert_eq!(small().labels_of(&[2, 0, 2]), [9, 7, 9]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn batch_f32_panics_on_bad_index() {
        small().batch_f32(&[3], &mut Vec::new());
    }

    #[test]
    fn split_by_position() {
        let (a, b) = small().split(1);
        assert_eq!((a.len(), b.len()), (1, 2));
        assert_eq!(a.images(), &[0, 1, 2, 3]);
        assert_eq!(b.image(0), &[10, 11, 12, 13]);
        assert_eq!(a.labels(), Some(&[7u8][..]));
        assert_eq!(b.labels(), Some(&[8u8, 9][..]));
        assert_eq!((a.name(), b.name()), ("small[..1]", "small[1..]"));
        assert_eq!(b.image_shape(), (1, 2, 2));
        let (all, none) = small().split(3);
        assert_eq!((all.len(), none.len()), (3, 0));
        assert!(none.is_empty());
    }
}
