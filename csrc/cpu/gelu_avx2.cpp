// AVX2/FMA gelu (tanh approximation). Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include "cpu/activations_isa.h"
#include "cpu/avx2_math.h"

namespace pyengine::cpu {

static inline __m256 gelu_ps(__m256 x) {
  const __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(kGeluCubic), _mm256_mul_ps(x, x), _mm256_set1_ps(kGeluLinear));
  return avx2::mul_sigmoid_ps(x, _mm256_mul_ps(x, poly));
}

void gelu_span_avx2(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, gelu_ps(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mask = avx2::tail_mask(n - i);
    _mm256_maskstore_ps(out + i, mask, gelu_ps(_mm256_maskload_ps(x + i, mask)));
  }
}

}  // namespace pyengine::cpu
