// A plain read of memory as fast as this library can do it: the bandwidth probe behind the decode
// rooflines (benchmarks/cpu_roofline.py). Decode at batch 1 reads every weight once, so its
// roofline is only as honest as the read it is compared with.
#pragma once
#include <cstdint>

namespace pyengine {

// The sum of `count` 64-bit words, wrapping modulo 2^64 (the sum only keeps the reads from being
// optimized away). Each thread reads its share as two sequential streams, its first and second
// halves a cache line of each in turn, the way the decode GEMVs read: the fastest plain read we have,
// so a roofline against it is against the best this machine gives.
uint64_t sum_words(const uint64_t* words, int64_t count);

}  // namespace pyengine
