//! NCCL backend (GPU), loaded at run time through `cudarc`.
//!
//! Building needs neither CUDA nor NCCL. `cudarc`'s loader panics when a
//! library is missing, so every entry point here first checks that
//! `libnccl.so` (and for devices, the driver's `libcuda.so`) can be loaded and
//! returns [`CollectiveError::NcclUnavailable`] / [`CollectiveError::NoCudaDevice`]
//! otherwise. The loader searches the usual dynamic-linker paths: point
//! `LD_LIBRARY_PATH` at `.cache/libtorch/site/nvidia/nccl/lib`, where the
//! project provides `libnccl.so -> libnccl.so.2`.
//!
//! Rank 0 creates an [`NcclId`] (no GPU needed) and ships its bytes to the
//! other ranks out of band (the coordinator); every rank then calls
//! [`NcclCollective::new`].
//!
//! Unlike the ring backend, NCCL does not check that ranks agree on lengths:
//! mismatched calls hang until [`Collective::abort`] (`ncclCommAbort`).

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::sys as nccl;

use crate::{Collective, CollectiveError, ReduceOp};

/// Size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

const LIB_HINT: &str = "set LD_LIBRARY_PATH to a directory with libnccl.so, e.g. \
                        .cache/libtorch/site/nvidia/nccl/lib";

/// Whether `libnccl.so` can be loaded by this process.
pub fn nccl_library_present() -> bool {
    // SAFETY: only dlopen()s candidate library names; loading NCCL runs no
    // code with preconditions we could violate.
    unsafe { nccl::is_culib_present() }
}

/// Whether the CUDA driver library `libcuda.so` can be loaded.
pub fn cuda_driver_present() -> bool {
    // SAFETY: as in `nccl_library_present`.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn ensure_nccl() -> Result<(), CollectiveError> {
    if nccl_library_present() {
        Ok(())
    } else {
        Err(CollectiveError::NcclUnavailable(format!(
            "libnccl.so could not be loaded; {LIB_HINT}"
        )))
    }
}

