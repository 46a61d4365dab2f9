// AVX-512 blocks for int8_matmul.cpp: the VNNI int8 block, the prefill panel kernels (fp32, W8A16) and the W8A16
// decode GEMV. Compiled with AVX-512 F/BW/VL/DQ/VNNI flags; called only when cpuid says so.
//
// int8: vpdpbusd multiplies UNSIGNED bytes by SIGNED bytes and adds groups of 4 straight into int32 (no
// int16 stage, no saturation). We offset a by +128 (a XOR 0x80 maps [-128, 127] to [0, 255]):
//   sum_k (a_k + 128) * b_k = sum_k a_k * b_k + 128 * sum_k b_k,
// and subtract 128 * sum_k b_k, which a second vpdpbusd with all-ones bytes gives per b row (its
// cost is shared by the tile's rows of a). All sums wrap mod 2^32, so the result is exactly the
// int32 dot product whenever that fits in int32.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "cpu/int8_matmul_isa.h"
#include "cpu/row_blocks.h"

#define PE_INLINE inline __attribute__((always_inline))

namespace pyengine::cpu {
namespace {

// Hand-written: GCC 12 warns (-Wuninitialized) inside its own _mm512_reduce_add_epi32 and
// unmasked extract / cast intrinsics; the zero-masked extracts compile to the same code.
PE_INLINE uint32_t hsum_epi32(__m512i v) {
  const __m256i h = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xFF, v, 0),
                                     _mm512_maskz_extracti64x4_epi64(0xFF, v, 1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

template <int MR, int NR>
PE_INLINE void i8_step(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, __mmask64 mask,
                       __m512i (&acc)[MR][NR], __m512i (&b_sum)[NR]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i bv[NR];
  for (int n = 0; n < NR; ++n) {
    bv[n] = _mm512_maskz_loadu_epi8(mask, b + n * ldb);  // masked-off bytes read as 0
    b_sum[n] = _mm512_dpbusd_epi32(b_sum[n], ones, bv[n]);
  }
  for (int m = 0; m < MR; ++m) {
    // Masked-off bytes of a become 0x80 (=128) but meet b bytes of 0.
    const __m512i a_off = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a + m * lda), flip);
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], a_off, bv[n]);
  }
}

template <int MR, int NR>
void i8_tile(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc, int64_t K) {
  __m512i acc[MR][NR], b_sum[NR];
  for (int n = 0; n < NR; ++n) {
    b_sum[n] = _mm512_setzero_si512();
    for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_setzero_si512();
  }
  const __mmask64 all = ~__mmask64{0};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if constexpr (MR <= 2) {
      // Decode: weight rows are too short for the hardware prefetcher to learn; fetch the slice
      // of the b rows two tiles ahead (a prefetch never faults, even past the end of b).
      const char* ahead = reinterpret_cast<const char*>(b) + 2 * NR * ldb + k * NR;
      for (int line = 0; line < NR; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    i8_step<MR, NR>(a + k, lda, b + k, ldb, all, acc, b_sum);
  }
  if (k < K) {
    const __mmask64 tail = (__mmask64{1} << (K - k)) - 1;  // K - k < 64
    i8_step<MR, NR>(a + k, lda, b + k, ldb, tail, acc, b_sum);
  }
  for (int n = 0; n < NR; ++n) {
    const uint32_t offset = 128u * hsum_epi32(b_sum[n]);
    for (int m = 0; m < MR; ++m) {
      const uint32_t biased = hsum_epi32(acc[m][n]);
      c[m * ldc + n] = static_cast<int32_t>(biased - offset);  // unsigned: wraps without UB
    }
  }
}

using I8TileFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t, int64_t);

}  // namespace

