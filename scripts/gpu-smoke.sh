#!/usr/bin/env bash
# GPU smoke test of the worker's CUDA path, for a machine with one NVIDIA GPU or more and
# PyTorch 2.11 (CUDA) for PYTHON; within one 10-minute command. Uses binaries built elsewhere
# (carried in target/release/), so it needs no Rust toolchain:
#
#   cargo build --release --bin worker --bin coordinator --example gpu_checks \
#       --example nccl_abort
#   cargo test --release --test nccl --no-run     # prints the NCCL test executable's path
#   # copy the tree (with those binaries), then:
#   NCCL_TESTS=target/release/deps/nccl-<hash> scripts/gpu-smoke.sh
#
# One line per check, `PASS|FAIL|SKIP <check> <detail>`, a summary, and exit 1 if any check
# FAILed. DEVICE=cpu smoke-tests the script on a machine without a GPU: every GPU-only check
# is then SKIP, and the exit status is 0 unless something that needs no GPU FAILed.
#
#  list_devices      `worker --list-devices` without LD_LIBRARY_PATH: CUDA support loaded,
#                    one device or more (GANTRY_LIBTORCH_LIB names the machine's torch/lib).
#  gpu_checks        the checks of crates/gantry-worker/examples/gpu_checks.rs, one line each
#                    (`gpu_check <name> <verdict> <detail>`): TF32 flags, libtorch's current
#                    stream, ncclGetVersion = 2.28.9, f32/f16/bf16 (and narrow()-view)
#                    all-reduces, stream ordering behind a long libtorch kernel, one training
#                    step CUDA vs CPU (MLP 1e-5, DCGAN 2e-3 with TF32, 1e-4 without), bf16
#                    autocast.
#  nccl_abort <case> a rank that never comes must not hang the others: (a) one GPU, world
#                    of 2, rank 1 never joins the creation: NcclTimeout after TIMEOUT_S, and
#                    Aborted right after an abort from another thread; (b) two GPUs, rank 0
#                    in a device all-reduce that rank 1 never enters: the same.
#  nccl_tests        NCCL_TESTS, run with GANTRY_REQUIRE_GPU=1: none may skip.
#  coordinator       `coordinator --workers 1 --device cuda` trains 50 steps on NCCL.
#
# Libraries: the torch/lib and nvidia wheels' lib directories of PYTHON's PyTorch, else the
# project's .cache/libtorch/site (scripts/fetch-libtorch.sh), ahead of LD_LIBRARY_PATH as
# given. Knobs: DEVICE (cuda), TIMEOUT_S (3), ABORT_AFTER_S (1), WORKER, COORDINATOR,
# GPU_CHECKS, NCCL_ABORT, NCCL_TESTS, PYTHON.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
device=${DEVICE:-cuda}
worker=${WORKER:-target/release/worker}
coordinator=${COORDINATOR:-target/release/coordinator}
gpu_checks=${GPU_CHECKS:-target/release/examples/gpu_checks}
nccl_abort=${NCCL_ABORT:-target/release/examples/nccl_abort}
nccl_tests=${NCCL_TESTS:-}
python=${PYTHON:-python3}
export TIMEOUT_S=${TIMEOUT_S:-3}
export ABORT_AFTER_S=${ABORT_AFTER_S:-1}
# A case that runs past this hangs, which is the failure this script exists to catch.
hang_limit=$((${TIMEOUT_S%.*} + 120))
case $device in
    cuda) gpu=1 ;;
    cpu) gpu=0 ;;
    *) echo "gpu-smoke: DEVICE must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac

results=()
failures=0
# record VERDICT CHECK DETAIL
record() {
    results+=("$1	$2	${3//$'\n'/ }")
    [[ $1 == FAIL ]] && failures=$((failures + 1))
    printf '%s\t%s\t%s\n' "$1" "$2" "${3//$'\n'/ }"
}
# A check that only a GPU can answer: SKIP on DEVICE=cpu.
gpu_only() { # check detail-when-skipped
    [[ $gpu -eq 1 ]] && return 0
    record SKIP "$1" "DEVICE=cpu: ${2:-needs a GPU}"
    return 1
}
# An executable a check needs: FAIL when missing.
need() { # check path
    [[ -x $2 ]] && return 0
    record FAIL "$1" "$2 is missing (see the build commands at the top of $0)"
    return 1
}

if torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null); then
    site=$(dirname "$torch_dir")
    echo "gpu-smoke: libraries of the PyTorch in $torch_dir"
else
    site="$repo/.cache/libtorch/site"
    torch_dir="$site/torch"
    echo "gpu-smoke: $python has no torch; libraries of $site"
fi
# The carried binaries find libtorch by GANTRY_LIBTORCH_LIB (libtorch_cuda is opened from it).
export GANTRY_LIBTORCH_LIB="$torch_dir/lib"
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
loader_path="$torch_dir/lib:$links:$nvidia_libs${LD_LIBRARY_PATH:-}"

