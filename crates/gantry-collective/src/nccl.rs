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
//! # Non-blocking, bounded, abortable
//!
//! The communicator is created with `ncclCommInitRankConfig` and `blocking = 0`, so no NCCL
//! call blocks the host. Instead, the thread that makes a call polls it to completion:
//! `ncclCommGetAsyncError` until it leaves `ncclInProgress` (creation, and the enqueueing of
//! an operation), then, for operations, a CUDA event recorded after the operation on its
//! stream. Between polls it checks the [`AbortHandle`], the communicator's asynchronous
//! error and a deadline (the `timeout` given to [`NcclCollective::new`],
//! `collective.timeout` in the worker). On an abort request, a timeout or an error it calls
//! `ncclCommAbort` itself and returns [`CollectiveError::Aborted`],
//! [`CollectiveError::NcclTimeout`] or [`CollectiveError::Nccl`]. The handle only sets a
//! flag: NCCL forbids concurrent calls on one communicator, and every call here is made by
//! the thread that holds the collective (`&mut self`).
//!
//! So every operation has completed on the GPU when it returns, and
//! [`Collective::sequence`] counts completed operations, as on the ring. Unlike the ring,
//! NCCL does not check that ranks agree on lengths or operations: mismatched calls hang
//! until the timeout or an abort.

use std::ffi::{CStr, c_int, c_void};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::sys as nccl;

use crate::{AbortHandle, Collective, CollectiveError, ReduceOp};

// The NCCL calls this backend polls, as named in errors.
const INIT: &str = "ncclCommInitRankConfig";
const ALL_REDUCE: &str = "ncclAllReduce";
const BROADCAST: &str = "ncclBroadcast";
const FINALIZE: &str = "ncclCommFinalize";

/// First and longest pause between two polls: short operations return within
/// microseconds of finishing, and a long wait costs about a thousand cheap queries a second.
const POLL_FIRST: Duration = Duration::from_micros(10);
const POLL_LONGEST: Duration = Duration::from_millis(1);

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

/// The oldest NCCL this backend runs on: the release its bindings are generated for
/// (cudarc's `nccl-02028`, matching the `nvidia-nccl-cu13==2.28.9` wheel the project ships).
/// An older library may lack a symbol the bindings declare (cudarc's loader panics on a missing
/// one) or read `ncclConfig_t` with another layout; newer ones read this layout by its `size`
/// and `version`. Checked before the first non-blocking call.
const OLDEST_NCCL: u32 = nccl_version(2, 28, 0);

/// `ncclGetVersion` of the loaded library, e.g. 22809 for 2.28.9 (see [`nccl_version`]'s
/// encoding). Needs libnccl, not a GPU.
pub fn nccl_version_code() -> Result<u32, CollectiveError> {
    ensure_nccl()?;
    let version = cudarc::nccl::result::get_nccl_version().map_err(nccl_err("ncclGetVersion"))?;
    u32::try_from(version).map_err(|_| CollectiveError::Nccl {
        call: "ncclGetVersion",
        detail: format!("negative version code {version}"),
    })
}

fn ensure_nonblocking_nccl() -> Result<(), CollectiveError> {
    let version = cudarc::nccl::result::get_nccl_version().map_err(nccl_err("ncclGetVersion"))?;
    if u32::try_from(version).is_ok_and(|v| v >= OLDEST_NCCL) {
        Ok(())
    } else {
        Err(CollectiveError::NcclUnavailable(format!(
            "libnccl reports version code {version}, older than 2.28 (22800), the release \
             Gantry's NCCL bindings are built for; install nvidia-nccl-cu13 2.28 or later, or \
             point LD_LIBRARY_PATH at it ({LIB_HINT})"
        )))
    }
}

/// `NCCL_VERSION(major, minor, patch)` of nccl.h: releases up to 2.8 are encoded as
/// `1000 * major + 100 * minor + patch`, later ones as `10000 * major + 100 * minor + patch`
/// (2.28.9 is 22809).
pub const fn nccl_version(major: u32, minor: u32, patch: u32) -> u32 {
    if major <= 2 && minor <= 8 {
        major * 1000 + minor * 100 + patch
    } else {
        major * 10000 + minor * 100 + patch
    }
}

