// Token embedding lookup: out[n] = table[ids[n]].
#pragma once
#include <cstdint>

namespace pyengine {

// ids: [count] int64 (torch's index dtype, what tokenizers hand back); table: [vocab, dim]
// contiguous fp32; out: [count, dim]. Throws std::invalid_argument (message naming `ids`) if any id
// is outside [0, vocab); then out is left untouched.
// There is no per-ISA version: each row is one memcpy, which libc already vectorizes.
void embedding(const int64_t* ids, int64_t count, const float* table, int64_t vocab, int64_t dim, float* out);

}  // namespace pyengine
