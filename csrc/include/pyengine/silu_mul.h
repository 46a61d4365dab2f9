// SwiGLU's elementwise half (Llama MLP): out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
#pragma once
#include <cstdint>

namespace pyengine {

// Over rows x cols: out[r * cols + i] = silu(gate[r * gate_stride + i]) * up[r * up_stride + i].
// gate and up rows may be strided (e.g. the two halves of a fused [rows, 2 * cols] gate_up projection:
// strides 2 * cols, no split copy); out rows are contiguous. out may be exactly gate or up (same
// start and layout: stride cols), not a shifted overlap of either.
void silu_mul(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride, float* out, int64_t rows,
              int64_t cols);

}  // namespace pyengine
