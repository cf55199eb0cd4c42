//! Real coordinator and worker processes for the repository tests: each a process group of
//! its own, killed with its children when the test ends (passes or fails); their stderr in
//! files; polling with deadlines (liveness guards, never timing assertions); and checks of
//! what a run leaves behind (metrics rows, checkpoint manifests, summary.json).

use std::fs;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::binary;

/// Liveness guards (never timing assertions): generous for a busy 2-core machine.
pub const START: Duration = Duration::from_secs(60);
pub const JOB: Duration = Duration::from_secs(120);

pub const EXIT_RETRYABLE: i32 = 75;

/// One cluster at a time: the processes of two tests would compete for the same cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; pids are our children or their process groups.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Live (non-zombie) processes in process group `pgid`, as (pid, command line).
pub fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the ')'.
        let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 || fields[0] == "Z" || fields[2].parse::<i32>() != Ok(pgid) {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        found.push((pid, cmdline));
    }
    found
}

/// A process the test started, in its own process group (the coordinator's local workers
/// join it). Dropping it kills the whole group.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stderr: PathBuf,
    pub status: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn signal(&mut self, signal: i32) {
        assert!(
            self.poll().is_none(),
            "{} already exited ({:?}) before signal {signal}",
            self.name,
            self.status
        );
        kill(self.pid(), signal);
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.pid();
        if self.status.is_none() || !group_members(pgid).is_empty() {
            kill(-pgid, libc::SIGKILL);
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One test's processes and files. Fields drop in order: processes first, then the files.
pub struct Cluster {
    pub procs: Vec<Proc>,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    _temp: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Tiny-job settings shared by the coordinator flags of every test.
pub fn tiny(steps: u64) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--steps".into(),
        steps.to_string(),
        "--batch-size".into(),
        "16".into(),
    ];
    for set in [
        "train.threads=1",
        "train.log_every=5",
        "samples.every=0",
        // Quality evaluation is tested in the worker crate; here it would only add time.
        "eval.samples=0",
        "checkpoint.every=20",
        "collective.verify_every=10",
        // Longer than the heartbeat timeout: a hung peer is caught by its missed heartbeats,
        // not by its partners' collective timeout.
        "collective.timeout=15",
        "cluster.heartbeat_interval=0.2",
        "cluster.heartbeat_timeout=2",
        "cluster.rendezvous_timeout=60",
        "cluster.max_restarts=2",
    ] {
        args.push("--set".into());
        args.push(set.into());
    }
    args
}

impl Cluster {
    pub fn new() -> Self {
        let serial = serial();
        let temp = tempfile::tempdir().expect("temp dir");
        let root = temp.path().to_path_buf();
        Self {
            procs: Vec::new(),
            run_dir: root.join("run"),
            root,
            _temp: temp,
            _serial: serial,
        }
    }

    /// Starts `binary args` with `env` (the caller's GANTRY* variables removed), its stdout
    /// and stderr in `<root>/<name>.{out,err}`, in a new process group.
    pub fn spawn(
        &mut self,
        name: &str,
        binary: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> usize {
        let mut command = Command::new(binary_path(binary));
        command.args(args);
        self.spawn_command(name, command, env)
    }

    /// [`Self::spawn`] of a command the caller built (a binary run through a wrapper that
    /// execs it, so the pid is still the binary's).
    pub fn spawn_command(
        &mut self,
        name: &str,
        mut command: Command,
        env: &[(&str, &str)],
    ) -> usize {
        let stderr = self.root.join(format!("{name}.err"));
        let stdout = self.root.join(format!("{name}.out"));
        for (key, _) in std::env::vars() {
            if key.starts_with("GANTRY") {
                command.env_remove(key);
            }
        }
        // Every HTTP endpoint on a free loopback port, never a default one that another
        // process on the machine may hold (the caller's `env` can still name one).
        command
            .env("GANTRY__METRICS__ADDR", "127.0.0.1:0")
            .env("GANTRY__METRICS__WORKER_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            stderr,
            status: None,
        });
        self.procs.len() - 1
    }

    /// `coordinator --run-dir RUN_DIR <tiny job> <extra>`.
    pub fn coordinator(
        &mut self,
        name: &str,
        steps: u64,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let mut args = vec!["--run-dir".to_owned(), self.run_dir.display().to_string()];
        args.extend(tiny(steps));
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, "coordinator", &args, env)
    }

    /// An external `worker --coordinator URL --worker-id NAME` on the CPU, any ring port.
    pub fn worker(&mut self, name: &str, url: &str, token: &str, extra: &[&str]) -> usize {
        let mut args: Vec<String> = [
            "--coordinator",
            url,
            "--worker-id",
            name,
            "--advertise-host",
            "127.0.0.1",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = [
            ("GANTRY__CLUSTER__TOKEN", token),
            ("GANTRY__CLUSTER__RING_PORT", "0"),
            ("GANTRY__METRICS__WORKER_ADDR", "127.0.0.1:0"),
        ];
        self.spawn(name, "worker", &args, &env)
    }

    /// Every log of the test (process stderr files, the run's worker logs), for failures.
    pub fn diag(&self) -> String {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "err"))
            .collect();
        files.extend(
            fs::read_dir(self.run_dir.join("logs"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
        files.sort();
        let mut text = String::new();
        for file in files {
            let content = fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = content.lines().rev().take(40).collect();
            text += &format!("\n--- {} (last 40 lines) ---\n", file.display());
            for line in tail.into_iter().rev() {
                text += line;
                text.push('\n');
            }
        }
        text
    }

    /// Polls `check` until it yields a value; panics (killing everything) at the deadline.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "gave up after {timeout:?} waiting for {what}\n{}",
                    self.diag()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(&mut self, index: usize, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.procs[index].name);
        self.wait_until(&what, timeout, |c| c.procs[index].poll())
    }

    /// Waits for a process that must still be running to exit, and returns its exit code.
    pub fn exit_code(&mut self, index: usize, timeout: Duration) -> i32 {
        let status = self.wait_exit(index, timeout);
        status.code().unwrap_or_else(|| {
            panic!(
                "{} was killed by signal {:?}\n{}",
                self.procs[index].name,
                status.signal(),
                self.diag()
            )
        })
    }

    pub fn assert_exit(&mut self, index: usize, expected: i32, timeout: Duration) {
        let code = self.exit_code(index, timeout);
        assert_eq!(
            code,
            expected,
            "{} exit code\n{}",
            self.procs[index].name,
            self.diag()
        );
    }

    pub fn stderr(&self, index: usize) -> String {
        self.procs[index].stderr_text()
    }

    /// The coordinator's gRPC URL, from its start-up line "... gRPC on HOST:PORT, ...".
    pub fn grpc_url(&mut self, coordinator: usize) -> String {
        self.wait_until("the coordinator's gRPC address", START, |c| {
            let text = c.stderr(coordinator);
            let at = text.find("gRPC on ")? + "gRPC on ".len();
            let addr = text[at..].split([',', ' ', '\n']).next()?;
            Some(format!("http://{addr}"))
        })
    }

    /// The highest step in metrics.jsonl so far.
    pub fn metrics_step(&self) -> u64 {
        metrics_steps(&self.run_dir).into_iter().max().unwrap_or(0)
    }

    /// Waits until training (any generation) logged step `step` or later.
    pub fn wait_step(&mut self, step: u64) -> u64 {
        self.wait_until(&format!("training to reach step {step}"), JOB, |c| {
            let now = c.metrics_step();
            (now >= step).then_some(now)
        })
    }

    /// The pid of the coordinator's local worker `worker_id` (it shares the coordinator's
    /// process group).
    pub fn local_worker_pid(&mut self, coordinator: usize, worker_id: &str) -> i32 {
        let pgid = self.procs[coordinator].pid();
        let needle = format!("--worker-id {worker_id} ");
        self.wait_until(&format!("local worker {worker_id}"), START, |_| {
            group_members(pgid)
                .into_iter()
                .find(|(_, cmd)| cmd.contains(&needle))
                .map(|(pid, _)| pid)
        })
    }

    pub fn summary(&self) -> Value {
        let path = self.run_dir.join("summary.json");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.diag()));
        serde_json::from_str(&text).expect("summary.json is JSON")
    }

    /// summary.json describes a complete run of `world` ranks, `steps` steps, `restarts`.
    pub fn assert_summary(&self, world: u64, steps: u64, restarts: u64) -> Value {
        let s = self.summary();
        let diag = || format!("summary {s:#}\n{}", self.diag());
        assert_eq!(s["world_size"].as_u64(), Some(world), "{}", diag());
        assert_eq!(s["steps"].as_u64(), Some(steps), "{}", diag());
        assert_eq!(s["restarts"].as_u64(), Some(restarts), "{}", diag());
        assert_eq!(s["generation"].as_u64(), Some(restarts), "{}", diag());
        assert_eq!(s["batch_size"].as_u64(), Some(16), "{}", diag());
        assert!(
            s["run_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{}",
            diag()
        );
        let ips = s["images_per_second"].as_f64().unwrap_or(0.0);
        assert!(ips.is_finite() && ips > 0.0, "{}", diag());
        for key in ["d_loss", "g_loss", "d_real", "d_fake"] {
            assert!(
                s["final"][key].as_f64().is_some_and(f64::is_finite),
                "final.{key}: {}",
                diag()
            );
        }
        s
    }

    /// All logs of the run's workers (local mode) and of the processes the test started.
    pub fn all_logs(&self) -> String {
        self.diag()
    }
}

