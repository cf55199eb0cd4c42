//! The job's past for the status page's charts: rank 0's named statistics, each rank's
//! throughput and the quality figures, as series of (step, value) points kept in the
//! coordinator's memory and served at `/api/history`.
//!
//! Memory is bounded however long the run: at most [`MAX_SERIES`] series of at most
//! [`MAX_POINTS`] points (16 bytes each: under 1 MiB in all). A series that fills up is
//! decimated: every other point goes (the first and the newest stay), and from then on a
//! point is kept only at the mean spacing of what remains, so the whole run stays visible,
//! old and recent stretches at the same density, at a resolution that halves each time the
//! series fills. The newest point always follows the job: until it is a full spacing past
//! the point before it, the next point replaces it.
//!
//! A series takes a point when new figures arrive, not on every poll. Rank 0's statistics and
//! a rank's throughput describe the newest *logged* step, and every heartbeat repeats them
//! until the next one, so a repeat is no new point; they are placed at the rank's step when
//! first seen (within a heartbeat of the logged step). The quality figures carry their own
//! step. A restarted generation resumes from a checkpoint and replays steps already drawn:
//! the points at or past the step it reports are dropped, so every series stays in step
//! order. Non-finite values (a skipped NaN step) are not drawable and are left out.
//!
//! The coordinator makes one [`History`] per job and shares it: the supervision loop records
//! into it and the HTTP routes read it.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use gantry_metrics::ClusterView;
use serde_json::{Value, json};

/// The most points one series holds.
pub const MAX_POINTS: usize = 512;
/// The most series the history holds: a family's statistics and the three quality figures,
/// with the rest for ranks. The throughput of ranks beyond it is not charted (the per-rank
/// series in `/metrics` still cover them).
pub const MAX_SERIES: usize = 96;

/// Bounded series of the job's figures over steps (see the module documentation).
#[derive(Debug)]
pub struct History {
    recorded: Mutex<Recorded>,
}

#[derive(Debug)]
struct Recorded {
    max_points: usize,
    max_series: usize,
    series: BTreeMap<Key, Series>,
    /// What the previous record saw, to tell new figures from repeats.
    seen_statistics: Vec<(String, f64)>,
    seen_throughput: BTreeMap<u32, f64>,
    seen_quality_step: Option<u64>,
    /// Whether a series was refused for want of room (warned about once).
    full: bool,
}

/// What a series is of; its order is the order of `/api/history`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// One of the family's named statistics, by name.
    Statistic(String),
    /// A rank's share of the throughput (images per second).
    Throughput(u32),
    Quality(Figure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    Fid,
    InceptionScore,
    ClassesCovered,
}

impl Figure {
    /// The name in `/api/history`, as in the `quality` object of `/api/status`.
    fn name(self) -> &'static str {
        match self {
            Self::Fid => "fid",
            Self::InceptionScore => "inception_score",
            Self::ClassesCovered => "classes_covered",
        }
    }
}

/// (step, value) points in step order, at most `max_points` of them.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    points: Vec<(u64, f64)>,
    /// The fewest steps between a point and the one before it; the newest point is exempt.
    spacing: u64,
}

impl Series {
    fn new() -> Self {
        Self {
            points: Vec::new(),
            spacing: 1,
        }
    }

    fn record(&mut self, step: u64, value: f64, max_points: usize) {
        if !value.is_finite() {
            return;
        }
        // A replayed stretch (a restart from a checkpoint) is drawn afresh from `step` on.
        let before_step = self.points.partition_point(|&(s, _)| s < step);
        self.points.truncate(before_step);
        if let [.., (before, _), (newest, _)] = self.points[..]
            && newest - before < self.spacing
        {
            self.points.pop();
        }
        self.points.push((step, value));
        if self.points.len() > max_points {
            self.decimate();
        }
    }

    /// Drops every other point but the newest, and widens the spacing to that of the rest.
    fn decimate(&mut self) {
        let Some(newest) = self.points.pop() else {
            return;
        };
        let mut index = 0;
        self.points.retain(|_| {
            index += 1;
            index % 2 == 1
        });
        // Each gap kept spans two of at least `spacing`: the spacing at least doubles.
        if let [(first, _), .., (last, _)] = self.points[..] {
            let mean = (last - first) / (self.points.len() as u64 - 1);
            self.spacing = mean.max(self.spacing * 2);
        }
        self.points.push(newest);
    }

    fn to_json(&self) -> Value {
        json!({
            "spacing": self.spacing,
            "points": self.points.iter().map(|&(s, v)| json!([s, v])).collect::<Vec<_>>(),
        })
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new(MAX_POINTS, MAX_SERIES)
    }
}

