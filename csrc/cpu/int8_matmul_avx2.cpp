// AVX2/FMA blocks for int8_matmul.cpp. Compiled with -mavx2 -mfma; called only when cpuid says so.
//
// int8 products: vpmaddubsw multiplies UNSIGNED bytes by SIGNED bytes and saturates its int16 pair
// sums, so we feed it |a| (unsigned) and b with a's sign applied (vpsignb). With both operands in
// [-127, 127] a pair sum is at most 2 * 127 * 127 = 32258 < 32767: no saturation, exact.
// vpmaddwd with ones then widens the pairs to int32.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/avx2_math.h"
#include "cpu/int8_matmul_isa.h"
#include "cpu/row_blocks.h"

#define PE_INLINE inline __attribute__((always_inline))

namespace pyengine::cpu {
namespace {

PE_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Decode (one row of a) streams every weight row exactly once. A tile's rows are short (K bytes of
// int8: 9 cache lines for K = 576), too short for the hardware prefetcher to lock on before the tile
// is done, and one core then waits on DRAM latency. So each tile prefetches the rows of the tile
// kPrefetchTiles further down while it computes (prefetches never fault past the end).
constexpr int kPrefetchTiles = 2;  // the distance matters little (1 to 8 tiles measured alike)

template <int NR, class T>
PE_INLINE void prefetch_ahead(const T* b, int64_t ldb, int64_t k) {
  for (int n = 0; n < NR; ++n) {
    _mm_prefetch(reinterpret_cast<const char*>(b + (n + kPrefetchTiles * NR) * ldb + k), _MM_HINT_T0);
  }
}

// ---- int8 x int8 -> int32 ----

// acc[m][n] += 32 products of a row m and b row n, starting at a / b.
template <int MR, int NR>
PE_INLINE void i8_step(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, __m256i (&acc)[MR][NR]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i bv[NR];
  for (int n = 0; n < NR; ++n) bv[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + n * ldb));
  for (int m = 0; m < MR; ++m) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * lda));
    const __m256i a_abs = _mm256_abs_epi8(av);
    for (int n = 0; n < NR; ++n) {
      const __m256i pairs = _mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(bv[n], av));
      acc[m][n] = _mm256_add_epi32(acc[m][n], _mm256_madd_epi16(pairs, ones));
    }
  }
}

template <int MR, int NR>
void i8_tile(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc, int64_t K) {
  __m256i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (k % 64 == 0) prefetch_ahead<NR>(b, ldb, k);  // one prefetch per cache line
    i8_step<MR, NR>(a + k, lda, b + k, ldb, acc);
  }
  if (k < K) {  // tail: zero-padded copies, so no byte past a row is read
    alignas(32) int8_t a_tail[MR][32] = {}, b_tail[NR][32] = {};
    for (int m = 0; m < MR; ++m) std::memcpy(a_tail[m], a + m * lda + k, K - k);
    for (int n = 0; n < NR; ++n) std::memcpy(b_tail[n], b + n * ldb + k, K - k);
    i8_step<MR, NR>(&a_tail[0][0], 32, &b_tail[0][0], 32, acc);
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) c[m * ldc + n] = hsum_epi32(acc[m][n]);
}

// ---- fp32 x int8 -> fp32 (weight-only) ----

template <int MR, int NR>
void f32i8_tile(const float* a, int64_t lda, const int8_t* b, int64_t ldb, float* c, int64_t ldc, int64_t K) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k % 64 == 0) prefetch_ahead<NR>(b, ldb, k);  // one prefetch per cache line
    __m256 bf[NR];
    for (int n = 0; n < NR; ++n) {
      const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + n * ldb + k));
      bf[n] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8));
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_loadu_ps(a + m * lda + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(av, bf[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      float sum = avx2::hsum_ps(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) sum += a[m * lda + kk] * static_cast<float>(b[n * ldb + kk]);
      c[m * ldc + n] = sum;
    }
  }
}

