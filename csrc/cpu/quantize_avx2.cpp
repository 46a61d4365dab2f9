// AVX2 quantize_row: same arithmetic as the scalar reference (IEEE division, round half to even),
// so both give identical bytes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/avx2_math.h"
#include "cpu/int8_matmul_isa.h"

namespace pyengine::cpu {

void quantize_row_avx2(const float* x, int8_t* q, float* scale, int64_t cols) {
  const float s = row_scale(avx2::abs_max(x, cols), 127.0f);
  *scale = s;
  if (!(s > 0.0f)) {
    std::fill(q, q + cols, int8_t{0});
    return;
  }
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  // packs interleaves 128-bit lanes; this puts the 8 dwords (4 bytes each) back in order.
  const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto to_i32 = [&](const float* p) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
  };
  int64_t i = 0;
  for (; i + 32 <= cols; i += 32) {
    const __m256i p01 = _mm256_packs_epi32(to_i32(x + i), to_i32(x + i + 8));
    const __m256i p23 = _mm256_packs_epi32(to_i32(x + i + 16), to_i32(x + i + 24));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), unshuffle);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), bytes);
  }
  for (; i < cols; ++i) {
    const float r = std::nearbyint(x[i] / s);
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
}

}  // namespace pyengine::cpu
