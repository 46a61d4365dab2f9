// AVX2/FMA attention: the key-block step (decode) and the prefill tile kernel. Compiled with
// -mavx2 -mfma; called only when cpuid says so.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// ---- Prefill tile, outer-product form. Layouts (R = rows padded to a multiple of 8):
//   qt[d * R + r]  = q_rows[r][d] * scale   (packed once per tile)
//   st[j * R + r]  = score, then probability, of row r against key j of the block
//   acc[r * D + d] = un-normalized weighted sum of V

// The step both tile micro-kernels repeat: c[a][i] += x[a * x_stride] * y[8 i .. 8 i + 8), a rank-1
// update of an A x (8 I) register block (one broadcast per row a, I vector loads of y).
template <int A, int I>
inline __attribute__((always_inline)) void rank1_update(__m256 (&c)[A][I], const float* x, int64_t x_stride,
                                                        const float* y) {
  __m256 yv[I];
  for (int i = 0; i < I; ++i) yv[i] = _mm256_loadu_ps(y + 8 * i);
  for (int a = 0; a < A; ++a) {
    const __m256 xa = _mm256_broadcast_ss(x + a * x_stride);
    for (int i = 0; i < I; ++i) c[a][i] = _mm256_fmadd_ps(xa, yv[i], c[a][i]);
  }
}

// st[kk][r0 .. r0 + 8 * RVECS) = sum_d qt[d][..] * k[kk][d] for KEYS keys; block_max[r0 ..] takes
// the max over those keys too, which saves the softmax a pass over the scores.
template <int KEYS, int RVECS>
void scores_outer(const float* qt, int64_t R, const float* k, int64_t D, float* st, float* block_max) {
  __m256 c[KEYS][RVECS];
  for (int kk = 0; kk < KEYS; ++kk)
    for (int i = 0; i < RVECS; ++i) c[kk][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) rank1_update(c, k + d, D, qt + d * R);
  for (int i = 0; i < RVECS; ++i) {
    __m256 m = _mm256_loadu_ps(block_max + 8 * i);
    for (int kk = 0; kk < KEYS; ++kk) {
      _mm256_storeu_ps(st + kk * R + 8 * i, c[kk][i]);
      m = _mm256_max_ps(m, c[kk][i]);
    }
    _mm256_storeu_ps(block_max + 8 * i, m);
  }
}

template <int RVECS>
void scores_outer_keys(const float* qt, int64_t R, const float* k, int64_t D, int64_t keys, float* st,
                       float* block_max) {
  switch (keys) {
    case 1: return scores_outer<1, RVECS>(qt, R, k, D, st, block_max);
    case 2: return scores_outer<2, RVECS>(qt, R, k, D, st, block_max);
    case 3: return scores_outer<3, RVECS>(qt, R, k, D, st, block_max);
    case 4: return scores_outer<4, RVECS>(qt, R, k, D, st, block_max);
    case 5: return scores_outer<5, RVECS>(qt, R, k, D, st, block_max);
    default: return scores_outer<6, RVECS>(qt, R, k, D, st, block_max);
  }
}

// acc[r][d0 .. d0 + 8 * DVECS) = acc[r][..] * rescale[r] + sum_j pt[j][r] * v[j][..], for ROWS rows.
template <int ROWS, int DVECS>
void pv_outer(const float* pt, int64_t R, const float* v, int64_t D, int64_t n_keys, const float* rescale,
              float* acc) {
  __m256 c[ROWS][DVECS];
  for (int r = 0; r < ROWS; ++r) {
    const __m256 s = _mm256_broadcast_ss(rescale + r);
    for (int i = 0; i < DVECS; ++i) c[r][i] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + 8 * i), s);
  }
  for (int64_t j = 0; j < n_keys; ++j) rank1_update(c, pt + j * R, 1, v + j * D);
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < DVECS; ++i) _mm256_storeu_ps(acc + r * D + 8 * i, c[r][i]);
}

template <int DVECS>
void pv_outer_rows(const float* pt, int64_t R, const float* v, int64_t D, int64_t n_keys, const float* rescale,
                   float* acc, int64_t rows) {
  switch (rows) {
    case 1: return pv_outer<1, DVECS>(pt, R, v, D, n_keys, rescale, acc);
    case 2: return pv_outer<2, DVECS>(pt, R, v, D, n_keys, rescale, acc);
    case 3: return pv_outer<3, DVECS>(pt, R, v, D, n_keys, rescale, acc);
    case 4: return pv_outer<4, DVECS>(pt, R, v, D, n_keys, rescale, acc);
    case 5: return pv_outer<5, DVECS>(pt, R, v, D, n_keys, rescale, acc);
    default: return pv_outer<6, DVECS>(pt, R, v, D, n_keys, rescale, acc);
  }
}

}  // namespace

