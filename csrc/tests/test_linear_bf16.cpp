// linear_bf16 on every ISA level this CPU has, against a double reference over the weights' exact
// values: decode rows (the GEMVs, K tails of every length mod 32) and prefill rows (the widened GEMM).
#include <cstring>

#include "pyengine/linear_bf16.h"
#include "test_util.h"

using namespace pyengine;

namespace {

uint16_t to_bf16(float f) {  // truncation is enough to make test weights
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void check(int64_t M, int64_t N, int64_t K, bool with_bias, unsigned seed) {
  const auto x = testing::random_floats(static_cast<size_t>(M * K), seed);
  const auto wf = testing::random_floats(static_cast<size_t>(N * K), seed + 1);
  const auto bias = testing::random_floats(static_cast<size_t>(N), seed + 2);
  std::vector<uint16_t> w(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) w[i] = to_bf16(wf[i]);
  std::vector<float> out(static_cast<size_t>(M * N), -1.0f);
  linear_bf16(x.data(), w.data(), with_bias ? bias.data() : nullptr, out.data(), M, N, K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = with_bias ? bias[n] : 0.0, magnitude = with_bias ? std::fabs(bias[n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double term = double(x[m * K + k]) * from_bf16(w[n * K + k]);
        ref += term;
        magnitude += std::fabs(term);
      }
      // fp32 sums: a few roundings of at most 2^-24 of the running magnitude per term.
      PE_CHECK(std::fabs(out[m * N + n] - ref) <= 4.0 * (K + 1) * 0x1p-24 * magnitude + 1e-30);
    }
  }
}

}  // namespace

int main() {
  for (Isa isa : testing::supported_isas()) {
    set_isa(isa);
    unsigned seed = 1;
    for (int64_t M : {1, 2, 3, 4, 5, 9}) {
      for (int64_t K : {1, 2, 15, 31, 32, 33, 64, 95, 300}) {
        for (int64_t N : {1, 2, 3, 7, 130}) {
          check(M, N, K, (seed & 1) != 0, seed);
          ++seed;
        }
      }
    }
  }
  set_isa(detected_isa());
  std::printf("test_linear_bf16: ok\n");
  return 0;
}
