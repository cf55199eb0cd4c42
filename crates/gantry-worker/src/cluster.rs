//! Cluster mode: one session with a coordinator, in four steps: connect, join, train, report.
//!
//! * [`Connected::open`]: this host's device, its ring port, a channel to the coordinator and
//!   its probe/metrics endpoint.
//! * [`Connected::join`]: the rendezvous; the reply gives the rank, the group and the
//!   configuration to train ([`Joined`]).
//! * [`Joined::train`]: the group forms (ring or NCCL) and trains while heartbeats carry
//!   progress out and the coordinator's commands in.
//! * [`Joined::report`]: the Finish call, with the summary or the root cause.
//!
//! A rank told to regroup (its shrunken group grows back: a worker waits to join) checkpoints
//! at the common step, reports that it left, and joins again from step 2 with the same
//! channel, probes and worker id: one process trains every generation it is part of.
//!
//! Each way a session can end badly is a [`SessionError`] variant, and the variant says
//! whether a new generation could get past it ([`SessionError::retryable`]): the worker exits
//! 75 for those and 1 for the rest, and tells the coordinator which in its Finish.
//!
//! The training thread stays blocking and never waits on the network outside the
//! collective. A small tokio runtime runs the gRPC client: the Join call before training, a
//! heartbeat task during it, and the Finish call after. They share [`Shared`]: progress flows
//! out through atomics, commands flow in through a mutex, and an abort (the coordinator's,
//! a lost coordinator, SIGTERM) also aborts the collective (ring or NCCL) so a rank blocked
//! in an all-reduce returns at once.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_collective::{AbortHandle, Collective, CollectiveError, RingCollective};
use gantry_config::{DeviceChoice, Settings};
use gantry_models::runtime;
use gantry_proto::v1::coordinator_client::CoordinatorClient;
use gantry_proto::v1::{
    CollectiveBackend, FinishRequest, HeartbeatRequest, JoinRequest, JoinResponse,
    ShareNcclIdRequest, WorkerCommand, WorkerFigures, WorkerState,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{error, info, warn};

use crate::group::Group;
use crate::train::{Directive, LoggedStep, RunEnd, StepObserver, Trainer};

/// Exit code for failures worth retrying (EX_TEMPFAIL): the group was aborted, the
/// coordinator vanished, or the worker was asked to leave.
pub const EXIT_RETRYABLE: i32 = 75;

/// How this worker reaches its coordinator.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub coordinator: String,
    pub worker_id: String,
    pub advertise_host: String,
    /// The device this host trains on (the coordinator's configuration does not choose it).
    pub device: Option<DeviceChoice>,
    /// Send our configuration's fingerprint, so the coordinator refuses a different job.
    pub check_config: bool,
    /// Started by a local coordinator, in its process group: a terminal's Ctrl-C reaches this
    /// process too, and is left to the coordinator, which stops the whole group at one step
    /// after a checkpoint. SIGTERM still stops this worker.
    pub supervised: bool,
}

/// Why a session ended without finishing.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// This host cannot take part as configured: the device, the ring port, TLS, the
    /// coordinator's address, the metrics. Fatal.
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// The coordinator refused the Join.
    #[error("join refused: {message} ({code:?})")]
    JoinRefused { code: Code, message: String },
    /// The coordinator refused or ended NCCL's id hand-off.
    #[error("sharing the NCCL id: {message} ({code:?})")]
    NcclIdRefused { code: Code, message: String },
    /// The coordinator's reply cannot be trained here (its configuration, a peer address, a
    /// backend). Fatal: every generation would get the same.
    #[error("the coordinator's assignment: {0:#}")]
    Assignment(anyhow::Error),
    /// A signal, the coordinator's abort or the coordinator's loss ended the session; what
    /// the training thread was doing when it noticed, if anything. Retryable.
    #[error("aborted: {reason}{}", .during.as_ref().map(|e| format!(": {e:#}")).unwrap_or_default())]
    Aborted {
        reason: String,
        during: Option<anyhow::Error>,
    },
    /// The group could not form, or broke (a peer died, timed out, or is not of this
    /// group). Retryable: a new generation re-forms it.
    #[error("{context}: {source}")]
    Collective {
        context: &'static str,
        #[source]
        source: CollectiveError,
    },
    /// Training failed; whether a new generation could get past it was judged where the
    /// error came out of the trainer ([`classify_training_error`]).
    #[error("{error:#}")]
    Training {
        error: anyhow::Error,
        retryable: bool,
    },
}

impl SessionError {
    /// Whether a new generation (or a restarted coordinator) could get past this.
    pub fn retryable(&self) -> bool {
        match self {
            SessionError::Setup(_) | SessionError::Assignment(_) => false,
            SessionError::JoinRefused { code, .. } | SessionError::NcclIdRefused { code, .. } => {
                matches!(
                    code,
                    Code::Aborted | Code::Unavailable | Code::NotFound | Code::DeadlineExceeded
                )
            }
            SessionError::Aborted { .. } => true,
            // A missing library or device stays missing in the next generation.
            SessionError::Collective { source, .. } => !matches!(
                source,
                CollectiveError::NcclUnavailable(_)
                    | CollectiveError::NoCudaDevice(_)
                    | CollectiveError::InvalidArgument(_)
            ),
            SessionError::Training { retryable, .. } => *retryable,
        }
    }

