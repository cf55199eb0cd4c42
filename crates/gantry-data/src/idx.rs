//! Reading and writing IDX files (the MNIST format).
//!
//! An IDX file is a big-endian header followed by raw data:
//!
//! | kind   | magic | header                         | data                    |
//! | ------ | ----- | ------------------------------ | ----------------------- |
//! | images | 2051  | magic, N, rows, cols (`u32`s)  | `N × rows × cols` bytes |
//! | labels | 2049  | magic, N (`u32`s)              | `N` bytes               |
//!
//! The magic's low bytes encode the element type (`0x08` = `u8`) and the
//! number of dimensions, so 2051 = `0x0803` and 2049 = `0x0801`. Files are
//! usually gzip-compressed; the parsers detect that from the gzip signature
//! rather than the file name, because caches and mirrors rename files.
//!
//! Every parser takes a display name for the file, used only in error
//! messages, so that an error says which of several files is damaged.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use crate::DataError;

/// Magic number of an IDX file of `u8` with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const GZIP_SIGNATURE: [u8; 2] = [0x1f, 0x8b];

/// Caps the up-front allocation, so that a corrupt header claiming terabytes
/// fails on the length check instead of on allocation.
const MAX_PREALLOC: u64 = 64 << 20;

/// The contents of an IDX image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// The display name the file was parsed under.
    pub source: String,
    /// Number of images.
    pub len: usize,
    pub rows: usize,
    pub cols: usize,
    /// `len × rows × cols` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

/// The contents of an IDX label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxLabels {
    /// The display name the file was parsed under.
    pub source: String,
    /// One byte per example.
    pub labels: Vec<u8>,
}

/// Parses an IDX image file (raw or gzip) held in memory.
pub fn parse_idx_images(name: &str, bytes: &[u8]) -> Result<IdxImages, DataError> {
    let mut input = Input::new(name, bytes);
    let dims = read_header(&mut input, Kind::Images)?;
    let (len, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadHeader {
            name: name.to_owned(),
            reason: format!("images of {rows}×{cols} pixels"),
        });
    }
    let pixels = read_body(&mut input, Kind::Images, &dims)?;
    Ok(IdxImages {
        source: name.to_owned(),
        len: to_usize(len),
        rows: to_usize(rows),
        cols: to_usize(cols),
        pixels,
    })
}

/// Parses an IDX label file (raw or gzip) held in memory.
pub fn parse_idx_labels(name: &str, bytes: &[u8]) -> Result<IdxLabels, DataError> {
    let mut input = Input::new(name, bytes);
    let dims = read_header(&mut input, Kind::Labels)?;
    let labels = read_body(&mut input, Kind::Labels, &dims)?;
    Ok(IdxLabels {
        source: name.to_owned(),
        labels,
    })
}

/// Reads and parses an IDX image file; errors name the file by its path.
pub fn read_idx_images(path: &Path) -> Result<IdxImages, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path.display(), e))?;
    parse_idx_images(&path.display().to_string(), &bytes)
}

/// Reads and parses an IDX label file; errors name the file by its path.
pub fn read_idx_labels(path: &Path) -> Result<IdxLabels, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path.display(), e))?;
    parse_idx_labels(&path.display().to_string(), &bytes)
}

/// Writes `n` images of `rows × cols` `u8` pixels as an IDX image file,
/// gzip-compressed if `gzip`.
///
/// The writer is not buffered here; wrap files in a `BufWriter`
/// (or use [`write_idx_images_file`]).
pub fn write_idx_images<W: Write>(
    writer: W,
    images: &[u8],
    n: usize,
    rows: usize,
    cols: usize,
    gzip: bool,
) -> Result<(), DataError> {
    write_images_named("IDX writer", writer, images, n, rows, cols, gzip)
}

/// Writes an IDX image file at `path` (see [`write_idx_images`]).
pub fn write_idx_images_file(
    path: &Path,
    images: &[u8],
    n: usize,
    rows: usize,
    cols: usize,
    gzip: bool,
) -> Result<(), DataError> {
    let name = path.display().to_string();
    let file = File::create(path).map_err(|e| DataError::io(&name, e))?;
    write_images_named(&name, BufWriter::new(file), images, n, rows, cols, gzip)
}

/// Writes labels as an IDX label file, gzip-compressed if `gzip`.
pub fn write_idx_labels<W: Write>(writer: W, labels: &[u8], gzip: bool) -> Result<(), DataError> {
    write_labels_named("IDX writer", writer, labels, gzip)
}

