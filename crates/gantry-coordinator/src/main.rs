//! `coordinator`: runs a data-parallel training job (any model family) across a group of
//! workers, or, as `coordinator status|pause|resume|checkpoint|stop`, operates a running one.
//!
//! `coordinator --workers N` starts N local worker processes; `--expect-workers N` waits for N
//! external ones (`worker --coordinator URL`, as on Kubernetes). Either way it assigns ranks,
//! hands out the effective configuration, watches heartbeats and exit statuses, restarts the
//! whole group from the newest checkpoint after a failure (up to `cluster.max_restarts`), and
//! writes `summary.json` when the job is done.
//!
//! - [`job`]: the job's state machine (a generation's phases, the events they raise).
//! - [`supervise`](mod@supervise): what the process does about those events, signals and local workers.
//! - [`service`], [`auth`], [`admit`]: the gRPC face, its credentials and Join validation.
//! - [`http`], [`history`]: the status page, `/metrics` and the charts' history.
//! - [`spawn`]: local worker processes; [`operate`]: the operator's commands.
//! - [`elastic`]: the elastic-membership settings (`cluster.min_workers`, the global batch).

mod admit;
mod auth;
mod elastic;
mod history;
mod http;
mod job;
mod operate;
mod progress;
mod service;
mod spawn;
mod supervise;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_config::{ConfigArgs, Settings};
use gantry_metrics::logs::{self, LogFormat};
use gantry_proto::v1::coordinator_server::CoordinatorServer;

use crate::auth::TokenCheck;
use crate::job::{Job, JobSpec};
use crate::spawn::LocalWorkers;

/// Exit codes (the README's table).
mod exit {
    /// The job finished (all steps, or an operator's `stop`): summary.json is written.
    pub const DONE: i32 = 0;
    /// The job failed, or the command line or configuration was refused.
    pub const FAILED: i32 = 1;
    /// SIGINT (Ctrl-C) stopped the job after a checkpoint: continue it with --resume.
    pub const STOPPED: i32 = 75;
    /// SIGTERM (an orchestrator) stopped the job after a checkpoint: continue it with
    /// --resume (128 + 15, what a shell reports for a process killed by SIGTERM).
    pub const TERMINATED: i32 = 143;
}

/// The Gantry coordinator.
#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// An operator's command to a running job (instead of running one).
    #[command(subcommand)]
    operate: Option<operate::Operate>,
    /// Start this many local worker processes (one per GPU when there are enough GPUs).
    #[arg(long, conflicts_with = "expect_workers", value_parser = clap::value_parser!(u32).range(1..))]
    workers: Option<u32>,
    /// Start no workers; wait for this many external ones (`worker --coordinator URL`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    expect_workers: Option<u32>,
    /// gRPC listen address (default: cluster.listen; 127.0.0.1 with any free port for --workers).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// HTTP address for the status page, /metrics, /healthz and /readyz (default:
    /// metrics.addr; 127.0.0.1 with any free port for --workers).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Start afresh even where the run directory holds an earlier run, replacing its metrics
    /// and checkpoints (without it, such a directory is refused).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Continue from the newest checkpoint when the run directory has one, start afresh when
    /// it has none: for a coordinator that its orchestrator restarts (a Kubernetes
    /// Deployment), whose run directory is its own.
    #[arg(long, conflicts_with_all = ["resume", "overwrite"])]
    resume_if_present: bool,
    /// Start more local workers than this host can hold (by default at most 8 per core, and
    /// 512 MiB of available memory each).
    #[arg(long, requires = "workers")]
    oversubscribe: bool,
    /// The worker binary to start (default: `worker` beside this binary).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// How logs are written to stderr (level by RUST_LOG, default info); local workers
    /// inherit it.
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = logs::init(cli.log_format) {
        // No logger to say it with: the only direct write to stderr.
        eprintln!("coordinator: error: {error}");
        std::process::exit(exit::FAILED);
    }
    let code = match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("coordinator: error: {error:#}");
            exit::FAILED
        }
    };
    std::process::exit(code);
}

