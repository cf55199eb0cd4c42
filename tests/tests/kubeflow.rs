//! The Kubeflow Trainer variant (k8s/kubeflow): its rendering parses strictly with the
//! Trainer's own API models (PyPI `kubeflow-trainer-api`, through k8s/kubeflow/validate.py),
//! the JobSet a TrainJob becomes runs the plain overlays' coordinator and workers, and that
//! JobSet trains to completion as local processes (the harness of tests/tests/k8s_e2e.rs).
//!
//! No Trainer controller runs here, so the JobSet is derived from the ClusterTrainingRuntime
//! and the TrainJob as the controller derives it (pkg/runtime/core/trainingruntime.go and the
//! jobset/plainml plugins of Kubeflow Trainer v2.3): the TrainJob's runtimePatches are merged
//! into the runtime's template, its `trainer` applies to the replicated job labelled
//! `trainer.kubeflow.org/trainjob-ancestor-step: trainer` (numNodes into that Job's parallelism
//! and completions; image, command and args replace the `node` container's; env is upserted by
//! name; resourcesPerNode overrides the resources key by key), and JobSet puts its name label
//! and the coordinator's endpoint annotation on every pod. A TrainJob field outside what this
//! emulation knows is a test failure, never silently ignored.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use common::pods::{
    HANG_GUARD, Kubelet, SIZING, expand, failed_workers, local_config, reap, spawn, wait,
};
use common::{
    container, describe, free_port, kustomize, object, render_kustomization, render_overlay,
    repo_root, run, tools_venv,
};
use serde_json::{Value, json};

const ANCESTOR: &str = "trainer.kubeflow.org/trainjob-ancestor-step";
const JOBSET_NAME_FIELD: &str = "metadata.labels['jobset.sigs.k8s.io/jobset-name']";
const COORDINATOR_FIELD: &str = "metadata.annotations['jobset.sigs.k8s.io/coordinator']";
/// The worker env that differs from the plain overlays by design: the coordinator's address
/// (a JobSet pod DNS name instead of the Service) and the run directory (one per TrainJob).
const KUBEFLOW_WORKER_ENV: [&str; 4] = [
    "GANTRY_COORDINATOR_HOST",
    "GANTRY_COORDINATOR",
    "GANTRY_JOB_NAME",
    "GANTRY__RUN__DIR",
];
/// Likewise for the coordinator: the run directory and --expect-workers' source.
const KUBEFLOW_COORDINATOR_ENV: [&str; 3] = [
    "GANTRY_JOB_NAME",
    "GANTRY__RUN__DIR",
    "GANTRY_EXPECT_WORKERS",
];

fn kubeflow_dir() -> std::path::PathBuf {
    repo_root().join("k8s").join("kubeflow")
}

/// k8s/kubeflow/validate.py on a file of rendered objects (YAML or a JSON list).
fn validate_models(file: &Path) -> Output {
    run(Command::new(tools_venv().join("bin").join("python"))
        .arg(kubeflow_dir().join("validate.py"))
        .arg(file))
}

/// Panics unless every key of `value` is in `known`: the emulation below would miss it.
fn only(value: &Value, known: &[&str], what: &str) {
    for key in value.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            known.contains(&key.as_str()),
            "{what}.{key}: not modelled by this test's Trainer emulation"
        );
    }
}

fn array_mut<'a>(value: &'a mut Value, what: &str) -> &'a mut Vec<Value> {
    value
        .as_array_mut()
        .unwrap_or_else(|| panic!("{what} is a list"))
}

fn named_mut<'a>(list: &'a mut Value, name: &str, what: &str) -> &'a mut Value {
    array_mut(list, what)
        .iter_mut()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("{what}: no entry named {name}"))
}

fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    list.as_array()
        .and_then(|items| items.iter().find(|item| item["name"] == name))
        .unwrap_or_else(|| panic!("{what}: no entry named {name}"))
}

/// Trainer's apply.UpsertEnvVars: replace the variable of that name, or append it.
fn upsert_env(env: &mut Value, vars: &Value) {
    if env.is_null() {
        *env = json!([]);
    }
    let env = array_mut(env, "env");
    for var in vars.as_array().into_iter().flatten() {
        match env.iter_mut().find(|v| v["name"] == var["name"]) {
            Some(existing) => *existing = var.clone(),
            None => env.push(var.clone()),
        }
    }
}