/// Writes an IDX label file at `path` (see [`write_idx_labels`]).
pub fn write_idx_labels_file(path: &Path, labels: &[u8], gzip: bool) -> Result<(), DataError> {
    let name = path.display().to_string();
    let file = File::create(path).map_err(|e| DataError::io(&name, e))?;
    write_labels_named(&name, BufWriter::new(file), labels, gzip)
}

fn write_images_named<W: Write>(
    name: &str,
    writer: W,
    images: &[u8],
    n: usize,
    rows: usize,
    cols: usize,
    gzip: bool,
) -> Result<(), DataError> {
    let expected = n.checked_mul(rows).and_then(|v| v.checked_mul(cols));
    if expected != Some(images.len()) {
        return Err(DataError::Shape {
            name: name.to_owned(),
            reason: format!(
                "{n}×{rows}×{cols} images need {} bytes, got {}",
                n as u128 * rows as u128 * cols as u128,
                images.len()
            ),
        });
    }
    let header = [
        IMAGES_MAGIC,
        header_u32(name, n)?,
        header_u32(name, rows)?,
        header_u32(name, cols)?,
    ];
    write_idx(name, writer, &header, images, gzip)
}

fn write_labels_named<W: Write>(
    name: &str,
    writer: W,
    labels: &[u8],
    gzip: bool,
) -> Result<(), DataError> {
    let header = [LABELS_MAGIC, header_u32(name, labels.len())?];
    write_idx(name, writer, &header, labels, gzip)
}

fn header_u32(name: &str, v: usize) -> Result<u32, DataError> {
    u32::try_from(v).map_err(|_| DataError::Shape {
        name: name.to_owned(),
        reason: format!("dimension {v} does not fit the IDX header's u32"),
    })
}

fn write_idx<W: Write>(
    name: &str,
    writer: W,
    header: &[u32],
    data: &[u8],
    gzip: bool,
) -> Result<(), DataError> {
    let io_err = |e| DataError::io(name, e);
    fn put<W: Write>(mut w: W, header: &[u32], data: &[u8]) -> io::Result<W> {
        for v in header {
            w.write_all(&v.to_be_bytes())?;
        }
        w.write_all(data)?;
        Ok(w)
    }
    if gzip {
        let encoder =
            put(GzEncoder::new(writer, Compression::default()), header, data).map_err(io_err)?;
        // `finish` writes the gzip trailer; dropping the encoder would hide
        // any error while doing so.
        encoder.finish().map_err(io_err)?.flush().map_err(io_err)
    } else {
        put(writer, header, data)
            .map_err(io_err)?
            .flush()
            .map_err(io_err)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Images,
    Labels,
}

impl Kind {
    fn magic(self) -> u32 {
        match self {
            Kind::Images => IMAGES_MAGIC,
            Kind::Labels => LABELS_MAGIC,
        }
    }
    fn ndims(self) -> usize {
        match self {
            Kind::Images => 3,
            Kind::Labels => 1,
        }
    }
    fn file_kind(self) -> &'static str {
        match self {
            Kind::Images => "images",
            Kind::Labels => "labels",
        }
    }
    fn data_kind(self) -> &'static str {
        match self {
            Kind::Images => "pixels",
            Kind::Labels => "labels",
        }
    }
}

/// The file's decompressed byte stream, tagged with its display name so that
/// read errors become gzip errors naming the file.
struct Input<'a> {
    name: &'a str,
    reader: Box<dyn Read + 'a>,
    gzip: bool,
}

impl<'a> Input<'a> {
    fn new(name: &'a str, bytes: &'a [u8]) -> Self {
        let gzip = bytes.starts_with(&GZIP_SIGNATURE);
        // Streaming through the decoder (instead of inflating everything
        // first) lets the body reader stop one byte past the announced size,
        // so a file with megabytes of trailing junk costs no extra memory.
        let reader: Box<dyn Read + 'a> = if gzip {
            Box::new(MultiGzDecoder::new(bytes))
        } else {
            Box::new(bytes)
        };
        Input { name, reader, gzip }
    }

    /// Fills as much of `buf` as the stream allows; returns the count.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(filled)
    }

    fn error(&self, source: io::Error) -> DataError {
        if self.gzip {
            DataError::Gzip {
                name: self.name.to_owned(),
                source,
            }
        } else {
            DataError::io(self.name, source)
        }
    }
}