if [[ $gpu -eq 1 ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi -L || true
fi
echo "gpu-smoke: DEVICE=$device TIMEOUT_S=$TIMEOUT_S ABORT_AFTER_S=$ABORT_AFTER_S"

echo "== list_devices: worker --list-devices, no LD_LIBRARY_PATH"
if need list_devices "$worker"; then
    rc=0
    out=$(env -u LD_LIBRARY_PATH timeout 60 "$worker" --list-devices 2>&1) || rc=$?
    printf '%s\n' "$out"
    support=$(printf '%s\n' "$out" | grep -m1 '^cuda support:' || true)
    count=$(printf '%s\n' "$out" | sed -n 's/^cuda devices: \([0-9]*\)$/\1/p' | head -1)
    if [[ $rc -ne 0 ]]; then
        record FAIL list_devices "exit $rc: $(printf '%s\n' "$out" | tail -1)"
    elif [[ $gpu -eq 0 ]]; then
        record SKIP list_devices "DEVICE=cpu: started without LD_LIBRARY_PATH; $support; ${count:-?} device(s)"
    elif [[ $support == "cuda support: loaded"* && ${count:-0} -ge 1 ]]; then
        record PASS list_devices "$support; $count device(s)"
    else
        record FAIL list_devices "want CUDA loaded and a device: ${support:-no cuda support line}; ${count:-?} device(s)"
    fi
fi

export LD_LIBRARY_PATH="$loader_path"

echo "== gpu_checks ($gpu_checks)"
if need gpu_checks "$gpu_checks"; then
    rc=0
    if [[ $gpu -eq 1 ]]; then
        out=$(GANTRY_REQUIRE_GPU=1 timeout --signal=KILL 300 "$gpu_checks" 2>&1) || rc=$?
    else
        out=$(timeout --signal=KILL 300 "$gpu_checks" 2>&1) || rc=$?
    fi
    printf '%s\n' "$out" | grep -v -P '^gpu_check\t' || true
    lines=$(printf '%s\n' "$out" | grep -P '^gpu_check\t' || true)
    while IFS=$'\t' read -r _ name verdict detail; do
        [[ -n $name ]] && record "$verdict" "$name" "$detail"
    done <<<"$lines"
    if [[ -z $lines ]]; then
        record FAIL gpu_checks "no check lines (exit $rc): $(printf '%s\n' "$out" | tail -1)"
    elif [[ $rc -ne 0 ]] && ! grep -qP '\tFAIL\t' <<<"$lines"; then
        record FAIL gpu_checks "exit $rc without a FAIL line (killed or crashed?)"
    fi
fi

echo "== nccl_abort: a rank that never comes"
for case in init-timeout init-abort all-reduce-timeout all-reduce-abort; do
    gpu_only "nccl_abort $case" || continue
    need "nccl_abort $case" "$nccl_abort" || continue
    rc=0
    out=$(timeout --signal=KILL "$hang_limit" "$nccl_abort" "$case" 2>&1) || rc=$?
    printf '%s\n' "$out"
    line=$(printf '%s\n' "$out" | grep -P "^nccl_abort\t$case\t" | tail -1 || true)
    IFS=$'\t' read -r _ _ outcome seconds bound verdict <<<"$line"
    if [[ $rc -eq 137 ]]; then
        record FAIL "nccl_abort $case" "HUNG: killed after ${hang_limit}s"
    elif [[ -z $line ]]; then
        record FAIL "nccl_abort $case" "no result (exit $rc): $(printf '%s\n' "$out" | tail -1)"
    elif [[ $outcome == skipped* ]]; then
        # Needs two GPUs; one GPU cannot show it (NCCL refuses two ranks on one device).
        record SKIP "nccl_abort $case" "$outcome"
    elif [[ $verdict == ok && $rc -eq 0 ]]; then
        record PASS "nccl_abort $case" "$outcome after ${seconds}s (bound ${bound}s)"
    else
        record FAIL "nccl_abort $case" "$outcome after ${seconds}s (bound ${bound}s), exit $rc"
    fi
done

echo "== nccl_tests"
if gpu_only nccl_tests; then
    if [[ -z $nccl_tests ]]; then
        record FAIL nccl_tests "NCCL_TESTS is not set (cargo test --release --test nccl --no-run)"
    elif need nccl_tests "$nccl_tests"; then
        rc=0
        # On the machine that exists to test the GPU path, a test that skips is a failure.
        out=$(GANTRY_REQUIRE_GPU=1 timeout --signal=KILL 300 "$nccl_tests" --test-threads=1 2>&1) || rc=$?
        printf '%s\n' "$out" | tail -20
        summary=$(printf '%s\n' "$out" | grep -m1 '^test result:' || true)
        if [[ $rc -eq 0 ]]; then
            record PASS nccl_tests "${summary:-passed}"
        else
            record FAIL nccl_tests "exit $rc: ${summary:-no test summary}"
        fi
    fi
fi

echo "== coordinator --workers 1 --device cuda: 50 steps on NCCL"
if gpu_only coordinator && need coordinator "$coordinator" && need coordinator "$worker"; then
    run=$(mktemp -d)
    rc=0
    timeout --signal=KILL 240 "$coordinator" --workers 1 --device cuda --steps 50 \
        --worker-bin "$worker" --run-dir "$run/run" --set cluster.backend=nccl \
        --set train.log_every=10 --set samples.every=0 --set checkpoint.every=0 \
        --set eval.samples=0 --set metrics.worker_addr=127.0.0.1:0 >"$run/log" 2>&1 || rc=$?
    tail -5 "$run/log"
    last=$(grep -o '"step":[0-9]*' "$run/run/metrics.jsonl" 2>/dev/null | tail -1 | cut -d: -f2)
    if [[ $rc -eq 0 && ${last:-0} -eq 50 ]]; then
        record PASS coordinator "50 steps on NCCL, exit 0"
    else
        record FAIL coordinator "exit $rc, last step in metrics.jsonl: ${last:-none}: $(tail -1 "$run/log")"
    fi
    rm -rf "$run"
fi

echo "== summary"
for line in "${results[@]}"; do
    printf '%s\n' "$line"
done
passed=$(printf '%s\n' "${results[@]}" | grep -c '^PASS' || true)
skipped=$(printf '%s\n' "${results[@]}" | grep -c '^SKIP' || true)
echo "gpu-smoke: $passed passed, $failures failed, $skipped skipped"
[[ $failures -eq 0 ]]