// ---- int16 activations x int8 weights -> exact sums (W8A16) ----
//
// Per 16 weights: one 16-byte load, vpmovsxbw to int16, vpmaddwd with 16 int16 activations (pairs
// summed to int32), vpaddd: about half the uops of the fp32 x int8 path, whose convert + FMA per 8
// weights keeps one core below memory bandwidth at decode.
// A vpmaddwd lane is at most 2 * 32767 * 127 = 8.3e6 in magnitude, so an int32 lane can take
// 2048 / 16 = 128 of them (1.07e9 < 2^31): every kI16Block values of k the lanes are added, in
// int64, to the row total, and restart from 0.
constexpr int64_t kI16Block = 2048;

// The 8 int32 lanes of v as 4 int64 lanes (lane i + lane i + 4): exact, and no horizontal step yet.
PE_INLINE __m256i widen_epi32_pairs(__m256i v) {
  return _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}

// The totals of four rows' int64 lanes, as one vector [sum(s0), sum(s1), sum(s2), sum(s3)].
PE_INLINE __m256i reduce4_epi64(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
  const __m256i s01 = _mm256_add_epi64(_mm256_unpacklo_epi64(s0, s1), _mm256_unpackhi_epi64(s0, s1));
  const __m256i s23 = _mm256_add_epi64(_mm256_unpacklo_epi64(s2, s3), _mm256_unpackhi_epi64(s2, s3));
  return _mm256_add_epi64(_mm256_permute2x128_si256(s01, s23, 0x20), _mm256_permute2x128_si256(s01, s23, 0x31));
}

// acc[m] += 16 products of activation row m and the weight row, starting at a / b.
template <int MR>
PE_INLINE void i16i8_step(const int16_t* a, int64_t lda, const int8_t* b, __m256i (&acc)[MR]) {
  const __m256i bw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  for (int m = 0; m < MR; ++m) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * lda));
    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(av, bw));
  }
}

// acc[m] += activation row m x weight row br over k in [k0, k1).
template <int MR>
PE_INLINE void i16i8_row(const int16_t* a, int64_t lda, const int8_t* br, int64_t ldb, int64_t k0, int64_t k1,
                         __m256i (&acc)[MR]) {
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {  // one cache line of the weight row
    prefetch_ahead<1>(br, ldb, k);  // the row kPrefetchTiles further down its stream
    for (int j = 0; j < 64; j += 16) i16i8_step<MR>(a + k + j, lda, br + k + j, acc);
  }
  for (; k + 16 <= k1; k += 16) i16i8_step<MR>(a + k, lda, br + k, acc);
  if (k < k1) {  // tail (only in the last block): zero-padded copies, so nothing past a row is read
    alignas(32) int16_t a_tail[MR][16] = {};
    alignas(16) int8_t b_tail[16] = {};
    for (int m = 0; m < MR; ++m) std::memcpy(a_tail[m], a + m * lda + k, (k1 - k) * sizeof(int16_t));
    std::memcpy(b_tail, br + k, k1 - k);
    i16i8_step<MR>(&a_tail[0][0], 16, b_tail, acc);
  }
}

// c[m * ldc + r] = exact sum over K of activation row m (of MR) times weight row r, for the `rows`
// (1..4) weight rows at b. The weight rows are read one after another, not as a register tile: one
// sequential stream reads faster than several interleaved adjacent rows. What four rows share is the
// call and the horizontal sums: each row leaves 4 int64 lanes, and one transposed reduction turns
// four rows' lanes into four totals (a call and a reduction per row cost measurable time).
template <int MR>
void i16i8_rows(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c, int64_t ldc, int rows,
                int64_t K) {
  __m256i lanes[4][MR];  // per weight row r and activation row m: 4 int64 lanes of the sum
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) lanes[r][m] = _mm256_setzero_si256();
  for (int r = 0; r < rows; ++r) {
    for (int64_t k0 = 0; k0 < K; k0 += kI16Block) {
      const int64_t k1 = std::min(K, k0 + kI16Block);
      __m256i acc[MR];
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
      i16i8_row<MR>(a, lda, b + r * ldb, ldb, k0, k1, acc);
      for (int m = 0; m < MR; ++m) lanes[r][m] = _mm256_add_epi64(lanes[r][m], widen_epi32_pairs(acc[m]));
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) int64_t totals[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals),
                       reduce4_epi64(lanes[0][m], lanes[1][m], lanes[2][m], lanes[3][m]));
    std::copy(totals, totals + rows, c + m * ldc);
  }
}

