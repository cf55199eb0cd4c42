//! The abort handle every backend shares.
//!
//! A collective operation holds its collective by `&mut`, so nothing else can reach it while
//! a rank is blocked inside one. The [`AbortHandle`] is the part that stays reachable: other
//! threads (a watchdog, the signal task, the coordinator client) read the progress sequence
//! from it and ask for an abort through it. The contract with the backends:
//!
//! * [`AbortHandle::abort`] only sets a flag (and shuts down the sockets a backend
//!   registered, which is safe from any thread). Everything else an abort needs, such as
//!   `ncclCommAbort`, which NCCL forbids concurrently with other calls on the communicator,
//!   is done by the backend on the thread that runs the operation, which polls
//!   [`AbortHandle::is_aborted`] while it waits.
//! * Once aborted, a handle stays aborted, and every later operation of its collective fails
//!   with [`crate::CollectiveError::Aborted`].
//! * The backend calls [`AbortHandle::set_sequence`] as each operation completes, so
//!   [`AbortHandle::sequence`] equals [`crate::Collective::sequence`].

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Aborts a [`crate::Collective`] from another thread and reads its progress meanwhile.
/// Cloning is cheap; every clone controls the same collective. Get one with
/// [`crate::Collective::abort_handle`] before handing the collective to the code that runs
/// its operations.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    aborted: AtomicBool,
    /// Completed operations of the collective, mirrored by the backend.
    seq: AtomicU64,
    /// Sockets a backend blocks on in the kernel: `shutdown` acts on the socket, not on the
    /// descriptor, so shutting these clones down wakes a read or write blocked on the
    /// backend's own descriptors at once. The lock orders registration against `abort`.
    sockets: Mutex<Vec<TcpStream>>,
}

impl AbortHandle {
    /// A handle that is not aborted, at sequence 0. Backends create one per collective;
    /// [`crate::nccl::NcclCollective::with_abort_handle`] also takes one made by the caller,
    /// so that the communicator's creation can be aborted too.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the collective aborted and wakes it: an operation in progress fails with
    /// [`crate::CollectiveError::Aborted`] promptly (the ring: at once, through its sockets;
    /// NCCL: at the next poll, within about a millisecond, after `ncclCommAbort`), and so does
    /// every later one. Idempotent; safe from any thread.
    pub fn abort(&self) {
        let sockets = self
            .inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.aborted.store(true, Ordering::SeqCst);
        for s in sockets.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`Self::abort`] was called (on any clone, or through
    /// [`crate::Collective::abort`]).
    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// The collective's [`crate::Collective::sequence`], readable while an operation holds
    /// the collective: a watchdog that sees it stall on one rank while others advance knows
    /// which rank is stuck, and can call [`Self::abort`].
    pub fn sequence(&self) -> u64 {
        self.inner.seq.load(Ordering::SeqCst)
    }

    /// For backends: publishes the number of completed operations. Call it after each
    /// operation completes (and only then), so that [`Self::sequence`] never counts an
    /// operation that did not finish.
    pub fn set_sequence(&self, seq: u64) {
        self.inner.seq.store(seq, Ordering::SeqCst);
    }

    /// Registers sockets that [`Self::abort`] shuts down. If the handle is already aborted
    /// they are shut down now, so an abort that raced with the backend's set-up still wakes it.
    pub(crate) fn shut_down_on_abort(&self, streams: Vec<TcpStream>) {
        let mut sockets = self
            .inner
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_aborted() {
            for s in &streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        sockets.extend(streams);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn clones_share_the_flag_and_the_sequence() {
        let a = AbortHandle::new();
        let b = a.clone();
        a.set_sequence(7);
        assert_eq!(b.sequence(), 7);
        assert!(!b.is_aborted());
        b.abort();
        assert!(a.is_aborted());
        b.abort();
        assert!(a.is_aborted(), "abort is idempotent");
    }

    #[test]
    fn sockets_registered_after_the_abort_are_shut_down_too() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // A bound on the read below, should the shutdown not happen.
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let handle = AbortHandle::new();
        handle.abort();
        handle.shut_down_on_abort(vec![client.try_clone().unwrap()]);
        // A shut-down socket reads end-of-file at once instead of blocking.
        let mut byte = [0u8; 1];
        assert_eq!((&client).read(&mut byte).unwrap(), 0);
    }
}
