// ATen operators that tch's C API does not expose with the arguments Gantry needs.
//
// Each function takes borrowed at::Tensor pointers (tch's C_tensor) and returns a new
// heap-allocated at::Tensor that the Rust side owns (tch::Tensor::from_ptr), or nullptr with
// the exception's message in `error`. Calls go through the dispatcher, so autograd records
// them exactly as it would from Python.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>

// oneDNN's matmul primitive on strided fp32 tensors: result = beta·result + alpha·(a·b).
// Exported by libtorch_cpu (declared in ATen/native/mkldnn/Matmul.h, which the wheel does
// not ship); libtorch's own bf16 matmuls go through it. Gantry pins one libtorch (tch's), so
// the signature is checked at link time.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                   float beta, float alpha);
}

namespace {

// Below this many rows, columns or inner products a GEMM is too small for oneDNN's blocking
// (the discriminator's 256 → 1 logit: 5 GFLOP/s through oneDNN, 30 through MKL).
constexpr int64_t kMinOneDnnDim = 16;

bool onednn_sized(const at::Tensor& a, const at::Tensor& b) {
    return a.size(0) >= kMinOneDnnDim && a.size(1) >= kMinOneDnnDim &&
           b.size(1) >= kMinOneDnnDim;
}

// oneDNN wants each matrix row- or column-major (any leading dimension); anything else is
// made contiguous first.
at::Tensor blas_layout(const at::Tensor& t) {
    const bool rows = t.stride(1) == 1 && t.stride(0) >= t.size(1);
    const bool cols = t.stride(0) == 1 && t.stride(1) >= t.size(0);
    return rows || cols ? t : t.contiguous();
}

// a·b of two 2-D fp32 CPU matrices: through oneDNN where the shape suits it, else at::mm.
// Inside a differentiable backward (create_graph, as the WGAN-GP penalty's second derivative
// needs) the product must itself be recorded, so it goes through at::mm then too.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
    if (at::GradMode::is_enabled() || !onednn_sized(a, b)) {
        return at::mm(a, b);
    }
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    at::native::mkldnn_matmul(blas_layout(a), blas_layout(b), out, 0.0f, 1.0f);
    return out;
}

// y = x·wᵀ (+ b) (torch.nn.functional.linear) with its products through `product`; the same
// gradients as libtorch's linear: dx = g·w, dw = gᵀ·x, db = Σ_rows g. Two functions, with and
// without the bias: libtorch's custom functions do not take an undefined tensor argument.
torch::autograd::variable_list linear_backward(torch::autograd::AutogradContext* ctx,
                                               const at::Tensor& g, bool bias) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) {
        dx = product(g, w);
    }
    if (ctx->needs_input_grad(1)) {
        dw = product(g.t(), x);
    }
    if (bias && ctx->needs_input_grad(2)) {
        db = g.sum(0);
    }
    if (bias) {
        return {dx, dw, db};
    }
    return {dx, dw};
}

struct OneDnnLinear : public torch::autograd::Function<OneDnnLinear> {
    static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                              const at::Tensor& w, const at::Tensor& b) {
        ctx->save_for_backward({x, w});
        return product(x, w.t()).add_(b);
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        return linear_backward(ctx, grads[0], true);
    }
};

struct OneDnnLinearNoBias : public torch::autograd::Function<OneDnnLinearNoBias> {
    static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                              const at::Tensor& w) {
        ctx->save_for_backward({x, w});
        return product(x, w.t());
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        return linear_backward(ctx, grads[0], false);
    }
};

// Whether libtorch lets its oneDNN matmul run here at all: it refuses some CPUs, and any CPU
// whose oneDNN instruction set is capped (ONEDNN_MAX_CPU_ISA=AVX2 fails its check even for fp32
// inputs). Asked once, by one small product; where it refuses, every layer stays at::linear.
bool onednn_usable() {
    static const bool usable = [] {
        try {
            at::NoGradGuard no_grad;
            const auto a = at::ones({kMinOneDnnDim, kMinOneDnnDim}, at::kFloat);
            auto out = at::empty({kMinOneDnnDim, kMinOneDnnDim}, at::kFloat);
            at::native::mkldnn_matmul(a, a, out, 0.0f, 1.0f);
            return true;
        } catch (const std::exception&) {
            return false;
        }
    }();
    return usable;
}