pub fn binary_path(name: &str) -> PathBuf {
    binary(name)
}

pub fn metrics_steps(run_dir: &Path) -> Vec<u64> {
    fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        // The line being appended may be torn; skip what does not parse yet.
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|row| row["step"].as_u64())
        .collect()
}

/// Checks every `checkpoints/step-*` directory: a MANIFEST whose "<sha256>  <size>  <file>"
/// lines match the files. Returns the checkpoint steps, ascending.
pub fn verify_checkpoints(run_dir: &Path) -> Vec<u64> {
    let dir = run_dir.join("checkpoints");
    let mut steps = Vec::new();
    for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step-") else {
            continue;
        };
        let step: u64 = step
            .parse()
            .unwrap_or_else(|_| panic!("checkpoint directory name {name}"));
        let path = entry.path();
        let manifest = fs::read_to_string(path.join("MANIFEST"))
            .unwrap_or_else(|e| panic!("{}: no readable MANIFEST: {e}", path.display()));
        let mut listed = 0;
        for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                fields.len(),
                3,
                "{}: MANIFEST line {line:?}",
                path.display()
            );
            let (digest, size, file) = (fields[0], fields[1], fields[2]);
            let mut bytes = Vec::new();
            fs::File::open(path.join(file))
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .unwrap_or_else(|e| panic!("{}/{file}: {e}", path.display()));
            assert_eq!(
                bytes.len().to_string(),
                size,
                "{}/{file}: size differs from MANIFEST",
                path.display()
            );
            let actual: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                actual,
                digest.to_ascii_lowercase(),
                "{}/{file}: SHA-256 differs from MANIFEST",
                path.display()
            );
            listed += 1;
        }
        assert!(listed > 0, "{}: empty MANIFEST", path.display());
        steps.push(step);
    }
    steps.sort_unstable();
    steps
}

