//! Mutual TLS on the gRPC port: a worker with a certificate from the job's CA trains; a worker
//! without one, or trusting another CA, is refused before anything else happens.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, free_port};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA, and a server and a client certificate signed by it, as PEM files in `dir`.
fn make_pki(dir: &Path, prefix: &str) {
    let p = |name: &str| format!("{prefix}{name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gantry-test-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
        ],
    );
    std::fs::write(
        dir.join(p("ext.cnf")),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &p(&format!("{who}.key")),
                "-out",
                &p(&format!("{who}.csr")),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &p(&format!("{who}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p("ext.cnf"),
                "-out",
                &p(&format!("{who}.pem")),
            ],
        );
    }
}

struct Reaper(Vec<Child>);
impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mutual_tls_admits_only_workers_with_the_jobs_certificates() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path(), "");
    make_pki(pki.path(), "other-");
    let run = tempfile::tempdir().unwrap();
    let f = |name: &str| pki.path().join(name).display().to_string();
    let port = free_port();
    let common_args = |cmd: &mut Command| {
        cmd.env("GANTRY__CLUSTER__TOKEN", "tls-test-token")
            .env("GANTRY__CLUSTER__RING_PORT", "0")
            .env("GANTRY__METRICS__ADDR", "127.0.0.1:0")
            .env("GANTRY__METRICS__WORKER_ADDR", "127.0.0.1:0")
            .args([
                "--set",
                "train.steps=6",
                "--set",
                "train.batch_size=8",
                "--set",
                "train.threads=1",
            ])
            .args([
                "--set",
                "samples.every=0",
                "--set",
                "checkpoint.every=0",
                "--set",
                "eval.samples=0",
            ])
            .args([
                "--set",
                "cluster.heartbeat_interval=0.2",
                "--set",
                "cluster.heartbeat_timeout=5",
            ]);
    };

    let mut coordinator = Command::new(binary("coordinator"));
    coordinator
        .args([
            "--expect-workers",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--run-dir", run.path().to_str().unwrap()])
        .env("GANTRY__CLUSTER__TLS_CERT", f("server.pem"))
        .env("GANTRY__CLUSTER__TLS_KEY", f("server.key"))
        .env("GANTRY__CLUSTER__TLS_CA", f("ca.pem"));
    common_args(&mut coordinator);
    let mut children = Reaper(vec![coordinator.spawn().unwrap()]);
    let url = format!("https://127.0.0.1:{port}");

    let worker = |ca: &str, identity: Option<(&str, &str)>| {
        let mut cmd = Command::new(binary("worker"));
        cmd.args(["--coordinator", &url, "--device", "cpu"])
            .env("GANTRY__CLUSTER__TLS_CA", f(ca))
            .env("GANTRY__CLUSTER__TLS_DOMAIN", "localhost")
            .env("GANTRY__CLUSTER__RENDEZVOUS_TIMEOUT", "20")
            .stderr(Stdio::piped());
        if let Some((cert, key)) = identity {
            cmd.env("GANTRY__CLUSTER__TLS_CERT", f(cert))
                .env("GANTRY__CLUSTER__TLS_KEY", f(key));
        }
        common_args(&mut cmd);
        cmd.spawn().unwrap()
    };

    // No client certificate: the handshake fails, the worker cannot join.
    let mut anonymous = worker("ca.pem", None);
    assert!(
        !wait(&mut anonymous, Duration::from_secs(60)).success(),
        "a worker without a client certificate joined"
    );
    // A client certificate from another CA: refused too.
    let mut stranger = worker("ca.pem", Some(("other-client.pem", "other-client.key")));
    assert!(
        !wait(&mut stranger, Duration::from_secs(60)).success(),
        "a worker with a foreign certificate joined"
    );

    // The job's own certificate: the job runs to the end.
    let mut member = worker("ca.pem", Some(("client.pem", "client.key")));
    assert!(
        wait(&mut member, Duration::from_secs(120)).success(),
        "the certified worker failed"
    );
    let status = wait(&mut children.0[0], Duration::from_secs(60));
    assert!(status.success(), "coordinator: {status}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 6);
}
