//! The coordinator's HTTP routes: Prometheus metrics, service discovery of the workers'
//! endpoints, and a status page for people.
//!
//! - `/metrics`: the job's and the cluster's series (refreshed from the job on each scrape).
//! - `/sd/workers`: the current generation's worker `/metrics` endpoints in Prometheus'
//!   HTTP service-discovery format, so a local Prometheus finds workers on dynamic ports.
//! - `/`: a status page that refreshes itself from `/api/status` and `/api/history`, shows the
//!   newest sample grid from `/samples/latest.png`, and draws the history as charts (SVG, by
//!   the page's own script).
//! - `/api/history`: the job's figures over steps, bounded (see [`crate::history`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gantry_metrics::{ClusterMetrics, PROMETHEUS_TEXT, Response, Routes};
use serde_json::{Value, json};

use crate::history::History;
use crate::job::Job;

const STATUS_PAGE: &str = include_str!("status_page.html");

#[derive(Debug)]
pub struct CoordinatorRoutes {
    pub job: Arc<Job>,
    pub metrics: ClusterMetrics,
    pub auth_failures: Arc<AtomicU64>,
    pub run_dir: PathBuf,
    /// The figures over steps, recorded by the supervisor.
    pub history: Arc<History>,
}

impl Routes for CoordinatorRoutes {
    fn get(&self, path: &str) -> Option<Response> {
        match path {
            "/metrics" => Some(Response::ok(PROMETHEUS_TEXT, self.render_metrics())),
            "/sd/workers" => Some(Response::ok(
                "application/json",
                self.service_discovery().to_string(),
            )),
            "/api/status" => Some(Response::ok(
                "application/json",
                self.status_json().to_string(),
            )),
            "/api/history" => Some(Response::ok(
                "application/json",
                self.history.to_json().to_string(),
            )),
            "/" | "/index.html" => Some(Response::ok(
                "text/html; charset=utf-8",
                STATUS_PAGE
                    .replace(
                        "/*INITIAL_STATUS*/null",
                        &script_safe_json(&self.status_json()),
                    )
                    .replace(
                        "/*INITIAL_HISTORY*/null",
                        &script_safe_json(&self.history.to_json()),
                    ),
            )),
            "/samples/latest.png" => {
                let (_, file) = newest_sample(&self.run_dir)?;
                let bytes = std::fs::read(file).ok()?;
                Some(Response::ok("image/png", bytes))
            }
            _ => None,
        }
    }
}

impl CoordinatorRoutes {
    fn render_metrics(&self) -> String {
        let view = self
            .job
            .cluster_view(self.auth_failures.load(Ordering::Relaxed));
        if let Err(e) = self.metrics.refresh(&view) {
            tracing::warn!("coordinator: warning: refreshing metrics: {e}");
        }
        self.metrics.render()
    }

    fn service_discovery(&self) -> Value {
        let targets: Vec<Value> = self
            .job
            .metrics_targets()
            .into_iter()
            .map(|(_, addr)| {
                json!({
                    "targets": [addr],
                    "labels": { "gantry_role": "worker", "gantry_run_id": self.job.spec.run_id },
                })
            })
            .collect();
        Value::Array(targets)
    }

    /// Everything the status page shows.
    pub fn status_json(&self) -> Value {
        let status = self.job.status();
        let view = self
            .job
            .cluster_view(self.auth_failures.load(Ordering::Relaxed));
        // Per-rank figures as the metrics show them (this rank's share of the throughput,
        // the straggler ratio), looked up by rank: the two snapshots are taken apart.
        let ratios = view.step_time_ratios();
        let rank_view = |rank: u32| view.ranks.iter().zip(&ratios).find(|(r, _)| r.rank == rank);
        let lead = view.lead.clone().unwrap_or_default();
        let sample = newest_sample(&self.run_dir).map(
            |(step, _)| json!({ "step": step, "url": format!("/samples/latest.png?step={step}") }),
        );
        json!({
            "run_id": status.run_id,
            "phase": status.phase,
            "generation": status.generation,
            "step": status.step,
            "total_steps": status.total_steps,
            "world_size": status.world_size,
            // The requested count; above `world_size` while a shrunken group trains.
            "workers_expected": view.workers_expected,
            "workers_alive": status.workers_alive,
            "restarts": status.restarts,
            // The family's named statistics, in its own order (e.g. d_loss, g_loss, d_real,
            // d_fake; neg_elbo, reconstruction, kl; nll, bits_per_dim).
            "statistics": lead
                .statistics
                .iter()
                .map(|(name, value)| json!({ "name": name, "value": finite(*value) }))
                .collect::<Vec<_>>(),
            "images_per_second": view.ranks.iter().map(|r| r.images_per_second).sum::<f64>(),
            "quality": lead.quality.map(|q| json!({
                "step": q.step,
                "fid": q.fid,
                "inception_score": q.inception_score,
                "classes_covered": q.classes_covered,
            })),
            "sample": sample,
            "workers": status.workers.iter().map(|w| json!({
                "rank": w.rank,
                "worker_id": w.worker_id,
                "host": w.host,
                "device": w.device,
                "state": gantry_proto::v1::WorkerState::try_from(w.state)
                    .map(|s| s.as_str_name().trim_start_matches("WORKER_STATE_").to_lowercase())
                    .unwrap_or_default(),
                "step": w.step,
                "step_seconds": w.step_seconds,
                "step_time_ratio": rank_view(w.rank).and_then(|(_, ratio)| *ratio),
                "images_per_second": rank_view(w.rank).map(|(r, _)| r.images_per_second),
                "seconds_since_heartbeat": w.seconds_since_heartbeat,
            })).collect::<Vec<_>>(),
        })
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The newest `samples/step-NNNNNNNN.png` of the run directory, with its step.
fn newest_sample(run_dir: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(run_dir.join("samples"))
        .ok()?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".png")?
                .parse()
                .ok()?;
            Some((step, path))
        })
        .max_by_key(|(step, _)| *step)
}

/// `value` as JSON that can stand inside an inline `<script>`: `<`, `>` and `&` (which could
/// open `</script>` or `<!--`), `/` (so that no string in it reads as the page's next
/// `/*INITIAL_...*/` marker) and the JavaScript line terminators U+2028/U+2029 are written
/// as `\uXXXX` escapes, which every JSON and JavaScript parser reads back unchanged.
fn script_safe_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        match c {
            '<' | '>' | '&' | '/' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_status_json_cannot_leave_its_script() {
        let hostile = serde_json::json!({"worker_id": "<!--<script></script>&\u{2028}/*INITIAL_HISTORY*/null"});
        let safe = script_safe_json(&hostile);
        for needle in ["<", ">", "&", "/", "\u{2028}"] {
            assert!(!safe.contains(needle), "{needle:?} in {safe}");
        }
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, hostile, "the escapes read back as the same value");
    }

    #[test]
    fn the_newest_sample_is_the_highest_step() {
        let dir = tempfile::tempdir().unwrap();
        assert!(newest_sample(dir.path()).is_none());
        let samples = dir.path().join("samples");
        std::fs::create_dir(&samples).unwrap();
        for name in [
            "step-00000010.png",
            "step-00000200.png",
            "step-00000030.png",
            "notes.txt",
        ] {
            std::fs::write(samples.join(name), b"x").unwrap();
        }
        let (step, path) = newest_sample(dir.path()).unwrap();
        assert_eq!(step, 200);
        assert!(path.ends_with("step-00000200.png"));
    }
}
