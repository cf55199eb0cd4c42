//! The job's state machine: rendezvous, training, failure detection, recovery.
//!
//! A generation is one attempt of the whole group. [`Generation`] is its phase, carrying the
//! data only that phase has; what outlives a generation (its number, the restarts, the
//! operator's pause and stop, the accumulated totals) sits beside it in [`State`]. RPC
//! handlers and the supervisor take the one mutex for short, non-blocking critical sections.
//!
//! ```text
//!  Rendezvous ──all joined──▶ Training ──every rank finished──▶ Done
//!      │  │                      │
//!      │  │ timeout, a worker    │ a silent rank, a stall, a worker exit,
//!      │  │ exit, no NCCL id     │ a worker's own report
//!      │  ▼                      ▼
//!      │  └──────────────▶ Recovering ──recover()──▶ Rendezvous of the next generation
//!      │                                        └──▶ Failed (not retryable, a stop was
//!      │                                             requested, or no restart left)
//!      └──stop──▶ Stopped (no group formed: nothing to checkpoint)
//! ```
//!
//! Elastic membership (`cluster.min_workers` below the requested count): the rendezvous
//! that follows a failure waits up to `cluster.rejoin_grace` for the whole group, then forms
//! with the workers present if there are at least `min_workers` of them (ranks 0..k-1,
//! world size k). Such a shrunken group shows as [`JobPhase::Degraded`]. Every generation
//! trains the same global batch (`train.global_batch_size`, resolved by the coordinator), so
//! a smaller group computes the same averaged gradient. Each formed group is recorded
//! ([`GenerationRecord`]) for summary.json.
//!
//! A Join that arrives while a group trains waits for the next generation
//! ([`Training::waiting`]): a failure carries it into the next rendezvous (so a worker that
//! its orchestrator restarted before the coordinator noticed its predecessor's death is not
//! turned away), and in a shrunken group it triggers a regroup: every rank is told to
//! checkpoint after one common step and leave (`REGROUP`), and once all have left, the next
//! generation's rendezvous opens with them and the waiting workers, growing the group back
//! up to the requested count. A regroup is not a failure: no restart is counted and no step
//! is lost.
//!
//! ```text
//!  Training (degraded) ──a worker waits──▶ regroup at step S ──every rank left──▶
//!      Rendezvous of the next generation (the ranks rejoin, with the waiting workers)
//! ```
//!
//! RPCs and the supervisor's observations move the state; [`Job::poll`] tells the supervisor
//! what to act on ([`Event`]). A failed generation stays `Recovering` (heartbeats are told to
//! abort, joins to wait) until the supervisor has stopped its processes and called
//! [`Job::recover`], which decides between a restart and the end of the job.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use gantry_config::Backend;
use gantry_metrics::{ClusterTotals, ClusterView, LeadView, RankView};
use gantry_proto::ClusterError;
use gantry_proto::v1::{
    CollectiveBackend, FinishRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest,
    JoinResponse, ShareNcclIdRequest, StatusResponse, WorkerCommand, WorkerFigures, WorkerState,
    WorkerStatus,
};
use tokio::sync::oneshot;
use tonic::Status;

/// What the group trains and how it is supervised.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub run_id: String,
    pub version: String,
    /// The configuration handed to every worker, with `train.global_batch_size` resolved
    /// (never 0): a smaller generation trains the same global batch.
    pub settings_toml: String,
    /// [`gantry_config::Settings::fingerprint`] of `settings_toml`'s settings.
    pub fingerprint: String,
    /// The fingerprint of the same job spelt with `train.global_batch_size = 0` (what a worker
    /// whose own configuration leaves it unresolved sends); `None` where that spelling would
    /// mean another global batch.
    pub unresolved_fingerprint: Option<String>,
    /// The requested worker count (`--workers` / `--expect-workers`).
    pub world_size: u32,
    /// Fewest ranks a generation after a failure may form with (`cluster.min_workers`,
    /// resolved: 1..=world_size; `world_size` means the group never shrinks).
    pub min_workers: u32,
    /// How long a rendezvous after a failure waits for the whole group before it forms
    /// with the workers present (`cluster.rejoin_grace`; only when `min_workers` allows it).
    pub rejoin_grace: Duration,
    /// The step the first generation starts from (a resume's newest checkpoint, else 0).
    pub first_step: u64,
    pub total_steps: u64,
    /// The configured backend; `auto` is resolved when the group forms.
    pub backend: Backend,
    pub workers_on_host: u32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// No step anywhere for this long while every worker still heartbeats = a hang.
    pub stall_timeout: Duration,
    pub max_restarts: u32,
}

/// The name of a generation's phase, as the status page, `Status` and
/// `gantry_job_phase{phase}` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    Rendezvous,
    Training,
    /// Training with fewer ranks than requested (an elastic group that shrank).
    Degraded,
    Recovering,
    Done,
    Stopped,
    Failed,
}

impl JobPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Rendezvous => "rendezvous",
            JobPhase::Training => "training",
            JobPhase::Degraded => "degraded",
            JobPhase::Recovering => "recovering",
            JobPhase::Done => "done",
            JobPhase::Stopped => "stopped",
            JobPhase::Failed => "failed",
        }
    }
}

/// A rank's seconds per step as the coordinator measures it between heartbeats that show
/// progress: unlike the rank's own average, it does not lag while that still holds the slow
/// first steps.
#[derive(Debug, Clone, Default)]
struct ObservedPace {
    /// The step and arrival time of the heartbeat that last started a measurement.
    since: Option<(u64, Instant)>,
    /// Seconds per step over the last measurement; 0 until one is made.
    step_seconds: f64,
}

impl ObservedPace {
    /// Takes a heartbeat at `step` that arrived `now`. A measurement spans at least `span`; a
    /// step lower than the last (a rank restored from a checkpoint) starts over.
    fn record(&mut self, step: u64, now: Instant, span: Duration) {
        match self.since {
            Some((from, at)) if step > from && now.duration_since(at) >= span => {
                self.step_seconds = now.duration_since(at).as_secs_f64() / (step - from) as f64;
                self.since = Some((step, now));
            }
            Some((from, _)) if step >= from => {}
            _ => self.since = Some((step, now)),
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
    /// Its pace as the coordinator measures it from the heartbeats.
    observed_pace: ObservedPace,
    /// host:port of the worker's /metrics (empty if it has none).
    pub metrics_addr: String,
    /// The newest figures from its heartbeats.
    pub figures: Option<WorkerFigures>,
    pub finished: Option<Result<(), String>>,
    /// It finished by leaving for a regroup (its Finish said `regrouping`).
    pub regrouping: bool,
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

/// What the supervisor has to act on, from [`Job::poll`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The generation failed and the job is recovering: stop its processes, then call
    /// [`Job::recover`].
    GenerationFailed(Failure),
    /// Every rank finished; rank 0's summary.
    Done { summary_json: String },
    /// A stop arrived before any group formed: no step ran, nothing is checkpointed.
    Stopped { reason: String },
    /// The job failed for good.
    Failed(Failure),
}

/// What [`Job::recover`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// The next generation's rendezvous is open; it resumes from the newest checkpoint.
    Restart {
        /// Why the previous generation failed.
        failure: Failure,
        generation: u64,
        restart: u32,
    },
    /// The job has failed (it is now [`JobPhase::Failed`]).
    GiveUp { failure: Failure, why: GiveUp },
}

/// Why a failed generation is not followed by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The failure says retrying cannot help.
    NotRetryable,
    /// A stop (a signal, an operator) was requested: the job ends rather than restarts.
    Stopping,
    /// `cluster.max_restarts` restarts were spent.
    RestartsSpent,
}

impl GiveUp {
    pub fn explain(self) -> &'static str {
        match self {
            GiveUp::NotRetryable => "not retryable: the job ends without a restart",
            GiveUp::Stopping => "a stop was requested: the job ends without a restart",
            GiveUp::RestartsSpent => "no restart left (cluster.max_restarts)",
        }
    }
}

/// One formed group, as summary.json's `generations` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationRecord {
    pub generation: u64,
    pub world_size: u32,
    /// The step it started from (the checkpoint it resumed, 0 for a fresh run).
    pub first_step: u64,
    /// The last step it contributed: the final step for the generation that finished, the
    /// checkpoint the next generation resumed from for one that failed (steps past that
    /// checkpoint were lost with it). Contiguous: each `first_step` is the previous
    /// `last_step`.
    pub last_step: u64,
}

impl GenerationRecord {
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "generation": self.generation,
            "world_size": self.world_size,
            "first_step": self.first_step,
            "last_step": self.last_step,
        })
    }
}

/// What [`Job::request_stop`] arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPlan {
    /// Every rank checkpoints after this step, then stops.
    AtStep(u64),
    /// No group is training: the job ends without a step to checkpoint.
    Now,
}

/// Who a worker RPC claims to come from.
#[derive(Debug, Clone, Copy)]
struct Speaker<'a> {
    worker_id: &'a str,
    rank: u32,
    generation: u64,
    credential: &'a str,
}

/// A worker RPC after Join: it names the member it speaks for.
trait FromMember {
    fn speaker(&self) -> Speaker<'_>;
}

/// Every such request carries the member's (worker, rank, generation) and session credential
/// under the same field names.
macro_rules! from_member {
    ($($request:ty),+) => {$(
        impl FromMember for $request {
            fn speaker(&self) -> Speaker<'_> {
                Speaker {
                    worker_id: &self.worker_id,
                    rank: self.rank,
                    generation: self.generation,
                    credential: &self.session_credential,
                }
            }
        }
    )+};
}

from_member!(HeartbeatRequest, FinishRequest, ShareNcclIdRequest);

type PendingJoin = (JoinRequest, oneshot::Sender<Result<JoinResponse, Status>>);

/// Waiting for the whole group to join.
#[derive(Debug)]
struct Rendezvous {
    /// When it opened: the rendezvous timeout counts from here.
    since: Instant,
    /// Joins answered once the group is complete (dropping one cancels that Join).
    pending: Vec<PendingJoin>,
    /// From this instant the group may form with the workers present, if there are at
    /// least `min_workers` (elastic jobs, after a failure); `None`: only a full group forms.
    shrink_after: Option<Instant>,
    /// The group forms as soon as this many have joined: the requested count, or after a
    /// regroup the ranks that left plus the workers that waited (at most the requested count).
    target: usize,
    /// After a regroup, the worker ids of the group that left, in rank order: they keep
    /// their order in the next group, whenever they join again.
    rank_order: Vec<String>,
}

