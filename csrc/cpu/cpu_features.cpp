#include "pyengine/cpu_features.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/isa_detect.h"

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
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int>& active_level() {
  static std::atomic<int> level{static_cast<int>(initial_isa())};
  return level;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = cpu::isa_from_cpuid();
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