void panel_kernel_pair_avx512(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc) {
  static_assert(kPanelRows == 6 && kPanelCols == 16, "two 6-row tiles x one zmm of weights per k");
  const float* a0 = a_pack;
  const float* a1 = a_pack + kPanelRows * K;
  // 12 accumulators, as named variables for the reason given in panel_kernel_avx2. Each k: one
  // weight load and 12 broadcast multiply-adds; the same sums, in the same order, as the AVX2 kernel.
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t k = 0; k < K; ++k, a0 += kPanelRows, a1 += kPanelRows, b_pack += kPanelCols) {
    const __m512 b = _mm512_loadu_ps(b_pack);
    c0 = _mm512_fmadd_ps(_mm512_set1_ps(a0[0]), b, c0);
    c1 = _mm512_fmadd_ps(_mm512_set1_ps(a0[1]), b, c1);
    c2 = _mm512_fmadd_ps(_mm512_set1_ps(a0[2]), b, c2);
    c3 = _mm512_fmadd_ps(_mm512_set1_ps(a0[3]), b, c3);
    c4 = _mm512_fmadd_ps(_mm512_set1_ps(a0[4]), b, c4);
    c5 = _mm512_fmadd_ps(_mm512_set1_ps(a0[5]), b, c5);
    c6 = _mm512_fmadd_ps(_mm512_set1_ps(a1[0]), b, c6);
    c7 = _mm512_fmadd_ps(_mm512_set1_ps(a1[1]), b, c7);
    c8 = _mm512_fmadd_ps(_mm512_set1_ps(a1[2]), b, c8);
    c9 = _mm512_fmadd_ps(_mm512_set1_ps(a1[3]), b, c9);
    c10 = _mm512_fmadd_ps(_mm512_set1_ps(a1[4]), b, c10);
    c11 = _mm512_fmadd_ps(_mm512_set1_ps(a1[5]), b, c11);
  }
  const __m512 rows[2 * kPanelRows] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  for (int m = 0; m < 2 * kPanelRows; ++m) _mm512_storeu_ps(c + m * ldc, rows[m]);
}

namespace {

// The pair (a[0], a[1]) as one int32 in every lane: vpbroadcastd from memory.
PE_INLINE __m512i broadcast_pair(const int16_t* a) {
  int32_t pair;
  __builtin_memcpy(&pair, a, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

}  // namespace

void i16_panel_kernel_scaled_pair_avx512(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs,
                                         const float* row_scale, const float* col_scale, const float* bias,
                                         float* out, int64_t ldo) {
  static_assert(kPanelRows == 6 && kPanelCols == 16, "two 6-row tiles x one zmm of weight pairs per pair of k");
  const int16_t* a0 = a_pack;
  const int16_t* a1 = a_pack + 2 * kPanelRows * pairs;
  // vpdpwssd multiplies the int16 pairs and adds both products into the int32 lane in one
  // instruction (AVX2 needs vpmaddwd + vpaddd). Same int32 sums as the AVX2 kernel: exact, as the
  // caller has checked they fit.
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512i c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t p = 0; p < pairs; ++p, a0 += 2 * kPanelRows, a1 += 2 * kPanelRows, b_pack += 2 * kPanelCols) {
    const __m512i b = _mm512_load_si512(b_pack);
    c0 = _mm512_dpwssd_epi32(c0, broadcast_pair(a0 + 0), b);
    c1 = _mm512_dpwssd_epi32(c1, broadcast_pair(a0 + 2), b);
    c2 = _mm512_dpwssd_epi32(c2, broadcast_pair(a0 + 4), b);
    c3 = _mm512_dpwssd_epi32(c3, broadcast_pair(a0 + 6), b);
    c4 = _mm512_dpwssd_epi32(c4, broadcast_pair(a0 + 8), b);
    c5 = _mm512_dpwssd_epi32(c5, broadcast_pair(a0 + 10), b);
    c6 = _mm512_dpwssd_epi32(c6, broadcast_pair(a1 + 0), b);
    c7 = _mm512_dpwssd_epi32(c7, broadcast_pair(a1 + 2), b);
    c8 = _mm512_dpwssd_epi32(c8, broadcast_pair(a1 + 4), b);
    c9 = _mm512_dpwssd_epi32(c9, broadcast_pair(a1 + 6), b);
    c10 = _mm512_dpwssd_epi32(c10, broadcast_pair(a1 + 8), b);
    c11 = _mm512_dpwssd_epi32(c11, broadcast_pair(a1 + 10), b);
  }
  const __m512i rows[2 * kPanelRows] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  const __m512 ws = _mm512_loadu_ps(col_scale);
  for (int m = 0; m < 2 * kPanelRows; ++m) {
    // The AVX2 kernel's epilogue, 16 columns at once: float(sum) * (row_scale * col_scale) (+ bias).
    // (The zero-masked convert for the GCC 12 warning noted at hsum_epi32; the same instruction.)
    __m512 v = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, rows[m]), _mm512_mul_ps(_mm512_set1_ps(row_scale[m]), ws));
    if (bias != nullptr) {
      __asm__("" : "+v"(v));  // keeps GCC from fusing the multiply and the add into an FMA
      v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    }
    _mm512_storeu_ps(out + m * ldo, v);
  }
}

