//! Shared by the ring and shared-memory tests: ranks as threads on 127.0.0.1, ports from
//! binding port 0, each rank on a detached thread joined with a deadline well above the
//! configured timeout, so a hang fails the test instead of hanging CI.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use gantry_collective::{Collective, CollectiveError, ReduceOp, RingCollective, RingConfig};

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const JOIN_DEADLINE: Duration = Duration::from_secs(90);

pub fn loopback_listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    (listeners, addrs)
}

/// Runs `body(rank, connect_result)` on one thread per rank, each with the config that
/// `configure(rank, config)` leaves, and returns the results in rank order; panics if any
/// rank does not finish in time.
pub fn run_ranks<T, C, B>(n: usize, configure: C, body: B) -> Vec<T>
where
    T: Send + 'static,
    C: Fn(usize, &mut RingConfig),
    B: Fn(usize, Result<RingCollective, CollectiveError>) -> T + Send + Sync + 'static,
{
    let (listeners, addrs) = loopback_listeners(n);
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let mut config = RingConfig::new(rank, n, addrs.clone());
        config.timeout = TIMEOUT;
        configure(rank, &mut config);
        let body = Arc::clone(&body);
        let tx = tx.clone();
        thread::spawn(move || {
            let ring = RingCollective::from_listener(listener, config);
            let _ = tx.send((rank, body(rank, ring)));
        });
    }
    drop(tx);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (rank, v) = rx
            .recv_timeout(JOIN_DEADLINE)
            .expect("a rank hung or panicked");
        out[rank] = Some(v);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// On rank `rank` of `n`: a Sum and an Average all-reduce of [`value`]s for each length,
/// each result equal to [`expected_sum`] (divided by `n`) exactly, element by element.
pub fn assert_exact_all_reduces(
    ring: &mut RingCollective,
    rank: usize,
    n: usize,
    lengths: &[usize],
) {
    for &len in lengths {
        for op in [ReduceOp::Sum, ReduceOp::Average] {
            let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            ring.all_reduce_f32(&mut buf, op).unwrap();
            for (i, &got) in buf.iter().enumerate() {
                let want = match op {
                    ReduceOp::Sum => expected_sum(n, i),
                    ReduceOp::Average => expected_sum(n, i) / n as f32,
                };
                assert_eq!(got, want, "n={n} len={len} {op:?} rank={rank} i={i}");
            }
        }
    }
}

/// Integer-valued, so sums are exact in any order.
pub fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i * 3) % 101) as f32 - 50.0
}

pub fn expected_sum(n: usize, i: usize) -> f32 {
    (0..n).map(|r| value(r, i)).sum()
}

// Failure cases both all-reduce paths (TCP, `shared_memory`) must handle alike.

pub fn check_mismatched_operations_fail(shared_memory: bool) {
    let results = run_ranks(
        2,
        |_, c| c.shared_memory = shared_memory,
        |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 0 {
                ring.barrier().unwrap_err()
            } else {
                ring.all_reduce_f32(&mut [1.0], ReduceOp::Sum).unwrap_err()
            }
        },
    );
    for err in &results {
        let CollectiveError::Protocol { detail, .. } = err else {
            panic!("expected Protocol, got {err}");
        };
        assert!(
            detail.contains("barrier") && detail.contains("all-reduce"),
            "{detail}"
        );
    }
}

pub fn check_silent_peer_times_out_naming_it(shared_memory: bool) {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    let results = run_ranks(
        2,
        |_, c| {
            c.shared_memory = shared_memory;
            c.timeout = Duration::from_millis(300);
        },
        move |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 1 {
                // Alive and connected, but never joins the all-reduce.
                let _ = release_rx.lock().unwrap().recv();
                return None;
            }
            let err = ring
                .all_reduce_f32(&mut [1.0; 8], ReduceOp::Sum)
                .unwrap_err();
            let _ = release_tx.send(());
            Some(err)
        },
    );
    match &results[0] {
        Some(CollectiveError::Timeout { peer, .. }) => assert_eq!(peer.rank, 1),
        other => panic!("expected Timeout naming rank 1, got {other:?}"),
    }
}

/// `n` ranks; rank 1 drops its collective after one operation.
pub fn check_peer_dropping_between_operations_fails_the_others(n: usize, shared_memory: bool) {
    let results = run_ranks(
        n,
        |_, c| c.shared_memory = shared_memory,
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0; 100_000];
            ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            if rank == 1 {
                drop(ring); // a crashed process closes its sockets like this
                return None;
            }
            Some(ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err())
        },
    );
    for (rank, r) in results.iter().enumerate() {
        if rank != 1 {
            let err = r.as_ref().unwrap();
            assert!(
                matches!(err, CollectiveError::PeerDisconnected { .. }),
                "rank {rank}: {err}"
            );
        }
    }
}

