// Which SIMD instruction set the CPU kernels use, chosen once at run time.
#pragma once

namespace pyengine {

// Ordered: a higher level implies the lower ones.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best level this CPU and OS support (cpuid feature bits plus xgetbv's saved-state mask).
// Avx2 needs AVX2+FMA+F16C; Avx512 needs F/BW/VL/DQ and VNNI.
Isa detected_isa();

// The level kernels dispatch to: detected_isa(), capped by the environment variable
// PYENGINE_ISA=scalar|avx2|avx512 (read once) or by set_isa().
Isa active_isa();

// Caps dispatch at `isa`. Throws std::invalid_argument if the CPU lacks it.
void set_isa(Isa isa);

const char* isa_name(Isa isa);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const char* name);

// Threads used by the CPU kernels (OpenMP), whichever thread calls them: every parallel region takes
// num_threads(). Defaults to the OpenMP default (all cores, or OMP_NUM_THREADS).
void set_num_threads(int n);
int num_threads();

}  // namespace pyengine