namespace {

// ---- int16 activations x int8 weights -> exact int64 sums (W8A16 decode GEMV) ----
//
// The AVX2 kernel's design (int8_matmul_avx2.cpp: i16i8_rows, i16i8_rows_two_streams), with zmm and
// VNNI. Per 32 weights: one vpmovsxbw zmm (32 bytes -> 32 int16, the load folded in), then per
// activation row one vpdpwssd (its 32 int16 as the memory operand), which multiplies the int16
// pairs and adds both products into the int32 lane. AVX2 spends, on the same 32 weights, two
// vpmovsxbw and per activation row two vpmaddwd + two vpaddd.
// A vpdpwssd adds at most 2 * 32767 * 128 = 8388352 to a lane (|x| <= 32767, |w| <= 128); every
// kI16Block values of k put 4096 / 32 = 128 of them in a lane (as many as the AVX2 kernel's 2048 / 16),
// at most 1.07e9 < 2^31, and then the int32 lanes are added, in int64, to the totals and restart from 0.
constexpr int64_t kI16Block = 4096;
constexpr int kI16PrefetchRows = 2;  // as the AVX2 kernel: the row two rows further down the stream

// acc += the pair products of w and the 32 int16 at x (unaligned), one vpdpwssd with x as its memory
// operand. Written as asm because with the intrinsic GCC 12 copied every accumulator into another
// register and back on each iteration of the loops below (in objdump; not so where the loop's sums
// are only stored after it, as in the panel kernel above).
PE_INLINE __m512i dpwssd(__m512i acc, __m512i w, const int16_t* x) {
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const __m512i_u*>(x)));
  return acc;
}

// acc[m] += 32 products of activation row m and the weight row, starting at a / b.
template <int MR>
PE_INLINE void i16i8_step(const int16_t* a, int64_t lda, const int8_t* b, __m512i (&acc)[MR]) {
  const __m512i bw = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  for (int m = 0; m < MR; ++m) acc[m] = dpwssd(acc[m], bw, a + m * lda);
}

// The same for the first n < 32 values only: masked loads neither read nor fault past them, and give
// 0 in the lanes masked off.
template <int MR>
PE_INLINE void i16i8_tail(const int16_t* a, int64_t lda, const int8_t* b, int64_t n, __m512i (&acc)[MR]) {
  const __mmask32 mask = (__mmask32{1} << n) - 1;
  const __m512i bw = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b));
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_dpwssd_epi32(acc[m], _mm512_maskz_loadu_epi16(mask, a + m * lda), bw);
}

// acc[m] += activation row m x weight row br over k in [k0, k1).
template <int MR>
PE_INLINE void i16i8_row(const int16_t* a, int64_t lda, const int8_t* br, int64_t ldb, int64_t k0, int64_t k1,
                         __m512i (&acc)[MR]) {
  // A cache line's two halves go to separate accumulators: vpdpwssd has a 5-cycle latency, so one
  // chain per activation row would cap a single row at 32 weights per 5 cycles (vpaddd: 1 cycle).
  // The two add up to the same exact sum, under the same bound.
  __m512i even[MR], odd[MR];
  for (int m = 0; m < MR; ++m) even[m] = odd[m] = _mm512_setzero_si512();
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64) {  // one cache line of the weight row
    _mm_prefetch(reinterpret_cast<const char*>(br + kI16PrefetchRows * ldb + k), _MM_HINT_T0);
    i16i8_step<MR>(a + k, lda, br + k, even);
    i16i8_step<MR>(a + k + 32, lda, br + k + 32, odd);
  }
  if (k + 32 <= k1) i16i8_step<MR>(a + k, lda, br + k, even), k += 32;
  if (k < k1) i16i8_tail<MR>(a + k, lda, br + k, k1 - k, odd);  // only in the last block
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_add_epi32(acc[m], _mm512_add_epi32(even[m], odd[m]));
}

