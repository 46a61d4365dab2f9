// Rotary position embedding, applied in place to q or k.
//
// Each head vector's elements are paired and each pair (a, b) rotated by the angle of its
// frequency at the token's position: a' = a*cos - b*sin, b' = b*cos + a*sin.
//   interleaved = false: pairs (i, i + head_dim/2), Llama / GPT-NeoX "rotate_half" layout;
//   interleaved = true:  pairs (2i, 2i + 1), GPT-J layout.
// Frequency i of position p is cos[p * head_dim/2 + i]; the caller builds the tables (rope theta,
// Llama-3 style scaling and any attention scaling folded in).
#pragma once
#include <cstdint>

namespace pyengine {

// x: [tokens, heads, head_dim] contiguous fp32 (tokens = batch * seq), rotated in place.
// cos, sin: [num_positions, head_dim / 2]; positions: [tokens] int32; head_dim even.
// Throws std::invalid_argument (message naming `positions`) if any position is outside
// [0, num_positions); then x is left untouched.
void rope(float* x, const float* cos, const float* sin, const int32_t* positions, int64_t tokens,
          int64_t heads, int64_t head_dim, int64_t num_positions, bool interleaved);

}  // namespace pyengine
