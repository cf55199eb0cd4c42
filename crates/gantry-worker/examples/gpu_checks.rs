//! The GPU checks of `scripts/gpu-smoke.sh`: what the worker's CUDA path relies on, on this
//! machine's GPU 0, one line per check with four tab-separated fields: `gpu_check`, the
//! check's name, `PASS`, `FAIL` or `SKIP`, and a detail.
//!
//! * `tf32_flags` (any machine): `train.tf32 = false` turns TF32 off for cuDNN and cuBLAS,
//!   `true` restores libtorch's defaults (cuDNN convolutions in TF32, cuBLAS in fp32).
//! * `current_stream`: libtorch's current stream reaches Rust (`runtime::current_cuda_stream`):
//!   the default stream (null) on a fresh thread, a side stream once one is made current. On
//!   a machine without CUDA it must fail cleanly (a `NoCuda` error): then SKIP.
//! * `nccl_version`: `ncclGetVersion` is 22809 (2.28.9, the release the bindings are for).
//! * `allreduce_dtypes`: f32, f16 and bf16 CUDA tensors, and a `narrow()` view of each, all-reduced
//!   with `Average` by a world-1 communicator (in place, and out of place from the view),
//!   equal the expected values, and the elements around the view are untouched.
//! * `stream_ordering`: with a libtorch side stream current, an out-of-place all-reduce on
//!   `current_cuda_stream` of a buffer written at the end of a long chain of matmuls reads
//!   the final values (the detail also reports a control run on the legacy default stream,
//!   which is not ordered with the side stream).
//! * `train_step_mlp`, `train_step_dcgan`, `train_step_dcgan_no_tf32`: one GAN training step on
//!   CUDA from the same saved weights and inputs as on the CPU: losses and both gradients within
//!   1e-5 (MLP), 2e-3 (DCGAN with `train.tf32 = true`: cuDNN convolutions in TF32) and 1e-4
//!   (DCGAN with `train.tf32 = false`), relative to max(1, |CPU value|).
//! * `bf16_autocast`: under `train.precision = "bf16"` matmuls on CUDA give bf16, and one step's
//!   fp32 losses are within 2e-2 of the fp32 step's.
//!
//! GPU-only checks print SKIP without a CUDA device, or FAIL with `GANTRY_REQUIRE_GPU=1` (the
//! GPU machine, where a skip would hide a broken set-up). Exits 1 if any check FAILed.
//! Libraries: libtorch as the binary was linked (or `GANTRY_LIBTORCH_LIB`), libnccl.so on the
//! loader path (see scripts/gpu-smoke.sh).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gantry_collective::ReduceOp;
use gantry_collective::nccl::{
    DeviceDType, NcclCollective, NcclId, nccl_version, nccl_version_code,
};
use gantry_config::{ModelKind, Precision, Settings};
use gantry_models::runtime::{self, Tf32};
use gantry_models::{Gan, Network, StepInput};
use tch::{Device, Kind, Tensor};

/// Bound on each NCCL creation and operation here.
const NCCL_TIMEOUT: Duration = Duration::from_secs(60);
const GPU: Device = Device::Cuda(0);

enum Verdict {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// Whether this machine has what GPU-only checks need, and what to say when it does not.
struct Machine {
    gpu: Result<(), String>,
    require_gpu: bool,
}

impl Machine {
    /// `None` when GPU checks can run, else their SKIP (or, where a GPU is required, FAIL).
    fn without_gpu(&self) -> Option<Verdict> {
        let why = self.gpu.as_ref().err()?;
        Some(self.missing(format!("no CUDA device: {why}")))
    }

