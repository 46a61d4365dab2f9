// int8 / fp32 Linear drivers: cache tiling, OpenMP over tiles, epilogues (scales, bias), and the
// scalar reference blocks. The per-ISA register-blocked kernels are in int8_matmul_{avx2,avx512}.cpp.
#include "pyengine/int8_matmul.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/int8_matmul_isa.h"
#include "pyengine/cpu_features.h"
#include "pyengine/quantize.h"

namespace pyengine {
namespace cpu {

void i8_dot_block_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      uint32_t acc = 0;  // unsigned: wraps mod 2^32 like the int32 reference, without UB
      for (int64_t k = 0; k < K; ++k) {
        acc += static_cast<uint32_t>(int32_t{a[m * lda + k]} * int32_t{b[n * ldb + k]});
      }
      c[m * ldc + n] = static_cast<int32_t>(acc);
    }
  }
}

void f32i8_dot_block_scalar(const float* a, int64_t lda, const int8_t* b, int64_t ldb, float* c,
                            int64_t ldc, int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += a[m * lda + k] * static_cast<float>(b[n * ldb + k]);
      c[m * ldc + n] = acc;
    }
  }
}

void f32_dot_block_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                          int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += a[m * lda + k] * b[n * ldb + k];
      c[m * ldc + n] = acc;
    }
  }
}

void i16i8_dot_block_scalar(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c,
                            int64_t ldc, int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;  // |sum| <= K * 32767 * 127: no overflow for any K below 2^40
      for (int64_t k = 0; k < K; ++k) acc += int64_t{a[m * lda + k]} * int64_t{b[n * ldb + k]};
      c[m * ldc + n] = acc;
    }
  }
}

// As quantize_row_scalar with 32767 levels: a true division, so it equals torch's round(x / scale).
void quantize_row_i16_scalar(const float* x, int16_t* q, float* scale, int64_t cols) {
  float amax = 0.0f;
  for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 32767.0f;
  *scale = s;
  if (s == 0.0f) {
    std::fill(q, q + cols, int16_t{0});
    return;
  }
  for (int64_t i = 0; i < cols; ++i) {
    const float r = std::nearbyint(x[i] / s);  // default rounding mode: half to even
    q[i] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, r)));
  }
}

}  // namespace cpu

namespace {

// Up to this many tokens the weight is streamed once, each thread taking one contiguous slice of
// the N rows (decode). Above it: tiles of kTokensPerTile tokens x ~kWeightTileBytes of weight, so a
// weight tile stays in L2 while many tokens use it (prefill).
constexpr int64_t kSmallM = 16;
constexpr int64_t kTokensPerTile = 64;
constexpr int64_t kWeightTileBytes = 96 * 1024;
// Below this many multiply-adds a fork/join costs more than it saves.
constexpr int64_t kParallelMinMacs = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Calls tile(m0, m1, n0, n1) on a grid covering [0, M) x [0, N).
template <class TileFn>
void for_each_tile(int64_t M, int64_t N, int64_t K, int64_t weight_elem_bytes, const TileFn& tile) {
  const int threads = omp_get_max_threads();
  const bool parallel = threads > 1 && M * N * K >= kParallelMinMacs;
  int64_t mb, nb;
  if (M <= kSmallM) {
    mb = M;
    nb = parallel ? std::min(N, round_up(ceil_div(N, threads), 16)) : N;
  } else {
    mb = kTokensPerTile;
    nb = std::clamp<int64_t>(kWeightTileBytes / (K * weight_elem_bytes) / 16 * 16, 16, 512);
  }
  const int64_t m_tiles = ceil_div(M, mb), tiles = m_tiles * ceil_div(N, nb);
  // Consecutive tiles share a weight tile (m varies fastest).
#pragma omp parallel for schedule(dynamic, 1) if (parallel && tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = (t % m_tiles) * mb, n0 = (t / m_tiles) * nb;
    tile(m0, std::min(M, m0 + mb), n0, std::min(N, n0 + nb));
  }
}

cpu::I8DotBlockFn i8_block() {
  switch (active_isa()) {
    case Isa::Avx512: return cpu::i8_dot_block_avx512;
    case Isa::Avx2: return cpu::i8_dot_block_avx2;
    default: return cpu::i8_dot_block_scalar;
  }
}

cpu::F32I8DotBlockFn f32i8_block() {
  return active_isa() >= Isa::Avx2 ? cpu::f32i8_dot_block_avx2 : cpu::f32i8_dot_block_scalar;
}

cpu::I16I8DotBlockFn i16i8_block() {
  return active_isa() >= Isa::Avx2 ? cpu::i16i8_dot_block_avx2 : cpu::i16i8_dot_block_scalar;
}