impl Rendezvous {
    fn open(
        now: Instant,
        pending: Vec<PendingJoin>,
        shrink_after: Option<Instant>,
        target: usize,
    ) -> Self {
        Self {
            since: now,
            pending,
            shrink_after,
            target,
            rank_order: Vec::new(),
        }
    }

    /// The joins to form the group with: the ranks of a regrouped group first, in their
    /// order, then the others in join order.
    fn take_pending(&mut self) -> Vec<PendingJoin> {
        let mut pending = std::mem::take(&mut self.pending);
        let order = &self.rank_order;
        pending.sort_by_key(|(r, _)| {
            order
                .iter()
                .position(|id| *id == r.worker_id)
                .unwrap_or(usize::MAX)
        });
        pending
    }
}

/// The group trains.
#[derive(Debug)]
struct Training {
    members: Vec<Member>,
    /// The backend every rank was told to use.
    backend: CollectiveBackend,
    /// Rank 0's NCCL unique id on its way to the other ranks (nccl backend only).
    nccl_id: NcclIdRelay,
    /// The highest step any rank has reported and when it first did: the stall clock.
    progress: (u64, Instant),
    /// An operator's checkpoint request: every rank checkpoints after this step.
    checkpoint_at: Option<u64>,
    /// A stop request: every rank checkpoints after this step and stops.
    stop_at: Option<u64>,
    /// The operator's pause: every rank holds after this step (see [`Job::set_paused`]).
    pause_at: Option<u64>,
    /// Rank 0's summary, from its successful Finish.
    summary_json: Option<String>,
    /// A failure a worker reported about itself. Often it is the echo of another rank's
    /// death (its peer vanished mid all-reduce), so it waits briefly for the root cause.
    reported: Option<(Instant, Failure)>,
    /// Joins that arrived while this group trains, answered by the next generation's
    /// rendezvous (a failure's or a regroup's); cancelled when the job ends instead. Members
    /// that left to regroup and joined again wait here too until every rank has left.
    waiting: Vec<PendingJoin>,
    /// The regroup a waiting worker triggered in a shrunken group.
    regroup: Option<Regroup>,
}

impl Training {
    fn is_member(&self, worker_id: &str) -> bool {
        self.members.iter().any(|m| m.worker_id == worker_id)
    }

    /// The waiting joins that are not members rejoining after a regroup.
    fn newcomers(&self) -> usize {
        self.waiting
            .iter()
            .filter(|(r, _)| !self.is_member(&r.worker_id))
            .count()
    }
}

/// A scheduled regroup: every rank checkpoints after step `at` and leaves, and the next
/// generation forms with the waiting workers.
///
/// A worker keeps only the newest command it heard, so once any rank has been told to
/// regroup (`announced`) nothing but a stop replaces that command: a later checkpoint
/// request is served by the regroup's checkpoint, and a pause takes hold in the next
/// generation (the pause outlives generations). A regroup scheduled during a pause is
/// announced once every rank holds at one step (and then happens at that step), or at the
/// resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Regroup {
    at: u64,
    announced: bool,
}

/// NCCL's unique id, from rank 0 to the others ([`Job::share_nccl_id`]). Created by rank 0
/// (not here) so that NCCL's bootstrap root listens where the other workers can reach it.
#[derive(Debug)]
enum NcclIdRelay {
    /// Ranks that asked before rank 0 published; answered when it does, cancelled (dropped)
    /// when the generation ends first.
    Waiting(Vec<NcclIdWaiter>),
    Published(Vec<u8>),
}

type NcclIdWaiter = oneshot::Sender<Vec<u8>>;

/// The byte length of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// One generation's phase and the data only that phase has.
#[derive(Debug)]
enum Generation {
    Rendezvous(Rendezvous),
    Training(Training),
    /// Failed; its processes are being stopped. The members stay to be told to abort, and to
    /// report (their Finish may still name the root cause). The joins that waited for the
    /// next generation move into its rendezvous.
    Recovering {
        members: Vec<Member>,
        failure: Failure,
        waiting: Vec<PendingJoin>,
    },
    Done {
        members: Vec<Member>,
        summary_json: String,
    },
    Stopped {
        reason: String,
    },
    Failed {
        members: Vec<Member>,
        failure: Failure,
    },
}

impl Generation {
    fn phase(&self) -> JobPhase {
        match self {
            Generation::Rendezvous(_) => JobPhase::Rendezvous,
            Generation::Training(_) => JobPhase::Training,
            Generation::Recovering { .. } => JobPhase::Recovering,
            Generation::Done { .. } => JobPhase::Done,
            Generation::Stopped { .. } => JobPhase::Stopped,
            Generation::Failed { .. } => JobPhase::Failed,
        }
    }

    fn members(&self) -> &[Member] {
        match self {
            Generation::Training(t) => &t.members,
            Generation::Recovering { members, .. }
            | Generation::Done { members, .. }
            | Generation::Failed { members, .. } => members,
            Generation::Rendezvous(_) | Generation::Stopped { .. } => &[],
        }
    }

    fn members_mut(&mut self) -> &mut [Member] {
        match self {
            Generation::Training(t) => &mut t.members,
            Generation::Recovering { members, .. }
            | Generation::Done { members, .. }
            | Generation::Failed { members, .. } => members,
            Generation::Rendezvous(_) | Generation::Stopped { .. } => &mut [],
        }
    }

    /// Moves a live generation (rendezvous or training) to `Recovering` with `failure`;
    /// pending joins are cancelled. Does nothing in any other phase.
    fn fail(&mut self, failure: Failure) {
        let (members, waiting) = match self {
            Generation::Rendezvous(_) => (Vec::new(), Vec::new()),
            Generation::Training(t) => (
                std::mem::take(&mut t.members),
                std::mem::take(&mut t.waiting),
            ),
            _ => return,
        };
        *self = Generation::Recovering {
            members,
            failure,
            waiting,
        };
    }
}

