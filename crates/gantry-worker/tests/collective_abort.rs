//! The abort plumbing the cluster mode relies on, without a network or a GPU: a backend that
//! blocks in an all-reduce until its handle is aborted, driven through `Group`, with the abort
//! coming from another thread through the handle taken before the group owned the collective.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use gantry_collective::{AbortHandle, Collective, CollectiveError, ReduceOp};
use gantry_worker::group::Group;
use tch::Tensor;

/// How long the fake waits for an abort before giving up, so a broken abort fails the test
/// instead of hanging it.
const GIVE_UP: Duration = Duration::from_secs(60);

/// Completes its first `free` operations, then blocks in each one until aborted, the way a
/// rank whose peer never arrives blocks in a real backend.
#[derive(Debug)]
struct Stuck {
    handle: AbortHandle,
    free: u64,
    seq: u64,
    entered: mpsc::Sender<()>,
}

impl Stuck {
    fn operation(&mut self) -> Result<(), CollectiveError> {
        if self.handle.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        if self.seq < self.free {
            self.seq += 1;
            self.handle.set_sequence(self.seq);
            return Ok(());
        }
        let _ = self.entered.send(());
        let started = Instant::now();
        while started.elapsed() < GIVE_UP {
            if self.handle.is_aborted() {
                return Err(CollectiveError::Aborted);
            }
            thread::sleep(Duration::from_millis(1));
        }
        Err(CollectiveError::Poisoned(
            "the fake backend was never aborted".into(),
        ))
    }
}

impl Collective for Stuck {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        2
    }

    fn all_reduce_f32(&mut self, _buf: &mut [f32], _op: ReduceOp) -> Result<(), CollectiveError> {
        self.operation()
    }

    fn broadcast_f32(&mut self, _buf: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        self.operation()
    }

    fn broadcast_bytes(&mut self, _buf: &mut Vec<u8>, _root: usize) -> Result<(), CollectiveError> {
        self.operation()
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.operation()
    }

    fn abort(&mut self) {
        self.handle.abort();
    }

    fn abort_handle(&self) -> AbortHandle {
        self.handle.clone()
    }
}

#[test]
fn an_abort_through_the_handle_ends_a_blocked_average() {
    let (entered_tx, entered) = mpsc::channel();
    let stuck = Stuck {
        handle: AbortHandle::new(),
        free: 1,
        seq: 0,
        entered: entered_tx,
    };
    // As cluster mode does: the handle first, then the group owns the collective.
    let handle = stuck.abort_handle();
    let mut group = Group::new(Box::new(stuck), 1.0);

    let mut grads = Tensor::from_slice(&[1.0f32; 64]);
    group.average(&mut grads).unwrap();
    assert_eq!(handle.sequence(), 1);

    let aborter = {
        let handle = handle.clone();
        thread::spawn(move || {
            // Only once the training thread is inside the all-reduce.
            let inside = entered.recv_timeout(Duration::from_secs(30)).is_ok();
            handle.abort();
            inside
        })
    };
    let started = Instant::now();
    let err = group.average(&mut grads).unwrap_err();
    let took = started.elapsed();
    assert!(
        aborter.join().unwrap(),
        "the average never entered the backend"
    );

    assert!(
        took < Duration::from_secs(30),
        "the average returned {took:?} after the abort was requested"
    );
    assert!(is_abort(&err), "not an abort: {err:#}");
    assert_eq!(handle.sequence(), 1, "the aborted operation was counted");
    assert_eq!(group.sequence(), 1);
    // Every later operation fails at once.
    let again = group.average(&mut grads).unwrap_err();
    assert!(is_abort(&again), "{again:#}");
}

/// Whether the collective's own abort error is in `error`'s chain.
fn is_abort(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        matches!(
            c.downcast_ref::<CollectiveError>(),
            Some(CollectiveError::Aborted)
        )
    })
}

#[test]
fn a_cpu_broadcast_goes_through_the_host_path() {
    let (entered_tx, _entered) = mpsc::channel();
    let stuck = Stuck {
        handle: AbortHandle::new(),
        free: 1,
        seq: 0,
        entered: entered_tx,
    };
    let handle = stuck.abort_handle();
    let mut group = Group::new(Box::new(stuck), 1.0);
    let mut params = Tensor::from_slice(&[2.0f32; 16]);
    group.broadcast(&mut params).unwrap();
    // One bucket, one host broadcast: counted by the backend.
    assert_eq!(handle.sequence(), 1);
}
