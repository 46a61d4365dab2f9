// int8 / fp32 Linear drivers: cache tiling, OpenMP over tiles, epilogues (scales, bias), and the
// scalar reference blocks. The per-ISA register-blocked kernels are in int8_matmul_{avx2,avx512}.cpp.
#include "pyengine/int8_matmul.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

void panel_kernel_scalar(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc) {
  float acc[kPanelRows][kPanelCols] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int m = 0; m < kPanelRows; ++m) {
      for (int n = 0; n < kPanelCols; ++n) acc[m][n] += a_pack[k * kPanelRows + m] * b_pack[k * kPanelCols + n];
    }
  }
  for (int m = 0; m < kPanelRows; ++m) std::copy(acc[m], acc[m] + kPanelCols, c + m * ldc);
}

namespace {

// The scalar packing loop of pack_panel_{i8,f32}_scalar; element(c, k) is weight row c at k.
template <class Element>
void pack_panel_scalar(int64_t cols, int64_t K, float* panel, const Element& element) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < kPanelCols; ++c) panel[k * kPanelCols + c] = c < cols ? element(c, k) : 0.0f;
  }
}

}  // namespace

void pack_panel_i8_scalar(const int8_t* w, int64_t ldw, const float* row_scale, int64_t cols, int64_t K, float* panel) {
  pack_panel_scalar(cols, K, panel, [&](int64_t c, int64_t k) { return static_cast<float>(w[c * ldw + k]) * row_scale[c]; });
}

void pack_panel_f32_scalar(const float* w, int64_t ldw, int64_t cols, int64_t K, float* panel) {
  pack_panel_scalar(cols, K, panel, [&](int64_t c, int64_t k) { return w[c * ldw + k]; });
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

// Two consecutive packed tiles through a one-tile kernel, as panel_kernel_pair_avx512 does in one pass.
template <cpu::PanelKernelFn kernel>
void panel_kernel_pair(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc) {
  kernel(a_pack, b_pack, K, c, ldc);
  kernel(a_pack + cpu::kPanelRows * K, b_pack, K, c + cpu::kPanelRows * ldc, ldc);
}

// Rows of packed activations kept per pass over the weight panels: up to ~2 MB of them, so a long
// prompt's block stays in the last-level cache while every panel streams past it.
constexpr int64_t kPanelActivationBytes = 2 << 20;

// Prefill (M > kSmallM) Linear: out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), with W given by
// pack_panel(n0, cols, panel), which writes W[n0 .. n0 + cols) as fp32 [K][kPanelCols] (zeros past
// cols). The activations are packed once per block into tiles of kPanelRows tokens; each thread
// then takes weight panels, packs one (for int8: dequantizes it, once per block instead of once per
// token tile) and runs it against every activation tile of the block.
template <class PackPanel>
void panel_gemm(const float* x, const float* bias, float* out, int64_t M, int64_t N, int64_t K,
                const PackPanel& pack_panel) {
  constexpr int64_t R = cpu::kPanelRows, C = cpu::kPanelCols;
  const cpu::PanelKernelFn kernel = active_isa() >= Isa::Avx2 ? cpu::panel_kernel_avx2 : cpu::panel_kernel_scalar;
  const cpu::PanelKernelFn pair_kernel = active_isa() >= Isa::Avx512 ? cpu::panel_kernel_pair_avx512
                                         : active_isa() >= Isa::Avx2 ? panel_kernel_pair<cpu::panel_kernel_avx2>
                                                                     : panel_kernel_pair<cpu::panel_kernel_scalar>;
  const int64_t tiles_per_block = std::max<int64_t>(1, kPanelActivationBytes / (R * K * 4));
  const int64_t panels = ceil_div(N, C);
  thread_local std::vector<float> a_pack;  // the calling thread's; shared by the workers below
  for (int64_t m_block = 0; m_block < M; m_block += tiles_per_block * R) {
    const int64_t rows = std::min(M - m_block, tiles_per_block * R), tiles = ceil_div(rows, R);
    a_pack.resize(tiles * R * K);
    float* ap = a_pack.data();
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        float* dst = ap + t * R * K;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t m = m_block + t * R + r;
          if (m < M) {
            for (int64_t k = 0; k < K; ++k) dst[k * R + r] = x[m * K + k];
          } else {
            for (int64_t k = 0; k < K; ++k) dst[k * R + r] = 0.0f;
          }
        }
      }  // implicit barrier: the packed block is complete before any panel uses it
      thread_local std::vector<float> panel_storage;  // per worker; 64-byte aligned below
      panel_storage.resize(K * C + 16);
      float* panel = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(panel_storage.data()) + 63) & ~uintptr_t{63});
      alignas(64) float tile[2 * R * C];
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * C, cols = std::min(C, N - n0);
        pack_panel(n0, cols, panel);
        // Tiles two at a time (the last one alone when their number is odd).
        for (int64_t t = 0; t < tiles; t += 2) {
          const bool pair = t + 1 < tiles;
          const int64_t rows = pair ? 2 * R : R;
          const int64_t m0 = m_block + t * R, tm = std::min(rows, M - m0);
          const cpu::PanelKernelFn run = pair ? pair_kernel : kernel;
          float* o = out + m0 * N + n0;
          if (tm == rows && cols == C) {
            run(ap + t * R * K, panel, K, o, N);
          } else {  // a partial tile: through a scratch tile, so nothing outside out is written
            run(ap + t * R * K, panel, K, tile, C);
            for (int64_t r = 0; r < tm; ++r) std::copy(tile + r * C, tile + r * C + cols, o + r * N);
          }
          if (bias != nullptr) {
            for (int64_t r = 0; r < tm; ++r)
              for (int64_t n = 0; n < cols; ++n) o[r * N + n] += bias[n0 + n];
          }
        }
      }
    }
  }
}

