#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/rope.h"

namespace pyengine::bind {

void bind_rope(py::module_& m) {
  m.def(
      "rope",
      [](py::handle x_obj, py::handle cos_obj, py::handle sin_obj, py::handle positions_obj, bool interleaved) {
        Tensor x(x_obj, "x"), cos(cos_obj, "cos"), sin(sin_obj, "sin"), positions(positions_obj, "positions");
        check_cpu_contiguous(x, DType::F32, 4);
        check_nonempty(x);
        check_cpu_contiguous(cos, DType::F32, 2);
        check_nonempty(cos);
        check_cpu_contiguous(sin, DType::F32, 2);
        check_same_shape(sin, cos);
        check_cpu_contiguous(positions, DType::I32, 2);
        const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), head_dim = x.size(3);
        if (head_dim % 2 != 0) {
          throw py::value_error("x: the head dimension (last) must be even, got shape " + x.shape_str());
        }
        check_size(cos, 1, head_dim / 2, "half the head dimension of x");
        check_size(positions, 0, batch, "the batch size of x");
        check_size(positions, 1, seq, "the sequence length of x");
        check_no_overlap(x, cos);
        check_no_overlap(x, sin);
        check_no_overlap(x, positions);
        call_without_gil([&] {
          rope(x.data<float>(), cos.data<float>(), sin.data<float>(), positions.data<int32_t>(), batch * seq,
               heads, head_dim, cos.size(0), interleaved);
        });
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("interleaved"),
      "Rotates x [B, T, H, D] in place by the angles at each token's position. cos, sin: [P, D/2] "
      "fp32 tables; positions: [B, T] int32 in [0, P). interleaved=False pairs (i, i + D/2) "
      "(Llama, NeoX), True pairs (2i, 2i + 1) (GPT-J).");
}

}  // namespace pyengine::bind
