#include <string>

#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/silu_mul.h"

namespace pyengine::bind {
namespace {

// gate / up as rows x cols with a row stride: contiguous of any shape (rows over the last dim), or a
// 2-D view whose rows are contiguous runs, e.g. a half of a fused gate_up projection.
int64_t last_size(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(t.dim() - 1); }

int64_t row_stride(const Tensor& t) {
  if (t.is_contiguous()) return last_size(t);
  if (t.dim() != 2 || (t.size(1) > 1 && t.stride(1) != 1) || t.stride(0) < t.size(1)) {
    throw py::value_error(std::string(t.name()) + ": must be contiguous, or 2-D with contiguous rows "
                          "(stride(1) == 1, stride(0) >= size(1)); got shape " + t.shape_str());
  }
  return t.stride(0);
}

}  // namespace

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
        const int64_t gate_stride = row_stride(gate), up_stride = row_stride(up);
        check_alias_or_disjoint(out, gate);
        check_alias_or_disjoint(out, up);
        const int64_t cols = last_size(out), rows = out.numel() / cols;
        py::gil_scoped_release release;
        silu_mul(gate.data<float>(), gate_stride, up.data<float>(), up_stride, out.data<float>(), rows, cols);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"),
      "out = silu(gate) * up, elementwise, fp32. out: contiguous; gate and up: its shape, contiguous or 2-D "
      "with contiguous rows at any row stride (the two halves of a fused [rows, 2 * I] gate_up projection "
      "need no copy). out may be gate or up (same layout), not a partial overlap.");
}

}  // namespace pyengine::bind