// Decode at batch 1 and 2: the thread's weight rows as TWO sequential streams, the slice's first and
// second halves, a cache line of each in turn: two streams read DRAM faster than one (four add
// nothing more). From 3 activation rows on the multiply-adds bound the speed, and i16i8_rows (one
// stream) is the faster one.
// Two rows at b0 and b0 + ldb (stream 0) and rows1 (0..2) at b1, b1 + ldb (stream 1) -> c0[0..2),
// c1[0..rows1) of each activation row m (at c0 + m * ldc, c1 + m * ldc).
template <int MR>
void i16i8_rows_two_streams(const int16_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t ldb,
                            int64_t* c0, int64_t* c1, int64_t ldc, int rows1, int64_t K) {
  __m256i lanes[4][MR];  // rows of stream 0 at [0, 2), of stream 1 at [2, 4)
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) lanes[r][m] = _mm256_setzero_si256();
  for (int r = 0; r < 2; ++r) {
    const int8_t* row0 = b0 + r * ldb;
    const int8_t* row1 = b1 + r * ldb;
    for (int64_t k0 = 0; k0 < K; k0 += kI16Block) {
      const int64_t k1 = std::min(K, k0 + kI16Block);
      __m256i acc0[MR], acc1[MR];
      for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_si256();
      int64_t k = k0;
      if (r < rows1) {
        for (; k + 64 <= k1; k += 64) {
          prefetch_ahead<1>(row0, ldb, k);
          prefetch_ahead<1>(row1, ldb, k);
          for (int j = 0; j < 64; j += 16) {
            i16i8_step<MR>(a + k + j, lda, row0 + k + j, acc0);
            i16i8_step<MR>(a + k + j, lda, row1 + k + j, acc1);
          }
        }
        i16i8_row<MR>(a, lda, row1, ldb, k, k1, acc1);
      }
      i16i8_row<MR>(a, lda, row0, ldb, k, k1, acc0);
      for (int m = 0; m < MR; ++m) {
        lanes[r][m] = _mm256_add_epi64(lanes[r][m], widen_epi32_pairs(acc0[m]));
        lanes[2 + r][m] = _mm256_add_epi64(lanes[2 + r][m], widen_epi32_pairs(acc1[m]));
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) int64_t totals[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals),
                       reduce4_epi64(lanes[0][m], lanes[1][m], lanes[2][m], lanes[3][m]));
    std::copy(totals, totals + 2, c0 + m * ldc);
    std::copy(totals + 2, totals + 2 + rows1, c1 + m * ldc);
  }
}

// ---- fp32 x fp32 -> fp32 ----

template <int MR, int NR>
void f32_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t K) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k % 16 == 0) prefetch_ahead<NR>(b, ldb, k);  // one prefetch per cache line
    __m256 bv[NR];
    for (int n = 0; n < NR; ++n) bv[n] = _mm256_loadu_ps(b + n * ldb + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_loadu_ps(a + m * lda + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      float sum = avx2::hsum_ps(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) sum += a[m * lda + kk] * b[n * ldb + kk];
      c[m * ldc + n] = sum;
    }
  }
}

