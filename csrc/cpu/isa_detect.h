// The cpuid / xgetbv reading behind detected_isa(). It is a file of its own because it needs nothing
// from the C or C++ runtime: tests/test_avx512_emulated.py links it, alone, into a freestanding
// binary and runs it on an emulated AVX-512 CPU.
#pragma once
#include "pyengine/cpu_features.h"

namespace pyengine::cpu {

// The best level this CPU and OS support, read from cpuid and the OS's saved-state mask (xgetbv).
Isa isa_from_cpuid();

}  // namespace pyengine::cpu
