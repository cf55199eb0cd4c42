//! Writing a generated data set to disk, atomically.
//!
//! Two layouts, both readable by this crate again:
//!
//! * [`write_idx_pair`]: grey images and their labels as two IDX files (raw or gzip), which
//!   [`idx::read_idx_images`] / [`idx::read_idx_labels`] read back byte for byte.
//! * [`write_png_tree`]: `DIR/<class name>/NNNNNN.png`, which [`folder::load`] reads back as a
//!   labelled data set with the same pixels, labels and class names.
//!
//! Both writers refuse a final path that already exists (nothing is overwritten, ever) and
//! build everything under a temporary sibling, `<final>.partial-<pid>-XXXXXX` in the same
//! directory so that the last step is a `rename` within one file system. Every file is fsynced
//! before that rename and the directories after it, so a reader, a crash or a full disk leaves
//! either nothing or the complete output under the final name, never part of it. On an error
//! the temporaries are removed; only a process killed midway can leave a `*.partial-*` behind,
//! and never anything under a final name.
//!
//! [`idx::read_idx_images`]: crate::idx::read_idx_images
//! [`idx::read_idx_labels`]: crate::idx::read_idx_labels
//! [`folder::load`]: crate::folder::load

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageError};
use tempfile::{Builder, NamedTempFile, TempDir};

use crate::{DataError, idx};

/// File names in a PNG tree are this many digits, so that name order is index order; a class
/// with more images would need wider names.
const INDEX_DIGITS: usize = 6;
const MAX_PER_CLASS: usize = 1_000_000;

/// Writes `images` (`labels.len()` grey `rows × cols` images, row-major) to `images_path` and
/// `labels` to `labels_path` as IDX files, gzip-compressed if `gzip`.
///
/// Neither path may exist beforehand. Both files are written and fsynced under temporary
/// names first and only then renamed into place, images first; if the second rename fails,
/// the first is undone, so the pair appears whole or not at all.
pub fn write_idx_pair(
    images_path: &Path,
    labels_path: &Path,
    images: &[u8],
    labels: &[u8],
    rows: usize,
    cols: usize,
    gzip: bool,
) -> Result<(), DataError> {
    let n = labels.len();
    if rows == 0 || cols == 0 {
        return Err(export_err(
            images_path,
            format!("images of {rows}×{cols} pixels"),
        ));
    }
    if n.checked_mul(rows).and_then(|v| v.checked_mul(cols)) != Some(images.len()) {
        return Err(export_err(
            images_path,
            format!(
                "{n} labels need {n}×{rows}×{cols} = {} bytes of pixels, got {}",
                n as u128 * rows as u128 * cols as u128,
                images.len()
            ),
        ));
    }
    if images_path == labels_path {
        return Err(export_err(
            images_path,
            "the images and the labels cannot go to the same file".into(),
        ));
    }
    ensure_absent(images_path)?;
    ensure_absent(labels_path)?;

    let images_tmp = temp_file(images_path, |w| {
        idx::write_idx_images(w, images, n, rows, cols, gzip)
    })?;
    let labels_tmp = temp_file(labels_path, |w| idx::write_idx_labels(w, labels, gzip))?;
    persist(images_tmp, images_path)?;
    if let Err(e) = persist(labels_tmp, labels_path) {
        // A lone images file would be half a pair under a final name: take it back.
        if let Err(undo) = fs::remove_file(images_path) {
            tracing::warn!(
                file = %images_path.display(),
                error = %undo,
                "could not remove the images file of an incomplete IDX pair"
            );
        }
        return Err(e);
    }
    sync_dir(parent_of(images_path))?;
    if parent_of(labels_path) != parent_of(images_path) {
        sync_dir(parent_of(labels_path))?;
    }
    Ok(())
}

