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
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use serde_json::Value;

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
    // While training: up to two more wait for a next generation (replacements whose
    // predecessors' loss is not noticed yet); beyond that the group is full.
    let waiting = [
        c.worker("worker-c", &url, token, &[]),
        c.worker("worker-d", &url, token, &[]),
    ];
    c.wait_until("both to wait for the next generation", START, |c| {
        let said = c.stderr(coord);
        ["worker-c", "worker-d"]
            .iter()
            .all(|id| coordinator_line(&said, &format!("worker {id} waits for the next")))
            .then_some(())
    });
    let third = c.worker("worker-e", &url, token, &[]);
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
    // No failure opened a next generation: the waiting joins are cancelled (retryable).
    for w in waiting {
        c.assert_exit(w, EXIT_RETRYABLE, JOB);
        assert!(c.stderr(w).contains("cancelled"), "{}", c.stderr(w));
    }
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
    // The workers train on without a coordinator until their heartbeats time out (2.2 s, by
    // when they are near step 140), so the job must outlast that on a fast machine too: at the
    // ~65 steps/s of a 2-core CI runner, 160 steps were sometimes all done first, while 600
    // would need a machine 3x faster.
    let steps = 600;
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
fn signals_arriving_mid_step_leave_supervised_workers_training() {
    // A supervised worker receives its terminal's every Ctrl-C and leaves it to the
    // coordinator. A handler run on the training thread inside one of oneDNN's generated fp32
    // GEMM kernels corrupted the heap (see `runtime::block_async_signals`): before the fix a
    // single Ctrl-C killed a worker in about one run of six, and barrages like this one killed
    // every time. `onednn` puts those kernels in the step on every CPU (`auto` picks them on
    // CPUs not made by Intel only).
    let mut c = Cluster::new();
    let coord = c.coordinator(
        "coordinator",
        100_000,
        &["--workers", "2", "--set", "train.cpu_matmul=onednn"],
        &[],
    );
    let workers = [
        c.local_worker_pid(coord, "local-g0-w0"),
        c.local_worker_pid(coord, "local-g0-w1"),
    ];
    c.wait_step(25);
    for _ in 0..300 {
        for pid in workers {
            assert!(kill(pid, libc::SIGINT), "kill -INT {pid}\n{}", c.diag());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let after = c.metrics_step();
    c.wait_step(after + 10);
    for pid in workers {
        assert!(
            kill(pid, 0),
            "worker {pid} did not outlive the signals\n{}",
            c.diag()
        );
    }
    c.procs[coord].signal(libc::SIGTERM);
    c.assert_exit(coord, 143, JOB);
    let stderr = c.stderr(coord);
    assert!(
        !stderr.contains("failed") && !stderr.contains("restarting"),
        "a worker died of the signals\n{}",
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

// --- Elastic membership (coordinator side; docs/elastic.md "Coordinator") ---------------

/// The elastic tests' job: 120 steps (a regroup is scheduled two heartbeat intervals of
/// steps ahead, ~40 here, and must land before the end), checkpoints every 20, plain SGD and no BatchNorm (so a
/// group's update depends on the global batch alone, not on how it is sliced), a global
/// batch of 48 = 3 × 16 = 2 × 24 (even slices at both world sizes: the check does not
/// depend on uneven slicing).
const ELASTIC_STEPS: u64 = 120;
const ELASTIC_SETTINGS: [&str; 10] = [
    "--set",
    "train.optimizer=sgd",
    "--set",
    "model.batch_norm=false",
    "--set",
    "cluster.min_workers=2",
    "--set",
    "cluster.rejoin_grace=2",
    // The control run starts from the reference's checkpoint of the resumed step.
    "--set",
    "checkpoint.keep=100000",
];

/// The F32 tensors of a `.safetensors` file, by name (8-byte little-endian header length,
/// a JSON header of `{name: {dtype, shape, data_offsets}}`, then the data).
fn safetensors_f32(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let data = &bytes[8 + header_len..];
    let mut tensors: Vec<(String, Vec<f32>)> = header
        .as_object()
        .expect("header object")
        .iter()
        .filter(|(name, info)| *name != "__metadata__" && info["dtype"] == "F32")
        .map(|(name, info)| {
            let at = |i: usize| info["data_offsets"][i].as_u64().unwrap() as usize;
            let values = data[at(0)..at(1)]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name.clone(), values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Both networks' parameters in the checkpoint of `step` of `run_dir`.
fn gan_parameters(run_dir: &std::path::Path, step: u64) -> Vec<(String, Vec<f32>)> {
    let dir = run_dir.join(format!("checkpoints/step-{step:08}"));
    let mut all = Vec::new();
    for network in ["generator", "discriminator"] {
        for (name, values) in safetensors_f32(&dir.join(format!("{network}.safetensors"))) {
            all.push((format!("{network}.{name}"), values));
        }
    }
    assert!(!all.is_empty(), "no tensors in {}", dir.display());
    all
}

/// The largest parameter difference between two runs, relative to the largest parameter.
fn relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let names = |t: &[(String, Vec<f32>)]| {
        t.iter()
            .map(|(n, v)| (n.clone(), v.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(a),
        names(b),
        "the two checkpoints hold different tensors"
    );
    let (mut diff, mut scale) = (0f64, 0f64);
    for ((_, x), (_, y)) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            diff = diff.max(f64::from((p - q).abs()));
            scale = scale.max(f64::from(p.abs()));
        }
    }
    diff / scale
}

/// Copies the run in `from` up to its checkpoint of `step` into `to`, with that checkpoint's
/// recorded global batch rewritten to `global` (its MANIFEST line with it): a run whose
/// group shrank without keeping the global batch, as restart-at-any-size systems do.
fn copy_run_with_global_batch(
    from: &std::path::Path,
    to: &std::path::Path,
    step: u64,
    global: u64,
) {
    use sha2::Digest;
    let name = format!("step-{step:08}");
    let (source, target) = (
        from.join("checkpoints").join(&name),
        to.join("checkpoints").join(&name),
    );
    fs::create_dir_all(&target).unwrap();
    for file in ["config.toml", "metrics.jsonl"] {
        fs::copy(from.join(file), to.join(file)).unwrap();
    }
    for entry in fs::read_dir(&source).unwrap().flatten() {
        fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    let state_path = target.join("state.json");
    let mut state: Value = serde_json::from_str(&fs::read_to_string(&state_path).unwrap()).unwrap();
    assert!(
        state.get("global_batch_size").is_some(),
        "the checkpoint records its global batch: {state}"
    );
    state["global_batch_size"] = global.into();
    let text = serde_json::to_string_pretty(&state).unwrap();
    fs::write(&state_path, &text).unwrap();
    let digest: String = sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let manifest = fs::read_to_string(target.join("MANIFEST")).unwrap();
    let rewritten: String = manifest
        .lines()
        .map(|line| match line.split_whitespace().last() {
            Some("state.json") => format!("{digest}  {}  state.json\n", text.len()),
            _ => format!("{line}\n"),
        })
        .collect();
    fs::write(target.join("MANIFEST"), rewritten).unwrap();
}

#[test]
fn an_elastic_job_shrinks_to_the_survivors_grows_back_at_a_regroup_and_trains_the_same_global_batch()
 {
    let token = "test-token-elastic";
    let mut c = Cluster::new();
    let root = c.root.clone();

    // The reference: the same job, three workers, uninterrupted.
    c.run_dir = root.join("reference");
    let mut reference_args = vec!["--workers", "3"];
    reference_args.extend(ELASTIC_SETTINGS);
    let reference = c.coordinator("coordinator-reference", ELASTIC_STEPS, &reference_args, &[]);
    c.assert_exit(reference, 0, JOB);
    let s = c.summary();
    assert_eq!(s["global_batch_size"].as_u64(), Some(48), "{s:#}");
    let expected = gan_parameters(&c.run_dir, ELASTIC_STEPS);

    // The elastic run: three external workers; one is killed after the first checkpoint and
    // never replaced. The survivors leave with the retryable code and come back (as their
    // orchestrator restarts them); after cluster.rejoin_grace the group forms with two.
    c.run_dir = root.join("elastic");
    let mut args = vec!["--expect-workers", "3", "--listen", "127.0.0.1:0"];
    args.extend(ELASTIC_SETTINGS);
    let coord = c.coordinator(
        "coordinator",
        ELASTIC_STEPS,
        &args,
        &[("GANTRY__CLUSTER__TOKEN", token)],
    );
    let url = c.grpc_url(coord);
    let survivors = [
        c.worker("worker-a", &url, token, &[]),
        c.worker("worker-b", &url, token, &[]),
    ];
    let victim = c.worker("worker-c", &url, token, &[]);
    let at = c.wait_step(25);
    assert!(
        at < ELASTIC_STEPS,
        "trained to the end ({at}) before the kill"
    );
    c.procs[victim].signal(libc::SIGKILL);
    // Paused, so the shrunken group holds after its first step until the late worker has
    // joined (the job would otherwise be over before a new process is up); the pause holds
    // across generations.
    let file = c.run_dir.join("operator-token").display().to_string();
    let control = |verb: &str| {
        let (code, out, err) = operate(&[verb, "--addr", &url, "--token-file", &file]);
        assert_eq!(code, 0, "{verb}: {out}{err}");
    };
    control("pause");
    for w in survivors {
        c.assert_exit(w, EXIT_RETRYABLE, JOB);
    }
    let back = [
        c.worker("worker-a2", &url, token, &[]),
        c.worker("worker-b2", &url, token, &[]),
    ];
    c.wait_until("generation 1 to train with two workers", JOB, |_| {
        let (_, out, _) = operate(&["status", "--addr", &url, "--token-file", &file, "--json"]);
        let s: Value = serde_json::from_str(&out).ok()?;
        (s["phase"] == "degraded" && s["world_size"] == 2).then_some(())
    });
    // A worker joins the shrunken group: it waits, the group regroups at one step after the
    // resume, and generation 2 trains with all three.
    let late = c.worker("worker-c2", &url, token, &[]);
    c.wait_until("the late worker to wait for a regroup", JOB, |c| {
        coordinator_line(&c.stderr(coord), "worker-c2 is waiting to join").then_some(())
    });
    control("resume");
    for w in back.into_iter().chain([late]) {
        c.assert_exit(w, 0, JOB);
    }
    c.assert_exit(coord, 0, JOB);
    let s = c.summary();
    let diag = || format!("summary {s:#}\n{}", c.diag());
    assert!(
        coordinator_line(&c.stderr(back[0]), "left generation 1 at step"),
        "{}",
        diag()
    );
    assert_eq!(s["world_size"].as_u64(), Some(3), "{}", diag());
    assert_eq!(s["restarts"].as_u64(), Some(1), "{}", diag());
    assert_eq!(s["workers_expected"].as_u64(), Some(3), "{}", diag());
    assert_eq!(s["global_batch_size"].as_u64(), Some(48), "{}", diag());
    assert_eq!(s["steps"].as_u64(), Some(ELASTIC_STEPS), "{}", diag());
    let generations = s["generations"].as_array().cloned().unwrap_or_default();
    let ranges: Vec<(u64, u64, u64, u64)> = generations
        .iter()
        .map(|g| {
            let n = |key: &str| g[key].as_u64().unwrap_or(u64::MAX);
            (
                n("generation"),
                n("world_size"),
                n("first_step"),
                n("last_step"),
            )
        })
        .collect();
    eprintln!("generations (generation, world size, first step, last step): {ranges:?}");
    assert_eq!(ranges.len(), 3, "{}", diag());
    let (resumed, regrouped) = (ranges[1].2, ranges[2].2);
    assert!(
        resumed > 0 && resumed.is_multiple_of(20) && resumed <= at,
        "{}",
        diag()
    );
    assert!(
        regrouped > resumed && regrouped < ELASTIC_STEPS,
        "{}",
        diag()
    );
    assert_eq!(
        ranges,
        [
            (0, 3, 0, resumed),
            (1, 2, resumed, regrouped),
            (2, 3, regrouped, ELASTIC_STEPS)
        ],
        "{}",
        diag()
    );
    assert_resumed_from(&c, resumed);
    assert_resumed_from(&c, regrouped);
    assert_metrics_complete(&c, ELASTIC_STEPS);
    let elastic = gan_parameters(&c.run_dir, ELASTIC_STEPS);

    // The control: from the same checkpoint, two workers at their per-worker batch (a global
    // batch of 32, not 48), as a restart that does not keep the global batch trains.
    let control_dir = root.join("control");
    copy_run_with_global_batch(&root.join("reference"), &control_dir, resumed, 32);
    let mut control_args = vec![
        "--resume".to_owned(),
        control_dir.display().to_string(),
        "--workers".into(),
        "2".into(),
        "--set".into(),
        "train.global_batch_size=32".into(),
    ];
    control_args.extend(tiny(ELASTIC_STEPS));
    control_args.extend(ELASTIC_SETTINGS.iter().map(|s| s.to_string()));
    let control = c.spawn("coordinator-control", "coordinator", &control_args, &[]);
    c.assert_exit(control, 0, JOB);
    let unkept = gan_parameters(&control_dir, ELASTIC_STEPS);

    // Float summation order is all that differs between the elastic run and the reference;
    // a different global batch changes the data and the averaged gradients of every step.
    const TOLERANCE: f64 = 1e-5;
    let same = relative_difference(&expected, &elastic);
    let different = relative_difference(&expected, &unkept);
    eprintln!(
        "relative parameter difference: elastic {same:.3e}, global batch not kept {different:.3e}"
    );
    assert!(
        same < TOLERANCE,
        "elastic run differs by {same:e}\n{}",
        c.diag()
    );
    assert!(
        different > 10.0 * TOLERANCE,
        "the control differs by only {different:e}: the tolerance shows nothing\n{}",
        c.diag()
    );
}