fn pod_spec_mut<'a>(spec: &'a mut Value, rjob: &str) -> &'a mut Value {
    let rjob = named_mut(&mut spec["replicatedJobs"], rjob, "replicatedJobs");
    &mut rjob["template"]["spec"]["template"]["spec"]
}

/// The JobSet spec a TrainJob on `runtime` becomes (see the module comment).
fn jobset_spec(runtime: &Value, trainjob: &Value) -> Value {
    let mut spec = runtime["spec"]["template"]["spec"].clone();
    only(
        &trainjob["spec"],
        &["runtimeRef", "trainer", "runtimePatches"],
        "TrainJob.spec",
    );

    for patch in trainjob["spec"]["runtimePatches"]
        .as_array()
        .into_iter()
        .flatten()
    {
        only(
            patch,
            &["manager", "trainingRuntimeSpec"],
            "runtimePatches[]",
        );
        only(
            &patch["trainingRuntimeSpec"],
            &["template"],
            "trainingRuntimeSpec",
        );
        only(
            &patch["trainingRuntimeSpec"]["template"],
            &["spec"],
            "template",
        );
        let rjobs = &patch["trainingRuntimeSpec"]["template"]["spec"];
        only(rjobs, &["replicatedJobs"], "template.spec");
        for rjob in rjobs["replicatedJobs"].as_array().into_iter().flatten() {
            let name = rjob["name"].as_str().expect("replicatedJobs[].name");
            only(rjob, &["name", "template"], "replicatedJobs[]");
            let pod = &rjob["template"]["spec"]["template"]["spec"];
            only(
                pod,
                &["containers"],
                "replicatedJobs[].template.spec.template.spec",
            );
            for patched in pod["containers"].as_array().into_iter().flatten() {
                only(patched, &["name", "env"], "containers[]");
                let cname = patched["name"].as_str().expect("containers[].name");
                assert_ne!(cname, "node", "the Trainer refuses env patches of `node`");
                let target = named_mut(
                    &mut pod_spec_mut(&mut spec, name)["containers"],
                    cname,
                    "containers",
                );
                upsert_env(&mut target["env"], &patched["env"]);
            }
        }
    }

    let trainer = &trainjob["spec"]["trainer"];
    only(
        trainer,
        &[
            "numNodes",
            "image",
            "command",
            "args",
            "env",
            "resourcesPerNode",
        ],
        "trainer",
    );
    let nodes = trainer["numNodes"]
        .as_u64()
        .or(runtime["spec"]["mlPolicy"]["numNodes"].as_u64())
        .unwrap_or(1);
    let mut trainer_jobs = 0;
    for rjob in array_mut(&mut spec["replicatedJobs"], "replicatedJobs") {
        if rjob["template"]["metadata"]["labels"][ANCESTOR] != "trainer" {
            continue;
        }
        trainer_jobs += 1;
        rjob["replicas"] = json!(1);
        let job = &mut rjob["template"]["spec"];
        job["parallelism"] = json!(nodes);
        job["completions"] = json!(nodes);
        let node = named_mut(
            &mut job["template"]["spec"]["containers"],
            "node",
            "the trainer job's containers",
        );
        for field in ["image", "command", "args"] {
            if !trainer[field].is_null() {
                node[field] = trainer[field].clone();
            }
        }
        upsert_env(&mut node["env"], &trainer["env"]);
        for bound in ["requests", "limits"] {
            for (resource, quantity) in trainer["resourcesPerNode"][bound]
                .as_object()
                .into_iter()
                .flatten()
            {
                node["resources"][bound][resource] = quantity.clone();
            }
        }
    }
    assert_eq!(trainer_jobs, 1, "one replicated job is the trainer's");
    spec
}

/// The downward API's view of a JobSet pod: JobSet's name label and, with spec.coordinator,
/// the coordinator's endpoint `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>`.
fn pod_fields(jobset: &str, spec: &Value) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::from([(JOBSET_NAME_FIELD.to_string(), jobset.to_string())]);
    let coordinator = &spec["coordinator"];
    if let Some(rjob) = coordinator["replicatedJob"].as_str() {
        let subdomain = spec["network"]["subdomain"].as_str().unwrap_or(jobset);
        fields.insert(
            COORDINATOR_FIELD.to_string(),
            format!(
                "{jobset}-{rjob}-{}-{}.{subdomain}",
                coordinator["jobIndex"].as_u64().unwrap_or(0),
                coordinator["podIndex"].as_u64().unwrap_or(0)
            ),
        );
    }
    fields
}

