//! `worker`: trains a GAN on one device, alone or as one rank of a data-parallel group.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_collective::RingCollective;
use gantry_config::{ConfigArgs, Settings};
use gantry_metrics::logs::{self, LogFormat};
use gantry_metrics::{Identity, WorkerMetrics};
use gantry_models::runtime;
use gantry_worker::checkpoint::ResumeArgs;
use gantry_worker::cluster::{self, ClusterOptions};
use gantry_worker::endpoint::Endpoint;
use gantry_worker::group::Group;
use gantry_worker::train::{NoObserver, Trainer};

/// A Gantry worker.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
struct Cli {
    /// Train on this process alone (world size 1), without a coordinator.
    #[arg(long)]
    standalone: bool,
    /// Static group membership (as torchrun's environment): this process's rank.
    #[arg(long, env = "GANTRY_RANK", requires_all = ["world_size", "peers"])]
    rank: Option<usize>,
    /// Static group membership: number of ranks.
    #[arg(long, env = "GANTRY_WORLD_SIZE")]
    world_size: Option<usize>,
    /// Static group membership: every rank's ring address, in rank order (HOST:PORT,...).
    #[arg(long, env = "GANTRY_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Join the coordinator at this URL (http://HOST:PORT) and train the rank it assigns.
    #[arg(long, env = "GANTRY_COORDINATOR", value_name = "URL", conflicts_with_all = ["standalone", "rank"])]
    coordinator: Option<String>,
    /// This worker's name in the cluster (default: HOST-PID).
    #[arg(long)]
    worker_id: Option<String>,
    /// The address other workers use to reach this one's ring port.
    #[arg(long, env = "GANTRY_ADVERTISE_HOST", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Workers sharing this machine's cores (splits libtorch's threads when train.threads = 0).
    #[arg(long, default_value_t = 1)]
    workers_on_host: usize,
    /// Set by a local coordinator for the workers it starts: SIGINT (a terminal's Ctrl-C,
    /// which reaches the whole process group) is left to the coordinator.
    #[arg(long, hide = true, requires = "coordinator")]
    supervised: bool,
    /// Print the devices libtorch sees and exit.
    #[arg(long)]
    list_devices: bool,
    /// How logs are written to stderr (level by RUST_LOG, default info).
    #[arg(long, env = "GANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    resume: ResumeArgs,
}

/// Every allocation of the process, libtorch's included, is mimalloc's (its `override`
/// feature replaces `malloc` and `free` for the shared libraries too). A training step frees
/// and allocates the same tensors again every step, and glibc's malloc spent about 6% of a bf16
/// MLP GAN step (`_int_malloc`, `_int_free`, `malloc_consolidate`); with mimalloc, world 1,
/// 5 alternating pairs on a Zen 4 EPYC, bf16 10,525 → 11,155 images/s and fp32 7,867 →
/// 8,089 (PyTorch's fused-Adam twin with mimalloc preloaded: 10,117 → 10,156).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory for the next step's tensors instead of handing it back to the kernel
/// after a delay (each page would fault again): mimalloc's `purge_delay` at -1. The same
/// trade as `runtime::tune_host_allocator` makes for glibc: a worker's memory stays at its
/// high-water mark, which is where every step takes it anyway.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in `mi_option_e` of the mimalloc 3 this release of
    /// `libmimalloc-sys` builds (pinned in Cargo.toml).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of mimalloc's process-wide options; any value is valid.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

fn main() -> Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    logs::init(cli.log_format)?;
    if cli.list_devices {
        println!("{}", runtime::describe_devices());
        return Ok(());
    }
    let settings = cli.config.load()?;
    if let Some(coordinator) = &cli.coordinator {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "worker".into());
        let options = ClusterOptions {
            coordinator: coordinator.clone(),
            worker_id: cli
                .worker_id
                .clone()
                .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
            advertise_host: cli.advertise_host.clone(),
            device: cli.config.device,
            check_config: cli.config.config.is_some(),
            supervised: cli.supervised,
        };
        std::process::exit(cluster::run(&options, &settings));
    }
    if let Some(rank) = cli.rank {
        let world = cli
            .world_size
            .context("--world-size is required with --rank")?;
        let peers = resolve_peers(&cli.peers)?;
        if world == 0 || rank >= world || peers.len() != world {
            bail!(
                "static group: rank {rank} of world size {world} with {} peer address(es); \
                 need rank < world size and one address per rank",
                peers.len()
            );
        }
        cli.resume.ensure_fresh(&settings.run.dir)?;
        let mut ring = gantry_worker::group::ring_config(&settings, rank, world, peers);
        ring.session_id = u64::from_str_radix(&settings.fingerprint()[..16], 16).unwrap_or(0);
        // Without a coordinator to hand out a ring secret, the join token (when set) is it.
        ring.secret = settings.cluster.token.as_bytes().to_vec();
        let collective = RingCollective::connect(ring).context("joining the ring")?;
        let group = Group::new(Box::new(collective), settings.collective.bucket_mb);
        let mut trainer = Trainer::new(&settings, group, cli.workers_on_host, 0)?;
        let _endpoint = serve_metrics(&settings, &mut trainer)?;
        trainer.run(&mut NoObserver)?;
        return Ok(());
    }
    if !cli.standalone {
        bail!(
            "no mode given: pass --standalone, or --rank/--world-size/--peers for a static group"
        );
    }
    cli.resume.ensure_fresh(&settings.run.dir)?;
    let checkpoint = cli.resume.checkpoint()?;
    let settings = match &checkpoint {
        Some(_) => ResumeArgs::settings(&cli.config, checkpoint.as_ref())?,
        None => settings,
    };
    let mut trainer = Trainer::with_resume(&settings, Group::solo(), 1, 0, checkpoint.as_ref())?;
    let _endpoint = serve_metrics(&settings, &mut trainer)?;
    trainer.run(&mut NoObserver)?;
    Ok(())
}

/// Serves /metrics, /healthz and /readyz at `metrics.worker_addr` for a run without a
/// coordinator (the run directory's name is its `run_id`). A taken port costs only the
/// endpoint. The returned runtime serves until it is dropped.
fn serve_metrics(settings: &Settings, trainer: &mut Trainer) -> Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let run_id = settings
        .run
        .dir
        .file_name()
        .map_or_else(|| "run".to_owned(), |n| n.to_string_lossy().into_owned());
    let metrics = WorkerMetrics::new(&Identity {
        run_id,
        rank: trainer.group.rank as u32,
        generation: 0,
    })?;
    trainer.set_metrics(metrics.clone());
    let endpoint = Endpoint::start(&runtime, &settings.metrics.worker_addr, "worker");
    endpoint.install(metrics);
    endpoint.ready.set(true);
    Ok(runtime)
}

fn resolve_peers(peers: &[String]) -> Result<Vec<SocketAddr>> {
    peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .with_context(|| format!("peer address {p:?}"))?
                .next()
                .with_context(|| format!("peer address {p:?} resolves to nothing"))
        })
        .collect()
}
