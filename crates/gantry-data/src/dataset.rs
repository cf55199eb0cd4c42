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
    /// Name of each class, indexed by label byte; only ever set on a labelled
    /// data set whose labels are all `< class_names.len()`.
    class_names: Option<Vec<String>>,
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
            class_names: None,
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

    /// The name of each class, indexed by label byte, if they were set (see
    /// [`Dataset::with_class_names`]).
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Names the classes: `names[l]` is the class of label byte `l`.
    ///
    /// Fails, naming the data set, if it has no labels, if `names` is empty,
    /// longer than 256 (labels are one byte) or holds a name twice, or if a
    /// label is `>= names.len()`.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self, DataError> {
        let err = |reason: String| DataError::ClassNames {
            name: self.name.clone(),
            reason,
        };
        let Some(labels) = &self.labels else {
            return Err(err("the data set has no labels".into()));
        };
        if names.is_empty() {
            return Err(err("no class names given".into()));
        }
        if names.len() > 256 {
            return Err(err(format!(
                "{} class names, at most 256 (labels are one byte)",
                names.len()
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(names.len());
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(err(format!("class name {dup:?} appears more than once")));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= names.len())
        {
            return Err(err(format!(
                "example {i} has label {l}, but only {} class names are given",
                names.len()
            )));
        }
        self.class_names = Some(names);
        Ok(self)
    }

    /// The number of classes of a labelled data set: the number of class names
    /// if they are set, else the largest label + 1 (10 for MNIST and
    /// Fashion-MNIST). Without names, a part that happens to lack the largest
    /// label reports fewer classes, so set names on anything cut from a larger
    /// set before relying on this. `None` for an unlabelled data set;
    /// `Some(0)` for an empty labelled one without names.
    pub fn classes(&self) -> Option<usize> {
        let labels = self.labels.as_deref()?;
        Some(match &self.class_names {
            Some(names) => names.len(),
            None => labels.iter().max().map_or(0, |&l| usize::from(l) + 1),
        })
    }

    /// The examples at `indices`, in that order (repeats allowed), as a data
    /// set named `NAME[subset of N]` (`N = indices.len()`) that keeps the
    /// labels and class names.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.image_size());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            name: format!("{}[subset of {}]", self.name, indices.len()),
            images,
            labels: self.labels.as_ref().map(|_| self.labels_of(indices)),
            class_names: self.class_names.clone(),
            len: indices.len(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// Splits by position into `[0, first_n)` and `[first_n, len)`, e.g. a
    /// training set and a held-out set. The parts are named
    /// `NAME[..first_n]` and `NAME[first_n..]`; both keep the class names.
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
            class_names: self.class_names.clone(),
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

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn class_names_are_checked_against_the_labels() {
        let d = small()
            .with_class_names(names(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]))
            .unwrap();
        assert_eq!(d.class_names().unwrap()[7], "7");
        assert_eq!(d.classes(), Some(10));

        let err = |d: Dataset, n: Vec<String>| d.with_class_names(n).unwrap_err().to_string();
        let unlabelled = Dataset::new("u", vec![0; 4], None, 1, 2, 2).unwrap();
        assert_eq!(
            err(unlabelled, names(&["a"])),
            "u: invalid class names: the data set has no labels"
        );
        assert!(err(small(), vec![]).contains("no class names"));
        let too_few = err(small(), names(&["a", "b", "c", "d", "e", "f", "g", "h"]));
        assert!(
            too_few.contains("example 1 has label 8, but only 8 class names"),
            "{too_few}"
        );
        let mut ten = names(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        ten[3] = "8".into();
        assert!(err(small(), ten).contains("\"8\" appears more than once"));
        let many: Vec<String> = (0..257).map(|i| i.to_string()).collect();
        assert!(err(small(), many).contains("257 class names, at most 256"));
    }

    #[test]
    fn classes_counts_from_labels_or_names() {
        assert_eq!(small().classes(), Some(10), "largest label 9 → 10");
        let unlabelled = Dataset::new("u", vec![0; 4], None, 1, 2, 2).unwrap();
        assert_eq!(unlabelled.classes(), None);
        let empty = Dataset::new("e", vec![], Some(vec![]), 1, 2, 2).unwrap();
        assert_eq!(empty.classes(), Some(0));
        let named = Dataset::new("n", vec![0; 8], Some(vec![0, 1]), 1, 2, 2)
            .unwrap()
            .with_class_names(names(&["cat", "dog", "emu"]))
            .unwrap();
        assert_eq!(named.classes(), Some(3), "names win over max label + 1");
    }

    #[test]
    fn split_and_subset_keep_labels_and_names() {
        let d = small()
            .with_class_names(names(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]))
            .unwrap();
        let (a, b) = d.split(2);
        assert_eq!(a.class_names(), d.class_names());
        assert_eq!(b.class_names(), d.class_names());
        assert_eq!(b.classes(), Some(10));

        let s = d.subset(&[2, 0, 2]);
        assert_eq!(s.name(), "small[subset of 3]");
        assert_eq!(s.len(), 3);
        assert_eq!(s.image(0), &[20, 21, 22, 23]);
        assert_eq!(s.image(1), &[0, 1, 2, 3]);
        assert_eq!(s.labels(), Some(&[9u8, 7, 9][..]));
        assert_eq!(s.class_names(), d.class_names());
        assert_eq!(s.image_shape(), (1, 2, 2));

        let unlabelled = Dataset::new("u", vec![1, 2, 3, 4], None, 1, 1, 1).unwrap();
        let s = unlabelled.subset(&[3]);
        assert_eq!((s.images(), s.labels()), (&[4u8][..], None));
        assert!(unlabelled.subset(&[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn subset_panics_on_bad_index() {
        small().subset(&[0, 3]);
    }
}
