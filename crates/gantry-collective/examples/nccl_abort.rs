//! How long Gantry's NCCL backend takes to give up on a rank that never comes, measured on
//! this machine's GPUs (scripts/gpu-smoke.sh runs it). Needs libnccl.so on the loader path
//! and a CUDA GPU; the all-reduce cases need two.
//!
//! Cases (every one this machine can run, or those named as arguments):
//! * `init-timeout`: rank 0 of a world of 2 creates its non-blocking communicator and rank 1
//!   never joins (what one GPU can show: NCCL refuses two ranks on one device). Expected:
//!   `NcclTimeout` about `TIMEOUT_S` after the call.
//! * `init-abort`: the same with a long timeout, aborted from another thread `ABORT_AFTER_S`
//!   into the creation, through the handle given to `with_abort_handle`. Expected: `Aborted`
//!   soon after the abort.
//! * `all-reduce-timeout` (2 GPUs): ranks 0 and 1 (threads, on GPUs 0 and 1) form the
//!   communicator; rank 0 enters a device all-reduce on the default stream (the training
//!   loop's path), rank 1 never does. Expected: `NcclTimeout` about `TIMEOUT_S` after the call.
//! * `all-reduce-abort` (2 GPUs): the same with a long timeout, rank 0 aborted through its
//!   handle `ABORT_AFTER_S` into the all-reduce. Expected: `Aborted` soon after the abort.
//!
//! Prints one tab-separated line per case: `nccl_abort`, the case, the outcome, the seconds
//! measured (from the call for timeouts, from the abort request for aborts), the bound they
//! must stay under, and `ok` or `FAIL`. Exits 1 if a case failed, 2 if NCCL or a GPU is
//! missing.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DevicePtrMut};
use gantry_collective::nccl::{NcclCollective, NcclId, cuda_device_count, nccl_library_present};
use gantry_collective::{AbortHandle, Collective, CollectiveError, ReduceOp};

/// What `ncclCommAbort` and the polling may add to a timeout, or take after an abort request,
/// before a case counts as failed. Generous: the point is "bounded", not "fast".
const SLACK: Duration = Duration::from_secs(10);

fn seconds_from_env(name: &str, default: f64) -> Duration {
    let value = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(value)
}

#[derive(Debug, Clone, Copy)]
struct Knobs {
    timeout: Duration,
    long_timeout: Duration,
    abort_after: Duration,
}

/// One case's outcome, the seconds measured and the bound they must stay under.
struct Measured {
    outcome: String,
    /// The outcome is the expected error.
    expected: bool,
    seconds: Duration,
    bound: Duration,
}

impl Measured {
    fn setup_failed(why: String) -> Self {
        Measured {
            outcome: format!("set-up failed: {why}"),
            expected: false,
            seconds: Duration::ZERO,
            bound: Duration::ZERO,
        }
    }
}

/// Aborts `handle` after `delay` and sends the instant it did.
fn abort_later(handle: AbortHandle, delay: Duration) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        thread::sleep(delay);
        let at = Instant::now();
        handle.abort();
        let _ = tx.send(at);
    });
    rx
}

/// For a timeout case (`aborted_at` is `None`): the seconds from the call, under the timeout
/// plus slack, ending in `NcclTimeout`. For an abort case: the seconds from the abort
/// request, under the slack, ending in `Aborted`.
fn measure(
    outcome: Result<(), CollectiveError>,
    started: Instant,
    returned: Instant,
    aborted_at: Option<mpsc::Receiver<Instant>>,
    timeout: Duration,
) -> Measured {
    let (expected, seconds, bound) = match aborted_at {
        Some(rx) => {
            // A call that returned before the abort measures zero; its outcome then tells.
            let at = rx.recv_timeout(SLACK * 10).unwrap_or(started);
            (
                matches!(outcome, Err(CollectiveError::Aborted)),
                returned.saturating_duration_since(at),
                SLACK,
            )
        }
        None => (
            matches!(outcome, Err(CollectiveError::NcclTimeout { .. })),
            returned - started,
            timeout + SLACK,
        ),
    };
    Measured {
        outcome: match outcome {
            Ok(()) => "completed (expected an error)".to_owned(),
            Err(e) => e.to_string(),
        },
        expected,
        seconds,
        bound,
    }
}

/// Rank 0 of a world of 2 alone: its creation waits for a rank 1 that never comes.
fn init_alone(k: Knobs, abort: bool) -> Measured {
    let id = match NcclId::new() {
        Ok(id) => id,
        Err(e) => return Measured::setup_failed(e.to_string()),
    };
    let handle = AbortHandle::new();
    let (timeout, aborted_at) = if abort {
        (
            k.long_timeout,
            Some(abort_later(handle.clone(), k.abort_after)),
        )
    } else {
        (k.timeout, None)
    };
    let started = Instant::now();
    let outcome = NcclCollective::with_abort_handle(0, 2, id.as_bytes(), 0, timeout, handle);
    let returned = Instant::now();
    measure(outcome.map(drop), started, returned, aborted_at, timeout)
}

