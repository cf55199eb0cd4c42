//! A worker's own metrics: what its training loop does, step by step.
//!
//! Every series carries the constant labels `run_id`, `rank` and `generation`, so one
//! Prometheus can scrape many jobs. The loop updates them from its (blocking) thread; the
//! HTTP server renders them; the cluster heartbeat reads [`WorkerMetrics::report`] from them,
//! so the coordinator's cluster view and the worker's `/metrics` never disagree.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntGauge, Registry,
};

use crate::MetricsError;
use crate::register::{
    counter, gauge, gauge_vec, histogram, histogram_vec, int_counter, int_gauge,
};

/// Who is reporting: the constant labels of every worker series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub run_id: String,
    pub rank: u32,
    pub generation: u64,
}

/// Quality figures of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    pub step: u64,
    pub fid: f64,
    pub inception_score: f64,
    pub classes_covered: u32,
}

/// The figures a worker's heartbeat carries to the coordinator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerReport {
    pub images_total: u64,
    pub nonfinite_total: u64,
    pub allreduce_bytes_total: u64,
    pub allreduce_seconds_total: f64,
    /// L2 norms of the averaged gradients at the newest logged step, by part.
    pub gradient_norms: Vec<(String, f64)>,
    /// Mean seconds per step in each phase over the steps since the previous report (the
    /// previous report's figures when no step was timed since).
    pub phase_seconds: Vec<(String, f64)>,
    pub checkpoints_total: u64,
    pub last_checkpoint_seconds: f64,
    pub last_checkpoint_bytes: u64,
    pub quality: Option<Quality>,
}

/// Buckets for step and phase durations: 100 µs to ~26 s, doubling.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-4, 2.0, 19).expect("valid bucket parameters")
}

/// The worker's registry and its series.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    steps: IntCounter,
    images: IntCounter,
    step: IntGauge,
    steps_target: IntGauge,
    nonfinite: IntCounter,
    generator_loss: Gauge,
    discriminator_loss: Gauge,
    d_real: Gauge,
    d_fake: Gauge,
    /// Every named statistic of the family (`name` label).
    statistic: GaugeVec,
    grad_norm: GaugeVec,
    /// The newest norm of each part (the parts are the family's: no series before its first
    /// logged step).
    gradient_norms: Arc<Mutex<BTreeMap<String, f64>>>,
    step_seconds: Histogram,
    phase_seconds: HistogramVec,
    allreduce_bytes: IntCounter,
    allreduce_seconds: Counter,
    checkpoint_seconds: Histogram,
    checkpoint_bytes: IntGauge,
    last_checkpoint_seconds: Arc<Mutex<f64>>,
    quality_fid: Gauge,
    quality_inception: Gauge,
    quality_classes: IntGauge,
    quality_step: IntGauge,
    /// Registered at the first evaluation, so a run that never evaluates exports no
    /// made-up quality figures.
    quality_registered: Arc<Mutex<Option<Quality>>>,
    /// Each phase histogram as of the previous report.
    reported_phases: Arc<Mutex<HashMap<String, PhaseMark>>>,
}

/// A phase histogram's sum and count at a report, and the mean reported then.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseMark {
    sum: f64,
    count: u64,
    mean: f64,
}

