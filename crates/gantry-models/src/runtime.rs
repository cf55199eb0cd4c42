//! Process-wide libtorch set-up.

use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

use gantry_config::DeviceChoice;
use tch::Device;

use crate::ModelError;

/// The libtorch library directory this binary was linked against; `GANTRY_LIBTORCH_LIB` at run
/// time points elsewhere (a binary carried to a machine with its own PyTorch).
fn libtorch_lib_dir() -> PathBuf {
    std::env::var_os("GANTRY_LIBTORCH_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("GANTRY_LIBTORCH_LIB")))
}

/// Keeps freed host memory in the process instead of returning it to the kernel at every
/// free, for a process that allocates the same large tensors step after step.
///
/// glibc serves a large allocation with its own `mmap` and unmaps it on free, and trims the
/// heap top whenever enough of it is free; libtorch's CPU tensors (a batch's activations,
/// several MiB each) then cost fresh, zero-filled pages, a page fault per 4 KiB, on every
/// step. Measured on the PixelCNN (40 steps of 64 and a 64-image sample grid, one thread):
/// 5.0 to 6.0 million page faults and 59 to 63 s of CPU with glibc's defaults, 77 thousand and
/// 43 to 49 s with these settings. What is kept is bounded: allocations above 32 MiB still
/// get their own mapping, and at most 256 MiB of free heap top is kept. Call before the first
/// tensor is created; other allocators (jemalloc through `LD_PRELOAD`) ignore it.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate (at the start of main).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// The asynchronous signals a Gantry process may install handlers for (SIGINT and SIGTERM
/// stop a worker) or that a user may send it.
const ASYNC_SIGNALS: [libc::c_int; 9] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCHLD,
    libc::SIGWINCH,
];

/// Keeps [`ASYNC_SIGNALS`] off the calling thread, and off every thread it starts from now on
/// (libtorch's OpenMP pool, helper threads), until [`unblock_async_signals`]. A thread that
/// computes must never run a signal handler: libtorch's oneDNN (2.11's) points the stack
/// pointer into a heap buffer while its generated fp32 GEMM kernels run (oneDNN issue 4845,
/// fixed upstream in March 2026), so the kernel's signal frame lands in the heap and a later
/// `free` aborts ("corrupted size vs. prev_size", "munmap_chunk(): invalid pointer"). Measured
/// here: a supervised worker multiplying through oneDNN died within a few hundred SIGINTs (a
/// single terminal Ctrl-C killed one in six). Process-directed signals go to a thread that
/// does not block them: at least one must stay unblocked (the async runtime's, which handle
/// them) or the signal waits forever.
pub fn block_async_signals() {
    set_async_signal_mask(libc::SIG_BLOCK);
}

/// Lets [`ASYNC_SIGNALS`] reach the calling thread again (for threads that only do I/O).
pub fn unblock_async_signals() {
    set_async_signal_mask(libc::SIG_UNBLOCK);
}

fn set_async_signal_mask(how: libc::c_int) {
    // SAFETY: a sigset_t on the stack, initialised by sigemptyset before use, and valid
    // pointers for the calls; pthread_sigmask only changes this thread's mask.
    let code = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in ASYNC_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut())
    };
    // Fails only for an invalid `how`, which the two callers never pass.
    debug_assert_eq!(code, 0, "pthread_sigmask");
}

/// What loading CUDA support found, kept for `--list-devices` and logs.
#[derive(Debug, Clone)]
pub enum CudaSupport {
    Loaded(PathBuf),
    Unavailable(String),
}

static CUDA: OnceLock<CudaSupport> = OnceLock::new();

/// Loads `libtorch_cuda.so` once per process, if it and the CUDA libraries it needs are present.
///
/// The linker's `--as-needed` drops libtorch_cuda from our binaries because no symbol of it is
/// referenced directly; without it libtorch registers no CUDA backend and reports no GPU.
/// Linking it hard would make every install carry cuBLAS, cuDNN and friends (gigabytes), so
/// instead it is opened at start with RTLD_GLOBAL, which runs its static registrations. On a
/// CPU-only install the open fails (missing libcublas...) and Gantry simply runs on the CPU.
pub fn load_cuda() -> &'static CudaSupport {
    CUDA.get_or_init(|| {
        let path = libtorch_lib_dir().join("libtorch_cuda.so");
        if !path.exists() {
            return CudaSupport::Unavailable(format!("{} not found", path.display()));
        }
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: libtorch_cuda's initialisers only register CUDA kernels and hooks with the
        // already loaded libtorch_cpu; the library is never unloaded (forgotten below).
        match unsafe { libloading::os::unix::Library::open(Some(&path), flags) } {
            Ok(lib) => {
                std::mem::forget(lib);
                CudaSupport::Loaded(path)
            }
            Err(e) => CudaSupport::Unavailable(e.to_string()),
        }
    })
}

