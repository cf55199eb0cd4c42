#!/usr/bin/env bash
# Downloads the NVIDIA wheels of deploy/docker/requirements-gpu.txt (hash-checked) and unpacks
# their nvidia/ trees into SITE, next to the torch/ that scripts/fetch-libtorch.sh unpacked there,
# as pip would lay them out in site-packages (so libtorch_cuda.so's RPATHs resolve).
#
# Usage: fetch-gpu-libs.sh SITE [REQUIREMENTS]
set -euo pipefail

site=${1:?SITE}
here=$(cd "$(dirname "$0")" && pwd)
requirements=${2:-$here/requirements-gpu.txt}
python=${PYTHON:-python3}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

"$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$wheels" -r "$requirements"

mkdir -p "$site"
"$python" - "$wheels" "$site" <<'PY'
import pathlib, sys, zipfile
wheels, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
count = 0
for wheel_path in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("nvidia/")]
        wheel.extractall(dest, members)
        count += len(members)
if count == 0:
    sys.exit("fetch-gpu-libs: no nvidia/ files in the downloaded wheels")
PY
for needed in nvidia/cu13/lib/libcublas.so.13 nvidia/cudnn/lib/libcudnn.so.9 nvidia/nccl/lib/libnccl.so.2 \
    nvidia/cusparselt/lib/libcusparseLt.so.0 nvidia/nvshmem/lib; do
    [[ -e "$site/$needed" ]] || { echo "fetch-gpu-libs: $needed missing after unpacking" >&2; exit 1; }
done
echo "fetch-gpu-libs: NVIDIA libraries unpacked into $site/nvidia"
