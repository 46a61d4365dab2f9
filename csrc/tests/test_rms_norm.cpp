#include "pyengine/rms_norm.h"

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  const int64_t rows = 5;
  for (int64_t dim : {1, 7, 8, 15, 16, 17, 576, 1001}) {
    auto x = testing::random_floats(rows * dim, 1);
    auto w = testing::random_floats(dim, 2);
    std::vector<float> ref(rows * dim), out(rows * dim);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
      const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
      for (int64_t i = 0; i < dim; ++i) ref[r * dim + i] = float(x[r * dim + i] * inv * w[i]);
    }
    for (Isa isa : testing::supported_isas()) {
      set_isa(isa);
      rms_norm(x.data(), w.data(), out.data(), rows, dim, 1e-5f);
      PE_CHECK(testing::max_abs_diff(out, ref) < 1e-4f);
      // Fused residual form: residual = x - 1 + 1 leaves x, delta ones then minus ones.
      std::vector<float> residual(x), delta(rows * dim, 0.0f), out2(rows * dim);
      add_rms_norm(residual.data(), delta.data(), w.data(), out2.data(), rows, dim, 1e-5f);
      PE_CHECK(testing::max_abs_diff(out2, ref) < 1e-4f);
      PE_CHECK(testing::max_abs_diff(residual, x) == 0.0f);
    }
  }
  std::printf("test_rms_norm: ok\n");
  return 0;
}
