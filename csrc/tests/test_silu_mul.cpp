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
      silu_mul(gate.data(), n, up.data(), n, out.data(), 1, n);
      for (int64_t i = 0; i < n; ++i) {
        PE_CHECK(std::isfinite(out[i]));
        PE_CHECK(std::fabs(out[i] - ref[i]) <= 1e-6f * std::fabs(ref[i]) + 1e-6f);
      }
      std::vector<float> in_place(gate);  // out aliasing gate
      silu_mul(in_place.data(), n, up.data(), n, in_place.data(), 1, n);
      PE_CHECK(testing::max_abs_diff(in_place, out) == 0.0f);
    }
  }
  // Strided rows: the two halves of a fused gate_up, rows x cols, against the flat result row by row.
  for (int64_t cols : {1, 9, 576, 1536}) {
    const int64_t rows = 53;
    const auto gate_up = testing::random_floats(rows * 2 * cols, 3, 4.0f);
    std::vector<float> expected(rows * cols), out(rows * cols);
    for (Isa isa : testing::supported_isas()) {
      set_isa(isa);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = gate_up.data() + r * 2 * cols;
        silu_mul(row, cols, row + cols, cols, expected.data() + r * cols, 1, cols);
      }
      silu_mul(gate_up.data(), 2 * cols, gate_up.data() + cols, 2 * cols, out.data(), rows, cols);
      PE_CHECK(out == expected);
    }
  }
  std::printf("test_silu_mul: ok\n");
  return 0;
}
