// The cpuid / xgetbv reading behind cpu_features() and detected_isa(). It is a file of its own because
// it needs nothing from the C or C++ runtime: tests/test_avx512_emulated.py links it, alone, into a
// freestanding binary and runs it on an emulated AVX-512 CPU.
#pragma once
#include "pyengine/cpu_features.h"

namespace pyengine::cpu {

// The features this CPU reports and its OS saves the registers of (xgetbv), as CpuFeature bits.
CpuFeatures features_from_cpuid();

// The best level those features make up: best_isa(features_from_cpuid()).
Isa isa_from_cpuid();

}  // namespace pyengine::cpu
