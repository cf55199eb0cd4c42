//! Observability checked with the real tools: `promtool` on the scrape configs and rules
//! (with unit tests for every alert), `tsc --strict` on the Grafana dashboards against
//! @grafana/schema, and a live `coordinator --workers 2` scraped by a real Prometheus on
//! loopback, which must return data for every dashboard query and every recording rule, while
//! `promtool check metrics` lints both expositions and headless Chromium loads the status page
//! and draws its charts from the job's history.
//!
//! The tools come from scripts/install-observability-tools.sh (Debian's prometheus and
//! chromium, pinned npm packages), which the tests run first. Every wait has a deadline — a
//! liveness guard, not a timing assertion — and every process started is killed when the test
//! ends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{binary, describe, free_port, repo_root, run};
use serde_json::Value;

/// Installs prometheus, chromium and the dashboard type-checker once per test process.
fn install_tools() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let script = repo_root().join("scripts/install-observability-tools.sh");
        let output = run(&mut Command::new(&script));
        assert!(
            output.status.success(),
            "{}",
            describe("scripts/install-observability-tools.sh", &output)
        );
    });
}

fn prometheus_dir() -> PathBuf {
    repo_root().join("deploy/prometheus")
}

#[test]
fn promtool_accepts_the_scrape_configs_and_rules_and_every_alert_is_unit_tested() {
    install_tools();
    let dir = prometheus_dir();
    for config in ["prometheus.yml", "prometheus-kubernetes.yml"] {
        let output = run(Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join(config)));
        assert!(output.status.success(), "{}", describe(config, &output));
    }
    let rules = dir.join("rules/gantry.rules.yml");
    let output = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules));
    assert!(
        output.status.success(),
        "{}",
        describe("check rules", &output)
    );
    let output = run(Command::new("promtool")
        .args(["test", "rules", "tests/gantry.test.yml"])
        .current_dir(&dir));
    assert!(
        output.status.success(),
        "{}",
        describe("test rules", &output)
    );

    // Every alert has unit tests: at least one case where it fires.
    let tests = fs::read_to_string(dir.join("tests/gantry.test.yml")).unwrap();
    let alerts = rule_names(&fs::read_to_string(&rules).unwrap(), "- alert:");
    assert!(alerts.len() >= 7, "{alerts:?}");
    for alert in &alerts {
        let firing_case = tests.split("alertname: ").skip(1).any(|case| {
            case.starts_with(alert.as_str())
                && case
                    .split("alertname: ")
                    .next()
                    .is_some_and(|c| c.contains("exp_labels"))
        });
        assert!(firing_case, "no test case where {alert} fires");
    }
}

#[test]
fn dashboards_type_check_against_grafana_schema() {
    install_tools();
    let script = repo_root().join("scripts/typecheck-dashboards.sh");
    let output = run(&mut Command::new(&script));
    assert!(
        output.status.success(),
        "{}",
        describe("typecheck", &output)
    );

    // The check has teeth: a misspelt field in a copy of a dashboard fails it.
    let broken = tempfile::tempdir().unwrap();
    let dashboard =
        fs::read_to_string(repo_root().join("deploy/grafana/dashboards/gantry-training.json"))
            .unwrap();
    let misspelt = dashboard.replacen("\"gridPos\"", "\"gridPosition\"", 1);
    assert_ne!(misspelt, dashboard);
    fs::write(broken.path().join("broken.json"), misspelt).unwrap();
    let work = tempfile::tempdir().unwrap();
    let output = run(Command::new(&script)
        .arg(work.path())
        .env("GANTRY_DASHBOARDS_DIR", broken.path()));
    assert!(
        !output.status.success(),
        "a misspelt field must not type-check"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("gridPosition"), "{stdout}");
}

/// The names after `marker` (`- record:` or `- alert:`) in a rules file.
fn rule_names(rules: &str, marker: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix(marker))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Every PromQL expression of every dashboard panel, with the dashboard variables replaced
/// as Grafana would for "all runs".
fn dashboard_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let dir = repo_root().join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let dashboard: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut panels: Vec<&Value> = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            panels.push(panel);
            panels.extend(panel["panels"].as_array().into_iter().flatten());
        }
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                let expr = expr
                    .replace("$run_id", ".*")
                    .replace("$__rate_interval", "20s");
                queries.push((format!("{name}: {}", panel["title"]), expr));
            }
        }
    }
    assert!(queries.len() >= 30, "only {} queries", queries.len());
    queries
}