impl WorkerMetrics {
    pub fn new(identity: &Identity) -> Result<Self, MetricsError> {
        let labels = HashMap::from([
            ("run_id".to_owned(), identity.run_id.clone()),
            ("rank".to_owned(), identity.rank.to_string()),
            ("generation".to_owned(), identity.generation.to_string()),
        ]);
        let registry = Registry::new_custom(Some("gantry".into()), Some(labels))?;
        let r = &registry;
        let steps = int_counter(
            r,
            "train_steps_total",
            "Training steps completed by this rank.",
        )?;
        let images = int_counter(
            r,
            "train_images_total",
            "Real images this rank's discriminator has seen (its slice of each global batch).",
        )?;
        let step = int_gauge(r, "train_step", "The newest completed step.")?;
        let steps_target = int_gauge(r, "train_steps_target", "Steps the run trains in all.")?;
        let nonfinite = int_counter(
            r,
            "train_nonfinite_steps_total",
            "Steps whose update was skipped for a non-finite loss or gradient.",
        )?;
        let generator_loss = gauge(
            r,
            "train_generator_loss",
            "Generator loss of the newest logged step, averaged over the group.",
        )?;
        let discriminator_loss = gauge(
            r,
            "train_discriminator_loss",
            "Discriminator loss of the newest logged step, averaged over the group.",
        )?;
        let d_real = gauge(
            r,
            "train_discriminator_real_mean",
            "Mean D(x) on real images (sigmoid of the logits) at the newest logged step.",
        )?;
        let d_fake = gauge(
            r,
            "train_discriminator_fake_mean",
            "Mean D(G(z)) on generated images at the newest logged step.",
        )?;
        let statistic = gauge_vec(
            r,
            "train_statistic",
            "A named statistic of the newest logged step, averaged over the group (the GAN's \
             d_loss, g_loss, d_real, d_fake; the VAE's neg_elbo, reconstruction, kl; the \
             autoregressive model's nll, bits_per_dim).",
            &["name"],
        )?;
        let grad_norm = gauge_vec(
            r,
            "train_gradient_norm",
            "L2 norm of the group-averaged gradient at the newest logged step.",
            &["network"],
        )?;
        let step_seconds = histogram(
            r,
            "train_step_duration_seconds",
            "Wall time of one training step on this rank.",
            duration_buckets(),
        )?;
        let phase_seconds = histogram_vec(
            r,
            "train_phase_duration_seconds",
            "Time of one step spent in each phase: data, d_forward_backward, \
             g_forward_backward, allreduce (waiting for the group), optimizer.",
            duration_buckets(),
            &["phase"],
        )?;
        let allreduce_bytes = int_counter(
            r,
            "allreduce_bytes_total",
            "Bytes this rank contributed to all-reduce operations.",
        )?;
        let allreduce_seconds = counter(
            r,
            "allreduce_seconds_total",
            "Seconds this rank spent inside all-reduce operations.",
        )?;
        let checkpoint_seconds = histogram(
            r,
            "checkpoint_duration_seconds",
            "Time to take a checkpoint (state broadcast, and on rank 0 the atomic write).",
            duration_buckets(),
        )?;
        let checkpoint_bytes = int_gauge(
            r,
            "checkpoint_size_bytes",
            "Size of the newest checkpoint this rank wrote (0 on ranks that do not write).",
        )?;
        let quality_fid = Gauge::new(
            "quality_fid",
            "Frechet distance of generated to held-out real digits in the evaluation classifier's feature space (lower is better).",
        )?;
        let quality_inception = Gauge::new(
            "quality_inception_score",
            "Classifier-based Inception Score of generated digits (higher is better, at most 10).",
        )?;
        let quality_classes = IntGauge::new(
            "quality_classes_covered",
            "Digit classes with at least 1% of the generated samples.",
        )?;
        let quality_step = IntGauge::new(
            "quality_step",
            "The step whose generator the quality figures describe.",
        )?;
        let metrics = Self {
            registry,
            steps,
            images,
            step,
            steps_target,
            nonfinite,
            generator_loss,
            discriminator_loss,
            d_real,
            d_fake,
            statistic,
            grad_norm,
            gradient_norms: Arc::default(),
            step_seconds,
            phase_seconds,
            allreduce_bytes,
            allreduce_seconds,
            checkpoint_seconds,
            checkpoint_bytes,
            last_checkpoint_seconds: Arc::default(),
            quality_fid,
            quality_inception,
            quality_classes,
            quality_step,
            quality_registered: Arc::default(),
            reported_phases: Arc::default(),
        };
        Ok(metrics)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The exposition in Prometheus' text format.
    pub fn render(&self) -> String {
        crate::render(&self.registry)
    }

    /// Where the run starts and ends (a resumed run starts past 0).
    pub fn start(&self, step: u64, total_steps: u64) {
        self.step.set(step as i64);
        self.steps_target.set(total_steps as i64);
    }

    /// One completed step: its wall time, the real images it consumed on this rank, and
    /// whether its update was skipped.
    pub fn step_done(&self, step: u64, seconds: f64, images: u64, applied: bool) {
        self.steps.inc();
        self.images.inc_by(images);
        self.step.set(step as i64);
        self.step_seconds.observe(seconds);
        if !applied {
            self.nonfinite.inc();
        }
    }

    /// Seconds of one step spent in each named phase.
    pub fn phases(&self, seconds: &[(&str, f64)]) {
        for (phase, s) in seconds {
            self.phase_seconds.with_label_values(&[phase]).observe(*s);
        }
    }

    /// The named statistics of a logged step (group averages). The GAN's also feed the
    /// dedicated series its dashboards and alerts use.
    pub fn statistics(&self, statistics: &[(&str, f64)]) {
        for (name, value) in statistics {
            self.statistic.with_label_values(&[name]).set(*value);
            match *name {
                "d_loss" => self.discriminator_loss.set(*value),
                "g_loss" => self.generator_loss.set(*value),
                "d_real" => self.d_real.set(*value),
                "d_fake" => self.d_fake.set(*value),
                _ => {}
            }
        }
    }

    pub fn gradient_norm(&self, network: &str, norm: f64) {
        self.grad_norm.with_label_values(&[network]).set(norm);
        self.gradient_norms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(network.to_owned(), norm);
    }

    /// All-reduce traffic since the previous call.
    pub fn allreduce(&self, bytes: u64, seconds: f64) {
        self.allreduce_bytes.inc_by(bytes);
        if seconds > 0.0 {
            self.allreduce_seconds.inc_by(seconds);
        }
    }

    pub fn checkpoint(&self, seconds: f64, bytes: u64) {
        self.checkpoint_seconds.observe(seconds);
        self.checkpoint_bytes.set(bytes as i64);
        *self
            .last_checkpoint_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = seconds;
    }

    pub fn quality(&self, quality: Quality) -> Result<(), MetricsError> {
        let mut registered = self
            .quality_registered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if registered.is_none() {
            for metric in [&self.quality_fid, &self.quality_inception] {
                self.registry.register(Box::new(metric.clone()))?;
            }
            for metric in [&self.quality_classes, &self.quality_step] {
                self.registry.register(Box::new(metric.clone()))?;
            }
        }
        self.quality_fid.set(quality.fid);
        self.quality_inception.set(quality.inception_score);
        self.quality_classes.set(i64::from(quality.classes_covered));
        self.quality_step.set(quality.step as i64);
        *registered = Some(quality);
        Ok(())
    }

    /// Mean seconds per step in each phase over every timed step so far.
    pub fn phase_means(&self) -> Vec<(String, f64)> {
        self.phase_totals()
            .into_iter()
            .filter(|(_, _, count)| *count > 0)
            .map(|(phase, sum, count)| (phase, sum / count as f64))
            .collect()
    }

    /// (phase, seconds in all, steps timed) of every phase seen so far, sorted by phase.
    fn phase_totals(&self) -> Vec<(String, f64, u64)> {
        let mut totals = Vec::new();
        for family in self.phase_seconds.collect() {
            for metric in family.get_metric() {
                let phase = metric.get_label().iter().find(|l| l.name() == "phase");
                if let Some(phase) = phase {
                    let histogram = metric.get_histogram();
                    totals.push((
                        phase.value().to_owned(),
                        histogram.get_sample_sum(),
                        histogram.get_sample_count(),
                    ));
                }
            }
        }
        totals.sort_by(|a, b| a.0.cmp(&b.0));
        totals
    }

    /// The figures for the coordinator. Phase means cover the steps timed since the previous
    /// call.
    pub fn report(&self) -> WorkerReport {
        let mut previous = self
            .reported_phases
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let phase_seconds = self
            .phase_totals()
            .into_iter()
            .map(|(phase, sum, count)| {
                let mark = previous.entry(phase.clone()).or_default();
                let mean = if count > mark.count {
                    (sum - mark.sum) / (count - mark.count) as f64
                } else {
                    mark.mean
                };
                *mark = PhaseMark { sum, count, mean };
                (phase, mean)
            })
            .collect();
        let quality = *self
            .quality_registered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        WorkerReport {
            images_total: self.images.get(),
            nonfinite_total: self.nonfinite.get(),
            allreduce_bytes_total: self.allreduce_bytes.get(),
            allreduce_seconds_total: self.allreduce_seconds.get(),
            gradient_norms: self
                .gradient_norms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(part, norm)| (part.clone(), *norm))
                .collect(),
            phase_seconds,
            checkpoints_total: self.checkpoint_seconds.get_sample_count(),
            last_checkpoint_seconds: *self
                .last_checkpoint_seconds
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            last_checkpoint_bytes: self.checkpoint_bytes.get().max(0) as u64,
            quality,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            run_id: "run-1".into(),
            rank: 1,
            generation: 2,
        }
    }

