#include "pyengine/int8_matmul.h"
#include "pyengine/linear_f32.h"

#include <cstdint>

#include "cpu/int8_matmul_isa.h"
#include "pyengine/quantize.h"
#include "tests/test_util.h"

using namespace pyengine;

namespace {

std::vector<int8_t> random_i8(size_t n, unsigned seed, bool extreme) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-127, 127);
  std::vector<int8_t> v(n);
  for (auto& x : v) x = static_cast<int8_t>(extreme ? (dist(rng) < 0 ? -127 : 127) : dist(rng));
  return v;
}

std::vector<int32_t> reference_i32(const std::vector<int8_t>& a, const std::vector<int8_t>& b, int64_t M,
                                   int64_t N, int64_t K) {
  std::vector<int32_t> c(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int64_t{a[m * K + k]} * b[n * K + k];
      c[m * N + n] = static_cast<int32_t>(s);
    }
  return c;
}

// The GEMM's weight packing: the layout (panel[k][c] = row c at k, times its scale; zeros past
// cols) from the scalar version, and the AVX2 version bitwise equal to it, over K tails and
// partial panels. Rows are strided (ldw > K), as a panel is a slice of a bigger matrix.
void check_panel_packing() {
  constexpr int64_t C = cpu::kPanelCols;
  for (int64_t cols : {1, 5, 8, 9, 16}) {
    for (int64_t K : {1, 7, 8, 15, 16, 17, 33, 576}) {
      const int64_t ldw = K + 3;
      const auto w8 = random_i8(cols * ldw, 5, false);
      const auto wf = testing::random_floats(cols * ldw, 6);
      const auto scale = testing::random_floats(cols, 7, 0.01f);
      std::vector<float> i8_ref(K * C, -1.0f), f32_ref(K * C, -1.0f);
      cpu::pack_panel_i8_scalar(w8.data(), ldw, scale.data(), cols, K, i8_ref.data());
      cpu::pack_panel_f32_scalar(wf.data(), ldw, cols, K, f32_ref.data());
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
          PE_CHECK(i8_ref[k * C + c] == (c < cols ? static_cast<float>(w8[c * ldw + k]) * scale[c] : 0.0f));
          PE_CHECK(f32_ref[k * C + c] == (c < cols ? wf[c * ldw + k] : 0.0f));
        }
      }
      // The W8A16 panel: pairs of k, [pair][c][2], an odd K's last k padded with zero.
      const int64_t pairs = (K + 1) / 2;
      std::vector<int16_t> i16_ref(pairs * C * 2, -1);
      cpu::pack_panel_i16_scalar(w8.data(), ldw, cols, K, i16_ref.data());
      for (int64_t p = 0; p < pairs; ++p) {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t k = 2 * p + j;
            PE_CHECK(i16_ref[(p * C + c) * 2 + j] == (c < cols && k < K ? w8[c * ldw + k] : 0));
          }
        }
      }
      if (!isa_includes(detected_isa(), Isa::Avx2)) continue;
      std::vector<float> i8_avx2(K * C, -1.0f), f32_avx2(K * C, -1.0f);
      std::vector<int16_t> i16_avx2(pairs * C * 2, -1);
      cpu::pack_panel_i8_avx2(w8.data(), ldw, scale.data(), cols, K, i8_avx2.data());
      cpu::pack_panel_f32_avx2(wf.data(), ldw, cols, K, f32_avx2.data());
      cpu::pack_panel_i16_avx2(w8.data(), ldw, cols, K, i16_avx2.data());
      PE_CHECK(i8_avx2 == i8_ref && f32_avx2 == f32_ref && i16_avx2 == i16_ref);
    }
  }
}

}  // namespace