// Decode (up to 4 activation rows) in two streams, as the int8 kernel: rows b0, b0 + ldb one after
// the other (stream 0), each in lockstep with rows1 (0..2) rows at b1, b1 + ldb (stream 1). Each
// (activation row, weight row) sum is the FMA chain f32_tile runs, so the results are bitwise those
// of f32_tile. Reading a stream's two rows one after the other, not side by side, keeps each stream
// sequential, which measured faster at batch 1 and 4.
template <int MR>
void f32_rows_two_streams(const float* a, int64_t lda, const float* b0, const float* b1, int64_t ldb, float* c0,
                          float* c1, int64_t ldc, int rows1, int64_t K) {
  for (int r = 0; r < 2; ++r) {
    const float* row0 = b0 + r * ldb;
    const float* row1 = b1 + r * ldb;
    const bool both = r < rows1;
    __m256 acc0[MR], acc1[MR];
    for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      // Software prefetch only from 3 activation rows on: at 1-2 rows the hardware prefetcher keeps
      // up with the two sequential streams by itself and the prefetches only cost time; at 4 rows
      // they help.
      if (MR >= 3 && k % 16 == 0) {  // one prefetch per cache line, two calls further down each stream
        _mm_prefetch(reinterpret_cast<const char*>(row0 + 4 * ldb + k), _MM_HINT_T0);
        if (both) _mm_prefetch(reinterpret_cast<const char*>(row1 + 4 * ldb + k), _MM_HINT_T0);
      }
      const __m256 w0 = _mm256_loadu_ps(row0 + k);
      const __m256 w1 = both ? _mm256_loadu_ps(row1 + k) : w0;
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_loadu_ps(a + m * lda + k);
        acc0[m] = _mm256_fmadd_ps(av, w0, acc0[m]);
        if (both) acc1[m] = _mm256_fmadd_ps(av, w1, acc1[m]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      const float* am = a + m * lda;
      float sum0 = avx2::hsum_ps(acc0[m]);
      for (int64_t kk = k; kk < K; ++kk) sum0 += am[kk] * row0[kk];
      c0[m * ldc + r] = sum0;
      if (both) {
        float sum1 = avx2::hsum_ps(acc1[m]);
        for (int64_t kk = k; kk < K; ++kk) sum1 += am[kk] * row1[kk];
        c1[m * ldc + r] = sum1;
      }
    }
  }
}

template <class T>
using TileTable = T[4][4];

#define PE_TILE_TABLE(tile)                                              \
  {                                                                      \
    {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},                    \
        {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},                \
        {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},                \
    {                                                                    \
      tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>                     \
    }                                                                    \
  }

// Walks the block in tiles of up to 4 rows of a by nr_for_mr[mr] rows of b. b is taken kGridRows
// rows at a time (a multiple of every tile's rows), which stay in L1/L2 while every group of 4 rows
// of a uses them, so b is read from memory once however many rows a has.
constexpr int64_t kGridRows = 12;

template <class Fn, class A, class B, class C>
PE_INLINE void tile_grid(const TileTable<Fn>& table, const int (&nr_for_mr)[5], const A* a, int64_t lda,
                         const B* b, int64_t ldb, C* c, int64_t ldc, int64_t M, int64_t N, int64_t K) {
  for (int64_t n0 = 0; n0 < N; n0 += kGridRows) {
    const int64_t n1 = std::min(N, n0 + kGridRows);
    for (int64_t m = 0; m < M; m += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - m));
      const int nr_max = nr_for_mr[mr];
      for (int64_t n = n0; n < n1; n += nr_max) {
        const int nr = static_cast<int>(std::min<int64_t>(nr_max, n1 - n));
        table[mr - 1][nr - 1](a + m * lda, lda, b + n * ldb, ldb, c + m * ldc + n, ldc, K);
      }
    }
  }
}

using I8TileFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t, int64_t);
using F32I8TileFn = void (*)(const float*, int64_t, const int8_t*, int64_t, float*, int64_t, int64_t);
using F32TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

// Rows of b per tile for 1..4 rows of a, so accumulators and operands fit in 16 ymm registers.
constexpr int kI8Nr[5] = {0, 4, 4, 2, 2};
constexpr int kF32Nr[5] = {0, 4, 4, 3, 3};

}  // namespace

