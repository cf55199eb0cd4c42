#!/usr/bin/env bash
# Validates the Dockerfiles and the Kubernetes manifests offline (no Docker engine, no cluster):
# renders k8s/overlays/{cpu,gpu} with kubectl kustomize, validates them with
# kubernetes-validate --strict, checks the ServiceMonitor/PodMonitor, security, resource and GPU
# rules and cross-references, and lints deploy/docker/Dockerfile{,.cpu} with hadolint.
# The checks live in deploy/validate.py; the pinned tools come from scripts/install-test-tools.sh
# (run here first; a no-op when they are installed).
#
# Usage: scripts/validate-deploy.sh [--out DIR] [--no-docker] [--rendered FILE --flavour cpu|gpu]
# Exits non-zero, one line per problem, on any failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${GANTRY_TOOLS_VENV:-$repo/.cache/tools-venv}
"$repo/scripts/install-test-tools.sh" "$venv" >&2
exec "$venv/bin/python" "$repo/deploy/validate.py" "$@"
