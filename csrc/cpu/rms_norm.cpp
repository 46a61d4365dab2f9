#include "pyengine/rms_norm.h"

#include <cmath>

#include "cpu/dispatch.h"
#include "cpu/rms_norm_isa.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void rms_norm_row_scalar(const float* x, const float* delta, float* sum_out, const float* weight,
                         float* out, int64_t dim, float eps) {
  double sum_sq = 0.0;  // double: the reference should not lose digits on long rows
  for (int64_t i = 0; i < dim; ++i) {
    float v = x[i];
    if (delta != nullptr) {
      v += delta[i];
      sum_out[i] = v;
    }
    sum_sq += static_cast<double>(v) * v;
  }
  const float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum_sq / dim) + eps);
  const float* src = delta != nullptr ? sum_out : x;
  for (int64_t i = 0; i < dim; ++i) out[i] = src[i] * inv_rms * weight[i];
}

}  // namespace cpu

namespace {
using RowFn = void (*)(const float*, const float*, float*, const float*, float*, int64_t, float);

RowFn pick_row_fn() {
  return cpu::pick_kernel<RowFn>({{Isa::Avx2, cpu::rms_norm_row_avx2}, {Isa::Scalar, cpu::rms_norm_row_scalar}});
}
}  // namespace

void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim, float eps) {
  const RowFn row_fn = pick_row_fn();
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (rows * dim >= 32768)
  for (int64_t r = 0; r < rows; ++r) row_fn(x + r * dim, nullptr, nullptr, weight, out + r * dim, dim, eps);
}

void add_rms_norm(float* residual, const float* delta, const float* weight, float* out, int64_t rows,
                  int64_t dim, float eps) {
  const RowFn row_fn = pick_row_fn();
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (rows * dim >= 32768)
  for (int64_t r = 0; r < rows; ++r) {
    float* res = residual + r * dim;
    row_fn(res, delta + r * dim, res, weight, out + r * dim, dim, eps);
  }
}

}  // namespace pyengine