void i16i8_dot_block_avx2(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c, int64_t ldc,
                          int64_t M, int64_t N, int64_t K) {
  if (M <= 2 && N >= 4) {
    const auto two_streams = M == 1 ? i16i8_rows_two_streams<1> : i16i8_rows_two_streams<2>;
    for_each_row_pair(N, [&](int64_t n0, int64_t n1, int rows1) {
      two_streams(a, lda, b + n0 * ldb, b + n1 * ldb, ldb, c + n0, c + n1, ldc, rows1, K);
    });
    return;
  }
  using RowsFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t*, int64_t, int, int64_t);
  static constexpr RowsFn kRows[4] = {i16i8_rows<1>, i16i8_rows<2>, i16i8_rows<3>, i16i8_rows<4>};
  for_each_row_group(M, N, [&](int64_t m, int mr, int64_t n, int rows) {
    kRows[mr - 1](a + m * lda, lda, b + n * ldb, ldb, c + m * ldc + n, ldc, rows, K);
  });
}

void panel_kernel_avx2(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc) {
  static_assert(kPanelRows == 6 && kPanelCols == 16, "6 x 16 tile: two ymm of weights per k");
  // 12 accumulators + 2 weight vectors + 1 broadcast: 15 of the 16 ymm registers. Named variables,
  // not an array: GCC kept an accumulator array in memory, storing it every k (half the speed).
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  // Two k per iteration: the loop's own instructions take fewer of the issue slots the 12 FMAs need.
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k, a_pack += kPanelRows, b_pack += kPanelCols) {
    const __m256 b0 = _mm256_load_ps(b_pack), b1 = _mm256_load_ps(b_pack + 8);
    __m256 a = _mm256_broadcast_ss(a_pack + 0);
    c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(a_pack + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(a_pack + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(a_pack + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(a_pack + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(a_pack + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  const __m256 rows[kPanelRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int m = 0; m < kPanelRows; ++m) {
    _mm256_storeu_ps(c + m * ldc, rows[m][0]);
    _mm256_storeu_ps(c + m * ldc + 8, rows[m][1]);
  }
}

namespace {

// The pair (a[0], a[1]) as one int32 in every lane: vpbroadcastd from memory. (__builtin_memcpy: a
// load even where the emulated tests compile this file freestanding, with no memcpy to call.)
PE_INLINE __m256i broadcast_pair(const int16_t* a) {
  int32_t pair;
  __builtin_memcpy(&pair, a, sizeof(pair));
  return _mm256_set1_epi32(pair);
}

// c[0 .. 8) += the eight int32 lanes of v, widened to int64.
PE_INLINE void add_to_i64(int64_t* c, __m256i v) {
  __m256i* lo = reinterpret_cast<__m256i*>(c);
  __m256i* hi = reinterpret_cast<__m256i*>(c + 4);
  _mm256_storeu_si256(lo, _mm256_add_epi64(_mm256_loadu_si256(lo), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v))));
  _mm256_storeu_si256(hi, _mm256_add_epi64(_mm256_loadu_si256(hi), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1))));
}

// The 6 x 16 tile's pair sums over `pairs` pairs, in int32 (the caller keeps them from overflowing),
// handed to sink as rows[m][half] (columns 8 * half .. 8 * half + 7).
template <class Sink>
PE_INLINE void i16_panel_sums(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, const Sink& sink) {
  static_assert(kPanelRows == 6 && kPanelCols == 16, "6 x 16 tile: two ymm of weight pairs per pair of k");
  // 12 int32 accumulators + 2 weight vectors + 1 broadcast + 1 product: all 16 ymm registers.
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 2
  for (int64_t p = 0; p < pairs; ++p, a_pack += 2 * kPanelRows, b_pack += 2 * kPanelCols) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b_pack));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b_pack + 16));
    __m256i a = broadcast_pair(a_pack + 0);
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, b0)), c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, b1));
    a = broadcast_pair(a_pack + 2);
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, b0)), c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, b1));
    a = broadcast_pair(a_pack + 4);
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, b0)), c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, b1));
    a = broadcast_pair(a_pack + 6);
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(a, b0)), c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(a, b1));
    a = broadcast_pair(a_pack + 8);
    c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(a, b0)), c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(a, b1));
    a = broadcast_pair(a_pack + 10);
    c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(a, b0)), c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(a, b1));
  }
  const __m256i rows[kPanelRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  sink(rows);
}

