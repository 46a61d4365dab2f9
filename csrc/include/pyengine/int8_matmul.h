// int8 matrix products for Linear layers (torch layout: weight [N, K], row-major). All tensors
// contiguous; outputs must not alias inputs.
#pragma once
#include <cstdint>

namespace pyengine {

// out_i32[m, n] = sum_k a[m, k] * b[n, k], exact int32 (wraps mod 2^32 like an int32 reference).
// a: [M, K], b: [N, K] int8 with values in [-127, 127] (-128 is not allowed: the AVX2 kernel's
// |a| trick needs it). out_i32: [M, N].
void int8_matmul_i32(const int8_t* a, const int8_t* b, int32_t* out_i32, int64_t M, int64_t N, int64_t K);

// W8A8 Linear with dynamic per-token activation quantization:
//   xq, x_scale = quantize_rows(x)
//   out[m, n] = float(sum_k xq[m, k] * w_q[n, k]) * (x_scale[m] * w_scale[n]) + bias[n]
// x: [M, K] fp32, w_q: [N, K] int8 in [-127, 127], w_scale: [N], bias: [N] or null, out: [M, N].
void int8_linear_w8a8(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                 int64_t M, int64_t N, int64_t K);

// Weight-only int8 Linear: out[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W = float(w_q) * w_scale[n]
// (fp32 accumulation). Up to 16 rows the weight is dequantized in registers (GEMV); above, one panel
// of 16 weight rows at a time is dequantized to fp32 and multiplied by a packed-panel GEMM (prefill),
// the same GEMM as linear_f32's.
void int8_linear_wo(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                    int64_t M, int64_t N, int64_t K);

// W8A16 Linear, the one the fused-int8 engine uses: each x row is quantized to int16,
//   x_scale[m] = max_k |x[m, k]| / 32767,  xq[m, k] = clamp(round_half_even(x[m, k] / x_scale[m]), +-32767)
// (an all-zero row gets scale 0 and zeros; a row holding a NaN or an infinity gets scale NaN and
// zeros, so its outputs are NaN, as in fp32), then
//   out[m, n] = float(sum_k xq[m, k] * w_q[n, k]) * (x_scale[m] * w_scale[n]) + bias[n].
// The integer dot product is exact, converted to fp32 once: bitwise equal to an int64 reference, so
// an output row does not depend on which other rows share the call (prefill and decode agree).
// Up to 16 rows a GEMV streams the int8 weights once (decode); above, the packed-panel GEMM on int16
// pairs (prefill), faster than the fp32 FMA GEMM. With 16-bit activations it stays far
// closer to fp32 than W8A8. Shapes as int8_linear_w8a8.
void int8_linear_a16(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                     int64_t M, int64_t N, int64_t K);

}  // namespace pyengine
