// int8 / fp32 Linear drivers: cache tiling, OpenMP over tiles, epilogues (scales, bias), and the
// scalar reference blocks. The per-ISA register-blocked kernels are in int8_matmul_{avx2,avx512}.cpp.
#include "pyengine/int8_matmul.h"
#include "pyengine/linear_f32.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/abs_max.h"
#include "cpu/dispatch.h"
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

void i16_panel_kernel_scalar(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, int64_t* c, int64_t ldc) {
  int64_t acc[kPanelRows][kPanelCols] = {};  // int64 throughout: no chunks needed
  for (int64_t p = 0; p < pairs; ++p, a_pack += 2 * kPanelRows, b_pack += 2 * kPanelCols) {
    for (int m = 0; m < kPanelRows; ++m) {
      for (int n = 0; n < kPanelCols; ++n) {
        acc[m][n] += int64_t{a_pack[2 * m]} * b_pack[2 * n] + int64_t{a_pack[2 * m + 1]} * b_pack[2 * n + 1];
      }
    }
  }
  for (int m = 0; m < kPanelRows; ++m) std::copy(acc[m], acc[m] + kPanelCols, c + m * ldc);
}

void pack_panel_i16_scalar(const int8_t* w, int64_t ldw, int64_t cols, int64_t K, int16_t* panel) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t c = 0; c < kPanelCols; ++c) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t k = 2 * p + j;
        panel[(p * kPanelCols + c) * 2 + j] = c < cols && k < K ? w[c * ldw + k] : 0;
      }
    }
  }
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
  const float s = row_scale(abs_max_scalar(x, cols), 32767.0f);
  *scale = s;
  if (!(s > 0.0f)) {
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
// From this many tokens up to kSmallM, AVX-512 decode takes the weight-panel kernel
// (i16i8_linear_panels_avx512): its in-register transpose of the weights is then shared by enough
// activation rows to beat the row-dot GEMV. Below, the GEMV: at 4 rows the panel kernel is faster on
// cached weights but slower where they stream from memory (lm_head; the whole decode step at batch 4).
constexpr int64_t kPanelDecodeMinRows = 8;
// Below this many multiply-adds a fork/join costs more than it saves.
constexpr int64_t kParallelMinMacs = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Calls tile(m0, m1, n0, n1) on a grid covering [0, M) x [0, N).
template <class TileFn>
void for_each_tile(int64_t M, int64_t N, int64_t K, int64_t weight_elem_bytes, const TileFn& tile) {
  const int threads = num_threads();
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
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic, 1) if (parallel && tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = (t % m_tiles) * mb, n0 = (t / m_tiles) * nb;
    tile(m0, std::min(M, m0 + mb), n0, std::min(N, n0 + nb));
  }
}

// Two consecutive packed tiles through a one-tile kernel, as panel_kernel_pair_avx512 does in one pass.
// A tile is kPanelRows * depth * slot elements (slot: values per row and depth step).
template <class A, class B, class Acc, void (*kernel)(const A*, const B*, int64_t, Acc*, int64_t), int64_t slot>
void panel_kernel_pair(const A* a_pack, const B* b_pack, int64_t depth, Acc* c, int64_t ldc) {
  kernel(a_pack, b_pack, depth, c, ldc);
  kernel(a_pack + slot * cpu::kPanelRows * depth, b_pack, depth, c + cpu::kPanelRows * ldc, ldc);
}

// Epilogue of the integer Linears: out[m, n] = float(acc[m, n]) * (x_scale[m] * w_scale[n]) (+ bias[n]).
// The same fp32 operations, in the same order, as the torch references (this file has no FMA).
template <class Acc>
void scale_tile(const Acc* acc, int64_t lda, int64_t tm, int64_t tn, const float* x_scale, const float* w_scale,
                const float* bias, float* out, int64_t ldo) {
  for (int64_t m = 0; m < tm; ++m) {
    float* o = out + m * ldo;
    const Acc* c = acc + m * lda;
    const float sx = x_scale[m];
    if (bias != nullptr) {
      for (int64_t n = 0; n < tn; ++n) o[n] = static_cast<float>(c[n]) * (sx * w_scale[n]) + bias[n];
    } else {
      for (int64_t n = 0; n < tn; ++n) o[n] = static_cast<float>(c[n]) * (sx * w_scale[n]);
    }
  }
}

