#include "pyengine/rope.h"

#include <stdexcept>

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  const int64_t tokens = 6, heads = 3, num_positions = 50;
  for (int64_t half : {1, 2, 3, 4, 7, 8, 9, 64, 288}) {
    const int64_t head_dim = 2 * half;
    std::vector<float> cos(num_positions * half), sin(num_positions * half);
    for (int64_t p = 0; p < num_positions; ++p) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = p * std::pow(10000.0, -double(i) / half);
        cos[p * half + i] = float(std::cos(angle));
        sin[p * half + i] = float(std::sin(angle));
      }
    }
    const std::vector<int32_t> positions = {0, 1, 49, 7, 7, 30};
    const auto x = testing::random_floats(tokens * heads * head_dim, 4);
    for (bool interleaved : {false, true}) {
      std::vector<float> ref(x);
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t i = 0; i < half; ++i) {
            const int64_t base = (t * heads + h) * head_dim;
            const int64_t ia = base + (interleaved ? 2 * i : i), ib = base + (interleaved ? 2 * i + 1 : i + half);
            const double c = cos[positions[t] * half + i], s = sin[positions[t] * half + i];
            ref[ia] = float(x[ia] * c - double(x[ib]) * s);
            ref[ib] = float(x[ib] * c + double(x[ia]) * s);
          }
        }
      }
      for (Isa isa : testing::supported_isas()) {
        set_isa(isa);
        std::vector<float> out(x);
        rope(out.data(), cos.data(), sin.data(), positions.data(), tokens, heads, head_dim, num_positions, interleaved);
        PE_CHECK(testing::max_abs_diff(out, ref) < 1e-5f);
        // An out-of-range position throws before anything is rotated.
        std::vector<int32_t> bad(positions);
        bad[3] = int32_t(num_positions);
        std::vector<float> untouched(x);
        bool threw = false;
        try {
          rope(untouched.data(), cos.data(), sin.data(), bad.data(), tokens, heads, head_dim, num_positions, interleaved);
        } catch (const std::invalid_argument&) {
          threw = true;
        }
        PE_CHECK(threw);
        PE_CHECK(testing::max_abs_diff(untouched, x) == 0.0f);
      }
    }
  }
  std::printf("test_rope: ok\n");
  return 0;
}
