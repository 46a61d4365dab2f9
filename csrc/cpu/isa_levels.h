// The instruction-set levels, one row each: its name (PYENGINE_ISA, set_isa, `pyengine info`) and the
// CPU features it needs. Detection takes the highest row the CPU's features satisfy. A new level (AMX,
// or an ARM family's NEON) is a new Isa value and a new row here, plus the kernels that use it.
//
// Constants only: isa_detect.cpp, which reads this table, is linked without the C/C++ runtime.
#pragma once
#include "pyengine/cpu_features.h"

namespace pyengine::cpu {

struct IsaLevel {
  Isa isa;
  const char* name;
  CpuFeatures needs;
};

// Lowest first within each family (the order error messages list the names in).
inline constexpr IsaLevel kIsaLevels[] = {
    {Isa::Scalar, "scalar", CpuFeatures()},
    {Isa::Avx2, "avx2", CpuFeature::Avx2 | CpuFeature::Fma | CpuFeature::F16c},
    {Isa::Avx512, "avx512",
     CpuFeature::Avx2 | CpuFeature::Fma | CpuFeature::F16c | CpuFeature::Avx512F | CpuFeature::Avx512Bw |
         CpuFeature::Avx512Vl | CpuFeature::Avx512Dq | CpuFeature::Avx512Vnni},
};

// The highest level whose needs `features` cover. Only one family's features are ever set on a CPU,
// so the rows of other families never match.
constexpr Isa best_isa(CpuFeatures features) {
  Isa best = Isa::Scalar;
  for (const IsaLevel& level : kIsaLevels) {
    if (features.has(level.needs) && isa_includes(level.isa, best)) best = level.isa;
  }
  return best;
}

}  // namespace pyengine::cpu
