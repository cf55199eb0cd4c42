#!/usr/bin/env python3
"""Checks a rendering of k8s/kubeflow offline, with the Kubeflow Trainer's own API models.

Every object whose API the PyPI package `kubeflow-trainer-api` models (trainer.kubeflow.org/v1alpha1,
jobset.x-k8s.io/v1alpha2, core v1, batch v1) is parsed with its generated pydantic model, strictly:
unknown fields, fields under their Python names instead of their JSON names, and values of the
wrong type are errors. The generated models ignore unknown fields (pydantic's default) and accept
Python names (populate_by_name), so both are switched off here, in every model, before anything
is parsed. Built-in objects of other groups (NetworkPolicy, PodDisruptionBudget) are validated with
kubernetes-validate --strict instead; the Prometheus Operator's PodMonitors, for which neither has
a schema, must select the pods of a replicated job of the runtime and name one of their ports.
Any other kind is an error: nothing is passed unchecked.

Usage: validate.py RENDERED      (YAML documents, or a JSON list of objects; `-` reads stdin)
Prints one line per checked object; exits 1 with one line per problem, each naming the object
(Kind/name) and the field (its JSON path), on any failure.

Run with the test tools' Python (scripts/install-test-tools.sh installs the pinned packages):
    kubectl kustomize k8s/kubeflow | .cache/tools-venv/bin/python k8s/kubeflow/validate.py -
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing

import pydantic
import yaml

import kubeflow_trainer_api
import kubeflow_trainer_api.models as models

KUBERNETES_VERSION = "1.37.0"  # as deploy/validate.py

# (apiVersion, kind) -> the generated model of that object.
MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): models.TrainerV1alpha1ClusterTrainingRuntime,
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): models.TrainerV1alpha1TrainingRuntime,
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): models.TrainerV1alpha1TrainJob,
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): models.JobsetV1alpha2JobSet,
    ("v1", "Namespace"): models.IoK8sApiCoreV1Namespace,
    ("v1", "ServiceAccount"): models.IoK8sApiCoreV1ServiceAccount,
    ("v1", "Secret"): models.IoK8sApiCoreV1Secret,
    ("v1", "ConfigMap"): models.IoK8sApiCoreV1ConfigMap,
    ("v1", "PersistentVolumeClaim"): models.IoK8sApiCoreV1PersistentVolumeClaim,
    ("v1", "Service"): models.IoK8sApiCoreV1Service,
    ("v1", "Pod"): models.IoK8sApiCoreV1Pod,
    ("batch/v1", "Job"): models.IoK8sApiBatchV1Job,
    ("batch/v1", "CronJob"): models.IoK8sApiBatchV1CronJob,
}
# Built-in groups the package does not model: kubernetes-validate's strict JSON schemas.
SCHEMA_VALIDATED = {"networking.k8s.io/v1", "policy/v1"}
MONITORING = "monitoring.coreos.com/v1"


def _all_models() -> list[type[pydantic.BaseModel]]:
    return [c for _, c in inspect.getmembers(models, inspect.isclass)
            if issubclass(c, pydantic.BaseModel) and c.__module__.startswith("kubeflow_trainer_api.")]


def _is_one_of(cls: type) -> bool:
    """The generated oneOf wrappers (Quantity, IntOrString): a scalar in JSON, parsed by from_json."""
    return inspect.isclass(cls) and issubclass(cls, pydantic.BaseModel) and "actual_instance" in cls.model_fields


def _nested_models(annotation: typing.Any) -> typing.Iterator[type[pydantic.BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, pydantic.BaseModel):
        yield annotation
        return
    for argument in typing.get_args(annotation):
        yield from _nested_models(argument)


def make_strict() -> int:
    """Forbids unknown fields and Python field names in every generated model.

    A model's validator embeds the schemas of the models of its fields as they were when it was
    built, so the models are rebuilt leaves first (a depth-first order over the field types).
    """
    order: list[type[pydantic.BaseModel]] = []
    seen: set[type] = set()

    def visit(cls: type[pydantic.BaseModel], path: tuple[type, ...]) -> None:
        if cls in seen or cls in path:
            return
        for field in cls.model_fields.values():
            for nested in _nested_models(field.annotation):
                visit(nested, path + (cls,))
        seen.add(cls)
        order.append(cls)

    for cls in _all_models():
        visit(cls, ())
    for cls in order:
        if _is_one_of(cls):
            continue  # never validated from a mapping (see convert_scalars)
        cls.model_config["extra"] = "forbid"
        cls.model_config["populate_by_name"] = False
        cls.model_config["validate_by_name"] = False
        cls.model_config["validate_by_alias"] = True
        cls.model_rebuild(force=True)
    return len(order)


def _path(loc: typing.Iterable[typing.Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the object)"


def convert_scalars(value: typing.Any, annotation: typing.Any, loc: tuple, errors: list[str]) -> typing.Any:
    """The raw object with every Quantity / IntOrString scalar replaced by its parsed wrapper.

    The wrappers are models whose JSON form is a bare string or number, which only their
    from_json understands; everything else is left to model_validate (unknown keys included).
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        candidates = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(candidates) == 1:
            return convert_scalars(value, candidates[0], loc, errors)
        return value
    if origin in (list, typing.List) and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        return [convert_scalars(v, item, loc + (i,), errors) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict) and isinstance(value, dict):
        _, item = typing.get_args(annotation)
        return {k: convert_scalars(v, item, loc + (k,), errors) for k, v in value.items()}
    if _is_one_of(annotation):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                return annotation.from_json(json.dumps(value))
            except ValueError as error:
                errors.append(f"{_path(loc)}: {' '.join(str(error).split())}")
        return value
    if inspect.isclass(annotation) and issubclass(annotation, pydantic.BaseModel) and isinstance(value, dict):
        by_alias = {(f.alias or name): f for name, f in annotation.model_fields.items()}
        return {k: (convert_scalars(v, by_alias[k].annotation, loc + (k,), errors) if k in by_alias else v)
                for k, v in value.items()}
    return value