/// A process killed with its process group when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        // SAFETY: kill(2) has no memory effects; the group is our child's.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// `GET path` over HTTP/1.0 (no chunked replies): (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[split + 4..].to_vec()))
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result vector of an instant query (empty on errors, which the caller reports).
fn query(prometheus: &str, promql: &str) -> Result<Vec<Value>, String> {
    let (status, body) = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", encode(promql)),
    )
    .ok_or("no answer")?;
    let reply: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if status != 200 || reply["status"] != "success" {
        return Err(format!("HTTP {status}: {reply}"));
    }
    Ok(reply["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Waits for the coordinator's "status page on http://ADDR/" line and returns ADDR.
fn coordinator_http_addr(stderr: &Path, deadline: Instant) -> String {
    loop {
        let text = fs::read_to_string(stderr).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| {
            l.split("status page on http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
        }) {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator never reported its HTTP address:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn promtool_check_metrics(what: &str, exposition: &[u8]) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(exposition).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "{}",
        describe(&format!("promtool check metrics ({what})"), &output)
    );
}

#[test]
fn a_live_job_feeds_every_dashboard_query_and_the_status_page() {
    install_tools();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let run_dir = root.join("run");
    let coordinator_err = root.join("coordinator.err");
    let mut coordinator = Command::new(binary("coordinator"));
    coordinator
        .args([
            "--workers",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
            "--run-dir",
        ])
        .arg(&run_dir);
    for set in [
        // Long enough that the test, not the job, decides when it ends.
        "train.steps=100000",
        "train.batch_size=16",
        "train.threads=1",
        "train.log_every=2",
        "samples.every=10",
        "checkpoint.every=15",
        "checkpoint.keep=2",
        "eval.every=30",
        "eval.samples=100",
        "cluster.heartbeat_interval=0.25",
    ] {
        coordinator.args(["--set", set]);
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("GANTRY") {
            coordinator.env_remove(key);
        }
    }
    let _coordinator = Guard(
        coordinator
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&coordinator_err).unwrap())
            .process_group(0)
            .spawn()
            .expect("start the coordinator"),
    );
    let job = coordinator_http_addr(&coordinator_err, Instant::now() + Duration::from_secs(120));

    // A real Prometheus scraping the coordinator, and the workers it lists at /sd/workers.
    let prometheus_addr = format!("127.0.0.1:{}", free_port());
    let config = root.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: gantry-coordinator\n\
             \x20   static_configs:\n\
             \x20     - targets: [\"{job}\"]\n\
             \x20 - job_name: gantry-workers\n\
             \x20   http_sd_configs:\n\
             \x20     - url: http://{job}/sd/workers\n\
             \x20       refresh_interval: 1s\n",
            rules = prometheus_dir().join("rules/gantry.rules.yml").display(),
        ),
    )
    .unwrap();
    let prometheus_log = root.join("prometheus.log");
    let _prometheus = Guard(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                root.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&prometheus_log).unwrap())
            .process_group(0)
            .spawn()
            .expect("start prometheus"),
    );
    let diagnostics = || {
        let mut text = String::new();
        for file in [&coordinator_err, &prometheus_log] {
            text += &format!(
                "--- {} ---\n{}\n",
                file.display(),
                fs::read_to_string(file).unwrap_or_default()
            );
        }
        for entry in fs::read_dir(run_dir.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            text += &format!(
                "--- {} ---\n{}\n",
                entry.path().display(),
                fs::read_to_string(entry.path()).unwrap_or_default()
            );
        }
        text
    };

    // Every dashboard query and every recording rule must return data through Prometheus.
    let mut pending: Vec<(String, String)> = dashboard_queries();
    let rules = fs::read_to_string(prometheus_dir().join("rules/gantry.rules.yml")).unwrap();
    let records = rule_names(&rules, "- record:");
    assert!(records.len() >= 4, "{records:?}");
    pending.extend(
        records
            .iter()
            .map(|r| (format!("recording rule {r}"), r.clone())),
    );
    // The workers' own series arrive through service discovery.
    pending.push((
        "worker targets".into(),
        "up{job=\"gantry-workers\"} == 1".into(),
    ));
    let total = pending.len();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last_errors: Vec<String> = Vec::new();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            panic!(
                "{} of {total} queries never returned data:\n{}\n{}",
                pending.len(),
                last_errors.join("\n"),
                diagnostics()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
        last_errors.clear();
        pending.retain(|(what, promql)| match query(&prometheus_addr, promql) {
            Ok(result) if !result.is_empty() => false,
            Ok(_) => {
                last_errors.push(format!("{what}: `{promql}` returned no series"));
                true
            }
            Err(e) => {
                last_errors.push(format!("{what}: `{promql}`: {e}"));
                true
            }
        });
    }

    // The expositions pass Prometheus' own linter.
    let (status, exposition) = http_get(&job, "/metrics").expect("coordinator /metrics");
    assert_eq!(status, 200);
    promtool_check_metrics("coordinator", &exposition);
    let (_, targets) = http_get(&job, "/sd/workers").expect("/sd/workers");
    let targets: Value = serde_json::from_slice(&targets).unwrap();
    let workers: BTreeSet<String> = targets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["targets"][0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(workers.len(), 2, "{targets}");
    for worker in &workers {
        let (status, exposition) = http_get(worker, "/metrics").expect("worker /metrics");
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&exposition);
        assert!(text.contains("gantry_train_steps_total{"), "{text}");
        promtool_check_metrics(&format!("worker {worker}"), &exposition);
    }

    check_status_page(&job, root, &diagnostics);
    check_status_page_charts(&job, &coordinator_err, &run_dir, root, &diagnostics);
}