/// Writes `images` (NCHW, `shape = (channels, height, width)`, channels 1 for grey PNGs or 3
/// for RGB) as `dir/<class_names[label]>/NNNNNN.png`, numbering each class's images from
/// `000000` in the order they come.
///
/// `dir` must not exist. `class_names` must be non-empty, at most 256, strictly ascending in
/// byte order (so that the sorted folder order [`folder::load`] numbers classes by is the
/// label order: `"0"`..`"9"` qualifies) and each a plain path component (not empty, `.`, `..`,
/// and without `/` or NUL). A label `>= class_names.len()` is an error. A class only gets a
/// folder if it has images; loading the tree back therefore gives the same labels and names
/// only when every class has at least one image (otherwise the present classes are numbered
/// densely). [`folder::load`] returns the images grouped by class, in order within a class.
///
/// The tree is built and fsynced in a temporary sibling directory and renamed to `dir` at the
/// end. The rename cannot replace a non-empty directory or a file; `dir` is checked to be
/// absent right before it, which leaves only an empty directory created in that instant
/// at risk of being replaced.
///
/// [`folder::load`]: crate::folder::load
pub fn write_png_tree(
    dir: &Path,
    images: &[u8],
    labels: &[u8],
    shape: (usize, usize, usize),
    class_names: &[String],
) -> Result<(), DataError> {
    let (channels, height, width) = shape;
    let err = |reason: String| export_err(dir, reason);
    let (Ok(h), Ok(w)) = (u32::try_from(height), u32::try_from(width)) else {
        return Err(err(format!(
            "images of {height}×{width} pixels are too large"
        )));
    };
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        _ => {
            return Err(err(format!(
                "{channels} channels; PNG trees are grey (1) or RGB (3)"
            )));
        }
    };
    let size = channels * height * width;
    if size == 0 {
        return Err(err(format!("images of {height}×{width} pixels")));
    }
    if labels.len().checked_mul(size) != Some(images.len()) {
        return Err(err(format!(
            "{} labels need {} bytes of {channels}×{height}×{width} pixels, got {}",
            labels.len(),
            labels.len() as u128 * size as u128,
            images.len()
        )));
    }
    if labels.is_empty() {
        return Err(err("no images to write".into()));
    }
    check_class_names(class_names).map_err(err)?;
    ensure_absent(dir)?;

    let tmp = Builder::new()
        .prefix(&partial_prefix(dir)?)
        .tempdir_in(parent_of(dir))
        .map_err(|e| DataError::io(parent_of(dir).display(), e))?;
    let mut counts = vec![0usize; class_names.len()];
    let mut interleaved = Vec::with_capacity(if channels == 3 { size } else { 0 });
    for (i, (&label, image)) in labels.iter().zip(images.chunks_exact(size)).enumerate() {
        // Checked here rather than up front: one pass, and any error from here on drops
        // `tmp`, which removes the partial tree.
        let class = usize::from(label);
        let Some(name) = class_names.get(class) else {
            return Err(err(format!(
                "example {i} has label {label}, but only {} class names are given",
                class_names.len()
            )));
        };
        if counts[class] == MAX_PER_CLASS {
            return Err(err(format!(
                "class {name:?} has more than {MAX_PER_CLASS} images, more than \
                 {INDEX_DIGITS}-digit file names can keep in order"
            )));
        }
        let class_dir = tmp.path().join(name);
        if counts[class] == 0 {
            fs::create_dir(&class_dir).map_err(|e| DataError::io(class_dir.display(), e))?;
        }
        let pixels = if channels == 3 {
            // PNG wants HWC; the data set is CHW.
            let plane = height * width;
            interleaved.clear();
            interleaved.extend((0..plane).flat_map(|p| (0..3).map(move |c| image[c * plane + p])));
            &interleaved[..]
        } else {
            image
        };
        let file = class_dir.join(format!(
            "{:0width$}.png",
            counts[class],
            width = INDEX_DIGITS
        ));
        write_png(&file, pixels, w, h, color)?;
        counts[class] += 1;
    }
    for (name, _) in class_names.iter().zip(&counts).filter(|(_, n)| **n > 0) {
        sync_dir(&tmp.path().join(name))?;
    }
    sync_dir(tmp.path())?;
    rename_dir_into_place(tmp, dir)?;
    sync_dir(parent_of(dir))
}

