//! Cluster mode: join a coordinator, train as the rank it assigns, report, obey control.
//!
//! The training thread stays blocking and never waits on the network outside the
//! collective. A small tokio runtime runs the gRPC client: the Join call before training, a
//! heartbeat task during it, and the Finish call after. They share [`Shared`]: progress flows
//! out through atomics, commands flow in through a mutex, and an abort (the coordinator's,
//! a lost coordinator, SIGTERM) also aborts the ring so a rank blocked in an all-reduce
//! returns at once.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use gantry_collective::{AbortHandle, RingCollective};
use gantry_config::{DeviceChoice, Settings};
use gantry_models::runtime;
use gantry_proto::v1::coordinator_client::CoordinatorClient;
use gantry_proto::v1::{
    Command, FinishRequest, HeartbeatRequest, JoinRequest, JoinResponse, WorkerFigures, WorkerState,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::sync::Group;
use crate::train::{Directive, LoggedStep, StepObserver, Trainer};

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

/// State shared between the training thread and the gRPC tasks.
#[derive(Debug, Default)]
struct Shared {
    step: AtomicU64,
    state: AtomicU64,
    figures: Mutex<Option<(LoggedStep, f64)>>,
    command: Mutex<(i32, u64)>,
    abort: AtomicBool,
    abort_reason: Mutex<String>,
    ring: Mutex<Option<AbortHandle>>,
    /// The series behind /metrics; heartbeats carry their condensed figures.
    metrics: Option<gantry_metrics::WorkerMetrics>,
}

impl Shared {
    fn abort(&self, reason: String) {
        if !self.abort.swap(true, Ordering::SeqCst) {
            *self.abort_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        }
        if let Some(ring) = self.ring.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            ring.abort();
        }
    }

    fn abort_reason(&self) -> Option<String> {
        self.abort.load(Ordering::SeqCst).then(|| {
            self.abort_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    fn set_state(&self, state: WorkerState) {
        self.state.store(state as u64, Ordering::Relaxed);
    }
}

type Client = gantry_proto::AuthorizedClient;

fn client(channel: Channel, token: &str) -> Result<Client> {
    let token = gantry_proto::BearerToken::new(token).context("the join token")?;
    Ok(CoordinatorClient::with_interceptor(channel, token))
}

/// Runs this worker in cluster mode and returns the process exit code.
pub fn run(options: &ClusterOptions, local: &Settings) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match run_inner(&runtime, options, local) {
        Ok(()) => 0,
        Err(Failure::Retryable(e)) => {
            eprintln!("worker {}: leaving (retryable): {e:#}", options.worker_id);
            EXIT_RETRYABLE
        }
        Err(Failure::Fatal(e)) => {
            eprintln!("worker {}: error: {e:#}", options.worker_id);
            1
        }
    }
}

enum Failure {
    Retryable(anyhow::Error),
    Fatal(anyhow::Error),
}

/// The coordinator's URL as an endpoint: `http://HOST:PORT` or `https://HOST:PORT`, named in
/// the error when it is anything else (tonic would only say "transport error" at the first
/// call).
fn coordinator_endpoint(url: &str) -> Result<Endpoint> {
    let uri: tonic::codegen::http::Uri = url.parse().ok().filter(|u: &tonic::codegen::http::Uri| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    }).with_context(|| {
        format!("--coordinator {url:?} is not a URL like http://HOST:7070 (http or https, a host and a port)")
    })?;
    Endpoint::from_shared(uri.to_string()).with_context(|| format!("coordinator address {url:?}"))
}

/// Status codes after which joining again (a new generation, a restarted coordinator) can work.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Aborted | Code::Unavailable | Code::NotFound | Code::DeadlineExceeded
    )
}