// The two element types of the prefill GEMM below. Each says how to pack a tile of activations and
// how to multiply one or two packed tiles by a packed weight panel into the output.
//
// fp32 (linear_f32, int8_linear_wo): activations as they are, fp32 sums.
struct F32Panels {
  using Elem = float;
  static constexpr int64_t kSlot = 1;  // one k per depth step
  const float* x;
  const float* bias;
  int64_t K;
  cpu::PanelKernelFn kernel, pair_kernel;

  F32Panels(const float* x_, const float* bias_, int64_t K_) : x(x_), bias(bias_), K(K_) {
    kernel = cpu::pick_kernel<cpu::PanelKernelFn>(
        {{Isa::Avx2, cpu::panel_kernel_avx2}, {Isa::Scalar, cpu::panel_kernel_scalar}});
    pair_kernel = cpu::pick_kernel<cpu::PanelKernelFn>(
        {{Isa::Avx512, cpu::panel_kernel_pair_avx512},
         {Isa::Avx2, panel_kernel_pair<float, float, float, cpu::panel_kernel_avx2, 1>},
         {Isa::Scalar, panel_kernel_pair<float, float, float, cpu::panel_kernel_scalar, 1>}});
  }
  int64_t depth() const { return K; }
  // dst[k * kPanelRows + r] = x[m + r, k] for the tile's first `rows` rows, zeros below.
  void pack_tile(int64_t m, int64_t rows, float* dst) const {
    for (int64_t r = 0; r < cpu::kPanelRows; ++r) {
      for (int64_t k = 0; k < K; ++k) dst[k * cpu::kPanelRows + r] = r < rows ? x[(m + r) * K + k] : 0.0f;
    }
  }
  // out rows m .. m + tm, columns n0 .. n0 + cols, from `tiles` (1 or 2) packed tiles at a.
  void run(const float* a, const float* panel, int tiles, int64_t m, int64_t tm, int64_t n0, int64_t cols,
           float* out, int64_t ldo) const {
    (void)m;
    constexpr int64_t C = cpu::kPanelCols;
    // A whole tile's sums go straight into out; a partial one's through a scratch tile, so that
    // nothing outside out is written.
    alignas(64) float tile[2 * cpu::kPanelRows * C];
    const bool whole = tm == tiles * cpu::kPanelRows && cols == C;
    float* sums = whole ? out : tile;
    const int64_t lds = whole ? ldo : C;
    (tiles == 2 ? pair_kernel : kernel)(a, panel, K, sums, lds);
    for (int64_t r = 0; r < tm; ++r) {
      float* o = out + r * ldo;
      if (!whole) std::copy(sums + r * lds, sums + r * lds + cols, o);
      if (bias != nullptr) {
        for (int64_t n = 0; n < cols; ++n) o[n] += bias[n0 + n];
      }
    }
  }
};

// W8A16 (int8_linear_a16): each token quantized to int16 as it is packed, k in pairs, exact sums,
// scaled by token and weight row as the small-M path does: prefill and decode give the same bits
// for the same row. A tile whose sums cannot overflow int32 (nearly all: the bound is checked per
// row when it is packed) takes the AVX2 kernel with the epilogue fused; others sum in int64.
struct I16Panels {
  using Elem = int16_t;
  static constexpr int64_t kSlot = 2;  // a pair of k per depth step
  const float* x;
  const float* w_scale;
  const float* bias;
  float* x_scale;       // [tiles * kPanelRows], written by pack_tile (zeros on padding rows)
  uint8_t* tile_fits;   // [tiles]: does the tile's every sum fit int32? written by pack_tile
  int64_t K;
  using QuantizeRowFn = void (*)(const float*, int16_t*, float*, int64_t);
  using ScaledKernelFn = decltype(&cpu::i16_panel_kernel_scaled_avx2);
  QuantizeRowFn quantize_row;
  ScaledKernelFn scaled_kernel;       // one tile, the epilogue fused; nullptr below AVX2
  ScaledKernelFn scaled_pair_kernel;  // two tiles in one pass; nullptr below AVX-512
  cpu::I16PanelKernelFn exact_kernel;  // int64 sums, for tiles that could overflow int32

