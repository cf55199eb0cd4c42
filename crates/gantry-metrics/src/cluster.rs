//! The coordinator's metrics: the job's state and the cluster-wide view of its workers.
//!
//! The coordinator knows every rank through its heartbeats, so one scrape of it shows the
//! whole job: per-rank progress and phase timing, the straggler signal (each rank's step time
//! over the median of all ranks'), and cluster aggregates of the workers' counters. Counters
//! stay monotonic across restarts: the coordinator accumulates the workers' increments, and a
//! worker process that starts over (a new generation) counts from zero again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{Counter, Gauge, GaugeVec, IntCounter, IntGauge, Registry};

use crate::register::{counter, gauge, gauge_vec, int_counter, int_gauge};

use crate::MetricsError;
use crate::worker::Quality;

/// The phases a job goes through, as exported in `gantry_job_phase{phase}`.
/// `degraded` is training with fewer ranks than requested (an elastic group that shrank,
/// see `cluster.min_workers`): the job makes progress, unlike `recovering` or `failed`.
pub const JOB_PHASES: [&str; 7] = [
    "rendezvous",
    "training",
    "degraded",
    "recovering",
    "done",
    "stopped",
    "failed",
];

/// Cluster-wide totals, accumulated from the workers' reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClusterTotals {
    pub images: u64,
    pub nonfinite_steps: u64,
    pub allreduce_bytes: u64,
    pub allreduce_seconds: f64,
    pub checkpoints: u64,
}

/// One rank as the coordinator last heard of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankView {
    pub rank: u32,
    pub step: u64,
    /// Recent mean seconds per step (0 before the first step).
    pub step_seconds: f64,
    pub images_per_second: f64,
    pub heartbeat_age_seconds: f64,
    pub phase_seconds: Vec<(String, f64)>,
}

/// What rank 0 reports about the group as a whole (its figures are group averages).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadView {
    /// The family's named statistics (e.g. the GAN's `d_loss`, `g_loss`, `d_real`, `d_fake`).
    pub statistics: Vec<(String, f64)>,
    /// L2 norms of the averaged gradients, by part.
    pub gradient_norms: Vec<(String, f64)>,
    pub last_checkpoint_seconds: f64,
    pub last_checkpoint_bytes: u64,
    pub quality: Option<Quality>,
}

/// Everything the coordinator's metrics are made of, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// One of [`JOB_PHASES`].
    pub phase: &'static str,
    pub generation: u64,
    pub restarts: u64,
    pub auth_failures: u64,
    /// The worker count the job was started with (`--workers` / `--expect-workers`).
    pub workers_expected: u64,
    /// Ranks of the current generation: `workers_expected`, or fewer in a shrunken one.
    pub world_size: u64,
    pub workers_alive: u64,
    /// The slowest rank's step.
    pub step: u64,
    pub total_steps: u64,
    pub totals: ClusterTotals,
    pub ranks: Vec<RankView>,
    pub lead: Option<LeadView>,
}

/// The median of the positive values (`None` when there are none).
pub fn median_positive(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values
        .into_iter()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

impl ClusterView {
    /// Each rank's step time over the median of all ranks' (the straggler signal), in
    /// `ranks` order; `None` for a rank without a step time yet.
    pub fn step_time_ratios(&self) -> Vec<Option<f64>> {
        let median = median_positive(self.ranks.iter().map(|r| r.step_seconds));
        self.ranks
            .iter()
            .map(|r| {
                median
                    .filter(|_| r.step_seconds > 0.0)
                    .map(|m| r.step_seconds / m)
            })
            .collect()
    }
}

#[derive(Debug)]
struct Series {
    job_phase: GaugeVec,
    generation: IntGauge,
    restarts: IntCounter,
    auth_failures: IntCounter,
    workers_expected: IntGauge,
    world_size: IntGauge,
    workers_alive: IntGauge,
    step: IntGauge,
    steps_target: IntGauge,
    images: IntCounter,
    nonfinite: IntCounter,
    allreduce_bytes: IntCounter,
    allreduce_seconds: Counter,
    checkpoints: IntCounter,
    images_per_second: Gauge,
    generator_loss: Gauge,
    discriminator_loss: Gauge,
    d_real: Gauge,
    d_fake: Gauge,
    statistic: GaugeVec,
    grad_norm: GaugeVec,
    checkpoint_seconds: Gauge,
    checkpoint_bytes: IntGauge,
    quality: Option<[Gauge; 4]>,
    rank_step: GaugeVec,
    rank_step_seconds: GaugeVec,
    rank_step_ratio: GaugeVec,
    rank_images_per_second: GaugeVec,
    rank_heartbeat_age: GaugeVec,
    rank_phase_seconds: GaugeVec,
}

/// The coordinator's registry.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    registry: Registry,
    /// Refreshes and renders take turns, so a scrape never sees a half-refreshed job.
    series: Arc<Mutex<Series>>,
}

