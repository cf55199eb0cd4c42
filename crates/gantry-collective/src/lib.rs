//! Collective communication for Gantry's data-parallel training.
//!
//! Every rank ends each training step with identical, averaged gradients. This
//! crate provides that operation behind one small seam, the [`Collective`]
//! trait, with two backends:
//!
//! * [`RingCollective`] (CPU, always available): a bandwidth-optimal ring
//!   all-reduce (reduce-scatter followed by all-gather) over plain TCP. Each
//!   rank connects to its right neighbour and accepts from its left one. Data
//!   moves in chunks; a sender thread writes to the right while the calling
//!   thread reads from the left and reduces, so sending, receiving and reducing
//!   overlap. Every operation starts with a header (operation, sequence number,
//!   element count) that the receiver checks, every socket call has a timeout,
//!   and a failing rank shuts its sockets so the failure travels round the
//!   ring instead of leaving peers hanging.
//!   With [`RingConfig::shared_memory`], joining gathers every rank's host
//!   ([`RingConfig::host`], by default the machine's hostname and boot id) and
//!   picks an [`AllReducePath`] that every rank agrees on:
//!   - every rank on one host: all-reduces skip the sockets; ranks sum each
//!     other's buffers in one shared-memory region (`shm.rs`), with one barrier
//!     per operation ([`AllReducePath::SharedMemory`]);
//!   - several hosts, one of them with two ranks or more: hierarchical
//!     ([`AllReducePath::Hierarchical`], as in NCCL and Horovod): each host's
//!     ranks sum through a region of their own host, the host's leader (its
//!     lowest rank) all-reduces that host sum with the other hosts' leaders
//!     over a second TCP ring, and the result goes back out through the region;
//!   - otherwise (every rank alone on its host, slot sizes that differ, or a
//!     rank that cannot map its region or a leader that cannot join the
//!     leaders' ring): the TCP ring ([`AllReducePath::Tcp`]).
//!
//!   Broadcasts always travel the TCP ring, whose connections also carry the
//!   liveness checks and failure propagation of every path.
//! * [`nccl::NcclCollective`] (GPU): NCCL through `cudarc`, loaded at run time,
//!   so building needs neither CUDA nor NCCL. When the libraries or a GPU are
//!   missing, construction returns [`CollectiveError::NcclUnavailable`] or
//!   [`CollectiveError::NoCudaDevice`] instead of panicking. The communicator is
//!   created non-blocking (`ncclCommInitRankConfig` with `blocking = 0`): the
//!   calling thread polls its creation and every operation to completion, so each
//!   is bounded by the collective's timeout and can be aborted.
//!
//! # Summation order
//!
//! Every path gives every rank the same bits; the orders differ, so the paths agree with each
//! other only to within rounding.
//!
//! * TCP ring of `n` ranks: the buffer is cut into `n` segments (the first `len % n` one
//!   element longer); segment `j` is summed cyclically from rank `j`: `((x_j + x_{j+1}) + …) +
//!   x_{j-1}`. An average divides each complete segment by `n` once.
//! * Shared memory, one host: every element is summed in rank order, `((x_0 + x_1) + …) +
//!   x_{n-1}`, then divided by `n` for an average.
//! * Hierarchical: the buffer goes in pieces of `shared_memory_slot_bytes / 4` elements
//!   (every rank must use the same size, or the group stays on TCP). Per piece, each host's
//!   ranks are summed in rank order (`h_g = (x_a + x_b) + …` for the host's ranks `a < b <
//!   …`); hosts are numbered by their lowest rank; the host sums are then added as the TCP
//!   ring of the `H` leaders adds them: the piece is cut into `H` segments as above and
//!   segment `j` is summed cyclically from host `j`, `((h_j + h_{j+1}) + …) + h_{j-1}`. For
//!   two hosts that is simply `h_0 + h_1`. An average divides that total by the world size
//!   `n`, once, at the end.
//!
//! # Hierarchical failures and limits
//!
//! The leaders' ring has the same timeout as the group's ring, proves a secret derived from the
//! group's ring secret (so it is authenticated as strongly, and neither ring accepts the
//! other's proofs), and its sockets are registered with the collective's [`AbortHandle`], so an
//! abort wakes a leader blocked on another host. Any failure poisons the collective, marks the
//! host's region failed and shuts both rings' sockets, so every rank on every host fails with a
//! named peer. A member (a non-leader) waits for its leader's result with twice the timeout,
//! since its leader's own waits are bounded by the timeout and a failing leader marks the
//! region. A member whose ring neighbours are both on other hosts cannot tell their closing
//! from the end of their last operation, so it relies on its own host's region for news of
//! failures: a rank that exits cleanly or fails marks it, but a leader killed outright (no
//! chance to mark it) is only noticed at that deadline, unless a ring neighbour on the same
//! host notices first, as it always does when each host's ranks are consecutive.
//!
//! The seam deliberately uses plain host slices, not tensors: the worker hands over
//! a flat buffer, or its host gradients as autograd left them, one slice per
//! parameter in f32 or bf16 ([`GradientPiece`], [`Collective::all_reduce_pieces`],
//! which the shared region moves as they are), or, with NCCL, device pointers to the
//! `unsafe` device API; that keeps this crate free of `tch` and gRPC.
//!
//! # Aborts and progress, on every backend
//!
//! An operation holds its collective by `&mut`, so another thread cannot reach it.
//! [`Collective::abort_handle`] returns an [`AbortHandle`] to take first: from any
//! thread it reads [`AbortHandle::sequence`] (completed operations, for the
//! coordinator's hang detection) and requests [`AbortHandle::abort`], after which the
//! operation in progress and every later one fail with [`CollectiveError::Aborted`].
//! The ring wakes at once (the handle shuts its sockets down); NCCL notices at its next
//! poll (about a millisecond) and calls `ncclCommAbort` on the thread that runs the
//! operation, as NCCL requires. A timeout ([`RingConfig::timeout`], the `timeout`
//! of [`nccl::NcclCollective::new`]) bounds every wait for a peer either way.
//!
//! After any error a collective is unusable (every later call fails fast):
//! peers may be mid-operation with a different view of the byte stream, so the
//! only safe recovery is to rebuild the group.

