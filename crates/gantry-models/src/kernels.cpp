// ATen operators that tch's C API does not expose with the arguments Gantry needs.
//
// Each function takes borrowed at::Tensor pointers (tch's C_tensor) and returns a new
// heap-allocated at::Tensor that the Rust side owns (tch::Tensor::from_ptr), or nullptr with
// the exception's message in `error`. Calls go through the dispatcher, so autograd records
// them exactly as it would from Python.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstdio>
#include <exception>

extern "C" {

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

}  // extern "C"
