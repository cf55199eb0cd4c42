//! The job's state machine: rendezvous, training, failure detection, recovery.
//!
//! All state sits behind one mutex; RPC handlers and the supervision loop take it for short,
//! non-blocking critical sections. A generation is one attempt of the whole group: a failure
//! ends it, and the next generation re-forms the group from the newest checkpoint.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gantry_metrics::{ClusterTotals, ClusterView, LeadView, RankView};
use gantry_proto::ClusterError;
use gantry_proto::v1::{
    Command, FinishRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
    StatusResponse, WorkerFigures, WorkerState, WorkerStatus,
};
use tokio::sync::oneshot;
use tonic::Status;

/// What the group trains and how it is supervised.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub run_id: String,
    pub version: String,
    pub settings_toml: String,
    pub fingerprint: String,
    pub world_size: u32,
    pub total_steps: u64,
    pub backend: String,
    pub workers_on_host: u32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// No step anywhere for this long while every worker still heartbeats = a hang.
    pub stall_timeout: Duration,
    pub max_restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Rendezvous,
    Training,
    Done,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Rendezvous => "rendezvous",
            Phase::Training => "training",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub worker_id: String,
    pub host: String,
    pub device: String,
    pub rank: u32,
    pub last_seen: Instant,
    pub state: WorkerState,
    pub step: u64,
    pub collective_seq: u64,
    /// The family's named statistics of the newest logged step (group averages).
    pub statistics: std::collections::BTreeMap<String, f64>,
    pub images_per_second: f64,
    pub step_seconds: f64,
    /// host:port of the worker's /metrics (empty if it has none).
    pub metrics_addr: String,
    /// The newest figures from its heartbeats.
    pub figures: Option<WorkerFigures>,
    pub finished: Option<Result<(), String>>,
    /// The session credential handed out in this member's Join reply.
    credential: String,
}

/// Why a generation ended badly.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub rank: Option<u32>,
    pub reason: String,
    /// Whether a restart of the group could get past it. A worker's own non-retryable
    /// report (a bad configuration, a full disk) ends the job: retrying cannot help.
    pub retryable: bool,
}

/// Who a worker RPC claims to come from.
#[derive(Debug, Clone, Copy)]
struct Speaker<'a> {
    worker_id: &'a str,
    rank: u32,
    generation: u64,
    credential: &'a str,
}

type PendingJoin = (JoinRequest, oneshot::Sender<Result<JoinResponse, Status>>);

#[derive(Debug)]
struct State {
    generation: u64,
    phase: Phase,
    phase_since: Instant,
    restarts: u32,
    resume: bool,
    pending: Vec<PendingJoin>,
    members: Vec<Member>,
    last_progress: (u64, Instant),
    stop_at: Option<u64>,
    checkpoint_at: Option<u64>,
    paused: bool,
    summary_json: Option<String>,
    failure: Option<Failure>,
    /// A failure a worker reported about itself. Often it is the echo of another rank's death
    /// (its peer vanished mid all-reduce), so it waits briefly for the root cause to show.
    reported: Option<(Instant, Failure)>,
    /// The workers' counters, accumulated over every generation.
    totals: ClusterTotals,
}

/// How long a worker-reported failure waits for a process exit or a missed heartbeat that
/// would name the rank that actually failed.
const REPORT_GRACE: Duration = Duration::from_millis(1500);

/// The shared job.
#[derive(Debug)]
pub struct Job {
    pub spec: JobSpec,
    state: Mutex<State>,
}

