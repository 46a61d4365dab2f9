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
  std::printf("test_gelu: ok\n");
  return 0;
}
