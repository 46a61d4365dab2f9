#include "bindings/bindings.h"
#include "pyengine/argmax.h"

namespace pyengine::bind {

void bind_argmax(py::module_& m) {
  m.def(
      "argmax_rows",
      [](py::handle x_obj, py::handle out_obj) {
        Tensor x(x_obj, "x"), out(out_obj, "out");
        check_cpu_contiguous(x, DType::F32, 2);
        check_nonempty(x);
        check_cpu_contiguous(out, DType::I64, 1);
        check_size(out, 0, x.size(0), "the rows of x");
        check_no_overlap(out, x);
        py::gil_scoped_release release;
        argmax_rows(x.data<float>(), x.size(0), x.size(1), out.data<int64_t>());
      },
      py::arg("x"), py::arg("out"),
      "out[r] = the first index of the maximum of row r (a row with NaN: its first NaN), numpy's argmax. "
      "x [rows, cols] fp32 contiguous, out [rows] int64.");
}

}  // namespace pyengine::bind
