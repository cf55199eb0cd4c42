//! A data set from a folder of PNG/JPEG files (`data.dataset = "folder:PATH"`).
//!
//! Every `*.png`, `*.jpg` and `*.jpeg` under the folder (recursively, any case of extension) is
//! decoded, converted to grey or RGB, resized so its shortest side is `image_size` (bilinear),
//! and centre-cropped to `image_size × image_size`; an image that already is
//! `image_size × image_size` is taken as decoded, pixel for pixel. Files are visited in sorted
//! path order, so example `i` is the same file on every rank and every run: the sampler's data
//! order stays a pure function of `(seed, step)`.
//!
//! # Labels from sub-folders
//!
//! If every image file sits somewhere inside a first-level sub-folder (`PATH/<class>/…/*.png`),
//! the data set is labelled: the classes are the names of those first-level sub-folders that
//! hold at least one image file, sorted by name in byte order, and an image's label is the index
//! of its first-level folder among them (so [`Dataset::class_names`] is set). A single image
//! file directly in `PATH` makes the whole data set unlabelled, as does an empty listing; files
//! that are not images (a `README.txt` next to the class folders) never count. Classes are
//! decided from the file listing before anything is decoded, so a skipped file never renumbers
//! them and labels stay aligned with the images kept; a class whose files all fail to decode
//! keeps its index and has no examples. Class folder names must be UTF-8, and there can be at
//! most 256 classes (labels are one byte).
//!
//! A file that does not decode is warned about by path and skipped; more than
//! `max_bad_files` of them fail the load, naming them all, because at that point the folder
//! is more likely wrong than a few files damaged.

use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{DynamicImage, GenericImageView};

use crate::{DataError, Dataset};

/// Extensions (lower-cased) that are read as images; anything else is ignored.
const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// What [`load`] built, and what it had to leave out.
#[derive(Debug)]
pub struct FolderData {
    pub dataset: Dataset,
    /// `(file, why)` for every file that was skipped because it did not decode.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Loads every image under `dir` as `channels × image_size × image_size` (channels 1 or 3).
pub fn load(
    dir: &Path,
    image_size: usize,
    channels: usize,
    max_bad_files: usize,
) -> Result<FolderData, DataError> {
    if !(channels == 1 || channels == 3) || image_size == 0 {
        return Err(DataError::Shape {
            name: dir.display().to_string(),
            reason: format!(
                "unsupported image shape {channels}×{image_size}×{image_size} (channels must be 1 or 3)"
            ),
        });
    }
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let classes = class_labels(dir, &files)?;
    let side = u32::try_from(image_size).map_err(|_| DataError::Shape {
        name: dir.display().to_string(),
        reason: format!("image_size {image_size} is too large"),
    })?;

    let per_image = channels * image_size * image_size;
    let mut pixels = Vec::with_capacity(files.len() * per_image);
    let mut labels = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    for (i, file) in files.iter().enumerate() {
        match image::open(file) {
            Ok(img) => {
                append_chw(&square(&img, side), channels, &mut pixels);
                // Pushed only for kept images, so labels stay aligned with pixels.
                if let Some(classes) = &classes {
                    labels.push(classes.file_labels[i]);
                }
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "skipping unreadable image");
                skipped.push((file.clone(), e.to_string()));
                if skipped.len() > max_bad_files {
                    return Err(DataError::BadFiles {
                        dir: dir.display().to_string(),
                        max: max_bad_files,
                        files: skipped,
                    });
                }
            }
        }
    }
    if pixels.is_empty() {
        return Err(DataError::Shape {
            name: dir.display().to_string(),
            reason: format!(
                "no readable images ({} found with extensions {}, {} unreadable)",
                files.len(),
                EXTENSIONS.join("/"),
                skipped.len()
            ),
        });
    }
    let name = format!("folder:{}", dir.display());
    let dataset = match classes {
        Some(Classes { names, .. }) => {
            Dataset::new(name, pixels, Some(labels), channels, image_size, image_size)?
                .with_class_names(names)?
        }
        None => Dataset::new(name, pixels, None, channels, image_size, image_size)?,
    };
    Ok(FolderData { dataset, skipped })
}

/// Class names from sub-folders, and the label of each listed file.
struct Classes {
    names: Vec<String>,
    /// One per file of the sorted listing, kept or skipped.
    file_labels: Vec<u8>,
}