impl ClusterMetrics {
    pub fn new(run_id: &str) -> Result<Self, MetricsError> {
        let labels = HashMap::from([("run_id".to_owned(), run_id.to_owned())]);
        let registry = Registry::new_custom(Some("gantry".into()), Some(labels))?;
        let r = &registry;
        let series = Series {
            job_phase: gauge_vec(
                r,
                "job_phase",
                "1 for the job's current phase, 0 for the others.",
                &["phase"],
            )?,
            generation: int_gauge(
                r,
                "job_generation",
                "The current generation (attempt) of the worker group.",
            )?,
            restarts: int_counter(
                r,
                "job_restarts_total",
                "Restarts of the worker group from its newest checkpoint.",
            )?,
            auth_failures: int_counter(
                r,
                "job_auth_failures_total",
                "RPCs refused for a missing or wrong join token.",
            )?,
            workers_expected: int_gauge(
                r,
                "job_workers_expected",
                "Workers the job was started with (--workers / --expect-workers).",
            )?,
            world_size: int_gauge(
                r,
                "job_world_size",
                "Ranks of the current generation (below gantry_job_workers_expected while an \
                 elastic group runs shrunken).",
            )?,
            workers_alive: int_gauge(
                r,
                "job_workers_alive",
                "Ranks of the current generation heard from within cluster.heartbeat_timeout.",
            )?,
            step: int_gauge(r, "job_step", "The slowest rank's completed step.")?,
            steps_target: int_gauge(r, "job_steps_target", "Steps the job trains in all.")?,
            images: int_counter(
                r,
                "cluster_images_total",
                "Real images the discriminators of all ranks have seen.",
            )?,
            nonfinite: int_counter(
                r,
                "cluster_nonfinite_steps_total",
                "Steps skipped for a non-finite loss or gradient (counted once per step, on rank 0).",
            )?,
            allreduce_bytes: int_counter(
                r,
                "cluster_allreduce_bytes_total",
                "Bytes all ranks contributed to all-reduce operations.",
            )?,
            allreduce_seconds: counter(
                r,
                "cluster_allreduce_seconds_total",
                "Seconds all ranks spent inside all-reduce operations.",
            )?,
            checkpoints: int_counter(
                r,
                "cluster_checkpoints_total",
                "Checkpoints written (by rank 0).",
            )?,
            images_per_second: gauge(
                r,
                "cluster_images_per_second",
                "Recent training throughput summed over the ranks.",
            )?,
            generator_loss: gauge(
                r,
                "cluster_generator_loss",
                "Generator loss at the newest logged step (group average).",
            )?,
            discriminator_loss: gauge(
                r,
                "cluster_discriminator_loss",
                "Discriminator loss at the newest logged step (group average).",
            )?,
            d_real: gauge(
                r,
                "cluster_discriminator_real_mean",
                "Mean D(x) on real images at the newest logged step (group average).",
            )?,
            d_fake: gauge(
                r,
                "cluster_discriminator_fake_mean",
                "Mean D(G(z)) on generated images at the newest logged step (group average).",
            )?,
            statistic: gauge_vec(
                r,
                "cluster_statistic",
                "A named statistic of the newest logged step (group average), e.g. d_loss, \
                 neg_elbo or nll.",
                &["name"],
            )?,
            grad_norm: gauge_vec(
                r,
                "cluster_gradient_norm",
                "L2 norm of the group-averaged gradient at the newest logged step.",
                &["network"],
            )?,
            checkpoint_seconds: gauge(
                r,
                "cluster_checkpoint_duration_seconds",
                "Duration of the newest checkpoint on rank 0.",
            )?,
            checkpoint_bytes: int_gauge(
                r,
                "cluster_checkpoint_size_bytes",
                "Size of the newest checkpoint.",
            )?,
            quality: None,
            rank_step: gauge_vec(r, "rank_step", "Each rank's completed step.", &["rank"])?,
            rank_step_seconds: gauge_vec(
                r,
                "rank_step_seconds",
                "Each rank's recent mean seconds per step.",
                &["rank"],
            )?,
            rank_step_ratio: gauge_vec(
                r,
                "rank_step_time_ratio",
                "Each rank's step time over the median of all ranks' (the straggler signal: 1 is typical, 2 is twice as slow).",
                &["rank"],
            )?,
            rank_images_per_second: gauge_vec(
                r,
                "rank_images_per_second",
                "Each rank's recent throughput.",
                &["rank"],
            )?,
            rank_heartbeat_age: gauge_vec(
                r,
                "rank_heartbeat_age_seconds",
                "Seconds since each rank's newest heartbeat.",
                &["rank"],
            )?,
            rank_phase_seconds: gauge_vec(
                r,
                "rank_phase_seconds",
                "Each rank's recent mean seconds per step in each phase.",
                &["rank", "phase"],
            )?,
        };
        Ok(Self {
            registry,
            series: Arc::new(Mutex::new(series)),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The exposition in Prometheus' text format.
    pub fn render(&self) -> String {
        let _turn = self.series.lock().unwrap_or_else(|e| e.into_inner());
        crate::render(&self.registry)
    }

    /// Brings every series up to `view`.
    pub fn refresh(&self, view: &ClusterView) -> Result<(), MetricsError> {
        let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for phase in JOB_PHASES {
            let on = if phase == view.phase { 1.0 } else { 0.0 };
            s.job_phase.with_label_values(&[phase]).set(on);
        }
        s.generation.set(view.generation as i64);
        catch_up(&s.restarts, view.restarts);
        catch_up(&s.auth_failures, view.auth_failures);
        s.workers_expected.set(view.workers_expected as i64);
        s.world_size.set(view.world_size as i64);
        s.workers_alive.set(view.workers_alive as i64);
        s.step.set(view.step as i64);
        s.steps_target.set(view.total_steps as i64);
        let t = &view.totals;
        catch_up(&s.images, t.images);
        catch_up(&s.nonfinite, t.nonfinite_steps);
        catch_up(&s.allreduce_bytes, t.allreduce_bytes);
        catch_up(&s.checkpoints, t.checkpoints);
        let seconds_behind = t.allreduce_seconds - s.allreduce_seconds.get();
        if seconds_behind > 0.0 {
            s.allreduce_seconds.inc_by(seconds_behind);
        }
        s.images_per_second
            .set(view.ranks.iter().map(|r| r.images_per_second).sum());

        // Ranks of an ended generation must not linger as stale series.
        for vec in [
            &s.rank_step,
            &s.rank_step_seconds,
            &s.rank_step_ratio,
            &s.rank_images_per_second,
            &s.rank_heartbeat_age,
            &s.rank_phase_seconds,
        ] {
            vec.reset();
        }
        for (rank, ratio) in view.ranks.iter().zip(view.step_time_ratios()) {
            let label = rank.rank.to_string();
            let l = [label.as_str()];
            s.rank_step.with_label_values(&l).set(rank.step as f64);
            s.rank_step_seconds
                .with_label_values(&l)
                .set(rank.step_seconds);
            s.rank_images_per_second
                .with_label_values(&l)
                .set(rank.images_per_second);
            s.rank_heartbeat_age
                .with_label_values(&l)
                .set(rank.heartbeat_age_seconds);
            if let Some(ratio) = ratio {
                s.rank_step_ratio.with_label_values(&l).set(ratio);
            }
            for (phase, seconds) in &rank.phase_seconds {
                s.rank_phase_seconds
                    .with_label_values(&[label.as_str(), phase.as_str()])
                    .set(*seconds);
            }
        }

        if let Some(lead) = &view.lead {
            for (name, value) in &lead.statistics {
                s.statistic.with_label_values(&[name.as_str()]).set(*value);
                // The GAN's statistics also feed the series its dashboards and alerts use.
                match name.as_str() {
                    "d_loss" => s.discriminator_loss.set(*value),
                    "g_loss" => s.generator_loss.set(*value),
                    "d_real" => s.d_real.set(*value),
                    "d_fake" => s.d_fake.set(*value),
                    _ => {}
                }
            }
            for (part, norm) in &lead.gradient_norms {
                s.grad_norm.with_label_values(&[part.as_str()]).set(*norm);
            }
            s.checkpoint_seconds.set(lead.last_checkpoint_seconds);
            s.checkpoint_bytes.set(lead.last_checkpoint_bytes as i64);
            if let Some(q) = lead.quality {
                if s.quality.is_none() {
                    // Registered at the first evaluation: no made-up figures before it.
                    s.quality = Some([
                        gauge(
                            &self.registry,
                            "cluster_quality_fid",
                            "Frechet distance of generated to held-out real digits in the evaluation classifier's feature space (lower is better).",
                        )?,
                        gauge(
                            &self.registry,
                            "cluster_quality_inception_score",
                            "Classifier-based Inception Score of generated digits (higher is better, at most 10).",
                        )?,
                        gauge(
                            &self.registry,
                            "cluster_quality_classes_covered",
                            "Digit classes with at least 1% of the generated samples.",
                        )?,
                        gauge(
                            &self.registry,
                            "cluster_quality_step",
                            "The step whose generator the quality figures describe.",
                        )?,
                    ]);
                }
                if let Some([fid, inception, classes, step]) = &s.quality {
                    fid.set(q.fid);
                    inception.set(q.inception_score);
                    classes.set(f64::from(q.classes_covered));
                    step.set(q.step as f64);
                }
            }
        }
        Ok(())
    }
}

/// Counters only go up: add what `counter` lacks to reach `total`.
fn catch_up(counter: &IntCounter, total: u64) {
    let have = counter.get();
    if total > have {
        counter.inc_by(total - have);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: u32, step_seconds: f64) -> RankView {
        RankView {
            rank,
            step: 10,
            step_seconds,
            images_per_second: 100.0,
            heartbeat_age_seconds: 0.5,
            phase_seconds: vec![("allreduce".into(), 0.01)],
        }
    }

    fn view() -> ClusterView {
        ClusterView {
            phase: "training",
            generation: 0,
            workers_expected: 3,
            world_size: 3,
            workers_alive: 3,
            step: 10,
            total_steps: 100,
            ranks: vec![rank(0, 0.25), rank(1, 0.25), rank(2, 0.75)],
            ..ClusterView::default()
        }
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::testing::sample(text, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    }

    #[test]
    fn the_straggler_is_named_by_its_ratio_to_the_median() {
        let m = ClusterMetrics::new("r").unwrap();
        m.refresh(&view()).unwrap();
        let text = m.render();
        assert_eq!(
            value(&text, "gantry_rank_step_time_ratio", &[("rank", "2")]),
            3.0
        );
        assert_eq!(
            value(&text, "gantry_rank_step_time_ratio", &[("rank", "0")]),
            1.0
        );
        assert_eq!(value(&text, "gantry_cluster_images_per_second", &[]), 300.0);
        assert_eq!(
            value(&text, "gantry_job_phase", &[("phase", "training")]),
            1.0
        );
        assert_eq!(value(&text, "gantry_job_phase", &[("phase", "done")]), 0.0);

        // A shrunken elastic group: its own phase, and the ranks it has next to those asked for.
        let shrunken = ClusterView {
            phase: "degraded",
            world_size: 2,
            workers_alive: 2,
            ..view()
        };
        m.refresh(&shrunken).unwrap();
        let text = m.render();
        assert_eq!(value(&text, "gantry_job_world_size", &[]), 2.0);
        assert_eq!(value(&text, "gantry_job_workers_expected", &[]), 3.0);
        assert_eq!(
            value(&text, "gantry_job_phase", &[("phase", "degraded")]),
            1.0
        );
        assert_eq!(
            value(&text, "gantry_job_phase", &[("phase", "training")]),
            0.0
        );
    }

    #[test]
    fn departed_ranks_disappear_and_counters_never_go_down() {
        let m = ClusterMetrics::new("r").unwrap();
        let mut v = view();
        v.totals.images = 640;
        v.restarts = 1;
        m.refresh(&v).unwrap();
        v.ranks.truncate(1);
        v.totals.images = 500; // a stale, lower figure must not decrease the counter
        m.refresh(&v).unwrap();
        let text = m.render();
        assert!(!text.contains(r#"rank="2""#), "{text}");
        assert_eq!(value(&text, "gantry_cluster_images_total", &[]), 640.0);
        assert_eq!(value(&text, "gantry_job_restarts_total", &[]), 1.0);
        assert!(!text.contains("gantry_cluster_quality_fid"));
    }

    #[test]
    fn quality_from_rank_zero() {
        let m = ClusterMetrics::new("r").unwrap();
        let mut v = view();
        v.lead = Some(LeadView {
            quality: Some(Quality {
                step: 20,
                fid: 42.0,
                inception_score: 7.0,
                classes_covered: 10,
            }),
            ..LeadView::default()
        });
        m.refresh(&v).unwrap();
        m.refresh(&v).unwrap();
        let text = m.render();
        assert_eq!(value(&text, "gantry_cluster_quality_fid", &[]), 42.0);
        assert_eq!(
            value(&text, "gantry_cluster_quality_classes_covered", &[]),
            10.0
        );
    }

    #[test]
    fn gradient_norms_are_labelled_by_the_family_s_parts() {
        let m = ClusterMetrics::new("r").unwrap();
        let mut v = view();
        v.lead = Some(LeadView {
            gradient_norms: vec![("vae".into(), 1.5)],
            ..LeadView::default()
        });
        m.refresh(&v).unwrap();
        let text = m.render();
        assert_eq!(
            value(&text, "gantry_cluster_gradient_norm", &[("network", "vae")]),
            1.5
        );
        assert!(
            crate::testing::sample(
                &text,
                "gantry_cluster_gradient_norm",
                &[("network", "generator")]
            )
            .is_none(),
            "no GAN series for a VAE"
        );
    }

    #[test]
    fn median_of_positive_values() {
        assert_eq!(median_positive([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_positive([0.0, 4.0, 2.0]), Some(3.0));
        assert_eq!(median_positive([0.0, f64::NAN]), None);
    }
}