impl Job {
    pub fn new(spec: JobSpec, resume: bool) -> Self {
        let now = Instant::now();
        Self {
            spec,
            state: Mutex::new(State {
                generation: 0,
                phase: Phase::Rendezvous,
                phase_since: now,
                restarts: 0,
                resume,
                pending: Vec::new(),
                members: Vec::new(),
                last_progress: (0, now),
                stop_at: None,
                checkpoint_at: None,
                paused: false,
                summary_json: None,
                failure: None,
                reported: None,
                totals: ClusterTotals::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn restarts(&self) -> u32 {
        self.lock().restarts
    }

    pub fn summary_json(&self) -> Option<String> {
        self.lock().summary_json.clone()
    }

    pub fn failure(&self) -> Option<Failure> {
        self.lock().failure.clone()
    }

    /// Registers a worker for the current generation. The returned receiver yields its
    /// assignment once the whole group has joined.
    pub fn join(
        &self,
        request: JoinRequest,
    ) -> Result<oneshot::Receiver<Result<JoinResponse, Status>>, ClusterError> {
        let spec = &self.spec;
        crate::admit::check(&request)?;
        if request.version != spec.version {
            return Err(ClusterError::Mismatch {
                field: "version",
                worker: request.version,
                coordinator: spec.version.clone(),
            });
        }
        if !request.config_hash.is_empty() && request.config_hash != spec.fingerprint {
            return Err(ClusterError::Mismatch {
                field: "config hash",
                worker: request.config_hash,
                coordinator: spec.fingerprint.clone(),
            });
        }
        if request.expected_world_size != 0 && request.expected_world_size != spec.world_size {
            return Err(ClusterError::Mismatch {
                field: "world size",
                worker: request.expected_world_size.to_string(),
                coordinator: spec.world_size.to_string(),
            });
        }
        let mut state = self.lock();
        match state.phase {
            Phase::Rendezvous => {}
            Phase::Done | Phase::Failed => return Err(ClusterError::ShuttingDown),
            Phase::Training => {
                return Err(ClusterError::WorldFull {
                    world_size: spec.world_size,
                    generation: state.generation,
                });
            }
        }
        if state
            .pending
            .iter()
            .any(|(r, _)| r.worker_id == request.worker_id)
        {
            return Err(ClusterError::InvalidArgument(format!(
                "worker {:?} already joined",
                request.worker_id
            )));
        }
        // A worker that gave up waiting (its Join call dropped) frees its place.
        state.pending.retain(|(_, tx)| !tx.is_closed());
        let (tx, rx) = oneshot::channel();
        state.pending.push((request, tx));
        if state.pending.len() == spec.world_size as usize {
            self.form_group(&mut state);
        }
        Ok(rx)
    }

    /// Assigns ranks in join order and answers every pending Join.
    fn form_group(&self, state: &mut State) {
        let now = Instant::now();
        let mut pending = std::mem::take(&mut state.pending);
        // The coordinator's own local workers take the rank their id names (local-g0-w1 is
        // rank 1, whichever joined first); other workers keep their join order, after them.
        let generation = state.generation;
        pending.sort_by_key(|(r, _)| {
            crate::spawn::local_worker_index(generation, &r.worker_id).unwrap_or(usize::MAX)
        });
        let peers: Vec<String> = pending.iter().map(|(r, _)| r.ring_addr.clone()).collect();
        // `auto` means NCCL when every worker trains on a GPU, the CPU ring otherwise.
        let all_cuda = pending.iter().all(|(r, _)| r.device.starts_with("cuda"));
        let backend = match self.spec.backend.as_str() {
            "ring" => "ring",
            "nccl" => "nccl",
            _ if all_cuda => "nccl",
            _ => "ring",
        };
        // Fresh per generation: a rank of an earlier one cannot join this ring.
        let ring_secret: [u8; 32] = rand::random();
        let nccl_id = if backend == "nccl" {
            // NCCL's bootstrap root runs in the process that creates the id: this one,
            // which outlives every generation.
            match gantry_collective::nccl::NcclId::new() {
                Ok(id) => id.as_bytes().to_vec(),
                Err(e) => {
                    let reason = format!("cannot set up the nccl backend: {e}");
                    for (_, tx) in pending {
                        let _ = tx.send(Err(Status::failed_precondition(reason.clone())));
                    }
                    state.failure = Some(Failure {
                        rank: None,
                        reason,
                        retryable: false,
                    });
                    return;
                }
            }
        } else {
            Vec::new()
        };
        state.members = pending
            .iter()
            .enumerate()
            .map(|(rank, (r, _))| Member {
                worker_id: r.worker_id.clone(),
                host: r.host.clone(),
                device: r.device.clone(),
                rank: rank as u32,
                last_seen: now,
                state: WorkerState::Starting,
                step: 0,
                collective_seq: 0,
                statistics: Default::default(),
                images_per_second: 0.0,
                step_seconds: 0.0,
                metrics_addr: r.metrics_addr.clone(),
                figures: None,
                finished: None,
                credential: crate::auth::generate_token(),
            })
            .collect();
        state.phase = Phase::Training;
        state.phase_since = now;
        state.last_progress = (0, now);
        for ((rank, (_, tx)), member) in pending.into_iter().enumerate().zip(&state.members) {
            let _ = tx.send(Ok(JoinResponse {
                rank: rank as u32,
                world_size: self.spec.world_size,
                run_id: self.spec.run_id.clone(),
                generation: state.generation,
                config_toml: self.spec.settings_toml.clone(),
                ring_peers: peers.clone(),
                nccl_id: nccl_id.clone(),
                backend: backend.to_owned(),
                resume: state.resume,
                workers_on_host: self.spec.workers_on_host,
                session_credential: member.credential.clone(),
                ring_secret: ring_secret.to_vec(),
            }));
        }
    }

    /// The member a worker RPC speaks for, once it has proven to be that member: the worker
    /// id, rank and generation must be those of one Join reply, and the session credential
    /// the one that reply handed out.
    fn member_mut<'a>(
        state: &'a mut State,
        speaker: Speaker<'_>,
    ) -> Result<&'a mut Member, ClusterError> {
        use subtle::ConstantTimeEq;
        let current = state.generation;
        if speaker.generation > current {
            return Err(ClusterError::InvalidArgument(format!(
                "generation {} does not exist; the job is at generation {current}",
                speaker.generation
            )));
        }
        if speaker.generation < current {
            return Err(ClusterError::StaleGeneration {
                stale: speaker.generation,
                current,
            });
        }
        let member = state
            .members
            .iter_mut()
            .find(|m| m.worker_id == speaker.worker_id)
            .ok_or_else(|| ClusterError::UnknownWorker(speaker.worker_id.to_owned()))?;
        let presented = speaker.credential.as_bytes();
        let proven = presented.len() == member.credential.len()
            && bool::from(presented.ct_eq(member.credential.as_bytes()));
        if !proven {
            return Err(ClusterError::PermissionDenied(format!(
                "the session credential is not worker {:?}'s",
                speaker.worker_id
            )));
        }
        if speaker.rank != member.rank {
            return Err(ClusterError::PermissionDenied(format!(
                "worker {:?} is rank {}, not rank {}",
                speaker.worker_id, member.rank, speaker.rank
            )));
        }
        Ok(member)
    }

    pub fn heartbeat(&self, hb: &HeartbeatRequest) -> Result<HeartbeatResponse, ClusterError> {
        let mut state = self.lock();
        let member = Self::member_mut(
            &mut state,
            Speaker {
                worker_id: &hb.worker_id,
                rank: hb.rank,
                generation: hb.generation,
                credential: &hb.session_credential,
            },
        )?;
        member.last_seen = Instant::now();
        member.state = WorkerState::try_from(hb.state).unwrap_or(WorkerState::Unspecified);
        member.step = hb.step;
        member.collective_seq = hb.collective_seq;
        member.step_seconds = hb.step_seconds;
        if !hb.statistics.is_empty() {
            member.statistics = hb
                .statistics
                .iter()
                .map(|(name, value)| (name.clone(), *value))
                .collect();
        }
        member.images_per_second = hb.images_per_second;
        if let Some(figures) = &hb.figures {
            let increase = figures_increase(member.figures.as_ref(), figures, member.rank == 0);
            member.figures = Some(figures.clone());
            let totals = &mut state.totals;
            totals.images += increase.images;
            totals.nonfinite_steps += increase.nonfinite_steps;
            totals.allreduce_bytes += increase.allreduce_bytes;
            totals.allreduce_seconds += increase.allreduce_seconds;
            totals.checkpoints += increase.checkpoints;
        }
        let step = hb.step;
        if step > state.last_progress.0 {
            state.last_progress = (step, Instant::now());
        }
        let (command, at_step) = match (state.phase, state.stop_at, state.checkpoint_at) {
            (Phase::Failed, _, _) => (Command::Abort, 0),
            (_, Some(at), _) => (Command::Stop, at),
            (_, None, Some(at)) if step < at => (Command::Checkpoint, at),
            _ if state.paused => (Command::Pause, 0),
            _ => (Command::Continue, 0),
        };
        Ok(HeartbeatResponse {
            command: command as i32,
            at_step,
        })
    }

    pub fn finish(&self, request: &FinishRequest) -> Result<(), ClusterError> {
        let mut state = self.lock();
        let member = Self::member_mut(
            &mut state,
            Speaker {
                worker_id: &request.worker_id,
                rank: request.rank,
                generation: request.generation,
                credential: &request.session_credential,
            },
        )?;
        member.last_seen = Instant::now();
        member.step = member.step.max(request.step);
        member.finished = Some(if request.ok {
            Ok(())
        } else {
            Err(request.error.clone())
        });
        if request.ok {
            member.state = WorkerState::Done;
        }
        if request.rank == 0 && request.ok && !request.summary_json.is_empty() {
            state.summary_json = Some(request.summary_json.clone());
        }
        if !request.ok {
            let failure = Failure {
                rank: Some(request.rank),
                reason: format!(
                    "rank {} ({}) failed: {}",
                    request.rank, request.worker_id, request.error
                ),
                retryable: request.retryable,
            };
            if !failure.retryable {
                // The root cause, by the worker's own account: it outranks the echoes (a
                // peer that lost this rank, this rank's own exit status) already recorded.
                if state.failure.as_ref().is_none_or(|f| f.retryable) {
                    state.failure = Some(failure);
                }
            } else if state.reported.is_none() {
                state.reported = Some((Instant::now(), failure));
            }
        }
        let all_ok = !state.members.is_empty()
            && state
                .members
                .iter()
                .all(|m| matches!(m.finished, Some(Ok(()))));
        if all_ok && state.phase == Phase::Training {
            state.phase = Phase::Done;
            state.phase_since = Instant::now();
        }
        Ok(())
    }

    /// The supervision loop's check: the first problem of the current generation, if any.
    pub fn check_health(&self, now: Instant) -> Option<Failure> {
        let state = self.lock();
        if let Some(failure) = &state.failure {
            return Some(failure.clone());
        }
        if let Some((at, failure)) = &state.reported
            && now.duration_since(*at) > REPORT_GRACE
        {
            return Some(failure.clone());
        }
        let spec = &self.spec;
        match state.phase {
            Phase::Rendezvous => {
                let waited = now.duration_since(state.phase_since);
                if waited > spec.rendezvous_timeout {
                    let joined: Vec<String> = state
                        .pending
                        .iter()
                        .filter(|(_, tx)| !tx.is_closed())
                        .map(|(r, _)| format!("{} ({})", r.worker_id, r.ring_addr))
                        .collect();
                    return Some(Failure {
                        rank: None,
                        retryable: true,
                        reason: format!(
                            "rendezvous timed out after {:.0} s: {} of {} workers joined: [{}]",
                            waited.as_secs_f64(),
                            joined.len(),
                            spec.world_size,
                            joined.join(", ")
                        ),
                    });
                }
                None
            }
            Phase::Training => {
                for m in state.members.iter().filter(|m| m.finished.is_none()) {
                    let silent = now.duration_since(m.last_seen);
                    if silent > spec.heartbeat_timeout {
                        return Some(Failure {
                            rank: Some(m.rank),
                            retryable: true,
                            reason: format!(
                                "rank {} ({} on {}) missed heartbeats for {:.1} s (last step {})",
                                m.rank,
                                m.worker_id,
                                m.host,
                                silent.as_secs_f64(),
                                m.step
                            ),
                        });
                    }
                }
                let stalled = now.duration_since(state.last_progress.1);
                if !state.paused && stalled > spec.stall_timeout {
                    let laggard = state.members.iter().min_by_key(|m| m.collective_seq)?;
                    return Some(Failure {
                        rank: Some(laggard.rank),
                        retryable: true,
                        reason: format!(
                            "no progress for {:.0} s; rank {} ({}) lags in collectives (sequence {} vs max {})",
                            stalled.as_secs_f64(),
                            laggard.rank,
                            laggard.worker_id,
                            laggard.collective_seq,
                            state
                                .members
                                .iter()
                                .map(|m| m.collective_seq)
                                .max()
                                .unwrap_or(0)
                        ),
                    });
                }
                None
            }
            Phase::Done | Phase::Failed => None,
        }
    }

    /// Records a failure found outside the RPCs (a local worker process that exited). What
    /// that worker reported in its Finish, if anything, is the cause and is told with it.
    pub fn report_failure(&self, mut failure: Failure) {
        let mut state = self.lock();
        if state.failure.is_none() && matches!(state.phase, Phase::Rendezvous | Phase::Training) {
            let said = state
                .members
                .iter()
                .find(|m| Some(m.rank) == failure.rank)
                .and_then(|m| m.finished.clone())
                .and_then(Result::err);
            if let Some(error) = said {
                failure.reason = format!("{}; it reported: {error}", failure.reason);
            }
            state.failure = Some(failure);
        }
    }

    /// Ends the current generation after a failure. Returns false (and marks the job failed)
    /// when the restart budget is spent; otherwise opens the next generation's rendezvous,
    /// which resumes from the newest checkpoint.
    pub fn next_generation(&self) -> bool {
        let mut state = self.lock();
        if state.restarts >= self.spec.max_restarts {
            state.phase = Phase::Failed;
            return false;
        }
        state.restarts += 1;
        state.generation += 1;
        state.phase = Phase::Rendezvous;
        state.phase_since = Instant::now();
        state.resume = true;
        state.members.clear();
        state.pending.clear();
        state.failure = None;
        state.reported = None;
        state.stop_at = None;
        state.checkpoint_at = None;
        true
    }

    /// Asks every rank to stop (after a checkpoint) at the same step, a little ahead of the
    /// fastest one so that the command reaches all of them first.
    pub fn request_stop(&self) -> u64 {
        let mut state = self.lock();
        let at = self.common_future_step(&state);
        state.stop_at = Some(at);
        at
    }

    pub fn request_checkpoint(&self) -> u64 {
        let mut state = self.lock();
        let at = self.common_future_step(&state);
        state.checkpoint_at = Some(at);
        at
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
    }

    fn common_future_step(&self, state: &State) -> u64 {
        let max_step = state.members.iter().map(|m| m.step).max().unwrap_or(0);
        let step_seconds = state
            .members
            .iter()
            .map(|m| m.step_seconds)
            .filter(|s| *s > 0.0)
            .fold(f64::INFINITY, f64::min);
        // Two heartbeat intervals' worth of steps, so every rank hears of it in time.
        let lead = if step_seconds.is_finite() {
            (2.0 * self.spec.heartbeat_interval.as_secs_f64() / step_seconds).ceil() as u64
        } else {
            0
        };
        (max_step + lead.max(2)).min(self.spec.total_steps)
    }

    /// Worker ids of the current generation's members (to tell local processes apart).
    pub fn member_ids(&self) -> HashSet<String> {
        self.lock()
            .members
            .iter()
            .map(|m| m.worker_id.clone())
            .collect()
    }

    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.lock()
            .members
            .iter()
            .find(|m| m.worker_id == worker_id)
            .map(|m| m.rank)
    }

    /// The job as the coordinator's metrics show it.
    pub fn cluster_view(&self, auth_failures: u64) -> ClusterView {
        let state = self.lock();
        let now = Instant::now();
        let alive = self.alive(&state, now);
        let lead = state.members.iter().find(|m| m.rank == 0).map(|m| {
            let f = m.figures.clone().unwrap_or_default();
            LeadView {
                statistics: m
                    .statistics
                    .iter()
                    .map(|(name, value)| (name.clone(), *value))
                    .collect(),
                gradient_norms: f
                    .gradient_norms
                    .iter()
                    .map(|(part, norm)| (part.clone(), *norm))
                    .collect(),
                last_checkpoint_seconds: f.last_checkpoint_seconds,
                last_checkpoint_bytes: f.last_checkpoint_bytes,
                quality: f.quality.map(|q| gantry_metrics::Quality {
                    step: q.step,
                    fid: q.fid,
                    inception_score: q.inception_score,
                    classes_covered: q.classes_covered,
                }),
            }
        });
        ClusterView {
            phase: state.phase.as_str(),
            generation: state.generation,
            restarts: u64::from(state.restarts),
            auth_failures,
            workers_expected: u64::from(self.spec.world_size),
            workers_alive: alive as u64,
            step: state.members.iter().map(|m| m.step).min().unwrap_or(0),
            total_steps: self.spec.total_steps,
            totals: state.totals,
            ranks: state
                .members
                .iter()
                .map(|m| RankView {
                    rank: m.rank,
                    step: m.step,
                    step_seconds: m.step_seconds,
                    // Workers report the group's throughput; this rank's share is 1/world.
                    images_per_second: m.images_per_second / f64::from(self.spec.world_size.max(1)),
                    heartbeat_age_seconds: now.duration_since(m.last_seen).as_secs_f64(),
                    phase_seconds: m
                        .figures
                        .as_ref()
                        .map(|f| {
                            let mut phases: Vec<(String, f64)> = f
                                .phase_seconds
                                .iter()
                                .map(|(k, v)| (k.clone(), *v))
                                .collect();
                            phases.sort_by(|a, b| a.0.cmp(&b.0));
                            phases
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            lead,
        }
    }

    /// (rank, host:port) of each current member's /metrics endpoint.
    pub fn metrics_targets(&self) -> Vec<(u32, String)> {
        self.lock()
            .members
            .iter()
            .filter(|m| !m.metrics_addr.is_empty())
            .map(|m| (m.rank, m.metrics_addr.clone()))
            .collect()
    }

    /// Members heard from within the heartbeat timeout.
    fn alive(&self, state: &State, now: Instant) -> usize {
        state
            .members
            .iter()
            .filter(|m| now.duration_since(m.last_seen) <= self.spec.heartbeat_timeout)
            .count()
    }

    pub fn status(&self) -> StatusResponse {
        let state = self.lock();
        let now = Instant::now();
        let alive = self.alive(&state, now);
        let step = state.members.iter().map(|m| m.step).min().unwrap_or(0);
        let lead = state.members.iter().find(|m| m.rank == 0);
        StatusResponse {
            run_id: self.spec.run_id.clone(),
            generation: state.generation,
            phase: state.phase.as_str().into(),
            step,
            total_steps: self.spec.total_steps,
            world_size: self.spec.world_size,
            workers_alive: alive as u32,
            restarts: state.restarts,
            paused: state.paused,
            statistics: lead
                .map(|m| {
                    m.statistics
                        .iter()
                        .map(|(name, value)| (name.clone(), *value))
                        .collect()
                })
                .unwrap_or_default(),
            images_per_second: lead.map_or(0.0, |m| m.images_per_second),
            workers: state
                .members
                .iter()
                .map(|m| WorkerStatus {
                    rank: m.rank,
                    worker_id: m.worker_id.clone(),
                    host: m.host.clone(),
                    device: m.device.clone(),
                    state: m.state as i32,
                    step: m.step,
                    seconds_since_heartbeat: now.duration_since(m.last_seen).as_secs_f64(),
                    images_per_second: m.images_per_second,
                    step_seconds: m.step_seconds,
                })
                .collect(),
        }
    }
}

/// What a worker's counters grew by since its previous heartbeat (all of them for its first).
/// Steps skipped and checkpoints are the group's, counted on rank 0 alone.
fn figures_increase(
    previous: Option<&WorkerFigures>,
    now: &WorkerFigures,
    lead: bool,
) -> ClusterTotals {
    let before = previous.cloned().unwrap_or_default();
    let grew = |now: u64, before: u64| now.saturating_sub(before);
    ClusterTotals {
        images: grew(now.images_total, before.images_total),
        nonfinite_steps: if lead {
            grew(now.nonfinite_total, before.nonfinite_total)
        } else {
            0
        },
        allreduce_bytes: grew(now.allreduce_bytes_total, before.allreduce_bytes_total),
        allreduce_seconds: (now.allreduce_seconds_total - before.allreduce_seconds_total).max(0.0),
        checkpoints: if lead {
            grew(now.checkpoints_total, before.checkpoints_total)
        } else {
            0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(world: u32) -> JobSpec {
        JobSpec {
            run_id: "run".into(),
            version: "1.0".into(),
            settings_toml: String::new(),
            fingerprint: "abc".into(),
            world_size: world,
            total_steps: 100,
            backend: "ring".into(),
            workers_on_host: 1,
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(500),
            rendezvous_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            max_restarts: 1,
        }
    }

    fn join_request(id: &str) -> JoinRequest {
        JoinRequest {
            worker_id: id.into(),
            version: "1.0".into(),
            ring_addr: "127.0.0.1:1000".into(),
            device: "cpu".into(),
            ..Default::default()
        }
    }

    /// Joins `ids` in order and returns their Join replies (the group forms with the last).
    fn form(job: &Job, ids: &[&str]) -> Vec<JoinResponse> {
        let pending: Vec<_> = ids
            .iter()
            .map(|id| job.join(join_request(id)).unwrap())
            .collect();
        pending
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().unwrap())
            .collect()
    }

    /// A heartbeat as the worker `id` that got `reply` sends it.
    fn beat(reply: &JoinResponse, id: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            worker_id: id.into(),
            generation: reply.generation,
            rank: reply.rank,
            session_credential: reply.session_credential.clone(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_member_itself_can_heartbeat_or_finish_for_it() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        let (a, b) = (&replies[0], &replies[1]);
        assert_ne!(a.session_credential, b.session_credential);
        assert!(a.session_credential.len() >= 32);
        job.heartbeat(&beat(a, "a")).unwrap();

        // Holding the join token (every request here does) is not enough.
        let mut forged = beat(a, "a");
        forged.session_credential = "guess".into();
        let err = job.heartbeat(&forged).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        // Rank 1's credential does not speak for rank 0, nor rank 0's for another rank.
        let mut borrowed = beat(b, "a");
        borrowed.rank = 0;
        assert_eq!(
            job.heartbeat(&borrowed).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let mut other_rank = beat(a, "a");
        other_rank.rank = 1;
        let err = job.heartbeat(&other_rank).unwrap_err();
        assert!(err.to_string().contains("is rank 0, not rank 1"), "{err}");
        // A forged Finish(ok) for every rank neither ends the job nor sets its summary.
        for (reply, id) in [(a, "a"), (b, "b")] {
            let forged = FinishRequest {
                worker_id: id.into(),
                rank: reply.rank,
                generation: reply.generation,
                ok: true,
                summary_json: "{\"evil\": true}".into(),
                session_credential: "forged".into(),
                ..Default::default()
            };
            assert_eq!(
                job.finish(&forged).unwrap_err().code(),
                tonic::Code::PermissionDenied
            );
        }
        assert_eq!(job.phase(), Phase::Training);
        assert_eq!(job.summary_json(), None);
        // A generation that never existed is named as such, not as one that is over.
        let mut future = beat(a, "a");
        future.generation = 99;
        let err = job.heartbeat(&future).unwrap_err();
        assert!(
            err.to_string().contains("generation 99 does not exist"),
            "{err}"
        );
    }

    #[test]
    fn local_workers_take_the_rank_their_id_names() {
        let job = Job::new(spec(3), false);
        let ids = ["local-g0-w2", "external", "local-g0-w0"];
        let replies = form(&job, &ids);
        let ranks: Vec<u32> = replies.iter().map(|r| r.rank).collect();
        assert_eq!(
            ranks,
            [1, 2, 0],
            "w0 is rank 0, w2 rank 1 of the local ones, then others"
        );
        // Only the current generation's ids count.
        assert_eq!(crate::spawn::local_worker_index(0, "local-g1-w0"), None);
        assert_eq!(crate::spawn::local_worker_index(1, "local-g1-w3"), Some(3));
    }

    #[test]
    fn group_forms_when_all_joined_and_ranks_follow_join_order() {
        let job = Job::new(spec(2), false);
        let mut a = job.join(join_request("a")).unwrap();
        assert!(
            a.try_recv().is_err(),
            "no answer before the group is complete"
        );
        let mut b = job.join(join_request("b")).unwrap();
        let (a, b) = (
            a.try_recv().unwrap().unwrap(),
            b.try_recv().unwrap().unwrap(),
        );
        assert_eq!((a.rank, b.rank, a.world_size), (0, 1, 2));
        assert_eq!(a.ring_peers, vec!["127.0.0.1:1000".to_owned(); 2]);
        assert_eq!(a.backend, "ring");
        assert_eq!(job.phase(), Phase::Training);
        let err = job.join(join_request("c")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn mismatches_name_the_field_and_both_values() {
        let job = Job::new(spec(2), false);
        let mut r = join_request("a");
        r.version = "0.9".into();
        let err = job.join(r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("version") && err.to_string().contains("0.9"));
        let mut r = join_request("a");
        r.config_hash = "other".into();
        let err = job.join(r).unwrap_err();
        assert!(err.to_string().contains("config hash") && err.to_string().contains("abc"));
        let mut r = join_request("a");
        r.expected_world_size = 3;
        assert_eq!(
            job.join(r).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let mut r = join_request("a");
        r.ring_addr = "nowhere".into();
        assert_eq!(
            job.join(r).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn silent_rank_fails_the_generation_and_old_generations_are_aborted() {
        let job = Job::new(spec(1), false);
        let a = form(&job, &["a"]);
        let hb = HeartbeatRequest {
            step: 5,
            ..beat(&a[0], "a")
        };
        assert!(job.heartbeat(&hb).is_ok());
        assert!(job.check_health(Instant::now()).is_none());
        let failure = job
            .check_health(Instant::now() + Duration::from_secs(2))
            .unwrap();
        assert_eq!(failure.rank, Some(0));
        assert!(
            failure.reason.contains("missed heartbeats"),
            "{}",
            failure.reason
        );

        assert!(job.next_generation());
        assert_eq!(job.heartbeat(&hb).unwrap_err().code(), tonic::Code::Aborted);
        let resumed = job
            .join(join_request("a2"))
            .unwrap()
            .try_recv()
            .unwrap()
            .unwrap();
        assert!(resumed.resume);
        assert_eq!(resumed.generation, 1);
        // The restart budget (1) is spent: the next failure ends the job.
        assert!(!job.next_generation());
        assert_eq!(job.phase(), Phase::Failed);
    }

    #[test]
    fn a_rank_reported_failure_waits_for_the_root_cause() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        let finish = FinishRequest {
            worker_id: "a".into(),
            rank: 0,
            session_credential: replies[0].session_credential.clone(),
            ok: false,
            retryable: true,
            error: "peer disconnected".into(),
            ..Default::default()
        };
        job.finish(&finish).unwrap();
        assert!(
            job.check_health(Instant::now()).is_none(),
            "within the grace period"
        );
        job.report_failure(Failure {
            rank: Some(1),
            reason: "rank 1 killed by signal 9".into(),
            retryable: true,
        });
        assert_eq!(job.check_health(Instant::now()).unwrap().rank, Some(1));
    }

    #[test]
    fn a_non_retryable_report_is_the_root_cause_and_ends_the_restarts() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        // Rank 1's process exit (the echo: its peer vanished) is noticed first...
        job.report_failure(Failure {
            rank: Some(1),
            reason: "rank 1 (b) exit status 75".into(),
            retryable: true,
        });
        // ...then rank 0's own account of why it stopped arrives.
        let fatal = FinishRequest {
            worker_id: "a".into(),
            rank: 0,
            session_credential: replies[0].session_credential.clone(),
            ok: false,
            retryable: false,
            error: "writing checkpoint: No space left on device (os error 28)".into(),
            ..Default::default()
        };
        job.finish(&fatal).unwrap();
        let failure = job.check_health(Instant::now()).unwrap();
        assert_eq!(failure.rank, Some(0));
        assert!(!failure.retryable);
        assert!(
            failure.reason.contains("No space left on device"),
            "{}",
            failure.reason
        );
    }

    #[test]
    fn stop_is_scheduled_ahead_of_the_fastest_rank() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        for (reply, id, step) in [(&replies[0], "a", 10), (&replies[1], "b", 11)] {
            let hb = HeartbeatRequest {
                step,
                step_seconds: 0.05,
                ..beat(reply, id)
            };
            job.heartbeat(&hb).unwrap();
        }
        let at = job.request_stop();
        assert!(at > 11, "stop at {at}");
        let hb = HeartbeatRequest {
            step: 10,
            ..beat(&replies[0], "a")
        };
        let reply = job.heartbeat(&hb).unwrap();
        assert_eq!((reply.command, reply.at_step), (Command::Stop as i32, at));
    }

    #[test]
    fn cluster_totals_accumulate_increments_across_generations() {
        let job = Job::new(spec(2), false);
        let first = form(&job, &["a", "b"]);
        let counted =
            |reply: &JoinResponse, id: &str, images: u64, nonfinite: u64| HeartbeatRequest {
                figures: Some(WorkerFigures {
                    images_total: images,
                    nonfinite_total: nonfinite,
                    allreduce_bytes_total: images * 10,
                    ..Default::default()
                }),
                ..beat(reply, id)
            };
        job.heartbeat(&counted(&first[0], "a", 64, 1)).unwrap();
        job.heartbeat(&counted(&first[1], "b", 64, 1)).unwrap();
        job.heartbeat(&counted(&first[0], "a", 128, 1)).unwrap();
        let view = job.cluster_view(0);
        assert_eq!(view.totals.images, 192);
        // Skipped steps are the group's: counted once (rank 0), not once per rank.
        assert_eq!(view.totals.nonfinite_steps, 1);
        assert_eq!(view.totals.allreduce_bytes, 1920);
        assert_eq!(view.ranks.len(), 2);

        // A new generation's processes count from zero again; the totals keep growing.
        assert!(job.next_generation());
        let second = form(&job, &["a2", "b2"]);
        job.heartbeat(&counted(&second[0], "a2", 64, 0)).unwrap();
        let view = job.cluster_view(3);
        assert_eq!(view.totals.images, 256);
        assert_eq!(view.restarts, 1);
        assert_eq!(view.auth_failures, 3);
        assert_eq!(view.phase, "training");
    }
}