mod abort;
mod error;
pub mod nccl;
mod ring;
mod shm;
mod wire;

pub use abort::AbortHandle;
pub use error::{CollectiveError, Peer};
pub use ring::{AllReducePath, RingCollective, RingConfig};

/// How [`Collective::all_reduce_f32`] combines the ranks' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum over all ranks.
    Sum,
    /// Element-wise sum divided by the world size (gradient averaging).
    Average,
}

impl ReduceOp {
    pub(crate) fn code(self) -> u64 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Average => 1,
        }
    }
}

/// One piece of a host gradient as the backward pass left it, for
/// [`Collective::all_reduce_pieces`]: f32 values, or bf16 values as their bits (the upper half
/// of an f32's bits, so widening one is exact).
#[derive(Debug, Clone, Copy)]
pub enum GradientPiece<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl GradientPiece<'_> {
    /// Elements in the piece.
    pub fn len(&self) -> usize {
        match self {
            GradientPiece::F32(v) => v.len(),
            GradientPiece::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + len` of the piece.
    pub(crate) fn segment(&self, start: usize, len: usize) -> Self {
        match self {
            GradientPiece::F32(v) => GradientPiece::F32(&v[start..start + len]),
            GradientPiece::Bf16(v) => GradientPiece::Bf16(&v[start..start + len]),
        }
    }

    /// Bytes the piece's values take as they are.
    pub fn bytes(&self) -> usize {
        match self {
            GradientPiece::F32(v) => std::mem::size_of_val(*v),
            GradientPiece::Bf16(v) => std::mem::size_of_val(*v),
        }
    }
}

/// Writes the concatenation of `pieces`, widened to f32, into `out` (their total length).
///
/// # Panics
/// If `out` is not exactly as long as the pieces together.
pub fn gather_pieces(pieces: &[GradientPiece<'_>], out: &mut [f32]) {
    let total: usize = pieces.iter().map(GradientPiece::len).sum();
    assert_eq!(total, out.len(), "pieces and output differ in length");
    let mut rest = out;
    for piece in pieces {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(piece.len());
        rest = tail;
        match piece {
            GradientPiece::F32(v) => head.copy_from_slice(v),
            GradientPiece::Bf16(v) => {
                for (o, b) in head.iter_mut().zip(v.iter()) {
                    *o = f32::from_bits(u32::from(*b) << 16);
                }
            }
        }
    }
}

/// [`Collective::all_reduce_pieces`] by way of [`Collective::all_reduce_f32`]: the pieces
/// gathered into `out`, all-reduced there, and `out` scanned.
pub(crate) fn all_reduce_gathered<C: Collective + ?Sized>(
    collective: &mut C,
    pieces: &[GradientPiece<'_>],
    out: &mut [f32],
    op: ReduceOp,
) -> Result<bool, CollectiveError> {
    gather_pieces(pieces, out);
    collective.all_reduce_f32(out, op)?;
    Ok(all_finite(out))
}

gantry_simd::widest! {
    /// Whether every value is finite (no infinity, no NaN).
    pub fn all_finite(values: &[f32]) -> bool => no_exponent_all_ones
}

/// Branch-free, so it vectorises.
#[inline(always)]
fn no_exponent_all_ones(values: &[f32]) -> bool {
    values.iter().fold(0u32, |bad, v| {
        bad | u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    }) == 0
}

/// A group of `world_size` ranks that perform collective operations together.
///
/// Every rank must call the same operations in the same order with buffers of
/// the same length (except [`Collective::broadcast_bytes`], where the root's
/// length wins). Violations are detected and reported as errors, never as a
/// hang or silently wrong data.
pub trait Collective: Send {
    /// This process's rank, in `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// In-place all-reduce of a host `f32` buffer.
    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError>;
    /// All-reduces the concatenation of `pieces` (bf16 ones widened exactly) into `out`, whose
    /// length is their total, and returns whether every element of the result is finite.
    /// The result is what [`Self::all_reduce_f32`] gives for the concatenation; every rank
    /// passes pieces of the same kinds and lengths in the same order (a rank whose pieces
    /// differ fails the operation, as a length mismatch does). This default gathers the
    /// pieces into `out`, all-reduces that and scans it; the ring's single shared-memory
    /// region copies each piece into its slot as it is (a bf16 piece moves half the bytes)
    /// and sums the slots straight into `out`, checking the result in the same pass.
    fn all_reduce_pieces(
        &mut self,
        pieces: &[GradientPiece<'_>],
        out: &mut [f32],
        op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        all_reduce_gathered(self, pieces, out, op)
    }
    /// Overwrites `buf` on every rank with `root`'s `buf`; lengths must match.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Replaces `buf` on every rank with `root`'s bytes; the length travels too.
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// Aborts the collective from the thread that owns it: drops the connections (the
    /// ring) or calls `ncclCommAbort` (NCCL) so peers blocked on this rank fail fast, and
    /// marks [`Self::abort_handle`] aborted. The collective is unusable afterwards.
    fn abort(&mut self);
    /// A handle on this collective for other threads: its progress sequence, and an abort
    /// that also interrupts an operation in progress (see [`AbortHandle`]). Take it before
    /// the collective is moved to the code that runs its operations.
    fn abort_handle(&self) -> AbortHandle;
    /// Number of completed collective operations, for hang detection: a rank
    /// whose sequence stops advancing while others' does is stuck. Always equal to
    /// the handle's [`AbortHandle::sequence`].
    fn sequence(&self) -> u64 {
        self.abort_handle().sequence()
    }
    /// In-place all-reduce of `len` f32s of GPU memory at `ptr`, enqueued on
    /// the backend's device stream (NCCL: the stream its owner set with
    /// `NcclCollective::set_device_stream`, the worker libtorch's current one; else
    /// the legacy default stream), so it runs after the kernels that produced the
    /// buffer and before those that read it.
    /// Returns `Ok(false)` when the backend has no device path; the caller
    /// then stages the buffer through host memory. A backend may return only
    /// once the reduction has completed (NCCL does, to bound and abort it).
    ///
    /// # Safety
    /// `ptr` must address at least `len` f32s on the backend's device, and
    /// nothing may use them on another stream until the backend's stream has
    /// passed this operation.
    unsafe fn all_reduce_device_f32(
        &mut self,
        _ptr: u64,
        _len: usize,
        _op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        Ok(false)
    }
    /// Overwrites `len` f32s of GPU memory at `ptr` on every rank with `root`'s,
    /// on the backend's device stream, like [`Self::all_reduce_device_f32`]; lengths
    /// must match. `Ok(false)` when the backend has no device path: the caller then
    /// stages the buffer through host memory and calls [`Self::broadcast_f32`].
    ///
    /// # Safety
    /// As for [`Self::all_reduce_device_f32`].
    unsafe fn broadcast_device_f32(
        &mut self,
        _ptr: u64,
        _len: usize,
        _root: usize,
    ) -> Result<bool, CollectiveError> {
        Ok(false)
    }
}
