#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/gelu.h"

namespace pyengine::bind {

void bind_gelu(py::module_& m) {
  m.def(
      "gelu",
      [](py::handle x_obj, py::handle out_obj) {
        Tensor x(x_obj, "x"), out(out_obj, "out");
        check_elementwise_f32(x, out);
        py::gil_scoped_release release;
        gelu(x.data<float>(), out.data<float>(), x.numel());
      },
      py::arg("x"), py::arg("out"),
      "out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GPT-2's gelu_new). fp32, contiguous; out may be x.");

  m.def(
      "gelu_mul",
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
        gelu_mul(gate.data<float>(), gate_stride, up.data<float>(), up_stride, out.data<float>(), rows, cols);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"),
      "out = gelu(gate) * up with the tanh GELU (Gemma's GeGLU), fp32. Layouts as silu_mul: out contiguous; "
      "gate and up contiguous or 2-D with contiguous rows at any row stride; out may be gate or up.");

  m.def(
      "softcap",
      [](py::handle x_obj, py::handle out_obj, double cap) {
        Tensor x(x_obj, "x"), out(out_obj, "out");
        check_elementwise_f32(x, out);
        check_positive(cap, "cap");
        py::gil_scoped_release release;
        softcap(x.data<float>(), out.data<float>(), x.numel(), static_cast<float>(cap));
      },
      py::arg("x"), py::arg("out"), py::arg("cap"),
      "out = cap * tanh(x / cap) (Gemma's final logit soft-capping), fp32, contiguous; out may be x; cap > 0.");
}

}  // namespace pyengine::bind
