#include "pyengine/embedding.h"

#include <stdexcept>

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  const int64_t vocab = 40;
  for (int64_t dim : {1, 7, 8, 9, 576, 1001}) {
    const auto table = testing::random_floats(vocab * dim, 5);
    const std::vector<int64_t> ids = {0, 39, 5, 5, 12};
    std::vector<float> out(ids.size() * dim);
    embedding(ids.data(), int64_t(ids.size()), table.data(), vocab, dim, out.data());
    for (size_t n = 0; n < ids.size(); ++n) {
      for (int64_t i = 0; i < dim; ++i) PE_CHECK(out[n * dim + i] == table[ids[n] * dim + i]);
    }
    for (int64_t bad : {int64_t(-1), vocab}) {
      std::vector<int64_t> bad_ids(ids);
      bad_ids[3] = bad;
      std::vector<float> untouched(out.size(), 0.0f);
      bool threw = false;
      try {
        embedding(bad_ids.data(), int64_t(bad_ids.size()), table.data(), vocab, dim, untouched.data());
      } catch (const std::invalid_argument&) {
        threw = true;
      }
      PE_CHECK(threw);
      for (float v : untouched) PE_CHECK(v == 0.0f);
    }
  }
  // Big enough to take the threaded path.
  const int64_t dim = 512, count = 300;
  const auto table = testing::random_floats(vocab * dim, 6);
  std::vector<int64_t> ids(count);
  for (int64_t n = 0; n < count; ++n) ids[n] = (n * 7) % vocab;
  std::vector<float> out(count * dim);
  embedding(ids.data(), count, table.data(), vocab, dim, out.data());
  for (int64_t n = 0; n < count; ++n) PE_CHECK(out[n * dim + dim - 1] == table[ids[n] * dim + dim - 1]);
  std::printf("test_embedding: ok\n");
  return 0;
}
