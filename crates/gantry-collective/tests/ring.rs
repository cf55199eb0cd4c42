//! Ring backend tests: ranks are threads talking over 127.0.0.1, ports come
//! from binding port 0. Every multi-rank test runs its ranks on detached
//! threads joined with a deadline well above the configured timeout, so a
//! hang fails the test instead of hanging CI.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{loopback_listeners, run_ranks, value};
use gantry_collective::{Collective, CollectiveError, ReduceOp, RingCollective, RingConfig};

fn check_all_reduce(n: usize, lengths: &'static [usize], chunk_bytes: usize) {
    let results = run_ranks(
        n,
        |_, c| c.chunk_bytes = chunk_bytes,
        move |rank, ring| {
            let mut ring = ring.unwrap();
            common::assert_exact_all_reduces(&mut ring, rank, n, lengths);
            ring.sequence()
        },
    );
    let ops = 2 * lengths.len() as u64;
    assert_eq!(
        results,
        vec![ops; n],
        "every rank completed every operation"
    );
}

#[test]
fn all_reduce_matches_naive_sum_for_2_3_4_ranks() {
    for n in 2..=4 {
        let lengths: &'static [usize] = match n {
            2 => &[0, 1, 1, 1001, 4097],
            3 => &[0, 1, 2, 1001, 4097],
            _ => &[0, 1, 3, 1001, 4097],
        };
        check_all_reduce(n, lengths, 256 * 1024);
    }
}

#[test]
fn all_reduce_with_tiny_chunks_crosses_chunk_boundaries() {
    // 12-byte chunks: segments of odd length end in partial chunks, and the
    // chunk order returned by the sender must line up with the all-gather.
    check_all_reduce(3, &[7, 1001], 12);
    check_all_reduce(4, &[5, 1001], 12);
}

/// A block of integer-valued floats with period 13, so it never lines up with
/// segment or chunk boundaries.
fn pattern_block(offset: f32) -> Vec<f32> {
    (0..13 * 4096).map(|i| (i % 13) as f32 + offset).collect()
}

#[test]
fn all_reduce_64_mib_for_2_3_4_ranks() {
    const LEN: usize = 16 << 20; // 16 Mi f32 = 64 MiB
    for n in 2..=4 {
        let mismatched_blocks = run_ranks(
            n,
            |_, _| {},
            move |rank, ring| {
                let mut ring = ring.unwrap();
                // Fill and check by whole-block memcpy/memcmp: this test crate
                // is built without optimisation, and per-element loops over
                // 64 MiB would dominate the test time.
                let block = pattern_block(rank as f32);
                let mut buf = vec![0.0f32; LEN];
                for c in buf.chunks_mut(block.len()) {
                    c.copy_from_slice(&block[..c.len()]);
                }
                ring.all_reduce_f32(&mut buf, ReduceOp::Average).unwrap();
                // Average over ranks of (k + rank) is k + (n - 1) / 2.
                let want = pattern_block((n - 1) as f32 / 2.0);
                buf.chunks(want.len())
                    .filter(|c| {
                        bytemuck::cast_slice::<f32, u8>(c)
                            != bytemuck::cast_slice::<f32, u8>(&want[..c.len()])
                    })
                    .count()
            },
        );
        assert_eq!(mismatched_blocks, vec![0; n], "n={n}");
    }
}

#[test]
fn broadcast_f32_from_every_root() {
    for n in [2usize, 3, 4] {
        let results = run_ranks(
            n,
            |_, c| c.chunk_bytes = 64,
            move |rank, ring| {
                let mut ring = ring.unwrap();
                let mut ok = true;
                for root in 0..n {
                    for len in [0usize, 1, 1001] {
                        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
                        ring.broadcast_f32(&mut buf, root).unwrap();
                        ok &= buf.iter().enumerate().all(|(i, &x)| x == value(root, i));
                    }
                }
                ok
            },
        );
        assert_eq!(results, vec![true; n], "n={n}");
    }
}

#[test]
fn broadcast_bytes_carries_the_roots_length() {
    let n = 3;
    let results = run_ranks(
        n,
        |_, c| c.chunk_bytes = 100,
        move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut got = Vec::new();
            for (root, root_len) in [(0usize, 12_345usize), (2, 0), (1, 7)] {
                // Non-roots start with a different length on purpose.
                let mut buf = if rank == root {
                    (0..root_len).map(|i| (i * 31 + root) as u8).collect()
                } else {
                    vec![0xAA; rank * 3 + 1]
                };
                ring.broadcast_bytes(&mut buf, root).unwrap();
                got.push(buf);
            }
            got
        },
    );
    for (rank, got) in results.iter().enumerate() {
        for (k, (root, root_len)) in [(0usize, 12_345usize), (2, 0), (1, 7)].iter().enumerate() {
            let want: Vec<u8> = (0..*root_len).map(|i| (i * 31 + root) as u8).collect();
            assert_eq!(got[k], want, "rank {rank}, broadcast {k}");
        }
    }
}