/// Two ranks on GPUs 0 and 1; rank 0 enters a device all-reduce, rank 1 never does.
fn all_reduce_alone(k: Knobs, abort: bool) -> Measured {
    let id = match NcclId::new() {
        Ok(id) => id,
        Err(e) => return Measured::setup_failed(e.to_string()),
    };
    let timeout = if abort { k.long_timeout } else { k.timeout };
    // Creation is collective: rank 1 joins on its own thread while rank 0 joins on this one.
    let (joined_tx, joined_rx) = mpsc::channel::<Result<(), String>>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let partner = {
        let id = *id.as_bytes();
        thread::spawn(move || match NcclCollective::new(1, 2, &id, 1, timeout) {
            Ok(mut c) => {
                let _ = joined_tx.send(Ok(()));
                // Alive and in the communicator, but never enters the all-reduce.
                let _ = release_rx.recv();
                c.abort();
            }
            Err(e) => {
                let _ = joined_tx.send(Err(format!("rank 1: {e}")));
            }
        })
    };
    let ours = NcclCollective::new(0, 2, id.as_bytes(), 0, timeout);
    let theirs = joined_rx
        .recv_timeout(timeout + SLACK)
        .unwrap_or_else(|_| Err("rank 1 did not finish joining".into()));
    let mut c = match (ours, theirs) {
        (Ok(c), Ok(())) => c,
        (ours, theirs) => {
            let _ = release_tx.send(());
            let _ = partner.join();
            let why = [ours.err().map(|e| format!("rank 0: {e}")), theirs.err()];
            return Measured::setup_failed(
                why.into_iter().flatten().collect::<Vec<_>>().join("; "),
            );
        }
    };
    let ctx = match CudaContext::new(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = release_tx.send(());
            let _ = partner.join();
            return Measured::setup_failed(format!("CUDA context: {e:?}"));
        }
    };
    let stream = ctx.default_stream();
    let len = 1 << 20;
    let mut buf = match stream.alloc_zeros::<f32>(len) {
        Ok(buf) => buf,
        Err(e) => {
            let _ = release_tx.send(());
            let _ = partner.join();
            return Measured::setup_failed(format!("device buffer: {e:?}"));
        }
    };
    let aborted_at = abort.then(|| abort_later(c.abort_handle(), k.abort_after));
    let started = Instant::now();
    let outcome = {
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        // SAFETY: `buf` holds `len` f32s on device 0, used only on the default stream.
        unsafe { c.all_reduce_device_f32(ptr, len, ReduceOp::Sum) }.map(drop)
    };
    let returned = Instant::now();
    let _ = release_tx.send(());
    let _ = partner.join();
    measure(outcome, started, returned, aborted_at, timeout)
}

fn main() {
    if !nccl_library_present() {
        println!("nccl_abort: skipped: libnccl.so is not on the loader path");
        std::process::exit(2);
    }
    let gpus = match cuda_device_count() {
        Ok(n) if n > 0 => n,
        other => {
            println!("nccl_abort: skipped: no CUDA device ({other:?})");
            std::process::exit(2);
        }
    };
    let k = Knobs {
        timeout: seconds_from_env("TIMEOUT_S", 3.0),
        long_timeout: seconds_from_env("LONG_TIMEOUT_S", 300.0),
        abort_after: seconds_from_env("ABORT_AFTER_S", 1.0),
    };
    type Case = (&'static str, usize, fn(Knobs) -> Measured);
    let cases: [Case; 4] = [
        ("init-timeout", 1, |k| init_alone(k, false)),
        ("init-abort", 1, |k| init_alone(k, true)),
        ("all-reduce-timeout", 2, |k| all_reduce_alone(k, false)),
        ("all-reduce-abort", 2, |k| all_reduce_alone(k, true)),
    ];
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "nccl_abort: {gpus} GPU(s), timeout {:?}, abort after {:?} (long timeout {:?})",
        k.timeout, k.abort_after, k.long_timeout
    );
    let mut failed = false;
    for (name, needs, run) in cases {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        if gpus < needs {
            println!("nccl_abort\t{name}\tskipped: needs {needs} GPUs\t-\t-\t-");
            continue;
        }
        let m = run(k);
        let ok = m.expected && m.seconds < m.bound;
        failed |= !ok;
        println!(
            "nccl_abort\t{name}\t{}\t{:.3}\t{:.0}\t{}",
            m.outcome,
            m.seconds.as_secs_f64(),
            m.bound.as_secs_f64(),
            if ok { "ok" } else { "FAIL" }
        );
    }
    std::process::exit(i32::from(failed));
}