fn pod_template<'a>(spec: &'a Value, rjob: &str) -> &'a Value {
    &named(&spec["replicatedJobs"], rjob, "replicatedJobs")["template"]["spec"]["template"]
}

fn pod_container<'a>(spec: &'a Value, rjob: &str, name: &str) -> &'a Value {
    named(
        &pod_template(spec, rjob)["spec"]["containers"],
        name,
        "containers",
    )
}

/// The rendering, its runtime and TrainJob, and the JobSet that TrainJob becomes.
struct Kubeflow {
    objects: Vec<Value>,
    trainjob: String,
    nodes: usize,
    spec: Value,
}

fn kubeflow() -> Kubeflow {
    let objects = render_kustomization(&kubeflow_dir());
    let trainjobs: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "TrainJob").collect();
    assert_eq!(trainjobs.len(), 1, "one example TrainJob");
    let trainjob = trainjobs[0];
    let reference = &trainjob["spec"]["runtimeRef"];
    assert_eq!(reference["kind"], "ClusterTrainingRuntime");
    let runtime = object(
        &objects,
        "ClusterTrainingRuntime",
        reference["name"].as_str().expect("runtimeRef.name"),
    );
    assert_eq!(
        runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"], "gantry",
        "the runtime's framework label"
    );
    let spec = jobset_spec(runtime, trainjob);
    let nodes = trainjob["spec"]["trainer"]["numNodes"]
        .as_u64()
        .expect("the example TrainJob sets numNodes") as usize;
    Kubeflow {
        trainjob: trainjob["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string(),
        objects,
        nodes,
        spec,
    }
}

/// name -> env entry, with a resourceFieldRef to the container itself written as `<self>`
/// (the plain overlays' worker container is `worker`, the runtime's is `node`).
fn env_entries(c: &Value) -> BTreeMap<String, Value> {
    let own = c["name"].clone();
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let mut var = var.clone();
            let target = &mut var["valueFrom"]["resourceFieldRef"]["containerName"];
            if *target == own {
                *target = json!("<self>");
            }
            if var["valueFrom"].as_object().is_some_and(|o| o.is_empty()) {
                var.as_object_mut().expect("env entry").remove("valueFrom");
            }
            (var["name"].as_str().expect("env name").to_string(), var)
        })
        .collect()
}

/// The env of `ours` and `theirs` agree on every name outside `except`.
fn assert_same_env(ours: &Value, theirs: &Value, except: &[&str], what: &str) {
    let mut ours = env_entries(ours);
    let mut theirs = env_entries(theirs);
    for name in except {
        ours.remove(*name);
        theirs.remove(*name);
    }
    assert_eq!(ours, theirs, "{what}: env");
}

/// `ours` and `theirs` agree on each of `fields`; lists of named entries (mounts, ports) in
/// any order, as Kubernetes reads them (a strategic merge may reorder them).
fn assert_same_fields(ours: &Value, theirs: &Value, fields: &[&str], what: &str) {
    fn by_name(value: &Value) -> Value {
        match value.as_array() {
            Some(items) if items.iter().all(|i| i["name"].is_string()) => {
                let mut items = items.clone();
                items.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                Value::Array(items)
            }
            _ => value.clone(),
        }
    }
    for field in fields {
        assert_eq!(
            by_name(&ours[field]),
            by_name(&theirs[field]),
            "{what}: {field}"
        );
    }
}

fn value_of(env: &BTreeMap<String, String>, name: &str) -> String {
    env.get(name)
        .unwrap_or_else(|| panic!("{name} is not set"))
        .clone()
}

#[test]
fn rendering_parses_strictly_with_the_trainer_api_models() {
    let rendered = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(rendered.path(), kustomize(&kubeflow_dir())).expect("write rendering");
    let output = validate_models(rendered.path());
    assert!(
        output.status.success(),
        "{}",
        describe("k8s/kubeflow/validate.py", &output)
    );
    // Every rendered object was checked, each by name.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let objects = render_kustomization(&kubeflow_dir());
    for o in &objects {
        let line = format!(
            "ok {}/{}:",
            o["kind"].as_str().expect("kind"),
            o["metadata"]["name"].as_str().expect("name")
        );
        assert!(stdout.contains(&line), "{line} missing from:\n{stdout}");
    }
    for line in [
        "ok ClusterTrainingRuntime/gantry: TrainerV1alpha1ClusterTrainingRuntime (strict)",
        "ok TrainJob/gantry-mnist: TrainerV1alpha1TrainJob (strict)",
    ] {
        assert!(stdout.contains(line), "{line} missing from:\n{stdout}");
    }
}

