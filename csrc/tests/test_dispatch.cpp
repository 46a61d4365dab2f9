// ISA levels, feature detection and pick_kernel: the one place kernels choose their implementation.
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/dispatch.h"
#include "cpu/isa_levels.h"
#include "tests/test_util.h"

using namespace pyengine;

namespace {

// Levels: x86-64 is Scalar < Avx2 < Avx512; a level of another family is neither above nor below.
constexpr Isa kOtherFamilyLevel = static_cast<Isa>(0x201);
static_assert(isa_family(Isa::Scalar) == IsaFamily::Portable && isa_family(Isa::Avx512) == IsaFamily::X86);
static_assert(isa_includes(Isa::Avx512, Isa::Avx2) && isa_includes(Isa::Avx2, Isa::Avx2));
static_assert(!isa_includes(Isa::Avx2, Isa::Avx512) && !isa_includes(Isa::Scalar, Isa::Avx2));
static_assert(isa_includes(Isa::Avx2, Isa::Scalar) && isa_includes(kOtherFamilyLevel, Isa::Scalar));
static_assert(!isa_includes(Isa::Avx512, kOtherFamilyLevel) && !isa_includes(kOtherFamilyLevel, Isa::Avx2));

// What each level needs (cpu/isa_levels.h).
constexpr CpuFeatures kAvx2Set = CpuFeature::Avx2 | CpuFeature::Fma | CpuFeature::F16c;
constexpr CpuFeatures kAvx512Set = kAvx2Set | CpuFeature::Avx512F | CpuFeature::Avx512Bw | CpuFeature::Avx512Vl |
                                   CpuFeature::Avx512Dq | CpuFeature::Avx512Vnni;
static_assert(cpu::best_isa(CpuFeatures()) == Isa::Scalar);
static_assert(cpu::best_isa(CpuFeature::Avx2 | CpuFeature::Fma) == Isa::Scalar);  // no F16C
static_assert(cpu::best_isa(kAvx2Set) == Isa::Avx2);
static_assert(cpu::best_isa(kAvx2Set | CpuFeature::Avx512F | CpuFeature::Avx512Bw) == Isa::Avx2);
static_assert(cpu::best_isa(kAvx512Set) == Isa::Avx512);
static_assert(cpu::best_isa(kAvx512Set | CpuFeature::Avx512Bf16 | CpuFeature::AmxTile) == Isa::Avx512);
// AVX-512 without the AVX2 level's features is not a level (no real CPU has it).
static_assert(cpu::best_isa(CpuFeatures::from_bits(kAvx512Set.bits & ~kAvx2Set.bits)) == Isa::Scalar);

int impl_scalar() { return 0; }
int impl_avx2() { return 1; }
int impl_avx512() { return 2; }
int impl_avx2_amx() { return 3; }
using ImplFn = int (*)();

void check_names() {
  for (const cpu::IsaLevel& level : cpu::kIsaLevels) {
    PE_CHECK(parse_isa(level.name) == level.isa);
    PE_CHECK(std::strcmp(isa_name(level.isa), level.name) == 0);
  }
  try {
    parse_isa("sse9");
    PE_CHECK(false);
  } catch (const std::invalid_argument& e) {
    PE_CHECK(std::string(e.what()) == "unknown ISA 'sse9' (expected scalar, avx2 or avx512)");
  }
  for (int i = 0; i < kCpuFeatureCount; ++i) {
    PE_CHECK(std::strcmp(cpu_feature_name(static_cast<CpuFeature>(1u << i)), "unknown") != 0);
  }
}

void check_detection() {
  const CpuFeatures features = cpu_features();
  PE_CHECK(detected_isa() == cpu::best_isa(features));
  // The ladder: a CPU whose level is above scalar has every feature of the levels below it.
  for (const cpu::IsaLevel& level : cpu::kIsaLevels) {
    PE_CHECK(features.has(level.needs) == isa_includes(detected_isa(), level.isa));
  }
  const AmxPermission amx = amx_permission();
  PE_CHECK(amx.reason != nullptr && amx.granted == (*amx.reason == '\0'));
  if (!features.has(CpuFeature::AmxTile)) PE_CHECK(!amx.granted);
  PE_CHECK(amx_permission().granted == amx.granted);  // asked once
}

void check_pick_kernel() {
  const bool amx = cpu_features().has(CpuFeature::AmxTile);
  for (Isa level : testing::supported_isas()) {
    set_isa(level);
    PE_CHECK(active_isa() == level);
    const ImplFn best = cpu::pick_kernel<ImplFn>(
        {{Isa::Avx512, impl_avx512}, {Isa::Avx2, impl_avx2}, {Isa::Scalar, impl_scalar}});
    PE_CHECK(best() == (level == Isa::Avx512 ? 2 : level == Isa::Avx2 ? 1 : 0));
    // A row needing a feature beyond its level is taken only where the CPU has it.
    const ImplFn featured = cpu::pick_kernel<ImplFn>(
        {{Isa::Avx2, impl_avx2_amx, CpuFeature::AmxTile}, {Isa::Avx2, impl_avx2}, {Isa::Scalar, impl_scalar}});
    PE_CHECK(featured() == (level == Isa::Scalar ? 0 : amx ? 3 : 1));
    // Rows of another family are never taken; a table without a Scalar row may find nothing.
    const ImplFn other = cpu::pick_kernel<ImplFn>({{kOtherFamilyLevel, impl_avx512}, {Isa::Scalar, impl_scalar}});
    PE_CHECK(other() == 0);
    const ImplFn none = cpu::pick_kernel<ImplFn>({{Isa::Avx2, impl_avx2}});
    PE_CHECK((none == nullptr) == (level == Isa::Scalar));
  }
  // set_isa refuses a level the CPU lacks, and one of another family.
  for (Isa above : {Isa::Avx2, Isa::Avx512, kOtherFamilyLevel}) {
    if (isa_includes(detected_isa(), above)) continue;
    bool threw = false;
    try {
      set_isa(above);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    PE_CHECK(threw);
  }
  set_isa(detected_isa());
}

}  // namespace

int main() {
  check_names();
  check_detection();
  check_pick_kernel();
  std::printf("test_dispatch: ok (detected %s)\n", isa_name(detected_isa()));
  return 0;
}
