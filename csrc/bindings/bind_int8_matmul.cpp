#include "bindings/bindings.h"
#include "bindings/device_args.h"
#include "pyengine/int8_matmul.h"
#include "pyengine/linear_bf16.h"
#include "pyengine/linear_f32.h"
#include "pyengine/quantize.h"

namespace pyengine::bind {
namespace {

// A non-empty 2-D CPU operand: emptiness is checked before contiguity so an empty tensor is reported as such.
void check_cpu_matrix(const Tensor& t, DType dtype) {
  check_dtype(t, dtype);
  check_cpu(t);
  check_operand(t, 2);
}

// Checks shared by the Linear-style ops: x [M, K] fp32, w [N, K] of w_dtype, out [M, N] fp32,
// bias None or [N] fp32, optional w_scale [N] fp32. Returns the bias pointer (null for None).
const float* check_linear(const Tensor& x, const Tensor& w, DType w_dtype, const Tensor* w_scale,
                          const Tensor& out, py::handle bias_obj) {
  check_cpu_matrix(x, DType::F32);
  check_cpu_matrix(w, w_dtype);
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
      [](py::handle x_obj, py::handle q_obj, py::handle scale_obj, uintptr_t stream) {
        Tensor x(x_obj, "x"), q(q_obj, "q_out"), scale(scale_obj, "scale_out");
        check_float_dtype(x);
        check_dtype(q, DType::I8);
        check_dtype(scale, DType::F32);
        check_on_device_of(x, {&q, &scale});
        check_operand(x, 2);
        check_operand(q, 2);
        check_size(q, 0, x.size(0), "the first dimension of x");
        check_size(q, 1, x.size(1), "the last dimension of x");
        check_operand(scale, 1);
        check_size(scale, 0, x.size(0), "the first dimension of x");
        check_no_overlap(q, x);
        check_no_overlap(scale, x);
        check_no_overlap(scale, q);
        if (x.is_cuda()) {
          run_cuda(x, [&] {
            cuda::quantize_rows(x.data<void>(), q.data<int8_t>(), scale.data<float>(), x.size(0), x.size(1),
                                float_type(x), as_stream(stream));
          });
          return;
        }
        py::gil_scoped_release release;
        quantize_rows(x.data<float>(), q.data<int8_t>(), scale.data<float>(), x.size(0), x.size(1));
      },
      py::arg("x"), py::arg("q_out"), py::arg("scale_out"), py::arg("stream") = 0,
      "Symmetric per-row int8: scale_out = max|x_row| / 127, q_out = clamp(round_half_even(x / scale), "
      "-127, 127); an all-zero row gets scale 0 and q 0, a row holding a NaN or an infinity scale NaN and "
      "q 0 (so what is computed from it is NaN). x [M, K] float32 (on CUDA also float16, bfloat16), "
      "q_out [M, K] int8, scale_out [M] float32. CUDA: launched on `stream`, not synchronized.");

  m.def(
      "int8_matmul_i32",
      [](py::handle a_obj, py::handle b_obj, py::handle out_obj, uintptr_t stream) {
        Tensor a(a_obj, "a_q"), b(b_obj, "b_q"), out(out_obj, "out_i32");
        check_dtype(a, DType::I8);
        check_dtype(b, DType::I8);
        check_dtype(out, DType::I32);
        check_on_device_of(a, {&b, &out});
        check_operand(a, 2);
        check_operand(b, 2);
        check_operand(out, 2);
        check_size(b, 1, a.size(1), "the last dimension of a_q");
        check_size(out, 0, a.size(0), "the first dimension of a_q");
        check_size(out, 1, b.size(0), "the first dimension of b_q");
        check_no_overlap(out, a);
        check_no_overlap(out, b);
        if (a.is_cuda()) {
          if (a.size(1) % 32 != 0) {
            throw py::value_error("a_q: the last dimension (K) must be a multiple of 32 for the CUDA int8 GEMM, "
                                  "got shape " + a.shape_str());
          }
          check_aligned16(a);
          check_aligned16(b);
          run_cuda(a, [&] {
            cuda::int8_matmul_i32(a.data<int8_t>(), b.data<int8_t>(), out.data<int32_t>(), a.size(0), b.size(0),
                                  a.size(1), as_stream(stream));
          });
          return;
        }
        check_no_int8_min(b);
        py::gil_scoped_release release;
        int8_matmul_i32(a.data<int8_t>(), b.data<int8_t>(), out.data<int32_t>(), a.size(0), b.size(0), a.size(1));
      },
      py::arg("a_q"), py::arg("b_q"), py::arg("out_i32"), py::arg("stream") = 0,
      "out_i32 = a_q @ b_q^T exactly in int32. a_q [M, K] int8, b_q [N, K] int8. On the CPU b_q's values must "
      "be in [-127, 127] (-128 raises ValueError: AVX2's sign trick cannot negate it); on CUDA (tensor cores, "
      "sm_80+) K must be a multiple of 32 and a_q, b_q 16-byte aligned, launched on `stream`.");

