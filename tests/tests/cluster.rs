//! The coordinator and its workers as real processes on loopback: local groups, worker
//! crashes and hangs, external workers joining (and being refused), a lost coordinator,
//! malformed configuration.
//!
//! Every job is tiny (batch 16, one thread per worker, heartbeats every 0.2 s) so a test takes
//! seconds. Tests run one at a time (they compete for the CPUs). Every wait has a deadline —
//! a liveness guard, not a timing assertion — and every process a test starts is killed with
//! its whole process group when the test ends, passes or fails, so a hang fails the test
//! instead of hanging CI.
//!
//! The binaries are the `coordinator` and `worker` beside this test's profile directory
//! (`cargo build --bin coordinator --bin worker` first; the test builds them when missing),
//! or those in `GANTRY_TEST_BIN_DIR`.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::binary;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Liveness guards (never timing assertions): generous for a busy 2-core machine.
const START: Duration = Duration::from_secs(60);
const JOB: Duration = Duration::from_secs(120);

const EXIT_RETRYABLE: i32 = 75;

/// One cluster at a time: the processes of two tests would compete for the same cores.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; pids are our children or their process groups.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Live (non-zombie) processes in process group `pgid`, as (pid, command line).
fn group_members(pgid: i32) -> Vec<(i32, String)> {
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
struct Proc {
    name: String,
    child: Child,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    fn signal(&mut self, signal: i32) {
        assert!(
            self.poll().is_none(),
            "{} already exited ({:?}) before signal {signal}",
            self.name,
            self.status
        );
        kill(self.pid(), signal);
    }

    fn stderr_text(&self) -> String {
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
struct Cluster {
    procs: Vec<Proc>,
    root: PathBuf,
    run_dir: PathBuf,
    _temp: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Tiny-job settings shared by the coordinator flags of every test.
fn tiny(steps: u64) -> Vec<String> {
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
    fn new() -> Self {
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
    fn spawn(&mut self, name: &str, binary: &str, args: &[String], env: &[(&str, &str)]) -> usize {
        let stderr = self.root.join(format!("{name}.err"));
        let stdout = self.root.join(format!("{name}.out"));
        let mut command = Command::new(binary_path(binary));
        command.args(args);
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
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            stderr,
            status: None,
        });
        self.procs.len() - 1
    }

    /// `coordinator --run-dir RUN_DIR <tiny job> <extra>`.
    fn coordinator(
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
    fn worker(&mut self, name: &str, url: &str, token: &str, extra: &[&str]) -> usize {
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
    fn diag(&self) -> String {
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
    fn wait_until<T>(
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

    fn wait_exit(&mut self, index: usize, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.procs[index].name);
        self.wait_until(&what, timeout, |c| c.procs[index].poll())
    }

    /// Waits for a process that must still be running to exit, and returns its exit code.
    fn exit_code(&mut self, index: usize, timeout: Duration) -> i32 {
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

    fn assert_exit(&mut self, index: usize, expected: i32, timeout: Duration) {
        let code = self.exit_code(index, timeout);
        assert_eq!(
            code,
            expected,
            "{} exit code\n{}",
            self.procs[index].name,
            self.diag()
        );
    }

    fn stderr(&self, index: usize) -> String {
        self.procs[index].stderr_text()
    }

    /// The coordinator's gRPC URL, from its start-up line "... gRPC on HOST:PORT, ...".
    fn grpc_url(&mut self, coordinator: usize) -> String {
        self.wait_until("the coordinator's gRPC address", START, |c| {
            let text = c.stderr(coordinator);
            let at = text.find("gRPC on ")? + "gRPC on ".len();
            let addr = text[at..].split([',', ' ', '\n']).next()?;
            Some(format!("http://{addr}"))
        })
    }

    /// The highest step in metrics.jsonl so far.
    fn metrics_step(&self) -> u64 {
        metrics_steps(&self.run_dir).into_iter().max().unwrap_or(0)
    }

    /// Waits until training (any generation) logged step `step` or later.
    fn wait_step(&mut self, step: u64) -> u64 {
        self.wait_until(&format!("training to reach step {step}"), JOB, |c| {
            let now = c.metrics_step();
            (now >= step).then_some(now)
        })
    }

    /// The pid of the coordinator's local worker `worker_id` (it shares the coordinator's
    /// process group).
    fn local_worker_pid(&mut self, coordinator: usize, worker_id: &str) -> i32 {
        let pgid = self.procs[coordinator].pid();
        let needle = format!("--worker-id {worker_id} ");
        self.wait_until(&format!("local worker {worker_id}"), START, |_| {
            group_members(pgid)
                .into_iter()
                .find(|(_, cmd)| cmd.contains(&needle))
                .map(|(pid, _)| pid)
        })
    }

    fn summary(&self) -> Value {
        let path = self.run_dir.join("summary.json");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.diag()));
        serde_json::from_str(&text).expect("summary.json is JSON")
    }

    /// summary.json describes a complete run of `world` ranks, `steps` steps, `restarts`.
    fn assert_summary(&self, world: u64, steps: u64, restarts: u64) -> Value {
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
    fn all_logs(&self) -> String {
        self.diag()
    }
}

fn binary_path(name: &str) -> PathBuf {
    binary(name)
}

fn metrics_steps(run_dir: &Path) -> Vec<u64> {
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
fn verify_checkpoints(run_dir: &Path) -> Vec<u64> {
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
fn skip_resume(what: &str) -> bool {
    let skip = std::env::var_os("GANTRY_TEST_SKIP_RESUME").is_some_and(|v| v == "1");
    if skip {
        eprintln!("GANTRY_TEST_SKIP_RESUME=1: not checking {what}");
    }
    skip
}

/// [needs checkpoints] The final checkpoint exists and every checkpoint is complete.
fn assert_final_checkpoint(c: &Cluster, steps: u64) -> Vec<u64> {
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
fn assert_resumed_from(c: &Cluster, step: u64) {
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
fn assert_metrics_complete(c: &Cluster, steps: u64) {
    let rows = metrics_steps(&c.run_dir);
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "metrics.jsonl steps are not strictly increasing: {rows:?}"
    );
    assert_eq!(rows.last(), Some(&steps), "metrics.jsonl rows {rows:?}");
}

fn coordinator_line(stderr: &str, needle: &str) -> bool {
    stderr.lines().any(|l| l.contains(needle))
}

// ---------------------------------------------------------------------------------------

#[test]
fn local_groups_of_two_and_four_complete_with_identical_parameters() {
    for (world, steps) in [(2u64, 30u64), (4, 20)] {
        let mut c = Cluster::new();
        let workers = world.to_string();
        let coord = c.coordinator("coordinator", steps, &["--workers", &workers], &[]);
        c.assert_exit(coord, 0, JOB);
        let stderr = c.stderr(coord);
        assert!(coordinator_line(&stderr, "coordinator: done"), "{stderr}");
        c.assert_summary(world, steps, 0);
        // Every rank ran the end-of-training cross-rank checksum (and the ones every 10
        // steps) and reported success; a divergence would have failed the run.
        let logs = c.all_logs();
        assert!(!logs.contains("diverged"), "{logs}");
        for i in 0..world {
            let log = c.run_dir.join("logs").join(format!("worker-{i}.log"));
            assert!(log.is_file(), "{} missing", log.display());
        }
        assert_eq!(metrics_steps(&c.run_dir).last(), Some(&steps));
        assert_final_checkpoint(&c, steps);
        // No worker outlives its coordinator.
        let pgid = c.procs[coord].pid();
        assert_eq!(group_members(pgid), Vec::new(), "leftover workers");
    }
}

#[test]
fn vae_and_autoregressive_families_train_on_a_local_group_of_two_and_restart_from_a_checkpoint() {
    let families: [(&str, &[&str], &[&str]); 2] = [
        ("vae", &[], &["kl", "neg_elbo", "reconstruction"]),
        (
            "autoregressive",
            &[
                "--set",
                "autoregressive.channels=8",
                "--set",
                "autoregressive.residual_blocks=1",
            ],
            &["bits_per_dim", "nll"],
        ),
    ];
    for (family, extra, statistics) in families {
        let steps = 60;
        let mut c = Cluster::new();
        let family_set = format!("model.family={family}");
        let mut args = vec!["--workers", "2", "--set", &family_set];
        args.extend(extra);
        let coord = c.coordinator("coordinator", steps, &args, &[]);
        let victim = c.local_worker_pid(coord, "local-g0-w1");
        // Past the step-20 checkpoint: the group restarts from a checkpoint of its family.
        let at = c.wait_step(25);
        assert!(kill(victim, libc::SIGKILL), "kill -9 {victim}");
        c.assert_exit(coord, 0, JOB);
        let stderr = c.stderr(coord);
        assert!(
            coordinator_line(&stderr, "restart 1 of 2"),
            "{family}: the coordinator restarts the group: {stderr}"
        );
        let s = c.summary();
        let diag = || format!("{family}: summary {s:#}\n{}", c.diag());
        assert_eq!(s["family"].as_str(), Some(family), "{}", diag());
        assert_eq!(s["world_size"].as_u64(), Some(2), "{}", diag());
        assert_eq!(s["steps"].as_u64(), Some(steps), "{}", diag());
        assert_eq!(s["restarts"].as_u64(), Some(1), "{}", diag());
        let finals: Vec<&str> = s["final"]
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(finals, statistics, "{}", diag());
        for key in ["heldout_neg_elbo_nats", "heldout_nll_nats", "bits_per_dim"] {
            let value = s["quality"][key].as_f64().unwrap_or(f64::NAN);
            assert!(
                value.is_finite() && value > 0.0,
                "quality.{key}: {}",
                diag()
            );
        }
        // Every logged row names the family's statistics.
        let rows = fs::read_to_string(c.run_dir.join("metrics.jsonl")).unwrap();
        for line in rows.lines() {
            let row: Value = serde_json::from_str(line).unwrap();
            for name in statistics {
                assert!(row[name].as_f64().is_some_and(f64::is_finite), "{line}");
            }
        }
        assert_metrics_complete(&c, steps);
        let checkpoints = assert_final_checkpoint(&c, steps);
        // The kill came after step `at` ≥ 25: the restart resumed from a checkpoint of the
        // run (step 20, or a later one if training outran the kill).
        let resumed = (20..steps).step_by(20).find(|k| {
            let padded = format!("step-{k:08}");
            c.all_logs()
                .lines()
                .any(|l| l.to_ascii_lowercase().contains("resum") && l.contains(&padded))
        });
        assert!(
            resumed.is_some() || skip_resume("the family's restart"),
            "{family}: killed after step {at}, no worker resumed from a checkpoint \
             (checkpoints {checkpoints:?})\n{}",
            diag()
        );
        let sample = c.run_dir.join(format!("samples/step-{steps:08}.png"));
        assert!(sample.is_file(), "{} missing\n{}", sample.display(), diag());
    }
}

#[test]
fn killed_worker_is_detected_and_the_group_restarts_from_the_checkpoint() {
    let steps = 80;
    let mut c = Cluster::new();
    let coord = c.coordinator("coordinator", steps, &["--workers", "2"], &[]);
    let victim = c.local_worker_pid(coord, "local-g0-w1");
    // Past the step-40 checkpoint, well before the step-60 one.
    let at = c.wait_step(45);
    assert!(at < 60, "training ran past step 60 ({at}) before the kill");
    assert!(kill(victim, libc::SIGKILL), "kill -9 {victim}");
    c.assert_exit(coord, 0, JOB);
    let stderr = c.stderr(coord);
    assert!(
        coordinator_line(&stderr, "generation 0 failed"),
        "the coordinator reports the failure: {stderr}"
    );
    assert!(
        coordinator_line(&stderr, "restart 1 of 2"),
        "the coordinator restarts the group: {stderr}"
    );
    c.assert_summary(2, steps, 1);
    let checkpoints = assert_final_checkpoint(&c, steps);
    assert!(checkpoints.iter().all(|s| s % 20 == 0), "{checkpoints:?}");
    assert_metrics_complete(&c, steps);
    assert_resumed_from(&c, 40);
}

#[test]
fn always_crashing_workers_exhaust_max_restarts_and_leave_no_process() {
    let mut c = Cluster::new();
    let cache = c.root.join("empty-cache");
    fs::create_dir_all(&cache).expect("cache dir");
    let cache_set = format!("data.cache_dir={}", cache.display());
    // MNIST is not cached and its only mirror refuses connections: every worker fails
    // loading its data set, in every generation.
    let coord = c.coordinator(
        "coordinator",
        20,
        &[
            "--workers",
            "2",
            "--set",
            "data.dataset=mnist",
            "--set",
            "data.mirror=[\"http://127.0.0.1:9/\"]",
            "--set",
            &cache_set,
        ],
        &[],
    );
    let pgid = c.procs[coord].pid();
    let code = c.exit_code(coord, JOB);
    let stderr = c.stderr(coord);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        coordinator_line(&stderr, "job failed after 2 restart(s)"),
        "{stderr}"
    );
    // The final report (the worker's error may span several lines).
    let last = stderr.rfind("job failed").map_or("", |at| &stderr[at..]);
    assert!(
        last.contains("rank ") && last.contains("local-g2-w"),
        "the final error names the rank and worker: {last}"
    );
    assert!(
        last.contains("exit status 75"),
        "the final error names the exit status (retryable: a download failed): {last}"
    );
    assert!(
        last.contains("it reported") && last.contains("mirror"),
        "the final error carries the worker's own account: {last}"
    );
    // Three generations of workers were started (g0, g1, g2), each failed loading its data
    // (the cause is in its log), and none is left.
    let logs = fs::read_to_string(c.run_dir.join("logs").join("worker-0.log")).unwrap_or_default();
    assert!(logs.contains("local-g2-w0"), "{logs}");
    assert_eq!(logs.matches("loading data set").count(), 3, "{logs}");
    assert_eq!(group_members(pgid), Vec::new(), "leftover workers");
}

#[test]
fn a_fatal_worker_error_reaches_the_coordinator_and_is_not_retried() {
    let mut c = Cluster::new();
    let empty = c.root.join("no-images-here");
    fs::create_dir_all(&empty).expect("empty data set directory");
    let dataset = format!("data.dataset=folder:{}", empty.display());
    let coord = c.coordinator(
        "coordinator",
        20,
        &["--workers", "2", "--set", &dataset],
        &[],
    );
    let code = c.exit_code(coord, JOB);
    let stderr = c.stderr(coord);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        coordinator_line(&stderr, "job failed after 0 restart(s)"),
        "a configuration error is not retried: {stderr}"
    );
    let last = stderr.rfind("job failed").map_or("", |at| &stderr[at..]);
    assert!(
        last.contains("no-images-here"),
        "the coordinator prints the worker's root cause: {last}"
    );
    assert!(stderr.contains("not retryable"), "{stderr}");
}

#[test]
fn stopped_local_worker_misses_heartbeats_and_the_group_recovers() {
    let steps = 60;
    let mut c = Cluster::new();
    let coord = c.coordinator("coordinator", steps, &["--workers", "2"], &[]);
    let victim = c.local_worker_pid(coord, "local-g0-w1");
    c.wait_step(20);
    assert!(kill(victim, libc::SIGSTOP), "SIGSTOP {victim}");
    c.assert_exit(coord, 0, JOB);
    let stderr = c.stderr(coord);
    assert!(
        coordinator_line(&stderr, "missed heartbeats"),
        "declared failed for its silence: {stderr}"
    );
    assert!(coordinator_line(&stderr, "local-g0-w1"), "{stderr}");
    c.assert_summary(2, steps, 1);
    assert_final_checkpoint(&c, steps);
    assert_eq!(
        group_members(c.procs[coord].pid()),
        Vec::new(),
        "leftover workers"
    );
}

#[test]
fn external_workers_complete_and_bad_joins_are_refused() {
    let token = "test-token-5";
    let steps = 100;
    let mut c = Cluster::new();
    let coord = c.coordinator(
        "coordinator",
        steps,
        &["--expect-workers", "2", "--listen", "127.0.0.1:0"],
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(coord);

    // While the coordinator waits in rendezvous: a wrong token and a different
    // configuration are refused (and take no place in the group).
    let intruder = c.worker("wrong-token", &url, "not-the-token", &[]);
    assert_eq!(c.exit_code(intruder, START), 1, "{}", c.diag());
    let err = c.stderr(intruder);
    assert!(
        err.contains("join refused") && err.contains("Unauthenticated"),
        "{err}"
    );

    let config = c.root.join("other.toml");
    fs::write(&config, "[train]\nlr_g = 0.00123\n").expect("config file");
    let config_arg = config.display().to_string();
    let other = c.worker("other-config", &url, token, &["--config", &config_arg]);
    assert_eq!(c.exit_code(other, START), 1, "{}", c.diag());
    let err = c.stderr(other);
    assert!(
        err.contains("join refused")
            && err.contains("FailedPrecondition")
            && err.contains("config hash"),
        "{err}"
    );

    let a = c.worker("worker-a", &url, token, &[]);
    let b = c.worker("worker-b", &url, token, &[]);
    c.wait_step(5);
    // While training: the group is full.
    let third = c.worker("worker-c", &url, token, &[]);
    let code = c.exit_code(third, START);
    let err = c.stderr(third);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("join refused") && err.contains("ResourceExhausted"),
        "{err}"
    );
    assert!(
        c.procs[a].poll().is_none() && c.procs[b].poll().is_none(),
        "the refusal did not disturb the group\n{}",
        c.diag()
    );

    c.assert_exit(a, 0, JOB);
    c.assert_exit(b, 0, JOB);
    c.assert_exit(coord, 0, JOB);
    c.assert_summary(2, steps, 0);
    assert_final_checkpoint(&c, steps);
}

#[test]
fn external_stopped_worker_is_replaced_and_its_stale_heartbeat_aborted() {
    let token = "test-token-6";
    let steps = 80;
    let mut c = Cluster::new();
    let coord = c.coordinator(
        "coordinator",
        steps,
        &["--expect-workers", "2", "--listen", "127.0.0.1:0"],
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(coord);
    let healthy = c.worker("worker-a", &url, token, &[]);
    let stopped = c.worker("worker-b", &url, token, &[]);
    c.wait_step(25);
    c.procs[stopped].signal(libc::SIGSTOP);

    // The coordinator declares it failed and ends generation 0; the healthy worker leaves.
    c.wait_until(
        "the coordinator to declare the stopped worker failed",
        JOB,
        |c| {
            let err = c.stderr(coord);
            (err.contains("generation 0 failed") && err.contains("missed heartbeats")).then_some(())
        },
    );
    c.assert_exit(healthy, EXIT_RETRYABLE, JOB);
    let checkpoint = verify_checkpoints(&c.run_dir).last().copied();

    // Kubernetes starts replacements; they form generation 1.
    let fresh = [
        c.worker("worker-c", &url, token, &[]),
        c.worker("worker-d", &url, token, &[]),
    ];
    c.wait_until("generation 1 to start", START, |c| {
        let ranked = fresh
            .iter()
            .filter(|&&w| c.stderr(w).contains("(generation 1,"))
            .count();
        (ranked == 2).then_some(())
    });
    // The stopped worker wakes up: its generation is over.
    c.procs[stopped].signal(libc::SIGCONT);
    c.assert_exit(stopped, EXIT_RETRYABLE, JOB);
    let err = c.stderr(stopped);
    assert!(err.contains("generation 0 is over"), "{err}");

    for w in fresh {
        c.assert_exit(w, 0, JOB);
    }
    c.assert_exit(coord, 0, JOB);
    c.assert_summary(2, steps, 1);
    assert_final_checkpoint(&c, steps);
    assert_metrics_complete(&c, steps);
    if !skip_resume("the checkpoint before the failure") {
        let checkpoint =
            checkpoint.unwrap_or_else(|| panic!("no checkpoint before the failure\n{}", c.diag()));
        assert_resumed_from(&c, checkpoint);
    }
}

#[test]
fn killed_coordinator_is_noticed_and_a_resumed_one_finishes_the_job() {
    let token = "test-token-7";
    // Long enough that the workers cannot finish before they notice the lost coordinator.
    let steps = 160;
    let mut c = Cluster::new();
    let first = c.coordinator(
        "coordinator-1",
        steps,
        &["--expect-workers", "2", "--listen", "127.0.0.1:0"],
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(first);
    let workers = [
        c.worker("worker-a", &url, token, &[]),
        c.worker("worker-b", &url, token, &[]),
    ];
    c.wait_step(25);
    c.procs[first].signal(libc::SIGKILL);
    // Every worker leaves with the retryable code. The first to miss its heartbeats says it
    // lost the coordinator and aborts the ring; its partner may see that abort first, as a
    // peer gone mid all-reduce: both are the same event.
    let mut noticed = 0;
    for w in workers {
        c.assert_exit(w, EXIT_RETRYABLE, JOB);
        let err = c.stderr(w);
        if err.contains("lost the coordinator") {
            noticed += 1;
        } else {
            assert!(
                err.contains("disconnected") || err.contains("aborted"),
                "{err}"
            );
        }
    }
    assert!(
        noticed >= 1,
        "no worker noticed the lost coordinator\n{}",
        c.diag()
    );
    let reached = c.metrics_step();
    assert!(
        reached < steps,
        "the workers stopped before the end ({reached})"
    );
    let checkpoint = verify_checkpoints(&c.run_dir).last().copied();

    let run_dir = c.run_dir.display().to_string();
    let second = c.spawn(
        "coordinator-2",
        "coordinator",
        &[
            "--resume".to_owned(),
            run_dir,
            "--expect-workers".into(),
            "2".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(second);
    let again = [
        c.worker("worker-c", &url, token, &[]),
        c.worker("worker-d", &url, token, &[]),
    ];
    for w in again {
        c.assert_exit(w, 0, JOB);
    }
    c.assert_exit(second, 0, JOB);
    c.assert_summary(2, steps, 0);
    assert_final_checkpoint(&c, steps);
    assert_metrics_complete(&c, steps);
    if !skip_resume("the checkpoint before the coordinator died") {
        let checkpoint = checkpoint.unwrap_or_else(|| {
            panic!(
                "no checkpoint was written before the coordinator died\n{}",
                c.diag()
            )
        });
        assert_resumed_from(&c, checkpoint);
    }
}

#[test]
fn malformed_configuration_is_refused_before_binding() {
    let mut c = Cluster::new();
    let cases: [(&[&str], &str); 5] = [
        (&["--workers", "0"], "--workers"),
        // What once started 272 processes on two cores within a minute.
        (&["--workers", "100000"], "--oversubscribe"),
        (
            &["--workers", "2", "--set", "cluster.heartbeat_timeout=0"],
            "cluster.heartbeat_timeout",
        ),
        (
            &["--workers", "2", "--set", "cluster.bogus_key=1"],
            "bogus_key",
        ),
        (
            &["--workers", "2", "--set", "cluster.heartbeat_timeout=0.1"],
            "cluster.heartbeat_timeout",
        ),
    ];
    for (i, (args, field)) in cases.iter().enumerate() {
        let run_dir = c.root.join(format!("run-{i}"));
        let mut all = vec!["--run-dir".to_owned(), run_dir.display().to_string()];
        all.extend(tiny(10));
        all.extend(args.iter().map(|s| s.to_string()));
        let p = c.spawn(&format!("bad-{i}"), "coordinator", &all, &[]);
        let code = c.exit_code(p, START);
        let err = c.stderr(p);
        assert_ne!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains(field),
            "{args:?}: the error names {field}: {err}"
        );
        assert!(
            !err.contains("gRPC on") && !err.contains("binding"),
            "{args:?}: refused before binding: {err}"
        );
        assert!(
            !run_dir.exists(),
            "{args:?}: refused before creating the run directory"
        );
        assert!(
            !c.root.join(format!("run-{i}")).join("logs").exists(),
            "{args:?}: no worker was started"
        );
    }
}

#[test]
fn an_old_run_directory_is_refused_and_a_resume_needs_a_checkpoint() {
    let mut c = Cluster::new();
    fs::create_dir_all(&c.run_dir).unwrap();
    let rows = "{\"step\":5}\n{\"step\":10}\n";
    fs::write(c.run_dir.join("metrics.jsonl"), rows).unwrap();
    fs::write(c.run_dir.join("config.toml"), "").unwrap();
    // A fresh job into a run directory that holds a run: refused, nothing touched.
    let old = c.run_dir.join("checkpoints/step-00000010");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("MANIFEST"), "").unwrap();
    let fresh = c.coordinator("coordinator-fresh", 20, &["--workers", "2"], &[]);
    c.assert_exit(fresh, 1, START);
    let err = c.stderr(fresh);
    assert!(
        err.contains("already holds a run (metrics.jsonl with 2 rows, a checkpoint of step 10)")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(c.run_dir.join("metrics.jsonl")).unwrap(),
        rows
    );
    assert!(old.join("MANIFEST").is_file(), "the old checkpoint is kept");
    assert!(!c.run_dir.join("logs").exists(), "no worker was started");

    // --resume where there is no checkpoint: refused, instead of starting at step 0.
    fs::remove_dir_all(c.run_dir.join("checkpoints")).unwrap();
    let run_dir = c.run_dir.display().to_string();
    let resume = c.spawn(
        "coordinator-resume",
        "coordinator",
        &[
            "--resume".to_owned(),
            run_dir,
            "--workers".into(),
            "2".into(),
        ],
        &[],
    );
    c.assert_exit(resume, 1, START);
    let err = c.stderr(resume);
    assert!(err.contains("no checkpoint in"), "{err}");
    assert_eq!(
        fs::read_to_string(c.run_dir.join("metrics.jsonl")).unwrap(),
        rows
    );

    // --overwrite replaces the old run, as asked.
    let replace = c.coordinator(
        "coordinator-overwrite",
        10,
        &["--workers", "1", "--overwrite"],
        &[],
    );
    c.assert_exit(replace, 0, JOB);
    assert_eq!(metrics_steps(&c.run_dir).last(), Some(&10));
    assert_ne!(
        fs::read_to_string(c.run_dir.join("metrics.jsonl")).unwrap(),
        rows
    );
}

/// Runs `coordinator <args>` (an operator's command) to completion: (exit code, stdout, stderr).
fn operate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary_path("coordinator"))
        .args(args)
        .env_remove("GANTRY__CLUSTER__OPERATOR_TOKEN")
        .output()
        .expect("coordinator runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_operator_cli_drives_a_live_job_and_wrong_tokens_are_refused() {
    let steps = 100_000;
    let mut c = Cluster::new();
    let token = "join-token-for-the-operator-test";
    // No checkpoint is pruned while the test reads them.
    let coord = c.coordinator(
        "coordinator",
        steps,
        &["--workers", "2", "--set", "checkpoint.keep=100000"],
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(coord);
    c.wait_step(10);
    let token_file = c.run_dir.join("operator-token");
    let file = token_file.display().to_string();
    let status = |json: bool| -> Value {
        let mut args = vec!["status", "--addr", &url, "--token-file", &file];
        if json {
            args.push("--json");
        }
        let (code, out, err) = operate(&args);
        assert_eq!(code, 0, "status: {err}");
        if json {
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
        } else {
            Value::String(out)
        }
    };
    // The generated operator token is readable by its owner only.
    let mode = fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "operator-token mode {mode:o}");

    let table = status(false);
    let table = table.as_str().unwrap();
    assert!(
        table.contains("local-g0-w0") && table.contains("local-g0-w1"),
        "{table}"
    );
    let s = status(true);
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["phase"], "training", "{s}");

    // Wrong tokens: a stranger's, and the workers' join token (workers cannot steer the job).
    for (args, expected) in [
        (
            vec!["stop", "--addr", &url, "--token", "not-the-token"],
            "Unauthenticated",
        ),
        (
            vec!["stop", "--addr", &url, "--token", token],
            "PermissionDenied",
        ),
        (
            vec!["status", "--addr", &url, "--token", token],
            "PermissionDenied",
        ),
    ] {
        let (code, _, err) = operate(&args);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(err.contains(expected), "{args:?}: {err}");
    }

    // pause holds every rank.
    let (code, out, err) = operate(&["pause", "--addr", &url, "--token-file", &file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused"), "{out}");
    // Every rank holds, and at the same step: a rank that held one step later than its peer
    // would sit in that step's all-reduce until the collective timeout failed the job.
    let held = c.wait_until("every rank to pause at one step", START, |_| {
        let s = status(true);
        let workers = s["workers"].as_array()?.clone();
        let steps: Vec<u64> = workers.iter().filter_map(|w| w["step"].as_u64()).collect();
        // An empty list (a status taken while the group re-forms) holds nobody.
        let first = *steps.first()?;
        (workers.iter().all(|w| w["state"] == "paused")
            && steps.len() == workers.len()
            && steps.iter().all(|&s| s == first))
        .then_some(first)
    });
    assert!(status(true)["paused"].as_bool().unwrap_or(false));
    std::thread::sleep(Duration::from_secs(3));
    let s = status(true);
    let steps_now: Vec<u64> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["step"].as_u64())
        .collect();
    assert!(
        steps_now.iter().all(|&step| step == held),
        "paused at {held}, 3 s later at {steps_now:?}"
    );

    // resume continues.
    let (code, _, err) = operate(&["resume", "--addr", &url, "--token-file", &file]);
    assert_eq!(code, 0, "{err}");
    c.wait_until("training to continue", START, |c| {
        (c.metrics_step() > held + 5).then_some(())
    });

    // checkpoint writes a complete checkpoint at the announced step.
    let (code, out, err) = operate(&[
        "checkpoint",
        "--addr",
        &url,
        "--token-file",
        &file,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let at = serde_json::from_str::<Value>(&out).unwrap()["at_step"]
        .as_u64()
        .unwrap();
    assert!(at > held, "checkpoint at {at}");
    c.wait_until(&format!("the checkpoint of step {at}"), START, |c| {
        verify_checkpoints(&c.run_dir).contains(&at).then_some(())
    });

    // stop ends the job with a checkpoint at the announced step and exit 0.
    let (code, out, err) = operate(&["stop", "--addr", &url, "--token-file", &file]);
    assert_eq!(code, 0, "{err}");
    let stop_at: u64 = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {out:?}"));
    c.assert_exit(coord, 0, JOB);
    assert!(
        verify_checkpoints(&c.run_dir).contains(&stop_at),
        "no complete checkpoint of step {stop_at}\n{}",
        c.diag()
    );
}

#[test]
fn a_terminal_ctrl_c_checkpoints_and_stops_the_whole_job_cleanly() {
    let mut c = Cluster::new();
    let coord = c.coordinator("coordinator", 100_000, &["--workers", "2"], &[]);
    let pgid = c.procs[coord].pid();
    // Both local workers are up and training.
    c.local_worker_pid(coord, "local-g0-w1");
    c.wait_step(25);
    // What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    assert!(kill(-pgid, libc::SIGINT), "kill -INT -{pgid}");
    c.assert_exit(coord, 75, JOB);
    let stderr = c.stderr(coord);
    let at: u64 = stderr
        .lines()
        .find_map(|l| l.split("stop at step ").nth(1))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stop step announced: {stderr}"));
    assert!(
        coordinator_line(&stderr, "stopped by signal after a checkpoint"),
        "{stderr}"
    );
    assert!(
        verify_checkpoints(&c.run_dir).contains(&at),
        "no complete checkpoint of the announced step {at}\n{}",
        c.diag()
    );
    assert!(!stderr.contains("job failed"), "{stderr}");
    assert_eq!(group_members(pgid), Vec::new(), "leftover workers");

    // A signal during the rendezvous ends the job at once, not at the rendezvous timeout.
    let waiting = c.coordinator(
        "coordinator-waiting",
        20,
        &[
            "--expect-workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--overwrite",
        ],
        &[(
            "GANTRY__CLUSTER__TOKEN",
            "token-for-a-rendezvous-nobody-joins",
        )],
    );
    c.grpc_url(waiting);
    c.procs[waiting].signal(libc::SIGTERM);
    c.assert_exit(waiting, 143, Duration::from_secs(20));
    assert!(
        c.stderr(waiting).contains("during the rendezvous"),
        "{}",
        c.stderr(waiting)
    );
}
