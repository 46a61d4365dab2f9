// Vector maths for the AVX2 kernels. Include only from *_avx2.cpp (compiled with -mavx2 -mfma).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/abs_max.h"

namespace pyengine::cpu::avx2 {

// Horizontal sum and max of 8 floats.
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// max_i |x[i]| over n floats (0 for n = 0), ordered by magnitude bits as abs_max_scalar (abs_max.h):
// a NaN or an infinity anywhere gives a non-finite result. Equal to abs_max_scalar bit for bit.
inline float abs_max(const float* x, int64_t n) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i vmax0 = _mm256_setzero_si256(), vmax1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vmax0 = _mm256_max_epi32(vmax0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), magnitude));
    vmax1 = _mm256_max_epi32(vmax1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8)), magnitude));
  }
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(_mm256_max_epi32(vmax0, vmax1)),
                            _mm256_extracti128_si256(_mm256_max_epi32(vmax0, vmax1), 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  const float head = _mm_cvtss_f32(_mm_castsi128_ps(m));
  return max_magnitude(head, abs_max_scalar(x + i, n - i));
}

// e^x = 2^n * e^r with x = n ln2 + r, for x inside [kExpUnderflow, kExpOverflow] (2^n stays a
// normal float); the callers clamp and patch the ends.
constexpr float kExpOverflow = 88.3762626647949f, kExpUnderflow = -87.3365447504f;
inline __m256 exp_in_range(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in a part exact in float and the remainder, so n*ln2_hi is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

// exp(x) for 8 floats, within ~2 ulp over the whole float range: Cody-Waite range reduction
// x = n*ln2 + r, |r| <= ln2/2, then a degree-7 polynomial for e^r (Cephes' expf coefficients),
// scaled by 2^n built directly in the exponent bits (exp_in_range). Results above ~2.4e38 (x > 88.376)
// are +inf, below FLT_MIN are 0 (no denormals), NaN stays NaN: so x / (1 + exp(-z)) has the right limits.
inline __m256 exp_ps(__m256 x_in) {
  const __m256 overflow_at = _mm256_set1_ps(kExpOverflow), underflow_at = _mm256_set1_ps(kExpUnderflow);
  // min/max return their second operand when either is NaN: keep x second so NaN survives.
  const __m256 x = _mm256_max_ps(underflow_at, _mm256_min_ps(overflow_at, x_in));
  __m256 result = exp_in_range(x);
  result = _mm256_blendv_ps(result, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x_in, overflow_at, _CMP_GT_OQ));
  return _mm256_andnot_ps(_mm256_cmp_ps(x_in, underflow_at, _CMP_LT_OQ), result);
}

// exp for x <= 0 or -inf only (softmax: scores minus their max): no overflow patch.
inline __m256 exp_nonpositive_ps(__m256 x_in) {
  const __m256 underflow_at = _mm256_set1_ps(kExpUnderflow);
  const __m256 result = exp_in_range(_mm256_max_ps(underflow_at, x_in));
  return _mm256_andnot_ps(_mm256_cmp_ps(x_in, underflow_at, _CMP_LT_OQ), result);
}

// x / (1 + exp(-z)) = x * sigmoid(z). Written as a division, not 1 - ..., so it keeps full relative
// precision where the result is tiny (z very negative).
inline __m256 mul_sigmoid_ps(__m256 x, __m256 z) {
  const __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), z)));
  return _mm256_div_ps(x, denom);
}

// In place: r[i] = row i of an 8 x 8 block  ->  r[j] = column j (the 8 rows' element j).
inline void transpose8x8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  // Per 128-bit lane: s0 = elements 0 and 4 of rows 0-3, s1 = 1 and 5, s2 = 2 and 6, s3 = 3 and 7.
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Lane mask for the first `count` (0..8) lanes, for maskload/maskstore of a row's tail.
inline __m256i tail_mask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

}  // namespace pyengine::cpu::avx2