    fn join_refused(status: Status) -> Self {
        SessionError::JoinRefused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Runs this worker in cluster mode and returns the process exit code.
pub fn run(options: &ClusterOptions, local: &Settings) -> i32 {
    // Signals are handled on the runtime's threads, never on this one, which trains (see
    // `runtime::block_async_signals`): a SIGINT or SIGTERM during one of oneDNN's GEMM
    // kernels would otherwise corrupt the heap.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(runtime::unblock_async_signals)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime::block_async_signals();
    let who = &options.worker_id;
    match session(&runtime, options, local) {
        Ok(()) => 0,
        Err(e) if e.retryable() => {
            warn!("worker {who}: leaving (retryable): {e:#}");
            EXIT_RETRYABLE
        }
        Err(e) => {
            error!("worker {who}: error: {e:#}");
            1
        }
    }
}

/// The four steps, in order; the outcome of training is reported whatever it was.
fn session(
    rt: &tokio::runtime::Runtime,
    options: &ClusterOptions,
    local: &Settings,
) -> Result<(), SessionError> {
    // The gRPC channel spawns its connection task on the runtime it is created in.
    let _runtime = rt.enter();
    let mut connected = Connected::open(rt, options, local)?;
    loop {
        let mut joined = connected.join(rt, options, local)?;
        let outcome = joined.train(rt);
        joined.report(rt, &outcome);
        match outcome {
            Ok(Finished {
                regrouping: true,
                step,
                ..
            }) => {
                info!(
                    "worker {}: left generation {} at step {step} to regroup; joining the next",
                    options.worker_id, joined.member.generation
                );
                connected = joined.into_connected(options, local)?;
            }
            other => return other.map(drop),
        }
    }
}

type Client = gantry_proto::AuthorizedClient;

/// Step 1 done: everything this host brings to a rendezvous.
struct Connected {
    device: DeviceChoice,
    ring_listener: TcpListener,
    client: Client,
    endpoint: crate::endpoint::Endpoint,
    request: JoinRequest,
}

impl Connected {
    /// Resolves the device, binds the ring port, opens the channel to the coordinator and
    /// serves the probes. Every failure here is this host's: [`SessionError::Setup`].
    fn open(
        rt: &tokio::runtime::Runtime,
        options: &ClusterOptions,
        local: &Settings,
    ) -> Result<Self, SessionError> {
        Self::try_open(rt, options, local).map_err(SessionError::Setup)
    }

    fn try_open(
        rt: &tokio::runtime::Runtime,
        options: &ClusterOptions,
        local: &Settings,
    ) -> anyhow::Result<Self> {
        let device = options.device.unwrap_or(local.run.device);
        // Which GPU follows from the local rank the join assigns.
        let device_name = match runtime::resolve_device(device, 0)? {
            tch::Device::Cuda(_) => "cuda".to_owned(),
            _ => "cpu".to_owned(),
        };
        let (ring_listener, ring_addr) = bind_ring_port(options, local)?;

        let mut endpoint = coordinator_endpoint(&options.coordinator)?;
        let c = &local.cluster;
        if let Some(tls) =
            gantry_proto::tls::client_config(&c.tls_cert, &c.tls_key, &c.tls_ca, &c.tls_domain)?
        {
            endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = client(channel, &local.cluster.token)?;

        // Probes and /metrics for orchestrators: alive from here on, ready once the group has
        // formed, series once the rank is known.
        let probes = crate::endpoint::Endpoint::start(
            rt,
            &local.metrics.worker_addr,
            &format!("worker {}", options.worker_id),
        );
        let metrics_addr = probes
            .addr
            .map(|addr| format!("{}:{}", options.advertise_host, addr.port()))
            .unwrap_or_default();
        let request = JoinRequest {
            worker_id: options.worker_id.clone(),
            host: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            device: device_name,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_hash: if options.check_config {
                local.fingerprint()
            } else {
                String::new()
            },
            expected_world_size: 0,
            ring_addr,
            metrics_addr,
        };
        Ok(Self {
            device,
            ring_listener,
            client,
            endpoint: probes,
            request,
        })
    }

    /// Waits in the rendezvous (retrying while the coordinator is not reachable yet, up to
    /// `cluster.rendezvous_timeout`; a stop signal ends the wait), then takes the assignment.
    fn join(
        self,
        rt: &tokio::runtime::Runtime,
        options: &ClusterOptions,
        local: &Settings,
    ) -> Result<Joined, SessionError> {
        let Connected {
            device,
            ring_listener,
            mut client,
            endpoint,
            request,
        } = self;
        let deadline = Duration::from_secs_f64(local.cluster.rendezvous_timeout);
        let assignment = rt.block_on(async {
            tokio::select! {
                joined = join_with_retry(&mut client, request.clone(), deadline) => {
                    joined.map_err(SessionError::join_refused)
                }
                why = stop_signal(options.supervised) => Err(SessionError::Aborted {
                    reason: format!("{why} while waiting to join"),
                    during: None,
                }),
            }
        })?;

        let mut settings = Settings::from_toml(&assignment.config_toml)
            .map_err(|e| SessionError::Assignment(e.into()))?;
        settings.run.device = device;
        // The CPU share is this host's (e.g. its pod's CPU request), not the job's.
        if local.train.threads != 0 {
            settings.train.threads = local.train.threads;
        }
        info!(
            "worker {}: rank {} of {} (generation {}, backend {}, resume {})",
            options.worker_id,
            assignment.rank,
            assignment.world_size,
            assignment.generation,
            backend_name(assignment.backend()),
            assignment.resume
        );

        let metrics = gantry_metrics::WorkerMetrics::new(&gantry_metrics::Identity {
            run_id: assignment.run_id.clone(),
            rank: assignment.rank,
            generation: assignment.generation,
        })
        .context("creating the worker's metrics")
        .map_err(SessionError::Setup)?;
        endpoint.install(metrics.clone());
        endpoint.ready.set(true);
        let shared = Arc::new(Shared {
            metrics: Some(metrics.clone()),
            ..Shared::default()
        });
        shared.set_state(WorkerState::Starting);
        let member = Membership {
            worker_id: options.worker_id.clone(),
            rank: assignment.rank,
            generation: assignment.generation,
            credential: assignment.session_credential.clone(),
        };
        Ok(Joined {
            settings,
            assignment,
            ring_listener: Some(ring_listener),
            client,
            shared,
            member,
            metrics,
            supervised: options.supervised,
            endpoint,
            device,
            request,
        })
    }
}

/// The ring listener: bound to the advertised address when it is one (the only address
/// neighbours dial), to every interface when the advertised host is a name; and the address
/// this worker advertises for it.
fn bind_ring_port(
    options: &ClusterOptions,
    local: &Settings,
) -> anyhow::Result<(TcpListener, String)> {
    let ring_ip: std::net::IpAddr = options
        .advertise_host
        .parse()
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let ring_port = local.cluster.ring_port;
    let ring_listener = TcpListener::bind((ring_ip, ring_port))
        .with_context(|| format!("binding the ring port {ring_ip}:{ring_port}"))?;
    let ring_addr = format!(
        "{}:{}",
        options.advertise_host,
        ring_listener.local_addr()?.port()
    );
    Ok((ring_listener, ring_addr))
}

/// Step 2 done: a rank of one generation, with the configuration it trains.
struct Joined {
    settings: Settings,
    assignment: JoinResponse,
    /// Taken by the ring when the group forms.
    ring_listener: Option<TcpListener>,
    client: Client,
    shared: Arc<Shared>,
    member: Membership,
    metrics: gantry_metrics::WorkerMetrics,
    supervised: bool,
    /// Keeps the probes and /metrics served until the session ends.
    endpoint: crate::endpoint::Endpoint,
    /// What the next Join of a regroup needs again.
    device: DeviceChoice,
    request: JoinRequest,
}

/// What a finished rank reports: rank 0's summary (JSON; empty on other ranks) and its last
/// step.
struct Finished {
    summary_json: String,
    step: u64,
    /// Left at a regroup (the step was checkpointed): the next generation continues the run.
    regrouping: bool,
}

impl Joined {
    /// Back to step 1 after a regroup: the same channel, probes and identity, a fresh ring
    /// listener (the group's ring owned and closed the old one). Not ready until the next
    /// group forms.
    fn into_connected(
        self,
        options: &ClusterOptions,
        local: &Settings,
    ) -> Result<Connected, SessionError> {
        let (ring_listener, ring_addr) =
            bind_ring_port(options, local).map_err(SessionError::Setup)?;
        self.endpoint.ready.set(false);
        Ok(Connected {
            device: self.device,
            ring_listener,
            client: self.client,
            endpoint: self.endpoint,
            request: JoinRequest {
                ring_addr,
                ..self.request
            },
        })
    }

    /// Forms the group and trains it to the end, with heartbeats and signal handling
    /// running alongside.
    fn train(&mut self, rt: &tokio::runtime::Runtime) -> Result<Finished, SessionError> {
        let heartbeat = rt.spawn(heartbeat_loop(
            self.client.clone(),
            self.shared.clone(),
            self.member.clone(),
            Duration::from_secs_f64(self.settings.cluster.heartbeat_interval),
            Duration::from_secs_f64(self.settings.cluster.heartbeat_timeout),
        ));
        let signals = rt.spawn(watch_signals(self.shared.clone(), self.supervised));
        let outcome = self
            .form_group(rt)
            .and_then(|group| self.run_trainer(group));
        heartbeat.abort();
        signals.abort();
        outcome
    }

    /// The collective the coordinator chose, its abort handle registered (for every
    /// backend) before the group owns it.
    fn form_group(&mut self, rt: &tokio::runtime::Runtime) -> Result<Group, SessionError> {
        let rank = self.assignment.rank as usize;
        let world = self.assignment.world_size as usize;
        let collective: Box<dyn Collective> = match self.assignment.backend() {
            CollectiveBackend::Ring => {
                let (settings, assignment) = (&self.settings, &self.assignment);
                let peers = assignment
                    .ring_peers
                    .iter()
                    .map(|p| p.parse().with_context(|| format!("ring peer {p:?}")))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(SessionError::Assignment)?;
                let mut config = crate::group::ring_config(settings, rank, world, peers);
                // Distinct per job and generation, so a straggler of an old group is refused.
                config.session_id = session_id(&assignment.run_id, assignment.generation);
                config.secret = assignment.ring_secret.clone();
                let listener = self
                    .ring_listener
                    .take()
                    .context("the ring port was already used")
                    .map_err(SessionError::Setup)?;
                let ring = RingCollective::from_listener(listener, config).map_err(|source| {
                    SessionError::Collective {
                        context: "forming the ring",
                        source,
                    }
                })?;
                // Which path the group chose (one host, hosts with shared memory each, or
                // plain TCP) decides its speed and its summation order: say it.
                tracing::info!(
                    all_reduce_path = %ring.all_reduce_path(),
                    "ring formed: all-reduce path {}",
                    ring.all_reduce_path()
                );
                Box::new(ring)
            }
            CollectiveBackend::Nccl => {
                // Registered before the communicator exists: creation waits for every rank,
                // and a signal or the coordinator's abort must be able to end that wait too.
                let handle = AbortHandle::new();
                self.shared.set_collective(handle.clone());
                let timeout = crate::group::collective_timeout(&self.settings);
                let nccl_id = self.share_nccl_id(rt, timeout)?;
                let mut nccl = gantry_collective::nccl::NcclCollective::with_abort_handle(
                    rank,
                    world,
                    &nccl_id,
                    self.device_ordinal(),
                    timeout,
                    handle,
                )
                .map_err(|source| SessionError::Collective {
                    context: "forming the NCCL communicator",
                    source,
                })?;
                // The gradient all-reduce then runs on libtorch's current stream of the
                // training thread (the thread that calls it), in order with the backward
                // kernels that wrote the gradient and the optimiser kernels that read it.
                let ordinal = self.device_ordinal();
                nccl.set_device_stream(Box::new(move || {
                    runtime::current_cuda_stream(ordinal).map_err(|e| e.to_string())
                }));
                Box::new(nccl)
            }
            CollectiveBackend::Unspecified => {
                return Err(SessionError::Assignment(anyhow::anyhow!(
                    "no collective backend named (is the coordinator of another version?)"
                )));
            }
        };
        // An abort that came before this is seen by the check below.
        self.shared.set_collective(collective.abort_handle());
        let group = Group::new(collective, self.settings.collective.bucket_mb);
        if let Some(reason) = self.shared.abort_reason() {
            return Err(SessionError::Aborted {
                reason,
                during: Some(anyhow::anyhow!("before training")),
            });
        }
        Ok(group)
    }

    /// NCCL's unique id for this generation: rank 0 creates it (NCCL's bootstrap root then
    /// listens in this process, which the other ranks can reach) and publishes it through the
    /// coordinator; the other ranks wait for it there, up to `timeout`, or until an abort.
    fn share_nccl_id(
        &mut self,
        rt: &tokio::runtime::Runtime,
        timeout: Duration,
    ) -> Result<Vec<u8>, SessionError> {
        let created = if self.member.rank == 0 {
            let id = gantry_collective::nccl::NcclId::new().map_err(|source| {
                SessionError::Collective {
                    context: "creating the NCCL id",
                    source,
                }
            })?;
            id.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let request = ShareNcclIdRequest {
            worker_id: self.member.worker_id.clone(),
            generation: self.member.generation,
            rank: self.member.rank,
            session_credential: self.member.credential.clone(),
            nccl_id: created,
        };
        let client = &mut self.client;
        let shared = &self.shared;
        rt.block_on(async {
            tokio::select! {
                reply = tokio::time::timeout(timeout, client.share_nccl_id(request)) => match reply {
                    Ok(Ok(reply)) => Ok(reply.into_inner().nccl_id),
                    Ok(Err(status)) => Err(SessionError::NcclIdRefused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    }),
                    Err(_) => Err(SessionError::Collective {
                        context: "waiting for rank 0's NCCL id",
                        source: CollectiveError::NcclTimeout {
                            op: "ShareNcclId",
                            timeout,
                        },
                    }),
                },
                reason = abort_requested(shared) => Err(SessionError::Aborted {
                    reason,
                    during: Some(anyhow::anyhow!("waiting for rank 0's NCCL id")),
                }),
            }
        })
    }

    /// The CUDA device this rank trains on and creates its communicator on (the same one):
    /// its local rank among the visible devices. 0 on the CPU.
    fn device_ordinal(&self) -> usize {
        match self.settings.run.device {
            gantry_config::DeviceChoice::Cpu => 0,
            _ => cuda_ordinal(
                self.assignment.local_rank,
                usize::try_from(tch::Cuda::device_count()).unwrap_or(0),
            ),
        }
    }

    fn run_trainer(&mut self, group: Group) -> Result<Finished, SessionError> {
        self.try_run_trainer(group)
            .map_err(|error| classify_training_error(error, &self.shared))
    }

    fn try_run_trainer(&mut self, group: Group) -> anyhow::Result<Finished> {
        let settings = &self.settings;
        // A new generation continues from the newest complete checkpoint; before the first
        // checkpoint there is none, and the group starts afresh.
        let resume = if self.assignment.resume {
            crate::checkpoint::resume_from(&settings.run.dir)?
        } else {
            None
        };
        if let Some(c) = &resume {
            info!(
                "worker: resuming from step {} ({})",
                c.step(),
                c.path.display()
            );
        }
        let workers_on_host = self.assignment.workers_on_host.max(1) as usize;
        let ordinal = self.device_ordinal();
        let mut trainer =
            Trainer::with_resume(settings, group, workers_on_host, ordinal, resume.as_ref())?;
        trainer.set_metrics(self.metrics.clone());
        self.shared.step.store(trainer.step, Ordering::Relaxed);
        self.shared.set_state(WorkerState::Training);
        let mut observer = ClusterObserver {
            shared: self.shared.clone(),
            last_step_at: Instant::now(),
            step_seconds: 0.0,
        };
        let summary = match trainer.run_or_leave(&mut observer)? {
            RunEnd::Finished(summary) => summary,
            RunEnd::Left { step } => {
                return Ok(Finished {
                    summary_json: String::new(),
                    step,
                    regrouping: true,
                });
            }
        };
        self.shared.set_state(WorkerState::Done);
        let summary_json = if self.assignment.rank == 0 {
            serde_json::to_string(&summary)?
        } else {
            String::new()
        };
        Ok(Finished {
            summary_json,
            step: trainer.step,
            regrouping: false,
        })
    }

    /// Step 4: tells the coordinator how this rank ended: its summary, or the error and
    /// whether a restart could help. Best effort: a coordinator that is gone learns it from
    /// the missing heartbeats instead.
    fn report(&mut self, rt: &tokio::runtime::Runtime, outcome: &Result<Finished, SessionError>) {
        let member = &self.member;
        let finish = FinishRequest {
            worker_id: member.worker_id.clone(),
            generation: member.generation,
            rank: member.rank,
            session_credential: member.credential.clone(),
            ok: outcome.is_ok(),
            regrouping: outcome.as_ref().is_ok_and(|f| f.regrouping),
            retryable: outcome.as_ref().err().is_some_and(SessionError::retryable),
            error: outcome
                .as_ref()
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default(),
            summary_json: outcome
                .as_ref()
                .map(|f| f.summary_json.clone())
                .unwrap_or_default(),
            step: match outcome {
                Ok(finished) => finished.step,
                Err(_) => self.shared.step.load(Ordering::Relaxed),
            },
        };
        let client = &mut self.client;
        let reported = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), client.finish(finish)).await
        });
        if let Ok(Err(status)) = &reported {
            warn!(
                "worker {}: could not report the outcome: {}",
                member.worker_id,
                status.message()
            );
        }
    }
}

