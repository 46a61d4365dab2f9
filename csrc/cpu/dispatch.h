// How a kernel picks its implementation for this CPU. Each call site lists the implementations in a
// table, best first and the scalar one last; pick_kernel returns the first that the active level
// (detected_isa() capped by PYENGINE_ISA or set_isa) and the CPU's features allow:
//
//   const auto row_fn = cpu::pick_kernel<RowFn>({{Isa::Avx2, cpu::rms_norm_row_avx2},
//                                                {Isa::Scalar, cpu::rms_norm_row_scalar}});
//
// A new implementation (an AMX or NEON kernel, or one that needs avx512_bf16) is one more row in the
// tables of the ops that have it. Pick once per call, before the loops, never inside them.
#pragma once
#include <initializer_list>

#include "pyengine/cpu_features.h"

namespace pyengine::cpu {

template <class Fn>
struct KernelImpl {
  Isa isa;                 // the level it is compiled for
  Fn fn;                   // may be nullptr: "none at this level", for callers that handle that
  CpuFeatures needs = {};  // features it needs beyond its level's, e.g. CpuFeature::Avx512Bf16
};

// The first implementation the active level includes, nullptr if none does (a table without a
// Scalar row).
template <class Fn>
Fn pick_kernel(std::initializer_list<KernelImpl<Fn>> impls) {
  const Isa level = active_isa();
  for (const KernelImpl<Fn>& impl : impls) {
    if (isa_includes(level, impl.isa) && (impl.needs.bits == 0 || cpu_features().has(impl.needs))) return impl.fn;
  }
  return nullptr;
}

}  // namespace pyengine::cpu
