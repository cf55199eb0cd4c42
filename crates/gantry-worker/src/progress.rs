//! Progress on a terminal (a bar) or in a log (a line every few percent).
//!
//! The bar redraws one line of the terminal, so it and the lines printed above it go to the
//! terminal directly; without a terminal every line is a `tracing` event, in the process's
//! log format.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports training progress; the display kind follows whether stderr is a terminal.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: u64, first_step: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_position(first_step);
            bar
        });
        Self {
            bar,
            total,
            every: (total / 20).max(1),
            last_line: Instant::now(),
        }
    }

    /// Records that `step` is done; `line` describes it when it was a logging step.
    pub fn update(&mut self, step: u64, line: Option<String>) {
        match (&self.bar, line) {
            (Some(bar), line) => {
                bar.set_position(step);
                if let Some(line) = line {
                    bar.set_message(line);
                }
            }
            (None, Some(line)) => {
                let due = step.is_multiple_of(self.every) || step == self.total;
                if due || self.last_line.elapsed() > Duration::from_secs(30) {
                    tracing::info!("step {step}/{} {line}", self.total);
                    self.last_line = Instant::now();
                }
            }
            (None, None) => {}
        }
    }

    /// Prints a line without tearing the bar, or logs it.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