  I16Panels(const float* x_, const float* w_scale_, const float* bias_, float* x_scale_, uint8_t* tile_fits_, int64_t K_)
      : x(x_), w_scale(w_scale_), bias(bias_), x_scale(x_scale_), tile_fits(tile_fits_), K(K_) {
    quantize_row = cpu::pick_kernel<QuantizeRowFn>(
        {{Isa::Avx2, cpu::quantize_row_i16_avx2}, {Isa::Scalar, cpu::quantize_row_i16_scalar}});
    scaled_kernel = cpu::pick_kernel<ScaledKernelFn>(
        {{Isa::Avx2, cpu::i16_panel_kernel_scaled_avx2}, {Isa::Scalar, nullptr}});
    scaled_pair_kernel = cpu::pick_kernel<ScaledKernelFn>(
        {{Isa::Avx512, cpu::i16_panel_kernel_scaled_pair_avx512}, {Isa::Scalar, nullptr}});
    exact_kernel = cpu::pick_kernel<cpu::I16PanelKernelFn>(
        {{Isa::Avx2, cpu::i16_panel_kernel_avx2}, {Isa::Scalar, cpu::i16_panel_kernel_scalar}});
  }
  int64_t depth() const { return (K + 1) / 2; }
  // dst[(p * kPanelRows + r) * 2 + j] = xq[m + r, 2p + j], zeros below `rows` and past K.
  void pack_tile(int64_t m, int64_t rows, int16_t* dst) const {
    thread_local std::vector<int16_t> row;
    row.assign(2 * depth(), 0);
    bool fits = true;
    for (int64_t r = 0; r < cpu::kPanelRows; ++r) {
      if (r < rows) {
        quantize_row(x + (m + r) * K, row.data(), x_scale + m + r, K);
        int64_t l1 = 0;
        for (int64_t k = 0; k < K; ++k) l1 += row[k] < 0 ? -row[k] : row[k];
        // Every partial sum of a row is at most sum_k |xq[k]| * |w[k]| <= 128 * l1.
        fits = fits && 128 * l1 <= INT32_MAX;
      } else {
        std::fill(row.begin(), row.end(), int16_t{0});
        x_scale[m + r] = 0.0f;
      }
      for (int64_t p = 0; p < depth(); ++p) {
        dst[(p * cpu::kPanelRows + r) * 2] = row[2 * p];
        dst[(p * cpu::kPanelRows + r) * 2 + 1] = row[2 * p + 1];
      }
    }
    tile_fits[m / cpu::kPanelRows] = fits;
  }
  void run(const int16_t* a, const int16_t* panel, int tiles, int64_t m, int64_t tm, int64_t n0, int64_t cols,
           float* out, int64_t ldo) const {
    constexpr int64_t R = cpu::kPanelRows, C = cpu::kPanelCols;
    const int64_t tile_elems = R * depth() * kSlot;
    const bool fits = tile_fits[m / R] && (tiles == 1 || tile_fits[m / R + 1]);
    if (scaled_kernel != nullptr && fits) {
      // Whole panels read their scales and bias in place; a partial one through zero-padded copies.
      alignas(64) float scale_pad[C] = {}, bias_pad[C] = {}, tile[2 * R * C];
      const float* ws = w_scale + n0;
      const float* b = bias != nullptr ? bias + n0 : nullptr;
      if (cols < C) {
        std::copy(ws, ws + cols, scale_pad);
        ws = scale_pad;
        if (b != nullptr) std::copy(b, b + cols, bias_pad), b = bias_pad;
      }
      const bool whole = tm == tiles * R && cols == C;
      float* dst = whole ? out : tile;
      const int64_t ldd = whole ? ldo : C;
      if (tiles == 2 && scaled_pair_kernel != nullptr) {
        scaled_pair_kernel(a, panel, depth(), x_scale + m, ws, b, dst, ldd);
      } else {
        for (int t = 0; t < tiles; ++t) {
          scaled_kernel(a + t * tile_elems, panel, depth(), x_scale + m + t * R, ws, b, dst + t * R * ldd, ldd);
        }
      }
      if (!whole) {
        for (int64_t r = 0; r < tm; ++r) std::copy(tile + r * C, tile + r * C + cols, out + r * ldo);
      }
      return;
    }
    // Exact int64 sums (or no AVX2), then the scalar epilogue.
    for (int t = 0; t < tiles; ++t) {
      const int64_t rows = std::min(R, tm - t * R);
      int64_t sums[R * C];
      exact_kernel(a + t * tile_elems, panel, depth(), sums, C);
      scale_tile(sums, C, rows, cols, x_scale + m + t * R, w_scale + n0, bias ? bias + n0 : nullptr,
                 out + t * R * ldo, ldo);
    }
  }
};

// Rows of packed activations kept per pass over the weight panels: up to ~2 MB of them, so a long
// prompt's block stays in the last-level cache while every panel streams past it.
constexpr int64_t kPanelActivationBytes = 2 << 20;

