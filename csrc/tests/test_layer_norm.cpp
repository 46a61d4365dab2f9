#include "pyengine/layer_norm.h"

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  const int64_t rows = 5;
  for (int64_t dim : {1, 2, 7, 8, 9, 15, 16, 17, 64, 576, 1001, 7000}) {
    auto x = testing::random_floats(rows * dim, 1, 2.0f);
    for (auto& v : x) v += 10.0f;  // an offset mean, as real activations have
    const auto w = testing::random_floats(dim, 2), b = testing::random_floats(dim, 3);
    std::vector<float> ref(rows * dim), ref_no_bias(rows * dim);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x.data() + r * dim;
      double mean = 0, var = 0;
      for (int64_t i = 0; i < dim; ++i) mean += row[i];
      mean /= dim;
      for (int64_t i = 0; i < dim; ++i) var += (row[i] - mean) * (row[i] - mean);
      const double inv = 1.0 / std::sqrt(var / dim + 1e-5);
      for (int64_t i = 0; i < dim; ++i) {
        ref_no_bias[r * dim + i] = float((row[i] - mean) * inv * w[i]);
        ref[r * dim + i] = float((row[i] - mean) * inv * w[i] + b[i]);
      }
    }
    for (Isa isa : testing::supported_isas()) {
      set_isa(isa);
      std::vector<float> out(rows * dim);
      layer_norm(x.data(), w.data(), b.data(), out.data(), rows, dim, 1e-5f);
      PE_CHECK(testing::max_abs_diff(out, ref) < 1e-4f);
      layer_norm(x.data(), w.data(), nullptr, out.data(), rows, dim, 1e-5f);
      PE_CHECK(testing::max_abs_diff(out, ref_no_bias) < 1e-4f);
      // Fused form with delta = 0: the residual is unchanged and the output is the plain norm.
      std::vector<float> residual(x), delta(rows * dim, 0.0f), out2(rows * dim);
      add_layer_norm(residual.data(), delta.data(), w.data(), b.data(), out2.data(), rows, dim, 1e-5f);
      PE_CHECK(testing::max_abs_diff(out2, ref) < 1e-4f);
      PE_CHECK(testing::max_abs_diff(residual, x) == 0.0f);
    }
  }
  std::printf("test_layer_norm: ok\n");
  return 0;
}