fn run_inner(
    rt: &tokio::runtime::Runtime,
    options: &ClusterOptions,
    local: &Settings,
) -> Result<(), Failure> {
    // The gRPC channel spawns its connection task on the runtime it is created in.
    let _runtime = rt.enter();
    let fatal = Failure::Fatal;
    let device_choice = options.device.unwrap_or(local.run.device);
    let device = runtime::resolve_device(device_choice, 0).map_err(|e| fatal(e.into()))?;
    let device_name = match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    };

    // Bound to the advertised address when it is one (the only address neighbours dial);
    // every interface only when the advertised host is a name.
    let ring_ip: std::net::IpAddr = options
        .advertise_host
        .parse()
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let ring_listener = TcpListener::bind((ring_ip, local.cluster.ring_port))
        .with_context(|| {
            format!(
                "binding the ring port {ring_ip}:{}",
                local.cluster.ring_port
            )
        })
        .map_err(fatal)?;
    let ring_addr = format!(
        "{}:{}",
        options.advertise_host,
        ring_listener
            .local_addr()
            .map_err(|e| fatal(e.into()))?
            .port()
    );

    let mut endpoint = coordinator_endpoint(&options.coordinator).map_err(fatal)?;
    let c = &local.cluster;
    if let Some(tls) =
        gantry_proto::tls::client_config(&c.tls_cert, &c.tls_key, &c.tls_ca, &c.tls_domain)
            .map_err(|e| fatal(e.into()))?
    {
        endpoint = endpoint
            .tls_config(tls)
            .context("TLS configuration")
            .map_err(fatal)?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy();
    let mut client = client(channel, &local.cluster.token).map_err(fatal)?;

    // Probes and /metrics for orchestrators: alive from here on, ready once the group has
    // formed, series once the rank is known.
    let endpoint = crate::endpoint::Endpoint::start(
        rt,
        &local.metrics.worker_addr,
        &format!("worker {}", options.worker_id),
    );
    let metrics_addr = endpoint
        .addr
        .map(|addr| format!("{}:{}", options.advertise_host, addr.port()))
        .unwrap_or_default();
    let join = JoinRequest {
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
    let joining = join_with_retry(
        &mut client,
        join,
        Duration::from_secs_f64(local.cluster.rendezvous_timeout),
    );
    let assignment = rt
        .block_on(async {
            tokio::select! {
                joined = joining => Ok(joined),
                why = stop_signal(options.supervised) => Err(why),
            }
        })
        .map_err(|why| Failure::Retryable(anyhow!("{why} while waiting to join")))?
        .map_err(|status| {
            let error = anyhow!("join refused: {} ({:?})", status.message(), status.code());
            if retryable(&status) {
                Failure::Retryable(error)
            } else {
                Failure::Fatal(error)
            }
        })?;

    let mut settings = Settings::from_toml(&assignment.config_toml)
        .context("the coordinator's configuration")
        .map_err(fatal)?;
    settings.run.device = device_choice;
    // The CPU share is this host's (e.g. its pod's CPU request), not the job's.
    if local.train.threads != 0 {
        settings.train.threads = local.train.threads;
    }
    eprintln!(
        "worker {}: rank {} of {} (generation {}, backend {}, resume {})",
        options.worker_id,
        assignment.rank,
        assignment.world_size,
        assignment.generation,
        assignment.backend,
        assignment.resume
    );

    let metrics = gantry_metrics::WorkerMetrics::new(&gantry_metrics::Identity {
        run_id: assignment.run_id.clone(),
        rank: assignment.rank,
        generation: assignment.generation,
    })
    .context("creating the worker's metrics")
    .map_err(fatal)?;
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
    let heartbeat = rt.spawn(heartbeat_loop(
        client.clone(),
        shared.clone(),
        member.clone(),
        Duration::from_secs_f64(settings.cluster.heartbeat_interval),
        Duration::from_secs_f64(settings.cluster.heartbeat_timeout),
    ));
    let signals = rt.spawn(watch_signals(shared.clone(), options.supervised));

    let outcome = train(&settings, &assignment, ring_listener, &shared, metrics);
    heartbeat.abort();
    signals.abort();

    // Judged before reporting, so that the coordinator knows whether restarting can help.
    let retryable = outcome.as_ref().err().is_some_and(|e| {
        shared.abort_reason().is_some() || is_collective_error(e) || is_transient_data_error(e)
    });
    let (ok, error, summary_json, step) = match &outcome {
        Ok((summary, step)) => (true, String::new(), summary.clone(), *step),
        Err(e) => (
            false,
            format!("{e:#}"),
            String::new(),
            shared.step.load(Ordering::Relaxed),
        ),
    };
    let finish = FinishRequest {
        worker_id: member.worker_id,
        generation: member.generation,
        rank: member.rank,
        session_credential: member.credential,
        ok,
        retryable,
        error,
        summary_json,
        step,
    };
    let reported = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.finish(finish)).await
    });
    if let Ok(Err(status)) = &reported {
        eprintln!(
            "worker {}: could not report the outcome: {}",
            options.worker_id,
            status.message()
        );
    }
    match outcome {
        Ok(_) => Ok(()),
        Err(e) if retryable => Err(Failure::Retryable(e)),
        Err(e) => Err(Failure::Fatal(e)),
    }
}

/// A data set download that failed on the network: another generation may get through.
fn is_transient_data_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<gantry_data::DataError>()
            .is_some_and(gantry_data::DataError::is_transient)
    })
}

fn is_collective_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<gantry_collective::CollectiveError>()
            .is_some()
    })
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

