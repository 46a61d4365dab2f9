#include <optional>

#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/layer_norm.h"

namespace pyengine::bind {
namespace {

// weight: [dim]; bias: [dim] or None. Returns bias's data pointer, null for None.
const float* check_affine(const Tensor& weight, const std::optional<Tensor>& bias, int64_t dim, const char* what) {
  check_cpu_contiguous(weight, DType::F32, 1);
  check_size(weight, 0, dim, what);
  if (!bias) return nullptr;
  check_cpu_contiguous(*bias, DType::F32, 1);
  check_size(*bias, 0, dim, what);
  return bias->data<float>();
}

std::optional<Tensor> optional_tensor(py::handle obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return Tensor(obj, name);
}

}  // namespace

void bind_layer_norm(py::module_& m) {
  m.def(
      "layer_norm",
      [](py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle out_obj, double eps) {
        Tensor x(x_obj, "x"), weight(weight_obj, "weight"), out(out_obj, "out");
        const std::optional<Tensor> bias = optional_tensor(bias_obj, "bias");
        check_cpu_contiguous(x, DType::F32, -1);
        check_nonempty(x);
        if (x.dim() == 0) throw py::value_error("x: expected at least 1 dimension, got a scalar");
        check_cpu_contiguous(out, DType::F32, -1);
        check_same_shape(out, x);
        check_alias_or_disjoint(out, x);
        const int64_t dim = x.size(x.dim() - 1);
        const float* bias_data = check_affine(weight, bias, dim, "the last dimension of x");
        check_positive(eps, "eps");
        py::gil_scoped_release release;
        layer_norm(x.data<float>(), weight.data<float>(), bias_data, out.data<float>(), x.numel() / dim, dim,
                   static_cast<float>(eps));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("eps"),
      "out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, like "
      "torch.nn.functional.layer_norm. fp32, contiguous; bias may be None; out may be x.");

  m.def(
      "add_layer_norm",
      [](py::handle residual_obj, py::handle delta_obj, py::handle weight_obj, py::handle bias_obj,
         py::handle out_obj, double eps) {
        Tensor residual(residual_obj, "residual"), delta(delta_obj, "delta"), weight(weight_obj, "weight"),
            out(out_obj, "out");
        const std::optional<Tensor> bias = optional_tensor(bias_obj, "bias");
        check_cpu_contiguous(residual, DType::F32, -1);
        check_nonempty(residual);
        if (residual.dim() == 0) throw py::value_error("residual: expected at least 1 dimension, got a scalar");
        check_cpu_contiguous(delta, DType::F32, -1);
        check_same_shape(delta, residual);
        check_cpu_contiguous(out, DType::F32, -1);
        check_same_shape(out, residual);
        check_no_overlap(out, residual);
        check_no_overlap(delta, residual);
        const int64_t dim = residual.size(residual.dim() - 1);
        const float* bias_data = check_affine(weight, bias, dim, "the last dimension of residual");
        check_positive(eps, "eps");
        py::gil_scoped_release release;
        add_layer_norm(residual.data<float>(), delta.data<float>(), weight.data<float>(), bias_data,
                       out.data<float>(), residual.numel() / dim, dim, static_cast<float>(eps));
      },
      py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("eps"),
      "residual += delta (in place), then out = layer_norm(residual). fp32, contiguous; bias may be None.");
}

}  // namespace pyengine::bind
