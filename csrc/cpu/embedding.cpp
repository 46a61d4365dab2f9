#include "pyengine/embedding.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "pyengine/cpu_features.h"

namespace pyengine {

void embedding(const int64_t* ids, int64_t count, const float* table, int64_t vocab, int64_t dim, float* out) {
  // All ids first: a bad one must neither read outside the table nor leave out half written.
  for (int64_t n = 0; n < count; ++n) {
    if (ids[n] < 0 || ids[n] >= vocab) {
      throw std::invalid_argument("ids: id " + std::to_string(ids[n]) + " (at flat index " + std::to_string(n) +
                                  ") is outside the table's vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (count * dim >= 65536)
  for (int64_t n = 0; n < count; ++n) std::memcpy(out + n * dim, table + ids[n] * dim, row_bytes);
}

}  // namespace pyengine