fn run(cli: &Cli) -> Result<i32> {
    if let Some(command) = &cli.operate {
        return operate::run(command);
    }
    let (world, local) = match (cli.workers, cli.expect_workers) {
        (Some(n), None) => (n, true),
        (None, Some(n)) => (n, false),
        _ => bail!(
            "pass --workers N (start local workers) or --expect-workers N (wait for external ones)"
        ),
    };
    if local && !cli.oversubscribe {
        spawn::check_host_fits(world)?;
    }
    let (mut settings, resume) = load_settings(cli)?;
    let min_workers = elastic::resolve(&mut settings, world)?;
    let token = match (settings.cluster.token.is_empty(), local) {
        (false, _) => settings.cluster.token.clone(),
        (true, true) => auth::generate_token(),
        (true, false) => bail!(
            "cluster.token is empty: external workers need a shared join token \
             (set GANTRY__CLUSTER__TOKEN or cluster.token)"
        ),
    };
    let listen = match (&cli.listen, local) {
        (Some(addr), _) => addr.clone(),
        (None, true) => "127.0.0.1:0".to_owned(),
        (None, false) => settings.cluster.listen.clone(),
    };
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?}"))?;
    let worker_bin = match (&cli.worker_bin, local) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(spawn::default_worker_binary()?),
        (None, false) => None,
    };
    let metrics_addr = match (&cli.metrics_addr, local) {
        (Some(addr), _) => addr.clone(),
        (None, true) => "127.0.0.1:0".to_owned(),
        (None, false) => settings.metrics.addr.clone(),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let launch = Launch {
        world,
        min_workers,
        local,
        token,
        listen,
        worker_bin,
        resume,
        metrics_addr,
        log_format: cli.log_format,
    };
    runtime.block_on(supervise(settings, launch))
}

/// The configuration: the usual layers, with `--resume RUN_DIR` reusing that run's
/// `config.toml` as the file layer unless `--config` names another; and whether the job
/// continues from a checkpoint.
fn load_settings(cli: &Cli) -> Result<(Settings, bool)> {
    let mut args = cli.config.clone();
    if let Some(run_dir) = &cli.resume {
        if args.config.is_none() {
            let saved = run_dir.join("config.toml");
            if !saved.exists() {
                bail!(
                    "--resume {}: no config.toml there (is it a run directory?)",
                    run_dir.display()
                );
            }
            args.config = Some(saved);
        }
        args.run_dir = Some(run_dir.clone());
    }
    let mut settings = args.load()?;
    // Before anything is started: a new run never silently replaces an old one, and a resume
    // never silently starts at step 0.
    let dir = &settings.run.dir;
    let resume = if cli.resume.is_some() {
        gantry_store::run_dir::ensure_resumable(dir)?;
        true
    } else if cli.resume_if_present {
        !gantry_store::run_dir::checkpoint_steps(dir)?.is_empty()
    } else {
        if !cli.overwrite {
            gantry_store::run_dir::ensure_fresh(dir)?;
        }
        false
    };
    fs::create_dir_all(&settings.run.dir)
        .with_context(|| format!("creating run directory {}", settings.run.dir.display()))?;
    settings.run.dir = settings.run.dir.canonicalize()?;
    Ok((settings, resume))
}

/// How this coordinator runs its job, as resolved from the command line.
#[derive(Debug)]
struct Launch {
    world: u32,
    /// `cluster.min_workers`, resolved (see [`elastic::resolve`]).
    min_workers: u32,
    local: bool,
    token: String,
    listen: SocketAddr,
    worker_bin: Option<PathBuf>,
    resume: bool,
    metrics_addr: String,
    log_format: LogFormat,
}

