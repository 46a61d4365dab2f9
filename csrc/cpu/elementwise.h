// Splitting a flat elementwise loop across OpenMP threads in cache-friendly chunks.
#pragma once
#include <algorithm>
#include <cstdint>

#include "pyengine/cpu_features.h"

namespace pyengine::cpu {

// Calls fn(begin, count) over [0, n) in chunks; threads only when the work pays for waking them.
template <typename Fn>
void parallel_chunks(int64_t n, Fn fn) {
  constexpr int64_t kChunk = 16384;  // 64 KiB of fp32 per operand: L2-sized, many chunks per thread
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (n >= 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    fn(begin, std::min(kChunk, n - begin));
  }
}

}  // namespace pyengine::cpu
