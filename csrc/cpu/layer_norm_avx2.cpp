// AVX2/FMA layer_norm row. Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include <cmath>

#include "cpu/avx2_math.h"
#include "cpu/layer_norm_isa.h"

namespace pyengine::cpu {

void layer_norm_row_avx2(const float* x, const float* delta, float* sum_out, const float* weight,
                         const float* bias, float* out, int64_t dim, float eps) {
  // Pass 1: (residual add and) a first estimate of the mean. Masked tails keep every element on the vector path; masked-off
  // lanes load as 0 and add nothing.
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    if (delta != nullptr) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(delta + i));
      b = _mm256_add_ps(b, _mm256_loadu_ps(delta + i + 8));
      _mm256_storeu_ps(sum_out + i, a);
      _mm256_storeu_ps(sum_out + i + 8, b);
    }
    acc0 = _mm256_add_ps(acc0, a);
    acc1 = _mm256_add_ps(acc1, b);
  }
  for (; i < dim; i += 8) {
    const __m256i mask = avx2::tail_mask(dim - i);
    __m256 a = _mm256_maskload_ps(x + i, mask);
    if (delta != nullptr) {
      a = _mm256_add_ps(a, _mm256_maskload_ps(delta + i, mask));
      _mm256_maskstore_ps(sum_out + i, mask, a);
    }
    acc0 = _mm256_add_ps(acc0, a);
  }
  const float* src = delta != nullptr ? sum_out : x;
  const float rough_mean = avx2::hsum_ps(_mm256_add_ps(acc0, acc1)) / static_cast<float>(dim);

  // Pass 2: deviations d from that mean, summing d^2 and d. The float sum in pass 1 is off by
  // O(eps * |mean|); sum(d) / dim measures that error, which then corrects both the mean and the
  // variance (the "corrected two-pass" algorithm). Matters when the mean dwarfs the spread.
  const __m256 rough = _mm256_set1_ps(rough_mean);
  __m256 sq0 = _mm256_setzero_ps(), sq1 = _mm256_setzero_ps();
  acc0 = _mm256_setzero_ps();
  acc1 = _mm256_setzero_ps();
  for (i = 0; i + 16 <= dim; i += 16) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(src + i), rough);
    const __m256 b = _mm256_sub_ps(_mm256_loadu_ps(src + i + 8), rough);
    acc0 = _mm256_add_ps(acc0, a);
    acc1 = _mm256_add_ps(acc1, b);
    sq0 = _mm256_fmadd_ps(a, a, sq0);
    sq1 = _mm256_fmadd_ps(b, b, sq1);
  }
  for (; i < dim; i += 8) {
    const __m256i mask = avx2::tail_mask(dim - i);
    // Zero the masked-off lanes after subtracting, or they would add -mean and mean^2 each.
    const __m256 a = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(src + i, mask), rough), _mm256_castsi256_ps(mask));
    acc0 = _mm256_add_ps(acc0, a);
    sq0 = _mm256_fmadd_ps(a, a, sq0);
  }
  const float mean_error = avx2::hsum_ps(_mm256_add_ps(acc0, acc1)) / static_cast<float>(dim);
  const float var = avx2::hsum_ps(_mm256_add_ps(sq0, sq1)) / static_cast<float>(dim) - mean_error * mean_error;
  const __m256 mean = _mm256_set1_ps(rough_mean + mean_error);
  const __m256 inv_std = _mm256_set1_ps(1.0f / std::sqrt(std::fmax(var, 0.0f) + eps));

  // Pass 3: normalize, scale, shift.
  const auto normalize = [&](__m256 v, __m256 w, __m256 b) {
    return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(v, mean), inv_std), w, b);
  };
  const __m256 zero = _mm256_setzero_ps();
  for (i = 0; i + 8 <= dim; i += 8) {
    const __m256 b = bias != nullptr ? _mm256_loadu_ps(bias + i) : zero;
    _mm256_storeu_ps(out + i, normalize(_mm256_loadu_ps(src + i), _mm256_loadu_ps(weight + i), b));
  }
  if (i < dim) {
    const __m256i mask = avx2::tail_mask(dim - i);
    const __m256 b = bias != nullptr ? _mm256_maskload_ps(bias + i, mask) : zero;
    _mm256_maskstore_ps(out + i, mask,
                        normalize(_mm256_maskload_ps(src + i, mask), _mm256_maskload_ps(weight + i, mask), b));
  }
}

}  // namespace pyengine::cpu
