// Symmetric per-row int8 quantization (weights per output channel at load time, activations per
// token at run time).
#pragma once
#include <cstdint>

namespace pyengine {

// x: [rows, cols] fp32 contiguous -> q: [rows, cols] int8, scale: [rows] fp32, per row:
//   scale = max|x_row| / 127,  q = clamp(round_half_even(x / scale), -127, 127).
// An all-zero row gets scale 0 and q 0, so dequantization (q * scale) gives 0 back. A row holding a
// NaN or an infinity gets scale NaN and q 0: what is computed from it is NaN, as it would be in fp32,
// never a finite number made of garbage.
void quantize_rows(const float* x, int8_t* q, float* scale, int64_t rows, int64_t cols);

}  // namespace pyengine
