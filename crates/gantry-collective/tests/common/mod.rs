//! Shared by the ring and shared-memory tests: ranks as threads on 127.0.0.1, ports from
//! binding port 0, each rank on a detached thread joined with a deadline well above the
//! configured timeout, so a hang fails the test instead of hanging CI.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use gantry_collective::{CollectiveError, RingCollective, RingConfig};

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

/// Integer-valued, so sums are exact in any order.
pub fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i * 3) % 101) as f32 - 50.0
}

pub fn expected_sum(n: usize, i: usize) -> f32 {
    (0..n).map(|r| value(r, i)).sum()
}
