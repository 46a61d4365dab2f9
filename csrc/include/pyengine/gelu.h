// GPT-2's GELU, the tanh approximation (transformers' "gelu_new"):
//   gelu(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
#pragma once
#include <cstdint>

namespace pyengine {

// x, out: n contiguous fp32 each; out may be exactly x.
void gelu(const float* x, float* out, int64_t n);

}  // namespace pyengine
