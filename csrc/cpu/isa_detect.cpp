#include "cpu/isa_detect.h"

#include <cpuid.h>

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

}  // namespace

Isa isa_from_cpuid() {
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::Scalar;
  const CpuidBits l1 = cpuid(1, 0);
  const bool osxsave = l1.ecx & (1u << 27);
  const bool fma = l1.ecx & (1u << 12);
  const bool f16c = l1.ecx & (1u << 29);
  if (!osxsave) return Isa::Scalar;  // and xgetbv would fault
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

}  // namespace pyengine::cpu