/// Training's errors come out of the trainer as `anyhow` chains (model code, the data set,
/// the disk and the collective all meet there), so this is the one place they are judged:
/// an abort noticed meanwhile (by [`Shared`]), a collective failure (the group broke: a new
/// generation re-forms it) and a data download that failed on the network are retryable;
/// everything else (a configuration the data set cannot meet, a full disk, a corrupt
/// checkpoint) would fail again the same way.
fn classify_training_error(error: anyhow::Error, shared: &Shared) -> SessionError {
    if let Some(reason) = shared.abort_reason() {
        return SessionError::Aborted {
            reason,
            during: Some(error),
        };
    }
    let retryable = error.chain().any(|cause| {
        cause.downcast_ref::<CollectiveError>().is_some()
            || cause
                .downcast_ref::<gantry_data::DataError>()
                .is_some_and(gantry_data::DataError::is_transient)
    });
    SessionError::Training { error, retryable }
}

fn client(channel: Channel, token: &str) -> anyhow::Result<Client> {
    let token = gantry_proto::BearerToken::new(token).context("the join token")?;
    Ok(CoordinatorClient::with_interceptor(channel, token))
}

/// The coordinator's URL as an endpoint: `http://HOST:PORT` or `https://HOST:PORT`, named in
/// the error when it is anything else (tonic would only say "transport error" at the first
/// call).
fn coordinator_endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .ok()
        .filter(|u: &tonic::codegen::http::Uri| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        })
        .with_context(|| {
            format!(
                "--coordinator {url:?} is not a URL like http://HOST:7070 (http or https, a \
                 host and a port)"
            )
        })?;
    Ok(Endpoint::from(uri))
}

