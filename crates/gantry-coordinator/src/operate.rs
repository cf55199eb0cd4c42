//! The operator's commands: `coordinator status | pause | resume | checkpoint | stop`.
//!
//! Each dials a running coordinator's gRPC address with the operator token (never the join
//! token: see [`crate::auth`]) and prints a readable table, or JSON with `--json`. The token
//! comes from `--token-file` (the coordinator writes `RUN_DIR/operator-token` when none is
//! configured) or `GANTRY__CLUSTER__OPERATOR_TOKEN`; TLS takes the same PEM files as a worker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gantry_proto::v1::coordinator_client::CoordinatorClient;
use gantry_proto::v1::{
    ControlCommand, ControlRequest, StatusRequest, StatusResponse, WorkerState,
};
use serde_json::json;
use tonic::transport::Endpoint;

/// An operator's command to a running job.
#[derive(Debug, Subcommand)]
pub enum Operate {
    /// Show the job: phase, step, every rank's progress and the newest statistics.
    Status(Target),
    /// Hold every rank before its next step (heartbeats and the status page keep going).
    Pause(Target),
    /// Continue after `pause`.
    Resume(Target),
    /// Write a checkpoint at a step every rank has yet to reach, and keep training.
    Checkpoint(Target),
    /// Checkpoint at a common step, then end the job (exit 75, continue with --resume).
    Stop(Target),
}

/// Where the job is and how to prove the caller is its operator.
#[derive(Debug, Args)]
pub struct Target {
    /// The coordinator's gRPC address (http://HOST:PORT, https:// with TLS).
    #[arg(long, env = "GANTRY_COORDINATOR", value_name = "URL")]
    addr: String,
    /// A file holding the operator token (e.g. RUN_DIR/operator-token).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The operator token itself (prefer --token-file: arguments are visible to other users).
    #[arg(long, env = "GANTRY__CLUSTER__OPERATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// CA bundle (PEM) to verify the coordinator's certificate against.
    #[arg(long, env = "GANTRY__CLUSTER__TLS_CA", value_name = "PEM")]
    tls_ca: Option<String>,
    /// Client certificate chain (PEM), when the coordinator requires mutual TLS.
    #[arg(long, env = "GANTRY__CLUSTER__TLS_CERT", value_name = "PEM")]
    tls_cert: Option<String>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "GANTRY__CLUSTER__TLS_KEY", value_name = "PEM")]
    tls_key: Option<String>,
    /// The name expected in the coordinator's certificate (default: the URL's host).
    #[arg(long, env = "GANTRY__CLUSTER__TLS_DOMAIN")]
    tls_domain: Option<String>,
}

impl Operate {
    fn target(&self) -> &Target {
        match self {
            Self::Status(t) | Self::Pause(t) | Self::Resume(t) | Self::Checkpoint(t) => t,
            Self::Stop(t) => t,
        }
    }
}

/// Runs the command; the exit code is 0 when the coordinator accepted it.
pub fn run(command: &Operate) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(execute(command))
}

async fn execute(command: &Operate) -> Result<i32> {
    let target = command.target();
    let mut client = connect(target).await?;
    let (control, verb) = match command {
        Operate::Status(_) => {
            let status = client
                .status(StatusRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if target.json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print!("{}", status_table(&status));
            }
            return Ok(0);
        }
        Operate::Pause(_) => (ControlCommand::Pause, "pause"),
        Operate::Resume(_) => (ControlCommand::Resume, "resume"),
        Operate::Checkpoint(_) => (ControlCommand::Checkpoint, "checkpoint"),
        Operate::Stop(_) => (ControlCommand::Stop, "stop"),
    };
    let reply = client
        .control(ControlRequest {
            command: control as i32,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let what = match control {
        ControlCommand::Pause if reply.at_step == 0 => {
            "paused (no group is training: the next one holds after its first step)".into()
        }
        ControlCommand::Pause => format!("paused: every rank holds after step {}", reply.at_step),
        ControlCommand::Resume => "resumed".to_owned(),
        ControlCommand::Checkpoint => format!("checkpoint at step {}", reply.at_step),
        // Step 0 is never a stop step: no group was training, and the job ended at once.
        _ if reply.at_step == 0 => "stopped (no group was training: nothing to checkpoint)".into(),
        _ => format!("stop after a checkpoint at step {}", reply.at_step),
    };
    if target.json {
        println!("{}", json!({"command": verb, "at_step": reply.at_step}));
    } else {
        println!("{what}");
    }
    Ok(0)
}

fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "the coordinator refused: {} ({:?})",
        status.message(),
        status.code()
    )
}

fn operator_token(target: &Target) -> Result<String> {
    let token = match (&target.token_file, &target.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the operator token from {}", path.display()))?
            .trim()
            .to_owned(),
        (None, Some(token)) => token.trim().to_owned(),
        (None, None) => bail!(
            "no operator token: pass --token-file RUN_DIR/operator-token or set \
             GANTRY__CLUSTER__OPERATOR_TOKEN"
        ),
    };
    if token.is_empty() {
        bail!("the operator token is empty");
    }
    Ok(token)
}