/// `GANTRY_TEST_SKIP_RESUME=1` skips the assertions that need checkpoints and resume (for a
/// tree where `Trainer::checkpoint_now`/`resume_latest` are still placeholders). Off by default.
pub fn skip_resume(what: &str) -> bool {
    let skip = std::env::var_os("GANTRY_TEST_SKIP_RESUME").is_some_and(|v| v == "1");
    if skip {
        eprintln!("GANTRY_TEST_SKIP_RESUME=1: not checking {what}");
    }
    skip
}

/// [needs checkpoints] The final checkpoint exists and every checkpoint is complete.
pub fn assert_final_checkpoint(c: &Cluster, steps: u64) -> Vec<u64> {
    let found = verify_checkpoints(&c.run_dir);
    if skip_resume("the final checkpoint") {
        return found;
    }
    assert!(
        found.contains(&steps),
        "no complete checkpoint of the final step {steps} in {}: found {found:?}\n{}",
        c.run_dir.join("checkpoints").display(),
        c.diag()
    );
    found
}

/// [needs resume] Some worker log says it resumed from the checkpoint of `step`
/// ("resuming from step 40", "... step-00000040 ...").
pub fn assert_resumed_from(c: &Cluster, step: u64) {
    if skip_resume(&format!("resuming from step {step}")) {
        return;
    }
    let logs = c.all_logs();
    let padded = format!("step-{step:08}");
    let plain = format!("step {step}");
    let resumed = logs.lines().any(|line| {
        line.to_ascii_lowercase().contains("resum")
            && (line.contains(&padded) || line.contains(&plain))
    });
    assert!(
        resumed,
        "no worker log line says it resumed from step {step}\n{logs}"
    );
}

/// metrics.jsonl: strictly increasing steps ending at the final step (a resumed run drops
/// the rows its checkpoint does not cover, so no step appears twice).
pub fn assert_metrics_complete(c: &Cluster, steps: u64) {
    let rows = metrics_steps(&c.run_dir);
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "metrics.jsonl steps are not strictly increasing: {rows:?}"
    );
    assert_eq!(rows.last(), Some(&steps), "metrics.jsonl rows {rows:?}");
}

pub fn coordinator_line(stderr: &str, needle: &str) -> bool {
    stderr.lines().any(|l| l.contains(needle))
}
