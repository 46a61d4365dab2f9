// RMSNorm (Llama family): out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight.
#pragma once
#include <cstdint>

namespace pyengine {

// x, out: [rows, dim] contiguous fp32 (out may alias x); weight: [dim].
void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim, float eps);

// The pre-norm residual step fused: residual += delta, then out = rms_norm(residual).
// residual (in/out), delta, out: [rows, dim] contiguous fp32; out must not alias residual.
void add_rms_norm(float* residual, const float* delta, const float* weight, float* out,
                  int64_t rows, int64_t dim, float eps);

}  // namespace pyengine