/// Reads and validates the header; returns the dimensions.
fn read_header(input: &mut Input<'_>, kind: Kind) -> Result<Vec<u32>, DataError> {
    let header_len = 4 * (1 + kind.ndims());
    let mut header = vec![0u8; header_len];
    let got = input.fill(&mut header)?;
    let truncated = || DataError::TruncatedHeader {
        name: input.name.to_owned(),
        kind: kind.file_kind(),
        expected: header_len,
        found: got,
    };
    if got < 4 {
        return Err(truncated());
    }
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if magic != kind.magic() {
        let hint = match (kind, magic) {
            (Kind::Images, LABELS_MAGIC) => " (this looks like a label file)",
            (Kind::Labels, IMAGES_MAGIC) => " (this looks like an image file)",
            _ => "",
        };
        return Err(DataError::BadMagic {
            name: input.name.to_owned(),
            kind: kind.file_kind(),
            expected: kind.magic(),
            found: magic,
            hint,
        });
    }
    if got < header_len {
        return Err(truncated());
    }
    Ok(header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads exactly the number of bytes the dimensions announce, and checks that
/// nothing follows them.
fn read_body(input: &mut Input<'_>, kind: Kind, dims: &[u32]) -> Result<Vec<u8>, DataError> {
    // u32 dimensions multiply to at most 2^96, so u128 cannot overflow.
    let expected: u128 = dims.iter().map(|&d| u128::from(d)).product();
    let dims_text = dims
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("×");
    let expected = u64::try_from(expected)
        .ok()
        .filter(|&e| usize::try_from(e).is_ok())
        .ok_or_else(|| DataError::BadHeader {
            name: input.name.to_owned(),
            reason: format!("{dims_text} {} do not fit in memory", kind.data_kind()),
        })?;

    let mut data = Vec::with_capacity(expected.min(MAX_PREALLOC) as usize);
    // One byte more than announced: reading it is how trailing bytes are noticed.
    let mut limited = (&mut input.reader).take(expected + 1);
    let read = limited.read_to_end(&mut data);
    read.map_err(|e| input.error(e))?;
    let found = data.len() as u64;
    if found < expected {
        return Err(DataError::TruncatedData {
            name: input.name.to_owned(),
            dims: dims_text,
            kind: kind.data_kind(),
            expected,
            found,
        });
    }
    if found > expected {
        // Count the rest without keeping it, for an exact figure in the error.
        let rest = io::copy(&mut input.reader, &mut io::sink()).map_err(|e| input.error(e))?;
        return Err(DataError::TrailingBytes {
            name: input.name.to_owned(),
            dims: dims_text,
            kind: kind.data_kind(),
            expected,
            extra: found - expected + rest,
        });
    }
    Ok(data)
}

fn to_usize(v: u32) -> usize {
    // The body was already read into memory, so every dimension fits.
    v as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images_file(n: usize, rows: usize, cols: usize, gzip: bool) -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..n * rows * cols).map(|i| (i * 7 % 256) as u8).collect();
        let mut out = Vec::new();
        write_idx_images(&mut out, &pixels, n, rows, cols, gzip).unwrap();
        (pixels, out)
    }

    fn labels_file(labels: &[u8], gzip: bool) -> Vec<u8> {
        let mut out = Vec::new();
        write_idx_labels(&mut out, labels, gzip).unwrap();
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn good_images_round_trip_raw_and_gzip() {
        for gz in [false, true] {
            let (pixels, file) = images_file(5, 3, 4, gz);
            assert_eq!(file.starts_with(&GZIP_SIGNATURE), gz);
            let parsed = parse_idx_images("x", &file).unwrap();
            assert_eq!((parsed.len, parsed.rows, parsed.cols), (5, 3, 4));
            assert_eq!(parsed.pixels, pixels);
            assert_eq!(parsed.source, "x");
        }
    }

    #[test]
    fn raw_header_layout_is_big_endian() {
        let (_, file) = images_file(2, 3, 4, false);
        assert_eq!(
            &file[..16],
            &[0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]
        );
        assert_eq!(file.len(), 16 + 24);
        let labels = labels_file(&[1, 2, 3], false);
        assert_eq!(labels, [0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]);
    }

    #[test]
    fn good_labels_round_trip_raw_and_gzip() {
        for gz in [false, true] {
            let parsed = parse_idx_labels("l", &labels_file(&[3, 1, 4, 1, 5], gz)).unwrap();
            assert_eq!(parsed.labels, [3, 1, 4, 1, 5]);
        }
    }

    #[test]
    fn files_round_trip_through_paths() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.gz");
        let lbl = dir.path().join("l.gz");
        let pixels = [9u8; 2 * 2 * 2];
        write_idx_images_file(&img, &pixels, 2, 2, 2, true).unwrap();
        write_idx_labels_file(&lbl, &[7, 8], true).unwrap();
        assert_eq!(read_idx_images(&img).unwrap().pixels, pixels);
        assert_eq!(read_idx_labels(&lbl).unwrap().labels, [7, 8]);

        let missing = dir.path().join("missing.gz");
        let err = read_idx_images(&missing).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.gz"), "{err}");
    }

    #[test]
    fn writer_rejects_wrong_pixel_count() {
        let err = write_idx_images(Vec::new(), &[0; 10], 2, 2, 2, false).unwrap_err();
        assert!(matches!(err, DataError::Shape { .. }), "{err:?}");
        assert!(err.to_string().contains("need 8 bytes, got 10"), "{err}");
    }

    #[test]
    fn wrong_magic_is_rejected_with_a_hint() {
        let labels = labels_file(&[1, 2], true);
        let err = parse_idx_images("labels-as-images.gz", &labels).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    found: 2049,
                    expected: 2051,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("labels-as-images.gz: bad magic"), "{msg}");
        assert!(msg.contains("looks like a label file"), "{msg}");

        let mut junk = images_file(1, 1, 1, false).1;
        junk[2] = 0x0d; // a float32 IDX file
        let err = parse_idx_images("f32.idx", &junk).unwrap_err();
        assert!(
            matches!(err, DataError::BadMagic { found: 0x0d03, .. }),
            "{err:?}"
        );
        let err = parse_idx_labels("img.idx", &images_file(1, 1, 1, false).1).unwrap_err();
        assert!(
            err.to_string().contains("looks like an image file"),
            "{err}"
        );
    }

    #[test]
    fn truncated_header_is_rejected() {
        let (_, file) = images_file(2, 2, 2, false);
        for cut in [0, 3, 4, 15] {
            let err = parse_idx_images("short", &file[..cut]).unwrap_err();
            assert!(
                matches!(err, DataError::TruncatedHeader { expected: 16, found, .. } if found == cut),
                "cut {cut}: {err:?}"
            );
        }
        // Same through gzip: the decompressed stream is what is short.
        let err = parse_idx_images("short.gz", &gzip(&file[..10])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "short.gz: truncated header: IDX images header is 16 bytes, found 10"
        );
        let err = parse_idx_labels("l", &labels_file(&[1], false)[..6]).unwrap_err();
        assert!(matches!(
            err,
            DataError::TruncatedHeader {
                expected: 8,
                found: 6,
                ..
            }
        ));
    }

    #[test]
    fn truncated_data_is_rejected_with_the_sizes() {
        let (_, file) = images_file(10, 28, 28, false);
        let cut = 16 + 1234;
        let err =
            parse_idx_images("mnist-10k-images-idx3-ubyte.gz", &gzip(&file[..cut])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mnist-10k-images-idx3-ubyte.gz: truncated: header says 10×28×28 = 7840 bytes of pixels, found 1234"
        );
        let labels = labels_file(&[1, 2, 3], false);
        let err = parse_idx_labels("l", &labels[..labels.len() - 1]).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TruncatedData {
                    expected: 3,
                    found: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected_with_the_count() {
        let (_, mut file) = images_file(2, 2, 2, false);
        file.extend_from_slice(&[0; 5]);
        let err = parse_idx_images("long.gz", &gzip(&file)).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TrailingBytes {
                    expected: 8,
                    extra: 5,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("long.gz: 5 trailing bytes"),
            "{err}"
        );
        let mut labels = labels_file(&[1], false);
        labels.push(0);
        let err = parse_idx_labels("l", &labels).unwrap_err();
        assert!(
            matches!(err, DataError::TrailingBytes { extra: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn zero_sized_images_are_rejected() {
        let mut file = images_file(1, 1, 1, false).1;
        file[8..12].copy_from_slice(&0u32.to_be_bytes());
        let err = parse_idx_images("flat", &file[..16]).unwrap_err();
        assert!(matches!(err, DataError::BadHeader { .. }), "{err:?}");
    }

    #[test]
    fn corrupt_gzip_is_rejected() {
        let (_, file) = images_file(4, 8, 8, true);
        // Flip a byte in the deflate body: either the inflater or the CRC
        // check must notice.
        let mut flipped = file.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        let err = parse_idx_images("bad.gz", &flipped).unwrap_err();
        assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with("bad.gz: corrupt gzip stream"),
            "{err}"
        );

        // A gzip file cut short is also a gzip error, not silently short data.
        let err = parse_idx_images("cut.gz", &file[..file.len() - 4]).unwrap_err();
        assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    }
}