bool onednn_applies(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    return onednn_usable() && x.dim() == 2 && x.is_cpu() &&
           x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
           (!b.defined() || b.scalar_type() == at::kFloat) &&
           // Under bf16 autocast libtorch's linear casts and multiplies through oneDNN itself.
           !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

extern "C" {

// torch.nn.functional.linear(input, weight, bias): `bias` may be null. With `onednn != 0` and
// a 2-D fp32 CPU input its products go through oneDNN's matmul, else through at::linear
// (libtorch's BLAS, MKL on x86); either way recorded by autograd (twice differentiable).
at::Tensor* gantry_linear(const at::Tensor* input, const at::Tensor* weight,
                          const at::Tensor* bias, int onednn, char* error, size_t error_len) {
    try {
        const at::Tensor b = bias != nullptr ? *bias : at::Tensor();
        if (onednn != 0 && onednn_applies(*input, *weight, b)) {
            return new at::Tensor(b.defined() ? OneDnnLinear::apply(*input, *weight, b)
                                              : OneDnnLinearNoBias::apply(*input, *weight));
        }
        return new at::Tensor(at::linear(*input, *weight, b));
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return nullptr;
    }
}

// torch.nn.functional.leaky_relu(self, negative_slope): one kernel forward and backward
// (tch only exposes the default slope of 0.01).
at::Tensor* gantry_leaky_relu(const at::Tensor* self, double negative_slope, char* error,
                              size_t error_len) {
    try {
        return new at::Tensor(at::leaky_relu(*self, negative_slope));
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return nullptr;
    }
}

// Autocast (torch.autocast) for one device type on the calling thread, in bfloat16. tch's own
// `autocast` only knows CUDA with its default dtype (float16) and does nothing on a CPU.
// `enter` saves the previous state into `prev_enabled`/`prev_dtype` for `exit` to restore.
static at::DeviceType autocast_device(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

void gantry_autocast_enter(int cuda, int* prev_enabled, int* prev_dtype) {
    const auto device = autocast_device(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(device) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::set_autocast_dtype(device, at::kBFloat16);
    at::autocast::increment_nesting();
}

void gantry_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
    const auto device = autocast_device(cuda);
    // The cache of casted weights lives as long as the outermost autocast region, as in
    // torch.autocast.__exit__.
    if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device, prev_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(prev_dtype));
}

// TF32 for CUDA float32 work (train.tf32, mapped in gantry_models::runtime::set_tf32):
// `cudnn` for cuDNN convolutions (libtorch's default: on), `cublas` for cuBLAS matmuls
// (default: off). Process-wide plain flags of at::globalContext() in libtorch_cpu, so
// callable without CUDA. The legacy setters and getters are used as a pair: mixing them with
// setFloat32Precision makes libtorch 2.9+ refuse to answer the legacy getters.
void gantry_set_tf32(int cudnn, int cublas) {
    at::globalContext().setAllowTF32CuDNN(cudnn != 0);
    at::globalContext().setAllowTF32CuBLAS(cublas != 0);
}

void gantry_tf32_state(int* cudnn, int* cublas) {
    *cudnn = at::globalContext().allowTF32CuDNN() ? 1 : 0;
    *cublas = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
}

// c10::cuda::CUDAStream's layout (c10/cuda/CUDAStream.h: one c10::Stream, which is a
// c10::Device {int8 type, int8 index} and an int64 id). Trivially copyable, so the Itanium
// ABI returns it in registers, as it does this struct.
struct GantryCudaStream {
    int8_t device_type;
    int8_t device_index;
    int64_t id;
};
static_assert(sizeof(GantryCudaStream) == 16, "c10::cuda::CUDAStream is 16 bytes");

// c10::cuda's stream functions, resolved at run time in libc10_cuda.so so that this shim
// (linked into every binary) needs no CUDA library: a CPU-only libtorch has none. libc10_cuda
// is loaded (RTLD_GLOBAL) with libtorch_cuda by gantry_models::runtime::load_cuda; before
// that, or without it, these report "no CUDA". Itanium-mangled names of libtorch's C++ API:
// a libtorch that changed these signatures fails the lookup (an error, not a crash).
struct CudaStreamFns {
    GantryCudaStream (*get_current)(int8_t);            // getCurrentCUDAStream(DeviceIndex)
    GantryCudaStream (*get_default)(int8_t);            // getDefaultCUDAStream(DeviceIndex)
    GantryCudaStream (*get_from_pool)(bool, int8_t);    // getStreamFromPool(bool, DeviceIndex)
    void (*set_current)(GantryCudaStream);              // setCurrentCUDAStream(CUDAStream)
    void* (*raw)(const GantryCudaStream*);              // CUDAStream::stream() const
};
static CudaStreamFns stream_fns;
static bool stream_fns_ready = false;
static std::mutex stream_fns_mutex;

static bool resolve_stream_fns(char* error, size_t error_len) {
    std::lock_guard<std::mutex> lock(stream_fns_mutex);
    if (stream_fns_ready) {
        return true;
    }
    // RTLD_NOLOAD: only find it if libtorch_cuda already brought it in; never load it here.
    // The handle stays open: the library is never unloaded (libtorch_cuda needs it).
    void* lib = dlopen("libc10_cuda.so", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) {
        std::snprintf(error, error_len,
                      "libc10_cuda.so is not loaded (libtorch_cuda absent or not loaded "
                      "yet)");
        return false;
    }
    const char* names[] = {
        "_ZN3c104cuda20getCurrentCUDAStreamEa", "_ZN3c104cuda20getDefaultCUDAStreamEa",
        "_ZN3c104cuda17getStreamFromPoolEba", "_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE",
        "_ZNK3c104cuda10CUDAStream6streamEv"};
    void* found[5];
    for (int i = 0; i < 5; ++i) {
        found[i] = dlsym(lib, names[i]);
        if (found[i] == nullptr) {
            std::snprintf(error, error_len, "libc10_cuda.so lacks %s (another libtorch ABI?)",
                          names[i]);
            return false;
        }
    }
    stream_fns.get_current = reinterpret_cast<decltype(stream_fns.get_current)>(found[0]);
    stream_fns.get_default = reinterpret_cast<decltype(stream_fns.get_default)>(found[1]);
    stream_fns.get_from_pool = reinterpret_cast<decltype(stream_fns.get_from_pool)>(found[2]);
    stream_fns.set_current = reinterpret_cast<decltype(stream_fns.set_current)>(found[3]);
    stream_fns.raw = reinterpret_cast<decltype(stream_fns.raw)>(found[4]);
    stream_fns_ready = true;
    return true;
}

static bool stream_prelude(int device, char* error, size_t error_len) {
    if (device < -1 || device > INT8_MAX) {
        std::snprintf(error, error_len, "CUDA device index %d out of range", device);
        return false;
    }
    return resolve_stream_fns(error, error_len);
}

// at::cuda::getCurrentCUDAStream(device).stream(): the calling thread's current stream on
// CUDA device `device` (-1: the current device) as a cudaStream_t, into `*stream`. Returns 0,
// or -1 with the reason in `error` (no CUDA support loaded, no device, a bad index).
int gantry_current_cuda_stream(int device, void** stream, char* error, size_t error_len) {
    try {
        if (!stream_prelude(device, error, error_len)) {
            return -1;
        }
        const GantryCudaStream current = stream_fns.get_current(static_cast<int8_t>(device));
        *stream = stream_fns.raw(&current);
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return -1;
    }
}

// Makes a stream of libtorch's pool (`side != 0`) or device `device`'s default stream the
// calling thread's current stream (at::cuda::setCurrentCUDAStream), and writes its
// cudaStream_t into `*stream`. For checks that the NCCL path follows libtorch's current
// stream. Returns 0, or -1 with the reason in `error`.
int gantry_select_cuda_stream(int device, int side, void** stream, char* error,
                              size_t error_len) {
    try {
        if (!stream_prelude(device, error, error_len)) {
            return -1;
        }
        const auto index = static_cast<int8_t>(device);
        const GantryCudaStream chosen =
            side ? stream_fns.get_from_pool(false, index) : stream_fns.get_default(index);
        stream_fns.set_current(chosen);
        *stream = stream_fns.raw(&chosen);
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return -1;
    }
}

}  // extern "C"
