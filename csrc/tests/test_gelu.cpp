#include "pyengine/gelu.h"

#include "tests/test_util.h"

using namespace pyengine;

static double gelu_new(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

int main() {
  for (int64_t n : {1, 7, 8, 9, 64, 576, 1001, 16384 * 5 + 3}) {
    auto x = testing::random_floats(n, 3, 4.0f);
    x[0] = -3e38f;  // x^3 overflows; the answer is still ~0
    if (n > 1) x[1] = 3e38f;
    std::vector<float> ref(n), out(n);
    for (int64_t i = 0; i < n; ++i) ref[i] = float(gelu_new(x[i]));
    for (Isa isa : testing::supported_isas()) {
      set_isa(isa);
      gelu(x.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        PE_CHECK(std::isfinite(out[i]));
        PE_CHECK(std::fabs(out[i] - ref[i]) <= 1e-6f * std::fabs(ref[i]) + 1e-6f);
      }
    }
  }
  // gelu_mul over strided gate / up rows (the halves of a fused gate_up projection), and in place over up.
  const int64_t rows = 3, cols = 37;
  const auto gate_up = testing::random_floats(rows * 2 * cols, 5, 4.0f);
  std::vector<float> ref(rows * cols), out(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < cols; ++i) {
      ref[r * cols + i] = float(gelu_new(gate_up[r * 2 * cols + i]) * gate_up[r * 2 * cols + cols + i]);
    }
  }
  for (Isa isa : testing::supported_isas()) {
    set_isa(isa);
    gelu_mul(gate_up.data(), 2 * cols, gate_up.data() + cols, 2 * cols, out.data(), rows, cols);
    for (int64_t i = 0; i < rows * cols; ++i) PE_CHECK(std::fabs(out[i] - ref[i]) <= 1e-5f * std::fabs(ref[i]) + 1e-5f);
    std::vector<float> gate(rows * cols), up(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < cols; ++i) {
        gate[r * cols + i] = gate_up[r * 2 * cols + i];
        up[r * cols + i] = gate_up[r * 2 * cols + cols + i];
      }
    }
    gelu_mul(gate.data(), cols, up.data(), cols, up.data(), rows, cols);  // out is up
    PE_CHECK(testing::max_abs_diff(up, out) == 0.0f);
  }
  // softcap: cap * tanh(x / cap), bounded by cap, in place.
  auto x = testing::random_floats(1000, 9, 100.0f);
  std::vector<float> capped(x.size());
  softcap(x.data(), capped.data(), static_cast<int64_t>(x.size()), 30.0f);
  for (size_t i = 0; i < x.size(); ++i) {
    PE_CHECK(std::fabs(capped[i] - 30.0 * std::tanh(x[i] / 30.0)) <= 1e-5 * 30.0);
    PE_CHECK(std::fabs(capped[i]) <= 30.0f);
  }
  softcap(x.data(), x.data(), static_cast<int64_t>(x.size()), 30.0f);
  PE_CHECK(testing::max_abs_diff(x, capped) == 0.0f);
  std::printf("test_gelu: ok\n");
  return 0;
}