unsafe extern "C" {
    fn gantry_set_tf32(cudnn: i32, cublas: i32);
    fn gantry_tf32_state(cudnn: *mut i32, cublas: *mut i32);
    fn gantry_current_cuda_stream(
        device: i32,
        stream: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn gantry_select_cuda_stream(
        device: i32,
        side: i32,
        stream: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// Whether CUDA float32 work may use TF32 tensor cores, per library (libtorch's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tf32 {
    /// cuDNN convolutions (`torch.backends.cudnn.allow_tf32`); libtorch's default: true.
    pub cudnn: bool,
    /// cuBLAS float32 matmuls (`torch.backends.cuda.matmul.allow_tf32`); default: false.
    pub cublas: bool,
}

/// Applies `train.tf32` to the process: `true` is libtorch's defaults (cuDNN convolutions in
/// TF32, cuBLAS matmuls in full fp32), `false` turns TF32 off for both. Process-wide flags,
/// read by CUDA kernels at launch; on the CPU they change nothing.
pub fn set_tf32(allow: bool) -> Tf32 {
    // SAFETY: sets two plain flags of libtorch's global context.
    unsafe { gantry_set_tf32(i32::from(allow), 0) };
    tf32()
}

/// libtorch's current TF32 flags.
pub fn tf32() -> Tf32 {
    let (mut cudnn, mut cublas) = (0, 0);
    // SAFETY: reads two flags of libtorch's global context into valid pointers.
    unsafe { gantry_tf32_state(&mut cudnn, &mut cublas) };
    Tf32 {
        cudnn: cudnn != 0,
        cublas: cublas != 0,
    }
}

/// The calling thread's current libtorch CUDA stream on device `ordinal`
/// (`at::cuda::getCurrentCUDAStream(ordinal).stream()`), as a raw `cudaStream_t`, for NCCL
/// calls that must run in order with libtorch's kernels. Usually the legacy default stream
/// (null) unless something set another current stream (a side stream, CUDA-graph capture).
///
/// Resolved at run time in `libc10_cuda.so`, so binaries link and start without CUDA: fails
/// with [`ModelError::NoCuda`] when CUDA support is not loaded ([`load_cuda`]) or there is
/// no such device.
pub fn current_cuda_stream(ordinal: usize) -> Result<*mut c_void, ModelError> {
    // SAFETY: the shim's contract, see `stream_call`.
    stream_call(ordinal, |device, stream, error, len| unsafe {
        gantry_current_cuda_stream(device, stream, error, len)
    })
}

/// Makes a stream of libtorch's pool (`side == true`) or device `ordinal`'s default stream
/// the calling thread's current libtorch stream (`at::cuda::setCurrentCUDAStream`) and
/// returns it as a raw `cudaStream_t`. For checks that the NCCL path follows libtorch's
/// current stream; errors as [`current_cuda_stream`].
pub fn select_cuda_stream(ordinal: usize, side: bool) -> Result<*mut c_void, ModelError> {
    // SAFETY: the shim's contract, see `stream_call`.
    stream_call(ordinal, |device, stream, error, len| unsafe {
        gantry_select_cuda_stream(device, i32::from(side), stream, error, len)
    })
}

/// Runs a shim stream function: `call(device, &mut stream, error, error_len)` returns 0, or
/// -1 with a NUL-terminated reason in `error` (the shim catches C++ exceptions).
fn stream_call(
    ordinal: usize,
    call: impl FnOnce(i32, *mut *mut c_void, *mut c_char, usize) -> i32,
) -> Result<*mut c_void, ModelError> {
    let device = i32::try_from(ordinal)
        .map_err(|_| ModelError::NoCuda(format!("CUDA device {ordinal} out of range")))?;
    let mut stream = std::ptr::null_mut();
    let mut error = crate::shim::ShimError::new();
    let (buffer, len) = error.buffer();
    if call(device, &mut stream, buffer, len) == 0 {
        return Ok(stream);
    }
    Err(ModelError::NoCuda(error.message()))
}

/// Sets libtorch's intra-op thread count. `threads = 0` shares the machine's cores evenly
/// between the `workers_on_host` processes, so N workers never oversubscribe the CPU.
pub fn set_threads(threads: usize, workers_on_host: usize) -> usize {
    let n = if threads > 0 {
        threads
    } else {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / workers_on_host.max(1)).max(1)
    };
    tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
    // libtorch refuses (and tch panics on) a second call once parallel work has run, which a
    // process building a second Trainer (a restart, a resume, tests) would make.
    static INTEROP: std::sync::Once = std::sync::Once::new();
    INTEROP.call_once(|| tch::set_num_interop_threads(1));
    n
}

/// Resolves the configured device, loading CUDA support first when it may be needed.
pub fn resolve_device(choice: DeviceChoice, ordinal: usize) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            load_cuda();
            Ok(if tch::Cuda::is_available() {
                Device::Cuda(ordinal)
            } else {
                Device::Cpu
            })
        }
        DeviceChoice::Cuda => {
            if let CudaSupport::Unavailable(why) = load_cuda() {
                return Err(ModelError::NoCuda(why.clone()));
            }
            if !tch::Cuda::is_available() {
                return Err(ModelError::NoCuda(
                    "CUDA runtime loaded, but no device found".into(),
                ));
            }
            Ok(Device::Cuda(ordinal))
        }
    }
}

