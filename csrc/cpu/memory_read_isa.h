// Per-ISA implementations of memory_read.h over one thread's share; dispatch lives in memory_read.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// The wrapping sum of words[0, count), read as two streams (the two halves).
uint64_t sum_words_two_streams_scalar(const uint64_t* words, int64_t count);
uint64_t sum_words_two_streams_avx2(const uint64_t* words, int64_t count);

}  // namespace pyengine::cpu
