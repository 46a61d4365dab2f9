#include "bindings/bindings.h"
#include "pyengine/int8_matmul.h"
#include "pyengine/linear_bf16.h"
#include "pyengine/quantize.h"

namespace pyengine::bind {
namespace {

// A non-empty operand: emptiness is checked before contiguity so an empty tensor is reported as such.
void check_operand(const Tensor& t, DType dtype) {
  check_dtype(t, dtype);
  check_cpu(t);
  check_dim(t, 2);
  check_nonempty(t);
  check_contiguous(t);
}

// Checks shared by the Linear-style ops: x [M, K] fp32, w [N, K] of w_dtype, out [M, N] fp32,
// bias None or [N] fp32, optional w_scale [N] fp32. Returns the bias pointer (null for None).
const float* check_linear(const Tensor& x, const Tensor& w, DType w_dtype, const Tensor* w_scale,
                          const Tensor& out, py::handle bias_obj) {
  check_operand(x, DType::F32);
  check_operand(w, w_dtype);
  check_size(w, 1, x.size(1), "the last dimension of x");
  const int64_t N = w.size(0);
  if (w_scale != nullptr) {
    check_cpu_contiguous(*w_scale, DType::F32, 1);
    check_size(*w_scale, 0, N, "the first dimension of w_q");
  }
  check_cpu_contiguous(out, DType::F32, 2);
  check_size(out, 0, x.size(0), "the first dimension of x");
  check_size(out, 1, N, "the first dimension of the weight");
  check_no_overlap(out, x);
  check_no_overlap(out, w);
  if (w_scale != nullptr) check_no_overlap(out, *w_scale);
  if (bias_obj.is_none()) return nullptr;
  Tensor bias(bias_obj, "bias");
  check_cpu_contiguous(bias, DType::F32, 1);
  check_size(bias, 0, N, "the first dimension of the weight");
  check_no_overlap(out, bias);
  return bias.data<float>();
}

// The Linears with float weights (fp32, or bf16 kept as 16-bit patterns): one signature, one set of
// checks; the weight's element type and the kernel differ.
template <typename W, DType WDType, void (*Kernel)(const float*, const W*, const float*, float*, int64_t, int64_t,
                                                   int64_t)>
void def_float_linear(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](py::handle x_obj, py::handle w_obj, py::handle out_obj, py::handle bias_obj) {
        Tensor x(x_obj, "x"), w(w_obj, "w"), out(out_obj, "out");
        const float* bias = check_linear(x, w, WDType, nullptr, out, bias_obj);
        py::gil_scoped_release release;
        Kernel(x.data<float>(), w.data<W>(), bias, out.data<float>(), x.size(0), w.size(0), x.size(1));
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("bias") = py::none(), doc);
}

// The int8-weight Linears share one signature and one set of checks; only the kernel differs.
using Int8LinearFn = void (*)(const float*, const int8_t*, const float*, const float*, float*, int64_t, int64_t,
                              int64_t);

// w_negated: the kernel applies the activations' signs to w_q (W8A8 on AVX2), which -128 breaks.
template <Int8LinearFn Kernel, bool w_negated = false>
void def_int8_linear(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](py::handle x_obj, py::handle w_obj, py::handle scale_obj, py::handle out_obj, py::handle bias_obj) {
        Tensor x(x_obj, "x"), w(w_obj, "w_q"), scale(scale_obj, "w_scale"), out(out_obj, "out");
        const float* bias = check_linear(x, w, DType::I8, &scale, out, bias_obj);
        if (w_negated) check_no_int8_min(w);
        py::gil_scoped_release release;
        Kernel(x.data<float>(), w.data<int8_t>(), scale.data<float>(), bias, out.data<float>(), x.size(0), w.size(0),
               x.size(1));
      },
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("out"), py::arg("bias") = py::none(), doc);
}

}  // namespace

