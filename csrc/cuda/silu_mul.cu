// out = silu(gate) * up, elementwise; fp32 maths.
#include "common.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
silu_mul_kernel(const T* gate, const T* up, T* out, int64_t n) {
  // No __restrict__: out may be gate or up (each element is read before it is written, by one thread).
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.0f + __expf(-g)) * to_float(up[i]));
  }
}

}  // namespace

void silu_mul(const void* gate, const void* up, void* out, int64_t n, FloatType t, void* stream) {
  if (n <= 0) return;
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_kernel<T><<<grid_1d(n, kThreads), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
  });
  check_launch("silu_mul_kernel");
}

}  // namespace pyengine::cuda