#[test]
fn barrier_completes_and_advances_sequence() {
    let results = run_ranks(
        3,
        |_, _| {},
        |_, ring| {
            let mut ring = ring.unwrap();
            for _ in 0..5 {
                ring.barrier().unwrap();
            }
            ring.sequence()
        },
    );
    assert_eq!(results, vec![5; 3]);
}

#[test]
fn world_size_one_is_local() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut ring = RingCollective::connect(RingConfig::new(0, 1, vec![addr])).unwrap();
    let mut buf = vec![1.0, 2.0, 3.0];
    ring.all_reduce_f32(&mut buf, ReduceOp::Average).unwrap();
    assert_eq!(buf, [1.0, 2.0, 3.0]);
    ring.barrier().unwrap();
    assert!(ring.abort_handle().sequence() == 2);
    let mut bytes = b"hello".to_vec();
    ring.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(bytes, b"hello");
    assert!(matches!(
        ring.broadcast_f32(&mut buf, 1),
        Err(CollectiveError::InvalidArgument(_))
    ));
    assert_eq!(ring.sequence(), 3);
}

#[test]
fn invalid_configs_are_rejected() {
    let addrs: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(); 2];
    for config in [
        RingConfig::new(2, 2, addrs.clone()),
        RingConfig::new(0, 3, addrs.clone()),
        RingConfig::new(0, 0, vec![]),
        RingConfig {
            chunk_bytes: 0,
            ..RingConfig::new(0, 2, addrs.clone())
        },
    ] {
        let err = RingCollective::connect(config).unwrap_err();
        assert!(matches!(err, CollectiveError::InvalidArgument(_)), "{err}");
    }
}

#[test]
fn missing_peer_fails_connect_within_timeout_naming_it() {
    // Rank 1's address is reserved then released: nobody will ever listen.
    let (mut listeners, addrs) = loopback_listeners(2);
    drop(listeners.pop());
    let listener = listeners.pop().unwrap();
    let mut config = RingConfig::new(0, 2, addrs.clone());
    config.timeout = Duration::from_millis(500);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(RingCollective::from_listener(listener, config));
    });
    let err = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("connect hung past its timeout")
        .unwrap_err();
    match &err {
        CollectiveError::ConnectTimeout { peer, .. } => {
            assert_eq!(peer.rank, 1);
            assert_eq!(peer.addr, addrs[1]);
        }
        other => panic!("expected ConnectTimeout, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("rank 1") && msg.contains(&addrs[1].to_string()),
        "{msg}"
    );
}

#[test]
fn missing_left_neighbour_fails_accept_naming_it() {
    // 3 ranks, rank 2 never starts: rank 1 cannot connect to it (its right
    // neighbour) and rank 0 never hears from it (its left neighbour).
    let (mut listeners, addrs) = loopback_listeners(3);
    drop(listeners.pop());
    let (tx, rx) = mpsc::channel();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let mut config = RingConfig::new(rank, 3, addrs.clone());
        config.timeout = Duration::from_millis(500);
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send((rank, RingCollective::from_listener(listener, config)));
        });
    }
    for _ in 0..2 {
        let (rank, r) = rx.recv_timeout(Duration::from_secs(30)).expect("hung");
        let err = r.unwrap_err();
        match (rank, &err) {
            (0, CollectiveError::AcceptTimeout { peer, .. })
            | (1, CollectiveError::ConnectTimeout { peer, .. }) => assert_eq!(peer.rank, 2),
            _ => panic!("rank {rank}: unexpected {err}"),
        }
    }
}

#[test]
fn wrong_session_is_refused_naming_the_peer() {
    let results = run_ranks(
        2,
        |_, c| {
            c.session_id = 100 + c.rank as u64;
            c.timeout = Duration::from_secs(2);
        },
        |_, ring| ring.map(|_| ()).unwrap_err(),
    );
    for (rank, err) in results.iter().enumerate() {
        match err {
            CollectiveError::Handshake { peer, reason } => {
                assert_eq!(peer.rank, 1 - rank, "{err}");
                assert!(reason.contains("session"), "{reason}");
            }
            other => panic!("rank {rank}: expected Handshake, got {other}"),
        }
    }
}

