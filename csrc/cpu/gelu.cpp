#include "pyengine/gelu.h"

#include <cmath>

#include "cpu/activations_isa.h"
#include "cpu/dispatch.h"
#include "cpu/elementwise.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void gelu_span_scalar(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float two_u = v * (kGeluLinear + kGeluCubic * v * v);
    out[i] = v / (1.0f + std::exp(-two_u));  // exp overflow -> inf -> -0 for very negative v
  }
}

}  // namespace cpu

void gelu(const float* x, float* out, int64_t n) {
  const auto span_fn = cpu::pick_kernel<decltype(&cpu::gelu_span_scalar)>(
      {{Isa::Avx2, cpu::gelu_span_avx2}, {Isa::Scalar, cpu::gelu_span_scalar}});
  cpu::parallel_chunks(n, [&](int64_t begin, int64_t count) { span_fn(x + begin, out + begin, count); });
}

}  // namespace pyengine