/// Loads the status page in headless Chromium after its scripts ran and checks that it shows
/// the job's numbers and the newest sample grid, and takes a screenshot.
fn check_status_page(job: &str, root: &Path, diagnostics: &dyn Fn() -> String) {
    let (status, png) = http_get(job, "/samples/latest.png").expect("sample grid");
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let chromium = |extra: &[String]| {
        let output = run(Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--virtual-time-budget=8000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                root.join("chromium").display()
            ))
            .args(extra)
            .arg(format!("http://{job}/")));
        assert!(
            output.status.success(),
            "{}\n{}",
            describe("chromium", &output),
            diagnostics()
        );
        output
    };
    let dom = String::from_utf8(chromium(&["--dump-dom".into()]).stdout).unwrap();
    let text_of = |id: &str| -> String {
        let start = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
        let rest = &dom[start..];
        let open = rest.find('>').unwrap() + 1;
        let close = rest.find('<').unwrap();
        rest[open..close].to_owned()
    };
    let step: u64 = text_of("step")
        .parse()
        .unwrap_or_else(|_| panic!("step is not a number:\n{dom}"));
    assert!(step > 0, "step {step}");
    assert_eq!(text_of("phase"), "training");
    assert_eq!(text_of("total_steps"), "100000");
    assert_eq!(text_of("workers_alive"), "2");
    for figure in ["d_loss", "g_loss", "d_real", "d_fake", "fid"] {
        let value = text_of(figure);
        assert!(value.parse::<f64>().is_ok(), "#{figure} shows {value:?}");
    }
    // The page's script refreshed it from /api/status and rendered both ranks.
    assert!(
        dom.contains("data-refreshes=\"") && !dom.contains("data-refreshes=\"0\""),
        "the page never refreshed itself:\n{dom}"
    );
    let workers_table = dom
        .split("id=\"workers\">")
        .nth(1)
        .and_then(|rest| rest.split("</tbody>").next())
        .unwrap_or_default();
    assert_eq!(workers_table.matches("<tr>").count(), 2, "{dom}");
    // The grid loaded: 8 × 8 digits of 28 px with 2 px gaps and margins = 484 px.
    assert!(
        dom.contains("data-loaded=\"true\"") && dom.contains("data-width=\"484\""),
        "the sample grid did not load:\n{dom}"
    );

    let screenshot = screenshot_path();
    chromium(&[format!("--screenshot={}", screenshot.display())]);
    let bytes = fs::read(&screenshot).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG"), "screenshot is not a PNG");
    eprintln!("status page screenshot: {}", screenshot.display());
}

