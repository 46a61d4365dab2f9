#include "pyengine/silu_mul.h"

#include <cmath>

#include "cpu/activations_isa.h"
#include "cpu/elementwise.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void silu_mul_span_scalar(const float* gate, const float* up, float* out, int64_t n) {
  // exp(-g) overflowing to inf for g < -88 gives g / inf = -0: the right limit.
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace cpu

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const auto span_fn = active_isa() >= Isa::Avx2 ? cpu::silu_mul_span_avx2 : cpu::silu_mul_span_scalar;
  cpu::parallel_chunks(n, [&](int64_t begin, int64_t count) {
    span_fn(gate + begin, up + begin, out + begin, count);
  });
}

}  // namespace pyengine
