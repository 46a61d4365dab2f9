#include "bindings/bindings.h"
#include "bindings/device_args.h"
#include "pyengine/silu_mul.h"

namespace pyengine::bind {

void bind_silu_mul(py::module_& m) {
  m.def(
      "silu_mul",
      [](py::handle gate_obj, py::handle up_obj, py::handle out_obj, uintptr_t stream) {
        Tensor gate(gate_obj, "gate"), up(up_obj, "up"), out(out_obj, "out");
        check_float_dtype(gate);
        for (Tensor* t : {&up, &out}) check_dtype_as(*t, gate);
        check_on_device_of(gate, {&up, &out});
        check_nonempty(gate);
        check_operand(out, -1);
        check_same_shape(up, gate);
        check_same_shape(out, gate);
        check_alias_or_disjoint(out, gate);
        check_alias_or_disjoint(out, up);
        if (gate.is_cuda()) {
          check_contiguous(gate);  // the CUDA kernel reads flat arrays
          check_contiguous(up);
          run_cuda(gate, [&] {
            cuda::silu_mul(gate.data<void>(), up.data<void>(), out.data<void>(), gate.numel(), float_type(gate),
                           as_stream(stream));
          });
          return;
        }
        const int64_t gate_stride = strided_rows(gate), up_stride = strided_rows(up);
        const int64_t cols = last_dim_size(out), rows = out.numel() / cols;
        py::gil_scoped_release release;
        silu_mul(gate.data<float>(), gate_stride, up.data<float>(), up_stride, out.data<float>(), rows, cols);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("stream") = 0,
      "out = silu(gate) * up, elementwise. One dtype: float32 (on CUDA also float16, bfloat16). out: contiguous; "
      "gate and up: its shape, and on the CPU contiguous or 2-D with contiguous rows at any row stride (the two "
      "halves of a fused [rows, 2 * I] gate_up projection need no copy), on CUDA contiguous. out may be gate or "
      "up (same layout), not a partial overlap. CUDA: launched on `stream`, not synchronized.");
}

}  // namespace pyengine::bind