#[test]
fn strangers_at_the_ring_port_are_dropped_and_the_ring_still_forms() {
    use std::io::Write;
    let secret = b"the ring secret of this generation".to_vec();
    let (mut listeners, addrs) = loopback_listeners(2);
    let rank1_listener = listeners.pop().unwrap();
    let rank0_listener = listeners.pop().unwrap();
    let config = |rank: usize, secret: &[u8]| {
        let mut c = RingConfig::new(rank, 2, addrs.clone());
        c.timeout = Duration::from_secs(5);
        c.session_id = 7;
        c.secret = secret.to_vec();
        c
    };
    let (tx, rx) = mpsc::channel();
    {
        let (tx, c) = (tx.clone(), config(0, &secret));
        thread::spawn(move || {
            let mut ring = RingCollective::from_listener(rank0_listener, c).unwrap();
            let mut buf = vec![1.0f32; 8];
            ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            let _ = tx.send((0, buf, ring.strangers_refused()));
        });
    }
    // Before the real rank 1: garbage, a silent connection, and an impostor that knows the
    // session id (it is no secret) but not the ring secret, claiming to be rank 1.
    let mut garbage = std::net::TcpStream::connect(addrs[0]).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n-----------------------------------------")
        .unwrap();
    let _silent = std::net::TcpStream::connect(addrs[0]).unwrap();
    let impostor_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut impostor = config(1, b"a guess");
    impostor.peers[1] = impostor_listener.local_addr().unwrap();
    impostor.timeout = Duration::from_secs(1);
    let refused = RingCollective::from_listener(impostor_listener, impostor).map(|_| ());
    assert!(refused.is_err(), "the impostor joined");
    {
        let (tx, c) = (tx.clone(), config(1, &secret));
        thread::spawn(move || {
            let mut ring = RingCollective::from_listener(rank1_listener, c).unwrap();
            let mut buf = vec![2.0f32; 8];
            ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            let _ = tx.send((1, buf, ring.strangers_refused()));
        });
    }
    let mut strangers = [0u64; 2];
    for _ in 0..2 {
        let (rank, buf, refused) = rx.recv_timeout(Duration::from_secs(30)).expect("hung");
        assert_eq!(buf, vec![3.0f32; 8], "rank {rank}");
        strangers[rank] = refused;
    }
    // Garbage and the impostor were refused before rank 1 arrived (the silent one may still
    // be waiting out its handshake).
    assert!(
        strangers[0] >= 2,
        "rank 0 refused {} strangers",
        strangers[0]
    );
    assert_eq!(strangers[1], 0);
}

#[test]
fn ranks_with_different_ring_secrets_never_form_a_ring() {
    let results = run_ranks(
        2,
        |rank, c| {
            c.secret = vec![rank as u8; 32];
            c.timeout = Duration::from_secs(2);
        },
        |_, ring| ring.map(|_| ()).unwrap_err(),
    );
    for (rank, err) in results.iter().enumerate() {
        assert!(
            err.to_string().contains("ring secret"),
            "rank {rank}: {err}"
        );
    }
}

#[test]
fn mismatched_lengths_fail_on_every_rank() {
    let lens = [10usize, 10, 12];
    let results = run_ranks(
        3,
        |_, _| {},
        move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0; lens[rank]];
            let first = ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err();
            // Once failed, the collective refuses further work.
            let again = ring.barrier().unwrap_err();
            (first, again)
        },
    );
    // Rank 0 hears rank 2's 12 (ours 10); rank 2 hears rank 1's 10 (ours 12);
    // rank 1 saw a matching header and then its left neighbour disappear.
    match &results[0].0 {
        CollectiveError::LengthMismatch { peer, ours, theirs } => {
            assert_eq!((peer.rank, *ours, *theirs), (2, 10, 12));
        }
        other => panic!("rank 0: {other}"),
    }
    match &results[2].0 {
        CollectiveError::LengthMismatch { peer, ours, theirs } => {
            assert_eq!((peer.rank, *ours, *theirs), (1, 12, 10));
        }
        other => panic!("rank 2: {other}"),
    }
    assert!(
        matches!(results[1].0, CollectiveError::PeerDisconnected { .. }),
        "rank 1: {}",
        results[1].0
    );
    for (_, again) in &results {
        assert!(matches!(again, CollectiveError::Poisoned(_)), "{again}");
    }
}

#[test]
fn mismatched_operations_fail() {
    common::check_mismatched_operations_fail(false);
}

#[test]
fn silent_peer_times_out_naming_it() {
    common::check_silent_peer_times_out_naming_it(false);
}

#[test]
fn peer_dropping_between_operations_fails_the_others() {
    common::check_peer_dropping_between_operations_fails_the_others(3, false);
}

#[test]
fn peer_aborted_mid_all_reduce_fails_every_survivor() {
    // 32 MiB: an operation takes a while in debug. A survivor may time out rather than see
    // the disconnect, if it is waiting on a rank that is itself blocked.
    common::check_peer_aborted_mid_all_reduce_fails_every_survivor(8 << 20, 1000, false, |e| {
        matches!(
            e,
            CollectiveError::PeerDisconnected { .. } | CollectiveError::Timeout { .. }
        )
    });
}

#[test]
fn abort_handle_unblocks_a_rank_whose_neighbour_never_sends() {
    common::check_abort_handle_unblocks_a_rank_whose_neighbour_never_sends(false);
}

#[test]
fn a_dropped_peer_names_its_io_error_once_in_a_report() {
    let results = run_ranks(
        2,
        |_, _| {},
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = [1.0; 4096];
            ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            if rank == 1 {
                drop(ring);
                return None;
            }
            Some(ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err())
        },
    );
    let err = results.into_iter().next().flatten().unwrap();
    assert!(
        matches!(err, CollectiveError::PeerDisconnected { .. }),
        "{err}"
    );
    let io_text = std::error::Error::source(&err)
        .expect("a disconnect carries its I/O error")
        .to_string();
    let message = err.to_string();
    assert!(!message.contains(&io_text), "{message}");
    let report = format!("{:#}", anyhow::Error::new(err));
    assert_eq!(report.matches(&io_text).count(), 1, "{report}");
    assert!(report.starts_with(&message), "{report}");
}
