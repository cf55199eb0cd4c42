#!/usr/bin/env bash
# Gantry vs PyTorch on this machine, one command (`make bench`):
#   1. libtorch, a release `worker` and `coordinator` (scripts/fetch-libtorch.sh, cargo build
#      --release);
#   2. a virtual environment of its own at .cache/bench-venv with PyPI's torch==2.11.0 (the
#      CUDA build with its NVIDIA wheels, about 4 GB; it also runs on CPU-only machines);
#   3. bench/compare.py: MLP GAN images/s, world 1 and 2, batch 16/64/256, alternating
#      Gantry and PyTorch (DDP + gloo) eager, eager with fused Adam and torch.compile with
#      fused Adam; the ratio Gantry / best PyTorch setup and Gantry / eager; Gantry through
#      `coordinator --workers N` with its generator EMA on and off (world 1 and 2, batch 64);
#      repetitions, phases, scaling, step-time model;
#   4. the same at batch 64 with bf16 autocast in both systems, PyTorch's three setups again
#      (SKIP_BF16=1 skips it; the coordinator rows are fp32 only);
#   5. scripts/bench-allreduce.sh: ring (TCP and same-host shared memory) vs gloo all-reduce
#      bus bandwidth, 1-256 MiB;
#   6. bench/observability_cost.py: Gantry with its TensorBoard event logs on and off
#      (SKIP_OBSERVABILITY=1 skips it);
#   7. the other model families against their PyTorch twins, world 1 and 2 at their default
#      batch: the MLP VAE (bench/torch_vae.py, batch 128) and the PixelCNN
#      (bench/torch_pixelcnn.py, batch 64), the same three PyTorch setups (SKIP_FAMILIES=1
#      skips them), and again in bf16 autocast on both sides (unless SKIP_BF16=1).
# Results: bench/results/<stamp>.{json,md} and the tables on stdout. Not part of the tests.
#
# Knobs: BENCH_ARGS (extra compare.py flags, e.g. "--reps 5",
# "--gantry-set collective.shared_memory=false", "--torch-variants default,fused" to skip
# torch.compile, "--coordinator-worlds none"), SKIP_BF16=1, SKIP_ALLREDUCE=1.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

venv=${GANTRY_BENCH_VENV:-$repo/.cache/bench-venv}
scripts/fetch-libtorch.sh
cargo build --release -q --bin worker --bin coordinator
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "bench: installing PyTorch 2.11.0 into $venv (first run only)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/requirements.txt
fi
"$venv/bin/python" -c 'import torch; print(f"bench: PyTorch {torch.__version__}", file=__import__("sys").stderr)'

# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
"$venv/bin/python" bench/compare.py --python "$venv/bin/python" ${BENCH_ARGS:-}

if [[ -z "${SKIP_BF16:-}" ]]; then
    echo
    echo "bf16 autocast, both systems (batch 64):"
    # shellcheck disable=SC2086
    "$venv/bin/python" bench/compare.py --python "$venv/bin/python" --precision bf16 \
        --batches 64 --coordinator-worlds none ${BENCH_ARGS:-}
fi

if [[ -z "${SKIP_ALLREDUCE:-}" ]]; then
    echo
    echo "All-reduce bus bandwidth, ring vs gloo (2 ranks, loopback):"
    PYTHON="$venv/bin/python" RANKS=2 SIZES_MB=1,4,16,64,256 ITERS=${ALLREDUCE_ITERS:-5} \
        scripts/bench-allreduce.sh
fi

if [[ -z "${SKIP_OBSERVABILITY:-}" ]]; then
    echo
    echo "The cost of TensorBoard event logs (Gantry alone, world 1, batch 64):"
    "$venv/bin/python" bench/observability_cost.py
fi

if [[ -z "${SKIP_FAMILIES:-}" ]]; then
    for family in vae autoregressive; do
        echo
        echo "Model family $family against its PyTorch twin:"
        # shellcheck disable=SC2086 # FAMILY_BENCH_ARGS is a list of flags
        "$venv/bin/python" bench/compare.py --python "$venv/bin/python" --family "$family" \
            ${FAMILY_BENCH_ARGS:-}
        if [[ -z "${SKIP_BF16:-}" ]]; then
            echo
            echo "Model family $family against its PyTorch twin, bf16 autocast in both:"
            # shellcheck disable=SC2086
            "$venv/bin/python" bench/compare.py --python "$venv/bin/python" --family "$family" \
                --precision bf16 ${FAMILY_BENCH_ARGS:-}
        fi
    done
fi
