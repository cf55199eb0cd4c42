//! TensorBoard event files: the run as `tensorboard --logdir runs/` shows it.
//!
//! Rank 0 writes, beside `metrics.jsonl`:
//!
//! ```text
//! tensorboard/events.out.tfevents.SSSSSSSSSS.HOST.PID   one file per start of the run
//! ```
//!
//! | tag | value | when |
//! | --- | --- | --- |
//! | `train/NAME` | every key of a `metrics.jsonl` row but `step` (the family's statistics, `images_per_second`, `wall_seconds`) | logging steps |
//! | `phase_seconds/PHASE` | rank 0's seconds in each phase of that step | logging steps of a worker that measures them |
//! | `gradient_norm/NETWORK` | L2 norm of the group-averaged gradient | the same |
//! | `quality/NAME` | every figure of a `quality.jsonl` row that was measured | evaluations |
//! | `samples/grid`, `samples/reconstruction` | the PNGs of `samples/`, byte for byte | sample steps |
//!
//! Scalars are `simple_value`s (32-bit floats, as every TensorBoard writer stores them).
//! Each file is a sequence of TFRecords (u64 length, masked CRC32C of the length, an encoded
//! [`proto::Event`], masked CRC32C of the event; little-endian) whose first two events are
//! `file_version = "brain.Event:2"` and a `SessionLog` START at the first step the file may
//! hold.
//!
//! Restarts. A fresh run removes the events files of a run it replaces (as it truncates
//! `metrics.jsonl`). A run resumed from the checkpoint of step `c` keeps the earlier files and
//! starts a new one whose START is at step `c + 1`: TensorBoard then drops every event of the
//! earlier files at step `c + 1` or later (its Python loader at the START event; its fast
//! loader, tensorboard-data-server, per series, when the series' step comes round again), so
//! what it shows matches `metrics.jsonl`, which keeps its rows up to `c`. File names sort in
//! the order they are written, because TensorBoard reads a directory's files in name order.
//!
//! Cost: every value is one the loop already holds on the host, so nothing here touches the
//! device; a logging step costs one buffered write and one flush.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use prost::Message;

use crate::run_dir::{MetricsRow, QualityReport};

/// The TensorFlow event messages Gantry writes (generated from `proto/tensorboard.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
}

use proto::summary::{Image, Value, value};
use proto::{Event, SessionLog, Summary, event::What, session_log::SessionStatus};

/// The folder of the run directory that holds the events files.
pub const DIR: &str = "tensorboard";
/// Every events file's name starts so (TensorBoard's readers look for `tfevents`).
pub const FILE_PREFIX: &str = "events.out.tfevents.";
/// The record format version TensorBoard's restart detection expects.
const FILE_VERSION: &str = "brain.Event:2";
/// Image tag of the fixed-latent sample grid (`samples/step-NNNNNNNN.png`).
pub const SAMPLES_TAG: &str = "samples/grid";
/// Image tag of the originals-and-reconstructions grid (`samples/reconstruction-NNNNNNNN.png`).
pub const RECONSTRUCTION_TAG: &str = "samples/reconstruction";