// The 16 int32 lanes of v as 8 int64 lanes (lane i + lane i + 8): exact. (Zero-masked forms for the
// GCC 12 warning noted at hsum_epi32; the same instructions.)
PE_INLINE __m512i widen_epi32_pairs(__m512i v) {
  return _mm512_add_epi64(_mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xFF, v, 0)),
                          _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xFF, v, 1)));
}

// The totals of four rows' 8 int64 lanes, as [sum(s0), sum(s1), sum(s2), sum(s3)].
PE_INLINE __m256i reduce4_epi64(__m512i z0, __m512i z1, __m512i z2, __m512i z3) {
  const auto fold = [](__m512i z) {
    return _mm256_add_epi64(_mm512_maskz_extracti64x4_epi64(0xFF, z, 0), _mm512_maskz_extracti64x4_epi64(0xFF, z, 1));
  };
  const __m256i s0 = fold(z0), s1 = fold(z1), s2 = fold(z2), s3 = fold(z3);
  const __m256i s01 = _mm256_add_epi64(_mm256_unpacklo_epi64(s0, s1), _mm256_unpackhi_epi64(s0, s1));
  const __m256i s23 = _mm256_add_epi64(_mm256_unpacklo_epi64(s2, s3), _mm256_unpackhi_epi64(s2, s3));
  return _mm256_add_epi64(_mm256_permute2x128_si256(s01, s23, 0x20), _mm256_permute2x128_si256(s01, s23, 0x31));
}

// c[m * ldc + r] = exact sum over K of activation row m (of MR) times weight row r, for the `rows`
// (1..4) weight rows at b, read one after another (one sequential stream), as i16i8_rows (AVX2).
template <int MR>
void i16i8_rows(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c, int64_t ldc, int rows,
                int64_t K) {
  __m512i lanes[4][MR];  // per weight row r and activation row m: 8 int64 lanes of the sum
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) lanes[r][m] = _mm512_setzero_si512();
  for (int r = 0; r < rows; ++r) {
    for (int64_t k0 = 0; k0 < K; k0 += kI16Block) {
      const int64_t k1 = std::min(K, k0 + kI16Block);
      __m512i acc[MR];
      for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
      i16i8_row<MR>(a, lda, b + r * ldb, ldb, k0, k1, acc);
      for (int m = 0; m < MR; ++m) lanes[r][m] = _mm512_add_epi64(lanes[r][m], widen_epi32_pairs(acc[m]));
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) int64_t totals[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals),
                       reduce4_epi64(lanes[0][m], lanes[1][m], lanes[2][m], lanes[3][m]));
    for (int r = 0; r < rows; ++r) c[m * ldc + r] = totals[r];
  }
}

