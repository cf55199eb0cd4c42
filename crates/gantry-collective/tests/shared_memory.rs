//! The ring's same-host shared-memory all-reduce (`RingConfig::shared_memory`): results,
//! pieces larger than a slot, mismatches, failures and the fall-back to TCP. Ranks are
//! threads on 127.0.0.1 (one host, so they join the region), joined with a deadline so a hang
//! fails the test.

mod common;

use std::thread;
use std::time::Duration;

use common::{expected_sum, value};
use gantry_collective::{
    Collective, CollectiveError, GradientPiece, ReduceOp, RingCollective, RingConfig, gather_pieces,
};

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

/// Rank `rank`'s gradient pieces: bf16 and f32 pieces interleaved (an odd-length bf16 piece
/// first, so the next piece's offset needs rounding), values whose float sums depend on the
/// order of addition. `bad` puts `value` at element 7 of the third piece (bf16).
fn mixed_pieces(rank: usize, bad: Option<f32>) -> (Vec<Vec<u16>>, Vec<Vec<f32>>) {
    let wavy =
        |i: usize| ((i * 7919 + rank * 104_729) as f32).sin() * 10f32.powi((i % 9) as i32 - 4);
    let bf16 = |v: f32| (v.to_bits() >> 16) as u16;
    let mut halves: Vec<Vec<u16>> = [17usize, 0, 1000]
        .iter()
        .enumerate()
        .map(|(p, &len)| (0..len).map(|i| bf16(wavy(i + 3000 * p))).collect())
        .collect();
    let fulls: Vec<Vec<f32>> = [3usize, 2000]
        .iter()
        .enumerate()
        .map(|(p, &len)| (0..len).map(|i| wavy(i + 10_000 * p)).collect())
        .collect();
    if let Some(v) = bad {
        halves[2][7] = bf16(v);
    }
    (halves, fulls)
}

fn as_pieces<'a>(halves: &'a [Vec<u16>], fulls: &'a [Vec<f32>]) -> Vec<GradientPiece<'a>> {
    vec![
        GradientPiece::Bf16(&halves[0]),
        GradientPiece::F32(&fulls[0]),
        GradientPiece::Bf16(&halves[1]),
        GradientPiece::Bf16(&halves[2]),
        GradientPiece::F32(&fulls[1]),
    ]
}

const MIXED_LEN: usize = 17 + 3 + 1000 + 2000;

#[test]
fn pieces_reduce_to_the_bits_of_their_gathered_all_reduce() {
    for n in [2, 3] {
        // 1 MiB: one ticket in the region; 4 KiB and 64 bytes: chunks of a slot, pieces cut
        // between them; `None`: the TCP ring (the gathered default).
        for slot_bytes in [Some(1 << 20), Some(4096), Some(64), None] {
            for op in [ReduceOp::Average, ReduceOp::Sum] {
                let results = run_ranks(
                    n,
                    move |_, c| match slot_bytes {
                        Some(bytes) => c.shared_memory_slot_bytes = bytes,
                        None => c.shared_memory = false,
                    },
                    move |rank, ring| {
                        let mut ring = ring.unwrap();
                        let (halves, fulls) = mixed_pieces(rank, None);
                        let pieces = as_pieces(&halves, &fulls);
                        let mut reduced = vec![f32::NAN; MIXED_LEN];
                        let finite = ring.all_reduce_pieces(&pieces, &mut reduced, op).unwrap();
                        let mut gathered = vec![0.0; MIXED_LEN];
                        gather_pieces(&pieces, &mut gathered);
                        ring.all_reduce_f32(&mut gathered, op).unwrap();
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        (finite, bits(&reduced), bits(&gathered))
                    },
                );
                for (rank, (finite, reduced, gathered)) in results.iter().enumerate() {
                    let at = format!("n={n} slot={slot_bytes:?} {op:?} rank {rank}");
                    assert!(finite, "{at}");
                    assert_eq!(reduced, gathered, "{at}");
                    assert_eq!(reduced, &results[0].1, "{at}: same bits on every rank");
                }
            }
        }
    }
}

#[test]
fn a_non_finite_piece_or_sum_is_reported_on_every_rank() {
    for (bad_rank, bad, op) in [
        (1, f32::NAN, ReduceOp::Average),
        (0, f32::INFINITY, ReduceOp::Average),
        // Finite on each rank; the sum overflows bf16's (and f32's) range.
        (2, f32::MAX, ReduceOp::Sum),
    ] {
        let results = run_ranks(
            3,
            |_, c| c.shared_memory_slot_bytes = 1 << 20,
            move |rank, ring| {
                let mut ring = ring.unwrap();
                let big = (op == ReduceOp::Sum).then_some(f32::MAX);
                let (halves, fulls) =
                    mixed_pieces(rank, if rank == bad_rank { Some(bad) } else { big });
                let mut out = vec![0.0; MIXED_LEN];
                let finite = ring
                    .all_reduce_pieces(&as_pieces(&halves, &fulls), &mut out, op)
                    .unwrap();
                // The next operation is unaffected.
                let again = ring
                    .all_reduce_pieces(
                        &as_pieces(&mixed_pieces(rank, None).0, &fulls),
                        &mut out,
                        op,
                    )
                    .unwrap();
                (finite, again)
            },
        );
        assert_eq!(results, vec![(false, true); 3], "{bad} on rank {bad_rank}");
    }
}

#[test]
fn pieces_of_another_kind_fail_on_every_rank_naming_the_difference() {
    let results = run_ranks(
        2,
        |_, c| c.shared_memory_slot_bytes = 1 << 20,
        |rank, ring| {
            let mut ring = ring.unwrap();
            let (halves, fulls) = mixed_pieces(rank, None);
            let widened: Vec<f32> = halves[2]
                .iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect();
            let mut pieces = as_pieces(&halves, &fulls);
            if rank == 1 {
                // Same total length, one piece in f32 instead of bf16.
                pieces[3] = GradientPiece::F32(&widened);
            }
            let mut out = vec![0.0; MIXED_LEN];
            ring.all_reduce_pieces(&pieces, &mut out, ReduceOp::Average)
                .unwrap_err()
        },
    );
    let mut named = 0;
    for err in &results {
        match err {
            CollectiveError::Protocol { detail, .. } => {
                assert!(detail.contains("gradient pieces differ"), "{detail}");
                named += 1;
            }
            CollectiveError::PeerDisconnected { .. } => {}
            other => panic!("{other}"),
        }
    }
    assert!(named >= 1, "{results:?}");
}
