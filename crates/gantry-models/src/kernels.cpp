// ATen operators that tch's C API does not expose with the arguments Gantry needs.
//
// Each function takes borrowed at::Tensor pointers (tch's C_tensor) and returns a new
// heap-allocated at::Tensor that the Rust side owns (tch::Tensor::from_ptr), or nullptr with
// the exception's message in `error`. Calls go through the dispatcher, so autograd records
// them exactly as it would from Python.
#include <ATen/ATen.h>

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

}  // extern "C"
