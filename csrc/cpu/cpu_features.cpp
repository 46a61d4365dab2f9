#include "pyengine/cpu_features.h"

#include <cpuid.h>
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyengine {
namespace {

struct CpuidBits {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidBits cpuid(unsigned leaf, unsigned subleaf) {
  CpuidBits r;
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
  return r;
}

unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

Isa detect() {
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::Scalar;
  const CpuidBits l1 = cpuid(1, 0);
  const bool osxsave = l1.ecx & (1u << 27);
  const bool fma = l1.ecx & (1u << 12);
  const bool f16c = l1.ecx & (1u << 29);
  if (!osxsave) return Isa::Scalar;
  // The OS must save the wide registers on context switch, or using them corrupts state.
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_saved = (xcr0 & 0x6) == 0x6;
  const bool zmm_saved = (xcr0 & 0xe6) == 0xe6;
  const CpuidBits l7 = cpuid(7, 0);
  const bool avx2 = l7.ebx & (1u << 5);
  if (!(ymm_saved && avx2 && fma && f16c)) return Isa::Scalar;
  const bool avx512f = l7.ebx & (1u << 16);
  const bool avx512dq = l7.ebx & (1u << 17);
  const bool avx512bw = l7.ebx & (1u << 30);
  const bool avx512vl = l7.ebx & (1u << 31);
  const bool avx512vnni = l7.ecx & (1u << 11);
  if (zmm_saved && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni) return Isa::Avx512;
  return Isa::Avx2;
}

Isa initial_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("PYENGINE_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa wanted = parse_isa(env);  // a typo in the variable is an error, not a silent default
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int>& active_level() {
  static std::atomic<int> level{static_cast<int>(initial_isa())};
  return level;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_level().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detected_isa())) {
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa) +
                                " (best available: " + isa_name(detected_isa()) + ")");
  }
  active_level().store(static_cast<int>(isa));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "unknown";
}

Isa parse_isa(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return Isa::Scalar;
  if (std::strcmp(name, "avx2") == 0) return Isa::Avx2;
  if (std::strcmp(name, "avx512") == 0) return Isa::Avx512;
  throw std::invalid_argument(std::string("unknown ISA '") + name +
                              "' (expected scalar, avx2 or avx512)");
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be at least 1");
  omp_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace pyengine
