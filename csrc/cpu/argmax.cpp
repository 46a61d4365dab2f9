#include "pyengine/argmax.h"

#include <cmath>

#include "cpu/argmax_isa.h"
#include "cpu/dispatch.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

int64_t argmax_row_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;  // NaN wins, as in numpy
    if (x[i] > x[best]) best = i;    // strictly greater: the first of equal maxima stays
  }
  return best;
}

}  // namespace cpu

void argmax_rows(const float* x, int64_t rows, int64_t cols, int64_t* out) {
  // One thread: a row is a vocab of logits (~50k floats, a few microseconds), far below what a
  // fork/join costs back.
  const auto row_fn = cpu::pick_kernel<decltype(&cpu::argmax_row_scalar)>(
      {{Isa::Avx2, cpu::argmax_row_avx2}, {Isa::Scalar, cpu::argmax_row_scalar}});
  for (int64_t r = 0; r < rows; ++r) out[r] = row_fn(x + r * cols, cols);
}

}  // namespace pyengine
