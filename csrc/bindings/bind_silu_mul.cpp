#include <string>

#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/silu_mul.h"

namespace pyengine::bind {

void bind_silu_mul(py::module_& m) {
  m.def(
      "silu_mul",
      [](py::handle gate_obj, py::handle up_obj, py::handle out_obj) {
        Tensor gate(gate_obj, "gate"), up(up_obj, "up"), out(out_obj, "out");
        for (const Tensor* t : {&gate, &up}) {
          check_dtype(*t, DType::F32);
          check_cpu(*t);
        }
        check_cpu_contiguous(out, DType::F32, -1);
        check_nonempty(gate);
        check_same_shape(up, gate);
        check_same_shape(out, gate);
        const int64_t gate_stride = strided_rows(gate), up_stride = strided_rows(up);
        check_alias_or_disjoint(out, gate);
        check_alias_or_disjoint(out, up);
        const int64_t cols = last_dim_size(out), rows = out.numel() / cols;
        py::gil_scoped_release release;
        silu_mul(gate.data<float>(), gate_stride, up.data<float>(), up_stride, out.data<float>(), rows, cols);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"),
      "out = silu(gate) * up, elementwise, fp32. out: contiguous; gate and up: its shape, contiguous or 2-D "
      "with contiguous rows at any row stride (the two halves of a fused [rows, 2 * I] gate_up projection "
      "need no copy). out may be gate or up (same layout), not a partial overlap.");
}

}  // namespace pyengine::bind
