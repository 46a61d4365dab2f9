// AVX2 sum_words share: two streams, 64 bytes of each per iteration into four accumulators, so the
// loop is nothing but loads and adds and the core keeps as many lines in flight as it can.
#include <immintrin.h>

#include "cpu/memory_read_isa.h"

namespace pyengine::cpu {

uint64_t sum_words_two_streams_avx2(const uint64_t* words, int64_t count) {
  const int64_t half = count / 2 / 8 * 8;  // whole cache lines per stream (for aligned input)
  const uint64_t *first = words, *second = words + half;
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < half; i += 8) {
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + i)));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + i + 4)));
    s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + i)));
    s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + i + 4)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  uint64_t total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (int64_t i = 2 * half; i < count; ++i) total += words[i];  // what the streams left
  return total;
}

}  // namespace pyengine::cpu
