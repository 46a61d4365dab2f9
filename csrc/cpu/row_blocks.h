// How the decode GEMVs (int8_matmul_{avx2,avx512}.cpp) walk a block's rows: plain C++, the same
// plan for every ISA, so only the kernels differ between the files.
#pragma once
#include <algorithm>
#include <cstdint>

namespace pyengine::cpu {

// Two streams over N >= 4 weight rows: rows [0, half) and [half, N), half even and N - half <= half.
// Calls pair(n0, n1, rows1) for rows n0, n0 + 1 of the first stream and rows1 (0..2) rows from n1 of
// the second.
template <class Pair>
inline __attribute__((always_inline)) void for_each_row_pair(int64_t N, const Pair& pair) {
  const int64_t half = (N + 3) / 4 * 2;
  for (int64_t i = 0; i < half; i += 2) pair(i, half + i, static_cast<int>(std::clamp<int64_t>(N - half - i, 0, 2)));
}

// Groups of up to 4 weight rows, and within each, up to 4 activation rows at a time: calls
// group(m, mr, n, rows). Four weight rows (at most 4 x K bytes) stay in L1 while every group of
// activation rows uses them, so with up to 16 tokens the weight still streams from memory once.
template <class Group>
inline __attribute__((always_inline)) void for_each_row_group(int64_t M, int64_t N, const Group& group) {
  for (int64_t n = 0; n < N; n += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, N - n));
    for (int64_t m = 0; m < M; m += 4) group(m, static_cast<int>(std::min<int64_t>(4, M - m)), n, rows);
  }
}

}  // namespace pyengine::cpu