// Prefill (M > kSmallM) Linear: out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) in the element type
// of `Panels` (above), with W given by pack_panel(n0, cols, panel), which writes W[n0 .. n0 + cols) in
// the micro-kernel's panel layout (zeros past cols). The activations are packed once per block into
// tiles of kPanelRows tokens; each thread then takes weight panels, packs one (for int8: converts it,
// once per block instead of once per token tile) and runs it against every activation tile of the block.
template <class Panels, class PackPanel>
void panel_gemm(const Panels& panels_of, float* out, int64_t M, int64_t N, const PackPanel& pack_panel) {
  using Elem = typename Panels::Elem;
  constexpr int64_t R = cpu::kPanelRows, C = cpu::kPanelCols;
  const int64_t tile_elems = R * panels_of.depth() * Panels::kSlot;
  const int64_t panel_elems = C * panels_of.depth() * Panels::kSlot;
  const int64_t tiles_per_block = std::max<int64_t>(1, kPanelActivationBytes / (tile_elems * int64_t{sizeof(Elem)}));
  const int64_t panels = ceil_div(N, C);
  thread_local std::vector<Elem> a_pack;  // the calling thread's; shared by the workers below
  for (int64_t m_block = 0; m_block < M; m_block += tiles_per_block * R) {
    const int64_t rows = std::min(M - m_block, tiles_per_block * R), tiles = ceil_div(rows, R);
    a_pack.resize(tiles * tile_elems);
    Elem* ap = a_pack.data();
#pragma omp parallel num_threads(num_threads())
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = m_block + t * R;
        panels_of.pack_tile(m, std::min(R, M - m), ap + t * tile_elems);
      }  // implicit barrier: the packed block is complete before any panel uses it
      thread_local std::vector<Elem> panel_storage;  // per worker; 64-byte aligned below
      panel_storage.resize(panel_elems + 64 / sizeof(Elem));
      Elem* panel = reinterpret_cast<Elem*>((reinterpret_cast<uintptr_t>(panel_storage.data()) + 63) & ~uintptr_t{63});
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * C, cols = std::min(C, N - n0);
        pack_panel(n0, cols, panel);
        // Tiles two at a time (the last one alone when their number is odd).
        for (int64_t t = 0; t < tiles; t += 2) {
          const int pair_tiles = t + 1 < tiles ? 2 : 1;
          const int64_t m0 = m_block + t * R, tm = std::min(pair_tiles * R, M - m0);
          panels_of.run(ap + t * tile_elems, panel, pair_tiles, m0, tm, n0, cols, out + m0 * N + n0, N);
        }
      }
    }
  }
}

cpu::I8DotBlockFn i8_block() {
  return cpu::pick_kernel<cpu::I8DotBlockFn>({{Isa::Avx512, cpu::i8_dot_block_avx512},
                                              {Isa::Avx2, cpu::i8_dot_block_avx2},
                                              {Isa::Scalar, cpu::i8_dot_block_scalar}});
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
    scale_tile(acc.data(), tn, tm, tn, xs + m0, w_scale + n0, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
  });
}

}  // namespace

void int8_matmul_i32(const int8_t* a, const int8_t* b, int32_t* out_i32, int64_t M, int64_t N, int64_t K) {
  const cpu::I8DotBlockFn block = i8_block();
  for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    block(a + m0 * K, K, b + n0 * K, K, out_i32 + m0 * N + n0, N, m1 - m0, n1 - n0, K);
  });
}