/// Visible CUDA device of the worker with `local_rank` on its host: workers sharing a host
/// take distinct devices while there are enough (a worker given one device by
/// `CUDA_VISIBLE_DEVICES` sees it as device 0).
fn cuda_ordinal(local_rank: u32, visible: usize) -> usize {
    local_rank as usize % visible.max(1)
}

fn backend_name(backend: CollectiveBackend) -> &'static str {
    match backend {
        CollectiveBackend::Ring => "ring",
        CollectiveBackend::Nccl => "nccl",
        CollectiveBackend::Unspecified => "unspecified",
    }
}

/// Join, retrying while the coordinator is not (yet) reachable, up to `deadline`.
async fn join_with_retry(
    client: &mut Client,
    join: JoinRequest,
    deadline: Duration,
) -> Result<JoinResponse, Status> {
    let started = Instant::now();
    loop {
        match client.join(join.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == Code::Unavailable && started.elapsed() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

fn session_id(run_id: &str, generation: u64) -> u64 {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in run_id.bytes().chain(generation.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The coordinator's newest command for this rank, from a heartbeat reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Command {
    #[default]
    Continue,
    /// Hold after this step (every rank the same one) until told otherwise.
    PauseAt(u64),
    CheckpointAt(u64),
    StopAt(u64),
    /// Checkpoint after this step and leave the generation for the next one.
    RegroupAt(u64),
}

impl Command {
    /// A heartbeat reply's command; `None` for ABORT (handled as an abort, not a command)
    /// and for values this version does not know.
    fn from_reply(command: i32, at_step: u64) -> Option<Self> {
        match WorkerCommand::try_from(command).ok()? {
            WorkerCommand::Continue => Some(Command::Continue),
            WorkerCommand::Pause => Some(Command::PauseAt(at_step)),
            WorkerCommand::Checkpoint => Some(Command::CheckpointAt(at_step)),
            WorkerCommand::Stop => Some(Command::StopAt(at_step)),
            WorkerCommand::Regroup => Some(Command::RegroupAt(at_step)),
            WorkerCommand::Abort | WorkerCommand::Unspecified => None,
        }
    }
}

/// State shared between the training thread and the gRPC tasks.
#[derive(Debug, Default)]
struct Shared {
    step: AtomicU64,
    state: AtomicU64,
    /// The newest logged step, for the next heartbeat.
    newest_logged: Mutex<Option<LoggedStep>>,
    /// The recent seconds per step (`f64` bits), updated every step: the coordinator sizes
    /// the lead of a common pause, stop or checkpoint step from it, so an estimate that waited
    /// for the next logged step would leave it guessing early in a run.
    step_seconds: AtomicU64,
    command: Mutex<Command>,
    abort: AtomicBool,
    abort_reason: Mutex<String>,
    /// The collective's handle, whatever the backend: heartbeats report its sequence, and
    /// [`Shared::abort`] interrupts an operation in progress through it.
    collective: Mutex<Option<AbortHandle>>,
    /// The series behind /metrics; heartbeats carry their condensed figures.
    metrics: Option<gantry_metrics::WorkerMetrics>,
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn abort(&self, reason: String) {
        if !self.abort.swap(true, Ordering::SeqCst) {
            *locked(&self.abort_reason) = reason;
        }
        if let Some(collective) = locked(&self.collective).as_ref() {
            collective.abort();
        }
    }

    fn abort_reason(&self) -> Option<String> {
        self.abort
            .load(Ordering::SeqCst)
            .then(|| locked(&self.abort_reason).clone())
    }

    fn set_collective(&self, handle: AbortHandle) {
        *locked(&self.collective) = Some(handle);
    }

    fn collective_sequence(&self) -> u64 {
        locked(&self.collective)
            .as_ref()
            .map_or(0, AbortHandle::sequence)
    }

    fn set_state(&self, state: WorkerState) {
        self.state.store(state as u64, Ordering::Relaxed);
    }
}

/// The seconds per step the coordinator sizes its leads from, after a step that `took`
/// seconds (`previous` 0 before the first). An exponential average smooths single slow steps
/// (logging, samples), and a faster step is taken at once: an estimate that is too slow makes
/// a lead too short, so that a rank passes the announced step before it hears of it (and
/// waits in the next all-reduce for peers that stopped there), while one too fast only
/// announces the step a little later. The first steps are the slowest of a run (allocations,
/// kernels generated on first use): averaged in, they would keep the estimate slow for tens
/// of steps.
fn pace_estimate(previous: f64, took: f64) -> f64 {
    if previous == 0.0 {
        took
    } else {
        (0.9 * previous + 0.1 * took).min(took)
    }
}

struct ClusterObserver {
    shared: Arc<Shared>,
    last_step_at: Instant,
    step_seconds: f64,
}

impl StepObserver for ClusterObserver {
    fn after_step(&mut self, step: u64, logged: Option<&LoggedStep>) -> anyhow::Result<Directive> {
        let now = Instant::now();
        let took = now.duration_since(self.last_step_at).as_secs_f64();
        self.last_step_at = now;
        self.step_seconds = pace_estimate(self.step_seconds, took);
        self.shared.step.store(step, Ordering::Relaxed);
        self.shared
            .step_seconds
            .store(self.step_seconds.to_bits(), Ordering::Relaxed);
        if let Some(logged) = logged {
            *locked(&self.shared.newest_logged) = Some(logged.clone());
        }
        loop {
            if let Some(reason) = self.shared.abort_reason() {
                bail!("aborted at step {step}: {reason}");
            }
            let command = *locked(&self.shared.command);
            match command {
                Command::StopAt(at) if step >= at => return Ok(Directive::Stop),
                Command::RegroupAt(at) if step >= at => return Ok(Directive::Leave),
                Command::CheckpointAt(at) if step == at => return Ok(Directive::Checkpoint),
                Command::PauseAt(at) if step >= at => {
                    self.shared.set_state(WorkerState::Paused);
                    std::thread::sleep(Duration::from_millis(100));
                    self.last_step_at = Instant::now();
                }
                _ => {
                    self.shared.set_state(WorkerState::Training);
                    return Ok(Directive::Continue);
                }
            }
        }
    }
}

/// Who this worker is in its generation, as every Heartbeat and Finish must prove.
#[derive(Debug, Clone)]
struct Membership {
    worker_id: String,
    rank: u32,
    generation: u64,
    /// From the Join reply; never logged.
    credential: String,
}

async fn heartbeat_loop(
    mut client: Client,
    shared: Arc<Shared>,
    member: Membership,
    interval: Duration,
    timeout: Duration,
) {
    let mut last_ok = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let logged = locked(&shared.newest_logged).clone();
        let step_seconds = f64::from_bits(shared.step_seconds.load(Ordering::Relaxed));
        let request = HeartbeatRequest {
            worker_id: member.worker_id.clone(),
            generation: member.generation,
            rank: member.rank,
            session_credential: member.credential.clone(),
            state: i32::try_from(shared.state.load(Ordering::Relaxed)).unwrap_or(0),
            step: shared.step.load(Ordering::Relaxed),
            collective_seq: shared.collective_sequence(),
            images_per_second: logged.as_ref().map_or(0.0, |l| l.images_per_second),
            statistics: logged
                .iter()
                .flat_map(|f| &f.statistics)
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
            step_seconds,
            figures: shared.metrics.as_ref().map(|m| worker_figures(&m.report())),
        };
        match tokio::time::timeout(
            interval.max(Duration::from_secs(1)) * 2,
            client.heartbeat(request),
        )
        .await
        {
            Ok(Ok(response)) => {
                last_ok = Instant::now();
                let response = response.into_inner();
                match Command::from_reply(response.command, response.at_step) {
                    Some(command) => *locked(&shared.command) = command,
                    None if response.command == WorkerCommand::Abort as i32 => {
                        shared.abort("the coordinator aborted the generation".into());
                    }
                    None => {}
                }
            }
            Ok(Err(status)) if matches!(status.code(), Code::Aborted | Code::NotFound) => {
                shared.abort(format!(
                    "the coordinator ended this generation: {}",
                    status.message()
                ));
            }
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                shared.abort(format!("refused by the coordinator: {}", status.message()));
            }
            _ if last_ok.elapsed() > timeout => {
                shared.abort(format!(
                    "lost the coordinator for {:.1} s",
                    last_ok.elapsed().as_secs_f64()
                ));
            }
            _ => {}
        }
    }
}

fn worker_figures(report: &gantry_metrics::WorkerReport) -> WorkerFigures {
    WorkerFigures {
        images_total: report.images_total,
        nonfinite_total: report.nonfinite_total,
        allreduce_bytes_total: report.allreduce_bytes_total,
        allreduce_seconds_total: report.allreduce_seconds_total,
        checkpoints_total: report.checkpoints_total,
        gradient_norms: report.gradient_norms.iter().cloned().collect(),
        phase_seconds: report.phase_seconds.iter().cloned().collect(),
        last_checkpoint_seconds: report.last_checkpoint_seconds,
        last_checkpoint_bytes: report.last_checkpoint_bytes,
        quality: report.quality.map(|q| gantry_proto::v1::Quality {
            step: q.step,
            fid: q.fid,
            inception_score: q.inception_score,
            classes_covered: q.classes_covered,
        }),
    }
}

/// Resolves with the abort's reason once one is requested (a signal, the coordinator).
async fn abort_requested(shared: &Shared) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let Some(reason) = shared.abort_reason() {
            return reason;
        }
    }
}