/// Why `names` cannot name the folders of a PNG tree, if they cannot.
fn check_class_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("no class names given".into());
    }
    if names.len() > 256 {
        return Err(format!(
            "{} class names, at most 256 (labels are one byte)",
            names.len()
        ));
    }
    if let Some(bad) = names
        .iter()
        .find(|n| n.is_empty() || *n == "." || *n == ".." || n.contains(['/', '\0']))
    {
        return Err(format!(
            "class name {bad:?} is not a plain folder name (empty, \".\", \"..\", or containing '/' or NUL)"
        ));
    }
    if let Some((i, pair)) = names.windows(2).enumerate().find(|(_, p)| p[0] >= p[1]) {
        return Err(format!(
            "class names must be strictly ascending in byte order, so that the sorted class \
             folders keep the label order, but {:?} (label {i}) is followed by {:?}",
            pair[0], pair[1]
        ));
    }
    Ok(())
}

fn write_png(
    path: &Path,
    pixels: &[u8],
    width: u32,
    height: u32,
    color: ExtendedColorType,
) -> Result<(), DataError> {
    let io_err = |e| DataError::io(path.display(), e);
    let file = File::create_new(path).map_err(io_err)?;
    let mut out = BufWriter::new(&file);
    PngEncoder::new(&mut out)
        .write_image(pixels, width, height, color)
        .map_err(|e| match e {
            ImageError::IoError(e) => io_err(e),
            other => io_err(io::Error::other(other)),
        })?;
    out.flush().map_err(io_err)?;
    drop(out);
    file.sync_all().map_err(io_err)
}

/// Writes a temporary sibling of `final_path` through `write` and fsyncs it; dropping the
/// result removes it.
fn temp_file(
    final_path: &Path,
    write: impl FnOnce(BufWriter<&File>) -> Result<(), DataError>,
) -> Result<NamedTempFile, DataError> {
    let parent = parent_of(final_path);
    let tmp = Builder::new()
        .prefix(&partial_prefix(final_path)?)
        .tempfile_in(parent)
        .map_err(|e| DataError::io(parent.display(), e))?;
    // The IDX writers name their output "IDX writer"; say which file it was.
    let named = |e: DataError| match e {
        DataError::Io { source, .. } => DataError::io(final_path.display(), source),
        DataError::Shape { reason, .. } => DataError::Shape {
            name: final_path.display().to_string(),
            reason,
        },
        other => other,
    };
    write(BufWriter::new(tmp.as_file())).map_err(named)?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| DataError::io(tmp.path().display(), e))?;
    Ok(tmp)
}

/// Renames `tmp` to `final_path` unless something is there already (atomically so, on Linux).
fn persist(tmp: NamedTempFile, final_path: &Path) -> Result<(), DataError> {
    // On failure the error hands the temporary back, and dropping it removes it.
    tmp.persist_noclobber(final_path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            DataError::AlreadyExists {
                path: final_path.display().to_string(),
            }
        } else {
            DataError::io(final_path.display(), e.error)
        }
    })?;
    Ok(())
}

fn rename_dir_into_place(tmp: TempDir, dir: &Path) -> Result<(), DataError> {
    // Checked again at the last moment: `rename` would replace an empty directory.
    ensure_absent(dir)?;
    fs::rename(tmp.path(), dir).map_err(|e| {
        if matches!(
            e.kind(),
            io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
        ) {
            DataError::AlreadyExists {
                path: dir.display().to_string(),
            }
        } else {
            DataError::io(dir.display(), e)
        }
    })?;
    // The tree now lives at `dir`; stop `tmp` from trying to remove its old name.
    let _moved: PathBuf = tmp.keep();
    Ok(())
}

