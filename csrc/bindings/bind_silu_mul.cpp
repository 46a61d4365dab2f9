#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/silu_mul.h"

namespace pyengine::bind {

void bind_silu_mul(py::module_& m) {
  m.def(
      "silu_mul",
      [](py::handle gate_obj, py::handle up_obj, py::handle out_obj) {
        Tensor gate(gate_obj, "gate"), up(up_obj, "up"), out(out_obj, "out");
        check_cpu_contiguous(gate, DType::F32, -1);
        check_cpu_contiguous(up, DType::F32, -1);
        check_cpu_contiguous(out, DType::F32, -1);
        check_nonempty(gate);
        check_same_shape(up, gate);
        check_same_shape(out, gate);
        check_alias_or_disjoint(out, gate);
        check_alias_or_disjoint(out, up);
        py::gil_scoped_release release;
        silu_mul(gate.data<float>(), up.data<float>(), out.data<float>(), gate.numel());
      },
      py::arg("gate"), py::arg("up"), py::arg("out"),
      "out = silu(gate) * up, elementwise. fp32, contiguous, one shape (e.g. [N, I]); out may be gate or up.");
}

}  // namespace pyengine::bind
