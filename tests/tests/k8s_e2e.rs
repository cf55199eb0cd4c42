//! The cpu overlay's coordinator and workers, run as local processes exactly as the manifests
//! configure them: the container `command`/`args`/`env` and the mounted gantry.toml come from
//! the rendered overlay; only what a kubelet would resolve is substituted (the ConfigMap mount
//! and the volumes become temp files/dirs, Service DNS names and the pod IP become 127.0.0.1,
//! the Secret's value is read from the rendered Secret, each "pod" gets its own ports because
//! the processes share one network namespace; see common::pods). The training is shortened
//! through the same env layer an overlay would use (GANTRY__TRAIN__STEPS etc.).
//!
//! Runs the `coordinator` and `worker` binaries of this test's profile (built when missing;
//! `GANTRY_TEST_BIN_DIR` points elsewhere). tests/tests/kubeflow.rs runs the Kubeflow Trainer
//! variant the same way.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::pods::{HANG_GUARD, Kubelet, SIZING, failed_workers, local_config, reap, spawn};
use common::{container, free_port, object, render_overlay};
use serde_json::Value;

#[test]
fn cpu_overlay_trains_to_completion_as_local_processes() {
    let objects = render_overlay("cpu");
    let coordinator = object(&objects, "Deployment", "gantry-coordinator");
    let job = object(&objects, "Job", "gantry-worker");
    let secret = object(&objects, "Secret", "gantry-join-token");
    let config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["gantry.toml"].is_string())
        .expect("the gantry.toml ConfigMap");
    let workers: usize = job["spec"]["completions"].as_u64().expect("completions") as usize;

    let temp = tempfile::tempdir().expect("temp dir");
    let root = temp.path();
    // The workers must be told the coordinator's gRPC port (the Service's DNS name resolves to
    // it), so that one is chosen up front; every other port is left to the kernel.
    let grpc_port = free_port();
    let toml = local_config(
        config["data"]["gantry.toml"].as_str().expect("toml"),
        root,
        grpc_port,
    );
    let config_path = root.join("gantry.toml");
    std::fs::write(&config_path, &toml).expect("write gantry.toml");
    let kubelet = Kubelet {
        token: secret["stringData"]["token"]
            .as_str()
            .expect("token")
            .to_string(),
        fields: Default::default(),
        replace: vec![
            (
                "gantry-coordinator:7070".into(),
                format!("127.0.0.1:{grpc_port}"),
            ),
            (
                "/etc/gantry/gantry.toml".into(),
                config_path.to_str().expect("utf-8").into(),
            ),
        ],
    };

    let coordinator_container = container(coordinator, "coordinator");
    let mut env = kubelet.env(coordinator_container);
    let (binary, args) = kubelet.command(coordinator_container, &env);
    env.extend(SIZING.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let coordinator_child = spawn(&binary, &args, &env, &root.join("coordinator.log"));

    let worker_container = container(job, "worker");
    let mut worker_children = Vec::new();
    for index in 0..workers {
        let mut env = kubelet.env(worker_container);
        let (binary, args) = kubelet.command(worker_container, &env);
        env.extend(SIZING.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // Each pod has its own network namespace; here they share one.
        env.insert("GANTRY__CLUSTER__RING_PORT".into(), "0".into());
        env.insert("GANTRY__METRICS__WORKER_ADDR".into(), "127.0.0.1:0".into());
        env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
        let log = root.join(format!("worker-{index}.log"));
        worker_children.push((spawn(&binary, &args, &env, &log), log));
    }

    // The Job completes when every worker exits 0; the Deployment's coordinator keeps running.
    let failures = failed_workers(&mut worker_children, Instant::now() + HANG_GUARD);
    reap(std::iter::once(coordinator_child).chain(worker_children.into_iter().map(|(c, _)| c)));
    let coordinator_log = std::fs::read_to_string(root.join("coordinator.log")).unwrap_or_default();
    assert!(
        failures.is_empty(),
        "workers failed:\n{}\ncoordinator:\n{coordinator_log}",
        failures.join("\n")
    );

    let run_dir = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("dir = "))
        .map(|v| PathBuf::from(v.split('#').next().unwrap_or(v).trim().trim_matches('"')))
        .expect("run.dir in gantry.toml");
    let summary = run_dir.join("summary.json");
    assert!(
        summary.is_file(),
        "{} missing\ncoordinator:\n{coordinator_log}",
        summary.display()
    );
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary).expect("read summary"))
        .expect("summary JSON");
    assert!(
        summary.is_object(),
        "summary.json is a JSON object: {summary}"
    );
}
