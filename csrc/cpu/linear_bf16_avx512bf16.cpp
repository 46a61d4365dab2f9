// AVX-512 BF16 GEMV: vdpbf16ps multiplies pairs of bf16 and adds both products to an fp32 lane. The
// weights go in as stored; each activation is split into three bf16 parts (hi + mid + lo holds all 24
// bits of an fp32), so every weight meets its activation's full value, at three vdpbf16ps per 32 weights.
#include <immintrin.h>

// GCC 12's AVX-512 reductions and casts start from _mm256_undefined_*(), which it then reports as
// used uninitialized (a false warning in its own headers).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <vector>

#include "cpu/linear_bf16_isa.h"

namespace pyengine::cpu {
namespace {

constexpr int kParts = 3;

// The activations' parts, [M][kParts][Kp] bf16, zero-padded to Kp (a multiple of 32).
void split_activations(const float* x, int64_t M, int64_t K, int64_t Kp, std::vector<uint16_t>& parts) {
  parts.assign(static_cast<size_t>(M * kParts * Kp), 0);
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = parts.data() + m * kParts * Kp;
    int64_t k = 0;
    for (; k < K; k += 16) {
      const __mmask16 live = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 rest = _mm512_maskz_loadu_ps(live, x + m * K + k);
      for (int p = 0; p < kParts; ++p) {
        const __m256bh part = _mm512_cvtneps_pbh(rest);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + p * Kp + k), reinterpret_cast<const __m256i&>(part));
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            reinterpret_cast<const __m256i&>(part)), 16));
        rest = _mm512_sub_ps(rest, back);  // exact: what the part did not hold
      }
    }
  }
}

template <int R, int M>
void rows_kernel(const uint16_t* xp, int64_t Kp, int64_t K, const uint16_t* w, const float* bias, float* out,
                 int64_t N, int64_t n) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 live = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      const __m512i raw = _mm512_maskz_loadu_epi16(live, w + (n + r) * K + k);
      wv[r] = reinterpret_cast<const __m512bh&>(raw);
    }
    for (int m = 0; m < M; ++m) {
      for (int p = 0; p < kParts; ++p) {
        const __m512i raw = _mm512_loadu_si512(xp + (m * kParts + p) * Kp + k);
        const __m512bh xv = reinterpret_cast<const __m512bh&>(raw);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias == nullptr ? 0.0f : bias[n + r]);
    }
  }
}

template <int M>
void gemv_m(const uint16_t* xp, int64_t Kp, int64_t K, const uint16_t* w, const float* bias, float* out, int64_t N,
            int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) rows_kernel<2, M>(xp, Kp, K, w, bias, out, N, n);
  if (n < n1) rows_kernel<1, M>(xp, Kp, K, w, bias, out, N, n);
}

}  // namespace

void bf16_gemv_avx512bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                          int64_t N, int64_t n0, int64_t n1) {
  thread_local std::vector<uint16_t> parts;
  const int64_t Kp = (K + 31) / 32 * 32;
  split_activations(x, M, K, Kp, parts);
  switch (M) {
    case 1: return gemv_m<1>(parts.data(), Kp, K, w, bias, out, N, n0, n1);
    case 2: return gemv_m<2>(parts.data(), Kp, K, w, bias, out, N, n0, n1);
    case 3: return gemv_m<3>(parts.data(), Kp, K, w, bias, out, N, n0, n1);
    default: return gemv_m<4>(parts.data(), Kp, K, w, bias, out, N, n0, n1);
  }
}

}  // namespace pyengine::cpu
