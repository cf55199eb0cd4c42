//! The ring's same-host shared-memory all-reduce (`RingConfig::shared_memory`): results,
//! pieces larger than a slot, mismatches, failures and the fall-back to TCP. Ranks are
//! threads on 127.0.0.1 (one host, so they join the region), joined with a deadline so a hang
//! fails the test.

mod common;

use std::thread;
use std::time::Duration;

use common::{expected_sum, value};
use gantry_collective::{Collective, CollectiveError, ReduceOp, RingCollective, RingConfig};

/// [`common::run_ranks`] with the shared-memory path requested.
fn run_ranks<T, C, B>(n: usize, configure: C, body: B) -> Vec<T>
where
    T: Send + 'static,
    C: Fn(usize, &mut RingConfig),
    B: Fn(usize, Result<RingCollective, gantry_collective::CollectiveError>) -> T
        + Send
        + Sync
        + 'static,
{
    common::run_ranks(
        n,
        |rank, c| {
            c.shared_memory = true;
            configure(rank, c);
        },
        body,
    )
}

/// Every rank's result, with `slot_bytes` slots; also whether each rank used the region.
fn all_reduce_results(n: usize, slot_bytes: usize, lengths: &'static [usize]) -> Vec<bool> {
    run_ranks(
        n,
        |_, c| c.shared_memory_slot_bytes = slot_bytes,
        move |rank, ring| {
            let mut ring = ring.unwrap();
            let shared = ring.uses_shared_memory();
            common::assert_exact_all_reduces(&mut ring, rank, n, lengths);
            // Joining the region costs callers no operations.
            assert_eq!(ring.sequence(), 2 * lengths.len() as u64);
            ring.barrier().unwrap();
            shared
        },
    )
}

#[test]
fn all_reduce_matches_naive_sum_for_2_3_4_ranks_across_slot_boundaries() {
    for n in 2..=4 {
        // 64-byte slots hold 16 floats: 1001 elements take 63 pieces, alternating slots.
        for slot_bytes in [64, 4096, 1 << 20] {
            let shared = all_reduce_results(n, slot_bytes, &[0, 1, 15, 16, 17, 1001, 70_000]);
            assert_eq!(shared, vec![true; n], "n={n}: every rank joined the region");
        }
    }
}

#[test]
fn results_are_bit_identical_on_every_rank() {
    // Values whose float sums depend on the order of addition.
    let results = run_ranks(
        3,
        |_, _| {},
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf: Vec<f32> = (0..10_000)
                .map(|i| {
                    ((i * 7919 + rank * 104_729) as f32).sin() * 10f32.powi((i % 9) as i32 - 4)
                })
                .collect();
            ring.all_reduce_f32(&mut buf, ReduceOp::Average).unwrap();
            buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        },
    );
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[test]
fn broadcasts_still_travel_the_ring() {
    let results = run_ranks(
        3,
        |_, _| {},
        |rank, ring| {
            let mut ring = ring.unwrap();
            assert!(ring.uses_shared_memory());
            let mut buf: Vec<f32> = (0..1001).map(|i| value(rank, i)).collect();
            ring.broadcast_f32(&mut buf, 2).unwrap();
            let mut bytes = if rank == 1 {
                b"gantry".to_vec()
            } else {
                Vec::new()
            };
            ring.broadcast_bytes(&mut bytes, 1).unwrap();
            let mut sum = vec![1.0f32; 5];
            ring.all_reduce_f32(&mut sum, ReduceOp::Sum).unwrap();
            (
                buf == (0..1001).map(|i| value(2, i)).collect::<Vec<_>>(),
                bytes,
                sum,
            )
        },
    );
    for (ok, bytes, sum) in results {
        assert!(ok);
        assert_eq!(bytes, b"gantry");
        assert_eq!(sum, vec![3.0; 5]);
    }
}