def parse_strictly(obj: dict, model: type[pydantic.BaseModel]) -> list[str]:
    errors: list[str] = []
    converted = convert_scalars(obj, model, (), errors)
    if errors:
        return errors
    try:
        model.model_validate(converted)
    except pydantic.ValidationError as error:
        for e in error.errors():
            # A union's failed branches are reported once per branch; the field is what matters.
            line = f"{_path(e['loc'])}: {e['msg']}"
            if e["type"] == "extra_forbidden":
                key = str(e["loc"][-1])
                camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key)
                hint = f" (the JSON name is {camel!r})" if camel != key else ""
                line = f"{_path(e['loc'])}: unknown field{hint}"
            if line not in errors:
                errors.append(line)
    return errors


def schema_validate(obj: dict) -> list[str]:
    from kubernetes_validate import utils  # pinned with the deployment tools

    try:
        utils.validate(obj, KUBERNETES_VERSION, strict=True)
    except utils.ValidationError as error:
        where = _path(error.path) if error.path else "(the object)"
        return [f"{where}: {error.message} (kubernetes-validate {KUBERNETES_VERSION} --strict)"]
    except utils.SchemaNotFoundError as error:
        return [f"no schema: {error}"]
    return []


def _selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and set(selector) <= {"matchLabels"} and all(labels.get(k) == v for k, v in match.items())


def runtime_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    """(label, pod template) of every replicated job of every runtime in the rendering."""
    pods = []
    for obj in objects:
        if obj.get("kind") in ("ClusterTrainingRuntime", "TrainingRuntime"):
            spec = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {})
            for rjob in spec.get("replicatedJobs") or []:
                template = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
                pods.append((f"{obj['kind']}/{obj['metadata']['name']} {rjob.get('name')}", template))
    return pods


def check_pod_monitor(obj: dict, objects: list[dict]) -> list[str]:
    spec = obj.get("spec") or {}
    selector = spec.get("selector") or {}
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints:
        return ["spec.podMetricsEndpoints: at least one endpoint is required"]
    selected = [(label, pod) for label, pod in runtime_pods(objects)
                if _selects(selector, (pod.get("metadata") or {}).get("labels") or {})]
    if not selected:
        return [f"spec.selector: selects no pod of the runtime ({selector})"]
    errors = []
    for i, endpoint in enumerate(endpoints):
        for label, pod in selected:
            ports = {p.get("name") for c in (pod.get("spec") or {}).get("containers") or []
                     for p in c.get("ports") or []}
            if endpoint.get("port") not in ports:
                errors.append(f"spec.podMetricsEndpoints[{i}].port: {endpoint.get('port')!r} is no port of {label} ({sorted(ports)})")
    return errors


def load(path: str) -> list[dict]:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    objects: list[dict] = []
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, list):
            objects.extend(doc)
        elif doc:
            objects.append(doc)
    return objects


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} RENDERED   (YAML documents or a JSON list; - for stdin)", file=sys.stderr)
        return 2
    objects = load(argv[1])
    if not objects:
        print(f"{argv[1]}: no objects", file=sys.stderr)
        return 1
    rebuilt = make_strict()
    problems: list[str] = []
    for obj in objects:
        if not isinstance(obj, dict):
            problems.append(f"not an object: {obj!r}")
            continue
        api, kind = obj.get("apiVersion"), obj.get("kind")
        name = (obj.get("metadata") or {}).get("name", "?")
        where = f"{kind}/{name}"
        if (api, kind) in MODELS:
            model = MODELS[(api, kind)]
            errors, how = parse_strictly(obj, model), f"{model.__name__} (strict)"
        elif api in SCHEMA_VALIDATED:
            errors, how = schema_validate(obj), f"kubernetes-validate {KUBERNETES_VERSION} --strict"
        elif api == MONITORING and kind == "PodMonitor":
            errors, how = check_pod_monitor(obj, objects), "selector and port against the runtime's pods"
        else:
            errors, how = [f"apiVersion {api!r} kind {kind!r}: no model or schema to check it with"], ""
        problems.extend(f"{where}: {e}" for e in errors)
        if not errors:
            print(f"ok {where}: {how}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"{len(objects)} objects checked with kubeflow-trainer-api {kubeflow_trainer_api.__version__} "
          f"({rebuilt} models made strict) and kubernetes-validate")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
