//! Process-wide libtorch set-up.

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
