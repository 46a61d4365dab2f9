// AVX2 argmax_row: the row's maximum in one vector pass (noting any NaN), then the first index
// holding it in a second pass. Equal to argmax_row_scalar for every input.
#include <immintrin.h>

#include <cmath>

#include "cpu/argmax_isa.h"
#include "cpu/avx2_math.h"

namespace pyengine::cpu {

int64_t argmax_row_avx2(const float* x, int64_t n) {
  int64_t i = 0;
  float best = x[0];
  bool nan = false;
  if (n >= 8) {
    __m256 vmax = _mm256_loadu_ps(x), unordered = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, v);
    }
    nan = _mm256_movemask_ps(unordered) != 0;
    best = avx2::hmax_ps(vmax);
  }
  for (int64_t t = i; t < n; ++t) {
    nan = nan || std::isnan(x[t]);
    if (x[t] > best) best = x[t];
  }
  if (nan) return argmax_row_scalar(x, n);  // rare: the scalar rule (first NaN) decides
  const __m256 target = _mm256_set1_ps(best);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
    if (mask != 0) return j + __builtin_ctz(mask);
  }
  for (; j < n; ++j) {
    if (x[j] == best) return j;
  }
  return 0;  // not reached: best is one of the row's values
}

}  // namespace pyengine::cpu
