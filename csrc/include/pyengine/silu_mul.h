// SwiGLU's elementwise half (Llama MLP): out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
#pragma once
#include <cstdint>

namespace pyengine {

// gate, up, out: n contiguous fp32 each. out may be exactly gate or up (same start), not a
// shifted overlap of either.
void silu_mul(const float* gate, const float* up, float* out, int64_t n);

}  // namespace pyengine
