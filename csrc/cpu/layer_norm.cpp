#include "pyengine/layer_norm.h"

#include <cmath>

#include "cpu/dispatch.h"
#include "cpu/layer_norm_isa.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void layer_norm_row_scalar(const float* x, const float* delta, float* sum_out, const float* weight,
                           const float* bias, float* out, int64_t dim, float eps) {
  const float* src = x;
  if (delta != nullptr) {
    for (int64_t i = 0; i < dim; ++i) sum_out[i] = x[i] + delta[i];
    src = sum_out;
  }
  // Two passes in double: the mean first, then squared deviations from it. One-pass E[x^2] - E[x]^2
  // cancels badly when the mean is large next to the spread.
  double sum = 0.0;
  for (int64_t i = 0; i < dim; ++i) sum += src[i];
  const double mean = sum / dim;
  double sum_sq_dev = 0.0;
  for (int64_t i = 0; i < dim; ++i) sum_sq_dev += (src[i] - mean) * (src[i] - mean);
  const float inv_std = static_cast<float>(1.0 / std::sqrt(sum_sq_dev / dim + eps));
  const float mean_f = static_cast<float>(mean);
  for (int64_t i = 0; i < dim; ++i) {
    const float v = (src[i] - mean_f) * inv_std * weight[i];
    out[i] = bias != nullptr ? v + bias[i] : v;
  }
}

}  // namespace cpu

namespace {
using RowFn = void (*)(const float*, const float*, float*, const float*, const float*, float*, int64_t, float);

RowFn pick_row_fn() {
  return cpu::pick_kernel<RowFn>({{Isa::Avx2, cpu::layer_norm_row_avx2}, {Isa::Scalar, cpu::layer_norm_row_scalar}});
}
}  // namespace

void layer_norm(const float* x, const float* weight, const float* bias, float* out, int64_t rows,
                int64_t dim, float eps) {
  const RowFn row_fn = pick_row_fn();
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (rows * dim >= 32768)
  for (int64_t r = 0; r < rows; ++r) row_fn(x + r * dim, nullptr, nullptr, weight, bias, out + r * dim, dim, eps);
}

void add_layer_norm(float* residual, const float* delta, const float* weight, const float* bias,
                    float* out, int64_t rows, int64_t dim, float eps) {
  const RowFn row_fn = pick_row_fn();
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (rows * dim >= 32768)
  for (int64_t r = 0; r < rows; ++r) {
    float* res = residual + r * dim;
    row_fn(res, delta + r * dim, res, weight, bias, out + r * dim, dim, eps);
  }
}

}  // namespace pyengine
