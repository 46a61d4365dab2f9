// max |x[i]| for the per-row quantizers, ordered by the values' magnitude bits rather than as floats.
// For non-negative floats the two orders agree, and the bits of NaN and infinity are above every
// finite value's, so a row holding either gives a non-finite maximum, whatever the order of the
// reads (a float max drops a NaN or keeps it depending on the operand order). The quantizers turn
// that into scale NaN: non-finite input, non-finite output, as in fp32.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

inline uint32_t magnitude_bits(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));  // __builtin: also in the freestanding emulator builds
  return bits & 0x7fffffffu;
}

inline float float_from_bits(uint32_t bits) {
  float v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

// The larger magnitude of two abs_max results (partial maxima of one row).
inline float max_magnitude(float a, float b) {
  const uint32_t x = magnitude_bits(a), y = magnitude_bits(b);
  return float_from_bits(x > y ? x : y);
}

inline float abs_max_scalar(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = magnitude_bits(x[i]);
    m = bits > m ? bits : m;
  }
  return float_from_bits(m);
}

// A row's quantization scale, amax / levels (127 or 32767), or NaN where amax is not finite. The
// quantizers write all-zero q for a scale that is not positive: 0 (an all-zero row) or NaN.
inline float row_scale(float amax, float levels) {
  return magnitude_bits(amax) < 0x7f800000u ? amax / levels : __builtin_nanf("");
}

}  // namespace pyengine::cpu
