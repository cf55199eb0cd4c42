//! The deployment files (deploy/docker, k8s/) validate offline: scripts/validate-deploy.sh
//! renders both kustomize overlays, validates them against the Kubernetes JSON schemas
//! (strict), checks the security, resource, GPU and monitoring rules, and runs hadolint on both
//! Dockerfiles. The tools are pinned and installed into .cache/tools-venv by
//! scripts/install-test-tools.sh (the first run needs PyPI; later runs are offline).

mod common;

use std::process::Command;

use common::{
    all_containers, container, describe, expect_workers, install_tools, object, render_overlay,
    repo_root, run, tools_venv,
};
use serde_json::Value;

fn validate(args: &[&str]) -> std::process::Output {
    install_tools();
    let script = repo_root().join("scripts").join("validate-deploy.sh");
    run(Command::new(script)
        .args(args)
        .env("GANTRY_TOOLS_VENV", tools_venv()))
}

#[test]
fn deployment_files_pass_validation() {
    let out = tempfile::tempdir().expect("temp dir");
    let output = validate(&["--out", out.path().to_str().expect("utf-8 temp path")]);
    assert!(
        output.status.success(),
        "{}",
        describe("scripts/validate-deploy.sh", &output)
    );
    for overlay in ["cpu", "gpu"] {
        assert!(
            out.path().join(format!("{overlay}.yaml")).is_file(),
            "{overlay}.yaml kept"
        );
    }
}

#[test]
fn every_container_is_restricted_and_bounded() {
    for overlay in ["cpu", "gpu"] {
        let objects = render_overlay(overlay);
        let containers = all_containers(&objects);
        assert!(
            containers.len() >= 2,
            "{overlay}: coordinator and worker containers"
        );
        for (label, c) in containers {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{overlay} {label}: runAsNonRoot");
            assert_eq!(sc["runAsUser"], 10001, "{overlay} {label}: runAsUser");
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{overlay} {label}: read-only root"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{overlay} {label}: no escalation"
            );
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{overlay} {label}"
            );
            assert_eq!(
                sc["seccompProfile"]["type"], "RuntimeDefault",
                "{overlay} {label}"
            );
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        c["resources"][bound][resource].is_string(),
                        "{overlay} {label}: resources.{bound}.{resource} missing"
                    );
                }
            }
        }
    }
}

#[test]
fn gpus_only_in_the_gpu_overlay_and_worker_count_is_consistent() {
    for overlay in ["cpu", "gpu"] {
        let objects = render_overlay(overlay);
        let job = object(&objects, "Job", "gantry-worker");
        let worker = container(job, "worker");
        let gpu = &worker["resources"]["limits"]["nvidia.com/gpu"];
        match overlay {
            "gpu" => {
                assert_eq!(gpu, "1", "gpu overlay: one GPU per worker");
                assert_eq!(worker["resources"]["requests"]["nvidia.com/gpu"], "1");
            }
            _ => assert!(gpu.is_null(), "cpu overlay requests no GPU"),
        }
        let coordinator = object(&objects, "Deployment", "gantry-coordinator");
        let expected = expect_workers(container(coordinator, "coordinator"));
        assert_eq!(
            job["spec"]["completions"].to_string(),
            expected,
            "{overlay}: completions"
        );
        assert_eq!(
            job["spec"]["parallelism"].to_string(),
            expected,
            "{overlay}: parallelism"
        );
    }
}

/// The validator itself catches broken manifests (a check that passes everything is no check).
#[test]
fn validator_rejects_broken_manifests() {
    let mut objects = render_overlay("cpu");
    for o in objects.iter_mut().filter(|o| o["kind"] == "Job") {
        let worker = &mut o["spec"]["template"]["spec"]["containers"][0];
        worker["resources"]
            .as_object_mut()
            .expect("resources")
            .remove("limits");
        worker["securityContext"]["runAsUser"] = Value::from(0);
        worker["resources"]["requests"]["nvidia.com/gpu"] = Value::from("1");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, serde_json::to_vec(&objects).expect("json")).expect("write");
    let output = validate(&[
        "--rendered",
        broken.to_str().expect("utf-8 temp path"),
        "--flavour",
        "cpu",
    ]);
    assert!(
        !output.status.success(),
        "broken manifests passed:\n{}",
        describe("validate", &output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "resources.limits.cpu missing",
        "runAsUser must be 10001",
        "the cpu overlay must not request nvidia.com/gpu",
    ] {
        assert!(
            stderr.contains(expected),
            "validator did not report {expected:?}:\n{stderr}"
        );
    }
}