// One chunk of i16_panel_kernel_avx2: c (6 x 16 int64) += the chunk's sums. Its own function so that
// the accumulators live only here: inlined into the chunk loop, GCC spilled one of them every pair.
__attribute__((noinline)) void i16_panel_chunk(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs,
                                               int64_t* c, int64_t ldc) {
  i16_panel_sums(a_pack, b_pack, pairs, [&](const __m256i (&rows)[kPanelRows][2]) {
    for (int m = 0; m < kPanelRows; ++m) {
      add_to_i64(c + m * ldc, rows[m][0]);
      add_to_i64(c + m * ldc + 8, rows[m][1]);
    }
  });
}

}  // namespace

void i16_panel_kernel_scaled_avx2(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, const float* row_scale,
                                  const float* col_scale, const float* bias, float* out, int64_t ldo) {
  i16_panel_sums(a_pack, b_pack, pairs, [&](const __m256i (&rows)[kPanelRows][2]) {
    for (int m = 0; m < kPanelRows; ++m) {
      const __m256 sx = _mm256_set1_ps(row_scale[m]);
      for (int half = 0; half < 2; ++half) {
        // float(sum) * (sx * w_scale): the scalar epilogue's operations in its order (the int32 sum
        // is exact, so its conversion rounds as the int64 one does).
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(rows[m][half]), _mm256_mul_ps(sx, _mm256_loadu_ps(col_scale + 8 * half)));
        if (bias != nullptr) {
          __asm__("" : "+x"(v));  // keeps GCC from fusing the multiply and the add into an FMA
          v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * half));
        }
        _mm256_storeu_ps(out + m * ldo + 8 * half, v);
      }
    }
  });
}

void i16_panel_kernel_avx2(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, int64_t* c, int64_t ldc) {
  for (int m = 0; m < kPanelRows; ++m) std::fill(c + m * ldc, c + m * ldc + kPanelCols, int64_t{0});
  for (int64_t p0 = 0; p0 < pairs; p0 += kI16PanelChunkPairs) {
    const int64_t chunk = std::min(kI16PanelChunkPairs, pairs - p0);
    i16_panel_chunk(a_pack + p0 * 2 * kPanelRows, b_pack + p0 * 2 * kPanelCols, chunk, c, ldc);
  }
}

namespace {

// The vector part of the weight packing (pack_panel_{i8,f32,i16}_avx2): blocks of 8 panel rows, each
// read as 8 vectors of eight 32-bit values, load8(c, k) for weight row c from k on, and transposed in
// registers (moves only, no arithmetic). A panel row is kPanelCols such values: one k of fp32, or
// (kPerRow = 2) one pair of k of int16. Returns the first k left for the caller's scalar tail.
template <int kPerRow, class Load8>
PE_INLINE int64_t pack_panel_blocks(int64_t cols, int64_t K, float* panel, const Load8& load8) {
  static_assert(kPanelCols == 16, "two 8 x 8 blocks per 8 panel rows");
  int64_t k = 0;
  for (; k + 8 * kPerRow <= K; k += 8 * kPerRow) {
    for (int half = 0; half < 2; ++half) {
      __m256 block[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t c = half * 8 + i;
        block[i] = c < cols ? load8(c, k) : _mm256_setzero_ps();
      }
      avx2::transpose8x8(block);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k / kPerRow + i) * kPanelCols + half * 8, block[i]);
    }
  }
  return k;
}

// pack_panel_{i8,f32}_avx2: the blocks, then element(c, k), one value, for the K % 8 tail.
template <class Load8, class Element>
PE_INLINE void pack_panel(int64_t cols, int64_t K, float* panel, const Load8& load8, const Element& element) {
  for (int64_t k = pack_panel_blocks<1>(cols, K, panel, load8); k < K; ++k) {
    for (int64_t c = 0; c < kPanelCols; ++c) panel[k * kPanelCols + c] = c < cols ? element(c, k) : 0.0f;
  }
}

}  // namespace