fn train(
    settings: &Settings,
    assignment: &JoinResponse,
    ring_listener: TcpListener,
    shared: &Arc<Shared>,
    metrics: gantry_metrics::WorkerMetrics,
) -> Result<(String, u64)> {
    let rank = assignment.rank as usize;
    let world = assignment.world_size as usize;
    let group = match assignment.backend.as_str() {
        "ring" => {
            let peers = assignment
                .ring_peers
                .iter()
                .map(|p| p.parse().with_context(|| format!("ring peer {p:?}")))
                .collect::<Result<Vec<_>>>()?;
            let mut config = crate::sync::ring_config(settings, rank, world, peers);
            // Distinct per job and generation, so a straggler of an old group is refused.
            config.session_id = session_id(&assignment.run_id, assignment.generation);
            config.secret = assignment.ring_secret.clone();
            let ring =
                RingCollective::from_listener(ring_listener, config).context("forming the ring")?;
            *shared.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring.abort_handle());
            Group::new(Box::new(ring), settings.collective.bucket_mb)
        }
        "nccl" => {
            let nccl =
                gantry_collective::nccl::NcclCollective::new(rank, world, &assignment.nccl_id, 0)
                    .context("forming the NCCL communicator")?;
            Group::new(Box::new(nccl), settings.collective.bucket_mb)
        }
        other => bail!("unknown backend {other:?}"),
    };
    if let Some(reason) = shared.abort_reason() {
        bail!("aborted before training: {reason}");
    }
    // A new generation continues from the newest complete checkpoint; before the first
    // checkpoint there is none, and the group starts afresh.
    let resume = if assignment.resume {
        crate::checkpoint::resume_from(&settings.run.dir)?
    } else {
        None
    };
    if let Some(c) = &resume {
        eprintln!(
            "worker: resuming from step {} ({})",
            c.step(),
            c.path.display()
        );
    }
    let workers_on_host = assignment.workers_on_host.max(1) as usize;
    let mut trainer = Trainer::with_resume(settings, group, workers_on_host, 0, resume.as_ref())?;
    trainer.set_metrics(metrics);
    shared.step.store(trainer.step, Ordering::Relaxed);
    shared.set_state(WorkerState::Training);
    let mut observer = ClusterObserver {
        shared: shared.clone(),
        last_step_at: Instant::now(),
        step_seconds: 0.0,
    };
    let summary = trainer
        .run(&mut observer)
        .map_err(|e| match shared.abort_reason() {
            Some(reason) => e.context(format!("aborted: {reason}")),
            None => e,
        })?;
    shared.set_state(WorkerState::Done);
    let json = if rank == 0 {
        serde_json::to_string(&summary)?
    } else {
        String::new()
    };
    Ok((json, trainer.step))
}

fn session_id(run_id: &str, generation: u64) -> u64 {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in run_id.bytes().chain(generation.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

struct ClusterObserver {
    shared: Arc<Shared>,
    last_step_at: Instant,
    step_seconds: f64,
}

impl StepObserver for ClusterObserver {
    fn after_step(&mut self, step: u64, figures: Option<&LoggedStep>) -> Result<Directive> {
        let now = Instant::now();
        let took = now.duration_since(self.last_step_at).as_secs_f64();
        self.last_step_at = now;
        // An exponential average smooths single slow steps (logging, samples).
        self.step_seconds = if self.step_seconds == 0.0 {
            took
        } else {
            0.9 * self.step_seconds + 0.1 * took
        };
        self.shared.step.store(step, Ordering::Relaxed);
        if let Some(figures) = figures {
            *self
                .shared
                .figures
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((figures.clone(), self.step_seconds));
        }
        loop {
            if let Some(reason) = self.shared.abort_reason() {
                bail!("aborted at step {step}: {reason}");
            }
            let (command, at_step) = *self
                .shared
                .command
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match Command::try_from(command) {
                Ok(Command::Stop) if step >= at_step => return Ok(Directive::Stop),
                Ok(Command::Checkpoint) if step == at_step => return Ok(Directive::Checkpoint),
                Ok(Command::Pause) => {
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
        let (figures, step_seconds) = shared
            .figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map_or((None, 0.0), |(f, s)| (Some(f), s));
        let request = HeartbeatRequest {
            worker_id: member.worker_id.clone(),
            generation: member.generation,
            rank: member.rank,
            session_credential: member.credential.clone(),
            state: i32::try_from(shared.state.load(Ordering::Relaxed)).unwrap_or(0),
            step: shared.step.load(Ordering::Relaxed),
            collective_seq: shared
                .ring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or(0, AbortHandle::sequence),
            images_per_second: figures.as_ref().map_or(0.0, |f| f.images_per_second),
            statistics: figures
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
                if response.command == Command::Abort as i32 {
                    shared.abort("the coordinator aborted the generation".into());
                }
                *shared.command.lock().unwrap_or_else(|e| e.into_inner()) =
                    (response.command, response.at_step);
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