/// A check that passes everything is no check: unknown fields (also deep in the pod template,
/// and fields under their Python names), wrong types and unknown kinds are each reported with
/// the object and the field.
#[test]
fn strict_parsing_names_the_object_and_the_field() {
    let mut objects = render_kustomization(&kubeflow_dir());
    for o in objects.iter_mut() {
        match o["kind"].as_str() {
            Some("ClusterTrainingRuntime") => {
                let spec = &mut o["spec"]["template"]["spec"];
                let node = named_mut(
                    &mut pod_spec_mut(spec, "node")["containers"],
                    "node",
                    "containers",
                );
                node["imagePullPolicyy"] = json!("Always");
                spec["failurePolicy"]["max_restarts"] = json!(3);
            }
            Some("TrainJob") => o["spec"]["trainer"]["numNodes"] = json!("2"),
            Some("Secret") => o["strinData"] = json!({"token": "x"}),
            _ => {}
        }
    }
    objects.push(
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "stray"}}),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, serde_json::to_vec(&objects).expect("json")).expect("write");
    let output = validate_models(&broken);
    assert!(
        !output.status.success(),
        "broken objects passed:\n{}",
        describe("validate.py", &output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let container =
        "spec.template.spec.replicatedJobs[1].template.spec.template.spec.containers[0]";
    for expected in [
        format!("ClusterTrainingRuntime/gantry: {container}.imagePullPolicyy: unknown field"),
        "ClusterTrainingRuntime/gantry: spec.template.spec.failurePolicy.max_restarts: unknown field (the JSON name is 'maxRestarts')".to_string(),
        "TrainJob/gantry-mnist: spec.trainer.numNodes: Input should be a valid integer".to_string(),
        "Secret/gantry-join-token: strinData: unknown field".to_string(),
        "StatefulSet/stray: apiVersion 'apps/v1' kind 'StatefulSet': no model or schema".to_string(),
    ] {
        assert!(
            stderr.contains(&expected),
            "validate.py did not report {expected:?}:\n{stderr}"
        );
    }
}

/// The TrainJob's JobSet runs the gpu overlay's workers and the plain overlays' coordinator:
/// the same command, args, env, mounts, ports, probes, resources and security, apart from the
/// coordinator's address and the run directory; the coordinator waits for numNodes workers.
#[test]
fn trainjob_runs_the_plain_overlays_coordinator_and_workers() {
    let kf = kubeflow();
    let gpu = render_overlay("gpu");
    let plain_worker = container(object(&gpu, "Job", "gantry-worker"), "worker");
    let plain_coordinator = container(
        object(&gpu, "Deployment", "gantry-coordinator"),
        "coordinator",
    );
    let worker = pod_container(&kf.spec, "node", "node");
    let coordinator = pod_container(&kf.spec, "coordinator", "coordinator");

    // The node job runs numNodes pods; the coordinator one.
    let node_job = &named(&kf.spec["replicatedJobs"], "node", "replicatedJobs")["template"]["spec"];
    assert_eq!(node_job["parallelism"], json!(kf.nodes), "node parallelism");
    assert_eq!(node_job["completions"], json!(kf.nodes), "node completions");
    assert_eq!(node_job["completionMode"], "Indexed");
    let coordinator_job =
        &named(&kf.spec["replicatedJobs"], "coordinator", "replicatedJobs")["template"]["spec"];
    assert_eq!(coordinator_job["parallelism"], 1);

    let common_fields = [
        "command",
        "ports",
        "volumeMounts",
        "resources",
        "securityContext",
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
    ];
    assert_same_fields(worker, plain_worker, &common_fields, "worker");
    assert_same_fields(worker, plain_worker, &["args"], "worker");
    assert_same_env(worker, plain_worker, &KUBEFLOW_WORKER_ENV, "worker");
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_same_fields(
        coordinator,
        plain_coordinator,
        &common_fields,
        "coordinator",
    );
    assert_same_env(
        coordinator,
        plain_coordinator,
        &KUBEFLOW_COORDINATOR_ENV,
        "coordinator",
    );
    for kind in ["worker", "coordinator"] {
        let (ours, theirs) = match kind {
            "worker" => (
                pod_template(&kf.spec, "node"),
                &object(&gpu, "Job", "gantry-worker")["spec"]["template"],
            ),
            _ => (
                pod_template(&kf.spec, "coordinator"),
                &object(&gpu, "Deployment", "gantry-coordinator")["spec"]["template"],
            ),
        };
        assert_same_fields(
            &ours["spec"],
            &theirs["spec"],
            &[
                "securityContext",
                "serviceAccountName",
                "automountServiceAccountToken",
                "enableServiceLinks",
            ],
            kind,
        );
    }
    // Between GPU workers NCCL needs every port, as the gpu overlay allows (k8s/kubeflow keeps
    // a copy of its patch).
    assert_eq!(
        object(&kf.objects, "NetworkPolicy", "gantry-workers")["spec"],
        object(&gpu, "NetworkPolicy", "gantry-workers")["spec"],
        "NetworkPolicy gantry-workers: k8s/kubeflow's differs from the gpu overlay's"
    );
    // The base's NetworkPolicies (their targets and their peers) and disruption budgets select
    // the JobSet's pods by their labels.
    let labels: Vec<&Value> = ["coordinator", "node"]
        .iter()
        .map(|rjob| &pod_template(&kf.spec, rjob)["metadata"]["labels"])
        .collect();
    for o in &kf.objects {
        let selectors: Vec<&Value> = match o["kind"].as_str() {
            Some("NetworkPolicy") => std::iter::once(&o["spec"]["podSelector"])
                .chain(
                    o["spec"]["ingress"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|rule| rule["from"].as_array().into_iter().flatten())
                        .map(|peer| &peer["podSelector"])
                        .filter(|s| s.is_object()),
                )
                .collect(),
            Some("PodDisruptionBudget") => vec![&o["spec"]["selector"]],
            _ => continue,
        };
        for selector in selectors {
            let wanted = selector["matchLabels"].as_object();
            let Some(wanted) = wanted.filter(|w| !w.is_empty()) else {
                continue; // selects every pod of the namespace
            };
            assert!(
                labels
                    .iter()
                    .any(|have| wanted.iter().all(|(k, v)| have[k] == *v)),
                "{}/{}: {selector} selects no pod of the TrainJob",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }

    // What the differences resolve to in a pod of the JobSet.
    let fields = pod_fields(&kf.trainjob, &kf.spec);
    let kubelet = Kubelet {
        token: "token".into(),
        fields,
        replace: Vec::new(),
    };
    let worker_env = kubelet.env(worker);
    let coordinator_env = kubelet.env(coordinator);
    let grpc = named(&coordinator["ports"], "grpc", "coordinator ports")["containerPort"].clone();
    let name = &kf.trainjob;
    assert_eq!(
        value_of(&worker_env, "GANTRY_COORDINATOR"),
        format!("http://{name}-coordinator-0-0.{name}:{grpc}"),
        "workers dial the coordinator's JobSet DNS name and gRPC port"
    );
    let run_dir = format!("/var/lib/gantry/runs/{name}");
    assert_eq!(value_of(&worker_env, "GANTRY__RUN__DIR"), run_dir);
    assert_eq!(value_of(&coordinator_env, "GANTRY__RUN__DIR"), run_dir);
    let args = kubelet.args(coordinator, &coordinator_env);
    let mut plain_args = common::pods::strings(&plain_coordinator["args"]);
    let at = plain_args
        .iter()
        .position(|a| a.starts_with("--expect-workers="))
        .expect("the plain coordinator's --expect-workers");
    plain_args[at] = format!("--expect-workers={}", kf.nodes);
    assert_eq!(
        args, plain_args,
        "the coordinator's args, --expect-workers = numNodes"
    );
    assert!(args.iter().any(|a| a == "--resume-if-present"));

    // Everything the pods name exists in the rendering, and the exit-code rules name real
    // containers.
    for rjob in ["coordinator", "node"] {
        let pod = &pod_template(&kf.spec, rjob)["spec"];
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            let referent = [
                ("ConfigMap", &volume["configMap"]["name"]),
                (
                    "PersistentVolumeClaim",
                    &volume["persistentVolumeClaim"]["claimName"],
                ),
            ];
            for (kind, name) in referent {
                if let Some(name) = name.as_str() {
                    object(&kf.objects, kind, name);
                }
            }
        }
        let job = &named(&kf.spec["replicatedJobs"], rjob, "replicatedJobs")["template"]["spec"];
        let containers: BTreeSet<&str> = pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        for rule in job["podFailurePolicy"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = rule["onExitCodes"]["containerName"].as_str() {
                assert!(
                    containers.contains(name),
                    "{rjob}: podFailurePolicy names {name}"
                );
            }
        }
    }
}

/// The TrainJob's JobSet trains to completion as local processes: one coordinator and
/// numNodes workers from the derived pod specs, resolved as in tests/tests/k8s_e2e.rs. The
/// example TrainJob asks for GPUs; here the workers get the cpu overlay's device and backend
/// instead (read from its rendering), and are then the workers that test runs.
#[test]
fn trainjob_trains_to_completion_as_local_processes() {
    let kf = kubeflow();
    let cpu = render_overlay("cpu");
    let plain_worker = container(object(&cpu, "Job", "gantry-worker"), "worker");
    let plain_env = env_entries(plain_worker);
    let mut worker = pod_container(&kf.spec, "node", "node").clone();
    let pins: Vec<Value> = ["GANTRY__RUN__DEVICE", "GANTRY__CLUSTER__BACKEND"]
        .iter()
        .map(|name| plain_env.get(*name).expect("the cpu overlay's pin").clone())
        .collect();
    upsert_env(&mut worker["env"], &Value::Array(pins));
    // Then the env is the cpu overlay's worker env, apart from the Kubeflow differences and
    // NCCL's settings (which the ring backend never reads).
    let nccl: Vec<String> = env_entries(&worker)
        .into_keys()
        .filter(|n| n.starts_with("NCCL_"))
        .collect();
    let except: Vec<&str> = KUBEFLOW_WORKER_ENV
        .iter()
        .copied()
        .chain(nccl.iter().map(String::as_str))
        .collect();
    assert_same_env(&worker, plain_worker, &except, "worker (cpu)");
    assert_same_fields(&worker, plain_worker, &["command", "args"], "worker (cpu)");
    for mount in plain_worker["volumeMounts"].as_array().expect("mounts") {
        assert!(
            worker["volumeMounts"]
                .as_array()
                .expect("mounts")
                .contains(mount),
            "the cpu overlay's mount {mount} is missing"
        );
    }

    let config = object(&kf.objects, "ConfigMap", "gantry-config");
    let secret = object(&kf.objects, "Secret", "gantry-join-token");
    let temp = tempfile::tempdir().expect("temp dir");
    let root = temp.path();
    let grpc_port = free_port();
    let toml = local_config(
        config["data"]["gantry.toml"].as_str().expect("toml"),
        root,
        grpc_port,
    );
    let config_path = root.join("gantry.toml");
    std::fs::write(&config_path, &toml).expect("write gantry.toml");
    let fields = pod_fields(&kf.trainjob, &kf.spec);
    let coordinator_host = fields[COORDINATOR_FIELD].clone();
    let kubelet = Kubelet {
        token: secret["stringData"]["token"]
            .as_str()
            .expect("token")
            .to_string(),
        fields,
        replace: vec![
            (
                format!("{coordinator_host}:7070"),
                format!("127.0.0.1:{grpc_port}"),
            ),
            (
                "/etc/gantry/gantry.toml".into(),
                config_path.to_str().expect("utf-8").into(),
            ),
            (
                "/var/lib/gantry/runs".into(),
                root.join("runs").to_str().expect("utf-8").into(),
            ),
        ],
    };

    let coordinator = pod_container(&kf.spec, "coordinator", "coordinator");
    let mut env = kubelet.env(coordinator);
    let (binary, args) = kubelet.command(coordinator, &env);
    env.extend(SIZING.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut coordinator_child = spawn(&binary, &args, &env, &root.join("coordinator.log"));

    let mut workers = Vec::new();
    for index in 0..kf.nodes {
        let mut env = kubelet.env(&worker);
        let (binary, args) = kubelet.command(&worker, &env);
        env.extend(SIZING.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env.insert("GANTRY__CLUSTER__RING_PORT".into(), "0".into());
        env.insert("GANTRY__METRICS__WORKER_ADDR".into(), "127.0.0.1:0".into());
        env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
        let log = root.join(format!("node-0-{index}.log"));
        workers.push((spawn(&binary, &args, &env, &log), log));
    }

    // The JobSet succeeds when every job completes: each worker and the coordinator exit 0.
    let deadline = Instant::now() + HANG_GUARD;
    let failures = failed_workers(&mut workers, deadline);
    let coordinator_exit = if failures.is_empty() {
        wait(&mut coordinator_child, deadline)
    } else {
        None
    };
    reap(std::iter::once(coordinator_child).chain(workers.into_iter().map(|(c, _)| c)));
    let coordinator_log = std::fs::read_to_string(root.join("coordinator.log")).unwrap_or_default();
    assert!(
        failures.is_empty(),
        "workers failed:\n{}\ncoordinator:\n{coordinator_log}",
        failures.join("\n")
    );
    assert!(
        coordinator_exit.is_some_and(|s| s.success()),
        "the coordinator's Job must complete (exit 0), got {coordinator_exit:?}:\n{coordinator_log}"
    );

    // The TrainJob's own run directory, not gantry.toml's shared one.
    let summary = root.join("runs").join(&kf.trainjob).join("summary.json");
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
    assert!(
        !root.join("runs").join("gantry").exists(),
        "gantry.toml's run.dir was used instead of the TrainJob's"
    );
}

/// A TrainJob that does not tell the coordinator its numNodes fails at once, naming the
/// argument: the unexpanded `--expect-workers` is refused with an exit code that the
/// coordinator job's podFailurePolicy turns into a Job failure, and the JobSet's failurePolicy
/// into the JobSet's, without restarts that could not help.
#[test]
fn a_trainjob_without_expect_workers_fails_at_once() {
    let objects = render_kustomization(&kubeflow_dir());
    let runtime = object(&objects, "ClusterTrainingRuntime", "gantry");
    let mut trainjob = object(&objects, "TrainJob", "gantry-mnist").clone();
    trainjob["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("runtimePatches");
    let spec = jobset_spec(runtime, &trainjob);
    let coordinator = pod_container(&spec, "coordinator", "coordinator");
    let kubelet = Kubelet {
        token: "a-join-token-of-the-test".into(),
        fields: pod_fields("gantry-mnist", &spec),
        replace: Vec::new(),
    };
    let env = kubelet.env(coordinator);
    let (binary, args) = kubelet.command(coordinator, &env);
    assert!(
        args.iter()
            .any(|a| a == "--expect-workers=$(GANTRY_EXPECT_WORKERS)"),
        "left unexpanded, as a kubelet leaves an undefined reference: {args:?}"
    );
    let temp = tempfile::tempdir().expect("temp dir");
    let output = run(Command::new(&binary)
        .args(&args)
        .envs(&env)
        .current_dir(temp.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--expect-workers"),
        "the refusal names the argument: {}",
        describe("coordinator", &output)
    );
    let code = i64::from(output.status.code().expect("an exit code, not a signal"));

    let job = &named(&spec["replicatedJobs"], "coordinator", "replicatedJobs")["template"]["spec"];
    let fails_job = job["podFailurePolicy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "FailJob")
        .filter(|r| r["onExitCodes"]["containerName"] == "coordinator")
        .filter(|r| r["onExitCodes"]["operator"] == "In")
        .any(|r| {
            r["onExitCodes"]["values"]
                .as_array()
                .is_some_and(|v| v.contains(&json!(code)))
        });
    assert!(
        fails_job,
        "exit {code} fails the coordinator's Job: {}",
        job["podFailurePolicy"]
    );
    let rules = &spec["failurePolicy"]["rules"];
    let first = rules
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| {
            let reasons = r["onJobFailureReasons"].as_array();
            let targets = r["targetReplicatedJobs"].as_array();
            reasons.is_none_or(|v| v.is_empty() || v.contains(&json!("PodFailurePolicy")))
                && targets.is_none_or(|v| v.is_empty() || v.contains(&json!("coordinator")))
        })
        .expect("a JobSet failure rule for the coordinator's Job");
    assert_eq!(
        first["action"], "FailJobSet",
        "the first matching JobSet rule: {first}"
    );
}

/// The harness expands `$(VAR)` as a kubelet does (the runtime relies on it for
/// --expect-workers, the coordinator's address and the run directory).
#[test]
fn references_expand_as_a_kubelet_expands_them() {
    let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
    assert_eq!(expand("$(A)/$(B)/$$(A)/$/$(A", &vars), "x/$(B)/$(A)/$/$(A");
}