/// The job-wide state; the current generation is one field of it.
#[derive(Debug)]
struct State {
    /// The current generation's number (0 for the first).
    generation: u64,
    current: Generation,
    restarts: u32,
    /// Whether the next group resumes from the newest checkpoint (every group after the
    /// first, and the first of a `--resume`).
    resume: bool,
    /// The operator's pause: holds across generations until a resume.
    paused: bool,
    /// A stop was requested: a failure from here on ends the job instead of restarting it.
    stop_requested: bool,
    /// The workers' counters, accumulated over every generation.
    totals: ClusterTotals,
    /// The step the next group to form starts from (see [`Job::resumes_from`]).
    next_first_step: u64,
    /// Every group that formed, in order.
    records: Vec<GenerationRecord>,
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
        Self {
            state: Mutex::new(State {
                generation: 0,
                // The first group forms whole: there is nobody to wait for yet.
                current: Generation::Rendezvous(Rendezvous::open(
                    Instant::now(),
                    Vec::new(),
                    None,
                    spec.world_size as usize,
                )),
                restarts: 0,
                resume,
                paused: false,
                stop_requested: false,
                totals: ClusterTotals::default(),
                next_first_step: spec.first_step,
                records: Vec::new(),
            }),
            spec,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    #[cfg(test)]
    pub fn phase(&self) -> JobPhase {
        self.shown_phase(&self.lock().current)
    }

    /// The phase as reported: a training group with fewer ranks than requested is
    /// [`JobPhase::Degraded`].
    fn shown_phase(&self, current: &Generation) -> JobPhase {
        match current {
            Generation::Training(t) if t.members.len() < self.spec.world_size as usize => {
                JobPhase::Degraded
            }
            other => other.phase(),
        }
    }

    /// Ranks of the current generation; the requested count while no group exists.
    fn current_world(&self, current: &Generation) -> u32 {
        match current.members().len() {
            0 => self.spec.world_size,
            n => n as u32,
        }
    }

    /// Every group formed so far, in order (summary.json's `generations`).
    pub fn records(&self) -> Vec<GenerationRecord> {
        self.lock().records.clone()
    }

    /// The step the next generation resumes from (the newest complete checkpoint), as the
    /// supervisor found it once the failed generation's processes stopped; call it before
    /// [`Job::recover`], which ends the failed generation's record there. The next group's
    /// record starts there.
    pub fn resumes_from(&self, step: u64) {
        let mut state = self.lock();
        state.next_first_step = step;
    }

    pub fn restarts(&self) -> u32 {
        self.lock().restarts
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
        let same_job = request.config_hash == spec.fingerprint
            || spec.unresolved_fingerprint.as_ref() == Some(&request.config_hash);
        if !request.config_hash.is_empty() && !same_job {
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
        if spec.backend == Backend::Nccl && !request.device.starts_with("cuda") {
            return Err(ClusterError::Mismatch {
                field: "device",
                worker: request.device,
                coordinator: "cuda (cluster.backend = nccl)".into(),
            });
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        let generation = state.generation;
        let rendezvous = match &mut state.current {
            Generation::Rendezvous(r) => r,
            Generation::Training(t) => {
                return self.wait_for_next_generation(t, generation, state.stop_requested, request);
            }
            Generation::Recovering { .. } => return Err(ClusterError::Recovering { generation }),
            Generation::Done { .. } | Generation::Stopped { .. } | Generation::Failed { .. } => {
                return Err(ClusterError::ShuttingDown);
            }
        };
        if rendezvous
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
        rendezvous.pending.retain(|(_, tx)| !tx.is_closed());
        let (tx, rx) = oneshot::channel();
        rendezvous.pending.push((request, tx));
        if rendezvous.pending.len() >= rendezvous.target {
            let pending = rendezvous.take_pending();
            self.form_group(state, pending);
        }
        Ok(rx)
    }

    /// A Join while a group trains: it waits for the next generation, as one more member
    /// of it. In a shrunken group (an elastic job after a loss) its arrival schedules a
    /// regroup, so the group grows back at one common step. A full group takes up to the
    /// requested count of such workers: replacements for members whose loss is not noticed
    /// yet (an orchestrator restarts a pod faster than the heartbeat timeout).
    fn wait_for_next_generation(
        &self,
        t: &mut Training,
        generation: u64,
        stopping: bool,
        request: JoinRequest,
    ) -> Result<oneshot::Receiver<Result<JoinResponse, Status>>, ClusterError> {
        let spec = &self.spec;
        // A worker that gave up waiting (its Join call dropped) frees its place.
        t.waiting.retain(|(_, tx)| !tx.is_closed());
        if t.waiting
            .iter()
            .any(|(r, _)| r.worker_id == request.worker_id)
        {
            return Err(ClusterError::InvalidArgument(format!(
                "worker {:?} already joined",
                request.worker_id
            )));
        }
        let newcomers = t.newcomers();
        let degraded = t.members.len() < spec.world_size as usize;
        // A shrunken group grows back to the requested count; a full one holds replacements.
        let room = if degraded {
            spec.world_size as usize - t.members.len()
        } else {
            spec.world_size as usize
        };
        let newcomer = !t.is_member(&request.worker_id);
        if stopping || (newcomer && newcomers >= room) {
            return Err(ClusterError::WorldFull {
                world_size: spec.world_size,
                generation,
            });
        }
        let (tx, rx) = oneshot::channel();
        let worker_id = request.worker_id.clone();
        t.waiting.push((request, tx));
        if newcomer && !degraded {
            tracing::info!(
                "coordinator: worker {worker_id} waits for the next generation (generation \
                 {generation} trains with all {} rank(s))",
                spec.world_size
            );
        }
        if newcomer && degraded && t.regroup.is_none() {
            let at = self.common_future_step(t);
            // A group about to finish needs no regroup: the waiting worker is told the job
            // ended when it does.
            if at < spec.total_steps {
                t.regroup = Some(Regroup {
                    at,
                    announced: false,
                });
                tracing::info!(
                    "coordinator: worker {worker_id} is waiting to join; generation {generation} \
                     of {} rank(s) ({} requested) regroups",
                    t.members.len(),
                    spec.world_size
                );
            }
        }
        Ok(rx)
    }

    /// Every rank of the training group left at its regroup step: the next generation's
    /// rendezvous opens with them (in their old rank order) and the workers that waited, and
    /// resumes from the checkpoint of that step. Not a restart.
    fn regroup(&self, state: &mut State, at: u64) {
        let Generation::Training(t) = &mut state.current else {
            return;
        };
        t.waiting.retain(|(_, tx)| !tx.is_closed());
        let newcomers = t.newcomers();
        let mut members = std::mem::take(&mut t.members);
        members.sort_by_key(|m| m.rank);
        let waiting = std::mem::take(&mut t.waiting);
        let target = (members.len() + newcomers).min(self.spec.world_size as usize);
        if let Some(record) = state
            .records
            .last_mut()
            .filter(|r| r.generation == state.generation)
        {
            record.last_step = at;
        }
        tracing::info!(
            "coordinator: generation {} regrouped after step {at}: {} rank(s) and \
             {newcomers} waiting worker(s) form generation {}",
            state.generation,
            members.len(),
            state.generation + 1
        );
        state.next_first_step = at;
        state.generation += 1;
        state.resume = true;
        let now = Instant::now();
        // A rank that does not come back is waited for as after a failure.
        let mut rendezvous =
            Rendezvous::open(now, waiting, Some(now + self.spec.rejoin_grace), target);
        rendezvous.rank_order = members.into_iter().map(|m| m.worker_id).collect();
        if rendezvous.pending.len() >= target {
            let pending = rendezvous.take_pending();
            self.form_group(state, pending);
        } else {
            state.current = Generation::Rendezvous(rendezvous);
        }
    }

    /// Assigns ranks 0..k-1 to the `k` pending joins, answers them (world size k), records
    /// the group and makes it the current, training generation. A group that forms while
    /// the job is paused holds after its first step (all ranks start from the same step, so
    /// that one is common).
    fn form_group(&self, state: &mut State, mut pending: Vec<PendingJoin>) {
        let (generation, resume, paused) = (state.generation, state.resume, state.paused);
        // Joins carried over from a training generation can outnumber the group.
        for (_, tx) in pending.split_off(pending.len().min(self.spec.world_size as usize)) {
            let _ = tx.send(Err(ClusterError::WorldFull {
                world_size: self.spec.world_size,
                generation,
            }
            .into()));
        }
        let world_size = pending.len() as u32;
        state.records.push(GenerationRecord {
            generation,
            world_size,
            first_step: state.next_first_step,
            last_step: state.next_first_step,
        });
        let now = Instant::now();
        // The coordinator's own local workers take the rank their id names (local-g0-w1 is
        // rank 1, whichever joined first); other workers keep their join order, after them.
        pending.sort_by_key(|(r, _)| {
            crate::spawn::local_worker_index(generation, &r.worker_id).unwrap_or(usize::MAX)
        });
        let peers: Vec<String> = pending.iter().map(|(r, _)| r.ring_addr.clone()).collect();
        // `auto` means NCCL when every worker trains on a GPU, the CPU ring otherwise.
        let all_cuda = pending.iter().all(|(r, _)| r.device.starts_with("cuda"));
        let backend = match self.spec.backend {
            Backend::Ring => CollectiveBackend::Ring,
            Backend::Nccl => CollectiveBackend::Nccl,
            Backend::Auto if all_cuda => CollectiveBackend::Nccl,
            Backend::Auto => CollectiveBackend::Ring,
        };
        // Fresh per generation: a rank of an earlier one cannot join this ring.
        let ring_secret: [u8; 32] = rand::random();
        let members: Vec<Member> = pending
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
                observed_pace: ObservedPace::default(),
                metrics_addr: r.metrics_addr.clone(),
                figures: None,
                finished: None,
                regrouping: false,
                credential: crate::auth::generate_token(),
            })
            .collect();
        for ((_, tx), member) in pending.into_iter().zip(&members) {
            let local_rank = members[..member.rank as usize]
                .iter()
                .filter(|m| m.host == member.host)
                .count() as u32;
            let _ = tx.send(Ok(JoinResponse {
                local_rank,
                rank: member.rank,
                world_size,
                run_id: self.spec.run_id.clone(),
                generation,
                config_toml: self.spec.settings_toml.clone(),
                ring_peers: peers.clone(),
                backend: backend as i32,
                resume,
                // Local workers share this host; a shrunken group has fewer of them.
                workers_on_host: self.spec.workers_on_host.min(world_size),
                session_credential: member.credential.clone(),
                ring_secret: ring_secret.to_vec(),
            }));
        }
        state.current = Generation::Training(Training {
            members,
            backend,
            nccl_id: NcclIdRelay::Waiting(Vec::new()),
            progress: (0, now),
            checkpoint_at: None,
            stop_at: None,
            pause_at: paused.then_some(0),
            summary_json: None,
            reported: None,
            waiting: Vec::new(),
            regroup: None,
        });
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
            .current
            .members_mut()
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

    /// NCCL's id hand-off (`ShareNcclId`): rank 0 publishes the id it created, every other
    /// rank receives it, at once or when rank 0 publishes. The receiver is dropped (the call
    /// fails) when the generation ends before that.
    pub fn share_nccl_id(
        &self,
        request: &ShareNcclIdRequest,
    ) -> Result<oneshot::Receiver<Vec<u8>>, ClusterError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        Self::member_mut(state, request.speaker())?;
        let generation = state.generation;
        let training = match &mut state.current {
            Generation::Training(t) => t,
            Generation::Recovering { .. } => return Err(ClusterError::Recovering { generation }),
            other => {
                return Err(ClusterError::NotTraining {
                    phase: other.phase().as_str(),
                });
            }
        };
        if training.backend != CollectiveBackend::Nccl {
            return Err(ClusterError::InvalidArgument(
                "this group does not use the nccl backend".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        match (request.rank, &mut training.nccl_id) {
            (0, relay) => {
                let id = &request.nccl_id;
                if id.len() != NCCL_ID_BYTES {
                    return Err(ClusterError::InvalidArgument(format!(
                        "an NCCL id has {NCCL_ID_BYTES} bytes, rank 0 sent {}",
                        id.len()
                    )));
                }
                if let NcclIdRelay::Published(published) = relay
                    && published != id
                {
                    return Err(ClusterError::InvalidArgument(
                        "rank 0 already published another NCCL id in this generation".into(),
                    ));
                }
                let waiting = std::mem::replace(relay, NcclIdRelay::Published(id.clone()));
                if let NcclIdRelay::Waiting(waiters) = waiting {
                    for waiter in waiters {
                        let _ = waiter.send(id.clone());
                    }
                }
                let _ = tx.send(id.clone());
            }
            (_, _) if !request.nccl_id.is_empty() => {
                return Err(ClusterError::PermissionDenied(format!(
                    "only rank 0 creates the NCCL id, not rank {}",
                    request.rank
                )));
            }
            (_, NcclIdRelay::Published(id)) => {
                let _ = tx.send(id.clone());
            }
            (_, NcclIdRelay::Waiting(waiters)) => waiters.push(tx),
        }
        Ok(rx)
    }

    pub fn heartbeat(&self, hb: &HeartbeatRequest) -> Result<HeartbeatResponse, ClusterError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let member = Self::member_mut(state, hb.speaker())?;
        let now = Instant::now();
        member.last_seen = now;
        member.state = WorkerState::try_from(hb.state).unwrap_or(WorkerState::Unspecified);
        // Measured over at least half a heartbeat interval: heartbeats that arrive back to back
        // (a delayed tick catching up) span too few steps to measure a pace.
        member
            .observed_pace
            .record(hb.step, now, self.spec.heartbeat_interval / 2);
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
        let increase = hb.figures.as_ref().map(|figures| {
            let increase = figures_increase(member.figures.as_ref(), figures, member.rank == 0);
            member.figures = Some(figures.clone());
            increase
        });
        if let Some(increase) = increase {
            accumulate(&mut state.totals, &increase);
        }
        let paused = state.paused;
        let (command, at_step) = match &mut state.current {
            Generation::Training(t) => {
                if hb.step > t.progress.0 {
                    t.progress = (hb.step, Instant::now());
                }
                // A rank training at or past the hold step went through it without hearing of
                // the pause (its lead, sized from a pace estimated too slow, was too short):
                // it is in the next step's all-reduce, waiting for peers that hold, and would
                // wait there until the collective timeout failed the generation. Moving the
                // hold ahead of it lets them all step on to it; this rank, told in this very
                // reply, cannot pass it, nor can its peers, who are holding until they hear.
                if paused
                    && let Some(at) = t.pause_at
                    && t.members
                        .iter()
                        .any(|m| m.state == WorkerState::Training && m.step >= at)
                {
                    t.pause_at = Some(self.common_future_step(t).max(at + 2));
                }
                // Every rank holds at one step (a pause): a regroup can happen right there,
                // since each leaves from its hold at that step.
                if paused
                    && let Some(regroup) = t.regroup.as_mut().filter(|r| !r.announced)
                    && let Some(step) = all_held(&t.members)
                {
                    regroup.at = step;
                    regroup.announced = true;
                }
                // A regroup scheduled before this generation's first heartbeats took its step
                // from ranks whose steps still read 0: before it is announced, move it ahead
                // of every rank (or drop it when the job ends first).
                if !paused && let Some(regroup) = t.regroup.filter(|r| !r.announced) {
                    let ahead = self.common_future_step(t);
                    if ahead > regroup.at {
                        t.regroup = (ahead < self.spec.total_steps).then_some(Regroup {
                            at: ahead,
                            announced: false,
                        });
                    }
                }
                match (t.stop_at, &mut t.regroup, t.checkpoint_at) {
                    (Some(at), _, _) => (WorkerCommand::Stop, at),
                    // See [`Regroup`] for why an announced one outranks the rest.
                    (None, Some(regroup), _) if regroup.announced || !paused => {
                        regroup.announced = true;
                        (WorkerCommand::Regroup, regroup.at)
                    }
                    (None, _, Some(at)) if hb.step < at => (WorkerCommand::Checkpoint, at),
                    _ if paused => (WorkerCommand::Pause, t.pause_at.unwrap_or(0)),
                    _ => (WorkerCommand::Continue, 0),
                }
            }
            Generation::Recovering { .. } | Generation::Failed { .. } => (WorkerCommand::Abort, 0),
            _ => (WorkerCommand::Continue, 0),
        };
        Ok(HeartbeatResponse {
            command: command as i32,
            at_step,
        })
    }

    pub fn finish(&self, request: &FinishRequest) -> Result<(), ClusterError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let member = Self::member_mut(state, request.speaker())?;
        member.last_seen = Instant::now();
        member.step = member.step.max(request.step);
        member.finished = Some(if request.ok {
            Ok(())
        } else {
            Err(request.error.clone())
        });
        member.regrouping = request.ok && request.regrouping;
        if request.ok {
            member.state = WorkerState::Done;
        }
        let failure = (!request.ok).then(|| Failure {
            rank: Some(request.rank),
            reason: format!(
                "rank {} ({}) failed: {}",
                request.rank, request.worker_id, request.error
            ),
            retryable: request.retryable,
        });
        let stopping = state.stop_requested;
        match &mut state.current {
            Generation::Training(t) => {
                if request.ok && request.regrouping && t.regroup.is_none() {
                    return Err(ClusterError::InvalidArgument(format!(
                        "rank {} left to regroup, but no regroup was asked of generation {}",
                        request.rank, request.generation
                    )));
                }
                if request.rank == 0 && request.ok && !request.summary_json.is_empty() {
                    t.summary_json = Some(request.summary_json.clone());
                }
                match failure {
                    // The root cause, by the worker's own account: no need to wait for one.
                    Some(failure) if !failure.retryable => state.current.fail(failure),
                    Some(failure) => {
                        t.reported.get_or_insert((Instant::now(), failure));
                    }
                    None if t.members.iter().all(|m| matches!(m.finished, Some(Ok(())))) => {
                        let regrouped = t.members.iter().any(|m| m.regrouping);
                        match t.regroup {
                            // A stop asked for during the regroup ends the job at its step
                            // instead (every rank checkpointed there).
                            Some(regroup) if regrouped && !stopping => {
                                self.regroup(state, regroup.at);
                            }
                            Some(regroup) if regrouped && t.summary_json.is_none() => {
                                state.current = Generation::Stopped {
                                    reason: format!(
                                        "stopped at the regroup after step {}: every rank \
                                         checkpointed there (continue with --resume)",
                                        regroup.at
                                    ),
                                };
                            }
                            _ => {
                                let last_step = t.members.iter().map(|m| m.step).max().unwrap_or(0);
                                if let Some(record) = state.records.last_mut() {
                                    record.last_step = last_step;
                                }
                                state.current = finished(t);
                            }
                        }
                    }
                    None => {}
                }
            }
            Generation::Recovering {
                failure: recorded, ..
            } => {
                // A non-retryable account outranks the echoes already recorded (a peer that
                // lost this rank, this rank's own exit status).
                if let Some(failure) = failure
                    && !failure.retryable
                    && recorded.retryable
                {
                    *recorded = failure;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What the supervisor has to act on now, if anything. Also where a training group's
    /// silence, stall or reported failure, and a rendezvous' timeout, are noticed: the
    /// generation is then `Recovering` and stays so until [`Job::recover`].
    pub fn poll(&self, now: Instant) -> Option<Event> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Generation::Rendezvous(r) = &mut state.current
            && let Some(pending) = self.shrunken_group(r, now)
        {
            self.form_group(state, pending);
            return None;
        }
        let paused = state.paused;
        let found = match &state.current {
            Generation::Rendezvous(r) => self.rendezvous_overdue(r, now),
            Generation::Training(t) => self.training_failure(t, now, paused),
            Generation::Recovering { failure, .. } => {
                return Some(Event::GenerationFailed(failure.clone()));
            }
            Generation::Done { summary_json, .. } => {
                return Some(Event::Done {
                    summary_json: summary_json.clone(),
                });
            }
            Generation::Stopped { reason } => {
                return Some(Event::Stopped {
                    reason: reason.clone(),
                });
            }
            Generation::Failed { failure, .. } => return Some(Event::Failed(failure.clone())),
        };
        let failure = found?;
        state.current.fail(failure.clone());
        Some(Event::GenerationFailed(failure))
    }

    /// The joins a shrunken group forms with: once the rejoin grace is over, the live ones,
    /// when there are at least `min_workers` (fewer: the rendezvous keeps waiting, up to its
    /// timeout).
    fn shrunken_group(
        &self,
        rendezvous: &mut Rendezvous,
        now: Instant,
    ) -> Option<Vec<PendingJoin>> {
        if rendezvous.shrink_after.is_none_or(|after| now < after) {
            return None;
        }
        // A worker that gave up waiting (its Join call dropped) is not present.
        rendezvous.pending.retain(|(_, tx)| !tx.is_closed());
        if rendezvous.pending.len() < self.spec.min_workers as usize {
            return None;
        }
        Some(rendezvous.take_pending())
    }

    fn rendezvous_overdue(&self, rendezvous: &Rendezvous, now: Instant) -> Option<Failure> {
        let waited = now.duration_since(rendezvous.since);
        if waited <= self.spec.rendezvous_timeout {
            return None;
        }
        let joined: Vec<String> = rendezvous
            .pending
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .map(|(r, _)| format!("{} ({})", r.worker_id, r.ring_addr))
            .collect();
        Some(Failure {
            rank: None,
            retryable: true,
            reason: format!(
                "rendezvous timed out after {:.0} s: {} of {} workers joined: [{}]",
                waited.as_secs_f64(),
                joined.len(),
                self.spec.world_size,
                joined.join(", ")
            ),
        })
    }

    /// The first problem of a training group: a reported failure whose grace is over, a
    /// silent rank, or no progress anywhere while every rank still heartbeats.
    fn training_failure(&self, training: &Training, now: Instant, paused: bool) -> Option<Failure> {
        if let Some((at, failure)) = &training.reported
            && now.duration_since(*at) > REPORT_GRACE
        {
            return Some(failure.clone());
        }
        let spec = &self.spec;
        for m in training.members.iter().filter(|m| m.finished.is_none()) {
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
        let stalled = now.duration_since(training.progress.1);
        if paused || stalled <= spec.stall_timeout {
            return None;
        }
        let laggard = training.members.iter().min_by_key(|m| m.collective_seq)?;
        let most = training.members.iter().map(|m| m.collective_seq).max();
        Some(Failure {
            rank: Some(laggard.rank),
            retryable: true,
            reason: format!(
                "no progress for {:.0} s; rank {} ({}) lags in collectives (sequence {} vs max {})",
                stalled.as_secs_f64(),
                laggard.rank,
                laggard.worker_id,
                laggard.collective_seq,
                most.unwrap_or(0)
            ),
        })
    }

    /// A local worker process that exited unsuccessfully, `how` (e.g. "exit status 75").
    /// It fails the generation when it belongs to it: a member of the training group, or a
    /// worker started for the rendezvous. What that worker reported in its Finish, if
    /// anything, is the cause and is told with it.
    pub fn worker_exited(&self, worker_id: &str, how: &str, retryable: bool) {
        let mut state = self.lock();
        let generation = state.generation;
        let (rank, said) = match &state.current {
            Generation::Rendezvous(r) => {
                // An elastic rendezvous forms without a replacement that could not start:
                // its place stays empty until the rejoin grace decides.
                if crate::spawn::local_worker_index(generation, worker_id).is_none()
                    || r.shrink_after.is_some()
                {
                    return;
                }
                (None, None)
            }
            Generation::Training(t) => {
                let Some(member) = t.members.iter().find(|m| m.worker_id == worker_id) else {
                    return;
                };
                (
                    Some(member.rank),
                    member.finished.clone().and_then(Result::err),
                )
            }
            _ => return,
        };
        let who = rank.map_or_else(
            || format!("worker {worker_id}"),
            |r| format!("rank {r} ({worker_id})"),
        );
        let mut reason = format!("{who} {how}");
        if let Some(error) = said {
            reason = format!("{reason}; it reported: {error}");
        }
        state.current.fail(Failure {
            rank,
            reason,
            retryable,
        });
    }

    /// Ends the recovering generation, once its processes are stopped. `account` may add
    /// what the supervisor saw meanwhile (the exit statuses) to the failure. Restarts the
    /// group (a new generation's rendezvous, resuming from the newest checkpoint) unless the
    /// failure is not retryable, a stop was requested, or the restarts are spent; then the
    /// job has failed.
    pub fn recover(&self, account: impl FnOnce(&mut Failure)) -> Recovery {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Generation::Recovering {
            members,
            failure,
            waiting,
        } = &mut state.current
        else {
            let failure = Failure {
                rank: None,
                reason: format!(
                    "recover() called while the job is {}",
                    state.current.phase().as_str()
                ),
                retryable: false,
            };
            return Recovery::GiveUp {
                failure,
                why: GiveUp::NotRetryable,
            };
        };
        account(failure);
        let why = if !failure.retryable {
            Some(GiveUp::NotRetryable)
        } else if state.stop_requested {
            Some(GiveUp::Stopping)
        } else if state.restarts >= self.spec.max_restarts {
            Some(GiveUp::RestartsSpent)
        } else {
            None
        };
        let failure = failure.clone();
        if let Some(why) = why {
            state.current = Generation::Failed {
                members: std::mem::take(members),
                failure: failure.clone(),
            };
            return Recovery::GiveUp { failure, why };
        }
        // The failed group's kept steps end where the next one resumes (a group that
        // formed in this generation; a failed rendezvous formed none).
        let formed = state
            .records
            .last_mut()
            .filter(|r| r.generation == state.generation);
        if let Some(record) = formed {
            record.last_step = state.next_first_step.max(record.first_step);
        }
        state.restarts += 1;
        state.generation += 1;
        state.resume = true;
        let now = Instant::now();
        let elastic = self.spec.min_workers < self.spec.world_size;
        // The joins that waited during the failed generation are the first of the next one.
        let waiting = std::mem::take(waiting);
        state.current = Generation::Rendezvous(Rendezvous::open(
            now,
            waiting,
            elastic.then(|| now + self.spec.rejoin_grace),
            self.spec.world_size as usize,
        ));
        Recovery::Restart {
            failure,
            generation: state.generation,
            restart: state.restarts,
        }
    }

    /// Asks the job to stop. A training group stops at one step for every rank (after a
    /// checkpoint), a little ahead of the fastest one so that the command reaches all of them
    /// first; a rendezvous ends at once; any later failure ends the job.
    pub fn request_stop(&self) -> StopPlan {
        let mut state = self.lock();
        state.stop_requested = true;
        let generation = state.generation;
        match &mut state.current {
            Generation::Training(t) => {
                // Ranks told to regroup may already be leaving at its step: stop them all
                // there. One not announced yet (held by a pause) is dropped.
                let at = match (t.stop_at, t.regroup) {
                    (Some(at), _) => at,
                    (None, Some(regroup)) if regroup.announced => regroup.at,
                    _ => self.common_future_step(t),
                };
                if t.regroup.is_some_and(|r| !r.announced) {
                    t.regroup = None;
                }
                t.stop_at = Some(at);
                StopPlan::AtStep(at)
            }
            Generation::Rendezvous(_) => {
                // Dropping the pending joins cancels them.
                state.current = Generation::Stopped {
                    reason: format!(
                        "stopped during the rendezvous of generation {generation} (no step was \
                         run in it)"
                    ),
                };
                StopPlan::Now
            }
            _ => StopPlan::Now,
        }
    }

    /// Asks every rank of the training group to checkpoint after one common step.
    pub fn request_checkpoint(&self) -> Result<u64, ClusterError> {
        let mut state = self.lock();
        let phase = state.current.phase();
        let Generation::Training(t) = &mut state.current else {
            return Err(ClusterError::NotTraining {
                phase: phase.as_str(),
            });
        };
        // An announced regroup checkpoints at its step anyway (see [`Regroup`]).
        if let Some(regroup) = t.regroup.filter(|r| r.announced) {
            return Ok(regroup.at);
        }
        let at = self.common_future_step(t);
        t.checkpoint_at = Some(at);
        Ok(at)
    }

    /// The operator's pause (held across restarts) or resume. A training group holds after
    /// one common step, a little ahead of the fastest rank like a stop: were each rank to
    /// hold wherever it heard of the pause, one could wait in the next all-reduce for a peer
    /// that holds before it, until the collective timeout fails the generation. Returns that
    /// step (0 when no group is training, or for a resume).
    pub fn set_paused(&self, paused: bool) -> u64 {
        let mut guard = self.lock();
        let state = &mut *guard;
        let was_paused = std::mem::replace(&mut state.paused, paused);
        let Generation::Training(t) = &mut state.current else {
            return 0;
        };
        if !paused {
            if was_paused {
                // A pause is not a stall: the stall clock starts again at the resume.
                t.progress.1 = Instant::now();
            }
            t.pause_at = None;
            return 0;
        }
        let at = match t.pause_at {
            Some(at) => at,
            None => self.common_future_step(t),
        };
        t.pause_at = Some(at);
        at
    }

    fn common_future_step(&self, training: &Training) -> u64 {
        let members = &training.members;
        let max_step = members.iter().map(|m| m.step).max().unwrap_or(0);
        // The fastest estimate of any rank, reported or observed: a lead sized from too slow
        // a step would be passed by a rank before it hears of it.
        let step_seconds = members
            .iter()
            .flat_map(|m| [m.step_seconds, m.observed_pace.step_seconds])
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

    /// The job as the coordinator's metrics show it.
    pub fn cluster_view(&self, auth_failures: u64) -> ClusterView {
        let state = self.lock();
        let now = Instant::now();
        let members = state.current.members();
        let alive = self.alive(members, now);
        let lead = members.iter().find(|m| m.rank == 0).map(|m| {
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
        let world = self.current_world(&state.current);
        ClusterView {
            phase: self.shown_phase(&state.current).as_str(),
            generation: state.generation,
            restarts: u64::from(state.restarts),
            auth_failures,
            workers_expected: u64::from(self.spec.world_size),
            world_size: u64::from(world),
            workers_alive: alive as u64,
            step: members.iter().map(|m| m.step).min().unwrap_or(0),
            total_steps: self.spec.total_steps,
            totals: state.totals,
            ranks: members
                .iter()
                .map(|m| RankView {
                    rank: m.rank,
                    step: m.step,
                    step_seconds: m.step_seconds,
                    // Workers report the group's throughput; this rank's share is 1/world.
                    images_per_second: m.images_per_second / f64::from(world.max(1)),
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
            .current
            .members()
            .iter()
            .filter(|m| !m.metrics_addr.is_empty())
            .map(|m| (m.rank, m.metrics_addr.clone()))
            .collect()
    }

    /// Members heard from within the heartbeat timeout.
    fn alive(&self, members: &[Member], now: Instant) -> usize {
        members
            .iter()
            .filter(|m| now.duration_since(m.last_seen) <= self.spec.heartbeat_timeout)
            .count()
    }

    pub fn status(&self) -> StatusResponse {
        let state = self.lock();
        let now = Instant::now();
        let members = state.current.members();
        let lead = members.iter().find(|m| m.rank == 0);
        StatusResponse {
            run_id: self.spec.run_id.clone(),
            generation: state.generation,
            phase: self.shown_phase(&state.current).as_str().into(),
            step: members.iter().map(|m| m.step).min().unwrap_or(0),
            total_steps: self.spec.total_steps,
            // The current generation's ranks; `degraded` says when that is fewer than asked.
            world_size: self.current_world(&state.current),
            workers_alive: self.alive(members, now) as u32,
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
            workers: members
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

/// The step every member holds at, when all report [`WorkerState::Paused`] at the same one.
fn all_held(members: &[Member]) -> Option<u64> {
    let first = members.first()?.step;
    members
        .iter()
        .all(|m| m.state == WorkerState::Paused && m.step == first)
        .then_some(first)
}

/// The generation after every rank of `training` finished: done with rank 0's summary, or
/// recovering (not retryable) when rank 0 sent none.
fn finished(training: &mut Training) -> Generation {
    let members = std::mem::take(&mut training.members);
    match training.summary_json.take() {
        Some(summary_json) => Generation::Done {
            members,
            summary_json,
        },
        None => Generation::Recovering {
            members,
            waiting: Vec::new(),
            failure: Failure {
                rank: Some(0),
                reason: "every rank finished, but rank 0 reported no summary".into(),
                retryable: false,
            },
        },
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

fn accumulate(totals: &mut ClusterTotals, increase: &ClusterTotals) {
    totals.images += increase.images;
    totals.nonfinite_steps += increase.nonfinite_steps;
    totals.allreduce_bytes += increase.allreduce_bytes;
    totals.allreduce_seconds += increase.allreduce_seconds;
    totals.checkpoints += increase.checkpoints;
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
            unresolved_fingerprint: None,
            world_size: world,
            min_workers: world,
            rejoin_grace: Duration::from_secs(30),
            first_step: 0,
            total_steps: 100,
            backend: Backend::Ring,
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
        assert_eq!(job.phase(), JobPhase::Training);
        assert_eq!(
            job.poll(Instant::now()),
            None,
            "no summary, nothing to act on"
        );
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
    fn local_ranks_count_the_workers_on_each_host() {
        let job = Job::new(spec(4), false);
        let on = |id: &str, host: &str| JoinRequest {
            host: host.into(),
            ..join_request(id)
        };
        let pending: Vec<_> = [
            ("a", "gpu-1"),
            ("b", "gpu-2"),
            ("c", "gpu-1"),
            ("d", "gpu-1"),
        ]
        .iter()
        .map(|(id, host)| job.join(on(id, host)).unwrap())
        .collect();
        let local: Vec<(u32, u32)> = pending
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().unwrap())
            .map(|reply| (reply.rank, reply.local_rank))
            .collect();
        assert_eq!(local, [(0, 0), (1, 0), (2, 1), (3, 2)]);
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
        assert_eq!(a.backend(), CollectiveBackend::Ring);
        assert_eq!(job.phase(), JobPhase::Training);
        // A third waits for the next generation (see the full-group test below).
        let mut c = job.join(join_request("c")).unwrap();
        assert!(c.try_recv().is_err(), "a third joined a group of two");
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

    /// The failure [`Job::poll`] reports for the current generation, if any.
    fn failed_at(job: &Job, now: Instant) -> Option<Failure> {
        match job.poll(now) {
            Some(Event::GenerationFailed(failure)) => Some(failure),
            None => None,
            other => panic!("expected a failed generation, got {other:?}"),
        }
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
        assert!(failed_at(&job, Instant::now()).is_none());
        let later = Instant::now() + Duration::from_secs(2);
        let failure = failed_at(&job, later).unwrap();
        assert_eq!(failure.rank, Some(0));
        assert!(
            failure.reason.contains("missed heartbeats"),
            "{}",
            failure.reason
        );
        assert_eq!(job.phase(), JobPhase::Recovering);
        // Recovering: the generation's ranks are told to abort, joins to come back.
        let reply = job.heartbeat(&hb).unwrap();
        assert_eq!(reply.command, WorkerCommand::Abort as i32);
        let err = job.join(join_request("early")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        // poll keeps telling until the supervisor has recovered.
        assert_eq!(failed_at(&job, later), Some(failure.clone()));

        let Recovery::Restart {
            failure: told,
            generation: 1,
            restart: 1,
        } = job.recover(|f| f.reason.push_str("; a exited"))
        else {
            panic!("no restart");
        };
        assert_eq!(told.reason, format!("{}; a exited", failure.reason));
        assert_eq!(job.phase(), JobPhase::Rendezvous);
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
        let failure = failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        let Recovery::GiveUp { failure: last, why } = job.recover(|f| f.reason.push_str("; gone"))
        else {
            panic!("a second restart");
        };
        assert_eq!(why, GiveUp::RestartsSpent);
        assert_eq!(last.reason, format!("{}; gone", failure.reason));
        assert_eq!(job.phase(), JobPhase::Failed);
        assert_eq!(job.poll(Instant::now()), Some(Event::Failed(last)));
        assert_eq!(
            job.join(join_request("a3")).unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn a_rendezvous_fails_by_timeout_or_a_worker_exit_and_both_restart() {
        let mut quick = spec(2);
        quick.rendezvous_timeout = Duration::from_millis(100);
        quick.max_restarts = 5;
        let job = Job::new(quick, false);
        let mut waiting = job.join(join_request("a")).unwrap();
        assert!(failed_at(&job, Instant::now()).is_none());
        let failure = failed_at(&job, Instant::now() + Duration::from_secs(1)).unwrap();
        assert!(
            failure
                .reason
                .contains("1 of 2 workers joined: [a (127.0.0.1:1000)]"),
            "{}",
            failure.reason
        );
        assert!(failure.retryable);
        // The pending Join is cancelled (its call returns and the worker may try again).
        assert!(matches!(
            waiting.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            job.recover(|_| {}),
            Recovery::Restart { generation: 1, .. }
        ));

        // A local worker of an earlier generation exiting is not this rendezvous' problem...
        job.worker_exited("local-g0-w1", "exit status 75", true);
        assert!(failed_at(&job, Instant::now()).is_none());
        // ...one started for it is.
        job.worker_exited("local-g1-w1", "exit status 1", false);
        let failure = failed_at(&job, Instant::now()).unwrap();
        assert_eq!(failure.reason, "worker local-g1-w1 exit status 1");
        let Recovery::GiveUp { why, .. } = job.recover(|_| {}) else {
            panic!("restarted after a non-retryable exit");
        };
        assert_eq!(why, GiveUp::NotRetryable);
    }

    #[test]
    fn a_stop_ends_a_rendezvous_at_once_and_forbids_a_restart_later() {
        let job = Job::new(spec(2), false);
        let mut waiting = job.join(join_request("a")).unwrap();
        assert_eq!(job.request_stop(), StopPlan::Now);
        assert_eq!(job.phase(), JobPhase::Stopped);
        let Some(Event::Stopped { reason }) = job.poll(Instant::now()) else {
            panic!("not stopped");
        };
        assert!(
            reason.contains("during the rendezvous of generation 0"),
            "{reason}"
        );
        assert!(waiting.try_recv().is_err(), "the pending Join is cancelled");
        assert_eq!(
            job.join(join_request("b")).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(job.request_checkpoint().is_err());

        // A stop during training: the group stops at one step, and a failure before it ends
        // the job instead of restarting it.
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        let StopPlan::AtStep(at) = job.request_stop() else {
            panic!("training stops at a step");
        };
        assert_eq!(
            job.request_stop(),
            StopPlan::AtStep(at),
            "asked twice, same step"
        );
        job.worker_exited("b", "killed by signal 9", true);
        assert!(failed_at(&job, Instant::now()).is_some());
        assert!(matches!(
            job.recover(|_| {}),
            Recovery::GiveUp {
                why: GiveUp::Stopping,
                ..
            }
        ));
        let _ = replies;
    }

    #[test]
    fn every_rank_finishing_is_done_with_rank_0_s_summary() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        let done = |reply: &JoinResponse, id: &str, summary: &str| FinishRequest {
            worker_id: id.into(),
            rank: reply.rank,
            generation: reply.generation,
            session_credential: reply.session_credential.clone(),
            ok: true,
            summary_json: summary.into(),
            step: 100,
            ..Default::default()
        };
        job.finish(&done(&replies[1], "b", "")).unwrap();
        assert_eq!(job.phase(), JobPhase::Training, "rank 0 is still training");
        job.finish(&done(&replies[0], "a", "{\"steps\": 100}"))
            .unwrap();
        assert_eq!(
            job.poll(Instant::now()),
            Some(Event::Done {
                summary_json: "{\"steps\": 100}".into()
            })
        );
        let status = job.status();
        assert_eq!((status.phase.as_str(), status.step), ("done", 100));

        // All finished but rank 0 sent no summary: a defect, not worth a restart.
        let job = Job::new(spec(1), false);
        let replies = form(&job, &["a"]);
        job.finish(&done(&replies[0], "a", "")).unwrap();
        let failure = failed_at(&job, Instant::now()).unwrap();
        assert!(failure.reason.contains("no summary") && !failure.retryable);
    }

    #[test]
    fn no_progress_blames_the_rank_behind_in_collectives_but_a_pause_is_not_a_stall() {
        let mut slow = spec(2);
        slow.stall_timeout = Duration::from_millis(200);
        slow.heartbeat_timeout = Duration::from_secs(60);
        let job = Job::new(slow, false);
        let replies = form(&job, &["a", "b"]);
        for (reply, id, seq) in [(&replies[0], "a", 7), (&replies[1], "b", 6)] {
            let hb = HeartbeatRequest {
                step: 3,
                collective_seq: seq,
                ..beat(reply, id)
            };
            job.heartbeat(&hb).unwrap();
        }
        let later = Instant::now() + Duration::from_secs(1);
        // Every rank holds after one common step ahead of the fastest, not wherever it is
        // when it hears of the pause (one rank would wait in an all-reduce for the other).
        let at = job.set_paused(true);
        assert!(at > 3, "pause at {at}");
        assert_eq!(job.set_paused(true), at, "asked twice, same step");
        assert!(failed_at(&job, later).is_none(), "paused");
        for (reply, id, seq) in [(&replies[0], "a", 7), (&replies[1], "b", 6)] {
            let hb = HeartbeatRequest {
                step: 3,
                collective_seq: seq,
                ..beat(reply, id)
            };
            let reply = job.heartbeat(&hb).unwrap();
            assert_eq!(
                (reply.command, reply.at_step),
                (WorkerCommand::Pause as i32, at)
            );
        }
        assert_eq!(job.set_paused(false), 0);
        assert!(
            failed_at(&job, Instant::now()).is_none(),
            "the clock restarts"
        );
        let failure = failed_at(&job, later).unwrap();
        assert_eq!(failure.rank, Some(1));
        assert!(
            failure.reason.contains("sequence 6 vs max 7"),
            "{}",
            failure.reason
        );
    }

    #[test]
    fn a_pause_holds_across_a_restart() {
        let job = Job::new(spec(1), false);
        form(&job, &["a"]);
        job.set_paused(true);
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        job.recover(|_| {});
        let replies = form(&job, &["a2"]);
        let reply = job.heartbeat(&beat(&replies[0], "a2")).unwrap();
        // The new group holds after its first step, which every rank shares.
        assert_eq!(
            (reply.command, reply.at_step),
            (WorkerCommand::Pause as i32, 0)
        );
        assert!(job.status().paused);
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
            failed_at(&job, Instant::now()).is_none(),
            "within the grace period"
        );
        job.worker_exited("b", "killed by signal 9", true);
        let failure = failed_at(&job, Instant::now()).unwrap();
        assert_eq!(failure.rank, Some(1));
        assert_eq!(failure.reason, "rank 1 (b) killed by signal 9");

        // Without another account, the report itself is the failure once its grace is over.
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        job.finish(&FinishRequest {
            session_credential: replies[0].session_credential.clone(),
            ..finish
        })
        .unwrap();
        let failure = failed_at(&job, Instant::now() + REPORT_GRACE * 2).unwrap();
        assert_eq!(failure.reason, "rank 0 (a) failed: peer disconnected");
    }

    #[test]
    fn a_non_retryable_report_is_the_root_cause_and_ends_the_restarts() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        // Rank 1's process exit (the echo: its peer vanished) is noticed first...
        job.worker_exited("b", "exit status 75", true);
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
        assert_eq!(job.phase(), JobPhase::Recovering);
        job.finish(&fatal).unwrap();
        let failure = failed_at(&job, Instant::now()).unwrap();
        assert_eq!(failure.rank, Some(0));
        assert!(!failure.retryable);
        assert!(
            failure.reason.contains("No space left on device"),
            "{}",
            failure.reason
        );
        assert!(matches!(
            job.recover(|_| {}),
            Recovery::GiveUp {
                why: GiveUp::NotRetryable,
                ..
            }
        ));
    }

    #[test]
    fn a_non_retryable_report_fails_a_training_generation_without_a_grace_period() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        job.finish(&FinishRequest {
            worker_id: "b".into(),
            rank: 1,
            session_credential: replies[1].session_credential.clone(),
            ok: false,
            retryable: false,
            error: "cannot resume: model.latent_dim changed".into(),
            ..Default::default()
        })
        .unwrap();
        let failure = failed_at(&job, Instant::now()).unwrap();
        assert_eq!((failure.rank, failure.retryable), (Some(1), false));
        assert_eq!(
            failure.reason,
            "rank 1 (b) failed: cannot resume: model.latent_dim changed"
        );
    }

    #[test]
    fn rank_0_s_nccl_id_reaches_every_rank_through_the_coordinator() {
        let mut gpus = spec(3);
        gpus.backend = Backend::Nccl;
        let job = Job::new(gpus, false);
        // The nccl backend needs a GPU on every rank: refused by name at the door.
        let err = job.join(join_request("cpu-worker")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("cluster.backend = nccl"), "{err}");

        let on_gpu = |id: &str| JoinRequest {
            device: "cuda:0".into(),
            ..join_request(id)
        };
        let pending: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| job.join(on_gpu(id)).unwrap())
            .collect();
        let replies: Vec<JoinResponse> = pending
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(replies[0].backend(), CollectiveBackend::Nccl);
        let ask = |reply: &JoinResponse, id: &str, nccl_id: Vec<u8>| ShareNcclIdRequest {
            worker_id: id.into(),
            generation: reply.generation,
            rank: reply.rank,
            session_credential: reply.session_credential.clone(),
            nccl_id,
        };
        // Rank 1 asks first and waits; only rank 0 may publish; a short id is refused.
        let mut early = job
            .share_nccl_id(&ask(&replies[1], "b", Vec::new()))
            .unwrap();
        assert!(early.try_recv().is_err(), "nothing published yet");
        let err = job
            .share_nccl_id(&ask(&replies[2], "c", vec![1; NCCL_ID_BYTES]))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = job
            .share_nccl_id(&ask(&replies[0], "a", vec![1; 7]))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let id: Vec<u8> = (0..NCCL_ID_BYTES as u8).collect();
        let mut own = job
            .share_nccl_id(&ask(&replies[0], "a", id.clone()))
            .unwrap();
        assert_eq!(own.try_recv().unwrap(), id);
        assert_eq!(early.try_recv().unwrap(), id);
        // A late rank gets it at once; a second, different id from rank 0 is refused.
        let mut late = job
            .share_nccl_id(&ask(&replies[2], "c", Vec::new()))
            .unwrap();
        assert_eq!(late.try_recv().unwrap(), id);
        assert!(
            job.share_nccl_id(&ask(&replies[0], "a", vec![9; NCCL_ID_BYTES]))
                .is_err()
        );
        // Without the member's credential nobody learns it.
        let mut forged = ask(&replies[1], "b", Vec::new());
        forged.session_credential = "guess".into();
        assert_eq!(
            job.share_nccl_id(&forged).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn a_generation_that_fails_cancels_the_ranks_waiting_for_the_nccl_id() {
        let mut gpus = spec(2);
        gpus.backend = Backend::Nccl;
        let job = Job::new(gpus, false);
        let pending: Vec<_> = ["a", "b"]
            .iter()
            .map(|id| {
                job.join(JoinRequest {
                    device: "cuda:0".into(),
                    ..join_request(id)
                })
                .unwrap()
            })
            .collect();
        let replies: Vec<JoinResponse> = pending
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().unwrap())
            .collect();
        let mut waiting = job
            .share_nccl_id(&ShareNcclIdRequest {
                worker_id: "b".into(),
                generation: 0,
                rank: 1,
                session_credential: replies[1].session_credential.clone(),
                nccl_id: Vec::new(),
            })
            .unwrap();
        job.worker_exited("a", "exit status 1", false);
        assert!(failed_at(&job, Instant::now()).is_some());
        assert!(matches!(
            waiting.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    #[test]
    fn the_observed_pace_spans_half_an_interval_and_starts_over_after_a_restore() {
        let span = Duration::from_millis(500);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut pace = ObservedPace::default();
        pace.record(10, t0, span);
        assert_eq!(pace.step_seconds, 0.0, "one heartbeat measures nothing");
        // Back to back: too short a span, even with progress.
        pace.record(12, at(100), span);
        assert_eq!(pace.step_seconds, 0.0);
        // 20 steps in one second, measured from the heartbeat at step 10.
        pace.record(30, at(1000), span);
        assert!(
            (pace.step_seconds - 0.05).abs() < 1e-9,
            "{}",
            pace.step_seconds
        );
        // A rank restored to step 5 starts a new measurement there; the old pace stands.
        pace.record(5, at(1100), span);
        assert!((pace.step_seconds - 0.05).abs() < 1e-9);
        pace.record(15, at(2100), span);
        assert!(
            (pace.step_seconds - 0.1).abs() < 1e-9,
            "{}",
            pace.step_seconds
        );
    }

    #[test]
    fn a_pause_is_scheduled_from_the_observed_pace_before_any_step_is_logged() {
        // Ranks that have logged no step yet report no seconds per step; the lead must still
        // cover two heartbeat intervals of their real pace, or a fast rank passes the pause
        // step before it hears of it and waits in the next all-reduce for a peer that holds.
        let job = Job::new(
            JobSpec {
                total_steps: 1_000_000,
                ..spec(2)
            },
            false,
        );
        let replies = form(&job, &["a", "b"]);
        let beat_at = |step| {
            for (reply, id) in [(&replies[0], "a"), (&replies[1], "b")] {
                let hb = HeartbeatRequest {
                    step,
                    ..beat(reply, id)
                };
                job.heartbeat(&hb).unwrap();
            }
        };
        let started = Instant::now();
        beat_at(10);
        // Longer than half the 100 ms interval: the shortest span a pace is measured over.
        std::thread::sleep(Duration::from_millis(60));
        beat_at(110);
        // 100 steps took at most this long, so two 100 ms intervals hold at least this many.
        let upper_seconds_per_step = started.elapsed().as_secs_f64() / 100.0;
        let lead_at_least = (0.2 / upper_seconds_per_step).floor() as u64;
        let at = job.set_paused(true);
        assert!(
            at >= 110 + lead_at_least,
            "pause at {at}, want at least {}",
            110 + lead_at_least
        );
    }

    #[test]
    fn a_rank_that_passed_the_pause_step_moves_the_hold_ahead_for_everyone() {
        let job = Job::new(spec(2), false);
        let replies = form(&job, &["a", "b"]);
        let send = |i: usize, step, state: WorkerState| {
            let id = ["a", "b"][i];
            let hb = HeartbeatRequest {
                step,
                // A pace estimated far too slow (a slow first step): the shortest lead.
                step_seconds: 10.0,
                state: state as i32,
                ..beat(&replies[i], id)
            };
            job.heartbeat(&hb).unwrap()
        };
        send(0, 10, WorkerState::Training);
        send(1, 10, WorkerState::Training);
        let at = job.set_paused(true);
        assert_eq!(at, 12, "the shortest lead");
        // Both hold where they should: nothing moves.
        for i in [0, 1] {
            let reply = send(i, at, WorkerState::Paused);
            assert_eq!(
                (reply.command, reply.at_step),
                (WorkerCommand::Pause as i32, at)
            );
        }
        // b went through step 12 unaware: the hold moves past it, for b and for a alike.
        let reply = send(1, at, WorkerState::Training);
        assert_eq!(reply.command, WorkerCommand::Pause as i32);
        let moved = reply.at_step;
        assert!(moved > at, "the hold moved from {at} to {moved}");
        let reply = send(0, at, WorkerState::Paused);
        assert_eq!(
            (reply.command, reply.at_step),
            (WorkerCommand::Pause as i32, moved)
        );
        // Once both hold at the new step, it stays.
        for i in [0, 1] {
            let reply = send(i, moved, WorkerState::Paused);
            assert_eq!(reply.at_step, moved);
        }
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
        let StopPlan::AtStep(at) = job.request_stop() else {
            panic!("a training group stops at a step");
        };
        assert!(at > 11, "stop at {at}");
        let hb = HeartbeatRequest {
            step: 10,
            ..beat(&replies[0], "a")
        };
        let reply = job.heartbeat(&hb).unwrap();
        assert_eq!(
            (reply.command, reply.at_step),
            (WorkerCommand::Stop as i32, at)
        );
    }

    /// A spec of `world` ranks that may shrink to `min` after a failure, waiting `grace`.
    fn elastic(world: u32, min: u32, grace: Duration) -> JobSpec {
        JobSpec {
            min_workers: min,
            rejoin_grace: grace,
            max_restarts: 5,
            ..spec(world)
        }
    }

    /// summary.json's `generations`: (generation, world size, first step, last step).
    fn ranges(job: &Job) -> Vec<(u64, u32, u64, u64)> {
        job.records()
            .iter()
            .map(|r| (r.generation, r.world_size, r.first_step, r.last_step))
            .collect()
    }

    /// A successful Finish at `step` as the worker `id` that got `reply` sends it.
    fn finish_request(reply: &JoinResponse, id: &str, step: u64) -> FinishRequest {
        FinishRequest {
            worker_id: id.into(),
            rank: reply.rank,
            generation: reply.generation,
            session_credential: reply.session_credential.clone(),
            ok: true,
            step,
            ..Default::default()
        }
    }

    /// Every member of `replies` (ids `ids`) finishes successfully at `step`.
    fn finish_all(job: &Job, replies: &[JoinResponse], ids: &[&str], step: u64) {
        for (reply, id) in replies.iter().zip(ids) {
            job.finish(&FinishRequest {
                summary_json: if reply.rank == 0 {
                    "{}".into()
                } else {
                    String::new()
                },
                ..finish_request(reply, id, step)
            })
            .unwrap();
        }
    }

    #[test]
    fn an_elastic_group_waits_out_the_grace_then_shrinks_to_the_workers_present() {
        let grace = Duration::from_millis(200);
        let job = Job::new(elastic(3, 2, grace), false);
        // The first group forms whole only: two of three never start training alone.
        let _waiting = [
            job.join(join_request("a")).unwrap(),
            job.join(join_request("b")).unwrap(),
        ];
        assert!(job.poll(Instant::now() + grace * 5).is_none());
        assert_eq!(job.phase(), JobPhase::Rendezvous);
        let first = {
            let mut c = job.join(join_request("c")).unwrap();
            let mut replies: Vec<JoinResponse> = _waiting
                .into_iter()
                .map(|mut rx| rx.try_recv().unwrap().unwrap())
                .collect();
            replies.push(c.try_recv().unwrap().unwrap());
            replies
        };
        assert!(first.iter().all(|r| r.world_size == 3));
        assert_eq!(job.phase(), JobPhase::Training);

        lose_rank_2_after_step_20(&job, &first);

        // Within the grace the two that came back wait for the third...
        let mut back: Vec<_> = ["a2", "b2"]
            .iter()
            .map(|id| job.join(join_request(id)).unwrap())
            .collect();
        assert!(job.poll(Instant::now()).is_none());
        assert!(back[0].try_recv().is_err(), "no answer within the grace");
        // ...after it, they form generation 1 on their own: ranks 0 and 1 of 2.
        assert!(job.poll(Instant::now() + grace * 2).is_none());
        let second: Vec<JoinResponse> = back
            .iter_mut()
            .map(|rx| rx.try_recv().unwrap().unwrap())
            .collect();
        let assigned: Vec<(u32, u32, u64, bool)> = second
            .iter()
            .map(|r| (r.rank, r.world_size, r.generation, r.resume))
            .collect();
        assert_eq!(assigned, [(0, 2, 1, true), (1, 2, 1, true)]);
        // Degraded, not failed: shown as such, with the ranks it has and those asked for.
        assert_eq!(job.phase(), JobPhase::Degraded);
        let status = job.status();
        assert_eq!((status.phase.as_str(), status.world_size), ("degraded", 2));
        let view = job.cluster_view(0);
        assert_eq!(
            (view.phase, view.world_size, view.workers_expected),
            ("degraded", 2, 3)
        );
        finish_all(&job, &second, &["a2", "b2"], 100);
        assert!(matches!(job.poll(Instant::now()), Some(Event::Done { .. })));
        assert_eq!(ranges(&job), [(0, 3, 0, 20), (1, 2, 20, 100)]);
    }

    /// In a group of a, b and c (`first`), rank 2 (c) goes silent while the others are at
    /// step 25; the newest checkpoint is step 20; the next generation's rendezvous opens.
    fn lose_rank_2_after_step_20(job: &Job, first: &[JoinResponse]) {
        for (reply, id) in first.iter().zip(["a", "b"]) {
            job.heartbeat(&HeartbeatRequest {
                step: 25,
                ..beat(reply, id)
            })
            .unwrap();
        }
        failed_at(job, Instant::now() + Duration::from_secs(2)).unwrap();
        job.resumes_from(20);
        assert!(matches!(job.recover(|_| {}), Recovery::Restart { .. }));
    }

    /// An elastic job of 3 (min 2) that lost worker c after the checkpoint of step 20 and
    /// trains generation 1 with a2 and b2; their Join replies.
    fn shrunken_job(job: &Job, grace: Duration) -> Vec<JoinResponse> {
        let first = form(job, &["a", "b", "c"]);
        lose_rank_2_after_step_20(job, &first);
        let mut back: Vec<_> = ["a2", "b2"]
            .iter()
            .map(|id| job.join(join_request(id)).unwrap())
            .collect();
        assert!(job.poll(Instant::now() + grace * 2).is_none());
        let replies: Vec<JoinResponse> = back
            .iter_mut()
            .map(|rx| rx.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(job.phase(), JobPhase::Degraded);
        replies
    }

    /// Every member of `replies` (ids `ids`) leaves for the regroup at `step`.
    fn leave_all(job: &Job, replies: &[JoinResponse], ids: &[&str], step: u64) {
        for (reply, id) in replies.iter().zip(ids) {
            job.finish(&FinishRequest {
                regrouping: true,
                ..finish_request(reply, id, step)
            })
            .unwrap();
        }
    }

    fn command(job: &Job, reply: &JoinResponse, id: &str, step: u64) -> (WorkerCommand, u64) {
        let r = job
            .heartbeat(&HeartbeatRequest {
                step,
                step_seconds: 0.01,
                ..beat(reply, id)
            })
            .unwrap();
        (r.command(), r.at_step)
    }

    #[test]
    fn a_worker_that_joins_a_shrunken_group_is_admitted_at_a_regroup() {
        let grace = Duration::from_millis(200);
        let job = Job::new(elastic(3, 2, grace), false);
        let second = shrunken_job(&job, grace);
        let ids = ["a2", "b2"];
        assert_eq!(
            command(&job, &second[0], "a2", 30).0,
            WorkerCommand::Continue
        );

        // A worker joins during a pause: it waits, and the regroup waits for the resume.
        job.set_paused(true);
        let mut late = job.join(join_request("late")).unwrap();
        assert!(
            late.try_recv().is_err(),
            "answered before the group regrouped"
        );
        assert_eq!(command(&job, &second[0], "a2", 32).0, WorkerCommand::Pause);
        // The group has room for one more: a second newcomer is refused, naming the group.
        assert_eq!(
            job.join(join_request("late2")).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        job.set_paused(false);
        let (told, at) = command(&job, &second[0], "a2", 32);
        assert_eq!(told, WorkerCommand::Regroup);
        assert!(at > 32 && at < 100, "regroup at {at}");
        // Announced, it outranks a pause and a checkpoint request (its own checkpoint).
        job.set_paused(true);
        assert_eq!(job.request_checkpoint().unwrap(), at);
        assert_eq!(
            command(&job, &second[1], "b2", 32),
            (WorkerCommand::Regroup, at)
        );
        job.set_paused(false);

        // Both ranks leave at that step (a Finish that is not the job's end)...
        leave_all(&job, &second, &ids, at);
        assert!(job.poll(Instant::now()).is_none());
        assert_eq!(job.phase(), JobPhase::Rendezvous);
        assert_eq!(job.generation(), 2);
        assert!(
            late.try_recv().is_err(),
            "formed before the ranks came back"
        );
        // ...and join again: generation 2 forms with all three, the old ranks first.
        let mut again: Vec<_> = ids
            .iter()
            .map(|id| job.join(join_request(id)).unwrap())
            .collect();
        let mut third: Vec<JoinResponse> = again
            .iter_mut()
            .map(|rx| rx.try_recv().unwrap().unwrap())
            .collect();
        third.push(late.try_recv().unwrap().unwrap());
        let assigned: Vec<(u32, u32, u64, bool)> = third
            .iter()
            .map(|r| (r.rank, r.world_size, r.generation, r.resume))
            .collect();
        assert_eq!(
            assigned,
            [(0, 3, 2, true), (1, 3, 2, true), (2, 3, 2, true)]
        );
        assert_eq!(job.phase(), JobPhase::Training);
        // Not a restart, and no step lost: the ranges are contiguous at the regroup step.
        assert_eq!(job.restarts(), 1);
        finish_all(&job, &third, &["a2", "b2", "late"], 100);
        assert!(matches!(job.poll(Instant::now()), Some(Event::Done { .. })));
        assert_eq!(
            ranges(&job),
            [(0, 3, 0, 20), (1, 2, 20, at), (2, 3, at, 100)]
        );
    }

    #[test]
    fn a_regroup_asked_before_the_first_heartbeats_is_announced_ahead_of_the_ranks() {
        // Generation 1 resumes from step 20, paused; the late worker joins before any of its
        // ranks has sent a heartbeat (their steps still read 0), and the resume comes before
        // they all hold at one step. The regroup must still lie ahead of where they are.
        let grace = Duration::from_millis(200);
        let job = Job::new(elastic(3, 2, grace), false);
        let second = shrunken_job(&job, grace);
        job.set_paused(true);
        let mut late = job.join(join_request("late")).unwrap();
        assert!(late.try_recv().is_err());
        assert_eq!(command(&job, &second[0], "a2", 22).0, WorkerCommand::Pause);
        job.set_paused(false);
        let (told, at) = command(&job, &second[0], "a2", 22);
        assert_eq!(told, WorkerCommand::Regroup);
        assert!(
            at > 22 && at < 100,
            "regroup at {at}, behind the ranks at step 22"
        );
        assert_eq!(
            command(&job, &second[1], "b2", 21),
            (WorkerCommand::Regroup, at)
        );
    }

    #[test]
    fn a_regroup_is_refused_where_none_was_asked_and_a_stop_ends_the_job_at_its_step() {
        let grace = Duration::from_millis(200);
        let job = Job::new(elastic(3, 2, grace), false);
        let second = shrunken_job(&job, grace);
        let ids = ["a2", "b2"];
        // No worker waits: leaving to regroup is not this rank's to decide.
        let refused = job.finish(&FinishRequest {
            regrouping: true,
            ..finish_request(&second[0], "a2", 30)
        });
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("no regroup was asked"),
            "a regroup nobody asked for was taken"
        );
        let mut late = job.join(join_request("late")).unwrap();
        let (_, at) = command(&job, &second[0], "a2", 30);
        // A stop during the announced regroup stops every rank at the regroup's step.
        assert_eq!(job.request_stop(), StopPlan::AtStep(at));
        leave_all(&job, &second, &ids, at);
        assert!(matches!(
            job.poll(Instant::now()),
            Some(Event::Stopped { .. })
        ));
        assert!(
            late.try_recv().is_err(),
            "the waiting worker was admitted to a stopped job"
        );
    }

    #[test]
    fn a_join_while_a_full_group_trains_waits_for_the_next_generation() {
        let job = Job::new(spec(2), false);
        let first = form(&job, &["a", "b"]);
        // b's replacement joins before b's death is noticed: it waits, and no regroup is
        // asked of a full group.
        let mut replacement = job.join(join_request("b-restarted")).unwrap();
        assert!(replacement.try_recv().is_err());
        assert_eq!(command(&job, &first[0], "a", 10).0, WorkerCommand::Continue);
        // At most the requested count waits.
        let _second = job.join(join_request("spare")).unwrap();
        assert_eq!(
            job.join(join_request("one-too-many")).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(_second);
        // b goes silent; the next generation's rendezvous starts with the waiting worker.
        command(&job, &first[0], "a", 12);
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        assert!(matches!(job.recover(|_| {}), Recovery::Restart { .. }));
        let mut a = job.join(join_request("a-restarted")).unwrap();
        let ranks: Vec<(u32, u64)> = [&mut replacement, &mut a]
            .into_iter()
            .map(|rx| {
                let r = rx.try_recv().unwrap().unwrap();
                (r.rank, r.generation)
            })
            .collect();
        assert_eq!(ranks, [(0, 1), (1, 1)]);
    }

    #[test]
    fn fewer_than_min_workers_keep_waiting_and_a_non_elastic_group_never_shrinks() {
        let grace = Duration::from_millis(100);
        let mut quick = elastic(3, 2, grace);
        quick.rendezvous_timeout = Duration::from_secs(5);
        let job = Job::new(quick, false);
        form(&job, &["a", "b", "c"]);
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        job.recover(|_| {});
        // One worker is not enough for min_workers = 2: it waits, until the timeout.
        let mut alone = job.join(join_request("a2")).unwrap();
        assert!(job.poll(Instant::now() + grace * 3).is_none());
        assert!(alone.try_recv().is_err());
        assert_eq!(job.phase(), JobPhase::Rendezvous);
        let failure = failed_at(&job, Instant::now() + Duration::from_secs(6)).unwrap();
        assert!(
            failure.reason.contains("1 of 3 workers joined"),
            "{}",
            failure.reason
        );

        // min_workers = the requested count (the default): no shrink, however long it waits.
        let job = Job::new(spec(2), false);
        form(&job, &["a", "b"]);
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        job.recover(|_| {});
        let mut alone = job.join(join_request("a2")).unwrap();
        assert!(job.poll(Instant::now() + Duration::from_secs(30)).is_none());
        assert!(alone.try_recv().is_err());
        assert_eq!(job.phase(), JobPhase::Rendezvous);
    }

    #[test]
    fn a_local_replacement_that_dies_in_an_elastic_rendezvous_leaves_its_place_empty() {
        let job = Job::new(elastic(2, 1, Duration::from_millis(50)), false);
        form(&job, &["local-g0-w0", "local-g0-w1"]);
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        job.recover(|_| {});
        let mut survivor = job.join(join_request("local-g1-w0")).unwrap();
        job.worker_exited("local-g1-w1", "exit status 75", true);
        assert!(job.poll(Instant::now() + Duration::from_secs(1)).is_none());
        let reply = survivor.try_recv().unwrap().unwrap();
        assert_eq!((reply.rank, reply.world_size), (0, 1));
    }

    #[test]
    fn a_worker_with_the_unresolved_global_batch_joins_the_same_job() {
        let job = Job::new(
            JobSpec {
                unresolved_fingerprint: Some("unresolved".into()),
                ..spec(1)
            },
            false,
        );
        let with = |hash: &str| JoinRequest {
            config_hash: hash.into(),
            ..join_request("a")
        };
        let err = job.join(with("other")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(job.join(with("unresolved")).is_ok());
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
        failed_at(&job, Instant::now() + Duration::from_secs(2)).unwrap();
        assert!(matches!(job.recover(|_| {}), Recovery::Restart { .. }));
        let second = form(&job, &["a2", "b2"]);
        job.heartbeat(&counted(&second[0], "a2", 64, 0)).unwrap();
        let view = job.cluster_view(3);
        assert_eq!(view.totals.images, 256);
        assert_eq!(view.restarts, 1);
        assert_eq!(view.auth_failures, 3);
        assert_eq!(view.phase, "training");
    }
}