    #[test]
    fn exposition_names_and_labels() {
        let m = WorkerMetrics::new(&identity()).unwrap();
        m.start(0, 100);
        m.step_done(1, 0.01, 64, true);
        m.step_done(2, 0.02, 64, false);
        m.statistics(&[
            ("d_loss", 1.2),
            ("g_loss", 0.8),
            ("d_real", 0.6),
            ("d_fake", 0.3),
        ]);
        m.statistics(&[("neg_elbo", 104.5)]);
        m.phases(&[("data", 0.001), ("allreduce", 0.004)]);
        let text = m.render();
        let ours = [("run_id", "run-1"), ("rank", "1"), ("generation", "2")];
        let value = |name: &str| crate::testing::sample(&text, name, &ours);
        assert_eq!(value("gantry_train_steps_total"), Some(2.0), "{text}");
        assert_eq!(value("gantry_train_images_total"), Some(128.0));
        assert_eq!(value("gantry_train_nonfinite_steps_total"), Some(1.0));
        assert_eq!(value("gantry_train_discriminator_fake_mean"), Some(0.3));
        let named = |name: &str| {
            let mut labels = ours.to_vec();
            labels.push(("name", name));
            crate::testing::sample(&text, "gantry_train_statistic", &labels)
        };
        assert_eq!(named("d_fake"), Some(0.3));
        assert_eq!(named("neg_elbo"), Some(104.5));
        assert_eq!(value("gantry_train_step_duration_seconds_count"), Some(2.0));
        assert_eq!(
            crate::testing::sample(
                &text,
                "gantry_train_phase_duration_seconds_sum",
                &[("phase", "allreduce")]
            ),
            Some(0.004)
        );
        assert!(!text.contains("gantry_quality_fid"), "no evaluation yet");
    }

