#!/usr/bin/env python3
"""Validates Gantry's deployment files offline: no cluster, no Docker engine.

For each kustomize overlay (k8s/overlays/cpu, k8s/overlays/gpu):
  * renders it with `kubectl kustomize`;
  * validates every built-in object with `kubernetes-validate --strict` against Kubernetes
    KUBERNETES_VERSION (the newest the installed kubernetes-validate ships schemas for);
  * checks the Prometheus Operator objects (ServiceMonitor, PodMonitor), which have no schema
    there, for their required fields and that they match a Service / pod template;
  * asserts the security and resource rules on every pod template (requests and limits on every
    container, non-root uid 10001, read-only root filesystem, no privilege escalation,
    capabilities drop ALL, seccomp RuntimeDefault, no service account token);
  * asserts GPU requests in the gpu overlay and none in the cpu overlay;
  * cross-checks references (ConfigMaps, Secrets, PVCs, Service selectors and ports, probes),
    --expect-workers against the worker Job's completions/parallelism, gantry.toml's keys and
    ports, and the Grafana dashboards ConfigMap against deploy/grafana/dashboards/*.json.
Then lints both Dockerfiles with hadolint.

Run through scripts/validate-deploy.sh (which installs the pinned tools first). Exits 1 with one
line per problem on failure. `--rendered FILE --flavour cpu|gpu` checks one already-rendered
manifest stream instead (used by the Rust tests to prove that broken manifests are caught);
`--out DIR` keeps each overlay's rendering as DIR/<overlay>.yaml and DIR/<overlay>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

KUBERNETES_VERSION = "1.37.0"
REPO = pathlib.Path(__file__).resolve().parent.parent
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "gantry"
UID = 10001
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet", "CronJob", "Pod"}
CRD_GROUP = "monitoring.coreos.com"
DOCKERFILES = ("deploy/docker/Dockerfile", "deploy/docker/Dockerfile.cpu")
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
# The configuration contract (gantry-config): section -> keys.
CONFIG_KEYS = {
    "train": {"steps", "batch_size", "seed", "lr_g", "lr_d", "betas", "optimizer", "loss",
              "schedule", "threads", "log_every"},
    "model": {"kind", "latent_dim", "batch_norm"},
    "data": {"dataset", "cache_dir", "mirror"},
    "checkpoint": {"every", "keep"},
    "samples": {"every"},
    "run": {"dir", "device"},
    "collective": {"bucket_mb", "verify_every", "timeout"},
    "cluster": {"backend", "listen", "token", "heartbeat_interval", "heartbeat_timeout",
                "max_restarts", "rendezvous_timeout", "ring_port"},
    "metrics": {"addr", "worker_addr"},
}


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.checked = 0

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        if f"{where}: {message}" not in self.warnings:
            self.warnings.append(f"{where}: {message}")


def tool(name: str) -> str:
    venv_bin = pathlib.Path(sys.executable).parent
    candidate = venv_bin / name
    return str(candidate) if candidate.exists() else name


def render(overlay: pathlib.Path) -> str:
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{result.stderr.strip()}")
    return result.stdout


def ident(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------------------------------
# Quantities

_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([A-Za-z]*)", str(value))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


# ---------------------------------------------------------------------------------------------
# Schema validation

def schema_validate(where: str, objects: list[dict], report: Report) -> None:
    builtin = [o for o in objects if not o.get("apiVersion", "").startswith(CRD_GROUP + "/")]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump_all(builtin, handle, sort_keys=False)
        path = handle.name
    try:
        result = subprocess.run(
            [tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", "--quiet", path],
            capture_output=True, text=True)
    finally:
        os.unlink(path)
    output = (result.stdout + result.stderr).replace(path, where)
    for line in output.splitlines():
        if line.startswith("ERROR") or "Couldn't find schema" in line:
            report.error(where, f"kubernetes-validate {KUBERNETES_VERSION} --strict: {line}")
    if result.returncode != 0 and not report.errors:
        report.error(where, f"kubernetes-validate failed (exit {result.returncode}): {output.strip()}")
    report.checked += len(builtin)


# ---------------------------------------------------------------------------------------------
# Pod templates

def pod_template(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj
    if kind == "CronJob":
        return obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
    if kind in POD_KINDS:
        return obj.get("spec", {}).get("template")
    return None


def check_pod(where: str, template: dict, flavour: str, report: Report) -> None:
    spec = template.get("spec", {})
    pod_sc = spec.get("securityContext", {}) or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            report.error(where, f"{field} must not be set")
    if spec.get("automountServiceAccountToken") is not False:
        report.error(where, "automountServiceAccountToken must be false (Gantry uses no API)")
    if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        report.error(where, "pod securityContext.seccompProfile.type must be RuntimeDefault")
    if pod_sc.get("runAsNonRoot") is not True:
        report.error(where, "pod securityContext.runAsNonRoot must be true")
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    for volume in volumes.values():
        if "hostPath" in volume:
            report.error(where, f"volume {volume['name']}: hostPath is not allowed")

    containers = [("container", c) for c in spec.get("containers", []) or []]
    containers += [("initContainer", c) for c in spec.get("initContainers", []) or []]
    if not containers:
        report.error(where, "pod template has no containers")
    for role, container in containers:
        cwhere = f"{where} {role} {container.get('name')}"
        check_container(cwhere, container, pod_sc, volumes, report)

    gpu_limits = [c for _, c in containers
                  if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
                  or "nvidia.com/gpu" in ((c.get("resources") or {}).get("requests") or {})]
    if flavour == "cpu" and gpu_limits:
        report.error(where, "the cpu overlay must not request nvidia.com/gpu")


def check_container(where: str, c: dict, pod_sc: dict, volumes: dict, report: Report) -> None:
    resources = c.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for kind in ("cpu", "memory"):
        if kind not in requests:
            report.error(where, f"resources.requests.{kind} missing")
        if kind not in limits:
            report.error(where, f"resources.limits.{kind} missing")
    for name in set(requests) & set(limits):
        try:
            if quantity(requests[name]) > quantity(limits[name]):
                report.error(where, f"requests.{name} {requests[name]} exceeds limits.{name} {limits[name]}")
        except ValueError as error:
            report.error(where, str(error))
    for extended in ("nvidia.com/gpu",):
        if extended in requests or extended in limits:
            if str(requests.get(extended, limits.get(extended))) != str(limits.get(extended)):
                report.error(where, f"{extended}: requests and limits must be equal")

    sc = c.get("securityContext") or {}

    def effective(key):
        return sc.get(key, pod_sc.get(key))

    if effective("runAsNonRoot") is not True:
        report.error(where, "runAsNonRoot must be true")
    if effective("runAsUser") != UID:
        report.error(where, f"runAsUser must be {UID} (the image's user), got {effective('runAsUser')}")
    if sc.get("readOnlyRootFilesystem") is not True:
        report.error(where, "securityContext.readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        report.error(where, "securityContext.allowPrivilegeEscalation must be false")
    if sc.get("privileged"):
        report.error(where, "securityContext.privileged must not be true")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        report.error(where, "securityContext.capabilities.drop must contain ALL")
    if capabilities.get("add"):
        report.error(where, f"securityContext.capabilities.add must be empty, got {capabilities['add']}")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        report.error(where, "seccompProfile.type must be RuntimeDefault")

    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts", []) or []}
    for mount in mounts.values():
        if mount.get("name") not in volumes:
            report.error(where, f"volumeMount {mount.get('mountPath')} uses undefined volume {mount.get('name')}")
    tmp = mounts.get("/tmp")
    if tmp is None or "emptyDir" not in volumes.get(tmp.get("name"), {}):
        report.error(where, "read-only root filesystem needs a writable emptyDir at /tmp")

    port_names = {p.get("name") for p in c.get("ports", []) or []}
    port_numbers = {p.get("containerPort") for p in c.get("ports", []) or []}
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(probe_name)
        if probe and "httpGet" in probe:
            port = probe["httpGet"].get("port")
            if port not in port_names and port not in port_numbers:
                report.error(where, f"{probe_name} uses port {port!r}, which the container doesn't declare")


# ---------------------------------------------------------------------------------------------
# CRDs (no schema in kubernetes-validate)

_SERVICE_MONITOR_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                                  "honorLabels", "relabelings", "metricRelabelings", "params",
                                  "tlsConfig", "bearerTokenSecret", "authorization", "basicAuth"}
_POD_MONITOR_ENDPOINT_KEYS = (_SERVICE_MONITOR_ENDPOINT_KEYS - {"targetPort"}) | {"portNumber"}


def selector_matches(selector: dict, labels: dict) -> bool:
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, operator, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_monitor(obj: dict, objects: list[dict], report: Report) -> None:
    where = ident(obj)
    kind, spec = obj.get("kind"), obj.get("spec")
    if obj.get("apiVersion") != f"{CRD_GROUP}/v1":
        report.error(where, f"apiVersion must be {CRD_GROUP}/v1")
    if kind not in ("ServiceMonitor", "PodMonitor"):
        report.error(where, f"unexpected {CRD_GROUP} kind {kind}")
        return
    if not obj.get("metadata", {}).get("name"):
        report.error(where, "metadata.name is required")
    if not isinstance(spec, dict):
        report.error(where, "spec is required")
        return
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        report.error(where, "spec.selector with matchLabels or matchExpressions is required")
        selector = {}
    list_key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    allowed_spec = {"selector", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                    "sampleLimit", "attachMetadata", list_key}
    for key in spec:
        if key not in allowed_spec:
            report.error(where, f"spec.{key} is not a field Gantry expects in a {kind}")
    endpoints = spec.get(list_key)
    if not isinstance(endpoints, list) or not endpoints:
        report.error(where, f"spec.{list_key} must be a non-empty list")
        endpoints = []
    allowed = _SERVICE_MONITOR_ENDPOINT_KEYS if kind == "ServiceMonitor" else _POD_MONITOR_ENDPOINT_KEYS
    for i, endpoint in enumerate(endpoints):
        ewhere = f"{where} spec.{list_key}[{i}]"
        for key in endpoint:
            if key not in allowed:
                report.error(ewhere, f"unknown field {key}")
        if not any(k in endpoint for k in ("port", "targetPort", "portNumber")):
            report.error(ewhere, "port (a named port) is required")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.match(str(endpoint[key])):
                report.error(ewhere, f"{key} {endpoint[key]!r} is not a Prometheus duration")
        if "path" in endpoint and not str(endpoint["path"]).startswith("/"):
            report.error(ewhere, "path must start with /")

    # The monitor must select something this deployment creates, by a port it declares.
    if kind == "ServiceMonitor":
        services = [o for o in objects if o.get("kind") == "Service"
                    and selector_matches(selector, o.get("metadata", {}).get("labels") or {})]
        if not services:
            report.error(where, "spec.selector matches no Service of this deployment")
        names = {p.get("name") for s in services for p in s.get("spec", {}).get("ports", [])}
    else:
        templates = [pod_template(o) for o in objects if pod_template(o)]
        templates = [t for t in templates
                     if selector_matches(selector, t.get("metadata", {}).get("labels") or {})]
        if not templates:
            report.error(where, "spec.selector matches no pod template of this deployment")
        names = {p.get("name") for t in templates for c in t.get("spec", {}).get("containers", [])
                 for p in c.get("ports", []) or []}
    for endpoint in endpoints:
        if "port" in endpoint and endpoint["port"] not in names:
            report.error(where, f"endpoint port {endpoint['port']!r} is not a port of the selected targets")
    report.checked += 1


# ---------------------------------------------------------------------------------------------
# Cross-object checks

def find(objects, kind, name=None):
    return [o for o in objects if o.get("kind") == kind
            and (name is None or o.get("metadata", {}).get("name") == name)]


def check_references(objects: list[dict], report: Report) -> None:
    names = {(o.get("kind"), o.get("metadata", {}).get("name")) for o in objects}
    for obj in objects:
        meta = obj.get("metadata", {})
        if obj.get("kind") != "Namespace" and meta.get("namespace") != NAMESPACE:
            report.error(ident(obj), f"must be in namespace {NAMESPACE}, is in {meta.get('namespace')}")
        template = pod_template(obj)
        if not template:
            continue
        where = ident(obj)
        spec = template.get("spec", {})
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in names:
            report.error(where, f"serviceAccountName {sa} is not defined")
        for volume in spec.get("volumes", []) or []:
            if "configMap" in volume and ("ConfigMap", volume["configMap"].get("name")) not in names:
                report.error(where, f"volume {volume['name']}: ConfigMap {volume['configMap'].get('name')} is not defined")
            if "secret" in volume and not volume["secret"].get("optional") \
                    and ("Secret", volume["secret"].get("secretName")) not in names:
                report.error(where, f"volume {volume['name']}: Secret {volume['secret'].get('secretName')} is not defined")
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"].get("claimName")
                pvcs = find(objects, "PersistentVolumeClaim", claim)
                if not pvcs:
                    report.error(where, f"volume {volume['name']}: PVC {claim} is not defined")
                elif volume["name"] == "runs" and "ReadWriteMany" not in pvcs[0]["spec"].get("accessModes", []):
                    report.error(where, f"PVC {claim} holds the shared run dir: it must be ReadWriteMany")
        for container in spec.get("containers", []) or []:
            for env in container.get("env", []) or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    secrets = find(objects, "Secret", ref.get("name"))
                    if not secrets:
                        report.error(where, f"env {env['name']}: Secret {ref.get('name')} is not defined")
                    elif ref.get("key") not in (secrets[0].get("data") or {}) | (secrets[0].get("stringData") or {}):
                        report.error(where, f"env {env['name']}: Secret {ref.get('name')} has no key {ref.get('key')}")
            mounts = {m.get("mountPath") for m in container.get("volumeMounts", []) or []}
            for wanted in ("/etc/gantry", "/var/lib/gantry/runs"):
                if wanted not in mounts:
                    report.error(f"{where} container {container.get('name')}", f"{wanted} must be mounted")

    templates = [(ident(o), pod_template(o)) for o in objects if pod_template(o)]
    for service in find(objects, "Service"):
        where = ident(service)
        selected = [t for _, t in templates
                    if selector_matches({"matchLabels": service["spec"].get("selector") or {}},
                                        t.get("metadata", {}).get("labels") or {})]
        if not selected:
            report.error(where, "selector matches no pod template")
            continue
        declared = {p.get("name"): p.get("containerPort") for t in selected
                    for c in t["spec"].get("containers", []) for p in c.get("ports", []) or []}
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and target not in declared:
                report.error(where, f"targetPort {target!r} is not a named container port")
            if isinstance(target, str) and declared.get(target) != port.get("port"):
                report.warn(where, f"port {port.get('port')} forwards to container port {declared.get(target)}")


def check_gantry(objects: list[dict], flavour: str, report: Report) -> None:
    coordinators = find(objects, "Deployment", "gantry-coordinator")
    jobs = find(objects, "Job", "gantry-worker")
    if len(coordinators) != 1 or len(jobs) != 1:
        report.error("gantry", "expected one Deployment gantry-coordinator and one Job gantry-worker")
        return
    coordinator, job = coordinators[0], jobs[0]
    if coordinator["spec"].get("replicas") != 1:
        report.error(ident(coordinator), "replicas must be 1")
    cspec = coordinator["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in cspec.get("args", [])]
    expect = [a.split("=", 1)[1] for a in args if a.startswith("--expect-workers=")]
    if "--expect-workers" in args:
        expect.append(args[args.index("--expect-workers") + 1])
    completions, parallelism = job["spec"].get("completions"), job["spec"].get("parallelism")
    if job["spec"].get("completionMode") != "Indexed":
        report.error(ident(job), "completionMode must be Indexed")
    if len(expect) != 1:
        report.error(ident(coordinator), "coordinator args need exactly one --expect-workers")
    elif not (str(completions) == str(parallelism) == expect[0]):
        report.error(ident(coordinator), f"--expect-workers={expect[0]} must equal the worker Job's "
                     f"completions ({completions}) and parallelism ({parallelism})")
    if cspec.get("command", [])[-1:] != ["coordinator"]:
        report.error(ident(coordinator), f"command must run coordinator, is {cspec.get('command')}")
    wspec = job["spec"]["template"]["spec"]
    worker = next((c for c in wspec["containers"] if c["name"] == "worker"), None)
    if worker is None:
        report.error(ident(job), "no container named worker")
        return
    if worker.get("command", [])[-1:] != ["worker"]:
        report.error(ident(job), f"command must run worker, is {worker.get('command')}")
    env = {e["name"]: e for e in worker.get("env", [])}
    if "GANTRY_COORDINATOR" not in env:
        report.error(ident(job), "worker env GANTRY_COORDINATOR missing")
    if (env.get("GANTRY_ADVERTISE_HOST", {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
        report.error(ident(job), "worker env GANTRY_ADVERTISE_HOST must come from status.podIP")
    for container, name in ((cspec, "coordinator"), (worker, "worker")):
        names = {e["name"] for e in container.get("env", [])}
        if "GANTRY__CLUSTER__TOKEN" not in names:
            report.error(name, "env GANTRY__CLUSTER__TOKEN (from the join-token Secret) missing")
    rules = (job["spec"].get("podFailurePolicy") or {}).get("rules", [])
    if not any(75 in ((r.get("onExitCodes") or {}).get("values") or []) and r.get("action") == "Ignore"
               for r in rules):
        report.error(ident(job), "podFailurePolicy must Ignore exit code 75 (EX_TEMPFAIL, retryable)")

    resources = worker.get("resources") or {}
    gpu_req = (resources.get("requests") or {}).get("nvidia.com/gpu")
    gpu_lim = (resources.get("limits") or {}).get("nvidia.com/gpu")
    if flavour == "gpu":
        if str(gpu_lim) != "1" or str(gpu_req) != "1":
            report.error(ident(job), f"gpu overlay: worker needs nvidia.com/gpu 1 in requests and limits, has {gpu_req}/{gpu_lim}")
        if not any(t.get("key") == "nvidia.com/gpu" for t in wspec.get("tolerations", []) or []):
            report.error(ident(job), "gpu overlay: worker needs a toleration for nvidia.com/gpu")
        dshm = [m for m in worker.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
        volumes = {v["name"]: v for v in wspec.get("volumes", [])}
        if not dshm or (volumes.get(dshm[0]["name"], {}).get("emptyDir") or {}).get("medium") != "Memory":
            report.error(ident(job), "gpu overlay: /dev/shm must be an emptyDir with medium Memory")
        for name in ("NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE"):
            if name not in env:
                report.error(ident(job), f"gpu overlay: worker env {name} missing")
        if not wspec.get("topologySpreadConstraints") and not (wspec.get("affinity") or {}).get("podAntiAffinity"):
            report.error(ident(job), "gpu overlay: workers need topologySpreadConstraints or anti-affinity")
    else:
        if any(n.startswith("NCCL_") for n in env):
            report.error(ident(job), "cpu overlay: NCCL settings don't belong on CPU workers")

    for kind in ("PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PodMonitor", "Namespace"):
        if not find(objects, kind):
            report.error("gantry", f"no {kind} rendered")
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    workers_svc = services.get("gantry-workers")
    if not workers_svc or workers_svc["spec"].get("clusterIP") != "None":
        report.error("Service/gantry-workers", "must exist and be headless (clusterIP: None)")

    # gantry.toml: known keys only, ports consistent with the Services.
    configs = [c for c in find(objects, "ConfigMap") if "gantry.toml" in (c.get("data") or {})]
    if len(configs) != 1:
        report.error("gantry", "expected exactly one ConfigMap with gantry.toml")
        return
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        report.warn("gantry.toml", "tomllib unavailable (Python < 3.11): not parsed")
        return
    where = ident(configs[0]) + " gantry.toml"
    try:
        config = tomllib.loads(configs[0]["data"]["gantry.toml"])
    except tomllib.TOMLDecodeError as error:
        report.error(where, f"not valid TOML: {error}")
        return
    for section, table in config.items():
        if section not in CONFIG_KEYS or not isinstance(table, dict):
            report.error(where, f"unknown section [{section}]")
            continue
        for key in table:
            if key not in CONFIG_KEYS[section]:
                report.error(where, f"unknown key {section}.{key}")
    if config.get("cluster", {}).get("token"):
        report.error(where, "cluster.token must come from the Secret, not the ConfigMap")

    def port_of(address):
        return int(str(address).rsplit(":", 1)[1]) if address and ":" in str(address) else None

    expected = {
        ("gantry-coordinator", "grpc"): port_of(config.get("cluster", {}).get("listen", "0.0.0.0:7070")),
        ("gantry-coordinator", "http-metrics"): port_of(config.get("metrics", {}).get("addr", "0.0.0.0:9090")),
        ("gantry-workers", "ring"): config.get("cluster", {}).get("ring_port", 7071),
        ("gantry-workers", "http-metrics"): port_of(config.get("metrics", {}).get("worker_addr", "0.0.0.0:9091")),
    }
    for (service, port_name), port in expected.items():
        ports = {p.get("name"): p.get("port") for p in services.get(service, {}).get("spec", {}).get("ports", [])}
        if ports.get(port_name) != port:
            report.error(f"Service/{service}", f"port {port_name} is {ports.get(port_name)}, gantry.toml says {port}")
    run_dir = str(config.get("run", {}).get("dir", ""))
    if not run_dir.startswith("/var/lib/gantry/runs"):
        report.error(where, f"run.dir {run_dir!r} must be on the shared volume /var/lib/gantry/runs")

    secret = find(objects, "Secret", "gantry-join-token")
    if secret and "REPLACE-ME" in str((secret[0].get("stringData") or {}).get("token", "")):
        report.warn("Secret/gantry-join-token", "placeholder token: replace it before deploying (docs/kubernetes.md)")


def check_dashboards(objects: list[dict], report: Report) -> None:
    directory = REPO / "deploy" / "grafana" / "dashboards"
    files = sorted(p.name for p in directory.glob("*.json"))
    kustomization = yaml.safe_load((REPO / "deploy" / "grafana" / "kustomization.yaml").read_text())
    listed = sorted(pathlib.Path(f).name for g in kustomization.get("configMapGenerator", [])
                    for f in g.get("files", []))
    for missing in sorted(set(files) - set(listed)):
        report.error("deploy/grafana/kustomization.yaml",
                     f"dashboards/{missing} exists but is not listed under configMapGenerator files")
    for extra in sorted(set(listed) - set(files)):
        report.error("deploy/grafana/kustomization.yaml", f"lists dashboards/{extra}, which does not exist")
    maps = [c for c in find(objects, "ConfigMap")
            if (c["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    if not maps:
        report.error("gantry", 'no ConfigMap labelled grafana_dashboard: "1"')
    for cm in maps:
        for key, text in (cm.get("data") or {}).items():
            try:
                dashboard = json.loads(text)
            except json.JSONDecodeError as error:
                report.error(ident(cm), f"{key} is not valid JSON: {error}")
                continue
            if not isinstance(dashboard, dict) or not dashboard.get("title"):
                report.error(ident(cm), f"{key} is not a Grafana dashboard (no title)")


def check_objects(where: str, objects: list[dict], flavour: str, report: Report, schemas: bool = True) -> None:
    objects = [o for o in objects if o]
    if schemas:
        schema_validate(where, objects, report)
    for obj in objects:
        if obj.get("apiVersion", "").startswith(CRD_GROUP + "/"):
            check_monitor(obj, objects, report)
        template = pod_template(obj)
        if template is not None:
            check_pod(f"{where} {ident(obj)}", template, flavour, report)
    check_references(objects, report)
    check_gantry(objects, flavour, report)


def check_dockerfiles(report: Report) -> None:
    for dockerfile in DOCKERFILES:
        result = subprocess.run([tool("hadolint"), str(REPO / dockerfile)], capture_output=True, text=True)
        if result.returncode != 0:
            for line in (result.stdout + result.stderr).strip().splitlines():
                report.error(dockerfile, f"hadolint: {line}")
        report.checked += 1
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    for needed in ("Cargo.toml", "Cargo.lock", "crates", "tests", "data", "scripts", ".cargo"):
        if needed in ignored or f"{needed}/" in ignored:
            report.error(".dockerignore", f"{needed} is a build input and must not be ignored")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="keep each overlay's rendering here")
    parser.add_argument("--rendered", type=pathlib.Path, help="check this rendered manifest stream only")
    parser.add_argument("--flavour", choices=OVERLAYS, help="with --rendered: cpu or gpu")
    parser.add_argument("--no-docker", action="store_true", help="skip hadolint")
    args = parser.parse_args()
    report = Report()

    if args.rendered:
        if not args.flavour:
            parser.error("--rendered needs --flavour")
        # A YAML stream, or a JSON/YAML list of objects (as --out writes <overlay>.json).
        objects = []
        for doc in yaml.safe_load_all(args.rendered.read_text()):
            objects.extend(doc if isinstance(doc, list) else [doc])
        check_objects(str(args.rendered), objects, args.flavour, report)
    else:
        for overlay in OVERLAYS:
            where = f"k8s/overlays/{overlay}"
            try:
                text = render(REPO / where)
            except RuntimeError as error:
                report.error(where, str(error))
                continue
            objects = [o for o in yaml.safe_load_all(text) if o]
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{overlay}.yaml").write_text(text)
                (args.out / f"{overlay}.json").write_text(json.dumps(objects, indent=1))
            check_objects(where, objects, overlay, report)
            if overlay == "cpu":
                check_dashboards(objects, report)
            print(f"validate-deploy: {where}: {len(objects)} objects rendered and checked")
        if not args.no_docker:
            check_dockerfiles(report)
            print(f"validate-deploy: hadolint: {', '.join(DOCKERFILES)}")

    for warning in report.warnings:
        print(f"validate-deploy: warning: {warning}")
    if report.errors:
        for error in report.errors:
            print(f"validate-deploy: FAIL: {error}", file=sys.stderr)
        print(f"validate-deploy: {len(report.errors)} problem(s)", file=sys.stderr)
        return 1
    print(f"validate-deploy: OK (Kubernetes {KUBERNETES_VERSION} schemas, strict; "
          f"{report.checked} objects/files checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
