// The CUDA launchers (pyengine/cuda_ops.h) in a build without nvcc: the device-dispatching bindings
// still link, and a CUDA tensor is refused before any of these is reached (run_cuda, device_args.h).
#ifndef PYENGINE_WITH_CUDA
#include <stdexcept>

#include "pyengine/cuda_ops.h"

namespace pyengine::cuda {
namespace {
[[noreturn]] void not_built() { throw std::runtime_error("pyengine was built without CUDA kernels"); }
}  // namespace

int device_count() { return 0; }
DeviceGuard::DeviceGuard(int) { not_built(); }
DeviceGuard::~DeviceGuard() = default;
void rms_norm(const void*, const void*, void*, int64_t, int64_t, float, FloatType, void*) { not_built(); }
void add_rms_norm(void*, const void*, const void*, void*, int64_t, int64_t, float, FloatType, void*) { not_built(); }
void rope(void*, const float*, const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t, bool, FloatType,
          void*) {
  not_built();
}
void silu_mul(const void*, const void*, void*, int64_t, FloatType, void*) { not_built(); }
void attention(const void*, const void*, const void*, void*, const int32_t*, const int32_t*, const AttentionShape&,
               float, FloatType, void*) {
  not_built();
}
void int8_linear_wo(const void*, const int8_t*, const float*, const void*, void*, int64_t, int64_t, int64_t,
                    FloatType, void*) {
  not_built();
}
void int8_matmul_i32(const int8_t*, const int8_t*, int32_t*, int64_t, int64_t, int64_t, void*) { not_built(); }
void quantize_rows(const void*, int8_t*, float*, int64_t, int64_t, FloatType, void*) { not_built(); }

}  // namespace pyengine::cuda
#endif