/// target/observability/status-page.png, kept for people to look at.
fn screenshot_path() -> PathBuf {
    let dir = common::profile_dir()
        .parent()
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("observability");
    fs::create_dir_all(&dir).unwrap();
    dir.join("status-page.png")
}

/// The coordinator's gRPC URL, from its "gRPC on ADDR," start line.
fn coordinator_grpc_url(stderr: &Path) -> String {
    let text = fs::read_to_string(stderr).unwrap_or_default();
    let addr = text
        .lines()
        .find_map(|l| l.split("gRPC on ").nth(1)?.split(',').next())
        .unwrap_or_else(|| panic!("the coordinator never reported its gRPC address:\n{text}"));
    format!("http://{addr}")
}

/// What one line of a status-page chart drew, or what `/api/history` serves for it.
#[derive(Debug, Clone, PartialEq)]
struct ChartLine {
    points: usize,
    first_step: u64,
    last_step: u64,
    spacing: u64,
}

/// Every chart line in a dumped page, by its series ("statistics/d_loss",
/// "images_per_second/0", "quality/fid"), counted from the vertices it drew.
fn drawn_lines(dom: &str) -> BTreeMap<String, ChartLine> {
    let mut lines = BTreeMap::new();
    let charts = dom
        .split("id=\"charts\"")
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_else(|| panic!("no #charts in the page:\n{dom}"));
    for rest in charts.split("<polyline").skip(1) {
        let tag = &rest[..rest.find('>').expect("a closed <polyline> tag")];
        let attr = |name: &str| -> &str {
            let start = tag
                .find(&format!(" {name}=\""))
                .unwrap_or_else(|| panic!("no {name} in <polyline{tag}>"))
                + name.len()
                + 3;
            &tag[start..start + tag[start..].find('"').unwrap()]
        };
        let number = |name: &str| -> u64 {
            attr(name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} of <polyline{tag}>"))
        };
        let xs: Vec<f64> = attr("points")
            .split_whitespace()
            .map(|xy| xy.split(',').next().unwrap().parse().unwrap())
            .collect();
        // Drawn left to right in step order, with as many vertices as it says.
        assert!(xs.windows(2).all(|w| w[0] <= w[1]), "<polyline{tag}>");
        assert_eq!(xs.len() as u64, number("data-points"), "<polyline{tag}>");
        let line = ChartLine {
            points: xs.len(),
            first_step: number("data-first-step"),
            last_step: number("data-last-step"),
            spacing: number("data-spacing"),
        };
        lines.insert(attr("data-series").to_owned(), line);
    }
    lines
}

/// The lines `/api/history` describes, named as the page names them.
fn served_lines(history: &Value) -> BTreeMap<String, ChartLine> {
    let mut lines = BTreeMap::new();
    for group in ["statistics", "images_per_second", "quality"] {
        for series in history[group].as_array().into_iter().flatten() {
            let id = match &series["name"] {
                Value::String(name) => name.clone(),
                _ => series["rank"].to_string(),
            };
            let points = series["points"].as_array().unwrap();
            let step = |i: usize| points[i][0].as_u64().unwrap();
            lines.insert(
                format!("{group}/{id}"),
                ChartLine {
                    points: points.len(),
                    first_step: step(0),
                    last_step: step(points.len() - 1),
                    spacing: series["spacing"].as_u64().unwrap(),
                },
            );
        }
    }
    lines
}