void int8_linear_w8a8(const float* x, const int8_t* w_q, const float* w_scale, const float* bias, float* out,
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
    const auto pack = cpu::pick_kernel<decltype(&cpu::pack_panel_i8_scalar)>(
        {{Isa::Avx2, cpu::pack_panel_i8_avx2}, {Isa::Scalar, cpu::pack_panel_i8_scalar}});
    panel_gemm(F32Panels(x, bias, K), out, M, N, [&](int64_t n0, int64_t cols, float* panel) {
      pack(w_q + n0 * K, K, w_scale + n0, cols, K, panel);  // dequantized once per panel
    });
    return;
  }
  const auto block = cpu::pick_kernel<decltype(&cpu::f32i8_dot_block_scalar)>(
      {{Isa::Avx2, cpu::f32i8_dot_block_avx2}, {Isa::Scalar, cpu::f32i8_dot_block_scalar}});
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
  thread_local std::vector<float> x_scale;  // reused: decode calls this hundreds of times per token
  if (M > kSmallM) {  // prefill: tokens are quantized as they are packed
    thread_local std::vector<uint8_t> tile_fits;
    const int64_t tiles = ceil_div(M, cpu::kPanelRows);
    x_scale.resize(tiles * cpu::kPanelRows);
    tile_fits.resize(tiles);
    const I16Panels panels_of(x, w_scale, bias, x_scale.data(), tile_fits.data(), K);
    const auto pack = cpu::pick_kernel<decltype(&cpu::pack_panel_i16_scalar)>(
        {{Isa::Avx2, cpu::pack_panel_i16_avx2}, {Isa::Scalar, cpu::pack_panel_i16_scalar}});
    panel_gemm(panels_of, out, M, N, [&](int64_t n0, int64_t cols, int16_t* panel) {
      pack(w_q + n0 * K, K, cols, K, panel);  // widened once per panel
    });
    return;
  }
  x_scale.resize(M);
  thread_local std::vector<int16_t> x_q;
  x_q.resize(M * K);
  const auto quantize_row = cpu::pick_kernel<decltype(&cpu::quantize_row_i16_scalar)>(
      {{Isa::Avx2, cpu::quantize_row_i16_avx2}, {Isa::Scalar, cpu::quantize_row_i16_scalar}});
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, x_q.data() + m * K, x_scale.data() + m, K);
  const auto panels = cpu::pick_kernel<decltype(&cpu::i16i8_linear_panels_avx512)>(
      {{Isa::Avx512, cpu::i16i8_linear_panels_avx512}, {Isa::Scalar, nullptr}});
  if (panels != nullptr && M >= kPanelDecodeMinRows) {
    // The activations as int16 pairs, pair-major, in the kernel's slot order.
    const int64_t pairs = (K + 1) / 2;
    thread_local std::vector<int32_t> x_pairs;
    x_pairs.assign(cpu::i16_panel_padded_pairs(K) * M, 0);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* row = x_q.data() + m * K;
      for (int64_t p = 0; p < pairs; ++p) {
        const uint16_t lo = static_cast<uint16_t>(row[2 * p]);
        const uint16_t hi = 2 * p + 1 < K ? static_cast<uint16_t>(row[2 * p + 1]) : 0;
        x_pairs[cpu::i16_panel_slot(p) * M + m] = static_cast<int32_t>(uint32_t{lo} | uint32_t{hi} << 16);
      }
    }
    // Pointers, not the thread_local vectors: inside the lambda those would be each worker's own.
    const int32_t* xp = x_pairs.data();
    const float* xs = x_scale.data();
    for_each_tile(M, N, K, 1, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      (void)m0, (void)m1;  // M <= kSmallM: every tile has all the rows
      thread_local std::vector<int8_t> panel_storage;  // per OpenMP thread; 64-byte aligned below
      panel_storage.resize(32 * cpu::i16_panel_padded_pairs(K) + 64);
      int8_t* panel = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(panel_storage.data()) + 63) & ~uintptr_t{63});
      panels(xp, M, xs, w_q + n0 * K, w_scale + n0, bias ? bias + n0 : nullptr, out + n0, N, n1 - n0, K, panel);
    });
    return;
  }
  const auto block = cpu::pick_kernel<decltype(&cpu::i16i8_dot_block_scalar)>(
      {{Isa::Avx512, cpu::i16i8_dot_block_avx512},
       {Isa::Avx2, cpu::i16i8_dot_block_avx2},
       {Isa::Scalar, cpu::i16i8_dot_block_scalar}});
  integer_linear_tiles<int64_t>(block, x_q.data(), x_scale.data(), w_q, w_scale, bias, out, M, N, K);
}

void linear_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  if (M > kSmallM) {
    const auto pack = cpu::pick_kernel<decltype(&cpu::pack_panel_f32_scalar)>(
        {{Isa::Avx2, cpu::pack_panel_f32_avx2}, {Isa::Scalar, cpu::pack_panel_f32_scalar}});
    panel_gemm(F32Panels(x, bias, K), out, M, N, [&](int64_t n0, int64_t cols, float* panel) {
      pack(w + n0 * K, K, cols, K, panel);
    });
    return;
  }
  const auto block = cpu::pick_kernel<decltype(&cpu::f32_dot_block_scalar)>(
      {{Isa::Avx2, cpu::f32_dot_block_avx2}, {Isa::Scalar, cpu::f32_dot_block_scalar}});
  for_each_tile(M, N, K, 4, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    block(x + m0 * K, K, w + n0 * K, K, out + m0 * N + n0, N, m1 - m0, n1 - n0, K);
    if (bias != nullptr) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t n = n0; n < n1; ++n) out[m * N + n] += bias[n];
      }
    }
  });
}

}  // namespace pyengine
