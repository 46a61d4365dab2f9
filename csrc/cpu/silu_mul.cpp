#include "pyengine/silu_mul.h"

#include <algorithm>
#include <cmath>

#include "cpu/activations_isa.h"
#include "cpu/dispatch.h"
#include "cpu/elementwise.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void silu_mul_span_scalar(const float* gate, const float* up, float* out, int64_t n) {
  // exp(-g) overflowing to inf for g < -88 gives g / inf = -0: the right limit.
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace cpu

void silu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t rows,
              int64_t cols) {
  const auto span_fn = cpu::pick_kernel<decltype(&cpu::silu_mul_span_scalar)>(
      {{Isa::Avx2, cpu::silu_mul_span_avx2}, {Isa::Scalar, cpu::silu_mul_span_scalar}});
  // Chunks of the contiguous output; a chunk may cross rows, so it runs as one span per row piece.
  cpu::parallel_chunks(rows * cols, [&](int64_t begin, int64_t count) {
    while (count > 0) {
      const int64_t r = begin / cols, i = begin % cols, n = std::min(count, cols - i);
      span_fn(gate + r * gate_stride + i, up + r * up_stride + i, out + begin, n);
      begin += n;
      count -= n;
    }
  });
}

}  // namespace pyengine