/// Four ranks all-reducing `len` floats up to `max_ops` times; rank 2 is aborted from another
/// thread during its second operation (very likely). The victim must see `Aborted`, every
/// survivor an error `survivor_error_ok` accepts that names a peer, and none may hang.
pub fn check_peer_aborted_mid_all_reduce_fails_every_survivor(
    len: usize,
    max_ops: u64,
    shared_memory: bool,
    survivor_error_ok: fn(&CollectiveError) -> bool,
) {
    let n = 4;
    let victim = 2;
    let results = run_ranks(
        n,
        |_, c| c.shared_memory = shared_memory,
        // Abort once the first operation is done and the second is (very likely) under way;
        // either way the ring must fail on every rank rather than hang.
        all_reduce_until_a_rank_aborts(victim, len, max_ops, Duration::from_millis(20)),
    );
    assert_the_abort_reached_every_rank(&results, victim, survivor_error_ok);
}

/// A rank's part in an abort test: up to `max_ops` Sum all-reduces of `len` ones, where rank
/// `victim` aborts itself from another thread `delay` after its first operation completed.
/// Returns the operations completed and the error that ended them; panics if none did.
pub fn all_reduce_until_a_rank_aborts(
    victim: usize,
    len: usize,
    max_ops: u64,
    delay: Duration,
) -> impl Fn(usize, Result<RingCollective, CollectiveError>) -> (u64, CollectiveError)
+ Send
+ Sync
+ 'static {
    let progress = Arc::new(AtomicU64::new(0));
    move |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![1.0f32; len];
        if rank == victim {
            let handle = ring.abort_handle();
            let progress = Arc::clone(&progress);
            thread::spawn(move || {
                while progress.load(Ordering::SeqCst) < 1 {
                    thread::sleep(Duration::from_millis(1));
                }
                thread::sleep(delay);
                handle.abort();
            });
        }
        for i in 0..max_ops {
            if let Err(e) = ring.all_reduce_f32(&mut buf, ReduceOp::Sum) {
                return (i, e);
            }
            if rank == victim {
                progress.store(i + 1, Ordering::SeqCst);
            }
        }
        panic!("rank {rank} never noticed the abort");
    }
}

/// What [`all_reduce_until_a_rank_aborts`] returned on each rank: every rank completed an
/// operation first, the victim ended with `Aborted`, every survivor with an error
/// `survivor_error_ok` accepts that names a peer.
pub fn assert_the_abort_reached_every_rank(
    results: &[(u64, CollectiveError)],
    victim: usize,
    survivor_error_ok: impl Fn(&CollectiveError) -> bool,
) {
    for (rank, (completed, err)) in results.iter().enumerate() {
        assert!(*completed >= 1, "rank {rank} failed too early: {err}");
        if rank == victim {
            assert!(matches!(err, CollectiveError::Aborted), "victim: {err}");
        } else {
            assert!(
                survivor_error_ok(err),
                "victim {victim}, rank {rank}: {err}"
            );
            assert!(
                err.to_string().contains("rank "),
                "error names no peer: {err}"
            );
        }
    }
}

/// Two ranks with a long timeout; rank 1 is connected but never joins the all-reduce. An
/// abort through rank 0's handle, from another thread, must end rank 0's all-reduce with
/// `Aborted` long before the timeout, without counting the operation.
pub fn check_abort_handle_unblocks_a_rank_whose_neighbour_never_sends(shared_memory: bool) {
    let timeout = Duration::from_secs(60);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    let results = run_ranks(
        2,
        |_, c| {
            c.shared_memory = shared_memory;
            c.timeout = timeout;
        },
        move |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 1 {
                // Alive and connected, but never sends.
                let _ = release_rx.lock().unwrap().recv();
                return None;
            }
            let handle = ring.abort_handle();
            let before = handle.sequence();
            let aborter = {
                let handle = handle.clone();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(200));
                    handle.abort();
                })
            };
            let started = std::time::Instant::now();
            let err = ring
                .all_reduce_f32(&mut [1.0; 1024], ReduceOp::Sum)
                .unwrap_err();
            let took = started.elapsed();
            aborter.join().unwrap();
            let _ = release_tx.send(());
            Some((err, took, before, handle.sequence(), ring.sequence()))
        },
    );
    let (err, took, before, after, sequence) = results[0].as_ref().unwrap();
    assert!(matches!(err, CollectiveError::Aborted), "{err}");
    assert!(
        *took < timeout / 2,
        "the aborted all-reduce returned after {took:?} (timeout {timeout:?})"
    );
    assert_eq!(before, after, "the aborted operation was counted");
    assert_eq!(after, sequence);
}
