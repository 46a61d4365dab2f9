// Which cache entries a query sees: the one rule for the CPU and the CUDA attention kernels (the
// Python reference, pyengine.kernels.attention_mask, states the same).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PYENGINE_HOST_DEVICE __host__ __device__
#else
#define PYENGINE_HOST_DEVICE
#endif

namespace pyengine {

// The keys [start, limit) a query at `position` sees: j <= position, j < kv_len, and with a sliding
// window (window > 0) j > position - window. A query past kv_len + window (the padding of a shorter
// prompt in a batch) still sees key kv_len - 1, so its unused output stays finite. kv_len < 1 gives
// an empty range.
struct KeyRange {
  int64_t start, limit;
};

PYENGINE_HOST_DEVICE inline KeyRange key_range(int64_t position, int64_t kv_len, int64_t window) {
  const int64_t limit = position + 1 < kv_len ? position + 1 : kv_len;
  int64_t start = window > 0 ? position + 1 - window : 0;
  if (start < 0) start = 0;
  if (start > limit - 1) start = limit - 1;
  if (start < 0) start = 0;  // limit < 1: nothing visible
  return {start, limit};
}

}  // namespace pyengine
