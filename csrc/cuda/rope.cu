// Rotary embedding in place: one thread per rotated pair.
#include "common.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
rope_kernel(T* x, const float* __restrict__ cos, const float* __restrict__ sin, const int32_t* __restrict__ positions,
            int64_t tokens, int64_t heads, int64_t head_dim, int64_t num_positions, bool interleaved) {
  const int64_t half = head_dim / 2;
  const int64_t pairs = tokens * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;            // frequency index
    const int64_t vec = idx / half;          // (token, head)
    const int64_t token = vec / heads;
    const int64_t position = positions[token];
    if (position < 0 || position >= num_positions) continue;  // documented: left unrotated
    const float c = cos[position * half + i], s = sin[position * half + i];
    T* head_vec = x + vec * head_dim;
    const int64_t ia = interleaved ? 2 * i : i;
    const int64_t ib = interleaved ? 2 * i + 1 : i + half;
    const float a = to_float(head_vec[ia]), b = to_float(head_vec[ib]);
    head_vec[ia] = from_float<T>(a * c - b * s);
    head_vec[ib] = from_float<T>(b * c + a * s);
  }
}

}  // namespace

void rope(void* x, const float* cos, const float* sin, const int32_t* positions, int64_t tokens, int64_t heads,
          int64_t head_dim, int64_t num_positions, bool interleaved, FloatType t, void* stream) {
  const int64_t pairs = tokens * heads * (head_dim / 2);
  if (pairs <= 0) return;
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rope_kernel<T><<<grid_1d(pairs, kThreads), kThreads, 0, as_stream(stream)>>>(
        static_cast<T*>(x), cos, sin, positions, tokens, heads, head_dim, num_positions, interleaved);
  });
  check_launch("rope_kernel");
}

}  // namespace pyengine::cuda