/// What a logged step shows beyond its `metrics.jsonl` row. The loop fills it only where it
/// measures these anyway (a worker that exports metrics): TensorBoard adds no device work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepDetail {
    /// Rank 0's seconds in each phase of the step, by [`gantry_models::phases::Phase::name`].
    pub phases: Vec<(&'static str, f64)>,
    /// L2 norm of each part's group-averaged gradient of the step.
    pub gradient_norms: Vec<(&'static str, f64)>,
}

/// Rank 0's event stream of a run.
#[derive(Debug)]
pub struct TensorBoard {
    events: EventWriter,
}

impl TensorBoard {
    /// Starts the event stream of a fresh run in `dir`, first removing the events files of a
    /// run this one replaces.
    pub fn create(dir: &Path) -> Result<Self> {
        let mut removed = 0;
        for name in events_files(dir)? {
            let path = dir.join(&name);
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                "removed {removed} TensorBoard events file(s) of the run replaced in {}",
                dir.display()
            );
        }
        Ok(Self {
            events: EventWriter::create(dir, 0)?,
        })
    }

    /// Continues the event stream of a run resumed from the checkpoint of `step`: a new file
    /// whose START at `step + 1` makes TensorBoard drop the events earlier files hold after
    /// `step` (those steps are trained again).
    pub fn resume(dir: &Path, step: u64) -> Result<Self> {
        Ok(Self {
            events: EventWriter::create(dir, step + 1)?,
        })
    }

    /// The events file being written.
    pub fn path(&self) -> &Path {
        &self.events.path
    }

    /// The scalars of one logged step: its `metrics.jsonl` row and `detail`.
    pub fn metrics(&mut self, row: &MetricsRow, detail: &StepDetail) -> Result<()> {
        let mut values: Vec<(String, f64)> = row
            .statistics
            .iter()
            .map(|(name, value)| (format!("train/{name}"), *value))
            .collect();
        values.push(("train/images_per_second".into(), row.images_per_second));
        values.push(("train/wall_seconds".into(), row.wall_seconds));
        values.extend(
            detail
                .phases
                .iter()
                .map(|(phase, seconds)| (format!("phase_seconds/{phase}"), *seconds)),
        );
        values.extend(
            detail
                .gradient_norms
                .iter()
                .map(|(network, norm)| (format!("gradient_norm/{network}"), *norm)),
        );
        self.scalars(row.step, &values)
    }

    /// The figures of one evaluation, named as in `quality.jsonl`. Figures that were not
    /// measured (NaN, absent) and the class histogram are left out.
    pub fn quality(&mut self, step: u64, report: &QualityReport) -> Result<()> {
        let serde_json::Value::Object(fields) = serde_json::to_value(report)? else {
            bail!("a quality report serialises to a JSON object");
        };
        let values: Vec<(String, f64)> = fields
            .iter()
            .filter_map(|(name, value)| Some((format!("quality/{name}"), value.as_f64()?)))
            .filter(|(_, value)| value.is_finite())
            .collect();
        self.scalars(step, &values)
    }

    /// One image summary of an encoded PNG (its bytes are stored as they are).
    pub fn image(&mut self, step: u64, tag: &str, png: &[u8]) -> Result<()> {
        let (width, height, colorspace) = png_header(png)?;
        let image = Image {
            height,
            width,
            colorspace,
            encoded_image_string: png.to_vec(),
        };
        self.summary(
            step,
            vec![Value {
                tag: tag.to_owned(),
                value: Some(value::Value::Image(image)),
            }],
        )
    }

    fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let values = values
            .iter()
            .map(|(tag, value)| Value {
                tag: tag.clone(),
                value: Some(value::Value::SimpleValue(*value as f32)),
            })
            .collect();
        self.summary(step, values)
    }

    fn summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        if value.is_empty() {
            return Ok(());
        }
        self.events.write(step, What::Summary(Summary { value }))?;
        // Flushed at once: TensorBoard shows the step while training goes on, and a crash
        // loses at most the record being written (readers stop at a torn last record).
        self.events.flush()
    }
}

/// Writes one events file, record by record.
#[derive(Debug)]
struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Reused encoding buffers.
    encoded: Vec<u8>,
    record: Vec<u8>,
}

impl EventWriter {
    /// Creates a new events file in `dir` (named to sort after every one there) with its
    /// `file_version` and a SessionLog START at `first_step`.
    fn create(dir: &Path, first_step: u64) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(next_file_name(dir, unix_seconds())?);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
            encoded: Vec::new(),
            record: Vec::new(),
        };
        writer.write(first_step, What::FileVersion(FILE_VERSION.to_owned()))?;
        let start = SessionLog {
            status: SessionStatus::Start.into(),
            ..SessionLog::default()
        };
        writer.write(first_step, What::SessionLog(start))?;
        writer.flush()?;
        Ok(writer)
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let event = Event {
            wall_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            step: i64::try_from(step).context("step beyond TensorBoard's int64")?,
            what: Some(what),
        };
        self.encoded.clear();
        event.encode(&mut self.encoded)?;
        self.record.clear();
        frame_record(&self.encoded, &mut self.record);
        self.out
            .write_all(&self.record)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Appends one TFRecord holding `data` to `out`.
