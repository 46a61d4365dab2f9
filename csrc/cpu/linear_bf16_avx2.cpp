// AVX2 bf16 GEMV: each weight widened to fp32 in registers (a bf16 is the top half of an fp32).
#include <immintrin.h>

#include <algorithm>

#include "cpu/linear_bf16_isa.h"

namespace pyengine::cpu {
namespace {

inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R weight rows (1 or 2, streamed side by side) against M activation rows, with U independent
// accumulators per (row, activation row) so that consecutive FMAs do not wait on each other.
template <int R, int M, int U>
void rows_kernel(const float* x, int64_t K, const uint16_t* w, const float* bias, float* out, int64_t N,
                 const int64_t (&rows)[R]) {
  __m256 acc[R][M][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = widen8(w + rows[r] * K + k + 8 * u);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k + 8 * u);
        for (int r = 0; r < R; ++r) acc[r][m][u] = _mm256_fmadd_ps(xv, wv[r], acc[r][m][u]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* row = w + rows[r] * K;
    for (int m = 0; m < M; ++m) {
      __m256 total = acc[r][m][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[r][m][u]);
      float sum = hsum(total);
      for (int64_t j = k; j < K; ++j) sum += x[m * K + j] * bf16_to_float(row[j]);
      out[m * N + rows[r]] = sum + (bias == nullptr ? 0.0f : bias[rows[r]]);
    }
  }
}

template <int M>
void rows_m(const float* x, int64_t K, const uint16_t* w, const float* bias, float* out, int64_t N,
            const int64_t (&rows)[2], int live) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;  // 6 to 8 accumulators in flight, of 16 registers
  if (live == 2) {
    rows_kernel<2, M, U>(x, K, w, bias, out, N, rows);
  } else {
    rows_kernel<1, M, U>(x, K, w, bias, out, N, {rows[0]});
  }
}

}  // namespace

void bf16_gemv_avx2(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                    int64_t N, int64_t n0, int64_t n1) {
  // Two streams, rows [n0, mid) and [mid, n1), one row of each at a time: two sequential reads far
  // apart keep the prefetchers busy; two neighbouring rows side by side read far slower.
  // Every group of up to 4 activation rows uses the two weight rows while they are in L1, so up to
  // 16 activation rows still read the weights from memory once.
  const int64_t mid = n0 + (n1 - n0 + 1) / 2;
  for (int64_t i = 0; n0 + i < mid; ++i) {
    const int64_t rows[2] = {n0 + i, mid + i};
    const int live = mid + i < n1 ? 2 : 1;
    for (int64_t m = 0; m < M; m += 4) {
      const float* xm = x + m * K;
      float* om = out + m * N;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: rows_m<1>(xm, K, w, bias, om, N, rows, live); break;
        case 2: rows_m<2>(xm, K, w, bias, om, N, rows, live); break;
        case 3: rows_m<3>(xm, K, w, bias, om, N, rows, live); break;
        default: rows_m<4>(xm, K, w, bias, om, N, rows, live); break;
      }
    }
  }
}

}  // namespace pyengine::cpu
