// LayerNorm (GPT-2 family) over the last dimension:
//   out[r] = (x[r] - mean(x[r])) / sqrt(var(x[r]) + eps) * weight + bias   (biased variance)
#pragma once
#include <cstdint>

namespace pyengine {

// x, out: [rows, dim] contiguous fp32 (out may be exactly x); weight: [dim]; bias: [dim] or null.
void layer_norm(const float* x, const float* weight, const float* bias, float* out, int64_t rows,
                int64_t dim, float eps);

// The pre-norm residual step fused: residual += delta, then out = layer_norm(residual).
// residual (in/out), delta, out: [rows, dim] contiguous fp32; out must not alias residual.
void add_layer_norm(float* residual, const float* delta, const float* weight, const float* bias,
                    float* out, int64_t rows, int64_t dim, float eps);

}  // namespace pyengine