    #[test]
    fn quality_appears_after_the_first_evaluation() {
        let m = WorkerMetrics::new(&identity()).unwrap();
        let q = Quality {
            step: 50,
            fid: 123.5,
            inception_score: 4.5,
            classes_covered: 9,
        };
        m.quality(q).unwrap();
        m.quality(Quality { fid: 100.0, ..q }).unwrap();
        let text = m.render();
        assert_eq!(
            crate::testing::sample(&text, "gantry_quality_fid", &[("rank", "1")]),
            Some(100.0),
            "{text}"
        );
        assert!(text.contains("gantry_quality_classes_covered{"));
        assert_eq!(m.report().quality.map(|q| q.fid), Some(100.0));
    }

    #[test]
    fn the_report_carries_each_part_s_newest_gradient_norm() {
        let m = WorkerMetrics::new(&identity()).unwrap();
        assert!(m.report().gradient_norms.is_empty(), "none before a step");
        m.gradient_norm("pixelcnn", 3.0);
        m.gradient_norm("pixelcnn", 2.5);
        assert_eq!(
            m.report().gradient_norms,
            vec![("pixelcnn".to_owned(), 2.5)]
        );
        let text = m.render();
        assert_eq!(
            crate::testing::sample(
                &text,
                "gantry_train_gradient_norm",
                &[("network", "pixelcnn")]
            ),
            Some(2.5)
        );
    }

    #[test]
    fn report_phase_means_cover_the_steps_since_the_last_report() {
        let m = WorkerMetrics::new(&identity()).unwrap();
        m.phases(&[("data", 1.0)]);
        m.phases(&[("data", 3.0)]);
        let first = m.report();
        assert_eq!(first.phase_seconds, vec![("data".to_owned(), 2.0)]);
        m.phases(&[("data", 10.0)]);
        assert_eq!(m.report().phase_seconds, vec![("data".to_owned(), 10.0)]);
        // Over the whole run: (1 + 3 + 10) / 3.
        assert_eq!(m.phase_means(), vec![("data".to_owned(), 14.0 / 3.0)]);
        // No new step: the previous mean stands.
        assert_eq!(m.report().phase_seconds, vec![("data".to_owned(), 10.0)]);
        m.allreduce(4096, 0.5);
        m.checkpoint(2.0, 1000);
        let report = m.report();
        assert_eq!(report.allreduce_bytes_total, 4096);
        assert_eq!(report.checkpoints_total, 1);
        assert_eq!(report.last_checkpoint_bytes, 1000);
    }
}
