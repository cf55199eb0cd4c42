//! The cpu overlay's coordinator and workers, run as local processes exactly as the manifests
//! configure them: the container `command`/`args`/`env` and the mounted gantry.toml come from
//! the rendered overlay; only what a kubelet would resolve is substituted (the ConfigMap mount
//! and the volumes become temp files/dirs, Service DNS names and the pod IP become 127.0.0.1,
//! the Secret's value is read from the rendered Secret, each "pod" gets its own ports because
//! the processes share one network namespace). The training is shortened through the same env
//! layer an overlay would use (GANTRY__TRAIN__STEPS etc.).
//!
//! Runs the `coordinator` and `worker` binaries of this test's profile (built when missing;
//! `GANTRY_TEST_BIN_DIR` points elsewhere).

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{binary, container, object, render_overlay};
use serde_json::Value;

const STEPS: &str = "20";
/// Not a timing assertion: a guard so a hung rendezvous fails the test instead of hanging CI.
const HANG_GUARD: Duration = Duration::from_secs(5 * 60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// What a kubelet would do with the container spec, on this machine.
struct Resolver {
    config_path: PathBuf,
    grpc_port: u16,
    token: String,
}

impl Resolver {
    /// The binary and its arguments: `tini --` dropped (PID 1 duty is the kubelet's concern),
    /// the binary name mapped to this profile's binaries, the ConfigMap mount to the temp file.
    fn command(&self, c: &Value) -> (PathBuf, Vec<String>) {
        let mut command = strings(&c["command"]);
        if let Some(at) = command.iter().position(|a| a == "--") {
            command.drain(..=at);
        }
        assert_eq!(command.len(), 1, "command is the binary alone: {command:?}");
        let args = strings(&c["args"])
            .into_iter()
            .map(|a| {
                a.replace(
                    "/etc/gantry/gantry.toml",
                    self.config_path.to_str().expect("utf-8"),
                )
            })
            .collect();
        (binary(&command[0]), args)
    }

    fn env(&self, c: &Value) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for var in c["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_string();
            let value = if let Some(value) = var["value"].as_str() {
                value.replace(
                    "gantry-coordinator:7070",
                    &format!("127.0.0.1:{}", self.grpc_port),
                )
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
                "127.0.0.1".to_string()
            } else if var["valueFrom"]["secretKeyRef"]["name"] == "gantry-join-token" {
                self.token.clone()
            } else if var["valueFrom"]["resourceFieldRef"].is_object() {
                "1".to_string()
            } else {
                panic!("env {name}: no local resolution for {var}");
            };
            env.insert(name, value);
        }
        env
    }
}

fn spawn(binary: &Path, args: &[String], env: &BTreeMap<String, String>, log: &Path) -> Child {
    let mut command = Command::new(binary);
    command.args(args);
    // The manifests' env only, on top of the test's own (PATH, LD_LIBRARY_PATH...), minus any
    // GANTRY_* setting of the developer's shell.
    for (key, _) in std::env::vars() {
        if key.starts_with("GANTRY") {
            command.env_remove(key);
        }
    }
    command.envs(env);
    let file = std::fs::File::create(log).expect("log file");
    command
        .stdout(file.try_clone().expect("clone log"))
        .stderr(file);
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

fn wait(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

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
    // The volumes: the RWX PVC and the emptyDirs become directories of the temp dir.
    let toml = config["data"]["gantry.toml"]
        .as_str()
        .expect("toml")
        .replace(
            "/var/lib/gantry/runs",
            root.join("runs").to_str().expect("utf-8"),
        )
        .replace(
            "/var/cache/gantry",
            root.join("cache").to_str().expect("utf-8"),
        )
        .replace("\"0.0.0.0:7070\"", &format!("\"127.0.0.1:{grpc_port}\""))
        .replace("\"0.0.0.0:9090\"", "\"127.0.0.1:0\"")
        .replace("\"0.0.0.0:9091\"", "\"127.0.0.1:0\"");
    let config_path = root.join("gantry.toml");
    std::fs::write(&config_path, &toml).expect("write gantry.toml");
    let token = secret["stringData"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let resolver = Resolver {
        config_path,
        grpc_port,
        token,
    };

    // Shorter training through the env layer; everything else as the manifests set it.
    let sizing = [
        ("GANTRY__TRAIN__STEPS", STEPS),
        ("GANTRY__CHECKPOINT__EVERY", "10"),
        ("GANTRY__SAMPLES__EVERY", "10"),
        ("GANTRY__TRAIN__BATCH_SIZE", "16"),
    ];

    let coordinator_container = container(coordinator, "coordinator");
    let (binary, args) = resolver.command(coordinator_container);
    let mut env = resolver.env(coordinator_container);
    env.extend(sizing.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut coordinator_child = spawn(&binary, &args, &env, &root.join("coordinator.log"));

    let worker_container = container(job, "worker");
    let mut worker_children = Vec::new();
    for index in 0..workers {
        let (binary, args) = resolver.command(worker_container);
        let mut env = resolver.env(worker_container);
        env.extend(sizing.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // Each pod has its own network namespace; here they share one.
        env.insert("GANTRY__CLUSTER__RING_PORT".into(), "0".into());
        env.insert("GANTRY__METRICS__WORKER_ADDR".into(), "127.0.0.1:0".into());
        env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
        let log = root.join(format!("worker-{index}.log"));
        worker_children.push((spawn(&binary, &args, &env, &log), log));
    }

    // The Job completes when every worker exits 0.
    let deadline = Instant::now() + HANG_GUARD;
    let mut failures = Vec::new();
    for (child, log) in &mut worker_children {
        match wait(child, deadline) {
            Some(status) if status.success() => {}
            outcome => failures.push(format!(
                "{}: {outcome:?}\n{}",
                log.display(),
                std::fs::read_to_string(&*log).unwrap_or_default()
            )),
        }
    }
    let _ = coordinator_child.kill();
    let _ = coordinator_child.wait();
    for (child, _) in &mut worker_children {
        let _ = child.kill();
        let _ = child.wait();
    }
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
