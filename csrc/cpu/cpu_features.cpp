#include "pyengine/cpu_features.h"

#include <omp.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/isa_detect.h"
#include "cpu/isa_levels.h"

namespace pyengine {
namespace {

Isa initial_isa() {
  const Isa best = detected_isa();
  const char* env = std::getenv("PYENGINE_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa wanted;
  try {
    wanted = parse_isa(env);  // a typo in the variable is an error, not a silent default
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("PYENGINE_ISA: ") + e.what());  // say where the value came from
  }
  return isa_includes(best, wanted) ? wanted : best;  // a cap above the CPU's best is no cap
}

std::atomic<int>& active_level() {
  static std::atomic<int> level{static_cast<int>(initial_isa())};
  return level;
}

AmxPermission request_amx_permission() {
  if (!cpu_features().has(CpuFeature::AmxTile)) return {false, "the CPU or OS has no AMX tile state"};
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023;  // <asm/prctl.h> (Linux 5.16+); not in older headers
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return {true, ""};
  static const std::string refused = std::string("arch_prctl(ARCH_REQ_XCOMP_PERM) refused: ") + std::strerror(errno);
  return {false, refused.c_str()};
#else
  return {false, "requested only on Linux x86-64"};
#endif
}

}  // namespace

CpuFeatures cpu_features() {
  static const CpuFeatures features = cpu::features_from_cpuid();
  return features;
}

Isa detected_isa() {
  static const Isa isa = cpu::best_isa(cpu_features());
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_level().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (!isa_includes(detected_isa(), isa)) {
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa) +
                                " (best available: " + isa_name(detected_isa()) + ")");
  }
  active_level().store(static_cast<int>(isa));
}

const char* isa_name(Isa isa) {
  for (const cpu::IsaLevel& level : cpu::kIsaLevels) {
    if (level.isa == isa) return level.name;
  }
  return "unknown";
}

Isa parse_isa(const char* name) {
  std::string expected;  // "scalar, avx2 or avx512"
  const size_t count = sizeof(cpu::kIsaLevels) / sizeof(cpu::kIsaLevels[0]);
  for (size_t i = 0; i < count; ++i) {
    if (std::strcmp(name, cpu::kIsaLevels[i].name) == 0) return cpu::kIsaLevels[i].isa;
    expected += std::string(i == 0 ? "" : i + 1 == count ? " or " : ", ") + cpu::kIsaLevels[i].name;
  }
  throw std::invalid_argument(std::string("unknown ISA '") + name + "' (expected " + expected + ")");
}

const char* cpu_feature_name(CpuFeature f) {
  switch (f) {  // no default: the compiler warns about a feature left out
    case CpuFeature::Avx2: return "avx2";
    case CpuFeature::Fma: return "fma";
    case CpuFeature::F16c: return "f16c";
    case CpuFeature::Avx512F: return "avx512f";
    case CpuFeature::Avx512Bw: return "avx512bw";
    case CpuFeature::Avx512Vl: return "avx512vl";
    case CpuFeature::Avx512Dq: return "avx512dq";
    case CpuFeature::Avx512Vnni: return "avx512_vnni";
    case CpuFeature::Avx512Bf16: return "avx512_bf16";
    case CpuFeature::AmxTile: return "amx_tile";
    case CpuFeature::AmxInt8: return "amx_int8";
    case CpuFeature::AmxBf16: return "amx_bf16";
  }
  return "unknown";
}
static_assert(static_cast<uint32_t>(CpuFeature::AmxBf16) == 1u << (kCpuFeatureCount - 1),
              "kCpuFeatureCount counts the CpuFeature bits");

AmxPermission amx_permission() {
  static const AmxPermission permission = request_amx_permission();
  return permission;
}

// The count set, for every thread: omp_set_num_threads alone sets only the calling thread's
// (OpenMP's nthreads-var is per thread), so kernels called from another thread (a server's worker)
// would still take every core. Each parallel region asks num_threads() instead. 0: not set.
std::atomic<int> g_num_threads{0};

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be at least 1");
  g_num_threads.store(n, std::memory_order_relaxed);
  omp_set_num_threads(n);
}

int num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace pyengine
