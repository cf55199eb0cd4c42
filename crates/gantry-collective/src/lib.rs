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
//!   When every rank is on one host (`RingConfig::shared_memory`), its
//!   all-reduce skips the sockets: ranks sum each other's buffers in one
//!   shared-memory region (`shm.rs`), with one barrier per operation.
//! * [`nccl::NcclCollective`] (GPU): NCCL through `cudarc`, loaded at run time,
//!   so building needs neither CUDA nor NCCL. When the libraries or a GPU are
//!   missing, construction returns [`CollectiveError::NcclUnavailable`] or
//!   [`CollectiveError::NoCudaDevice`] instead of panicking.
//!
//! The seam deliberately uses plain host slices, not tensors: the worker copies
//! gradients into a flat buffer (or, with NCCL, hands device pointers to the
//! `unsafe` device API), which keeps this crate free of `tch` and gRPC.
//!
//! After any error a collective is unusable (every later call fails fast):
//! peers may be mid-operation with a different view of the byte stream, so the
//! only safe recovery is to rebuild the group.

mod error;
pub mod nccl;
mod ring;
mod shm;
mod wire;

pub use error::{CollectiveError, Peer};
pub use ring::{AbortHandle, RingCollective, RingConfig};

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
    /// Overwrites `buf` on every rank with `root`'s `buf`; lengths must match.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Replaces `buf` on every rank with `root`'s bytes; the length travels too.
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// Drops the connections so peers blocked on this rank fail fast. The
    /// collective is unusable afterwards.
    fn abort(&mut self);
    /// Number of completed collective operations, for hang detection: a rank
    /// whose sequence stops advancing while others' does is stuck.
    fn sequence(&self) -> u64;
    /// In-place all-reduce of `len` f32s of GPU memory at `ptr`, enqueued on
    /// the legacy default stream (libtorch's default), so it runs after the
    /// kernels that produced the buffer and before those that read it.
    /// Returns `Ok(false)` when the backend has no device path; the caller
    /// then stages the buffer through host memory.
    ///
    /// # Safety
    /// `ptr` must address at least `len` f32s on the backend's device, and
    /// nothing may use them on another stream until the default stream has
    /// passed this operation.
    unsafe fn all_reduce_device_f32(
        &mut self,
        _ptr: u64,
        _len: usize,
        _op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        Ok(false)
    }
}