  m.def(
      "int8_linear_wo",
      [](py::handle x_obj, py::handle w_obj, py::handle scale_obj, py::handle out_obj, py::handle bias_obj,
         uintptr_t stream) {
        Tensor x(x_obj, "x"), w(w_obj, "w_q"), scale(scale_obj, "w_scale"), out(out_obj, "out");
        if (x.is_cpu()) {
          const float* bias = check_linear(x, w, DType::I8, &scale, out, bias_obj);
          py::gil_scoped_release release;
          int8_linear_wo(x.data<float>(), w.data<int8_t>(), scale.data<float>(), bias, out.data<float>(), x.size(0),
                         w.size(0), x.size(1));
          return;
        }
        check_float_dtype(x);
        check_dtype(w, DType::I8);
        check_dtype(scale, DType::F32);
        check_dtype_as(out, x);
        check_on_device_of(x, {&w, &scale, &out});
        check_operand(x, 2);
        check_operand(w, 2);
        check_operand(scale, 1);
        check_operand(out, 2);
        const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
        check_size(w, 1, K, "the last dimension of x");
        check_size(scale, 0, N, "the first dimension of w_q");
        check_size(out, 0, M, "the first dimension of x");
        check_size(out, 1, N, "the first dimension of w_q");
        for (const Tensor* input : {&x, &w, &scale}) check_no_overlap(out, *input);
        const void* bias_ptr = nullptr;
        if (!bias_obj.is_none()) {
          Tensor bias(bias_obj, "bias");
          check_dtype_as(bias, x);
          check_on_device_of(x, {&bias});
          check_operand(bias, 1);
          check_size(bias, 0, N, "the first dimension of w_q");
          check_no_overlap(out, bias);
          bias_ptr = bias.data<void>();
        }
        run_cuda(x, [&] {
          cuda::int8_linear_wo(x.data<void>(), w.data<int8_t>(), scale.data<float>(), bias_ptr, out.data<void>(), M,
                               N, K, float_type(x), as_stream(stream));
        });
      },
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("out"), py::arg("bias") = py::none(),
      py::arg("stream") = 0,
      "Weight-only int8 Linear: out = x @ (w_q * w_scale[:, None])^T + bias, fp32 accumulation. x [M, K], "
      "out [M, N], bias None or [N]: float32 (on CUDA one of float16, bfloat16, float32); w_q [N, K] int8; "
      "w_scale [N] float32. CUDA: a GEMV, fastest for M <= 8, launched on `stream`.");

  def_int8_linear<int8_linear_w8a8, /*w_negated=*/true>(
      m, "int8_linear_w8a8",
      "W8A8 Linear: x is quantized per row (quantize_rows), then out[m, n] = float(sum_k xq[m, k] * "
      "w_q[n, k]) * (x_scale[m] * w_scale[n]) + bias[n]. x [M, K] fp32, w_q [N, K] int8 in [-127, 127] "
      "(-128 raises ValueError), w_scale [N], out [M, N], bias None or [N].");
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
