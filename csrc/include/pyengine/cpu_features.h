// What the CPU offers (feature flags, detected once) and which instruction-set level the CPU kernels
// use (chosen at run time). Kernels pick their implementation through cpu/dispatch.h.
#pragma once
#include <cstdint>

namespace pyengine {

// Architecture families. Each has its own ladder of levels; Scalar (portable C++) belongs to all.
// An ARM port adds Arm here, its levels to Isa and to cpu/isa_levels.h, and its detection.
enum class IsaFamily : int { Portable = 0, X86 = 1 };

// Kernel levels. Within a family a higher level implies every lower one; x86-64 runs
// Scalar < Avx2 < Avx512. The value is (family << 8) | rank within the family, so levels of two
// families never compare as one above the other (isa_includes below).
enum class Isa : int {
  Scalar = 0,
  Avx2 = 0x101,    // AVX2 + FMA + F16C
  Avx512 = 0x102,  // AVX-512 F/BW/VL/DQ + VNNI
};

constexpr IsaFamily isa_family(Isa isa) { return static_cast<IsaFamily>(static_cast<int>(isa) >> 8); }

// Does code running at `level` have every instruction of `needed`? Scalar is always included;
// otherwise both must be of one family, `needed` no higher than `level`.
constexpr bool isa_includes(Isa level, Isa needed) {
  return needed == Isa::Scalar ||
         (isa_family(needed) == isa_family(level) && static_cast<int>(needed) <= static_cast<int>(level));
}

// The best level this CPU and OS support (cpuid feature bits plus xgetbv's saved-state mask); what
// each level needs is listed in cpu/isa_levels.h.
Isa detected_isa();

// The level kernels dispatch to: detected_isa(), capped by the environment variable
// PYENGINE_ISA=scalar|avx2|avx512 (read once) or by set_isa().
Isa active_isa();

// Caps dispatch at `isa`. Throws std::invalid_argument if the CPU lacks it.
void set_isa(Isa isa);

const char* isa_name(Isa isa);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const char* name);

// CPU features, one bit each. Set only where the CPU reports the feature and the OS saves the
// registers it uses (the xgetbv mask), i.e. where code may use it. The levels are built from them;
// a few (avx512_bf16, amx_*) belong to no level yet and a kernel that needs one names it in its
// dispatch entry (cpu/dispatch.h).
enum class CpuFeature : uint32_t {
  Avx2 = 1u << 0,
  Fma = 1u << 1,
  F16c = 1u << 2,
  Avx512F = 1u << 3,
  Avx512Bw = 1u << 4,
  Avx512Vl = 1u << 5,
  Avx512Dq = 1u << 6,
  Avx512Vnni = 1u << 7,
  Avx512Bf16 = 1u << 8,  // vdpbf16ps
  AmxTile = 1u << 9,     // AMX: also needs the OS's per-process permission, amx_permission()
  AmxInt8 = 1u << 10,
  AmxBf16 = 1u << 11,
};
constexpr int kCpuFeatureCount = 12;

// A set of CpuFeature bits.
struct CpuFeatures {
  uint32_t bits = 0;

  constexpr CpuFeatures() = default;
  constexpr CpuFeatures(CpuFeature f) : bits(static_cast<uint32_t>(f)) {}  // implicit: a set of one
  constexpr CpuFeatures operator|(CpuFeatures other) const { return from_bits(bits | other.bits); }
  constexpr bool has(CpuFeatures wanted) const { return (bits & wanted.bits) == wanted.bits; }
  static constexpr CpuFeatures from_bits(uint32_t b) {
    CpuFeatures s;
    s.bits = b;
    return s;
  }
};
constexpr CpuFeatures operator|(CpuFeature a, CpuFeature b) { return CpuFeatures(a) | CpuFeatures(b); }

// This CPU's features, detected once (cpuid and xgetbv only: no system call, no side effect).
CpuFeatures cpu_features();
// Linux's /proc/cpuinfo spelling: "avx2", "avx512_bf16", "amx_tile", ...
const char* cpu_feature_name(CpuFeature f);

// Linux runs AMX code only in a process that asked for the tile state:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Asked on the first call, once per process,
// and only where the CPU and OS have AMX (Linux x86-64). `reason` says why it was not granted
// ("" when it was).
struct AmxPermission {
  bool granted;
  const char* reason;
};
AmxPermission amx_permission();

// Threads used by the CPU kernels (OpenMP), whichever thread calls them: every parallel region takes
// num_threads(). Defaults to the OpenMP default (all cores, or OMP_NUM_THREADS).
void set_num_threads(int n);
int num_threads();

}  // namespace pyengine