pub fn frame_record(data: &[u8], out: &mut Vec<u8>) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// TFRecord's checksum: CRC32C, rotated right by 15 bits, plus a constant (so that a CRC of
/// data that embeds CRCs stays well distributed).
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// Names of the events files in `dir` (none if it does not exist), sorted.
fn events_files(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(FILE_PREFIX)
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// TensorFlow's name for a new events file (`events.out.tfevents.SECONDS.HOST.PID`), with
/// SECONDS moved past the newest file's in `dir` when it would not sort after it (TensorBoard
/// never reads a file that sorts before one it has read; a resume within the same second
/// would otherwise be ordered by its process id).
fn next_file_name(dir: &Path, now: u64) -> Result<String> {
    let host: String = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let newest = events_files(dir)?.pop();
    let seconds = match newest.as_deref().and_then(name_seconds) {
        Some(newest) => now.max(newest + 1),
        None => now,
    };
    let name = format!("{FILE_PREFIX}{seconds:010}.{host}.{}", std::process::id());
    if let Some(newest) = newest
        && name <= newest
    {
        bail!(
            "cannot name a TensorBoard events file in {} that sorts after {newest}",
            dir.display()
        );
    }
    Ok(name)
}

/// The SECONDS field of an events file's name.
fn name_seconds(name: &str) -> Option<u64> {
    name.strip_prefix(FILE_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Width, height and TensorBoard colorspace of an encoded PNG, from its header.
fn png_header(png: &[u8]) -> Result<(i32, i32, i32)> {
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .context("reading a sample grid's PNG header")?;
    let info = reader.info();
    let colorspace = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb | png::ColorType::Indexed => 3,
        png::ColorType::Rgba => 4,
    };
    Ok((
        i32::try_from(info.width).context("PNG width")?,
        i32::try_from(info.height).context("PNG height")?,
        colorspace,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The events of a file, checking every record's framing and checksums.
    fn read_events(path: &Path) -> Vec<Event> {
        let bytes = fs::read(path).unwrap();
        let mut rest = bytes.as_slice();
        let mut events = Vec::new();
        while !rest.is_empty() {
            let (length, tail) = rest.split_at(8);
            let (length_crc, tail) = tail.split_at(4);
            assert_eq!(
                masked_crc32c(length).to_le_bytes(),
                length_crc,
                "length CRC"
            );
            let n = u64::from_le_bytes(length.try_into().unwrap()) as usize;
            let (data, tail) = tail.split_at(n);
            let (data_crc, tail) = tail.split_at(4);
            assert_eq!(masked_crc32c(data).to_le_bytes(), data_crc, "data CRC");
            events.push(Event::decode(data).unwrap());
            rest = tail;
        }
        events
    }

    fn only_file(dir: &Path) -> PathBuf {
        let files = events_files(dir).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        dir.join(&files[0])
    }

    #[test]
    #[allow(clippy::manual_rotate)] // spelled as TensorFlow's crc32c::Mask spells it
    fn masked_crc_matches_tensorflow() {
        // CRC32C("123456789") = 0xE3069283 (the check value of the Castagnoli polynomial),
        // masked as TensorFlow's crc32c::Mask does. (TensorBoard's reader checks both CRCs
        // of every record in tests/tensorboard.rs.)
        let crc: u32 = 0xE306_9283;
        let masked = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), masked);
    }

    #[test]
    fn a_fresh_stream_starts_with_its_version_and_a_start_then_holds_scalars_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::create(dir.path()).unwrap();
        let row = MetricsRow {
            step: 10,
            statistics: BTreeMap::from([("d_loss".to_owned(), 1.25), ("g_loss".to_owned(), 0.5)]),
            images_per_second: 640.0,
            wall_seconds: 2.0,
        };
        let detail = StepDetail {
            phases: vec![("data", 0.001)],
            gradient_norms: vec![("generator", 3.0)],
        };
        tb.metrics(&row, &detail).unwrap();
        let png = crate::samples::grid_png(&[7; 2 * 3 * 4 * 4], [3, 4, 4], 2).unwrap();
        tb.image(10, SAMPLES_TAG, &png).unwrap();

        let events = read_events(&only_file(dir.path()));
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(events[0].step, 0);
        let Some(What::SessionLog(start)) = &events[1].what else {
            panic!("{:?}", events[1]);
        };
        assert_eq!(start.status(), SessionStatus::Start);
        assert_eq!(events[1].step, 0);

        let Some(What::Summary(scalars)) = &events[2].what else {
            panic!("{:?}", events[2]);
        };
        assert_eq!(events[2].step, 10);
        let found: Vec<(&str, f32)> = scalars
            .value
            .iter()
            .map(|v| match &v.value {
                Some(value::Value::SimpleValue(x)) => (v.tag.as_str(), *x),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            found,
            [
                ("train/d_loss", 1.25),
                ("train/g_loss", 0.5),
                ("train/images_per_second", 640.0),
                ("train/wall_seconds", 2.0),
                ("phase_seconds/data", 0.001),
                ("gradient_norm/generator", 3.0),
            ]
        );

        let Some(What::Summary(images)) = &events[3].what else {
            panic!("{:?}", events[3]);
        };
        let Some(value::Value::Image(image)) = &images.value[0].value else {
            panic!("{images:?}");
        };
        assert_eq!(images.value[0].tag, SAMPLES_TAG);
        assert_eq!(image.encoded_image_string, png);
        // Two 4×4 RGB tiles side by side with 2-pixel gaps, doubled: 28 × 16.
        assert_eq!((image.width, image.height, image.colorspace), (28, 16, 3));
    }

    #[test]
    fn quality_keeps_the_measured_figures_under_their_quality_jsonl_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::create(dir.path()).unwrap();
        let report = QualityReport {
            fid: 12.5,
            fid_initial: f64::NAN,
            inception_score: 7.0,
            classes_covered: 9,
            class_histogram: [1; 10],
            samples: 10,
            classifier_accuracy: 0.98,
            heldout_neg_elbo_nats: None,
            heldout_nll_nats: None,
            bits_per_dim: None,
            label_accuracy: None,
        };
        tb.quality(40, &report).unwrap();
        let events = read_events(&only_file(dir.path()));
        let Some(What::Summary(summary)) = &events[2].what else {
            panic!("{:?}", events[2]);
        };
        let mut tags: Vec<&str> = summary.value.iter().map(|v| v.tag.as_str()).collect();
        tags.sort();
        assert_eq!(
            tags,
            [
                "quality/classes_covered",
                "quality/classifier_accuracy",
                "quality/fid",
                "quality/inception_score",
                "quality/samples",
            ]
        );
    }

    #[test]
    fn a_resumed_stream_is_a_new_later_file_starting_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let first = TensorBoard::create(dir.path()).unwrap().path().to_owned();
        // Within the same second and process: the new name must still sort after.
        let second = TensorBoard::resume(dir.path(), 20)
            .unwrap()
            .path()
            .to_owned();
        assert!(
            second > first,
            "{} !> {}",
            second.display(),
            first.display()
        );
        let events = read_events(&second);
        assert_eq!(
            (events[0].step, events[1].step),
            (21, 21),
            "the START just after the checkpoint's step"
        );
        assert!(matches!(events[1].what, Some(What::SessionLog(_))));
        assert_eq!(events_files(dir.path()).unwrap().len(), 2);

        // A fresh run replaces both.
        let fresh = TensorBoard::create(dir.path()).unwrap().path().to_owned();
        assert_eq!(only_file(dir.path()), fresh);
    }

    #[test]
    fn names_sort_after_a_newer_file_from_another_clock() {
        let dir = tempfile::tempdir().unwrap();
        let later = format!("{FILE_PREFIX}9000000000.other-host.1");
        fs::write(dir.path().join(&later), b"").unwrap();
        let name = next_file_name(dir.path(), 1_700_000_000).unwrap();
        assert!(name > later, "{name}");
        assert_eq!(name_seconds(&name), Some(9_000_000_001));
    }
}