    fn missing(&self, why: String) -> Verdict {
        if self.require_gpu {
            Verdict::Fail(format!("{why} (GANTRY_REQUIRE_GPU=1)"))
        } else {
            Verdict::Skip(why)
        }
    }
}

type Check = fn(&Machine) -> Result<Verdict>;

fn main() -> ExitCode {
    let require_gpu = std::env::var("GANTRY_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let gpu = match runtime::load_cuda() {
        runtime::CudaSupport::Unavailable(why) => Err(why.clone()),
        runtime::CudaSupport::Loaded(_) if !tch::Cuda::is_available() => {
            Err("libtorch_cuda loaded, but libtorch sees no device".into())
        }
        runtime::CudaSupport::Loaded(_) => Ok(()),
    };
    let machine = Machine { gpu, require_gpu };
    let checks: [(&str, Check); 9] = [
        ("tf32_flags", tf32_flags),
        ("current_stream", current_stream),
        ("nccl_version", check_nccl_version),
        ("allreduce_dtypes", allreduce_dtypes),
        ("stream_ordering", stream_ordering),
        ("train_step_mlp", |m| {
            train_step_matches(m, ModelKind::Mlp, true, 1e-5)
        }),
        ("train_step_dcgan", |m| {
            train_step_matches(m, ModelKind::Dcgan, true, 2e-3)
        }),
        ("train_step_dcgan_no_tf32", |m| {
            train_step_matches(m, ModelKind::Dcgan, false, 1e-4)
        }),
        ("bf16_autocast", bf16_autocast),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        // tch panics on libtorch errors; a panicking check is a failed one, not a crash.
        let verdict = match std::panic::catch_unwind(|| check(&machine)) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => Verdict::Fail(format!("{e:#}")),
            Err(panic) => Verdict::Fail(format!("panicked: {}", panic_text(&panic))),
        };
        let (word, detail) = match verdict {
            Verdict::Pass(d) => ("PASS", d),
            Verdict::Fail(d) => {
                failed += 1;
                ("FAIL", d)
            }
            Verdict::Skip(d) => ("SKIP", d),
        };
        // One line per check: tabs and newlines inside the detail would break the format.
        let detail = detail.replace(['\t', '\n'], " ");
        println!("gpu_check\t{name}\t{word}\t{detail}");
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

fn tf32_flags(_: &Machine) -> Result<Verdict> {
    let off = runtime::set_tf32(false);
    let on = runtime::set_tf32(true);
    let want_off = Tf32 {
        cudnn: false,
        cublas: false,
    };
    let want_on = Tf32 {
        cudnn: true,
        cublas: false,
    };
    Ok(if off == want_off && on == want_on {
        Verdict::Pass(format!("tf32=false: {off:?}; tf32=true: {on:?}"))
    } else {
        Verdict::Fail(format!(
            "tf32=false gave {off:?} (want {want_off:?}), tf32=true gave {on:?} (want {want_on:?})"
        ))
    })
}

fn current_stream(machine: &Machine) -> Result<Verdict> {
    if machine.gpu.is_err() {
        // Without CUDA the call must fail with a clear error, never crash or invent a stream.
        return Ok(match runtime::current_cuda_stream(0) {
            Ok(stream) => Verdict::Fail(format!("no CUDA, yet a current stream {stream:?}")),
            Err(e) => machine.missing(format!("no CUDA, reported cleanly: {e}")),
        });
    }
    // A fresh thread: libtorch's current stream there is the default stream.
    let (default, side, seen, restored) = std::thread::spawn(|| -> Result<_> {
        let default = runtime::current_cuda_stream(0)?;
        let side = runtime::select_cuda_stream(0, true)?;
        let seen = runtime::current_cuda_stream(0)?;
        runtime::select_cuda_stream(0, false)?;
        let restored = runtime::current_cuda_stream(0)?;
        Ok((
            default as usize,
            side as usize,
            seen as usize,
            restored as usize,
        ))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the stream thread panicked"))??;
    let detail = format!(
        "default {default:#x}, side {side:#x}, current after selecting the side stream \
         {seen:#x}, after restoring {restored:#x}"
    );
    Ok(
        if default == 0 && side != 0 && seen == side && restored == 0 {
            Verdict::Pass(detail)
        } else {
            Verdict::Fail(detail)
        },
    )
}

fn check_nccl_version(machine: &Machine) -> Result<Verdict> {
    let want = nccl_version(2, 28, 9);
    Ok(match nccl_version_code() {
        Ok(v) if v == want => Verdict::Pass(format!("ncclGetVersion {v}")),
        Ok(v) => Verdict::Fail(format!("ncclGetVersion {v}, want {want} (2.28.9)")),
        Err(e) => machine.missing(format!("libnccl unavailable: {e}")),
    })
}

/// A world-1 communicator on GPU 0.
fn world_one() -> Result<NcclCollective> {
    let id = NcclId::new().context("ncclGetUniqueId")?;
    NcclCollective::new(0, 1, id.as_bytes(), 0, NCCL_TIMEOUT).context("a world-1 communicator")
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1),
    )?)
}

fn allreduce_dtypes(machine: &Machine) -> Result<Verdict> {
    if let Some(v) = machine.without_gpu() {
        return Ok(v);
    }
    let mut nccl = world_one()?;
    let stream = runtime::current_cuda_stream(0)?;
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (kind, dtype) in [
        (Kind::Float, DeviceDType::F32),
        (Kind::Half, DeviceDType::F16),
        (Kind::BFloat16, DeviceDType::BF16),
    ] {
        // Multiples of 0.5 below 32: exact in all three types.
        let full = (Tensor::arange(64, (Kind::Float, GPU)) * 0.5).to_kind(kind);
        let expected = host_f32(&full)?;
        // SAFETY: `full` is a contiguous CUDA tensor of 64 `dtype` elements on device 0, used
        // only on libtorch's current stream, which the all-reduce is enqueued on.
        unsafe {
            nccl.all_reduce_device(full.data_ptr() as u64, 64, dtype, ReduceOp::Average, stream)
        }?;
        let in_place = host_f32(&full)? == expected;
        let view = full.narrow(0, 10, 20);
        let out = Tensor::zeros([20], (kind, GPU));
        // SAFETY: `view` addresses 20 `dtype` elements of `full` (data_ptr includes the
        // storage offset), `out` 20 more; both on device 0, disjoint, used only on `stream`.
        unsafe {
            nccl.all_reduce_device_into(
                view.data_ptr() as u64,
                out.data_ptr() as u64,
                20,
                dtype,
                ReduceOp::Average,
                stream,
            )
        }?;
        let view_ok = host_f32(&out)? == expected[10..30];
        let around_ok = host_f32(&full)? == expected;
        results.push(format!(
            "{kind:?}: in place {in_place}, view {view_ok}, rest untouched {around_ok}"
        ));
        if !(in_place && view_ok && around_ok) {
            failures.push(format!("{kind:?}"));
        }
    }
    let detail = format!("world 1, Average: {}", results.join("; "));
    Ok(if failures.is_empty() {
        Verdict::Pass(detail)
    } else {
        Verdict::Fail(detail)
    })
}

fn stream_ordering(machine: &Machine) -> Result<Verdict> {
    if let Some(v) = machine.without_gpu() {
        return Ok(v);
    }
    // On its own thread: libtorch's current stream is per thread, and this one changes it.
    std::thread::spawn(stream_ordering_on_side_stream)
        .join()
        .map_err(|_| anyhow::anyhow!("the stream-ordering thread panicked"))?
}

fn stream_ordering_on_side_stream() -> Result<Verdict> {
    const N: i64 = 1 << 20;
    let mut nccl = world_one()?;
    let side = runtime::select_cuda_stream(0, true)?;
    ensure!(!side.is_null(), "the pool stream is the default stream");
    // Enqueues, on the current (side) stream, ~4 TFLOP of matmuls and then writes 7 into
    // `src` from their (zero) result: the write lands only after the chain.
    let long_write = |src: &Tensor| {
        let zeros = Tensor::zeros([4096, 4096], (Kind::Float, GPU));
        let mut y = zeros.shallow_clone();
        for _ in 0..30 {
            y = y.matmul(&zeros);
        }
        let mut src = src.shallow_clone();
        src.copy_(&(y.flatten(0, -1).narrow(0, 0, N) + 7.0));
    };
    let stale = |dst: &Tensor| -> Result<usize> {
        Ok(host_f32(dst)?.iter().filter(|&&v| v != 7.0).count())
    };

    let src = Tensor::full([N], -1.0, (Kind::Float, GPU));
    let dst = Tensor::zeros([N], (Kind::Float, GPU));
    tch::Cuda::synchronize(0);
    let started = Instant::now();
    long_write(&src);
    let stream = runtime::current_cuda_stream(0)?;
    ensure!(
        stream == side,
        "current_cuda_stream is not the selected side stream"
    );
    // SAFETY: `src` and `dst` are disjoint contiguous f32 CUDA tensors of N elements on
    // device 0, used only on `stream` (libtorch's current stream) meanwhile.
    unsafe {
        nccl.all_reduce_device_into(
            src.data_ptr() as u64,
            dst.data_ptr() as u64,
            N as usize,
            DeviceDType::F32,
            ReduceOp::Sum,
            stream,
        )
    }?;
    let waited = started.elapsed();
    let ordered_stale = stale(&dst)?;

    // Control: the same on the legacy default stream, which a non-blocking pool stream does
    // not wait for: the all-reduce may read `src` before the chain wrote it.
    let _ = src.shallow_clone().fill_(-1.0);
    let _ = dst.shallow_clone().zero_();
    tch::Cuda::synchronize(0);
    long_write(&src);
    // SAFETY: as above, but on the legacy default stream (null) of the same context: it may
    // race with the side stream's write, which is what the control shows; `dst` is read only
    // after synchronising the device.
    unsafe {
        nccl.all_reduce_device_into(
            src.data_ptr() as u64,
            dst.data_ptr() as u64,
            N as usize,
            DeviceDType::F32,
            ReduceOp::Sum,
            std::ptr::null_mut(),
        )
    }?;
    tch::Cuda::synchronize(0);
    let control_stale = stale(&dst)?;
    runtime::select_cuda_stream(0, false)?;

    let detail = format!(
        "side stream {side:?}: {ordered_stale} of {N} elements stale after {:.1} ms (chain \
         and all-reduce); control on the legacy default stream: {control_stale} stale",
        waited.as_secs_f64() * 1e3
    );
    Ok(if ordered_stale == 0 {
        Verdict::Pass(detail)
    } else {
        Verdict::Fail(detail)
    })
}

fn gan_settings(kind: ModelKind, tf32: bool, precision: Precision) -> Settings {
    let mut s = Settings::default();
    s.model.kind = kind;
    s.train.tf32 = tf32;
    s.train.precision = precision;
    s
}

/// 16 images (28×28, one channel, in [-1, 1]) and their latents, made on the CPU from a
/// fixed seed.
fn fixed_inputs(latent_dim: usize) -> (Tensor, Tensor) {
    tch::manual_seed(7);
    let real = Tensor::rand([16, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let z = Tensor::randn([16, latent_dim as i64], (Kind::Float, Device::Cpu));
    (real, z)
}

/// A solo step's gradient "averaging": nothing to do.
fn no_sync() -> impl FnMut(Network, &mut Tensor) -> Result<bool, std::convert::Infallible> {
    |_, _| Ok(false)
}

/// One training step without a group; returns (d_loss, g_loss) on the host, the loss
/// tensors' kind, and both networks' flat gradients on the host.
fn one_step(gan: &mut Gan, real: &Tensor, z: &Tensor) -> Result<((f64, f64), Kind, Tensor)> {
    let input = StepInput {
        real: real.to_device(gan.device),
        z: z.to_device(gan.device),
        alpha: None,
        labels: None,
    };
    let stats = gan.train_step(&input, &mut no_sync())?;
    let host = stats.to_host();
    Ok((
        (host.d_loss, host.g_loss),
        stats.d_loss.kind(),
        gan.gradients().to_device(Device::Cpu),
    ))
}

/// A GAN on `device` with the weights saved in `weights`.
fn gan_from(settings: &Settings, device: Device, weights: &std::path::Path) -> Result<Gan> {
    let mut gan = Gan::new(settings, [1i64, 28, 28], device)?;
    gan.load(weights)?;
    Ok(gan)
}

/// `max |a - b| / max(1, max |a|)`.
fn relative_gap(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

fn train_step_matches(
    machine: &Machine,
    kind: ModelKind,
    tf32: bool,
    tolerance: f64,
) -> Result<Verdict> {
    if let Some(v) = machine.without_gpu() {
        return Ok(v);
    }
    let settings = gan_settings(kind, tf32, Precision::Fp32);
    let dir = tempfile::tempdir()?;
    let mut cpu = Gan::new(&settings, [1i64, 28, 28], Device::Cpu)?;
    cpu.save(dir.path())?;
    // What task::build does at worker start with this train.tf32.
    runtime::set_tf32(tf32);
    let mut gpu = gan_from(&settings, GPU, dir.path())?;
    let (real, z) = fixed_inputs(settings.model.latent_dim);
    let ((cpu_d, cpu_g), _, cpu_grad) = one_step(&mut cpu, &real, &z)?;
    let ((gpu_d, gpu_g), _, gpu_grad) = one_step(&mut gpu, &real, &z)?;
    runtime::set_tf32(true);
    let loss_gap = |a: f64, b: f64| (a - b).abs() / a.abs().max(1.0);
    let gaps = [
        loss_gap(cpu_d, gpu_d),
        loss_gap(cpu_g, gpu_g),
        relative_gap(&cpu_grad, &gpu_grad),
    ];
    let detail = format!(
        "tf32 {tf32}: d_loss {cpu_d:.7} vs {gpu_d:.7}, g_loss {cpu_g:.7} vs {gpu_g:.7}; \
         relative gaps d_loss {:.2e}, g_loss {:.2e}, gradients {:.2e} (tolerance {tolerance:.0e})",
        gaps[0], gaps[1], gaps[2]
    );
    Ok(if gaps.iter().all(|g| *g <= tolerance) {
        Verdict::Pass(detail)
    } else {
        Verdict::Fail(detail)
    })
}

fn bf16_autocast(machine: &Machine) -> Result<Verdict> {
    if let Some(v) = machine.without_gpu() {
        return Ok(v);
    }
    let a = Tensor::randn([64, 128], (Kind::Float, GPU));
    let b = Tensor::randn([128, 32], (Kind::Float, GPU));
    let autocast = gantry_models::precision::Autocast::new(Precision::Bf16, GPU);
    let product = autocast.run(|| a.matmul(&b)).kind();

    let fp32 = gan_settings(ModelKind::Mlp, true, Precision::Fp32);
    let bf16 = gan_settings(ModelKind::Mlp, true, Precision::Bf16);
    let dir = tempfile::tempdir()?;
    Gan::new(&fp32, [1i64, 28, 28], GPU)?.save(dir.path())?;
    let (real, z) = fixed_inputs(fp32.model.latent_dim);
    let ((d32, g32), kind32, _) = one_step(&mut gan_from(&fp32, GPU, dir.path())?, &real, &z)?;
    let ((d16, g16), kind16, _) = one_step(&mut gan_from(&bf16, GPU, dir.path())?, &real, &z)?;
    let gap = (d32 - d16).abs().max((g32 - g16).abs());
    let detail = format!(
        "matmul under autocast: {product:?}; losses fp32 (d {d32:.5}, g {g32:.5}) vs bf16 \
         (d {d16:.5}, g {g16:.5}), largest gap {gap:.2e} (tolerance 2e-2); loss kinds \
         {kind32:?} / {kind16:?}"
    );
    Ok(
        if product == Kind::BFloat16 && kind16 == Kind::Float && gap <= 2e-2 {
            Verdict::Pass(detail)
        } else {
            Verdict::Fail(detail)
        },
    )
}
