#!/usr/bin/env bash
# Provisions the libtorch that Gantry builds and runs against, from PyPI.
#
# PyPI's torch==2.11.0 wheel is a complete libtorch (torch/lib + torch/include). On a machine
# without a GPU, libtorch_cpu.so still needs the CUDA runtime and CUPTI, which two small NVIDIA
# wheels supply; the NCCL wheel supplies libnccl for the GPU collective (loaded at run time).
# The wheels are unpacked side by side as pip would lay them out in site-packages, so the
# RPATHs baked into the torch libraries ($ORIGIN/../../nvidia/...) resolve with no
# LD_LIBRARY_PATH.
#
# Idempotent: a second run finds the stamp file and downloads nothing. Every wheel is checked
# against a pinned SHA-256 (pip --require-hashes).
#
# Usage: scripts/fetch-libtorch.sh [CACHE_DIR]   (default: .cache/ in the repository)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${GANTRY_CACHE:-$repo/.cache}}
site="$cache/libtorch/site"
wheels="$cache/wheels"
stamp="$site/.gantry-libtorch-2.11.0"

if [[ -n "${LIBTORCH_USE_PYTORCH:-}" ]]; then
    echo "fetch-libtorch: LIBTORCH_USE_PYTORCH is set; using the PyTorch of $(command -v python3)"
    exit 0
fi
if [[ -f "$stamp" && -f "$site/torch/lib/libtorch_cpu.so" ]]; then
    echo "fetch-libtorch: libtorch 2.11.0 already in $site/torch"
    exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "fetch-libtorch: python3 with pip is needed" >&2; exit 1; }

mkdir -p "$wheels"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
cat >"$requirements" <<'REQ'
torch==2.11.0 --hash=sha256:7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cupti==13.0.85 --hash=sha256:4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8
nvidia-nccl-cu13==2.28.9 --hash=sha256:e4553a30f34195f3fa1da02a6da3d6337d28f2003943aa0a3d247bbc25fefc42
REQ

echo "fetch-libtorch: downloading torch 2.11.0 + CUDA runtime, CUPTI and NCCL wheels into $wheels"
# The wheel's Python tag only matters to Python; the C++ libraries inside are the same, so one
# pinned tag (cp311) is fetched on every machine, whatever its own Python.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d "$wheels" -r "$requirements"

echo "fetch-libtorch: unpacking into $site"
staging="$cache/libtorch/site.partial"
rm -rf "$staging"
mkdir -p "$staging"
"$python" - "$wheels" "$staging" <<'PY'
import pathlib, sys, zipfile
wheels, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
patterns = {
    "torch-2.11.0-": ("torch/lib/", "torch/include/", "torch/share/"),
    "nvidia_cuda_runtime-13.0.96-": ("nvidia/",),
    "nvidia_cuda_cupti-13.0.85-": ("nvidia/",),
    "nvidia_nccl_cu13-2.28.9-": ("nvidia/",),
}
for prefix, keep in patterns.items():
    matches = sorted(wheels.glob(prefix + "*.whl"))
    if not matches:
        sys.exit(f"fetch-libtorch: no wheel {prefix}*.whl in {wheels}")
    with zipfile.ZipFile(matches[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith(keep)]
        wheel.extractall(dest, members)
PY
# cudarc's NCCL loader looks for libnccl.so; the wheel ships only the soname libnccl.so.2.
ln -sf libnccl.so.2 "$staging/nvidia/nccl/lib/libnccl.so"
# torch-sys compares this file with the PyTorch version tch was made for.
echo "2.11.0" >"$staging/torch/build-version"

for needed in torch/lib/libtorch_cpu.so torch/lib/libc10.so torch/include/torch/csrc/api/include/torch/torch.h \
    nvidia/cu13/lib/libcudart.so.13 nvidia/cu13/lib/libcupti.so.13 nvidia/nccl/lib/libnccl.so.2; do
    [[ -e "$staging/$needed" ]] || { echo "fetch-libtorch: $needed missing after unpacking" >&2; exit 1; }
done

rm -rf "$site"
mv "$staging" "$site"
touch "$stamp"
echo "fetch-libtorch: ready: LIBTORCH=$site/torch"
