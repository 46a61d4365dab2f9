#include "pyengine/silu_mul.h"

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  // Lengths around the SIMD width and across the threading threshold and chunk size.
  for (int64_t n : {1, 7, 8, 9, 64, 576, 1001, 16384 * 5 + 3}) {
    auto gate = testing::random_floats(n, 1, 8.0f);
    auto up = testing::random_floats(n, 2);
    gate[0] = -1e4f;  // exp(1e4) overflows: the answer is -0, not NaN
    if (n > 1) gate[1] = 1e4f;
    std::vector<float> ref(n), out(n);
    for (int64_t i = 0; i < n; ++i) ref[i] = float(gate[i] / (1.0 + std::exp(-double(gate[i]))) * up[i]);
    for (Isa isa : testing::supported_isas()) {
      set_isa(isa);
      silu_mul(gate.data(), up.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        PE_CHECK(std::isfinite(out[i]));
        PE_CHECK(std::fabs(out[i] - ref[i]) <= 1e-6f * std::fabs(ref[i]) + 1e-6f);
      }
      std::vector<float> in_place(gate);  // out aliasing gate
      silu_mul(in_place.data(), up.data(), in_place.data(), n);
      PE_CHECK(testing::max_abs_diff(in_place, out) == 0.0f);
    }
  }
  std::printf("test_silu_mul: ok\n");
  return 0;
}
