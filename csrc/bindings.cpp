// The one Python module, pyengine._C. Thin: each bind_* function checks arguments, releases the
// GIL and calls the op's public C++ API (csrc/include/pyengine/).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "bindings/bindings.h"
#include "cpu/isa_levels.h"
#include "pyengine/cpu_features.h"
#include "pyengine/cuda_ops.h"

namespace py = pybind11;
using namespace pyengine;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine kernel library";

  m.def("detected_isa", [] { return isa_name(detected_isa()); },
        "Best SIMD level this CPU supports: scalar, avx2 or avx512.");
  m.def("active_isa", [] { return isa_name(active_isa()); },
        "SIMD level the kernels use now (detected, capped by PYENGINE_ISA or set_isa).");
  m.def("set_isa", [](const std::string& name) {
    try {
      set_isa(parse_isa(name.c_str()));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("name"), "Cap the SIMD level: scalar, avx2 or avx512.");
  m.def("cpu_features", [] {
    std::vector<std::pair<std::string, bool>> flags;  // in CpuFeature order, for printing
    for (int i = 0; i < kCpuFeatureCount; ++i) {
      const auto f = static_cast<CpuFeature>(1u << i);
      flags.emplace_back(cpu_feature_name(f), cpu_features().has(f));
    }
    return flags;
  }, "CPU features as (name, usable) pairs: the CPU has it and the OS saves its registers.");
  m.def("amx_permission", [] {
    const AmxPermission p = amx_permission();
    return std::make_pair(p.granted, std::string(p.reason));
  }, "(granted, reason): whether the OS let this process use AMX tiles (asked once, on the first call).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("isa_levels", [] {
    std::vector<std::string> names;
    for (const cpu::IsaLevel& level : cpu::kIsaLevels) names.emplace_back(level.name);
    return names;
  }, "Every ISA level the kernels dispatch to, lowest first (the C++ table, csrc/cpu/isa_levels.h).");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const cpu::IsaLevel& level : cpu::kIsaLevels) {
      if (isa_includes(detected_isa(), level.isa)) names.emplace_back(level.name);
    }
    return names;
  }, "The ISA levels this CPU runs (set_isa accepts them), lowest first.");
  m.def("cuda_device_count", &cuda::device_count,
        "Number of CUDA devices the kernels can use; 0 without a GPU, a driver, or a CUDA build.");
  m.def("num_threads", &num_threads);
#ifdef PYENGINE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif

  bind::bind_rms_norm(m);
  bind::bind_small_ops(m);
  bind::bind_attention(m);
  bind::bind_int8_matmul(m);
  bind::bind_decode_plan(m);
  bind::bind_memory_read(m);
}
