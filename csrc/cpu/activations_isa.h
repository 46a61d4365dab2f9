// Per-ISA implementations of silu_mul.h and gelu.h over a flat span; dispatch lives in
// silu_mul.cpp / gelu.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

void silu_mul_span_scalar(const float* gate, const float* up, float* out, int64_t n);
void silu_mul_span_avx2(const float* gate, const float* up, float* out, int64_t n);

void gelu_span_scalar(const float* x, float* out, int64_t n);
void gelu_span_avx2(const float* x, float* out, int64_t n);

// gelu(x) = 0.5x(1 + tanh(u)) = x * sigmoid(2u), and 2u = x * (kGeluLinear + kGeluCubic * x^2).
// The sigmoid form avoids 1 + tanh(u) cancelling to 0 for negative x.
constexpr float kGeluLinear = 1.5957691216057308f;                // 2 * sqrt(2 / pi)
constexpr float kGeluCubic = 1.5957691216057308f * 0.044715f;      // 2 * sqrt(2 / pi) * 0.044715

}  // namespace pyengine::cpu
