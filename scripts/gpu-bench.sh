#!/usr/bin/env bash
# GPU smoke test and benchmark, for a machine with an NVIDIA GPU and PyTorch 2.11 (CUDA) for
# `python3`. Uses Gantry binaries built elsewhere (carried in target/release/) against that
# PyTorch's libtorch, so the machine needs no Rust toolchain:
#
#   cargo build --release --bin worker && cargo build --release -p gantry-collective --example nccl_bench
#   # copy the tree (with target/release/worker and target/release/examples/nccl_bench), then:
#   scripts/gpu-bench.sh
#
# 1. `worker --list-devices` (libtorch_cuda loaded, the GPU seen);
# 2. NCCL through Gantry's backend, one rank: all-reduce correctness and bandwidth, 1-256 MiB;
# 3. (one host thread each side, as bench/torch_gan.py's default) images/s of the MLP GAN (batch 64 and 1024) and the DCGAN (batch 256): Gantry fp32 and
#    bf16 (train.precision), PyTorch eager fp32 and bf16 autocast, torch.compile fp32; one
#    table, then the DCGAN's Gantry fp32 with TF32 off (train.tf32 = false). Budget: under 8
#    minutes.
#
# TF32: libtorch 2.11, like PyTorch, runs CUDA float32 convolutions (cuDNN) in TF32 by default
# and cuBLAS matmuls in full fp32. Gantry's `train.tf32 = true` (the default) keeps exactly
# that, so every "fp32" column below has TF32 convolutions on both sides (the DCGAN; the MLP
# has none); the last line turns TF32 off for cuDNN and cuBLAS.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
worker=${WORKER:-target/release/worker}
nccl_bench=${NCCL_BENCH:-target/release/examples/nccl_bench}
python=${PYTHON:-python3}
steps=${STEPS:-300}
warmup=${WARMUP:-30}
# DEVICE=cpu smoke-tests the script itself on a machine without a GPU.
device=${DEVICE:-cuda}

torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || {
    echo "gpu-bench: $python has no torch" >&2; exit 1; }
site=$(dirname "$torch_dir")
# cudarc's loader looks for libnccl.so; the nvidia-nccl wheel ships only libnccl.so.2.
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
for candidate in "$site"/nvidia/nccl/lib/libnccl.so.2 "$torch_dir"/lib/libnccl.so.2; do
    [[ -f $candidate ]] && { ln -sf "$candidate" "$links/libnccl.so"; break; }
done
nvidia_libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$torch_dir/lib:$links:$nvidia_libs${LD_LIBRARY_PATH:-}"
export GANTRY_LIBTORCH_LIB="$torch_dir/lib"
"$python" -c 'import torch; gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"; print(f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}")'

echo "== worker --list-devices"
"$worker" --list-devices

echo "== NCCL all-reduce, one rank (MiB, algbw GB/s, median ms, check)"
"$nccl_bench" || echo "nccl_bench failed (exit $?)"

gantry() { # kind batch precision [tf32] -> images/s
    local dir; dir=$(mktemp -d)
    timeout 300 "$worker" --standalone --device "$device" --run-dir "$dir/run" \
        --set model.kind="$1" --set train.batch_size="$2" --set train.precision="$3" --set train.tf32="${4:-true}" \
        --set train.steps=$((warmup + steps)) \
        --set train.log_every="$warmup" --set samples.every=0 --set checkpoint.every=0 \
        --set eval.samples=0 --set train.ema_decay=0 --set metrics.worker_addr=127.0.0.1:0 \
        --set train.threads=1 \
        >"$dir/log" 2>&1 || { tail -5 "$dir/log" >&2; echo "failed"; rm -rf "$dir"; return; }
    "$python" - "$dir/run/metrics.jsonl" "$warmup" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
warm, batch = int(sys.argv[2]), int(sys.argv[3])
a = next(r for r in rows if r["step"] == warm); b = rows[-1]
print(f"{(b['step'] - warm) * batch / (b['wall_seconds'] - a['wall_seconds']):.0f}")
PY
    rm -rf "$dir"
}
pytorch() { # model batch extra-flags... -> images/s
    local model=$1 batch=$2; shift 2
    timeout 300 "$python" bench/torch_gan.py --device "$device" --model "$model" \
        --batch-size "$batch" --steps "$steps" \
        --warmup "$warmup" "$@" 2>/dev/null | "$python" -c \
        'import json, sys; d = json.loads(sys.stdin.read().splitlines()[-1]); print(round(d["images_per_second"]))' \
        || echo "failed"
}

echo "== images/s (higher is better)"
printf '| model | batch | Gantry fp32 | Gantry bf16 | PyTorch eager fp32 | PyTorch eager bf16 | PyTorch compile fp32 |\n'
printf '|---|---:|---:|---:|---:|---:|---:|\n'
for job in "mlp 64" "mlp 1024" "dcgan 256"; do
    read -r model batch <<<"$job"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$model" "$batch" \
        "$(gantry "$model" "$batch" fp32)" "$(gantry "$model" "$batch" bf16)" \
        "$(pytorch "$model" "$batch")" "$(pytorch "$model" "$batch" --bf16)" \
        "$(pytorch "$model" "$batch" --compile)"
done
echo "TF32: fp32 columns use libtorch's defaults (cuDNN convolutions in TF32, cuBLAS matmuls in fp32)"
echo "dcgan 256, Gantry fp32 with train.tf32=false: $(gantry dcgan 256 fp32 false) images/s"
