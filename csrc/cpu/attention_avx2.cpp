// AVX2/FMA key-block step of attention. Compiled with -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/attention_isa.h"
#include "cpu/avx2_math.h"

namespace pyengine::cpu {
namespace {

// Horizontal sums of eight vectors at once: lane i of the result is the sum of a[i].
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // u0 = [a0 a1 a2 a3 (low halves) | a0 a1 a2 a3 (high halves)], likewise u1 for a4..a7.
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float s = avx2::hsum_ps(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Scores of ROWS query rows against 8 / ROWS keys at a time (8 accumulators reduced together by
// hsum8), for keys [0, n_keys) of the block. Lane order of the reduced vector: row-major.
template <int ROWS>
void scores_tile(const float* const* q, const float* k0, int64_t n_keys, int64_t D, float scale,
                 float* const* s) {
  constexpr int KEYS = 8 / ROWS;
  const int64_t d_vec = D & ~int64_t{7};
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + KEYS <= n_keys; j += KEYS) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    const float* k = k0 + j * D;
    for (int64_t d = 0; d < d_vec; d += 8) {
      __m256 qv[ROWS];
      for (int r = 0; r < ROWS; ++r) qv[r] = _mm256_loadu_ps(q[r] + d);
      for (int kk = 0; kk < KEYS; ++kk) {
        const __m256 kv = _mm256_loadu_ps(k + kk * D + d);
        for (int r = 0; r < ROWS; ++r) acc[r * KEYS + kk] = _mm256_fmadd_ps(qv[r], kv, acc[r * KEYS + kk]);
      }
    }
    __m256 sums = hsum8(acc);
    if (d_vec < D) {  // head_dim not a multiple of 8: the remainder, scalar
      alignas(32) float tail[8];
      for (int r = 0; r < ROWS; ++r)
        for (int kk = 0; kk < KEYS; ++kk) {
          float t = 0.0f;
          for (int64_t d = d_vec; d < D; ++d) t += q[r][d] * k[kk * D + d];
          tail[r * KEYS + kk] = t;
        }
      sums = _mm256_add_ps(sums, _mm256_load_ps(tail));
    }
    sums = _mm256_mul_ps(sums, vscale);
    if (ROWS == 1) {
      _mm256_storeu_ps(s[0] + j, sums);
    } else {
      _mm_storeu_ps(s[0] + j, _mm256_castps256_ps128(sums));
      _mm_storeu_ps(s[1] + j, _mm256_extractf128_ps(sums, 1));
    }
  }
  for (; j < n_keys; ++j)
    for (int r = 0; r < ROWS; ++r) s[r][j] = dot(q[r], k0 + j * D, D) * scale;
}

// acc[r][0..8*VECS) += sum_j p[r][j] * v[j][0..8*VECS) for ROWS rows, kept in registers.
template <int ROWS, int VECS>
void weighted_v_tile(const float* p, const float* v, int64_t n_keys, int64_t D, float* acc) {
  __m256 c[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < VECS; ++i) c[r][i] = _mm256_loadu_ps(acc + r * D + 8 * i);
  for (int64_t j = 0; j < n_keys; ++j) {
    __m256 w[ROWS];
    for (int r = 0; r < ROWS; ++r) w[r] = _mm256_broadcast_ss(p + r * kAttnKeyBlock + j);
    const float* vj = v + j * D;
    for (int i = 0; i < VECS; ++i) {
      const __m256 vv = _mm256_loadu_ps(vj + 8 * i);
      for (int r = 0; r < ROWS; ++r) c[r][i] = _mm256_fmadd_ps(w[r], vv, c[r][i]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < VECS; ++i) _mm256_storeu_ps(acc + r * D + 8 * i, c[r][i]);
}

template <int ROWS>
void weighted_v_rows(const float* p, const float* v, int64_t n_keys, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) weighted_v_tile<ROWS, 4>(p, v + d, n_keys, D, acc + d);
  for (; d + 8 <= D; d += 8) weighted_v_tile<ROWS, 1>(p, v + d, n_keys, D, acc + d);
  for (; d < D; ++d)
    for (int r = 0; r < ROWS; ++r) {
      float t = acc[r * D + d];
      for (int64_t j = 0; j < n_keys; ++j) t += p[r * kAttnKeyBlock + j] * v[j * D + d];
      acc[r * D + d] = t;
    }
}

}  // namespace

void attend_key_block_avx2(const AttnKeyBlock& a) {
  const int64_t D = a.head_dim, block = a.key_end - a.key_begin;
  const float* k0 = a.k + a.key_begin * D;
  const float* v0 = a.v + a.key_begin * D;
  const auto score_row = [&](int64_t r) { return a.scores + r * kAttnKeyBlock; };

  // 1. Scores, two rows at a time (keys up to the larger of the two rows' visible counts).
  int64_t r = 0;
  for (; r + 2 <= a.n_rows; r += 2) {
    const int64_t n = std::max(visible_keys(a, r), visible_keys(a, r + 1));
    if (n == 0) continue;
    float* s[2] = {score_row(r), score_row(r + 1)};
    scores_tile<2>(a.q_rows + r, k0, n, D, a.scale, s);
  }
  if (r < a.n_rows && visible_keys(a, r) > 0) {
    float* s[1] = {score_row(r)};
    scores_tile<1>(a.q_rows + r, k0, visible_keys(a, r), D, a.scale, s);
  }

  // 2. Online softmax per row; scores become probabilities, zero past the row's visible keys.
  for (r = 0; r < a.n_rows; ++r) {
    float* s = score_row(r);
    const int64_t n = visible_keys(a, r);
    if (n == 0) {
      std::fill_n(s, block, 0.0f);
      continue;
    }
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    float block_max = avx2::hmax_ps(vmax);
    for (; j < n; ++j) block_max = std::max(block_max, s[j]);
    const float old_max = a.row_max[r], new_max = std::max(old_max, block_max);
    const float rescale = std::exp(old_max - new_max);  // 0 on the first block (old_max = -inf)
    const __m256 vnew_max = _mm256_set1_ps(new_max);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
      const __m256 e = avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), vnew_max));
      _mm256_storeu_ps(s + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = avx2::hsum_ps(vsum);
    for (; j < n; ++j) {
      s[j] = std::exp(s[j] - new_max);
      sum += s[j];
    }
    std::fill(s + n, s + block, 0.0f);
    a.row_max[r] = new_max;
    a.row_sum[r] = a.row_sum[r] * rescale + sum;
    if (rescale != 1.0f) {
      float* acc = a.acc + r * D;
      const __m256 vr = _mm256_set1_ps(rescale);
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), vr));
      for (; d < D; ++d) acc[d] *= rescale;
    }
  }

  // 3. acc += P V, three rows per pass so each V row loaded serves three accumulators.
  for (r = 0; r < a.n_rows; r += 3) {
    const int64_t rows = std::min<int64_t>(3, a.n_rows - r);
    int64_t n = 0;
    for (int64_t i = 0; i < rows; ++i) n = std::max(n, visible_keys(a, r + i));
    if (n == 0) continue;
    const float* p = score_row(r);
    float* acc = a.acc + r * D;
    if (rows == 3) weighted_v_rows<3>(p, v0, n, D, acc);
    else if (rows == 2) weighted_v_rows<2>(p, v0, n, D, acc);
    else weighted_v_rows<1>(p, v0, n, D, acc);
  }
}

}  // namespace pyengine::cpu
