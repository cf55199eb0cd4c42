//! The supervision loop: signals, local worker exits and the job's [`Event`]s, each with a
//! small handler.
//!
//! The job decides (restart or give up, stop at which step); the supervisor does what only
//! a process can: stops and starts local workers, writes `summary.json`, and picks the
//! coordinator's exit code.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::exit;
use crate::history::History;
use crate::job::{Event, Failure, Job, Recovery, StopPlan};
use crate::progress::Reporter;
use crate::spawn::{self, LocalWorkers};

/// How long a generation's local workers get to exit after a failure, before SIGKILL.
const FAILED_GENERATION_GRACE: Duration = Duration::from_secs(3);
/// How long they get after a finished job (they exit by themselves after Finish).
const FINISHED_GRACE: Duration = Duration::from_secs(5);

pub struct Supervisor {
    job: Arc<Job>,
    /// The coordinator's own worker processes (`--workers N`); none for external workers.
    workers: Option<LocalWorkers>,
    progress: Reporter,
    /// The status page's charts, fed once per poll.
    history: Arc<History>,
    run_dir: PathBuf,
    /// The exit code the first signal asked for.
    stopped_by: Option<i32>,
    /// How the current generation's local workers have ended so far.
    exits: Vec<(String, ExitStatus)>,
}

impl Supervisor {
    pub fn new(
        job: Arc<Job>,
        workers: Option<LocalWorkers>,
        history: Arc<History>,
        run_dir: PathBuf,
    ) -> Self {
        let progress = Reporter::new(job.spec.total_steps);
        Self {
            job,
            workers,
            progress,
            history,
            run_dir,
            stopped_by: None,
            exits: Vec::new(),
        }
    }

