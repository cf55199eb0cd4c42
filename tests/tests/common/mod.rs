//! Helpers shared by the repository-level tests: the repository root, the pinned deployment
//! tools (scripts/install-test-tools.sh) and rendered kustomize overlays as JSON.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub mod cluster;
pub mod netns;
pub mod pods;

/// The repository root (this package lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the repository root")
        .to_path_buf()
}

/// The virtual environment scripts/install-test-tools.sh fills (`GANTRY_TOOLS_VENV` overrides).
pub fn tools_venv() -> PathBuf {
    std::env::var_os("GANTRY_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache").join("tools-venv"))
}

/// Runs a command and returns its output, panicking with a clear message if it can't start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"))
}

/// Formats a finished command's output for an assertion message.
pub fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Installs the pinned validation tools once per test process (idempotent script; the first run
/// needs PyPI).
pub fn install_tools() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let script = repo_root().join("scripts").join("install-test-tools.sh");
        let output = run(Command::new(&script).arg(tools_venv()));
        assert!(
            output.status.success(),
            "{}",
            describe("scripts/install-test-tools.sh", &output)
        );
    });
}

/// Renders `k8s/overlays/<overlay>` with the pinned kubectl and returns its objects as a JSON
/// array (YAML -> JSON through the venv's PyYAML).
pub fn render_overlay(overlay: &str) -> Vec<Value> {
    render_kustomization(&repo_root().join("k8s").join("overlays").join(overlay))
}

/// `kubectl kustomize DIR` with the pinned kubectl: the rendered YAML stream.
pub fn kustomize(dir: &Path) -> Vec<u8> {
    install_tools();
    let rendered = run(Command::new(tools_venv().join("bin").join("kubectl"))
        .arg("kustomize")
        .arg(dir));
    assert!(
        rendered.status.success(),
        "{}",
        describe(&format!("kubectl kustomize {}", dir.display()), &rendered)
    );
    rendered.stdout
}

/// Renders the kustomization in `dir` and returns its objects as a JSON array (YAML -> JSON
/// through the venv's PyYAML).
pub fn render_kustomization(dir: &Path) -> Vec<Value> {
    let rendered = kustomize(dir);
    let venv = tools_venv();
    let yaml_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(yaml_file.path(), &rendered).expect("write rendered YAML");
    let converted = run(Command::new(venv.join("bin").join("python"))
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
         print(json.dumps(docs))",
        )
        .arg(yaml_file.path()));
    assert!(
        converted.status.success(),
        "{}",
        describe("YAML to JSON", &converted)
    );
    match serde_json::from_slice(&converted.stdout).expect("rendered objects are JSON") {
        Value::Array(objects) => objects,
        other => panic!("expected a list of objects, got {other}"),
    }
}

/// The one object of `kind` named `name`.
pub fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}/{name}, found {}",
        found.len()
    );
    found[0]
}

/// The container named `name` of a Deployment's or Job's pod template.
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

/// Every container (and init container) of every pod template, with a label for messages.
pub fn all_containers(objects: &[Value]) -> Vec<(String, &Value)> {
    let mut found = Vec::new();
    for object in objects {
        let spec = &object["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                let label = format!(
                    "{}/{} {}",
                    object["kind"], object["metadata"]["name"], c["name"]
                );
                found.push((label.replace('"', ""), c));
            }
        }
    }
    found
}

/// The value of the coordinator's `--expect-workers` argument.
pub fn expect_workers(coordinator_container: &Value) -> String {
    let args: Vec<&str> = coordinator_container["args"]
        .as_array()
        .expect("coordinator args")
        .iter()
        .map(|a| a.as_str().expect("args are strings"))
        .collect();
    if let Some(value) = args
        .iter()
        .find_map(|a| a.strip_prefix("--expect-workers="))
    {
        return value.to_string();
    }
    let at = args
        .iter()
        .position(|a| *a == "--expect-workers")
        .expect("--expect-workers");
    args[at + 1].to_string()
}

/// `target/<profile>/`: this test binary lives in its `deps/`. `GANTRY_TEST_BIN_DIR`
/// points elsewhere (binaries built in another target directory).
pub fn profile_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GANTRY_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The `coordinator` or `worker` binary of this profile. `cargo test` builds only test
/// targets, so the binaries are (re)built once per test process: a stale binary from an
/// earlier build would otherwise be tested instead of the source. Skipped when
/// `GANTRY_TEST_BIN_DIR` names prebuilt binaries.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = profile_dir();
    if std::env::var_os("GANTRY_TEST_BIN_DIR").is_none() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--bin", "coordinator", "--bin", "worker"])
                .current_dir(repo_root());
            if dir.file_name().is_some_and(|p| p == "release") {
                build.arg("--release");
            }
            let output = run(&mut build);
            assert!(
                output.status.success(),
                "{}",
                describe("cargo build --bin coordinator --bin worker", &output)
            );
        });
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} missing", path.display());
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