fn ensure_absent(path: &Path) -> Result<(), DataError> {
    // `symlink_metadata`, so that a dangling symlink also counts as taken.
    match fs::symlink_metadata(path) {
        Ok(_) => Err(DataError::AlreadyExists {
            path: path.display().to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::io(path.display(), e)),
    }
}

/// `<file name>.partial-<pid>-`, to which the temporary's random suffix is appended.
fn partial_prefix(final_path: &Path) -> Result<OsString, DataError> {
    let mut prefix = final_path
        .file_name()
        .ok_or_else(|| export_err(final_path, "not a path to a file or folder name".into()))?
        .to_owned();
    prefix.push(format!(".partial-{}-", std::process::id()));
    Ok(prefix)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a directory's entries (a rename into it, files created in it) durable.
fn sync_dir(dir: &Path) -> Result<(), DataError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DataError::io(dir.display(), e))?;
    // Elsewhere directories cannot be opened for syncing; the file syncs have to do.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn export_err(path: &Path, reason: String) -> DataError {
    DataError::Export {
        path: path.display().to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::folder;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// Everything in `dir`, sorted, as names.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// `n` images of `size` bytes with varied pixels.
    fn pixels(n: usize, size: usize) -> Vec<u8> {
        (0..n * size).map(|i| (i * 37 % 251) as u8).collect()
    }

    /// The images and labels ordered by label, keeping order within a label: how
    /// `folder::load` returns a written tree.
    fn grouped(images: &[u8], labels: &[u8], size: usize) -> (Vec<u8>, Vec<u8>) {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by_key(|&i| labels[i]);
        let imgs = order
            .iter()
            .flat_map(|&i| &images[i * size..(i + 1) * size])
            .copied()
            .collect();
        (imgs, order.iter().map(|&i| labels[i]).collect())
    }

    #[test]
    fn grey_png_tree_round_trips_through_folder_load() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("samples");
        let classes = names(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        let labels: Vec<u8> = (0..25).map(|i| (i * 7 % 10) as u8).collect();
        let images = pixels(25, 4 * 4);
        write_png_tree(&dir, &images, &labels, (1, 4, 4), &classes).unwrap();

        assert_eq!(listing(root.path()), ["samples"], "no temporary left");
        assert_eq!(listing(&dir), classes);
        // Label 0 holds examples 0, 10, 20: numbered per class from 000000.
        assert_eq!(
            listing(&dir.join("0")),
            ["000000.png", "000001.png", "000002.png"]
        );
        let data = folder::load(&dir, 4, 1, 0).unwrap();
        assert!(data.skipped.is_empty());
        let d = data.dataset;
        let (want_images, want_labels) = grouped(&images, &labels, 16);
        assert_eq!(d.images(), &want_images[..]);
        assert_eq!(d.labels(), Some(&want_labels[..]));
        assert_eq!(d.class_names(), Some(&classes[..]));
        assert_eq!(d.image(0), &images[..16], "example 0 is 0/000000.png");
    }

    #[test]
    fn rgb_png_tree_round_trips_and_skips_empty_classes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("rgb");
        let classes = names(&["ant", "bee", "cow"]);
        let labels = [2u8, 0, 2, 2, 0];
        let size = 3 * 5 * 5;
        let images = pixels(labels.len(), size);
        write_png_tree(&dir, &images, &labels, (3, 5, 5), &classes).unwrap();
        assert_eq!(
            listing(&dir),
            ["ant", "cow"],
            "no folder for a class without images"
        );

        let d = folder::load(&dir, 5, 3, 0).unwrap().dataset;
        let (want_images, _) = grouped(&images, &labels, size);
        assert_eq!(d.images(), &want_images[..], "CHW ↔ HWC both ways");
        // Only the classes present come back, numbered densely.
        assert_eq!(d.class_names().unwrap(), ["ant", "cow"]);
        assert_eq!(d.labels(), Some(&[0u8, 0, 1, 1, 1][..]));
    }

    #[test]
    fn idx_pair_round_trips_raw_and_gzip() {
        for gzip in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let (img, lbl) = (root.path().join("images"), root.path().join("labels"));
            let labels = [3u8, 1, 4, 1, 5, 9];
            let images = pixels(labels.len(), 7 * 3);
            write_idx_pair(&img, &lbl, &images, &labels, 7, 3, gzip).unwrap();
            assert_eq!(listing(root.path()), ["images", "labels"]);
            assert_eq!(fs::read(&img).unwrap().starts_with(&[0x1f, 0x8b]), gzip);
            let back = idx::read_idx_images(&img).unwrap();
            assert_eq!((back.len, back.rows, back.cols), (6, 7, 3));
            assert_eq!(back.pixels, images);
            assert_eq!(idx::read_idx_labels(&lbl).unwrap().labels, labels);
        }
    }

    #[test]
    fn existing_final_paths_are_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tree");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("keep.txt"), "precious").unwrap();
        let err = write_png_tree(&dir, &[1; 4], &[0], (1, 2, 2), &names(&["a"])).unwrap_err();
        assert!(matches!(err, DataError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: already exists; not overwriting", dir.display())
        );
        assert_eq!(listing(&dir), ["keep.txt"]);
        assert_eq!(
            fs::read_to_string(dir.join("keep.txt")).unwrap(),
            "precious"
        );

        // Even an empty directory, which `rename` would happily replace.
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(matches!(
            write_png_tree(&empty, &[1; 4], &[0], (1, 2, 2), &names(&["a"])),
            Err(DataError::AlreadyExists { .. })
        ));

        let (img, lbl) = (root.path().join("i.gz"), root.path().join("l.gz"));
        fs::write(&lbl, "old labels").unwrap();
        let err = write_idx_pair(&img, &lbl, &[1; 4], &[0], 2, 2, true).unwrap_err();
        assert!(err.to_string().contains("l.gz: already exists"), "{err}");
        assert_eq!(fs::read_to_string(&lbl).unwrap(), "old labels");
        assert!(!img.exists(), "the images file is not written either");
        assert_eq!(listing(root.path()), ["empty", "l.gz", "tree"]);
    }

    #[test]
    fn an_error_midway_leaves_neither_final_path_nor_temporary() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tree");
        // Two images are written before the third's label turns out to be bad.
        let err =
            write_png_tree(&dir, &[7; 12], &[0, 1, 5], (1, 2, 2), &names(&["a", "b"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: cannot export: example 2 has label 5, but only 2 class names are given",
                dir.display()
            )
        );
        assert!(
            listing(root.path()).is_empty(),
            "{:?}",
            listing(root.path())
        );

        // IDX: a dimension too large for the header fails inside the writer, after the
        // temporary exists (0 images of 2^32 rows is a consistent, empty buffer).
        #[cfg(target_pointer_width = "64")]
        {
            let (img, lbl) = (root.path().join("i"), root.path().join("l"));
            let err = write_idx_pair(&img, &lbl, &[], &[], 1 << 32, 1, false).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("{}: dimension 4294967296", img.display())),
                "{err}"
            );
            assert!(
                listing(root.path()).is_empty(),
                "{:?}",
                listing(root.path())
            );
        }
    }

    #[test]
    fn a_failed_second_rename_takes_the_first_file_back() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("sub")).unwrap();
        // Two spellings of one file: both absent at the check, the labels' rename then
        // finds the images file there.
        let img = root.path().join("pair");
        let lbl = root.path().join("sub/../pair");
        let err = write_idx_pair(&img, &lbl, &[1; 4], &[0], 2, 2, false).unwrap_err();
        assert!(matches!(err, DataError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(listing(root.path()), ["sub"], "no pair, no temporaries");
    }

    #[test]
    fn bad_inputs_are_rejected_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tree");
        let tree = |names_: &[&str], shape, images: &[u8], labels: &[u8]| {
            write_png_tree(&dir, images, labels, shape, &names(names_))
                .unwrap_err()
                .to_string()
        };
        let msg = tree(&["b", "a"], (1, 1, 1), &[0], &[0]);
        assert!(
            msg.contains("strictly ascending in byte order") && msg.contains("\"b\" (label 0)"),
            "{msg}"
        );
        assert!(tree(&["a", "a"], (1, 1, 1), &[0], &[0]).contains("strictly ascending"));
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            let msg = tree(&[bad], (1, 1, 1), &[0], &[0]);
            assert!(msg.contains("not a plain folder name"), "{bad:?}: {msg}");
        }
        assert!(tree(&[], (1, 1, 1), &[0], &[0]).contains("no class names"));
        assert!(tree(&["a"], (2, 1, 1), &[0, 0], &[0]).contains("2 channels"));
        assert!(tree(&["a"], (1, 2, 2), &[0; 3], &[0]).contains("need 4 bytes"));
        assert!(tree(&["a"], (1, 2, 2), &[], &[]).contains("no images to write"));

        let (img, lbl) = (root.path().join("i"), root.path().join("l"));
        let msg = write_idx_pair(&img, &lbl, &[0; 5], &[0], 2, 2, false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("1 labels need 1×2×2 = 4 bytes of pixels, got 5"),
            "{msg}"
        );
        assert!(
            write_idx_pair(&img, &img, &[0; 4], &[0], 2, 2, false)
                .unwrap_err()
                .to_string()
                .contains("same file")
        );
        assert!(listing(root.path()).is_empty());
    }
}