    /// Supervises the job to its end and returns the coordinator's exit code.
    pub async fn run(mut self) -> Result<i32> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = interrupt.recv() => self.on_signal(exit::STOPPED),
                _ = terminate.recv() => self.on_signal(exit::TERMINATED),
            }
            self.reap_local_workers();
            self.progress.show(&self.job.status());
            // The status page's charts (the history has no use for the auth-failure count).
            self.history.record(&self.job.cluster_view(0));
            let ended = match self.job.poll(Instant::now()) {
                None => None,
                Some(Event::GenerationFailed(_)) => self.on_generation_failed()?,
                Some(Event::Done { summary_json }) => Some(self.on_done(&summary_json)?),
                Some(Event::Stopped { reason }) => Some(self.on_stopped(&reason)),
                Some(Event::Failed(failure)) => Some(self.on_failed(&failure)),
            };
            if let Some(code) = ended {
                return Ok(code);
            }
        }
    }

    /// SIGINT or SIGTERM: the job checkpoints and stops; the first signal sets the exit code.
    fn on_signal(&mut self, code: i32) {
        if self.stopped_by.is_some() {
            return;
        }
        self.stopped_by = Some(code);
        match self.job.request_stop() {
            StopPlan::AtStep(at) => self.say(&format!(
                "coordinator: signal received; workers checkpoint and stop at step {at}"
            )),
            // The next poll reports the end.
            StopPlan::Now => {}
        }
    }

    /// Tells the job about local workers that ended badly, and keeps every exit status for
    /// the failure report.
    fn reap_local_workers(&mut self) {
        let Some(workers) = self.workers.as_mut() else {
            return;
        };
        for (id, status) in workers.poll_exited() {
            if !status.success() {
                // A worker exits 1 for what no retry can fix; its Finish says so first when
                // it could still send one.
                let retryable = status.code() != Some(1);
                self.job
                    .worker_exited(&id, &spawn::describe_exit(status), retryable);
            }
            self.exits.push((id, status));
        }
    }

    /// Stops the failed generation's processes (so the report has the failed worker's exit
    /// status), then restarts the group or ends the job, as the job decides.
    fn on_generation_failed(&mut self) -> Result<Option<i32>> {
        let failed_generation = self.job.generation();
        if let Some(workers) = self.workers.as_mut() {
            self.exits.extend(workers.stop_all(FAILED_GENERATION_GRACE));
        }
        let exits = std::mem::take(&mut self.exits);
        // The processes are stopped (or, external ones, cut off): no checkpoint appears any
        // more, so the newest one is what the next generation resumes from.
        match gantry_store::run_dir::checkpoint_steps(&self.run_dir) {
            Ok(steps) => self.job.resumes_from(steps.last().copied().unwrap_or(0)),
            Err(e) => tracing::warn!("coordinator: cannot list the checkpoints: {e}"),
        }
        let recovery = self.job.recover(|failure| {
            failure.reason = with_exit_statuses(std::mem::take(&mut failure.reason), &exits);
        });
        match recovery {
            Recovery::Restart {
                failure,
                generation,
                restart,
            } => {
                self.say(&format!(
                    "coordinator: generation {failed_generation} failed: {}",
                    failure.reason
                ));
                self.say(&format!(
                    "coordinator: restarting the group from the newest checkpoint (restart \
                     {restart} of {})",
                    self.job.spec.max_restarts
                ));
                if let Some(workers) = self.workers.as_mut() {
                    workers.spawn_generation(generation)?;
                }
                Ok(None)
            }
            Recovery::GiveUp { failure, why } => {
                self.say(&format!(
                    "coordinator: generation {failed_generation} failed: {}",
                    failure.reason
                ));
                self.say(&format!("coordinator: {}", why.explain()));
                Ok(Some(self.on_failed(&failure)))
            }
        }
    }

    /// Every rank finished: write the summary, let the workers go, exit 0 (or the signal's
    /// code when a signal asked for the stop).
    fn on_done(&mut self, summary_json: &str) -> Result<i32> {
        self.progress.finish();
        let path = self.run_dir.join("summary.json");
        write_summary(&path, summary_json, &self.job)?;
        if let Some(workers) = self.workers.as_mut() {
            workers.stop_all(FINISHED_GRACE);
        }
        Ok(match self.stopped_by {
            Some(code) => {
                self.say(&format!(
                    "coordinator: stopped by signal after a checkpoint; continue with --resume {}",
                    self.run_dir.display()
                ));
                code
            }
            None => {
                self.say(&format!("coordinator: done; summary in {}", path.display()));
                exit::DONE
            }
        })
    }

    /// A stop before any group formed: no step ran, so there is nothing to checkpoint and
    /// no reason to wait out the rendezvous.
    fn on_stopped(&mut self, reason: &str) -> i32 {
        if let Some(workers) = self.workers.as_mut() {
            workers.stop_all(FAILED_GENERATION_GRACE);
        }
        self.progress.finish();
        self.say(&format!("coordinator: {reason}"));
        self.stopped_by.unwrap_or(exit::STOPPED)
    }

    fn on_failed(&mut self, failure: &Failure) -> i32 {
        if let Some(workers) = self.workers.as_mut() {
            workers.stop_all(FAILED_GENERATION_GRACE);
        }
        self.progress.finish();
        self.say(&format!(
            "coordinator: job failed after {} restart(s): {}",
            self.job.restarts(),
            failure.reason
        ));
        exit::FAILED
    }

    fn say(&self, line: &str) {
        self.progress.println(line);
    }
}

/// `reason`, plus the exit status of each local worker it names (when not already stated):
/// "rank 1 (local-g2-w0) failed: ...; local-g2-w0 exited with exit status 1".
fn with_exit_statuses(mut reason: String, exits: &[(String, ExitStatus)]) -> String {
    for (id, status) in exits {
        let how = spawn::describe_exit(*status);
        if reason.contains(id.as_str()) && !reason.contains(&how) {
            reason.push_str(&format!("; {id} exited with {how}"));
        }
    }
    reason
}

/// Rank 0's summary plus what only the coordinator knows, written atomically: the restarts,
/// and each group that formed (`generations`: world size and step range), the final one's
/// world size as `world_size`.
fn write_summary(path: &Path, rank0: &str, job: &Job) -> Result<()> {
    let mut summary: serde_json::Value = serde_json::from_str(rank0).context("rank 0's summary")?;
    let records = job.records();
    if let Some(object) = summary.as_object_mut() {
        object.insert("restarts".into(), job.restarts().into());
        object.insert("generation".into(), job.generation().into());
        object.insert("run_id".into(), job.spec.run_id.clone().into());
        object.insert("workers_expected".into(), job.spec.world_size.into());
        if let Some(last) = records.last() {
            object.insert("world_size".into(), last.world_size.into());
        }
        let generations = records.iter().map(|r| r.to_json()).collect();
        object.insert("generations".into(), serde_json::Value::Array(generations));
    }
    let text = serde_json::to_string_pretty(&summary)? + "\n";
    gantry_store::atomic::write(path, text.as_bytes())?;
    Ok(())
}
