// Per-ISA implementations of rope.h, one token (all its heads) at a time; dispatch in rope.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// x: [heads, head_dim] of one token; cos_row, sin_row: [head_dim / 2] for its position.
void rope_token_scalar(float* x, const float* cos_row, const float* sin_row, int64_t heads,
                       int64_t head_dim, bool interleaved);
void rope_token_avx2(float* x, const float* cos_row, const float* sin_row, int64_t heads,
                     int64_t head_dim, bool interleaved);

}  // namespace pyengine::cpu
