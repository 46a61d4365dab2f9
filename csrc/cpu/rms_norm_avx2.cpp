// AVX2/FMA rms_norm row. Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include <cmath>

#include "cpu/avx2_math.h"
#include "cpu/rms_norm_isa.h"

namespace pyengine::cpu {

void rms_norm_row_avx2(const float* x, const float* delta, float* sum_out, const float* weight,
                       float* out, int64_t dim, float eps) {
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
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(b, b, acc1);
  }
  float sum_sq = avx2::hsum_ps(_mm256_add_ps(acc0, acc1));
  for (; i < dim; ++i) {
    float v = x[i];
    if (delta != nullptr) {
      v += delta[i];
      sum_out[i] = v;
    }
    sum_sq += v * v;
  }
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
  const float* src = delta != nullptr ? sum_out : x;
  const __m256 scale = _mm256_set1_ps(inv_rms);
  i = 0;
  for (; i + 8 <= dim; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + i), scale);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(weight + i)));
  }
  for (; i < dim; ++i) out[i] = src[i] * inv_rms * weight[i];
}

}  // namespace pyengine::cpu