async fn supervise(settings: Settings, launch: Launch) -> Result<i32> {
    let Launch {
        world,
        min_workers,
        local,
        token,
        listen,
        worker_bin,
        resume,
        metrics_addr,
        log_format,
    } = launch;
    let cluster = &settings.cluster;
    let spec = JobSpec {
        run_id: format!("{}-{}", settings.train.seed, &auth::generate_token()[..8]),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        settings_toml: settings.to_toml()?,
        fingerprint: settings.fingerprint(),
        unresolved_fingerprint: elastic::unresolved_fingerprint(&settings, world),
        world_size: world,
        min_workers,
        rejoin_grace: Duration::from_secs_f64(cluster.rejoin_grace),
        first_step: if resume {
            gantry_store::run_dir::checkpoint_steps(&settings.run.dir)?
                .last()
                .copied()
                .unwrap_or(0)
        } else {
            0
        },
        total_steps: settings.train.steps,
        backend: cluster.backend,
        workers_on_host: if local { world } else { 1 },
        heartbeat_interval: Duration::from_secs_f64(cluster.heartbeat_interval),
        heartbeat_timeout: Duration::from_secs_f64(cluster.heartbeat_timeout),
        rendezvous_timeout: Duration::from_secs_f64(cluster.rendezvous_timeout),
        stall_timeout: Duration::from_secs_f64(
            settings.collective.timeout * 2.0 + cluster.heartbeat_timeout,
        ),
        max_restarts: cluster.max_restarts,
    };
    let job = Arc::new(Job::new(spec, resume));
    let operator_token = operator_token(&settings)?;
    auth::distinct(&token, &operator_token)?;
    for (key, configured) in [
        ("cluster.token", &settings.cluster.token),
        ("cluster.operator_token", &settings.cluster.operator_token),
    ] {
        if let Some(warning) = auth::weakness(key, configured).filter(|_| !configured.is_empty()) {
            tracing::warn!("coordinator: warning: {warning}");
        }
    }
    let check = TokenCheck::new(&token, &operator_token);
    let auth_failures = check.failures.clone();

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the gRPC address {listen}"))?;
    let bound = listener.local_addr()?;
    // Oversized messages are refused before they are decoded.
    let server = CoordinatorServer::new(service::Service { job: job.clone() })
        .max_decoding_message_size(1 << 20);
    let service =
        tonic::service::interceptor::InterceptedService::new(server, move |r| check.check(r));
    let mut server =
        tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(5)));
    if let Some(tls) =
        gantry_proto::tls::server_config(&cluster.tls_cert, &cluster.tls_key, &cluster.tls_ca)?
    {
        server = server.tls_config(tls).context("TLS configuration")?;
    }
    tokio::spawn(
        server
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    tracing::info!(
        "coordinator: run {} — {} worker(s), {} steps, gRPC on {bound}, run dir {}",
        job.spec.run_id,
        world,
        settings.train.steps,
        settings.run.dir.display()
    );

    let ready = gantry_metrics::Readiness::default();
    let history = Arc::new(history::History::default());
    let routes = http::CoordinatorRoutes {
        job: job.clone(),
        metrics: gantry_metrics::ClusterMetrics::new(&job.spec.run_id)?,
        auth_failures: auth_failures.clone(),
        run_dir: settings.run.dir.clone(),
        history: history.clone(),
    };
    let http = gantry_metrics::serve(&metrics_addr, ready.clone(), Arc::new(routes))
        .await
        .with_context(|| "the HTTP endpoint (--metrics-addr / metrics.addr)")?;
    ready.set(true);
    tracing::info!("coordinator: status page on http://{http}/ (metrics at /metrics)");

    let mut workers = worker_bin.map(|binary| LocalWorkers {
        binary,
        coordinator_url: format!("http://{bound}"),
        token: token.clone(),
        count: world as usize,
        log_dir: settings.run.dir.join("logs"),
        gpus: spawn::visible_gpus(),
        force_cpu: settings.run.device == gantry_config::DeviceChoice::Cpu,
        log_format,
        children: Vec::new(),
    });
    if let Some(w) = workers.as_mut() {
        w.spawn_generation(0)?;
        tracing::info!(
            "coordinator: started {world} local workers; logs in {}",
            w.log_dir().display()
        );
    }

    supervise::Supervisor::new(job, workers, history, settings.run.dir.clone())
        .run()
        .await
}

/// The name of the file, in the run directory, that holds a generated operator token.
const OPERATOR_TOKEN_FILE: &str = "operator-token";

/// `cluster.operator_token`, or a fresh one written to `RUN_DIR/operator-token` with mode
/// 0600 (created so, never widened) for the operator's commands to read.
fn operator_token(settings: &Settings) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !settings.cluster.operator_token.is_empty() {
        return Ok(settings.cluster.operator_token.clone());
    }
    let token = auth::generate_token();
    let path = settings.run.dir.join(OPERATOR_TOKEN_FILE);
    gantry_store::atomic::write_with(&path, |tmp| -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(token.as_bytes())?;
        Ok(())
    })?;
    tracing::info!(
        "coordinator: operator token in {} (for `coordinator status|pause|resume|checkpoint|stop --token-file`)",
        path.display()
    );
    Ok(token)
}