#[test]
fn a_rank_that_cannot_map_the_region_keeps_the_whole_group_on_tcp() {
    // Rank 1 expects a region of another size, fails to map rank 0's, and says so: every
    // rank stays on TCP, and the results are still right.
    let results = run_ranks(
        2,
        |rank, c| c.shared_memory_slot_bytes = if rank == 1 { 128 } else { 64 },
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf: Vec<f32> = (0..1001).map(|i| value(rank, i)).collect();
            ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            let right = buf
                .iter()
                .enumerate()
                .all(|(i, &x)| x == expected_sum(2, i));
            (ring.uses_shared_memory(), right, ring.sequence())
        },
    );
    assert_eq!(results, vec![(false, true, 1); 2]);
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
            let again = ring.barrier().unwrap_err();
            (first, again)
        },
    );
    // A rank that compares descriptors with a peer of another length names it and both
    // lengths; a rank still waiting when another has failed hears of that failure instead.
    // Either way every rank fails, with a peer named, and none sums mismatched buffers.
    let mut mismatches = 0;
    for (rank, (first, again)) in results.iter().enumerate() {
        match first {
            CollectiveError::LengthMismatch { peer, ours, theirs } => {
                assert_eq!(
                    (*ours, *theirs),
                    (lens[rank], lens[peer.rank]),
                    "rank {rank}"
                );
                assert_ne!(ours, theirs, "rank {rank}");
                mismatches += 1;
            }
            CollectiveError::PeerDisconnected { peer, .. } => assert_ne!(peer.rank, rank),
            other => panic!("rank {rank}: {other}"),
        }
        assert!(matches!(again, CollectiveError::Poisoned(_)), "{again}");
    }
    assert!(mismatches >= 1, "{results:?}");
}

#[test]
fn mismatched_operations_fail() {
    common::check_mismatched_operations_fail(true);
}

#[test]
fn an_operation_over_tcp_against_one_in_shared_memory_fails_both() {
    let results = run_ranks(
        2,
        |_, _| {},
        |rank, ring| {
            let mut ring = ring.unwrap();
            match rank {
                0 => ring.broadcast_f32(&mut [1.0; 4], 0).unwrap_err(),
                _ => ring
                    .all_reduce_f32(&mut [1.0; 4], ReduceOp::Sum)
                    .unwrap_err(),
            }
        },
    );
    assert!(
        matches!(&results[1], CollectiveError::Protocol { detail, .. } if detail.contains("TCP")),
        "rank 1: {}",
        results[1]
    );
    assert!(
        matches!(results[0], CollectiveError::PeerDisconnected { .. }),
        "rank 0: {}",
        results[0]
    );
}

#[test]
fn silent_peer_times_out_naming_it() {
    common::check_silent_peer_times_out_naming_it(true);
}

#[test]
fn peer_dropping_between_operations_fails_the_others() {
    // Four ranks: rank 1 is not a neighbour of rank 3, which learns of the failure through
    // the region's failure mark or a neighbour closing, never by its timeout.
    common::check_peer_dropping_between_operations_fails_the_others(4, true);
}

#[test]
fn peer_aborted_mid_all_reduce_fails_every_survivor() {
    common::check_peer_aborted_mid_all_reduce_fails_every_survivor(4 << 20, 10_000, true, |e| {
        matches!(e, CollectiveError::PeerDisconnected { .. })
    });
}

#[test]
fn interleaved_shared_memory_and_tcp_operations_never_fail_spuriously() {
    // A rank that finishes an all-reduce moves on to a broadcast over TCP while a slower
    // peer may still be waiting in the same all-reduce: the data arriving on its socket, or
    // a finished rank closing its sockets, must not read as a failure to the slow one. (The
    // window is narrow: this runs the pattern many times with uneven delays; the training
    // test in gantry-worker's world_size.rs, which mixes the two the same way, hit it.)
    let results = run_ranks(
        3,
        |_, _| {},
        |rank, ring| {
            let mut ring = ring.unwrap();
            for i in 0..300usize {
                if (i + rank) % 7 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
                let mut buf = vec![rank as f32; 1 + i % 5];
                ring.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
                assert!(buf.iter().all(|&x| x == 3.0), "step {i}: {buf:?}");
                let mut bytes = if rank == i % 3 {
                    vec![i as u8; 3]
                } else {
                    Vec::new()
                };
                ring.broadcast_bytes(&mut bytes, i % 3).unwrap();
                assert_eq!(bytes, vec![i as u8; 3]);
            }
            let mut last = [1.0f32];
            ring.all_reduce_f32(&mut last, ReduceOp::Sum).unwrap();
            // Dropped at once: peers still in the last all-reduce see our sockets close.
            last[0]
        },
    );
    assert_eq!(results, vec![3.0; 3]);
}

#[test]
fn abort_handle_unblocks_a_rank_whose_neighbour_never_sends() {
    common::check_abort_handle_unblocks_a_rank_whose_neighbour_never_sends(true);
}
