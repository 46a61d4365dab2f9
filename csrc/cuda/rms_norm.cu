// RMSNorm and the fused residual add + RMSNorm: one block per row, fp32 sums.
#include "common.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* out, int64_t dim, float eps) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * dim;
  T* out_row = out + blockIdx.x * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    const float v = to_float(row[i]);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(dim) + eps);
  // out may be x: each element is read and then written by the same thread.
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    out_row[i] = from_float<T>(to_float(row[i]) * inv_rms * to_float(weight[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
add_rms_norm_kernel(T* residual, const T* __restrict__ delta, const T* __restrict__ weight, T* __restrict__ out,
                    int64_t dim, float eps) {
  __shared__ float scratch[32];
  T* res_row = residual + blockIdx.x * dim;
  const T* delta_row = delta + blockIdx.x * dim;
  T* out_row = out + blockIdx.x * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    // Normalize the residual as stored (rounded to T), which is what the next layer adds to.
    const T stored = from_float<T>(to_float(res_row[i]) + to_float(delta_row[i]));
    res_row[i] = stored;
    const float v = to_float(stored);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    out_row[i] = from_float<T>(to_float(res_row[i]) * inv_rms * to_float(weight[i]));
  }
}

}  // namespace

void rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim, float eps, FloatType t,
              void* stream) {
  if (rows <= 0 || dim <= 0) return;
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rms_norm_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(out), dim, eps);
  });
  check_launch("rms_norm_kernel");
}

void add_rms_norm(void* residual, const void* delta, const void* weight, void* out, int64_t rows, int64_t dim,
                  float eps, FloatType t, void* stream) {
  if (rows <= 0 || dim <= 0) return;
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    add_rms_norm_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(
        static_cast<T*>(residual), static_cast<const T*>(delta), static_cast<const T*>(weight), static_cast<T*>(out),
        dim, eps);
  });
  check_launch("add_rms_norm_kernel");
}

}  // namespace pyengine::cuda