void bind_int8_matmul(py::module_& m) {
  m.def(
      "quantize_rows",
      [](py::handle x_obj, py::handle q_obj, py::handle scale_obj) {
        Tensor x(x_obj, "x"), q(q_obj, "q_out"), scale(scale_obj, "scale_out");
        check_operand(x, DType::F32);
        check_cpu_contiguous(q, DType::I8, 2);
        check_size(q, 0, x.size(0), "the first dimension of x");
        check_size(q, 1, x.size(1), "the last dimension of x");
        check_cpu_contiguous(scale, DType::F32, 1);
        check_size(scale, 0, x.size(0), "the first dimension of x");
        check_no_overlap(q, x);
        check_no_overlap(scale, x);
        check_no_overlap(scale, q);
        py::gil_scoped_release release;
        quantize_rows(x.data<float>(), q.data<int8_t>(), scale.data<float>(), x.size(0), x.size(1));
      },
      py::arg("x"), py::arg("q_out"), py::arg("scale_out"),
      "Symmetric per-row int8: scale_out = max|x_row| / 127, q_out = clamp(round_half_even(x / scale), "
      "-127, 127); an all-zero row gets scale 0 and q 0, a row holding a NaN or an infinity scale NaN and "
      "q 0 (so what is computed from it is NaN). x [M, K] fp32, q_out [M, K] int8, scale_out [M] fp32.");

  m.def(
      "int8_matmul_i32",
      [](py::handle a_obj, py::handle b_obj, py::handle out_obj) {
        Tensor a(a_obj, "a_q"), b(b_obj, "b_q"), out(out_obj, "out_i32");
        check_operand(a, DType::I8);
        check_operand(b, DType::I8);
        check_no_int8_min(b);
        check_size(b, 1, a.size(1), "the last dimension of a_q");
        check_cpu_contiguous(out, DType::I32, 2);
        check_size(out, 0, a.size(0), "the first dimension of a_q");
        check_size(out, 1, b.size(0), "the first dimension of b_q");
        check_no_overlap(out, a);
        check_no_overlap(out, b);
        py::gil_scoped_release release;
        int8_matmul_i32(a.data<int8_t>(), b.data<int8_t>(), out.data<int32_t>(), a.size(0), b.size(0), a.size(1));
      },
      py::arg("a_q"), py::arg("b_q"), py::arg("out_i32"),
      "out_i32 = a_q @ b_q^T exactly in int32. a_q [M, K] int8, b_q [N, K] int8 with values in [-127, 127] "
      "(-128 in b_q raises ValueError: AVX2's sign trick cannot negate it).");

  def_int8_linear<int8_linear, /*w_negated=*/true>(
      m, "int8_linear",
      "W8A8 Linear: x is quantized per row (quantize_rows), then out[m, n] = float(sum_k xq[m, k] * "
      "w_q[n, k]) * (x_scale[m] * w_scale[n]) + bias[n]. x [M, K] fp32, w_q [N, K] int8 in [-127, 127] "
      "(-128 raises ValueError), w_scale [N], out [M, N], bias None or [N].");
  def_int8_linear<int8_linear_wo>(
      m, "int8_linear_wo", "Weight-only int8 Linear: out = x @ (w_q * w_scale[:, None])^T + bias, fp32 accumulation.");
  def_int8_linear<int8_linear_a16>(
      m, "int8_linear_a16",
      "W8A16 Linear, the fused-int8 engine's: x rows quantized to int16 (x_scale = max|x_row| / 32767, "
      "round half to even), out[m, n] = float(exact sum_k xq[m, k] * w_q[n, k]) * (x_scale[m] * "
      "w_scale[n]) + bias[n]. x [M, K] fp32, w_q [N, K] int8 (any value; -128 too is "
      "exact), w_scale [N], out [M, N], bias None or [N].");

  def_float_linear<float, DType::F32, linear_f32>(
      m, "linear_f32", "fp32 Linear: out = x @ w^T + bias. x [M, K], w [N, K], out [M, N], bias None or [N].");
  def_float_linear<uint16_t, DType::BF16, linear_bf16>(
      m, "linear_bf16",
      "bf16-weight Linear: out = x @ float(w)^T + bias, fp32 sums. x [M, K] float32, w [N, K] bfloat16, "
      "out [M, N] float32, bias None or [N] float32.");
}

}  // namespace pyengine::bind
