//! The worker's HTTP endpoint (`/healthz`, `/readyz`, `/metrics`), set up the same way in
//! every mode.
//!
//! Several workers sharing a host (and a default port) is normal outside Kubernetes, so a
//! port that is taken costs only this endpoint, with a warning, never the training.

use std::net::SocketAddr;
use std::sync::Arc;

use gantry_metrics::{Readiness, WorkerMetrics, WorkerRoutes};

/// A served (or, when its port was taken, unserved) endpoint: probes answer from the start,
/// series once [`Endpoint::install`] gives it the worker's metrics.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ready: Readiness,
    routes: WorkerRoutes,
    /// Where it listens; `None` when it could not bind.
    pub addr: Option<SocketAddr>,
}

impl Endpoint {
    /// Serves `addr` (`metrics.worker_addr`) on `runtime`; `who` names this worker in the log.
    pub fn start(runtime: &tokio::runtime::Runtime, addr: &str, who: &str) -> Self {
        let ready = Readiness::default();
        let routes = WorkerRoutes::default();
        let served = runtime.block_on(gantry_metrics::serve(
            addr,
            ready.clone(),
            Arc::new(routes.clone()),
        ));
        let addr = match served {
            Ok(addr) => {
                tracing::info!("{who}: metrics on http://{addr}/metrics");
                Some(addr)
            }
            Err(e) => {
                tracing::warn!("{who}: warning: no metrics endpoint: {e}");
                None
            }
        };
        Self {
            ready,
            routes,
            addr,
        }
    }

    /// Serves `metrics` from now on.
    pub fn install(&self, metrics: WorkerMetrics) {
        self.routes.install(metrics);
    }
}
