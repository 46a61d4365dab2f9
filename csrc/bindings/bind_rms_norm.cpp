#include "bindings/bindings.h"
#include "bindings/device_args.h"
#include "pyengine/rms_norm.h"

namespace pyengine::bind {

void bind_rms_norm(py::module_& m) {
  m.def(
      "rms_norm",
      [](py::handle x_obj, py::handle weight_obj, py::handle out_obj, double eps, uintptr_t stream) {
        Tensor x(x_obj, "x"), weight(weight_obj, "weight"), out(out_obj, "out");
        check_float_dtype(x);
        check_operand(x, -1);
        for (Tensor* t : {&weight, &out}) check_dtype_as(*t, x);
        check_on_device_of(x, {&weight, &out});
        check_operand(weight, 1);
        check_operand(out, x.dim());
        for (int64_t d = 0; d < x.dim(); ++d) check_size(out, d, x.size(d), "the shape of x");
        const int64_t dim = x.size(x.dim() - 1), rows = x.numel() / dim;
        check_size(weight, 0, dim, "the last dimension of x");
        check_alias_or_disjoint(out, x);
        check_no_overlap(out, weight);
        check_positive(eps, "eps");
        if (x.is_cuda()) {
          run_cuda(x, [&] {
            cuda::rms_norm(x.data<void>(), weight.data<void>(), out.data<void>(), rows, dim, static_cast<float>(eps),
                           float_type(x), as_stream(stream));
          });
          return;
        }
        py::gil_scoped_release release;
        rms_norm(x.data<float>(), weight.data<float>(), out.data<float>(), rows, dim, static_cast<float>(eps));
      },
      py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream") = 0,
      "out = x / sqrt(mean(x^2, -1) + eps) * weight, sums in fp32. x, weight, out: one dtype (float32; on CUDA "
      "also float16, bfloat16), contiguous, one device; out may be x. CUDA: launched on `stream` "
      "(torch.cuda.current_stream().cuda_stream), not synchronized.");

  m.def(
      "add_rms_norm",
      [](py::handle residual_obj, py::handle delta_obj, py::handle weight_obj, py::handle out_obj, double eps,
         uintptr_t stream) {
        Tensor residual(residual_obj, "residual"), delta(delta_obj, "delta"), weight(weight_obj, "weight"),
            out(out_obj, "out");
        check_float_dtype(residual);
        check_operand(residual, -1);
        for (Tensor* t : {&delta, &weight, &out}) check_dtype_as(*t, residual);
        check_on_device_of(residual, {&delta, &weight, &out});
        check_operand(delta, residual.dim());
        check_operand(weight, 1);
        check_operand(out, residual.dim());
        for (int64_t d = 0; d < residual.dim(); ++d) {
          check_size(delta, d, residual.size(d), "the shape of residual");
          check_size(out, d, residual.size(d), "the shape of residual");
        }
        const int64_t dim = residual.size(residual.dim() - 1), rows = residual.numel() / dim;
        check_size(weight, 0, dim, "the last dimension of residual");
        check_no_overlap(out, residual);
        check_no_overlap(out, delta);
        check_no_overlap(out, weight);
        check_no_overlap(delta, residual);
        check_no_overlap(weight, residual);
        check_positive(eps, "eps");
        if (residual.is_cuda()) {
          run_cuda(residual, [&] {
            cuda::add_rms_norm(residual.data<void>(), delta.data<void>(), weight.data<void>(), out.data<void>(), rows,
                               dim, static_cast<float>(eps), float_type(residual), as_stream(stream));
          });
          return;
        }
        py::gil_scoped_release release;
        add_rms_norm(residual.data<float>(), delta.data<float>(), weight.data<float>(), out.data<float>(), rows, dim,
                     static_cast<float>(eps));
      },
      py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream") = 0,
      "residual += delta (in place, rounded to its dtype), then out = rms_norm(residual). Devices and dtypes as "
      "rms_norm; out overlaps nothing.");
}

}  // namespace pyengine::bind