int main() {
  check_panel_packing();
  // M = 1 with N from 1 to 9: decode splits each slice into two streams of rows (the second may be
  // empty or one row shorter); the vectors are sized exactly, so the sanitizer build sees any stray row.
  const int64_t shapes[][3] = {{1, 1, 1},  {1, 2, 17},  {1, 3, 40},   {1, 4, 576},  {1, 5, 33},   {1, 6, 65},
                               {1, 7, 33}, {1, 9, 100}, {3, 5, 2049}, {7, 1, 1000}, {7, 33, 576}, {64, 70, 65},
                               {20, 9, 1536}, {30, 17, 4100}, {8, 15, 63},  {16, 17, 577}, {9, 33, 1025},
                               {16, 1, 1}};
  // From 8 to 16 rows AVX-512 decode takes the weight-panel kernel: {8, 15, 63}, {16, 17, 577},
  // {9, 33, 1025} and {16, 1, 1} cut its 16-row panels and 32-pair blocks off the edges.
  // Above 16 rows int8_linear_a16 is the int16-pair GEMM: {64, 70, 65} takes its fused-epilogue
  // kernel, {30, 17, 4100} (random rows at that length could overflow int32) its int64 chunks.
  for (const auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    for (bool extreme : {false, true}) {
      auto a = random_i8(M * K, 1, extreme), b = random_i8(N * K, 2, extreme);
      const auto ref = reference_i32(a, b, M, N, K);
      auto x = testing::random_floats(M * K, 3);
      auto w = testing::random_floats(N * K, 4, 0.05f);
      std::vector<int8_t> wq(N * K), wq_scalar(N * K);
      std::vector<float> ws(N), ws_scalar(N);
      set_isa(Isa::Scalar);
      quantize_rows(w.data(), wq_scalar.data(), ws_scalar.data(), N, K);
      std::vector<float> lin_scalar(M * N), wo_scalar(M * N), f32_scalar(M * N), a16_scalar(M * N);
      int8_linear_w8a8(x.data(), wq_scalar.data(), ws_scalar.data(), nullptr, lin_scalar.data(), M, N, K);
      int8_linear_a16(x.data(), wq_scalar.data(), ws_scalar.data(), nullptr, a16_scalar.data(), M, N, K);
      int8_linear_wo(x.data(), wq_scalar.data(), ws_scalar.data(), nullptr, wo_scalar.data(), M, N, K);
      linear_f32(x.data(), w.data(), nullptr, f32_scalar.data(), M, N, K);
      for (Isa isa : testing::supported_isas()) {
        set_isa(isa);
        std::vector<int32_t> c(M * N);
        int8_matmul_i32(a.data(), b.data(), c.data(), M, N, K);
        PE_CHECK(c == ref);  // exact on every ISA
        quantize_rows(w.data(), wq.data(), ws.data(), N, K);
        PE_CHECK(wq == wq_scalar && ws == ws_scalar);  // bitwise on every ISA
        std::vector<float> lin(M * N), wo(M * N), f32(M * N), a16(M * N);
        int8_linear_w8a8(x.data(), wq.data(), ws.data(), nullptr, lin.data(), M, N, K);
        PE_CHECK(testing::max_abs_diff(lin, lin_scalar) == 0.0f);
        int8_linear_a16(x.data(), wq.data(), ws.data(), nullptr, a16.data(), M, N, K);
        PE_CHECK(a16 == a16_scalar);  // exact integer sums, the same epilogue
        int8_linear_wo(x.data(), wq.data(), ws.data(), nullptr, wo.data(), M, N, K);
        PE_CHECK(testing::max_abs_diff(wo, wo_scalar) < 1e-3f);
        linear_f32(x.data(), w.data(), nullptr, f32.data(), M, N, K);
        PE_CHECK(testing::max_abs_diff(f32, f32_scalar) < 1e-3f);
      }
    }
  }
  // An all-zero row quantizes to scale 0 and zeros.
  std::vector<float> zeros(40, 0.0f);
  std::vector<int8_t> q(40, 5);
  float scale = -1.0f;
  for (Isa isa : testing::supported_isas()) {
    set_isa(isa);
    quantize_rows(zeros.data(), q.data(), &scale, 1, 40);
    PE_CHECK(scale == 0.0f);
    for (int8_t v : q) PE_CHECK(v == 0);
  }
  // A row holding a NaN or an infinity (at a vector position and in a scalar tail): scale NaN and
  // q 0, so W8A8 and W8A16 outputs of that row are NaN; the finite row beside it is untouched.
  // (Converting NaN to an integer, as the quantizers did before, is undefined behaviour: UBSan.)
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    for (int64_t pos : {int64_t{3}, int64_t{38}}) {
      const int64_t K = 39, N = 3;
      auto x = testing::random_floats(2 * K, 7);
      x[K + pos] = bad;
      const auto w = random_i8(N * K, 8, false);
      const std::vector<float> ws(N, 0.5f);
      for (Isa isa : testing::supported_isas()) {
        set_isa(isa);
        std::vector<int8_t> xq(2 * K, 5);
        float xs[2];
        quantize_rows(x.data(), xq.data(), xs, 2, K);
        PE_CHECK(xs[0] > 0.0f && std::isnan(xs[1]));
        for (int64_t k = 0; k < K; ++k) PE_CHECK(xq[K + k] == 0);
        for (auto linear : {int8_linear_w8a8, int8_linear_a16}) {
          std::vector<float> y(2 * N);
          linear(x.data(), w.data(), ws.data(), nullptr, y.data(), 2, N, K);
          for (int64_t n = 0; n < N; ++n) PE_CHECK(std::isfinite(y[n]) && std::isnan(y[N + n]));
        }
      }
    }
  }
  std::printf("test_int8_matmul: ok\n");
  return 0;
}
