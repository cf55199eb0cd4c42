//! The observable side of a Gantry process, for operators and orchestrators.
//!
//! - [`http`]: the HTTP endpoint (axum over hyper) answering the probes Kubernetes uses
//!   (`/healthz`, `/readyz`) and whatever [`http::Routes`] a process adds (`/metrics`, the
//!   coordinator's status page).
//! - [`logs`]: every binary's log set-up: `tracing` events on stderr as text or JSON lines,
//!   filtered by `RUST_LOG`.
//! - [`worker`]: a worker's Prometheus series (losses, D outputs, gradient norms, step and
//!   phase durations, all-reduce traffic, checkpoints, quality), and the figures its
//!   heartbeat carries to the coordinator.
//! - [`cluster`]: the coordinator's series: job state, per-rank progress and the straggler
//!   ratio, and cluster-wide aggregates, so one scrape target shows the whole job.
//!
//! Every series is named `gantry_*` in base units, counters end in `_total`, and labels stay
//! low-cardinality (`run_id`, `rank`, `generation`, `phase`, `network`).

pub mod cluster;
pub mod http;
pub mod logs;
pub mod worker;

pub use cluster::{ClusterMetrics, ClusterTotals, ClusterView, LeadView, RankView};
pub use http::{NoRoutes, PROMETHEUS_TEXT, Readiness, Response, Routes, serve};
pub use worker::{Identity, Quality, WorkerMetrics, WorkerReport};

use prometheus::{Encoder, Registry, TextEncoder};

/// Errors of the metrics endpoints and the log set-up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the HTTP address {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("metric registry: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("unknown log format {0:?}: expected text or json")]
    LogFormat(String),
    #[error("installing the log subscriber: {0}")]
    Logging(#[from] tracing_subscriber::util::TryInitError),
}

/// A registry's series in Prometheus' text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    // Encoding into memory fails only for malformed families, which the registry refuses.
    if TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Serves a [`WorkerMetrics`] at `/metrics` once one is installed (a worker binds its HTTP
/// port before it knows its rank, so the series come later).
#[derive(Debug, Clone, Default)]
pub struct WorkerRoutes(std::sync::Arc<std::sync::OnceLock<WorkerMetrics>>);

impl WorkerRoutes {
    /// Installs the metrics; later calls are ignored.
    pub fn install(&self, metrics: WorkerMetrics) {
        let _ = self.0.set(metrics);
    }
}

impl Routes for WorkerRoutes {
    fn get(&self, path: &str) -> Option<Response> {
        (path == "/metrics").then(|| {
            Response::ok(
                PROMETHEUS_TEXT,
                self.0.get().map(WorkerMetrics::render).unwrap_or_default(),
            )
        })
    }
}

/// Creating a series and registering it, in one call.
pub(crate) mod register {
    use prometheus::core::Collector;
    use prometheus::{
        Counter, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge,
        Opts, Registry,
    };

    use crate::MetricsError;

    /// Registers `metric` (a handle: clones share its values) and hands it back.
    fn registered<M: Collector + Clone + 'static>(
        r: &Registry,
        metric: M,
    ) -> Result<M, MetricsError> {
        r.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    pub fn int_counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
        registered(r, IntCounter::new(name, help)?)
    }

    pub fn counter(r: &Registry, name: &str, help: &str) -> Result<Counter, MetricsError> {
        registered(r, Counter::new(name, help)?)
    }

    pub fn int_gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        registered(r, IntGauge::new(name, help)?)
    }

    pub fn gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge, MetricsError> {
        registered(r, Gauge::new(name, help)?)
    }

    pub fn gauge_vec(
        r: &Registry,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<GaugeVec, MetricsError> {
        registered(r, GaugeVec::new(Opts::new(name, help), labels)?)
    }

    pub fn histogram(
        r: &Registry,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> Result<Histogram, MetricsError> {
        registered(
            r,
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
        )
    }

    pub fn histogram_vec(
        r: &Registry,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> Result<HistogramVec, MetricsError> {
        registered(
            r,
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?,
        )
    }
}

/// Reading expositions back in tests, independent of label order.
#[cfg(test)]
pub(crate) mod testing {
    /// The value of the first sample of `name` carrying all of `labels`.
    pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let has_all = labels
                .iter()
                .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            has_all.then(|| value.trim().parse().ok()).flatten()
        })
    }
}
