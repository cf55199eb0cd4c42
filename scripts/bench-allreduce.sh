#!/usr/bin/env bash
# All-reduce bus bandwidth: Gantry's ring backend (over TCP, and through same-host shared
# memory) vs PyTorch gloo, same sizes
# and rank counts, loopback, run one after the other (not concurrently, so
# they do not compete for cores). Prints one Markdown table.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench-allreduce.sh
#
# PYTHON must have torch (CPU is enough). Knobs: RANKS, SIZES_MB, ITERS, WARMUP.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RANKS=${RANKS:-2,4}
SIZES_MB=${SIZES_MB:-1,4,8,16,64,256}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
common=(--ranks "$RANKS" --sizes-mb "$SIZES_MB" --iters "$ITERS" --warmup "$WARMUP")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "building and running the ring benchmark (release)..." >&2
cargo bench -q -p gantry-collective --bench ring_allreduce -- "${common[@]}" >"$tmp/ring.tsv"
cargo bench -q -p gantry-collective --bench ring_allreduce -- "${common[@]}" --shared-memory \
    >"$tmp/shm.tsv"
echo "running the gloo benchmark..." >&2
"$PYTHON" bench/gloo_allreduce.py "${common[@]}" >"$tmp/gloo.tsv"

"$PYTHON" - "$tmp/ring.tsv" "$tmp/shm.tsv" "$tmp/gloo.tsv" <<'PY'
import sys

def load(path):
    out = {}
    for line in open(path):
        parts = line.split("\t")
        if len(parts) == 5:
            out[(int(parts[1]), int(parts[2]))] = (float(parts[3]), float(parts[4]))
    return out

ring, shm, gloo = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
print("| ranks | size (MiB) | ring TCP busbw (GB/s) | ring shared-memory busbw | gloo busbw "
      "| TCP / gloo | shared memory / gloo | TCP ms | shared memory ms | gloo ms |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
fmt = lambda v, i: f"{v[i]:.2f}" if v else "-"
ratio = lambda a, b: f"{a[0] / b[0]:.2f}x" if a and b else "-"
for key in sorted(set(ring) | set(shm) | set(gloo)):
    r, s, g = ring.get(key), shm.get(key), gloo.get(key)
    print(f"| {key[0]} | {key[1]} | {fmt(r, 0)} | {fmt(s, 0)} | {fmt(g, 0)} | {ratio(r, g)} "
          f"| {ratio(s, g)} | {fmt(r, 1)} | {fmt(s, 1)} | {fmt(g, 1)} |")
PY