// Decode at batch 1 and 2: two sequential streams per call, as i16i8_rows_two_streams (AVX2, where
// the measurements are): rows b0, b0 + ldb (stream 0) each in lockstep, a cache line at a time, with
// rows1 (0..2) rows at b1, b1 + ldb (stream 1) -> c0[0..2), c1[0..rows1) of each activation row m.
template <int MR>
void i16i8_rows_two_streams(const int16_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t ldb,
                            int64_t* c0, int64_t* c1, int64_t ldc, int rows1, int64_t K) {
  __m512i lanes[4][MR];  // rows of stream 0 at [0, 2), of stream 1 at [2, 4)
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) lanes[r][m] = _mm512_setzero_si512();
  for (int r = 0; r < 2; ++r) {
    const int8_t* row0 = b0 + r * ldb;
    const int8_t* row1 = b1 + r * ldb;
    for (int64_t k0 = 0; k0 < K; k0 += kI16Block) {
      const int64_t k1 = std::min(K, k0 + kI16Block);
      __m512i acc0[MR], acc1[MR];
      for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_si512();
      int64_t k = k0;
      if (r < rows1) {
        // Each stream's cache line in two halves on separate accumulators, as in i16i8_row: four
        // vpdpwssd chains, so that at one activation row their latency does not set the pace.
        __m512i even0[MR], odd0[MR], even1[MR], odd1[MR];
        for (int m = 0; m < MR; ++m) even0[m] = odd0[m] = even1[m] = odd1[m] = _mm512_setzero_si512();
        for (; k + 64 <= k1; k += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(row0 + kI16PrefetchRows * ldb + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row1 + kI16PrefetchRows * ldb + k), _MM_HINT_T0);
          // (In this order: stream 1's first half before stream 0's second, GCC 12 kept one of the
          // two-row accumulators in another register and copied it there and back every iteration.)
          i16i8_step<MR>(a + k, lda, row0 + k, even0);
          i16i8_step<MR>(a + k + 32, lda, row0 + k + 32, odd0);
          i16i8_step<MR>(a + k, lda, row1 + k, even1);
          i16i8_step<MR>(a + k + 32, lda, row1 + k + 32, odd1);
        }
        for (int m = 0; m < MR; ++m) {
          acc0[m] = _mm512_add_epi32(even0[m], odd0[m]);
          acc1[m] = _mm512_add_epi32(even1[m], odd1[m]);
        }
        i16i8_row<MR>(a, lda, row1, ldb, k, k1, acc1);
      }
      i16i8_row<MR>(a, lda, row0, ldb, k, k1, acc0);
      for (int m = 0; m < MR; ++m) {
        lanes[r][m] = _mm512_add_epi64(lanes[r][m], widen_epi32_pairs(acc0[m]));
        lanes[2 + r][m] = _mm512_add_epi64(lanes[2 + r][m], widen_epi32_pairs(acc1[m]));
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) int64_t totals[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals),
                       reduce4_epi64(lanes[0][m], lanes[1][m], lanes[2][m], lanes[3][m]));
    for (int r = 0; r < 2; ++r) c0[m * ldc + r] = totals[r];
    for (int r = 0; r < rows1; ++r) c1[m * ldc + r] = totals[2 + r];
  }
}

}  // namespace

void i16i8_dot_block_avx512(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c, int64_t ldc,
                            int64_t M, int64_t N, int64_t K) {
  // The AVX2 kernel's plan (row_blocks.h): two streams at 1-2 activation rows, else row groups.
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

void i8_dot_block_avx512(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc,
                         int64_t M, int64_t N, int64_t K) {
  // 4 x 4 tiles: 16 accumulators + 4 row sums + 4 b vectors + a few constants < 32 zmm registers.
  static constexpr I8TileFn table[4][4] = {
      {i8_tile<1, 1>, i8_tile<1, 2>, i8_tile<1, 3>, i8_tile<1, 4>},
      {i8_tile<2, 1>, i8_tile<2, 2>, i8_tile<2, 3>, i8_tile<2, 4>},
      {i8_tile<3, 1>, i8_tile<3, 2>, i8_tile<3, 3>, i8_tile<3, 4>},
      {i8_tile<4, 1>, i8_tile<4, 2>, i8_tile<4, 3>, i8_tile<4, 4>},
  };
  for (int64_t m = 0; m < M; m += 4) {
    const int mr = static_cast<int>(std::min<int64_t>(4, M - m));
    for (int64_t n = 0; n < N; n += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, N - n));
      table[mr - 1][nr - 1](a + m * lda, lda, b + n * ldb, ldb, c + m * ldc + n, ldc, K);
    }
  }
}