cpu::I8DotBlockFn i8_block() {
  switch (active_isa()) {
    case Isa::Avx512: return cpu::i8_dot_block_avx512;
    case Isa::Avx2: return cpu::i8_dot_block_avx2;
    default: return cpu::i8_dot_block_scalar;
  }
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

// The integer Linears after activation quantization: per tile, exact sums of the quantized rows xq
// (scales xs) against w_q in Acc, then the scale_tile epilogue.
template <class Acc, class XQ, class BlockFn>
void integer_linear_tiles(BlockFn block, const XQ* xq, const float* xs, const int8_t* w_q, const float* w_scale,
                          const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    thread_local std::vector<Acc> acc;  // per OpenMP thread
    const int64_t tm = m1 - m0, tn = n1 - n0;
    acc.resize(tm * tn);
    block(xq + m0 * K, K, w_q + n0 * K, K, acc.data(), tn, tm, tn, K);
    scale_tile(acc.data(), tm, tn, xs + m0, w_scale + n0, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
  });
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
  integer_linear_tiles<int32_t>(i8_block(), x_q.data(), x_scale.data(), w_q, w_scale, bias, out, M, N, K);
}

void int8_linear_wo(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
                    int64_t M, int64_t N, int64_t K) {
  if (M > kSmallM) {
    const auto pack = active_isa() >= Isa::Avx2 ? cpu::pack_panel_i8_avx2 : cpu::pack_panel_i8_scalar;
    panel_gemm(x, bias, out, M, N, K, [&](int64_t n0, int64_t cols, float* panel) {
      pack(w_q + n0 * K, K, w_scale + n0, cols, K, panel);  // dequantized once per panel
    });
    return;
  }
  const auto block = active_isa() >= Isa::Avx2 ? cpu::f32i8_dot_block_avx2 : cpu::f32i8_dot_block_scalar;
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
  const auto block = active_isa() >= Isa::Avx2 ? cpu::i16i8_dot_block_avx2 : cpu::i16i8_dot_block_scalar;
  integer_linear_tiles<int64_t>(block, x_q.data(), x_scale.data(), w_q, w_scale, bias, out, M, N, K);
}

void linear_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  if (M > kSmallM) {
    const auto pack = active_isa() >= Isa::Avx2 ? cpu::pack_panel_f32_avx2 : cpu::pack_panel_f32_scalar;
    panel_gemm(x, bias, out, M, N, K, [&](int64_t n0, int64_t cols, float* panel) {
      pack(w + n0 * K, K, cols, K, panel);
    });
    return;
  }
  const auto block = active_isa() >= Isa::Avx2 ? cpu::f32_dot_block_avx2 : cpu::f32_dot_block_scalar;
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
