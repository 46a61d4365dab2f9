// GPT-2's GELU, the tanh approximation (transformers' "gelu_new"):
//   gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
#pragma once
#include <cstdint>

namespace pyengine {

// x, out: n contiguous fp32 each; out may be exactly x.
void gelu(const float* x, float* out, int64_t n);

// GeGLU's elementwise half (Gemma): out[r * cols + i] = gelu(gate[r * gate_stride + i]) * up[r * up_stride + i],
// the same tanh GELU. Strided gate / up rows as silu_mul (the halves of a fused gate_up projection);
// out rows contiguous; out may be exactly gate or up.
void gelu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t rows,
              int64_t cols);

// Logit soft-capping (Gemma 2/3): out = cap * tanh(x / cap), n contiguous fp32; out may be exactly x; cap > 0.
void softcap(const float* x, float* out, int64_t n, float cap);

}  // namespace pyengine
