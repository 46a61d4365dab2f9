// linear_bf16: decode rows through the per-ISA GEMV, prefill through linear_f32's GEMM on blocks of
// weight rows widened to fp32 (the GEMM's cost is in its arithmetic, not in the weights' bytes).
#include "pyengine/linear_bf16.h"
#include "pyengine/linear_f32.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/linear_bf16_isa.h"
#include "pyengine/cpu_features.h"
#include "pyengine/int8_matmul.h"

namespace pyengine {
namespace {

constexpr int64_t kGemvMaxRows = 16;
// Weight rows widened at a time for the prefill GEMM: a block of 128 x K fp32 stays in L2 for K <= 2048.
constexpr int64_t kPrefillBlockRows = 128;

void gemv(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  // AVX-512 machines run the AVX2 kernel too: vdpbf16ps needs each fp32 activation split in three bf16
  // parts to keep its precision, and that measured slower than widening the weights (Zen 4).
  const auto kernel = cpu::pick_kernel<cpu::Bf16GemvFn>({
      {Isa::Avx2, cpu::bf16_gemv_avx2},
      {Isa::Scalar, cpu::bf16_gemv_scalar},
  });
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, N / 64)));
#pragma omp parallel num_threads(threads)
  {
    const int64_t parts = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t n0 = N * t / parts, n1 = N * (t + 1) / parts;  // one contiguous slice of rows each
    if (n0 < n1) kernel(x, M, K, w, bias, out, N, n0, n1);
  }
}

void gemm(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  std::vector<float> block(static_cast<size_t>(std::min(N, kPrefillBlockRows) * K));
  std::vector<float> block_out(static_cast<size_t>(M * std::min(N, kPrefillBlockRows)));
  for (int64_t n0 = 0; n0 < N; n0 += kPrefillBlockRows) {
    const int64_t rows = std::min(kPrefillBlockRows, N - n0);
    const uint16_t* src = w + n0 * K;
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t i = 0; i < rows * K; ++i) block[i] = cpu::bf16_to_float(src[i]);
    linear_f32(x, block.data(), bias == nullptr ? nullptr : bias + n0, block_out.data(), M, rows, K);
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(out + m * N + n0, block_out.data() + m * rows, static_cast<size_t>(rows) * sizeof(float));
    }
  }
}

}  // namespace

void linear_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t N,
                 int64_t K) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias == nullptr ? 0.0f : bias[n];
    }
    return;
  }
  if (M <= kGemvMaxRows) {
    gemv(x, w, bias, out, M, N, K);
  } else {
    gemm(x, w, bias, out, M, N, K);
  }
}

namespace cpu {

void bf16_gemv_scalar(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out,
                      int64_t N, int64_t n0, int64_t n1) {  // any M
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * bf16_to_float(row[k]);
      out[m * N + n] = acc + (bias == nullptr ? 0.0f : bias[n]);
    }
  }
}

}  // namespace cpu
}  // namespace pyengine
