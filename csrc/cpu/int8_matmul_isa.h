// Per-ISA blocks of the int8 / fp32 matmuls; tiling, threading and epilogues live in
// int8_matmul.cpp, quantization in quantize.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// c[m * ldc + n] = sum_k a[m * lda + k] * b[n * ldb + k] for m < M, n < N (int32, exact).
// Values in [-127, 127]. Reads exactly K bytes of each row (no over-read).
using I8DotBlockFn = void (*)(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                              int64_t ldc, int64_t M, int64_t N, int64_t K);
void i8_dot_block_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K);
void i8_dot_block_avx2(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                       int64_t ldc, int64_t M, int64_t N, int64_t K);
void i8_dot_block_avx512(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K);

// c[m * ldc + n] = sum_k a[m * lda + k] * float(b[n * ldb + k])  (fp32 x int8 weights, fp32 sums).
void f32i8_dot_block_scalar(const float* a, int64_t lda, const int8_t* b, int64_t ldb, float* c,
                            int64_t ldc, int64_t M, int64_t N, int64_t K);
void f32i8_dot_block_avx2(const float* a, int64_t lda, const int8_t* b, int64_t ldb, float* c,
                          int64_t ldc, int64_t M, int64_t N, int64_t K);

// c[m * ldc + n] = sum_k a[m * lda + k] * b[n * ldb + k], exact (int16 activations in [-32767, 32767]
// x int8 weights in [-127, 127]). Reads exactly K elements of each row (no over-read).
void i16i8_dot_block_scalar(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c,
                            int64_t ldc, int64_t M, int64_t N, int64_t K);
void i16i8_dot_block_avx2(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c,
                          int64_t ldc, int64_t M, int64_t N, int64_t K);
// The same with AVX-512 BW + VNNI (vpdpwssd), bitwise the same sums; weights may be -128 too.
void i16i8_dot_block_avx512(const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c,
                            int64_t ldc, int64_t M, int64_t N, int64_t K);

// c[m * ldc + n] = sum_k a[m * lda + k] * b[n * ldb + k]  (fp32).
void f32_dot_block_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                          int64_t M, int64_t N, int64_t K);
void f32_dot_block_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                        int64_t M, int64_t N, int64_t K);

// Prefill GEMM micro-kernel (outer product): the weight is packed, one panel of kPanelCols output
// features at a time, as fp32 [K][kPanelCols] (int8 weights dequantized into it once per panel), the
// activations as fp32 [K][kPanelRows] per tile of kPanelRows tokens; then
//   c[m * ldc + n] = sum_k a_pack[k * kPanelRows + m] * b_pack[k * kPanelCols + n]
// for the whole kPanelRows x kPanelCols tile (the caller pads and trims partial tiles). Every multiply
// uses a broadcast activation against a full vector of weights: no horizontal sums, and the two
// packed operands stream from L1/L2 in order.
constexpr int kPanelRows = 6;
constexpr int kPanelCols = 16;
using PanelKernelFn = void (*)(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc);
void panel_kernel_scalar(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc);
void panel_kernel_avx2(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc);
// Two consecutive packed tiles (2 * kPanelRows tokens: a_pack and a_pack + kPanelRows * K) against the
// panel, c rows as two panel_kernel calls would write them. AVX-512 does it in one pass, one zmm of
// weights per k for 12 accumulators: twice the multiply-adds per instruction of the AVX2 kernel.
void panel_kernel_pair_avx512(const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc);

// Weight packing for the micro-kernel: rows w[0 .. cols) (row stride ldw; cols <= kPanelCols) into
// panel[k * kPanelCols + c] = w[c * ldw + k] (times row_scale[c] for int8), zeros for c >= cols.
// The AVX2 versions transpose 8 x 8 blocks in registers and give bitwise the scalar results.
void pack_panel_i8_scalar(const int8_t* w, int64_t ldw, const float* row_scale, int64_t cols, int64_t K, float* panel);
void pack_panel_i8_avx2(const int8_t* w, int64_t ldw, const float* row_scale, int64_t cols, int64_t K, float* panel);
void pack_panel_f32_scalar(const float* w, int64_t ldw, int64_t cols, int64_t K, float* panel);
void pack_panel_f32_avx2(const float* w, int64_t ldw, int64_t cols, int64_t K, float* panel);

// The W8A16 prefill micro-kernel: the same outer-product tile as panel_kernel, on integers. Depth
// goes in pairs of k, because AVX2's vpmaddwd multiplies int16 pairs and adds each pair into one
// int32 lane (twice the multiply-adds per instruction of an fp32 FMA):
//   a_pack: int16 [pairs][kPanelRows][2], token m's x[2p], x[2p + 1] (int16 activations);
//   b_pack: int16 [pairs][kPanelCols][2], weight row n's w[2p], w[2p + 1] (int8 weights, widened);
//   c[m * ldc + n] = sum_p a_pack[p][m][0] * b_pack[p][n][0] + a_pack[p][m][1] * b_pack[p][n][1]
// exact, in int64. An odd K is padded with a zero k. The int32 lanes are added into c every
// kI16PanelChunkPairs pairs, before they can overflow: 256 * 2 * 32767 * 128 < 2^31.
constexpr int64_t kI16PanelChunkPairs = 256;
using I16PanelKernelFn = void (*)(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, int64_t* c,
                                  int64_t ldc);
