#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/gelu.h"

namespace pyengine::bind {

void bind_gelu(py::module_& m) {
  m.def(
      "gelu",
      [](py::handle x_obj, py::handle out_obj) {
        Tensor x(x_obj, "x"), out(out_obj, "out");
        check_cpu_contiguous(x, DType::F32, -1);
        check_cpu_contiguous(out, DType::F32, -1);
        check_nonempty(x);
        check_same_shape(out, x);
        check_alias_or_disjoint(out, x);
        py::gil_scoped_release release;
        gelu(x.data<float>(), out.data<float>(), x.numel());
      },
      py::arg("x"), py::arg("out"),
      "out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GPT-2's gelu_new). fp32, contiguous; out may be x.");
}

}  // namespace pyengine::bind
