// Vector maths for the AVX2 kernels. Include only from *_avx2.cpp (compiled with -mavx2 -mfma).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// max_i |x[i]| over n floats (0 for n = 0). Exact, so equal to a scalar loop in any order.
inline float abs_max(const float* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax0 = _mm256_setzero_ps(), vmax1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vmax0 = _mm256_max_ps(vmax0, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
    vmax1 = _mm256_max_ps(vmax1, _mm256_and_ps(_mm256_loadu_ps(x + i + 8), abs_mask));
  }
  float amax = hmax_ps(_mm256_max_ps(vmax0, vmax1));
  for (; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

// exp(x) for 8 floats, within ~2 ulp over the whole float range. Cody-Waite range reduction
// x = n*ln2 + r, |r| <= ln2/2, then a degree-7 polynomial for e^r (Cephes' expf coefficients),
// scaled by 2^n built directly in the exponent bits. Results above ~2.4e38 (x > 88.376) are +inf, below
// FLT_MIN are 0 (no denormals), NaN stays NaN: so x / (1 + exp(-z)) has the right limits.
inline __m256 exp_ps(__m256 x_in) {
  // Clamp so 2^n stays a normal float; the ends are patched below. min/max return their second
  // operand when either is NaN: keep x second so NaN survives.
  const __m256 overflow_at = _mm256_set1_ps(88.3762626647949f), underflow_at = _mm256_set1_ps(-87.3365447504f);
  __m256 x = _mm256_min_ps(overflow_at, x_in);
  x = _mm256_max_ps(underflow_at, x);
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
  __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x_in, overflow_at, _CMP_GT_OQ));
  return _mm256_andnot_ps(_mm256_cmp_ps(x_in, underflow_at, _CMP_LT_OQ), result);
}

// x / (1 + exp(-z)) = x * sigmoid(z). Written as a division, not 1 - ..., so it keeps full relative
// precision where the result is tiny (z very negative).
inline __m256 mul_sigmoid_ps(__m256 x, __m256 z) {
  const __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), z)));
  return _mm256_div_ps(x, denom);
}

// Lane mask for the first `count` (0..8) lanes, for maskload/maskstore of a row's tail.
inline __m256i tail_mask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

}  // namespace pyengine::cpu::avx2
