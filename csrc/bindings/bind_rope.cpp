#include "bindings/bindings.h"
#include "bindings/device_args.h"
#include "pyengine/rope.h"

namespace pyengine::bind {

void bind_rope(py::module_& m) {
  m.def(
      "rope",
      [](py::handle x_obj, py::handle cos_obj, py::handle sin_obj, py::handle positions_obj, bool interleaved,
         uintptr_t stream) {
        Tensor x(x_obj, "x"), cos(cos_obj, "cos"), sin(sin_obj, "sin"), positions(positions_obj, "positions");
        check_float_dtype(x);
        check_dtype(cos, DType::F32);
        check_dtype(sin, DType::F32);
        check_dtype(positions, DType::I32);
        check_on_device_of(x, {&cos, &sin, &positions});
        check_operand(x, 4);
        check_operand(cos, 2);
        check_operand(sin, 2);
        check_same_shape(sin, cos);
        check_operand(positions, 2);
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
        if (x.is_cuda()) {
          run_cuda(x, [&] {
            cuda::rope(x.data<void>(), cos.data<float>(), sin.data<float>(), positions.data<int32_t>(), batch * seq,
                       heads, head_dim, cos.size(0), interleaved, float_type(x), as_stream(stream));
          });
          return;
        }
        call_without_gil([&] {  // the CPU kernel checks positions against the table (ValueError)
          rope(x.data<float>(), cos.data<float>(), sin.data<float>(), positions.data<int32_t>(), batch * seq, heads,
               head_dim, cos.size(0), interleaved);
        });
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("interleaved"), py::arg("stream") = 0,
      "Rotates x [B, T, H, D] in place by the angles at each token's position. cos, sin: [P, D/2] fp32 tables; "
      "positions: [B, T] int32 in [0, P). interleaved=False pairs (i, i + D/2) (Llama, NeoX), True pairs "
      "(2i, 2i + 1) (GPT-J). x: float32 (on CUDA also float16, bfloat16). On the CPU a position outside [0, P) "
      "raises ValueError; on CUDA (positions live on the GPU, unchecked on the host) that token is left "
      "unrotated. CUDA: launched on `stream`, not synchronized.");
}

}  // namespace pyengine::bind