// ---- W8A16 decode at several activation rows: weight panels x broadcast activation pairs ----
//
// i16i8_dot_block_avx512 above keeps one accumulator per (activation row, weight row) and sums its
// lanes at the end; at 16 activation rows that costs a vpmovsxbw per 4 vpdpwssd, an activation load
// per vpdpwssd and the horizontal sums. Here, as in the prefill kernels, the accumulator of
// activation row m holds the sums of 16 weight rows (one per int32 lane): 16 weight rows are
// transposed in registers into int8 pairs [pair][row][2] (the "panel", L1-resident), and each pair of
// k costs one vpmovsxbw and one vpdpwssd per activation row with the activation pair broadcast from
// memory. No horizontal sums, and the scale epilogue is vectorized in the same pass.
namespace {

static_assert(kI16PanelBlockPairs == 32, "one 64-byte load per weight row per transpose");

// panel[slot * 32 + 2 * c + i] = w[c * ldw + 2 * j + i] for the 32 pairs j of the block (c < 16, i < 2),
// pair j at slot i16_panel_slot(j), with `bytes` (<= 64) valid bytes in each row and zeros past them and
// for rows c >= cols.
PE_INLINE void transpose_pairs_16x32(const int8_t* w, int64_t ldw, int64_t cols, __mmask64 bytes, int8_t* panel) {
  __m512i r[16], t[16];
  for (int c = 0; c < 16; ++c) r[c] = c < cols ? _mm512_maskz_loadu_epi8(bytes, w + c * ldw) : _mm512_setzero_si512();
  // A pair is a 16-bit unit: the classic 16-bit transpose, within 128-bit lanes first. After the
  // three unpack levels, t[8 * o + jj] lane L holds rows 8o .. 8o + 7 of the pair j = 8L + jj. (The
  // zero-masked unpacks for the GCC 12 warning noted at hsum_epi32; the same instructions.)
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // r[4q + g] lane L: rows 4q .. 4q + 3 of pairs 8L + 2g, 8L + 2g + 1
    r[4 * q + 0] = _mm512_maskz_unpacklo_epi32(0xFFFF, t[4 * q], t[4 * q + 2]);
    r[4 * q + 1] = _mm512_maskz_unpackhi_epi32(0xFFFF, t[4 * q], t[4 * q + 2]);
    r[4 * q + 2] = _mm512_maskz_unpacklo_epi32(0xFFFF, t[4 * q + 1], t[4 * q + 3]);
    r[4 * q + 3] = _mm512_maskz_unpackhi_epi32(0xFFFF, t[4 * q + 1], t[4 * q + 3]);
  }
  for (int o = 0; o < 2; ++o) {
    for (int g = 0; g < 4; ++g) {
      t[8 * o + 2 * g] = _mm512_maskz_unpacklo_epi64(0xFF, r[8 * o + g], r[8 * o + 4 + g]);
      t[8 * o + 2 * g + 1] = _mm512_maskz_unpackhi_epi64(0xFF, r[8 * o + g], r[8 * o + 4 + g]);
    }
  }
  // Rows 0-7 and 8-15 of a pair side by side, two pairs per zmm: [A0 B0 A1 B1] holds pairs jj and
  // 8 + jj, [A2 B2 A3 B3] pairs 16 + jj and 24 + jj; stored whole, at slots 4jj .. 4jj + 3 (the
  // activation pairs are laid out in the same slot order, so no further shuffles are needed).
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int jj = 0; jj < 8; ++jj) {
    _mm512_store_si512(panel + jj * 128, _mm512_permutex2var_epi64(t[jj], first, t[8 + jj]));
    _mm512_store_si512(panel + jj * 128 + 64, _mm512_permutex2var_epi64(t[jj], second, t[8 + jj]));
  }
}

