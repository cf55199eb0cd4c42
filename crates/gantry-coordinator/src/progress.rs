//! The coordinator's view of progress: a bar on a terminal, a line every few seconds elsewhere.
//!
//! The bar redraws one line of the terminal, so it and the lines printed above it go to the
//! terminal directly; without a terminal every line is a `tracing` event, in the process's
//! log format.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use gantry_proto::v1::StatusResponse;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    last_line: Instant,
    last_step: u64,
}

impl Reporter {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            last_line: Instant::now(),
            last_step: 0,
        }
    }

    pub fn show(&mut self, status: &StatusResponse) {
        let sorted: std::collections::BTreeMap<_, _> = status.statistics.iter().collect();
        let statistics: String = sorted
            .iter()
            .map(|(name, value)| format!(" {name} {value:.3}"))
            .collect();
        let line = format!(
            "{} gen {}{statistics} {:.0} img/s workers {}/{}",
            status.phase,
            status.generation,
            status.images_per_second,
            status.workers_alive,
            status.world_size
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(status.step);
                bar.set_message(line);
            }
            None => {
                let moved = status.step != self.last_step;
                if moved && self.last_line.elapsed() > Duration::from_secs(5) {
                    tracing::info!(
                        "coordinator: step {}/{} {line}",
                        status.step,
                        status.total_steps
                    );
                    self.last_line = Instant::now();
                    self.last_step = status.step;
                }
            }
        }
    }

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