/// The release whose `ncclConfig_t` layout the bindings declare: cudarc's `nccl-02028`
/// (`ncclConfig_v22800` up to `nvlinkCentricSched`), the layout of the 2.28.9 library the
/// project ships. NCCL reads a config by its `size` and `version`, so a newer library takes
/// this prefix and defaults the fields it added.
const CONFIG_VERSION: u32 = nccl_version(2, 28, 9);
/// `NCCL_CONFIG_INITIALIZER`'s magic; NCCL refuses a config without it.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "not set, use NCCL's default or environment".
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// `NCCL_CONFIG_INITIALIZER`: size, magic and version set, every attribute undefined
/// (`NCCL_CONFIG_UNDEF_INT`, or null for `NCCL_CONFIG_UNDEF_PTR`). The exhaustive literal
/// is deliberate: a cudarc update that changes the layout fails to compile here instead of
/// leaving a field zeroed, which would mean a real setting rather than "undefined".
pub(crate) fn config_initializer() -> nccl::ncclConfig_t {
    nccl::ncclConfig_t {
        size: std::mem::size_of::<nccl::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: CONFIG_UNDEF_INT,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
    }
}

/// The config this backend creates communicators with: NCCL's defaults, non-blocking.
pub(crate) fn nonblocking_config() -> nccl::ncclConfig_t {
    nccl::ncclConfig_t {
        blocking: 0,
        ..config_initializer()
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

/// Free and total bytes of CUDA device `ordinal`'s memory (`cuMemGetInfo` in its primary
/// context, the one libtorch uses), for size checks before anything is allocated.
pub fn cuda_memory(ordinal: usize) -> Result<(u64, u64), CollectiveError> {
    let count = cuda_device_count()?;
    if ordinal >= count {
        return Err(CollectiveError::NoCudaDevice(format!(
            "device {ordinal} requested, {count} visible"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
    ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))?;
    let (free, total) = cudarc::driver::result::mem_get_info().map_err(cuda_err("cuMemGetInfo"))?;
    Ok((free as u64, total as u64))
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

/// An owned `ncclComm_t`; null once aborted or destroyed.
struct RawComm(nccl::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; `NcclCollective` only uses it through `&mut self` (or
// `&self` inside such a call), never from the `AbortHandle`.
unsafe impl Send for RawComm {}

/// Where the [`Collective`] device methods of [`NcclCollective`] enqueue their work: called
/// on the thread making each call, it returns that thread's stream for the communicator's
/// device (a raw `cudaStream_t` of the device's primary context; null is the legacy default
/// stream), or why there is none. The worker passes libtorch's current stream
/// (`gantry_models::runtime::current_cuda_stream`), so the gradient all-reduce is ordered
/// with the kernels that produce and read the gradient whichever stream libtorch uses.
pub type StreamSource = Box<dyn FnMut() -> Result<*mut c_void, String> + Send>;

/// One rank of an NCCL communicator on one GPU. See the [module docs](self).
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    ctx: Arc<CudaContext>,
    /// Private stream for the host-slice operations, so they never wait on
    /// (or delay) the caller's training stream.
    stream: Arc<CudaStream>,
    /// Recorded after each operation on its stream and polled: the operation's completion.
    done: CudaEvent,
    /// The stream of the [`Collective`] device methods; `None`: the legacy default stream.
    device_stream: Option<StreamSource>,
    comm: RawComm,
    /// Bound on creation and on each operation (enqueue to completion).
    timeout: Duration,
    abort: AbortHandle,
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
            .field("timeout", &self.timeout)
            .field("aborted", &self.abort.is_aborted())
            .field(
                "device_stream",
                &self.device_stream.as_ref().map(|_| "source"),
            )
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins the communicator identified by `id` (from [`NcclId::as_bytes`]
    /// on rank 0) on CUDA device `device_ordinal`. Returns once all
    /// `world_size` ranks have joined, or fails with
    /// [`CollectiveError::NcclTimeout`] after `timeout`, which also bounds
    /// every later operation (from its call until it has completed on the GPU).
    /// Like [`crate::RingConfig::timeout`], it must exceed the largest skew
    /// between ranks reaching the same operation.
    pub fn new(
        rank: usize,
        world_size: usize,
        id: &[u8],
        device_ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::with_abort_handle(
            rank,
            world_size,
            id,
            device_ordinal,
            timeout,
            AbortHandle::new(),
        )
    }

    /// [`Self::new`] with a handle the caller made beforehand ([`AbortHandle::new`]), so that
    /// another thread can abort the creation itself, which waits for every rank: it then
    /// fails with [`CollectiveError::Aborted`]. One collective per handle: its sequence is
    /// reset to 0 here, and an already aborted handle fails at once.
    pub fn with_abort_handle(
        rank: usize,
        world_size: usize,
        id: &[u8],
        device_ordinal: usize,
        timeout: Duration,
        abort: AbortHandle,
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
        if timeout.is_zero() {
            return Err(CollectiveError::InvalidArgument(
                "timeout must be positive".into(),
            ));
        }
        let id = NcclId::from_bytes(id)?;
        if abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        abort.set_sequence(0);
        ensure_nccl()?;
        ensure_nonblocking_nccl()?;
        let count = cuda_device_count()?;
        if device_ordinal >= count {
            return Err(CollectiveError::NoCudaDevice(format!(
                "device {device_ordinal} requested, {count} visible"
            )));
        }
        let ctx = CudaContext::new(device_ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let done = ctx.new_event(None).map_err(cuda_err("cuEventCreate"))?;
        let deadline = Instant::now() + timeout;
        let mut config = nonblocking_config();
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call (NCCL copies the config); the
        // context is bound to this thread by `CudaContext::new`, so NCCL picks up its device.
        let started = unsafe {
            nccl::ncclCommInitRankConfig(&mut comm, world_i, id.raw(), rank_i, &mut config)
        }
        .result();
        let mut me = NcclCollective {
            rank,
            world_size,
            ctx,
            stream,
            done,
            device_stream: None,
            comm: RawComm(comm),
            timeout,
            abort,
            seq: 0,
            poisoned: None,
        };
        let joined = match started {
            Err(e) => Err(nccl_err(INIT)(e)),
            Ok(_) if me.comm.0.is_null() => Err(CollectiveError::Nccl {
                call: INIT,
                detail: "returned no communicator".into(),
            }),
            // Rendezvous with the other ranks runs on NCCL's threads while we poll.
            Ok(_) => me.poll(INIT, deadline, || Ok(true)),
        };
        match joined {
            Ok(()) => {
                tracing::debug!(
                    rank,
                    world_size,
                    device = device_ordinal,
                    "NCCL communicator ready"
                );
                Ok(me)
            }
            Err(e) => {
                let e = if me.abort.is_aborted() {
                    CollectiveError::Aborted
                } else {
                    e
                };
                // A communicator whose creation failed or was cut short is aborted, never
                // destroyed: destroying waits for a creation that may never finish.
                me.poisoned = Some(e.chain_text());
                me.abort_comm();
                Err(e)
            }
        }
    }

    /// Fails fast once aborted or poisoned. An abort requested from another thread between
    /// operations is carried out here, on the thread that owns the communicator.
    fn usable(&mut self) -> Result<(), CollectiveError> {
        if self.abort.is_aborted() {
            self.abort_comm();
            self.poisoned.get_or_insert_with(|| "aborted".into());
            return Err(CollectiveError::Aborted);
        }
        match &self.poisoned {
            Some(p) => Err(CollectiveError::Poisoned(p.clone())),
            None => Ok(()),
        }
    }

    /// Runs one operation: on success counts it, on failure poisons the collective and
    /// aborts the communicator at once. After an error NCCL's state is undefined, and an
    /// aborted communicator lets NCCL tell peers that wait on this rank (where its
    /// transport can).
    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        self.usable()?;
        let r = self
            .ctx
            .bind_to_thread()
            .map_err(cuda_err("cuCtxSetCurrent"))
            .and_then(|()| f(self));
        match r {
            Ok(v) => {
                self.seq += 1;
                self.abort.set_sequence(self.seq);
                Ok(v)
            }
            Err(e) => {
                let e = if self.abort.is_aborted() {
                    CollectiveError::Aborted
                } else {
                    e
                };
                self.poisoned = Some(e.chain_text());
                self.abort_comm();
                Err(e)
            }
        }
    }

    /// `ncclCommAbort`, once; later calls are no-ops.
    fn abort_comm(&mut self) {
        if self.comm.0.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: a live communicator with no call of ours in flight (calls are made only
        // through `&mut self` and have returned); NCCL allows aborting a non-blocking
        // communicator at any point, during its creation and with kernels stuck waiting on
        // peers (they are stopped). Nulled below, so it is never used again.
        let r = unsafe { nccl::ncclCommAbort(self.comm.0) };
        self.comm.0 = std::ptr::null_mut();
        if r == nccl::ncclResult_t::ncclSuccess {
            tracing::debug!(rank = self.rank, "NCCL communicator aborted");
        } else {
            tracing::warn!(rank = self.rank, result = ?r, "ncclCommAbort failed");
        }
    }

    /// Waits until no NCCL call is in progress on the communicator and `ready` says the work
    /// is done, checking the abort flag, NCCL's asynchronous error and `deadline` before
    /// each wait. The caller aborts the communicator when this fails.
    fn poll(
        &self,
        op: &'static str,
        deadline: Instant,
        mut ready: impl FnMut() -> Result<bool, CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let mut pause = POLL_FIRST;
        loop {
            if self.abort.is_aborted() {
                return Err(CollectiveError::Aborted);
            }
            if !self.in_progress(op)? && ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CollectiveError::NcclTimeout {
                    op,
                    timeout: self.timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL_LONGEST);
        }
    }

    /// The communicator's asynchronous state: `true` while a call is still in progress,
    /// an error once NCCL has failed (a peer gone, a network error), even mid-kernel.
    fn in_progress(&self, op: &'static str) -> Result<bool, CollectiveError> {
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (callers run before `abort_comm`) and a valid
        // out-pointer. NCCL provides this query for polling while its work runs.
        unsafe { nccl::ncclCommGetAsyncError(self.comm.0, &mut state) }
            .result()
            .map_err(nccl_err("ncclCommGetAsyncError"))?;
        match state {
            nccl::ncclResult_t::ncclSuccess => Ok(false),
            nccl::ncclResult_t::ncclInProgress => Ok(true),
            code => Err(CollectiveError::Nccl {
                call: op,
                detail: format!("{code:?} (asynchronous): {}", self.last_error()),
            }),
        }
    }

    /// NCCL's description of its last error, for error messages.
    fn last_error(&self) -> String {
        // SAFETY: a live communicator; NCCL returns null or a NUL-terminated string it
        // owns, copied before any other NCCL call.
        let text = unsafe { nccl::ncclGetLastError(self.comm.0) };
        if text.is_null() {
            return "no detail".into();
        }
        // SAFETY: non-null and NUL-terminated, see above.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        if text.is_empty() {
            "no detail".into()
        } else {
            text.into_owned()
        }
    }

    /// Runs one NCCL operation to completion: `enqueue` makes the call on the communicator;
    /// this then polls until NCCL has finished enqueuing it (a non-blocking communicator may
    /// answer `ncclInProgress`, and until its state leaves that the kernel may not be on the
    /// stream yet), records `done` on `stream` behind it and polls that event. An event,
    /// not `cuStreamSynchronize`, so that the wait can stop for an abort or the deadline.
    /// The context must be current (see [`Self::run`]).
    fn complete(
        &self,
        op: &'static str,
        stream: cudarc::driver::sys::CUstream,
        enqueue: impl FnOnce(nccl::ncclComm_t) -> nccl::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        enqueue(self.comm.0).result().map_err(nccl_err(op))?;
        self.poll(op, deadline, || Ok(true))?;
        // SAFETY: `done` is a live event of our context, current on this thread; `stream`
        // is a stream of that context or null (the legacy default stream), as the callers'
        // contracts require.
        unsafe { cudarc::driver::result::event::record(self.done.cu_event(), stream) }
            .map_err(cuda_err("cuEventRecord"))?;
        self.poll(op, deadline, || {
            self.done
                .try_is_complete()
                .map_err(cuda_err("cuEventQuery"))
        })
    }

    /// Makes the [`Collective`] device methods ([`Collective::all_reduce_device_f32`],
    /// [`Collective::broadcast_device_f32`]) enqueue on the stream `source` returns at each
    /// call, instead of the legacy default stream. `source` must return streams of this
    /// communicator's device's primary context (libtorch's streams are).
    pub fn set_device_stream(&mut self, source: StreamSource) {
        self.device_stream = Some(source);
    }

    /// The stream for a [`Collective`] device method: the source's, or null (the legacy
    /// default stream). A source that fails fails the operation before anything is enqueued.
    fn trait_stream(&mut self) -> Result<*mut c_void, CollectiveError> {
        match self.device_stream.as_mut() {
            None => Ok(std::ptr::null_mut()),
            Some(source) => source().map_err(|detail| CollectiveError::Cuda {
                call: "the current CUDA stream",
                detail,
            }),
        }
    }

    /// In-place all-reduce of `len` elements at device address `ptr`,
    /// enqueued on `stream` (e.g. libtorch's current stream). Returns once the
    /// reduction has completed on the GPU (or failed, timed out or been aborted:
    /// see the [module docs](self)), so work the caller enqueues on `stream`
    /// afterwards is ordered after it anyway, and a stuck peer surfaces here
    /// rather than as a hang in a later synchronisation.
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
        // SAFETY: this function's contract, with the same buffer read and written.
        unsafe { self.all_reduce_device_into(ptr, ptr, len, dtype, op, stream) }
    }

    /// Out-of-place all-reduce: reduces `len` elements at device address `send` of every
    /// rank into `recv`, on `stream`; returns once complete, like [`Self::all_reduce_device`].
    /// `send == recv` is the in-place form.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_device`], for both buffers; `send` and `recv` either are
    /// equal or do not overlap.
    pub unsafe fn all_reduce_device_into(
        &mut self,
        send: u64,
        recv: u64,
        len: usize,
        dtype: DeviceDType,
        op: ReduceOp,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        self.run(|me| {
            me.complete(ALL_REDUCE, stream.cast(), |comm| {
                // SAFETY: guaranteed by this function's contract; `comm` is live.
                unsafe {
                    nccl::ncclAllReduce(
                        send as *const c_void,
                        recv as *mut c_void,
                        len,
                        dtype.raw(),
                        raw_op(op),
                        comm,
                        stream.cast(),
                    )
                }
            })
        })
    }

    /// In-place broadcast of `len` elements at device address `ptr` from
    /// `root`, on `stream`; returns once complete, like [`Self::all_reduce_device`].
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
        self.run(|me| {
            let root = me.root(root)?;
            me.complete(BROADCAST, stream.cast(), |comm| {
                // SAFETY: guaranteed by this function's contract; `comm` is live.
                unsafe { broadcast_call(comm, ptr, len, dtype.raw(), root, stream.cast()) }
            })
        })
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

    /// Copies `buf` to the device, runs the operation `enqueue` makes on it in place on the
    /// private stream to completion, and copies it back. Fine for small host buffers; large
    /// gradients should stay on the device and use the device API.
    fn via_device<T>(
        &mut self,
        op: &'static str,
        buf: &mut [T],
        enqueue: impl FnOnce(nccl::ncclComm_t, u64, nccl::cudaStream_t) -> nccl::ncclResult_t,
    ) -> Result<(), CollectiveError>
    where
        T: cudarc::driver::DeviceRepr + Copy,
    {
        if buf.is_empty() {
            // cuMemAlloc rejects zero bytes, and there is nothing to combine.
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut dev = stream.clone_htod(buf).map_err(cuda_err("cuMemcpyHtoD"))?;
        let completed = {
            let (ptr, _sync) = dev.device_ptr_mut(&stream);
            let raw = stream.cu_stream();
            self.complete(op, raw, |comm| enqueue(comm, ptr, raw.cast()))
        };
        if let Err(e) = completed {
            // Aborted before `dev` is freed: without stream-ordered allocation cudarc frees
            // it after synchronising the stream, which a stuck NCCL kernel would never let
            // finish.
            self.abort_comm();
            return Err(e);
        }
        // The operation has completed, so this copy (synchronous for pageable host memory)
        // cannot wait on a peer.
        stream
            .memcpy_dtoh(&dev, buf)
            .map_err(cuda_err("cuMemcpyDtoH"))?;
        stream
            .synchronize()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    fn host_all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        let len = buf.len();
        self.via_device(ALL_REDUCE, buf, |comm, ptr, stream| {
            // SAFETY: `ptr` is a live device copy of `len` f32s on our device, used only on
            // `stream`; `comm` is live.
            unsafe {
                nccl::ncclAllReduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    nccl::ncclDataType_t::ncclFloat32,
                    raw_op(op),
                    comm,
                    stream,
                )
            }
        })
    }

    fn host_broadcast<T>(&mut self, buf: &mut [T], root: usize) -> Result<(), CollectiveError>
    where
        T: cudarc::driver::DeviceRepr + Copy,
    {
        let root = self.root(root)?;
        let bytes = std::mem::size_of_val(buf);
        self.via_device(BROADCAST, buf, |comm, ptr, stream| {
            // SAFETY: `ptr` is a live device copy of `bytes` bytes, used only on `stream`.
            unsafe {
                broadcast_call(
                    comm,
                    ptr,
                    bytes,
                    nccl::ncclDataType_t::ncclUint8,
                    root,
                    stream,
                )
            }
        })
    }
}

/// In-place `ncclBroadcast`.
///
/// # Safety
/// As for [`NcclCollective::all_reduce_device`], with `comm` live.
unsafe fn broadcast_call(
    comm: nccl::ncclComm_t,
    ptr: u64,
    len: usize,
    dtype: nccl::ncclDataType_t,
    root: i32,
    stream: nccl::cudaStream_t,
) -> nccl::ncclResult_t {
    // SAFETY: guaranteed by the caller.
    unsafe {
        nccl::ncclBroadcast(
            ptr as *const c_void,
            ptr as *mut c_void,
            len,
            dtype,
            root,
            comm,
            stream,
        )
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
        self.run(|me| me.host_all_reduce(buf, op))
    }

    /// Enqueued on the stream of [`NcclCollective::set_device_stream`]'s source (the worker:
    /// libtorch's current stream), else on the legacy default stream. Completion is observed
    /// with the event recorded behind the reduction on that stream, polled together with the
    /// abort flag and the deadline, so a training step that waits on a dead or stuck peer
    /// ends within `timeout` or at an abort instead of hanging in libtorch's next
    /// synchronisation. The cost: the host waits for the
    /// reduction (and for the backward kernels queued before it) instead of queueing the
    /// optimizer step behind it at once; the optimizer step's own reads of the gradients
    /// made the host wait for them soon after anyway, so only the launch overlap is lost.
    unsafe fn all_reduce_device_f32(
        &mut self,
        ptr: u64,
        len: usize,
        op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        let stream = match self.trait_stream() {
            Ok(stream) => stream,
            Err(e) => return self.run(|_| Err(e)),
        };
        // SAFETY: the trait method's contract; the stream is the source's (a stream of the
        // primary context libtorch also uses, by `set_device_stream`'s contract) or null, the
        // legacy default stream of that context.
        unsafe {
            self.all_reduce_device(ptr, len, DeviceDType::F32, op, stream)?;
        }
        Ok(true)
    }

    unsafe fn broadcast_device_f32(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
    ) -> Result<bool, CollectiveError> {
        let stream = match self.trait_stream() {
            Ok(stream) => stream,
            Err(e) => return self.run(|_| Err(e)),
        };
        // SAFETY: as in `all_reduce_device_f32`.
        unsafe {
            self.broadcast_device(ptr, len, DeviceDType::F32, root, stream)?;
        }
        Ok(true)
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.run(|me| me.host_broadcast(buf, root))
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.run(|me| {
            // The root's length first, so the others can size their buffers.
            let mut len = [buf.len() as u64];
            me.host_broadcast(&mut len, root)?;
            if me.rank != root {
                buf.clear();
                buf.resize(usize::try_from(len[0]).unwrap_or(usize::MAX), 0);
            }
            me.host_broadcast(buf, root)
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // Completing a tiny all-reduce means every rank got here.
        self.run(|me| me.host_all_reduce(&mut [1.0f32], ReduceOp::Sum))
    }

    fn abort(&mut self) {
        self.abort.abort();
        self.abort_comm();
        self.poisoned.get_or_insert_with(|| "aborted".into());
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.comm.0.is_null() {
            return;
        }
        if self.poisoned.is_some() || self.abort.is_aborted() {
            // Peers may be gone, and a clean shutdown could wait on them.
            self.abort_comm();
            return;
        }
        // A clean shutdown: finalizing flushes the communicator's work and its network
        // resources. On a non-blocking communicator it returns at once and is polled like an
        // operation, so a peer that vanished cannot make this drop hang past the timeout.
        let _ = self.ctx.bind_to_thread();
        let deadline = Instant::now() + self.timeout;
        // SAFETY: a live communicator with no call in flight.
        let finalized = unsafe { nccl::ncclCommFinalize(self.comm.0) }
            .result()
            .map_err(nccl_err(FINALIZE))
            .and_then(|_| self.poll(FINALIZE, deadline, || Ok(true)));
        match finalized {
            Ok(()) => {
                // SAFETY: finalized, so destroying only frees local resources (it is always
                // blocking, and no longer waits on peers); nulled, never used again.
                let r = unsafe { nccl::ncclCommDestroy(self.comm.0) };
                self.comm.0 = std::ptr::null_mut();
                if r != nccl::ncclResult_t::ncclSuccess {
                    tracing::warn!(rank = self.rank, result = ?r, "ncclCommDestroy failed");
                }
            }
            Err(e) => {
                tracing::warn!(
                    rank = self.rank,
                    error = %e.chain_text(),
                    "the NCCL communicator did not shut down cleanly; aborting it"
                );
                self.abort_comm();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_follow_nccl_h() {
        assert_eq!(nccl_version(2, 8, 4), 2804);
        // The bundled nccl.h: NCCL_VERSION_CODE 22809 for 2.28.9.
        assert_eq!(nccl_version(2, 28, 9), 22809);
        assert_eq!(nccl_version(2, 9, 0), 20900);
        assert_eq!(nccl_version(2, 14, 0), 21400);
        assert_eq!(CONFIG_VERSION, 22809);
    }

    #[test]
    fn config_initializer_matches_nccl_config_initializer() {
        let c = config_initializer();
        assert_eq!(c.size, std::mem::size_of::<nccl::ncclConfig_t>());
        // size_t, two unsigned ints, 12 ints and 2 pointers: the 2.28 layout.
        assert_eq!(c.size, 80);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, nccl_version(2, 28, 9));
        let ints = [
            c.blocking,
            c.cgaClusterSize,
            c.minCTAs,
            c.maxCTAs,
            c.splitShare,
            c.trafficClass,
            c.collnetEnable,
            c.CTAPolicy,
            c.shrinkShare,
            c.nvlsCTAs,
            c.nChannelsPerNetPeer,
            c.nvlinkCentricSched,
        ];
        assert!(ints.iter().all(|&v| v == i32::MIN), "{ints:?}");
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn the_backend_asks_for_a_nonblocking_communicator_and_nothing_else() {
        let c = nonblocking_config();
        assert_eq!(c.blocking, 0);
        let undefined = config_initializer();
        assert_eq!(
            nccl::ncclConfig_t {
                blocking: undefined.blocking,
                ..c
            },
            undefined
        );
    }
}