/// Headless Chromium on the status page, after its scripts ran for 8 s of virtual time.
fn status_page_in_chromium(
    job: &str,
    profile: &Path,
    extra: &[String],
    diagnostics: &dyn Fn() -> String,
) -> Vec<u8> {
    let output = run(Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1400,1500",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("http://{job}/")));
    assert!(
        output.status.success(),
        "{}\n{}",
        describe("chromium", &output),
        diagnostics()
    );
    output.stdout
}

/// The status page's charts draw the live job's history: every figure's line is there, it
/// grows while the job trains, and once the job is paused (so that the history holds still)
/// the page draws exactly the points `/api/history` serves. Takes a screenshot of them.
fn check_status_page_charts(
    job: &str,
    coordinator_err: &Path,
    run_dir: &Path,
    root: &Path,
    diagnostics: &dyn Fn() -> String,
) {
    let profile = root.join("chromium-charts");
    let dump = || {
        let dom = status_page_in_chromium(job, &profile, &["--dump-dom".into()], diagnostics);
        String::from_utf8(dom).unwrap()
    };
    let history = || -> Value {
        let (status, body) = http_get(job, "/api/history").expect("/api/history");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let training = [
        "statistics/d_loss",
        "statistics/g_loss",
        "statistics/d_real",
        "statistics/d_fake",
        "images_per_second/0",
        "images_per_second/1",
    ];
    let quality = [
        "quality/fid",
        "quality/inception_score",
        "quality/classes_covered",
    ];

    let dom = dump();
    let before = drawn_lines(&dom);
    for series in training.iter().chain(&quality) {
        let drawn = before
            .get(*series)
            .unwrap_or_else(|| panic!("no chart line for {series}:\n{dom}"));
        assert!(drawn.points > 0, "{series}: {drawn:?}");
    }
    let total: usize = before.values().map(|l| l.points).sum();
    let charts_tag = dom
        .split("id=\"charts\"")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .unwrap_or_else(|| panic!("no #charts in the page:\n{dom}"));
    assert!(
        charts_tag.contains(&format!(" data-points=\"{total}\"")),
        "#charts{charts_tag} does not count its lines' {total} points"
    );

    // Let it train, then pause it. A rank that already began its next step waits there in
    // the all-reduce for the paused ones, so no step completes and the history holds still
    // once the newest figures are in.
    std::thread::sleep(Duration::from_secs(5));
    let token_file = run_dir.join("operator-token");
    let output = run(Command::new(binary("coordinator"))
        .args(["pause", "--addr", &coordinator_grpc_url(coordinator_err)])
        .arg("--token-file")
        .arg(&token_file)
        .env_remove("GANTRY__CLUSTER__OPERATOR_TOKEN"));
    assert!(
        output.status.success(),
        "{}",
        describe("coordinator pause", &output)
    );
    let status = || -> Value {
        let (_, body) = http_get(job, "/api/status").expect("/api/status");
        serde_json::from_slice(&body).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let served = loop {
        let (status_before, first) = (status(), history());
        std::thread::sleep(Duration::from_secs(2));
        let (status_now, second) = (status(), history());
        let paused = status_now["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["state"] == "paused"));
        if paused && status_now["step"] == status_before["step"] && first == second {
            break second;
        }
        assert!(
            Instant::now() < deadline,
            "the paused job's history never held still:\n{status_now}\n{}",
            diagnostics()
        );
    };
    let dom = dump();
    assert_eq!(
        history(),
        served,
        "the history changed while the job was paused"
    );
    let after = drawn_lines(&dom);
    assert_eq!(
        after,
        served_lines(&served),
        "the charts do not draw what /api/history serves:\n{dom}"
    );
    // Training went on between the two pages: every training line reaches further, with more
    // points unless it was decimated in between (then its spacing grew).
    for series in training {
        let (was, is) = (&before[series], &after[series]);
        assert!(
            is.last_step > was.last_step,
            "{series}: {was:?} then {is:?}"
        );
        assert!(
            is.points > was.points || is.spacing > was.spacing,
            "{series}: {was:?} then {is:?}"
        );
    }

    let screenshot = screenshot_path().with_file_name("status-page-charts.png");
    status_page_in_chromium(
        job,
        &profile,
        &[format!("--screenshot={}", screenshot.display())],
        diagnostics,
    );
    let bytes = fs::read(&screenshot).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG"), "screenshot is not a PNG");
    eprintln!("status page charts screenshot: {}", screenshot.display());
}
