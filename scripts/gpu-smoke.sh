#!/usr/bin/env bash
# GPU smoke test of the NCCL backend's bounds: a rank that never comes must not hang the
# others, whether they wait in the communicator's creation or in an all-reduce. For a machine
# with an NVIDIA GPU; uses binaries built elsewhere (carried in target/release/), so it needs
# no Rust toolchain:
#
#   cargo build --release --example nccl_abort
#   cargo test --release --test nccl --no-run     # optional, prints the test executable's path
#   # copy the tree (with target/release/examples/nccl_abort), then:
#   NCCL_TESTS=target/release/deps/nccl-<hash> scripts/gpu-smoke.sh     # or without NCCL_TESTS
#
# (a) one GPU: rank 0 of a world of 2 creates its non-blocking communicator, rank 1 never
#     joins (NCCL refuses two ranks on one GPU, so a rank blocked in creation is what one GPU
#     can show): the creation ends with NcclTimeout after TIMEOUT_S, and, in a second run with
#     a long timeout, with Aborted right after an abort from another thread.
# (b) two GPUs or more: ranks 0 and 1 form the communicator, rank 0 enters a device
#     all-reduce on the default stream (the training loop's path), rank 1 never does: again
#     NcclTimeout after TIMEOUT_S, and Aborted right after an abort.
# Then, if NCCL_TESTS names it, the NCCL test executable (its GPU tests run here).
#
# Libraries: the torch/lib and nvidia wheels' lib directories of PYTHON's PyTorch (as
# scripts/gpu-bench.sh finds them), else the project's .cache/libtorch/site
# (scripts/fetch-libtorch.sh), ahead of LD_LIBRARY_PATH as given.
# Knobs: TIMEOUT_S (3), ABORT_AFTER_S (1), NCCL_ABORT, NCCL_TESTS, PYTHON.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
nccl_abort=${NCCL_ABORT:-target/release/examples/nccl_abort}
nccl_tests=${NCCL_TESTS:-}
python=${PYTHON:-python3}
export TIMEOUT_S=${TIMEOUT_S:-3}
export ABORT_AFTER_S=${ABORT_AFTER_S:-1}
# A case that runs past this hangs, which is the failure this script exists to catch.
hang_limit=$((${TIMEOUT_S%.*} + 120))

[[ -x $nccl_abort ]] || {
    echo "gpu-smoke: $nccl_abort is missing; build it with: cargo build --release --example nccl_abort" >&2
    exit 1
}

if torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null); then
    site=$(dirname "$torch_dir")
    echo "gpu-smoke: libraries of the PyTorch in $torch_dir"
else
    site="$repo/.cache/libtorch/site"
    torch_dir="$site/torch"
    echo "gpu-smoke: $python has no torch; libraries of $site"
fi
# cudarc's loader looks for libnccl.so; the nvidia-nccl wheel ships only libnccl.so.2.
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
for candidate in "$site"/nvidia/nccl/lib/libnccl.so.2 "$torch_dir"/lib/libnccl.so.2; do
    if [[ -f $candidate ]]; then
        ln -sf "$candidate" "$links/libnccl.so"
        break
    fi
done
nvidia_libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':' || true)
export LD_LIBRARY_PATH="$torch_dir/lib:$links:$nvidia_libs${LD_LIBRARY_PATH:-}"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L || true
fi
echo "gpu-smoke: TIMEOUT_S=$TIMEOUT_S ABORT_AFTER_S=$ABORT_AFTER_S (each case killed after ${hang_limit}s)"

failures=0
results=()
# Runs nccl_abort for one case and keeps its result line (case, outcome, seconds, bound, verdict).
run_case() {
    local case=$1 out rc=0
    echo "-- $nccl_abort $case"
    out=$(timeout --signal=KILL "$hang_limit" "$nccl_abort" "$case" 2>&1) || rc=$?
    printf '%s\n' "$out"
    local line
    line=$(printf '%s\n' "$out" | grep -P "^nccl_abort\t$case\t" | tail -1 || true)
    if [[ $rc -eq 137 ]]; then
        line="nccl_abort	$case	HUNG: killed after ${hang_limit}s	-	-	FAIL"
    elif [[ -z $line ]]; then
        line="nccl_abort	$case	no result (exit $rc)	-	-	FAIL"
    fi
    if [[ $rc -ne 0 || $line == *$'\t'FAIL ]]; then
        failures=$((failures + 1))
    fi
    results+=("$line")
}

echo "== (a) one GPU: world of 2, rank 1 never joins the communicator's creation"
run_case init-timeout
run_case init-abort

# nccl_abort counts the GPUs itself and reports these as skipped on a machine with one.
echo "== (b) two GPUs: rank 0 in an all-reduce, rank 1 never enters it"
run_case all-reduce-timeout
run_case all-reduce-abort

if [[ -n $nccl_tests ]]; then
    echo "== NCCL tests ($nccl_tests)"
    rc=0
    # On the machine that exists to test the GPU path, a test that skips is a failure.
    GANTRY_REQUIRE_GPU=1 timeout --signal=KILL 600 "$nccl_tests" --test-threads=1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        failures=$((failures + 1))
        results+=("nccl tests	$nccl_tests	exit $rc	-	-	FAIL")
    else
        results+=("nccl tests	$nccl_tests	passed	-	-	ok")
    fi
fi

echo "== summary (seconds: from the call for timeouts, from the abort request for aborts)"
printf '| case | outcome | seconds | bound | verdict |\n|---|---|---:|---:|---|\n'
for line in "${results[@]}"; do
    IFS=$'\t' read -r _ case outcome seconds bound verdict <<<"$line"
    printf '| %s | %s | %s | %s | %s |\n' "$case" "$outcome" "$seconds" "$bound" "$verdict"
done
if [[ $failures -gt 0 ]]; then
    echo "gpu-smoke: $failures check(s) failed"
    exit 1
fi
echo "gpu-smoke: every check passed"