cpu::F32DotBlockFn f32_block() {
  return active_isa() >= Isa::Avx2 ? cpu::f32_dot_block_avx2 : cpu::f32_dot_block_scalar;
}

// Epilogue of the integer Linears: out[m, n] = float(acc[m, n]) * (x_scale[m] * w_scale[n]) (+ bias[n]).
// The same fp32 operations, in the same order, as the torch references (this file has no FMA).
template <class Acc>
void scale_tile(const Acc* acc, int64_t tm, int64_t tn, const float* x_scale, const float* w_scale,
                const float* bias, float* out, int64_t ldo) {
  for (int64_t m = 0; m < tm; ++m) {
    float* o = out + m * ldo;
    const Acc* c = acc + m * tn;
    const float sx = x_scale[m];
    if (bias != nullptr) {
      for (int64_t n = 0; n < tn; ++n) o[n] = static_cast<float>(c[n]) * (sx * w_scale[n]) + bias[n];
    } else {
      for (int64_t n = 0; n < tn; ++n) o[n] = static_cast<float>(c[n]) * (sx * w_scale[n]);
    }
  }
}

}  // namespace

void int8_matmul_i32(const int8_t* a, const int8_t* b, int32_t* out_i32, int64_t M, int64_t N, int64_t K) {
  const cpu::I8DotBlockFn block = i8_block();
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    block(a + m0 * K, K, b + n0 * K, K, out_i32 + m0 * N + n0, N, m1 - m0, n1 - n0, K);
  });
}

void int8_linear(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                 int64_t M, int64_t N, int64_t K) {
  // Reused across calls: decode calls this hundreds of times per token.
  thread_local std::vector<int8_t> x_q;
  thread_local std::vector<float> x_scale;
  x_q.resize(M * K);
  x_scale.resize(M);
  quantize_rows(x, x_q.data(), x_scale.data(), M, K);
  const int8_t* xq = x_q.data();
  const float* xs = x_scale.data();
  const cpu::I8DotBlockFn block = i8_block();
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    thread_local std::vector<int32_t> acc;  // per OpenMP thread
    const int64_t tm = m1 - m0, tn = n1 - n0;
    acc.resize(tm * tn);
    block(xq + m0 * K, K, w_q + n0 * K, K, acc.data(), tn, tm, tn, K);
    scale_tile(acc.data(), tm, tn, xs + m0, w_scale + n0, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
  });
}

void int8_linear_wo(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                    int64_t M, int64_t N, int64_t K) {
  const cpu::F32I8DotBlockFn block = f32i8_block();
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    block(x + m0 * K, K, w_q + n0 * K, K, out + m0 * N + n0, N, m1 - m0, n1 - n0, K);
    for (int64_t m = m0; m < m1; ++m) {
      float* o = out + m * N;
      if (bias != nullptr) {
        for (int64_t n = n0; n < n1; ++n) o[n] = o[n] * w_scale[n] + bias[n];
      } else {
        for (int64_t n = n0; n < n1; ++n) o[n] *= w_scale[n];
      }
    }
  });
}

void int8_linear_a16(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                     int64_t M, int64_t N, int64_t K) {
  thread_local std::vector<int16_t> x_q;  // reused: decode calls this hundreds of times per token
  thread_local std::vector<float> x_scale;
  x_q.resize(M * K);
  x_scale.resize(M);
  const auto quantize_row = active_isa() >= Isa::Avx2 ? cpu::quantize_row_i16_avx2 : cpu::quantize_row_i16_scalar;
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, x_q.data() + m * K, x_scale.data() + m, K);
  const int16_t* xq = x_q.data();
  const float* xs = x_scale.data();
  const cpu::I16I8DotBlockFn block = i16i8_block();
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    thread_local std::vector<int64_t> acc;  // per OpenMP thread
    const int64_t tm = m1 - m0, tn = n1 - n0;
    acc.resize(tm * tn);
    block(xq + m0 * K, K, w_q + n0 * K, K, acc.data(), tn, tm, tn, K);
    scale_tile(acc.data(), tm, tn, xs + m0, w_scale + n0, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
  });
}

void linear_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  const cpu::F32DotBlockFn block = f32_block();
  for_each_tile(M, N, K, 4, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    block(x + m0 * K, K, w + n0 * K, K, out + m0 * N + n0, N, m1 - m0, n1 - n0, K);
    if (bias != nullptr) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t n = n0; n < n1; ++n) out[m * N + n] += bias[n];
      }
    }
  });
}

void int8_linear_weights(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K) {
  if (M <= kInt8A16MaxRows) {
    int8_linear_a16(x, w_q, w_scale, bias, out, M, N, K);
  } else {
    int8_linear_wo(x, w_q, w_scale, bias, out, M, N, K);
  }
}

}  // namespace pyengine