impl History {
    /// An empty history of at most `max_series` series of at most `max_points` points.
    pub const fn new(max_points: usize, max_series: usize) -> Self {
        // Decimation keeps the first and the newest point and halves the rest.
        assert!(max_points >= 4, "a series needs room for at least 4 points");
        Self {
            recorded: Mutex::new(Recorded {
                max_points,
                max_series,
                series: BTreeMap::new(),
                seen_statistics: Vec::new(),
                seen_throughput: BTreeMap::new(),
                seen_quality_step: None,
                full: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while recording leaves at worst a point too many or too few: keep serving.
        self.recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the figures of `view` that are new since the previous call. Cheap enough for
    /// every poll of the supervision loop.
    pub fn record(&self, view: &ClusterView) {
        let mut recorded = self.lock();
        let recorded = &mut *recorded;
        let lead_step = view.ranks.iter().find(|r| r.rank == 0).map(|r| r.step);
        if let (Some(lead), Some(step)) = (&view.lead, lead_step)
            && step > 0
            && !lead.statistics.is_empty()
            && !same_figures(&lead.statistics, &recorded.seen_statistics)
        {
            for (name, value) in &lead.statistics {
                recorded.add(Key::Statistic(name.clone()), step, *value);
            }
            recorded.seen_statistics.clone_from(&lead.statistics);
        }
        for rank in &view.ranks {
            let seen = recorded.seen_throughput.get(&rank.rank);
            // A rank reports no throughput (0) before its first logged step.
            if rank.step == 0
                || rank.images_per_second <= 0.0
                || seen.is_some_and(|s| s.to_bits() == rank.images_per_second.to_bits())
            {
                continue;
            }
            recorded.add(
                Key::Throughput(rank.rank),
                rank.step,
                rank.images_per_second,
            );
            recorded
                .seen_throughput
                .insert(rank.rank, rank.images_per_second);
        }
        if let Some(q) = view.lead.as_ref().and_then(|l| l.quality.as_ref())
            && q.step > 0
            && recorded.seen_quality_step != Some(q.step)
        {
            recorded.add(Key::Quality(Figure::Fid), q.step, q.fid);
            recorded.add(
                Key::Quality(Figure::InceptionScore),
                q.step,
                q.inception_score,
            );
            recorded.add(
                Key::Quality(Figure::ClassesCovered),
                q.step,
                f64::from(q.classes_covered),
            );
            recorded.seen_quality_step = Some(q.step);
        }
    }

    /// The history as `/api/history` serves it: `max_points`, and `statistics`,
    /// `images_per_second` and `quality`, each a list of series (named by `name`, or by
    /// `rank` for throughput) with their `spacing` and `points` (`[step, value]` pairs in
    /// step order).
    pub fn to_json(&self) -> Value {
        let recorded = self.lock();
        let mut statistics = Vec::new();
        let mut throughput = Vec::new();
        let mut quality = Vec::new();
        for (key, series) in &recorded.series {
            let (list, field, id) = match key {
                Key::Statistic(name) => (&mut statistics, "name", json!(name)),
                Key::Throughput(rank) => (&mut throughput, "rank", json!(rank)),
                Key::Quality(figure) => (&mut quality, "name", json!(figure.name())),
            };
            let mut entry = series.to_json();
            entry[field] = id;
            list.push(entry);
        }
        json!({
            "max_points": recorded.max_points,
            "statistics": statistics,
            "images_per_second": throughput,
            "quality": quality,
        })
    }
}

impl Recorded {
    fn add(&mut self, key: Key, step: u64, value: f64) {
        if !self.series.contains_key(&key) && self.series.len() >= self.max_series {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "coordinator: warning: the status page charts at most {} series; \
                     {key:?} and any later ones are not drawn",
                    self.max_series
                );
            }
            return;
        }
        self.series
            .entry(key)
            .or_insert_with(Series::new)
            .record(step, value, self.max_points);
    }
}

/// Whether two sets of named figures are the same, bit for bit (so a repeated NaN is a repeat).
fn same_figures(a: &[(String, f64)], b: &[(String, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, va), (nb, vb))| na == nb && va.to_bits() == vb.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_metrics::{LeadView, Quality, RankView};

    fn steps(series: &Series) -> Vec<u64> {
        series.points.iter().map(|&(s, _)| s).collect()
    }

    /// Gaps between consecutive points, the newest (which follows the job) left out.
    fn settled_gaps(series: &Series) -> Vec<u64> {
        let steps = steps(series);
        let settled = &steps[..steps.len() - 1];
        settled.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn a_long_run_stays_bounded_and_visible_from_its_first_step_to_its_newest() {
        let max_points = 64;
        let mut series = Series::new();
        for step in 1..=100_000 {
            series.record(step, step as f64, max_points);
            assert!(series.points.len() <= max_points, "at step {step}");
            assert!(steps(&series).windows(2).all(|w| w[0] < w[1]));
        }
        let steps = steps(&series);
        assert_eq!(steps.first(), Some(&1), "the run's start stays drawn");
        assert_eq!(
            steps.last(),
            Some(&100_000),
            "the newest point follows the job"
        );
        assert!(steps.len() > max_points / 2, "{} points", steps.len());
        // The same density everywhere: evenly spaced steps, at least `spacing` apart.
        let gaps = settled_gaps(&series);
        let (min, max) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
        assert!(
            *min >= series.spacing,
            "{gaps:?} spacing {}",
            series.spacing
        );
        assert!(max <= &(2 * min), "{gaps:?}");
        // Values stay attached to their steps.
        assert!(series.points.iter().all(|&(s, v)| v == s as f64));
    }

    #[test]
    fn sparse_polls_keep_old_and_recent_stretches_equally_dense() {
        // A fast job polled seldom: 50 steps between the points offered.
        let max_points = 32;
        let mut series = Series::new();
        for step in (50..=500_000).step_by(50) {
            series.record(step, 1.0, max_points);
        }
        let steps = steps(&series);
        let half = 500_000 / 2;
        let early = steps.iter().filter(|&&s| s <= half).count();
        let late = steps.len() - early;
        assert!(
            early.abs_diff(late) <= 2,
            "{early} points in the first half, {late} in the second: {steps:?}"
        );
    }

    #[test]
    fn a_replayed_stretch_is_redrawn_and_non_finite_values_are_left_out() {
        let mut series = Series::new();
        for step in [10, 20, 30, 40] {
            series.record(step, 1.0, 8);
        }
        series.record(50, f64::NAN, 8);
        series.record(60, f64::INFINITY, 8);
        assert_eq!(steps(&series), [10, 20, 30, 40]);
        // A restart from the checkpoint at step 20 reports step 25 next.
        series.record(25, 2.0, 8);
        assert_eq!(series.points, [(10, 1.0), (20, 1.0), (25, 2.0)]);
        series.record(20, 3.0, 8);
        assert_eq!(series.points, [(10, 1.0), (20, 3.0)]);
    }

    fn view(step: u64, statistics: &[(&str, f64)], throughput: f64) -> ClusterView {
        ClusterView {
            ranks: (0..2)
                .map(|rank| RankView {
                    rank,
                    step,
                    images_per_second: throughput,
                    ..RankView::default()
                })
                .collect(),
            lead: Some(LeadView {
                statistics: statistics
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), *v))
                    .collect(),
                ..LeadView::default()
            }),
            ..ClusterView::default()
        }
    }