/// A human-readable report of what libtorch sees.
pub fn describe_devices() -> String {
    let mut lines = vec![format!("libtorch: {}", libtorch_lib_dir().display())];
    match load_cuda() {
        CudaSupport::Loaded(path) => lines.push(format!("cuda support: loaded {}", path.display())),
        CudaSupport::Unavailable(why) => lines.push(format!("cuda support: not loaded ({why})")),
    }
    let cuda_devices = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    lines.push(format!("cuda devices: {cuda_devices}"));
    if cuda_devices > 0 {
        lines.push(format!("cudnn: {}", tch::Cuda::cudnn_is_available()));
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    lines.push(format!(
        "cpu: {cores} cores, intra-op threads {}",
        tch::get_num_threads()
    ));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `signal` is blocked on the calling thread.
    fn blocked(signal: libc::c_int) -> bool {
        // SAFETY: a zeroed sigset_t filled in by pthread_sigmask, which changes nothing here.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set),
                0
            );
            libc::sigismember(&set, signal) == 1
        }
    }

    #[test]
    fn a_computing_thread_and_the_threads_it_starts_block_stop_signals_until_unblocked() {
        // On a thread of its own: the test harness's threads keep their masks.
        std::thread::spawn(|| {
            assert!(!blocked(libc::SIGINT) && !blocked(libc::SIGTERM));
            block_async_signals();
            assert!(blocked(libc::SIGINT) && blocked(libc::SIGTERM));
            assert!(
                !blocked(libc::SIGSEGV),
                "faults must still reach their handlers"
            );
            let child = std::thread::spawn(|| blocked(libc::SIGINT) && blocked(libc::SIGTERM));
            assert!(
                child.join().unwrap(),
                "a thread started after inherits the mask"
            );
            let io = std::thread::spawn(|| {
                unblock_async_signals();
                blocked(libc::SIGINT) || blocked(libc::SIGTERM)
            });
            assert!(!io.join().unwrap(), "an I/O thread takes the signals again");
            assert!(
                blocked(libc::SIGINT),
                "unblocking elsewhere leaves this thread's mask"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn tf32_follows_train_tf32_and_back_to_libtorchs_defaults() {
        let off = set_tf32(false);
        assert_eq!(
            off,
            Tf32 {
                cudnn: false,
                cublas: false
            }
        );
        assert_eq!(tf32(), off);
        // `true` is libtorch's default state: TF32 for cuDNN convolutions only.
        let on = set_tf32(true);
        assert_eq!(
            on,
            Tf32 {
                cudnn: true,
                cublas: false
            }
        );
    }

    #[test]
    fn current_cuda_stream_says_no_cuda_without_a_device() {
        load_cuda();
        if tch::Cuda::is_available() {
            // A GPU machine: the current stream of a fresh thread is the default stream.
            let stream = current_cuda_stream(0).expect("device 0's current stream");
            assert!(stream.is_null(), "{stream:?}");
        } else {
            let err = current_cuda_stream(0).expect_err("no CUDA device, no stream");
            assert!(matches!(err, ModelError::NoCuda(_)), "{err}");
            assert!(!err.to_string().is_empty());
        }
        // An index no c10 DeviceIndex can hold is refused before any CUDA call.
        let err = current_cuda_stream(1000).expect_err("index out of range");
        assert!(err.to_string().contains("1000"), "{err}");
        let err = select_cuda_stream(1000, true).expect_err("index out of range");
        assert!(err.to_string().contains("1000"), "{err}");
    }
}