// acc += w * the pair at x broadcast to every lane: one vpdpwssd with an embedded-broadcast operand.
// (asm for the reason given at dpwssd above.)
PE_INLINE __m512i dpwssd_broadcast(__m512i acc, __m512i w, const int32_t* x) {
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

// Exact int64 sums of MR activation rows x the panel's 16 weight rows: totals[m][c] (c < 16).
// x_pairs: [slots][ldx] int32, the activation pair of row m at slot s at x_pairs[s * ldx + m].
// The int32 lanes go into int64 every kI16PanelChunkPairs pairs, before they can overflow (the bound
// of the prefill kernels: 256 * 2 * 32767 * 128 < 2^31).
template <int MR>
void panel_rows(const int32_t* x_pairs, int64_t ldx, const int8_t* panel, int64_t pairs, int64_t (*totals)[16]) {
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_si512(totals[m], _mm512_setzero_si512());
    _mm512_storeu_si512(totals[m] + 8, _mm512_setzero_si512());
  }
  for (int64_t p0 = 0; p0 < pairs; p0 += kI16PanelChunkPairs) {
    const int64_t p1 = std::min(pairs, p0 + kI16PanelChunkPairs);
    __m512i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t p = p0; p < p1; ++p) {
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(panel + p * 32)));
      const int32_t* x = x_pairs + p * ldx;
      for (int m = 0; m < MR; ++m) acc[m] = dpwssd_broadcast(acc[m], w, x + m);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i lo = _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xFF, acc[m], 0));
      const __m512i hi = _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xFF, acc[m], 1));
      _mm512_storeu_si512(totals[m], _mm512_add_epi64(_mm512_loadu_si512(totals[m]), lo));
      _mm512_storeu_si512(totals[m] + 8, _mm512_add_epi64(_mm512_loadu_si512(totals[m] + 8), hi));
    }
  }
}

using PanelRowsFn = void (*)(const int32_t*, int64_t, const int8_t*, int64_t, int64_t (*)[16]);

template <int... MR>
constexpr std::array<PanelRowsFn, sizeof...(MR)> panel_rows_table(std::integer_sequence<int, MR...>) {
  return {panel_rows<MR + 1>...};
}

}  // namespace

void i16i8_linear_panels_avx512(const int32_t* x_pairs, int64_t M, const float* x_scale, const int8_t* w,
                                const float* w_scale, const float* bias, float* out, int64_t ldo, int64_t N,
                                int64_t K, int8_t* panel) {
  static constexpr auto kPanelRowsFns = panel_rows_table(std::make_integer_sequence<int, kI16PanelMaxRows>{});
  const int64_t padded_pairs = i16_panel_padded_pairs(K);
  alignas(64) int64_t totals[kI16PanelMaxRows][16];
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t cols = std::min<int64_t>(16, N - n0);
    const int8_t* rows = w + n0 * K;
    for (int64_t p = 0; p < padded_pairs; p += kI16PanelBlockPairs) {
      const int64_t left = K - 2 * p;  // bytes of each row from 2p on; <= 0 past K
      const __mmask64 bytes = left >= 64 ? ~__mmask64{0} : left > 0 ? (__mmask64{1} << left) - 1 : 0;
      transpose_pairs_16x32(rows + 2 * p, K, cols, bytes, panel + p * 32);
      // The next panel's 16 rows stream in while this one is multiplied: sixteen row streams at
      // once are more than the hardware prefetcher follows (a prefetch never faults, even past w).
      for (int c = 0; c < 16; ++c) _mm_prefetch(reinterpret_cast<const char*>(rows + (16 + c) * K + 2 * p), _MM_HINT_T0);
    }
    const __mmask16 lanes = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(lanes, w_scale + n0);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += kI16PanelMaxRows) {
      const int64_t mr = std::min<int64_t>(kI16PanelMaxRows, M - m0);
      kPanelRowsFns[mr - 1](x_pairs + m0, M, panel, padded_pairs, totals);
      for (int64_t m = 0; m < mr; ++m) {
        // scale_tile's operations, 16 columns at once: float(sum) * (x_scale * w_scale) (+ bias), the
        // int64 -> float conversion rounding to nearest as the scalar cast does.
        const __m256 lo = _mm512_cvtepi64_ps(_mm512_load_si512(totals[m]));
        const __m256 hi = _mm512_cvtepi64_ps(_mm512_load_si512(totals[m] + 8));
        const __m512 sums = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
        __m512 v = _mm512_mul_ps(sums, _mm512_mul_ps(_mm512_set1_ps(x_scale[m0 + m]), ws));
        if (bias != nullptr) {
          __asm__("" : "+v"(v));  // keeps GCC from fusing the multiply and the add into an FMA
          v = _mm512_add_ps(v, b);
        }
        _mm512_mask_storeu_ps(out + (m0 + m) * ldo + n0, lanes, v);
      }
    }
  }
}

}  // namespace pyengine::cpu