    fn points(history: &Value, group: &str, index: usize) -> Vec<(u64, f64)> {
        history[group][index]["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    }

    #[test]
    fn only_new_figures_become_points_and_the_json_names_every_series() {
        let history = History::new(16, 16);
        // Before the first step, and before the first logged one, nothing is drawn.
        history.record(&view(0, &[], 0.0));
        history.record(&view(3, &[], 0.0));
        let empty = history.to_json();
        assert_eq!(empty["statistics"], json!([]));
        assert_eq!(empty["images_per_second"], json!([]));

        history.record(&view(10, &[("d_loss", 1.5), ("g_loss", 0.7)], 100.0));
        // The same logged step, repeated by later heartbeats, is not a new point.
        history.record(&view(12, &[("d_loss", 1.5), ("g_loss", 0.7)], 100.0));
        history.record(&view(20, &[("d_loss", 1.2), ("g_loss", 0.9)], 120.0));
        let mut quality = view(21, &[("d_loss", 1.2), ("g_loss", 0.9)], 120.0);
        quality.lead.as_mut().unwrap().quality = Some(Quality {
            step: 20,
            fid: 80.0,
            inception_score: 3.5,
            classes_covered: 9,
        });
        history.record(&quality);
        history.record(&quality);

        let json = history.to_json();
        assert_eq!(json["max_points"], 16);
        assert_eq!(json["statistics"][0]["name"], "d_loss");
        assert_eq!(points(&json, "statistics", 0), [(10, 1.5), (20, 1.2)]);
        assert_eq!(json["statistics"][1]["name"], "g_loss");
        assert_eq!(points(&json, "statistics", 1), [(10, 0.7), (20, 0.9)]);
        for rank in 0..2 {
            assert_eq!(json["images_per_second"][rank]["rank"], rank);
            assert_eq!(
                points(&json, "images_per_second", rank),
                [(10, 100.0), (20, 120.0)]
            );
        }
        let names: Vec<&str> = json["quality"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["fid", "inception_score", "classes_covered"]);
        assert_eq!(points(&json, "quality", 0), [(20, 80.0)]);
        assert_eq!(points(&json, "quality", 2), [(20, 9.0)]);
        assert_eq!(json["quality"][0]["spacing"], 1);
    }

    #[test]
    fn the_number_of_series_is_bounded() {
        let history = History::new(8, 5);
        let mut view = view(5, &[("nll", 2.0)], 10.0);
        view.ranks = (0..10)
            .map(|rank| RankView {
                rank,
                step: 5,
                images_per_second: 10.0,
                ..RankView::default()
            })
            .collect();
        history.record(&view);
        let json = history.to_json();
        assert_eq!(json["statistics"].as_array().unwrap().len(), 1);
        assert_eq!(json["images_per_second"].as_array().unwrap().len(), 4);
    }
}
