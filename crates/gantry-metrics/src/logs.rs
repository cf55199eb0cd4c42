//! Logging for every Gantry binary: `tracing` events on stderr, as text for people or as
//! JSON lines for log collectors.
//!
//! A binary calls [`init`] once, first thing, with the format its `--log-format` flag chose:
//!
//! ```no_run
//! use gantry_metrics::logs::{self, LogFormat};
//!
//! # fn main() -> Result<(), gantry_metrics::MetricsError> {
//! logs::init(LogFormat::Text)?;
//! tracing::info!("worker: metrics on http://127.0.0.1:9091/metrics");
//! # Ok(())
//! # }
//! ```
//!
//! `RUST_LOG` chooses what is shown (`EnvFilter` directives such as `debug` or
//! `info,gantry_worker=debug`; `info` when unset, invalid directives are reported and
//! skipped). Text is one line per event: time, level, message, then the event's fields, in
//! colour only when stderr is a terminal and `NO_COLOR` is unset. JSON is one object per
//! line with `timestamp`, `level`, `message`, the event's fields and `target` at the top level.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use tracing::Dispatch;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::MetricsError;

/// How log events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LogFormat {
    type Err = MetricsError;

    /// `text` or `json`, in any case (what `--log-format` and `GANTRY_LOG_FORMAT` accept).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Text, Self::Json]
            .into_iter()
            .find(|format| format.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| MetricsError::LogFormat(s.to_owned()))
    }
}

/// Installs the process-wide subscriber: events filtered by `RUST_LOG` (default `info`),
/// written to stderr in `format`. Events of the `log` crate are forwarded to it too.
///
/// Fails only when a subscriber is already installed, i.e. when called twice.
pub fn init(format: LogFormat) -> Result<(), MetricsError> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    // Colours only for a person at a terminal, never into a log file or a pipe.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    dispatch(format, filter, ansi, std::io::stderr).try_init()?;
    Ok(())
}

/// The subscriber [`init`] installs, writing to `writer` (tests capture it).
fn dispatch<W>(format: LogFormat, filter: EnvFilter, ansi: bool, writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // The messages name their process ("worker: ...", "coordinator: ..."); the module
        // path would only push them to the right.
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .into(),
        // Flat objects, so a collector reads `.message` and the fields without nesting.
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// The output of `emit` under `format` with the filter `directives`.
    fn capture(format: LogFormat, directives: &str, emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let filter = EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse(directives)
            .unwrap();
        let dispatch = dispatch(format, filter, false, move || writer.clone());
        tracing::dispatcher::with_default(&dispatch, emit);
        out.text()
    }

    #[test]
    fn formats_read_back_from_their_names() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>().unwrap(), format);
        }
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let err = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(
            err.contains("yaml") && err.contains("text") && err.contains("json"),
            "{err}"
        );
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }

    #[test]
    fn text_is_one_plain_line_per_event() {
        let out = capture(LogFormat::Text, "", || {
            tracing::info!(samples = 1000, "worker: resuming from step 40");
            tracing::warn!("warning: skipping checkpoint step-00000020");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].contains("INFO")
                && lines[0].contains("worker: resuming from step 40")
                && lines[0].contains("samples=1000"),
            "{out}"
        );
        assert!(
            lines[1].contains("WARN") && lines[1].contains("skipping checkpoint"),
            "{out}"
        );
        assert!(
            !out.contains('\u{1b}'),
            "no colour escapes off a terminal: {out:?}"
        );
        assert!(!out.contains("gantry_metrics"), "no module path: {out}");
    }

    #[test]
    fn json_is_one_flat_object_per_line() {
        let out = capture(LogFormat::Json, "", || {
            tracing::info!(rank = 3, "step 10/40 \"quoted\"");
            tracing::error!("gantry-eval: no such file");
        });
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(events.len(), 2, "{out}");
        assert_eq!(events[0]["message"], "step 10/40 \"quoted\"");
        assert_eq!(events[0]["level"], "INFO");
        assert_eq!(events[0]["rank"], 3);
        assert!(events[0]["timestamp"].is_string(), "{out}");
        assert_eq!(events[1]["level"], "ERROR");
        assert_eq!(events[1]["target"], "gantry_metrics::logs::tests");
    }

    #[test]
    fn the_filter_chooses_the_levels() {
        let emit = || {
            tracing::debug!("detail");
            tracing::info!("news");
        };
        let default = capture(LogFormat::Text, "", emit);
        assert!(
            default.contains("news") && !default.contains("detail"),
            "{default}"
        );
        let debug = capture(LogFormat::Text, "debug", emit);
        assert!(
            debug.contains("news") && debug.contains("detail"),
            "{debug}"
        );
        let quiet = capture(LogFormat::Text, "warn", emit);
        assert!(quiet.is_empty(), "{quiet}");
    }
}
