#include "pyengine/rope.h"

#include <stdexcept>
#include <string>

#include "cpu/dispatch.h"
#include "cpu/rope_isa.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void rope_token_scalar(float* x, const float* cos_row, const float* sin_row, int64_t heads,
                       int64_t head_dim, bool interleaved) {
  const int64_t half = head_dim / 2;
  // Pair i is (x[i * first_step], x[i * first_step + second_offset]).
  const int64_t first_step = interleaved ? 2 : 1, second_offset = interleaved ? 1 : half;
  for (int64_t h = 0; h < heads; ++h) {
    float* head = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      float& a = head[i * first_step];
      float& b = head[i * first_step + second_offset];
      const float a0 = a, b0 = b;
      a = a0 * cos_row[i] - b0 * sin_row[i];
      b = b0 * cos_row[i] + a0 * sin_row[i];
    }
  }
}

}  // namespace cpu

void rope(float* x, const float* cos, const float* sin, const int32_t* positions, int64_t tokens,
          int64_t heads, int64_t head_dim, int64_t num_positions, bool interleaved) {
  // Validate every position before rotating anything: a bad one must not read past the tables,
  // and the in-place update should be all or nothing.
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < 0 || positions[t] >= num_positions) {
      throw std::invalid_argument("positions: position " + std::to_string(positions[t]) + " (token " +
                                  std::to_string(t) + ") is outside the cos/sin tables' range [0, " +
                                  std::to_string(num_positions) + ")");
    }
  }
  const auto token_fn = cpu::pick_kernel<decltype(&cpu::rope_token_scalar)>(
      {{Isa::Avx2, cpu::rope_token_avx2}, {Isa::Scalar, cpu::rope_token_scalar}});
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (tokens * heads * head_dim >= 32768)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t p = positions[t];
    token_fn(x + t * heads * head_dim, cos + p * half, sin + p * half, heads, head_dim, interleaved);
  }
}

}  // namespace pyengine
