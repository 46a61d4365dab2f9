// sum_words on every ISA against a plain loop, over lengths around a cache line and a thread's share
// (the streams' and threads' leftovers), with wrapping sums. Sized exactly, so the sanitizer build
// sees any read past the end.
#include "pyengine/memory_read.h"

#include <cstdint>
#include <random>
#include <vector>

#include "tests/test_util.h"

using namespace pyengine;

int main() {
  std::mt19937_64 rng(7);
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    for (int64_t n : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 1000, 4099}) {
      std::vector<uint64_t> words(n);
      uint64_t want = 0;
      for (auto& w : words) {
        w = rng();  // full 64-bit values: the sum wraps
        want += w;
      }
      for (Isa isa : testing::supported_isas()) {
        set_isa(isa);
        PE_CHECK(sum_words(words.data(), n) == want);
      }
    }
  }
  std::printf("test_memory_read: ok\n");
  return 0;
}