void i16_panel_kernel_scalar(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, int64_t* c, int64_t ldc);
void i16_panel_kernel_avx2(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, int64_t* c, int64_t ldc);
// The same sums with int8_linear_a16's epilogue fused:
//   out[m * ldo + n] = float(sum[m][n]) * (row_scale[m] * col_scale[n])  (+ bias[n] where bias is given)
// with the sums kept in int32 lanes throughout, so only for tiles whose sums cannot overflow int32:
// 128 * sum_k |a[m][k]| < 2^31 for every row m (the caller checks; see i16_row_fits_int32).
// row_scale: kPanelRows values; col_scale and bias: kPanelCols.
void i16_panel_kernel_scaled_avx2(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs, const float* row_scale,
                                  const float* col_scale, const float* bias, float* out, int64_t ldo);
// Two consecutive packed tiles (a_pack and a_pack + 2 * kPanelRows * pairs; row_scale: 2 * kPanelRows
// values) in one pass, as two i16_panel_kernel_scaled_avx2 calls would write them: one zmm of weight
// pairs per pair of k, and VNNI's vpdpwssd multiplies and accumulates in one instruction.
void i16_panel_kernel_scaled_pair_avx512(const int16_t* a_pack, const int16_t* b_pack, int64_t pairs,
                                         const float* row_scale, const float* col_scale, const float* bias,
                                         float* out, int64_t ldo);

// W8A16 decode at several activation rows (int8_linear_a16, 8 to kSmallM rows), the epilogue fused:
//   out[m * ldo + n] = float(sum_k xq[m][k] * w[n * K + k]) * (x_scale[m] * w_scale[n]) (+ bias[n])
// for m < M, n < N, the sums exact (int64), the epilogue scale_tile's operations in its order: the same
// bits as i16i8_dot_block_* + scale_tile. Weight rows are read exactly K bytes each (no over-read);
// the kernel transposes them, 16 rows x kI16PanelBlockPairs pairs of k at a time, into the order of
// i16_panel_slot. The activations come as int16 pairs in that order: x_pairs[slot * M + m] =
// (xq[m][2j], xq[m][2j + 1]) (the low half first) for j = the pair at that slot, zeros past K, for
// i16_panel_padded_pairs(K) slots. kI16PanelMaxRows rows per pass over a panel. panel: scratch of
// 32 * i16_panel_padded_pairs(K) bytes, 64-byte aligned (the transposed weight rows, reused per 16).
constexpr int kI16PanelMaxRows = 16;
constexpr int64_t kI16PanelBlockPairs = 32;
constexpr int64_t i16_panel_padded_pairs(int64_t K) {
  return ((K + 1) / 2 + kI16PanelBlockPairs - 1) / kI16PanelBlockPairs * kI16PanelBlockPairs;
}
// Within each block of 32 pairs, pair 8q + r (q < 4, r < 8) sits at slot 4r + q: the order in which
// the transpose's last step leaves them.
constexpr int64_t i16_panel_slot(int64_t pair) {
  const int64_t j = pair % kI16PanelBlockPairs;
  return pair - j + 4 * (j % 8) + j / 8;
}
void i16i8_linear_panels_avx512(const int32_t* x_pairs, int64_t M, const float* x_scale, const int8_t* w,
                                const float* w_scale, const float* bias, float* out, int64_t ldo, int64_t N,
                                int64_t K, int8_t* panel);

// Weight packing for the W8A16 micro-kernel: int8 rows w[0 .. cols) into b_pack's layout above
// (zeros for c >= cols and for the odd K's last k). The AVX2 version gives bitwise the scalar result.
void pack_panel_i16_scalar(const int8_t* w, int64_t ldw, int64_t cols, int64_t K, int16_t* panel);
void pack_panel_i16_avx2(const int8_t* w, int64_t ldw, int64_t cols, int64_t K, int16_t* panel);

// One row of quantize_rows.
void quantize_row_scalar(const float* x, int8_t* q, float* scale, int64_t cols);
void quantize_row_avx2(const float* x, int8_t* q, float* scale, int64_t cols);

// One row of the int16 activation quantization of int8_linear_a16 (scale = amax / 32767).
void quantize_row_i16_scalar(const float* x, int16_t* q, float* scale, int64_t cols);
void quantize_row_i16_avx2(const float* x, int16_t* q, float* scale, int64_t cols);

}  // namespace pyengine::cpu