void pack_panel_i8_avx2(const int8_t* w, int64_t ldw, const float* row_scale, int64_t cols, int64_t K, float* panel) {
  pack_panel(
      cols, K, panel,
      [&](int64_t c, int64_t k) {
        const __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c * ldw + k));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)), _mm256_set1_ps(row_scale[c]));
      },
      [&](int64_t c, int64_t k) { return static_cast<float>(w[c * ldw + k]) * row_scale[c]; });
}

void pack_panel_f32_avx2(const float* w, int64_t ldw, int64_t cols, int64_t K, float* panel) {
  pack_panel(
      cols, K, panel, [&](int64_t c, int64_t k) { return _mm256_loadu_ps(w + c * ldw + k); },
      [&](int64_t c, int64_t k) { return w[c * ldw + k]; });
}

void pack_panel_i16_avx2(const int8_t* w, int64_t ldw, int64_t cols, int64_t K, int16_t* panel) {
  // 16 k of a row widened to int16 are 8 pairs, each the size of a float.
  const int64_t k = pack_panel_blocks<2>(cols, K, reinterpret_cast<float*>(panel), [&](int64_t c, int64_t k0) {
    return _mm256_castsi256_ps(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * ldw + k0))));
  });
  // The last K % 16 values of k (and the odd K's zero pad): the scalar packing of that slice.
  if (k < K) pack_panel_i16_scalar(w + k, ldw, cols, K - k, panel + k * kPanelCols);
}

// Bitwise equal to quantize_row_i16_scalar: same amax (max is exact), same division and rounding.
void quantize_row_i16_avx2(const float* x, int16_t* q, float* scale, int64_t cols) {
  const float s = row_scale(avx2::abs_max(x, cols), 32767.0f);
  *scale = s;
  if (!(s > 0.0f)) {
    std::memset(q, 0, cols * sizeof(int16_t));
    return;
  }
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(32767.0f), lo = _mm256_set1_ps(-32767.0f);
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
    const __m256i r32 = _mm256_cvtps_epi32(r);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(r32), _mm256_extracti128_si256(r32, 1)));
  }
  for (; i < cols; ++i) {
    const float r = std::nearbyint(x[i] / s);
    q[i] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, r)));
  }
}

void i8_dot_block_avx2(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc,
                       int64_t M, int64_t N, int64_t K) {
  static constexpr TileTable<I8TileFn> table = PE_TILE_TABLE(i8_tile);
  tile_grid(table, kI8Nr, a, lda, b, ldb, c, ldc, M, N, K);
}

void f32i8_dot_block_avx2(const float* a, int64_t lda, const int8_t* b, int64_t ldb, float* c, int64_t ldc,
                          int64_t M, int64_t N, int64_t K) {
  static constexpr TileTable<F32I8TileFn> table = PE_TILE_TABLE(f32i8_tile);
  tile_grid(table, kF32Nr, a, lda, b, ldb, c, ldc, M, N, K);
}

void f32_dot_block_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                        int64_t M, int64_t N, int64_t K) {
  if (M <= 4 && N >= 4) {  // decode: the weight streams once past every activation row
    using RowsFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, float*, int64_t,
                            int, int64_t);
    static constexpr RowsFn kRows[4] = {f32_rows_two_streams<1>, f32_rows_two_streams<2>, f32_rows_two_streams<3>,
                                        f32_rows_two_streams<4>};
    for_each_row_pair(N, [&](int64_t n0, int64_t n1, int rows1) {
      kRows[M - 1](a, lda, b + n0 * ldb, b + n1 * ldb, ldb, c + n0, c + n1, ldc, rows1, K);
    });
    return;
  }
  static constexpr TileTable<F32TileFn> table = PE_TILE_TABLE(f32_tile);
  tile_grid(table, kF32Nr, a, lda, b, ldb, c, ldc, M, N, K);
}

}  // namespace pyengine::cpu
