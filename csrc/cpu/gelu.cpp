#include "pyengine/gelu.h"

#include <algorithm>
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

namespace pyengine {

void gelu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t rows,
              int64_t cols) {
  const auto span_fn = cpu::pick_kernel<decltype(&cpu::gelu_span_scalar)>(
      {{Isa::Avx2, cpu::gelu_span_avx2}, {Isa::Scalar, cpu::gelu_span_scalar}});
  // As silu_mul: chunks of the contiguous output, one span per row piece; gelu(gate) lands in out,
  // then the product with up in the same pass over that piece (out may be gate or up, read first).
  cpu::parallel_chunks(rows * cols, [&](int64_t begin, int64_t count) {
    while (count > 0) {
      const int64_t r = begin / cols, i = begin % cols, n = std::min(count, cols - i);
      const float* u = up + r * up_stride + i;
      float* o = out + begin;
      if (o == u) {  // in place over up: keep up's values until they are multiplied
        for (int64_t j = 0; j < n; ++j) {
          float g;
          span_fn(gate + r * gate_stride + i + j, &g, 1);
          o[j] = g * u[j];
        }
      } else {
        span_fn(gate + r * gate_stride + i, o, n);
        for (int64_t j = 0; j < n; ++j) o[j] *= u[j];
      }
      begin += n;
      count -= n;
    }
  });
}

void softcap(const float* x, float* out, int64_t n, float cap) {
  cpu::parallel_chunks(n, [&](int64_t begin, int64_t count) {
    for (int64_t i = begin; i < begin + count; ++i) out[i] = cap * std::tanh(x[i] / cap);
  });
}

}  // namespace pyengine