/// Number of visible CUDA devices, or [`CollectiveError::NoCudaDevice`] when
/// there is no driver or no device (never a panic).
pub fn cuda_device_count() -> Result<usize, CollectiveError> {
    if !cuda_driver_present() {
        return Err(CollectiveError::NoCudaDevice(
            "the NVIDIA driver library libcuda.so is not installed".into(),
        ));
    }
    cudarc::driver::result::init().map_err(|e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            CollectiveError::NoCudaDevice("cuInit found no CUDA device".into())
        }
        _ => cuda_err("cuInit")(e),
    })?;
    let n = cudarc::driver::result::device::get_count().map_err(cuda_err("cuDeviceGetCount"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn nccl_err(call: &'static str) -> impl Fn(NcclError) -> CollectiveError {
    // NcclError's Debug prints only "NcclError"; the result code says more.
    move |e| CollectiveError::Nccl {
        call,
        detail: format!("{:?}", e.0),
    }
}

fn cuda_err(call: &'static str) -> impl Fn(DriverError) -> CollectiveError {
    move |e| CollectiveError::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

/// The rendezvous token of an NCCL communicator, as plain bytes so it can
/// travel over any transport.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The id embeds rank 0's address; a short prefix identifies it in logs.
        write!(f, "NcclId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl NcclId {
    /// `ncclGetUniqueId`, called once on rank 0. Needs libnccl, not a GPU.
    pub fn new() -> Result<Self, CollectiveError> {
        ensure_nccl()?;
        let raw = cudarc::nccl::result::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }

    /// Rebuilds an id received from rank 0.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CollectiveError> {
        let arr: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            CollectiveError::InvalidArgument(format!(
                "an NCCL id has {NCCL_ID_BYTES} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(NcclId(arr))
    }

    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    fn raw(&self) -> nccl::ncclUniqueId {
        nccl::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// Element type of a device buffer handed to the `unsafe` device API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDType {
    F32,
    F64,
    F16,
    BF16,
}

impl DeviceDType {
    fn raw(self) -> nccl::ncclDataType_t {
        match self {
            DeviceDType::F32 => nccl::ncclDataType_t::ncclFloat32,
            DeviceDType::F64 => nccl::ncclDataType_t::ncclFloat64,
            DeviceDType::F16 => nccl::ncclDataType_t::ncclFloat16,
            DeviceDType::BF16 => nccl::ncclDataType_t::ncclBfloat16,
        }
    }
}

fn raw_op(op: ReduceOp) -> nccl::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nccl::ncclRedOp_t::ncclSum,
        ReduceOp::Average => nccl::ncclRedOp_t::ncclAvg,
    }
}

/// An owned `ncclComm_t`.
struct RawComm(nccl::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; `NcclCollective` only uses it through `&mut self`.
unsafe impl Send for RawComm {}

/// One rank of an NCCL communicator on one GPU.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    ctx: Arc<CudaContext>,
    /// Private stream for the host-slice operations, so they never wait on
    /// (or delay) the caller's training stream.
    stream: Arc<CudaStream>,
    /// Null once aborted.
    comm: RawComm,
    seq: u64,
    poisoned: Option<String>,
}

impl fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.ctx.ordinal())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins the communicator identified by `id` (from [`NcclId::as_bytes`]
    /// on rank 0) on CUDA device `device_ordinal`. Blocks until all
    /// `world_size` ranks have joined.
    pub fn new(
        rank: usize,
        world_size: usize,
        id: &[u8],
        device_ordinal: usize,
    ) -> Result<Self, CollectiveError> {
        if world_size == 0 || rank >= world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} is out of range for world_size {world_size}"
            )));
        }
        let (Ok(rank_i), Ok(world_i)) = (i32::try_from(rank), i32::try_from(world_size)) else {
            return Err(CollectiveError::InvalidArgument(
                "world_size exceeds i32".into(),
            ));
        };
        let id = NcclId::from_bytes(id)?;
        ensure_nccl()?;
        let count = cuda_device_count()?;
        if device_ordinal >= count {
            return Err(CollectiveError::NoCudaDevice(format!(
                "device {device_ordinal} requested, {count} visible"
            )));
        }
        let ctx = CudaContext::new(device_ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the context is bound to this
        // thread by `CudaContext::new`, so NCCL picks up the right device.
        unsafe { cudarc::nccl::result::comm_init_rank(&mut comm, world_i, id.raw(), rank_i) }
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(NcclCollective {
            rank,
            world_size,
            ctx,
            stream,
            comm: RawComm(comm),
            seq: 0,
            poisoned: None,
        })
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        match &self.poisoned {
            Some(p) => Err(CollectiveError::Poisoned(p.clone())),
            None => Ok(()),
        }
    }

    fn finish<T>(&mut self, r: Result<T, CollectiveError>) -> Result<T, CollectiveError> {
        match r {
            Ok(v) => {
                self.seq += 1;
                Ok(v)
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// In-place all-reduce of `len` elements at device address `ptr`,
    /// enqueued on `stream` (e.g. libtorch's current stream); returns once
    /// enqueued, like any CUDA call.
    ///
    /// # Safety
    /// `ptr` must address at least `len` elements of `dtype` on this
    /// communicator's device, `stream` must be a valid stream of that device's
    /// primary context (or null for the legacy default stream), and nothing
    /// else may use the buffer until the stream has passed this operation.
    pub unsafe fn all_reduce_device(
        &mut self,
        ptr: u64,
        len: usize,
        dtype: DeviceDType,
        op: ReduceOp,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        self.usable()?;
        let r = self
            .ctx
            .bind_to_thread()
            .map_err(cuda_err("cuCtxSetCurrent"));
        let r = r.and_then(|()| {
            // SAFETY: guaranteed by this function's contract.
            unsafe {
                nccl::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    dtype.raw(),
                    raw_op(op),
                    self.comm.0,
                    stream.cast(),
                )
            }
            .result()
            .map(drop)
            .map_err(nccl_err("ncclAllReduce"))
        });
        self.finish(r)
    }

    /// In-place broadcast of `len` elements at device address `ptr` from
    /// `root`, enqueued on `stream`.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_device`].
    pub unsafe fn broadcast_device(
        &mut self,
        ptr: u64,
        len: usize,
        dtype: DeviceDType,
        root: usize,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        self.usable()?;
        let r = self.root(root).and_then(|root| {
            self.ctx
                .bind_to_thread()
                .map_err(cuda_err("cuCtxSetCurrent"))?;
            // SAFETY: guaranteed by this function's contract.
            unsafe { self.raw_broadcast(ptr, len, dtype.raw(), root, stream.cast()) }
        });
        self.finish(r)
    }

    fn root(&self, root: usize) -> Result<i32, CollectiveError> {
        match i32::try_from(root) {
            Ok(r) if root < self.world_size => Ok(r),
            _ => Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is out of range for world_size {}",
                self.world_size
            ))),
        }
    }

    /// # Safety
    /// As for [`Self::all_reduce_device`].
    unsafe fn raw_broadcast(
        &self,
        ptr: u64,
        len: usize,
        dtype: nccl::ncclDataType_t,
        root: i32,
        stream: nccl::cudaStream_t,
    ) -> Result<(), CollectiveError> {
        // SAFETY: guaranteed by the caller.
        unsafe {
            nccl::ncclBroadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                len,
                dtype,
                root,
                self.comm.0,
                stream,
            )
        }
        .result()
        .map(drop)
        .map_err(nccl_err("ncclBroadcast"))
    }

    /// Copies `buf` to the device, runs `f` on it in place on the private
    /// stream, copies it back and waits. Fine for small host buffers; large
    /// gradients should stay on the device and use the device API.
    fn via_device<T>(
        &self,
        buf: &mut [T],
        f: impl FnOnce(&Self, u64, nccl::cudaStream_t) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError>
    where
        T: cudarc::driver::DeviceRepr + Copy,
    {
        if buf.is_empty() {
            // cuMemAlloc rejects zero bytes, and there is nothing to combine.
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("cuCtxSetCurrent"))?;
        let stream = self.stream.clone();
        let mut dev = stream.clone_htod(buf).map_err(cuda_err("cuMemcpyHtoD"))?;
        {
            let (ptr, _sync) = dev.device_ptr_mut(&stream);
            f(self, ptr, stream.cu_stream().cast())?;
        }
        stream
            .memcpy_dtoh(&dev, buf)
            .map_err(cuda_err("cuMemcpyDtoH"))?;
        stream
            .synchronize()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    fn host_all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        let len = buf.len();
        self.via_device(buf, |me, ptr, stream| {
            // SAFETY: `ptr` is a live device copy of `len` f32s on our device.
            unsafe {
                nccl::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    nccl::ncclDataType_t::ncclFloat32,
                    raw_op(op),
                    me.comm.0,
                    stream,
                )
            }
            .result()
            .map(drop)
            .map_err(nccl_err("ncclAllReduce"))
        })
    }

    fn host_broadcast<T>(&self, buf: &mut [T], root: usize) -> Result<(), CollectiveError>
    where
        T: cudarc::driver::DeviceRepr + Copy,
    {
        let root = self.root(root)?;
        let bytes = std::mem::size_of_val(buf);
        self.via_device(buf, |me, ptr, stream| {
            // SAFETY: `ptr` is a live device copy of `bytes` bytes.
            unsafe { me.raw_broadcast(ptr, bytes, nccl::ncclDataType_t::ncclUint8, root, stream) }
        })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        self.usable()?;
        let r = self.host_all_reduce(buf, op);
        self.finish(r)
    }

    unsafe fn all_reduce_device_f32(
        &mut self,
        ptr: u64,
        len: usize,
        op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        // SAFETY: the trait method's contract; the null stream is the legacy
        // default stream of the primary context libtorch also uses.
        unsafe {
            self.all_reduce_device(ptr, len, DeviceDType::F32, op, std::ptr::null_mut())?;
        }
        Ok(true)
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.usable()?;
        let r = self.host_broadcast(buf, root);
        self.finish(r)
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.usable()?;
        let r = (|| {
            // The root's length first, so the others can size their buffers.
            let mut len = [buf.len() as u64];
            self.host_broadcast(&mut len, root)?;
            if self.rank != root {
                buf.clear();
                buf.resize(usize::try_from(len[0]).unwrap_or(usize::MAX), 0);
            }
            self.host_broadcast(buf, root)
        })();
        self.finish(r)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.usable()?;
        // Synchronising on a tiny all-reduce's result means every rank got here.
        let mut one = [1.0f32];
        let r = self.host_all_reduce(&mut one, ReduceOp::Sum);
        self.finish(r)
    }

    fn abort(&mut self) {
        if !self.comm.0.is_null() {
            // SAFETY: a live communicator, never used again (nulled below).
            let _ = unsafe { nccl::ncclCommAbort(self.comm.0) };
            self.comm.0 = std::ptr::null_mut();
        }
        self.poisoned.get_or_insert_with(|| "aborted".into());
    }

    fn sequence(&self) -> u64 {
        self.seq
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.comm.0.is_null() {
            return;
        }
        // SAFETY: a live communicator owned by us, not used afterwards. After
        // an error peers may be gone, and destroy could then wait on them, so
        // a poisoned communicator is aborted instead.
        unsafe {
            let _ = if self.poisoned.is_some() {
                nccl::ncclCommAbort(self.comm.0)
            } else {
                nccl::ncclCommDestroy(self.comm.0)
            };
        }
    }
}
