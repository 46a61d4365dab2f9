// AVX2/FMA rope. Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include <cmath>

#include "cpu/avx2_math.h"
#include "cpu/rope_isa.h"

namespace pyengine::cpu {

// Half-split layout: 8 pairs at a time, first halves and second halves as separate vectors.
static void rope_head_half_split(float* head, const float* cos_row, const float* sin_row, int64_t half) {
  float* first = head;
  float* second = head + half;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(first + i), b = _mm256_loadu_ps(second + i);
    const __m256 c = _mm256_loadu_ps(cos_row + i), s = _mm256_loadu_ps(sin_row + i);
    _mm256_storeu_ps(first + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(second + i, _mm256_fmadd_ps(b, c, _mm256_mul_ps(a, s)));
  }
  if (i < half) {  // masked tail: same arithmetic for every pair
    const __m256i mask = avx2::tail_mask(half - i);
    const __m256 a = _mm256_maskload_ps(first + i, mask), b = _mm256_maskload_ps(second + i, mask);
    const __m256 c = _mm256_maskload_ps(cos_row + i, mask), s = _mm256_maskload_ps(sin_row + i, mask);
    _mm256_maskstore_ps(first + i, mask, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
    _mm256_maskstore_ps(second + i, mask, _mm256_fmadd_ps(b, c, _mm256_mul_ps(a, s)));
  }
}

// Interleaved layout: 4 pairs (8 floats) at a time. With each cos/sin value duplicated across its
// pair and the pair swapped, fmaddsub gives a*c - b*s in even lanes and b*c + a*s in odd lanes.
static void rope_head_interleaved(float* head, const float* cos_row, const float* sin_row, int64_t half) {
  int64_t i = 0;
  for (; i + 4 <= half; i += 4) {
    const __m128 c4 = _mm_loadu_ps(cos_row + i), s4 = _mm_loadu_ps(sin_row + i);
    const __m256 c = _mm256_set_m128(_mm_unpackhi_ps(c4, c4), _mm_unpacklo_ps(c4, c4));
    const __m256 s = _mm256_set_m128(_mm_unpackhi_ps(s4, s4), _mm_unpacklo_ps(s4, s4));
    const __m256 v = _mm256_loadu_ps(head + 2 * i);
    const __m256 swapped = _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
    _mm256_storeu_ps(head + 2 * i, _mm256_fmaddsub_ps(v, c, _mm256_mul_ps(swapped, s)));
  }
  for (; i < half; ++i) {  // at most 3 pairs; fma matches the vector lanes' rounding
    const float a = head[2 * i], b = head[2 * i + 1];
    head[2 * i] = std::fma(a, cos_row[i], -(b * sin_row[i]));
    head[2 * i + 1] = std::fma(b, cos_row[i], a * sin_row[i]);
  }
}

void rope_token_avx2(float* x, const float* cos_row, const float* sin_row, int64_t heads,
                     int64_t head_dim, bool interleaved) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    if (interleaved) {
      rope_head_interleaved(x + h * head_dim, cos_row, sin_row, half);
    } else {
      rope_head_half_split(x + h * head_dim, cos_row, sin_row, half);
    }
  }
}

}  // namespace pyengine::cpu