async fn connect(target: &Target) -> Result<gantry_proto::AuthorizedClient> {
    let token = gantry_proto::BearerToken::new(&operator_token(target)?)?;
    let mut endpoint = Endpoint::from_shared(target.addr.clone()).with_context(|| {
        format!(
            "--addr {:?} is not a URL like http://127.0.0.1:7070",
            target.addr
        )
    })?;
    let pem = |o: &Option<String>| o.clone().unwrap_or_default();
    if let Some(tls) = gantry_proto::tls::client_config(
        &pem(&target.tls_cert),
        &pem(&target.tls_key),
        &pem(&target.tls_ca),
        &pem(&target.tls_domain),
    )? {
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", target.addr))?;
    Ok(CoordinatorClient::with_interceptor(channel, token))
}

fn state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state).unwrap_or(WorkerState::Unspecified) {
        WorkerState::Unspecified => "unknown",
        WorkerState::Starting => "starting",
        WorkerState::Training => "training",
        WorkerState::Paused => "paused",
        WorkerState::Checkpointing => "checkpointing",
        WorkerState::Done => "done",
    }
}

fn status_json(status: &StatusResponse) -> serde_json::Value {
    let mut workers: Vec<_> = status.workers.iter().collect();
    workers.sort_by_key(|w| w.rank);
    json!({
        "run_id": status.run_id,
        "generation": status.generation,
        "phase": status.phase,
        "paused": status.paused,
        "step": status.step,
        "total_steps": status.total_steps,
        "world_size": status.world_size,
        "workers_alive": status.workers_alive,
        "restarts": status.restarts,
        "images_per_second": status.images_per_second,
        "statistics": status.statistics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "workers": workers.iter().map(|w| json!({
            "rank": w.rank,
            "worker_id": w.worker_id,
            "host": w.host,
            "device": w.device,
            "state": state_name(w.state),
            "step": w.step,
            "step_seconds": w.step_seconds,
            "images_per_second": w.images_per_second,
            "seconds_since_heartbeat": w.seconds_since_heartbeat,
        })).collect::<Vec<_>>(),
    })
}

fn status_table(status: &StatusResponse) -> String {
    let mut out = format!(
        "run {}  generation {}  {}{}  step {}/{}  {} of {} workers alive  {} restart(s)  {:.0} img/s\n",
        status.run_id,
        status.generation,
        status.phase,
        if status.paused { " (paused)" } else { "" },
        status.step,
        status.total_steps,
        status.workers_alive,
        status.world_size,
        status.restarts,
        status.images_per_second,
    );
    let statistics: std::collections::BTreeMap<_, _> = status.statistics.iter().collect();
    if !statistics.is_empty() {
        let shown: Vec<String> = statistics
            .iter()
            .map(|(name, value)| format!("{name} {value:.4}"))
            .collect();
        out.push_str(&format!("statistics: {}\n", shown.join("  ")));
    }
    let mut rows = vec![[
        "RANK".to_owned(),
        "WORKER".to_owned(),
        "HOST".to_owned(),
        "DEVICE".to_owned(),
        "STATE".to_owned(),
        "STEP".to_owned(),
        "S/STEP".to_owned(),
        "IMG/S".to_owned(),
        "HEARTBEAT".to_owned(),
    ]];
    let mut workers: Vec<_> = status.workers.iter().collect();
    workers.sort_by_key(|w| w.rank);
    for w in workers {
        rows.push([
            w.rank.to_string(),
            w.worker_id.clone(),
            w.host.clone(),
            w.device.clone(),
            state_name(w.state).to_owned(),
            w.step.to_string(),
            format!("{:.3}", w.step_seconds),
            format!("{:.0}", w.images_per_second),
            format!("{:.1}s ago", w.seconds_since_heartbeat),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::v1::WorkerStatus;

    #[test]
    fn the_table_lists_every_rank_in_order() {
        let status = StatusResponse {
            run_id: "42-abc".into(),
            phase: "training".into(),
            paused: true,
            step: 120,
            total_steps: 1000,
            world_size: 2,
            workers_alive: 2,
            workers: vec![
                WorkerStatus {
                    rank: 1,
                    worker_id: "local-g0-w1".into(),
                    state: WorkerState::Paused as i32,
                    step: 120,
                    ..Default::default()
                },
                WorkerStatus {
                    rank: 0,
                    worker_id: "local-g0-w0".into(),
                    state: WorkerState::Paused as i32,
                    step: 121,
                    ..Default::default()
                },
            ],
            statistics: [("d_loss".to_owned(), 1.25)].into(),
            ..Default::default()
        };
        let table = status_table(&status);
        assert!(
            table.contains("training (paused)  step 120/1000"),
            "{table}"
        );
        assert!(table.contains("d_loss 1.2500"), "{table}");
        let ranks: Vec<&str> = table
            .lines()
            .skip(3)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(ranks, ["0", "1"], "{table}");
        let json = status_json(&status);
        assert_eq!(json["workers"][0]["worker_id"], "local-g0-w0");
        assert_eq!(json["workers"][1]["state"], "paused");
        assert_eq!(json["paused"], true);
    }
}
