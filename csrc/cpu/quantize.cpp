#include "pyengine/quantize.h"

#include <algorithm>
#include <cmath>

#include "cpu/abs_max.h"
#include "cpu/dispatch.h"
#include "cpu/int8_matmul_isa.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

// The reference every ISA must match bit for bit: a true division (not a multiply by 127 / amax)
// so the result equals torch's round(x / scale).
void quantize_row_scalar(const float* x, int8_t* q, float* scale, int64_t cols) {
  const float s = row_scale(abs_max_scalar(x, cols), 127.0f);
  *scale = s;
  if (!(s > 0.0f)) {  // all-zero row (or amax / 127 underflows), or NaN / inf in it
    std::fill(q, q + cols, int8_t{0});
    return;
  }
  for (int64_t i = 0; i < cols; ++i) {
    const float r = std::nearbyint(x[i] / s);  // default rounding mode: half to even
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
}

}  // namespace cpu

void quantize_rows(const float* x, int8_t* q, float* scale, int64_t rows, int64_t cols) {
  const auto row_fn = cpu::pick_kernel<decltype(&cpu::quantize_row_scalar)>(
      {{Isa::Avx2, cpu::quantize_row_avx2}, {Isa::Scalar, cpu::quantize_row_scalar}});
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (rows * cols >= 65536)
  for (int64_t r = 0; r < rows; ++r) row_fn(x + r * cols, q + r * cols, scale + r, cols);
}

}  // namespace pyengine