async fn watch_signals(shared: Arc<Shared>, supervised: bool) {
    let why = stop_signal(supervised).await;
    shared.abort(why.to_owned());
}

/// Resolves at the first signal that stops this worker: SIGTERM, or SIGINT unless
/// `supervised` (then SIGINT is received and ignored: the default action would kill the
/// process). Never resolves if the handlers cannot be installed.
async fn stop_signal(supervised: bool) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "terminated (SIGTERM)",
            _ = int.recv() => if !supervised {
                return "interrupted (SIGINT)";
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_estimate_drops_to_a_faster_step_at_once_and_rises_slowly() {
        // A first step of a second (warm-up), then steps of 10 ms.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let mut pace = pace_estimate(0.0, 1.0);
        assert!(close(pace, 1.0), "{pace}");
        pace = pace_estimate(pace, 0.010);
        assert!(
            close(pace, 0.010),
            "{pace}: averaged in, the warm-up would read 109 ms"
        );
        // One slow step (a sample written) moves it a tenth of the way.
        pace = pace_estimate(pace, 0.110);
        assert!(close(pace, 0.020), "{pace}");
        // A sustained slow-down is followed, gradually.
        for _ in 0..60 {
            pace = pace_estimate(pace, 0.050);
        }
        assert!((pace - 0.050).abs() < 1e-3, "{pace}");
    }

    #[test]
    fn each_way_a_session_ends_is_retryable_or_fatal_by_what_it_is() {
        let collective = SessionError::Collective {
            context: "forming the ring",
            source: CollectiveError::Aborted,
        };
        let refused = |code| SessionError::JoinRefused {
            code,
            message: "x".into(),
        };
        let cases = [
            (SessionError::Setup(anyhow::anyhow!("binding")), false),
            (SessionError::Assignment(anyhow::anyhow!("peer")), false),
            (refused(Code::FailedPrecondition), false),
            (refused(Code::PermissionDenied), false),
            (refused(Code::Unavailable), true),
            (refused(Code::Aborted), true),
            (
                SessionError::Aborted {
                    reason: "terminated (SIGTERM)".into(),
                    during: None,
                },
                true,
            ),
            (collective, true),
            (
                SessionError::Collective {
                    context: "forming the NCCL communicator",
                    source: CollectiveError::NoCudaDevice("none".into()),
                },
                false,
            ),
            (
                SessionError::NcclIdRefused {
                    code: Code::Aborted,
                    message: "the generation ended".into(),
                },
                true,
            ),
        ];
        for (error, retryable) in cases {
            assert_eq!(error.retryable(), retryable, "{error}");
        }
    }

    #[test]
    fn training_errors_are_judged_by_their_cause() {
        let shared = Shared::default();
        let disk = anyhow::Error::new(std::io::Error::other("No space left on device"))
            .context("writing checkpoint");
        assert!(!classify_training_error(disk, &shared).retryable());
        let broken = anyhow::Error::new(CollectiveError::Aborted).context("all-reduce");
        assert!(classify_training_error(broken, &shared).retryable());

        // Once an abort was asked for, whatever the trainer says is the abort's echo.
        shared.abort("the coordinator aborted the generation".into());
        let echo = anyhow::anyhow!("aborted at step 7: ...");
        let error = classify_training_error(echo, &shared);
        assert!(error.retryable());
        let text = format!("{error:#}");
        assert!(
            text.starts_with("aborted: the coordinator aborted the generation: aborted at step 7"),
            "{text}"
        );
    }

    #[test]
    fn workers_sharing_a_host_take_distinct_gpus() {
        assert_eq!(
            (0..4).map(|r| cuda_ordinal(r, 4)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // One device each (a local worker given its own CUDA_VISIBLE_DEVICES): device 0.
        assert_eq!(cuda_ordinal(3, 1), 0);
        assert_eq!(cuda_ordinal(5, 4), 1);
        assert_eq!(cuda_ordinal(2, 0), 0);
    }

    #[test]
    fn heartbeat_replies_become_typed_commands() {
        let reply = |c: WorkerCommand, at| Command::from_reply(c as i32, at);
        assert_eq!(reply(WorkerCommand::Continue, 0), Some(Command::Continue));
        assert_eq!(reply(WorkerCommand::Pause, 9), Some(Command::PauseAt(9)));
        assert_eq!(
            reply(WorkerCommand::Checkpoint, 40),
            Some(Command::CheckpointAt(40))
        );
        assert_eq!(reply(WorkerCommand::Stop, 41), Some(Command::StopAt(41)));
        assert_eq!(
            reply(WorkerCommand::Regroup, 42),
            Some(Command::RegroupAt(42))
        );
        assert_eq!(reply(WorkerCommand::Abort, 0), None);
        assert_eq!(Command::from_reply(99, 0), None);
    }

    #[test]
    fn a_malformed_coordinator_address_is_named() {
        for url in ["not-a-url", "ftp://host:1", "http://"] {
            let error = coordinator_endpoint(url).unwrap_err().to_string();
            assert!(
                error.contains("is not a URL like http://HOST:7070"),
                "{error}"
            );
        }
        assert!(coordinator_endpoint("https://coordinator:7070").is_ok());
    }
}
