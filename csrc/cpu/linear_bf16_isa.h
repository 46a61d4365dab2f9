// Per-ISA rows of the bf16-weight GEMV (linear_bf16.cpp does the threading and the prefill path).
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// out[m * N + n] = sum_k x[m * K + k] * float(w[n * K + k]) (+ bias[n]) for m < M (1..16), n0 <= n < n1.
using Bf16GemvFn = void (*)(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                            int64_t N, int64_t n0, int64_t n1);
void bf16_gemv_scalar(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                      int64_t N, int64_t n0, int64_t n1);
// Widens the weights to fp32 in registers, FMA with the fp32 activations.
void bf16_gemv_avx2(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                    int64_t N, int64_t n0, int64_t n1);
// A bf16 pattern's exact fp32 value.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace pyengine::cpu
