#include "bindings/bindings.h"
#include "pyengine/rms_norm.h"

namespace pyengine::bind {

void bind_rms_norm(py::module_& m) {
  m.def(
      "rms_norm",
      [](py::handle x_obj, py::handle weight_obj, py::handle out_obj, double eps) {
        Tensor x(x_obj, "x"), weight(weight_obj, "weight"), out(out_obj, "out");
        check_cpu_contiguous(x, DType::F32, -1);
        check_cpu_contiguous(weight, DType::F32, 1);
        check_cpu_contiguous(out, DType::F32, x.dim());
        check_nonempty(x);
        const int64_t dim = x.size(x.dim() - 1);
        check_size(weight, 0, dim, "the last dimension of x");
        for (int64_t d = 0; d < x.dim(); ++d) check_size(out, d, x.size(d), "the shape of x");
        check_positive(eps, "eps");
        const int64_t rows = x.numel() / dim;
        py::gil_scoped_release release;
        rms_norm(x.data<float>(), weight.data<float>(), out.data<float>(), rows, dim, static_cast<float>(eps));
      },
      py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"),
      "out = x / sqrt(mean(x^2, -1) + eps) * weight. fp32, contiguous; out may be x.");

  m.def(
      "add_rms_norm",
      [](py::handle residual_obj, py::handle delta_obj, py::handle weight_obj, py::handle out_obj, double eps) {
        Tensor residual(residual_obj, "residual"), delta(delta_obj, "delta"), weight(weight_obj, "weight"),
            out(out_obj, "out");
        check_cpu_contiguous(residual, DType::F32, -1);
        check_nonempty(residual);
        check_cpu_contiguous(delta, DType::F32, residual.dim());
        check_cpu_contiguous(weight, DType::F32, 1);
        check_cpu_contiguous(out, DType::F32, residual.dim());
        for (int64_t d = 0; d < residual.dim(); ++d) {
          check_size(delta, d, residual.size(d), "the shape of residual");
          check_size(out, d, residual.size(d), "the shape of residual");
        }
        const int64_t dim = residual.size(residual.dim() - 1);
        check_size(weight, 0, dim, "the last dimension of residual");
        check_no_overlap(out, residual);
        check_no_overlap(delta, residual);
        check_positive(eps, "eps");
        py::gil_scoped_release release;
        add_rms_norm(residual.data<float>(), delta.data<float>(), weight.data<float>(), out.data<float>(),
                     residual.numel() / dim, dim, static_cast<float>(eps));
      },
      py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("eps"),
      "residual += delta (in place), then out = rms_norm(residual). fp32, contiguous.");
}

}  // namespace pyengine::bind