/// The class names and one label per file of `files` (sorted, all under `dir`), or `None` if
/// the folder is unlabelled because some image sits directly in `dir` (or there are none).
fn class_labels(dir: &Path, files: &[PathBuf]) -> Result<Option<Classes>, DataError> {
    let class_err = |reason: String| DataError::ClassNames {
        name: dir.display().to_string(),
        reason,
    };
    let mut folders = Vec::with_capacity(files.len());
    for file in files {
        // `collect` builds every path by joining onto `dir`, so the prefix is always there.
        let rel = file.strip_prefix(dir).unwrap_or(file);
        let mut parts = rel.components();
        let (Some(first), Some(_)) = (parts.next(), parts.next()) else {
            return Ok(None);
        };
        let folder = first.as_os_str().to_str().ok_or_else(|| {
            class_err(format!(
                "class folder {:?} is not UTF-8",
                dir.join(first.as_os_str())
            ))
        })?;
        folders.push(folder);
    }
    if folders.is_empty() {
        return Ok(None);
    }
    // `str`'s order is byte order, the order promised in the module docs.
    let mut names: Vec<&str> = folders.clone();
    names.sort_unstable();
    names.dedup();
    if names.len() > 256 {
        return Err(class_err(format!(
            "{} class sub-folders hold images, at most 256 (labels are one byte)",
            names.len()
        )));
    }
    let file_labels = folders
        .iter()
        .map(|f| {
            let index = names
                .binary_search(f)
                .expect("every folder is in the name list");
            u8::try_from(index).expect("at most 256 classes")
        })
        .collect();
    Ok(Some(Classes {
        names: names.into_iter().map(str::to_owned).collect(),
        file_labels,
    }))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = fs::read_dir(dir).map_err(|e| DataError::io(dir.display(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir.display(), e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| DataError::io(path.display(), e))?;
        if kind.is_dir() {
            collect(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Resizes the shortest side to `side` and crops the centre `side × side`.
fn square(img: &DynamicImage, side: u32) -> DynamicImage {
    let (w, h) = img.dimensions();
    if (w, h) == (side, side) {
        // Already the target size: keep the decoded pixels (and colour type) untouched, so
        // an exported tree loads back bit for bit.
        return img.clone();
    }
    // Round the long side, never below `side`, so the crop always fits.
    let (nw, nh) = if w <= h {
        (
            side,
            ((u64::from(h) * u64::from(side)).div_ceil(u64::from(w)) as u32).max(side),
        )
    } else {
        (
            ((u64::from(w) * u64::from(side)).div_ceil(u64::from(h)) as u32).max(side),
            side,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        img.resize_exact(nw, nh, FilterType::Triangle)
    };
    let (x, y) = ((nw - side) / 2, (nh - side) / 2);
    DynamicImage::from(imageops::crop_imm(&resized.to_rgba8(), x, y, side, side).to_image())
}

/// Appends the image as CHW bytes, grey (luma) or RGB.
fn append_chw(img: &DynamicImage, channels: usize, out: &mut Vec<u8>) {
    if channels == 1 {
        out.extend_from_slice(img.to_luma8().as_raw());
    } else {
        let rgb = img.to_rgb8();
        for c in 0..3 {
            out.extend(rgb.pixels().map(|p| p.0[c]));
        }
    }
}

#[cfg(test)]
mod tests {
    use image::{ImageBuffer, Luma, Rgb};

    use super::*;

    /// A 40×20 RGB image whose left half is red and right half blue, plus a 10×10 grey PNG,
    /// a JPEG, a text file that must be ignored, and a corrupt PNG.
    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let wide = ImageBuffer::from_fn(40, 20, |x, _| {
            if x < 20 {
                Rgb([255u8, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        wide.save(dir.path().join("a_wide.png")).unwrap();
        let grey = ImageBuffer::from_fn(10, 10, |_, _| Luma([200u8]));
        fs::create_dir(dir.path().join("sub")).unwrap();
        grey.save(dir.path().join("sub/b_grey.PNG")).unwrap();
        let jpeg = ImageBuffer::from_fn(16, 24, |_, _| Rgb([0u8, 255, 0]));
        jpeg.save(dir.path().join("c_green.jpg")).unwrap();
        fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        fs::write(
            dir.path().join("d_corrupt.png"),
            b"\x89PNG\r\n\x1a\nthis is not a png",
        )
        .unwrap();
        dir
    }

    #[test]
    fn loads_resizes_crops_and_skips_the_corrupt_file() {
        let dir = folder();
        let data = load(dir.path(), 8, 3, 10).unwrap();
        assert_eq!(data.dataset.len(), 3, "txt ignored, corrupt skipped");
        assert_eq!(data.dataset.image_shape(), (3, 8, 8));
        assert_eq!(data.skipped.len(), 1);
        assert!(
            data.skipped[0].0.ends_with("d_corrupt.png"),
            "{:?}",
            data.skipped
        );
        // Sorted order: a_wide.png, c_green.jpg, sub/b_grey.PNG.
        let wide = data.dataset.image(0);
        let (red, blue) = (&wide[..64], &wide[128..]);
        // 40×20 → 16×8, centre crop 8×8 = columns 4..12: left half red, right half blue.
        assert_eq!(red[8], 255, "top-left of the crop is red");
        assert_eq!(blue[8], 0);
        assert_eq!(blue[8 + 7], 255, "top-right of the crop is blue");
        let green = data.dataset.image(1);
        assert!(
            green[64..128].iter().all(|&g| g > 240),
            "JPEG green channel"
        );
        let grey = data.dataset.image(2);
        assert!(grey.iter().all(|&v| v == 200), "grey becomes equal RGB");
    }

    #[test]
    fn grey_output_is_one_channel() {
        let dir = folder();
        let data = load(dir.path(), 5, 1, 10).unwrap();
        assert_eq!(data.dataset.image_shape(), (1, 5, 5));
        assert!(data.dataset.image(2).iter().all(|&v| v == 200));
    }

    #[test]
    fn too_many_bad_files_fail_naming_them() {
        let dir = folder();
        fs::write(dir.path().join("e_bad.jpg"), b"garbage").unwrap();
        let err = load(dir.path(), 8, 1, 1).unwrap_err().to_string();
        assert!(
            err.contains("d_corrupt.png") && err.contains("e_bad.jpg"),
            "{err}"
        );
        assert!(load(dir.path(), 8, 1, 2).is_ok());
    }

    #[test]
    fn a_top_level_image_makes_the_folder_unlabelled() {
        // The fixture has `sub/b_grey.PNG` but also images directly in the folder.
        let data = load(folder().path(), 4, 1, 10).unwrap();
        assert_eq!(data.dataset.labels(), None);
        assert_eq!(data.dataset.class_names(), None);
        assert_eq!(data.dataset.classes(), None);
    }

    fn grey(dir: &Path, rel: &str, value: u8) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        ImageBuffer::from_fn(3, 3, |_, _| Luma([value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn sub_folders_are_classes_and_a_skipped_file_does_not_shift_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        grey(root, "emu/y.png", 31);
        grey(root, "emu/deep/x.png", 30);
        grey(root, "cat/b.png", 11);
        grey(root, "cat/a.png", 10);
        grey(root, "dog/a.png", 20);
        // Sorts first in `dog`: if skipping it shifted anything, `dog/a.png` would be mislabelled.
        fs::write(root.join("dog/000_bad.png"), b"not a png").unwrap();
        fs::create_dir_all(root.join("empty/nested")).unwrap();
        fs::create_dir(root.join("notes")).unwrap();
        fs::write(root.join("notes/readme.txt"), "no images here").unwrap();
        fs::write(root.join("README.txt"), "top-level non-images do not count").unwrap();

        let data = load(root, 3, 1, 1).unwrap();
        let d = &data.dataset;
        assert_eq!(data.skipped.len(), 1);
        assert!(data.skipped[0].0.ends_with("dog/000_bad.png"));
        assert_eq!(
            d.class_names().unwrap(),
            ["cat", "dog", "emu"],
            "only folders holding images, sorted"
        );
        assert_eq!(d.classes(), Some(3));
        // Sorted paths: cat/a, cat/b, dog/a, emu/deep/x, emu/y.
        assert_eq!(d.labels(), Some(&[0u8, 0, 1, 2, 2][..]));
        let firsts: Vec<u8> = (0..d.len()).map(|i| d.image(i)[0]).collect();
        assert_eq!(firsts, [10, 11, 20, 30, 31]);
    }

    #[test]
    fn class_names_sort_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        grey(dir.path(), "a/1.png", 1);
        grey(dir.path(), "B/1.png", 2);
        grey(dir.path(), "a b/1.png", 3);
        let d = load(dir.path(), 3, 1, 0).unwrap().dataset;
        assert_eq!(d.class_names().unwrap(), ["B", "a", "a b"]);
        // Files come in path order (component by component), labels follow the folder.
        let firsts: Vec<u8> = (0..d.len()).map(|i| d.image(i)[0]).collect();
        assert_eq!(firsts, [2, 1, 3]);
        assert_eq!(d.labels(), Some(&[0u8, 1, 2][..]));
    }

    #[test]
    fn images_already_at_the_target_size_load_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let all = ImageBuffer::from_fn(16, 16, |x, y| Luma([(y * 16 + x) as u8]));
        all.save(dir.path().join("grey.png")).unwrap();
        let d = load(dir.path(), 16, 1, 0).unwrap().dataset;
        let want: Vec<u8> = (0..=255).collect();
        assert_eq!(d.image(0), &want[..]);

        let dir = tempfile::tempdir().unwrap();
        let rgb = ImageBuffer::from_fn(3, 3, |x, y| {
            let v = (y * 3 + x) as u8;
            Rgb([v, 100 + v, 200 + v])
        });
        rgb.save(dir.path().join("rgb.png")).unwrap();
        let d = load(dir.path(), 3, 3, 0).unwrap().dataset;
        let want: Vec<u8> = (0..3u8)
            .flat_map(|c| (0..9u8).map(move |v| 100 * c + v))
            .collect();
        assert_eq!(d.image(0), &want[..], "CHW, unchanged");
    }

    #[test]
    fn empty_or_missing_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load(dir.path(), 8, 1, 10)
                .unwrap_err()
                .to_string()
                .contains("no readable images")
        );
        assert!(load(&dir.path().join("missing"), 8, 1, 10).is_err());
        assert!(load(dir.path(), 8, 2, 10).is_err());
    }
}
