#include "pyengine/memory_read.h"

#include <omp.h>

#include <algorithm>

#include "cpu/dispatch.h"
#include "cpu/memory_read_isa.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

uint64_t sum_words_two_streams_scalar(const uint64_t* words, int64_t count) {
  const int64_t half = count / 2;
  const uint64_t *first = words, *second = words + half;
  uint64_t s0 = 0, s1 = 0;
  for (int64_t i = 0; i < half; ++i) {
    s0 += first[i];
    s1 += second[i];
  }
  if (count % 2 != 0) s1 += words[count - 1];
  return s0 + s1;
}

}  // namespace cpu

uint64_t sum_words(const uint64_t* words, int64_t count) {
  const auto share_fn = cpu::pick_kernel<decltype(&cpu::sum_words_two_streams_scalar)>(
      {{Isa::Avx2, cpu::sum_words_two_streams_avx2}, {Isa::Scalar, cpu::sum_words_two_streams_scalar}});
  uint64_t total = 0;
#pragma omp parallel num_threads(num_threads()) reduction(+ : total)
  {
    // Contiguous shares, cut on cache lines (8 words) so no line is read by two threads.
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lines = (count + 7) / 8;
    const int64_t begin = std::min(count, lines * t / threads * 8);
    const int64_t end = std::min(count, lines * (t + 1) / threads * 8);
    if (end > begin) total += share_fn(words + begin, end - begin);
  }
  return total;
}

}  // namespace pyengine
