// AVX2/FMA silu_mul. Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include "cpu/activations_isa.h"
#include "cpu/avx2_math.h"

namespace pyengine::cpu {

void silu_mul_span_avx2(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(avx2::mul_sigmoid_ps(g, g), _mm256_loadu_ps(up + i)));
  }
  if (i < n) {  // masked tail: every element takes the same code path, whatever n is
    const __m256i mask = avx2::tail_mask(n - i);
    const __m256 g = _mm256_maskload_ps(gate + i, mask);
    const __m256 u = _mm256_maskload_ps(up + i, mask);
    _mm256_maskstore_ps(out + i, mask, _mm256_mul_ps(avx2::mul_sigmoid_ps(g, g), u));
  }
}

}  // namespace pyengine::cpu
