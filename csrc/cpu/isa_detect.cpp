#include "cpu/isa_detect.h"

#include <cpuid.h>

#include "cpu/isa_levels.h"

namespace pyengine::cpu {
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

bool bit(unsigned reg, int n) { return (reg >> n) & 1u; }

}  // namespace

CpuFeatures features_from_cpuid() {
  CpuFeatures f;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  const CpuidBits l1 = cpuid(1, 0);
  if (!bit(l1.ecx, 27)) return f;  // no OSXSAVE: the OS enabled no extended state, and xgetbv would fault
  // A feature counts only if the OS saves its registers on a context switch; using them otherwise
  // corrupts state. XCR0 bits: 1-2 SSE/AVX (ymm), 5-7 opmask/zmm, 17-18 AMX tile config/data.
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_saved = (xcr0 & 0x6) == 0x6;
  const bool zmm_saved = (xcr0 & 0xe6) == 0xe6;
  const bool tiles_saved = (xcr0 & 0x60000) == 0x60000;
  const CpuidBits l7 = cpuid(7, 0);
  const CpuidBits l7s1 = l7.eax >= 1 ? cpuid(7, 1) : CpuidBits{};  // eax: the highest subleaf
  auto set = [&f](bool on, CpuFeature feature) {
    if (on) f = f | feature;
  };
  set(ymm_saved && bit(l7.ebx, 5), CpuFeature::Avx2);
  set(ymm_saved && bit(l1.ecx, 12), CpuFeature::Fma);
  set(ymm_saved && bit(l1.ecx, 29), CpuFeature::F16c);
  set(zmm_saved && bit(l7.ebx, 16), CpuFeature::Avx512F);
  set(zmm_saved && bit(l7.ebx, 17), CpuFeature::Avx512Dq);
  set(zmm_saved && bit(l7.ebx, 30), CpuFeature::Avx512Bw);
  set(zmm_saved && bit(l7.ebx, 31), CpuFeature::Avx512Vl);
  set(zmm_saved && bit(l7.ecx, 11), CpuFeature::Avx512Vnni);
  set(zmm_saved && bit(l7s1.eax, 5), CpuFeature::Avx512Bf16);
  set(tiles_saved && bit(l7.edx, 24), CpuFeature::AmxTile);
  set(tiles_saved && bit(l7.edx, 25), CpuFeature::AmxInt8);
  set(tiles_saved && bit(l7.edx, 22), CpuFeature::AmxBf16);
  return f;
}

Isa isa_from_cpuid() { return best_isa(features_from_cpuid()); }

}  // namespace pyengine::cpu