void attend_tile_avx2(const AttnRowTile& t) {
  const int64_t D = t.head_dim, R = (t.n_rows + 7) / 8 * 8;
  constexpr int64_t KB = kAttnKeyBlock;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // One allocation per thread, reused: qt [D][R] | st [KB][R] | acc [R][D] | six [R] vectors.
  thread_local std::vector<float> scratch;
  scratch.resize(D * R + KB * R + R * D + 6 * R);
  float *qt = scratch.data(), *st = qt + D * R, *acc = st + KB * R, *row_max = acc + R * D;
  float *row_sum = row_max + R, *rescale = row_sum + R, *limit = rescale + R, *start = limit + R;
  float* block_max = start + R;

  // Q^T (times scale) in 8 x 8 blocks; padded rows are zero queries that see every key, so they
  // stay finite; their results are dropped.
  const __m256 vscale = _mm256_set1_ps(t.scale);
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const int64_t rows = std::min<int64_t>(8, t.n_rows - r0);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 block[8];
      for (int i = 0; i < 8; ++i) block[i] = i < rows ? _mm256_loadu_ps(t.q_rows[r0 + i] + d) : _mm256_setzero_ps();
      avx2::transpose8x8(block);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(qt + (d + i) * R + r0, _mm256_mul_ps(block[i], vscale));
    }
    for (; d < D; ++d)
      for (int64_t i = 0; i < 8; ++i) qt[d * R + r0 + i] = i < rows ? t.q_rows[r0 + i][d] * t.scale : 0.0f;
  }
  int64_t min_limit = t.key_end, max_start = t.key_begin;
  for (int64_t r = 0; r < R; ++r) {
    const bool real = r < t.n_rows;
    // Exact as floats: positions are far below 2^24.
    limit[r] = static_cast<float>(real ? t.row_limit[r] : t.key_end);
    start[r] = static_cast<float>(real ? t.row_start[r] : t.key_begin);
    if (real) {
      min_limit = std::min(min_limit, t.row_limit[r]);
      max_start = std::max(max_start, t.row_start[r]);
    }
  }
  std::fill_n(row_max, R, kNegInf);
  std::fill_n(row_sum, R, 0.0f);
  std::fill_n(acc, R * D, 0.0f);

  for (int64_t kb = t.key_begin; kb < t.key_end; kb += KB) {
    const int64_t n = std::min(KB, t.key_end - kb);
    const float* k = t.k + kb * D;
    const float* v = t.v + kb * D;
    // 1. Scores of every row against the block's keys, six keys x sixteen rows at a time.
    std::fill_n(block_max, R, kNegInf);
    for (int64_t j = 0; j < n; j += 6) {
      const int64_t keys = std::min<int64_t>(6, n - j);
      int64_t r = 0;
      for (; r + 16 <= R; r += 16) scores_outer_keys<2>(qt + r, R, k + j * D, D, keys, st + j * R + r, block_max + r);
      if (r < R) scores_outer_keys<1>(qt + r, R, k + j * D, D, keys, st + j * R + r, block_max + r);
    }
    // 2. Online softmax, eight rows per vector. On the causal diagonal, and at the window's back
    // edge, keys a row must not see become -inf first and the block max is taken again.
    const bool masked = kb + n > min_limit || kb < max_start;
    for (int64_t r = 0; r < R; r += 8) {
      __m256 max_now = _mm256_loadu_ps(block_max + r);
      if (masked) {
        const __m256 lim = _mm256_loadu_ps(limit + r), first = _mm256_loadu_ps(start + r);
        max_now = _mm256_set1_ps(kNegInf);
        for (int64_t j = 0; j < n; ++j) {
          const __m256 key = _mm256_set1_ps(static_cast<float>(kb + j));
          const __m256 hidden = _mm256_or_ps(_mm256_cmp_ps(key, lim, _CMP_GE_OQ), _mm256_cmp_ps(key, first, _CMP_LT_OQ));
          const __m256 s = _mm256_blendv_ps(_mm256_loadu_ps(st + j * R + r), _mm256_set1_ps(kNegInf), hidden);
          _mm256_storeu_ps(st + j * R + r, s);
          max_now = _mm256_max_ps(max_now, s);
        }
      }
      // Finite for every row: the first block holds every row's first key (see AttnRowTile).
      const __m256 old_max = _mm256_loadu_ps(row_max + r), new_max = _mm256_max_ps(old_max, max_now);
      const __m256 scale_old = avx2::exp_nonpositive_ps(_mm256_sub_ps(old_max, new_max));  // 0 on block 0
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m256 p = avx2::exp_nonpositive_ps(_mm256_sub_ps(_mm256_loadu_ps(st + j * R + r), new_max));
        _mm256_storeu_ps(st + j * R + r, p);
        sum = _mm256_add_ps(sum, p);
      }
      _mm256_storeu_ps(row_max + r, new_max);
      _mm256_storeu_ps(row_sum + r, _mm256_fmadd_ps(_mm256_loadu_ps(row_sum + r), scale_old, sum));
      _mm256_storeu_ps(rescale + r, scale_old);
    }
    // 3. acc = acc * rescale + P V, six rows x sixteen dims at a time.
    for (int64_t r = 0; r < R; r += 6) {
      const int64_t rows = std::min<int64_t>(6, R - r);
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) pv_outer_rows<2>(st + r, R, v + d, D, n, rescale + r, acc + r * D + d, rows);
      for (; d + 8 <= D; d += 8) pv_outer_rows<1>(st + r, R, v + d, D, n, rescale + r, acc + r * D + d, rows);
      for (; d < D; ++d) {  // head_dim not a multiple of 8: the rest, scalar
        for (int64_t i = r; i < r + rows; ++i) {
          float a = acc[i * D + d] * rescale[i];
          for (int64_t j = 0; j < n; ++j) a += st[j * R + i] * v[j * D + d];
          acc[i * D + d] = a;
        }
      }
    }
  }
  for (int64_t r = 0; r < t.n_rows; ++r) {
    const __m256 inv_sum = _mm256_set1_ps(1.0f / row_sum[r]);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(t.out_rows[r] + d, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d), inv_sum));
    for (; d < D; ++d) t.out_rows[r][d] = acc[r * D + d] * (1.0f / row_sum[r]);
  }
}

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
