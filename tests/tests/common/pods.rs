//! Rendered pods run as local processes: what a kubelet would do with a container spec, on
//! this machine. The container's `command`/`args`/`env` are taken as rendered; only what a
//! kubelet or the cluster resolves is substituted: the downward API (the pod IP becomes
//! 127.0.0.1, labels and annotations come from the caller, who knows what the controller puts
//! on the pod), the Secret's value, `$(VAR)` references (Kubernetes' expansion rules), and
//! names that only exist in a cluster (Service and pod DNS names, mount paths), each replaced
//! by its local stand-in. `tini --` is dropped (PID 1 duty is the kubelet's concern) and the
//! binary name maps to this profile's binaries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::binary;

/// Shorter training through the env layer an overlay would use; everything else as rendered.
pub const SIZING: [(&str, &str); 4] = [
    ("GANTRY__TRAIN__STEPS", "20"),
    ("GANTRY__CHECKPOINT__EVERY", "10"),
    ("GANTRY__SAMPLES__EVERY", "10"),
    ("GANTRY__TRAIN__BATCH_SIZE", "16"),
];

/// Not a timing assertion: a guard so a hung rendezvous fails the test instead of hanging CI.
pub const HANG_GUARD: Duration = Duration::from_secs(5 * 60);

/// The rendered gantry.toml with the cluster's paths and listen addresses made local: the RWX
/// volume and the cache emptyDir become directories of `root`, the coordinator listens on
/// `grpc_port` (the one port the workers must be told up front), every HTTP endpoint on any
/// free port (the processes share one network namespace).
pub fn local_config(rendered: &str, root: &Path, grpc_port: u16) -> String {
    rendered
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
        .replace("\"0.0.0.0:9091\"", "\"127.0.0.1:0\"")
}

/// The strings of a JSON array (`command`, `args`).
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// Kubernetes' `$(VAR)` expansion: references to defined variables are replaced, `$$` is a
/// literal `$`, anything else (an undefined reference included) is left as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
        {
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// What a kubelet (and the cluster around it) would resolve for a container of one pod.
pub struct Kubelet {
    /// The join token: the value of the Secret `gantry-join-token`.
    pub token: String,
    /// The downward API's `metadata.labels[...]` / `metadata.annotations[...]` of the pod, by
    /// fieldPath (what the controller that created the pod puts there).
    pub fields: BTreeMap<String, String>,
    /// Cluster-only names and their local stand-ins, applied to every resolved env value and
    /// argument: `host:port` of Services and pods, mount paths.
    pub replace: Vec<(String, String)>,
}

impl Kubelet {
    /// This profile's binary for the container and its resolved arguments.
    pub fn command(&self, c: &Value, env: &BTreeMap<String, String>) -> (PathBuf, Vec<String>) {
        let mut command = strings(&c["command"]);
        if let Some(at) = command.iter().position(|a| a == "--") {
            command.drain(..=at);
        }
        assert_eq!(command.len(), 1, "command is the binary alone: {command:?}");
        (binary(&command[0]), self.args(c, env))
    }

    /// The container's arguments, `$(VAR)` expanded with its resolved `env`.
    pub fn args(&self, c: &Value, env: &BTreeMap<String, String>) -> Vec<String> {
        strings(&c["args"])
            .iter()
            .map(|a| self.localise(&expand(a, env)))
            .collect()
    }

    /// The container's environment, in the kubelet's order: each value may refer to the
    /// variables defined before it.
    pub fn env(&self, c: &Value) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for var in c["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_string();
            let from = &var["valueFrom"];
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else if from["fieldRef"]["fieldPath"] == "status.podIP" {
                "127.0.0.1".to_string()
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                self.fields
                    .get(path)
                    .unwrap_or_else(|| panic!("env {name}: nothing on the pod at {path}"))
                    .clone()
            } else if from["secretKeyRef"]["name"] == "gantry-join-token" {
                self.token.clone()
            } else if from["resourceFieldRef"].is_object() {
                "1".to_string()
            } else {
                panic!("env {name}: no local resolution for {var}");
            };
            env.insert(name, value);
        }
        env.into_iter()
            .map(|(name, value)| {
                let value = self.localise(&value);
                (name, value)
            })
            .collect()
    }

    fn localise(&self, value: &str) -> String {
        self.replace
            .iter()
            .fold(value.to_string(), |v, (from, to)| v.replace(from, to))
    }
}

/// Starts a process with the manifests' env only, on top of the test's own (PATH,
/// LD_LIBRARY_PATH...), minus any GANTRY* setting of the developer's shell; output to `log`.
pub fn spawn(binary: &Path, args: &[String], env: &BTreeMap<String, String>, log: &Path) -> Child {
    let mut command = Command::new(binary);
    command.args(args);
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

/// The exit status, or None when `deadline` passes first.
pub fn wait(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
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

/// Waits for every worker (by `deadline`) and returns one message, with its log, per worker
/// that did not exit 0.
pub fn failed_workers(workers: &mut [(Child, PathBuf)], deadline: Instant) -> Vec<String> {
    let mut failures = Vec::new();
    for (child, log) in workers.iter_mut() {
        match wait(child, deadline) {
            Some(status) if status.success() => {}
            outcome => failures.push(format!(
                "{}: {outcome:?}\n{}",
                log.display(),
                std::fs::read_to_string(&*log).unwrap_or_default()
            )),
        }
    }
    failures
}

/// Kills whatever is still running (after a failure, or a coordinator left serving).
pub fn reap(children: impl IntoIterator<Item = Child>) {
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}
