// Bindings of the CUDA kernels (pyengine/cuda_ops.h): _C.cuda_*. Compiled in both builds; without
// PYENGINE_WITH_CUDA, bind_cuda registers nothing. Each function checks every tensor (CUDA, one
// device, dtype, rank, shape, contiguity, overlap) before anything is launched, makes that device
// current, releases the GIL and launches on `stream` (torch.cuda.current_stream().cuda_stream, an
// int). Nothing synchronizes: errors inside a kernel surface at torch's next sync.
#include "bindings/bindings.h"

#ifdef PYENGINE_WITH_CUDA
#include <cmath>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "bindings/small_ops_args.h"
#include "pyengine/cuda_ops.h"
#endif

namespace pyengine::bind {

#ifdef PYENGINE_WITH_CUDA
namespace {

using cuda::FloatType;

// The kernels' element type for a float tensor: float16, bfloat16 or float32.
FloatType float_type(const Tensor& t) {
  switch (t.dtype()) {
    case DType::F16: return FloatType::F16;
    case DType::BF16: return FloatType::BF16;
    case DType::F32: return FloatType::F32;
    default:
      throw py::type_error(std::string(t.name()) + ": expected dtype float16, bfloat16 or float32, got " +
                           t.dtype_str());
  }
}

// A non-empty contiguous CUDA tensor of rank ndim (-1: any rank >= 1).
void check_cuda_operand(const Tensor& t, int64_t ndim) {
  if (!t.is_cuda()) throw py::value_error(std::string(t.name()) + ": expected a CUDA tensor, got a CPU tensor");
  if (ndim >= 0) check_dim(t, ndim);
  if (t.dim() == 0) throw py::value_error(std::string(t.name()) + ": expected at least one dimension");
  check_nonempty(t);  // before contiguity: an empty tensor's strides need not look contiguous
  check_contiguous(t);
}

void check_dtype_as(const Tensor& t, const Tensor& ref) {
  if (t.dtype() != ref.dtype()) {
    throw py::type_error(std::string(t.name()) + ": expected the dtype of " + ref.name() + " (" +
                         dtype_name(ref.dtype()) + "), got " + t.dtype_str());
  }
}

void check_one_device(const Tensor& ref, std::initializer_list<const Tensor*> others) {
  for (const Tensor* t : others) {
    if (t->device_index() != ref.device_index()) {
      throw py::value_error(std::string(t->name()) + " is on cuda:" + std::to_string(t->device_index()) + " but " +
                            ref.name() + " is on cuda:" + std::to_string(ref.device_index()) +
                            ": all tensors must be on one device");
    }
  }
}

// For the kernels' vector loads.
void check_aligned16(const Tensor& t) {
  if (t.address() % 16 != 0) {
    throw py::value_error(std::string(t.name()) + ": data pointer must be 16-byte aligned (call .clone())");
  }
}

void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// Launches fn with the GIL released and `device` current; the launch functions' invalid_argument
// becomes ValueError, their runtime_error (a CUDA error) RuntimeError.
template <typename Fn>
void launch_on(int device, Fn fn) {
  try {
    py::gil_scoped_release release;
    cuda::DeviceGuard guard(device);
    fn();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_device_count", &cuda::device_count,
        "Number of CUDA devices the kernels can use; 0 when there is no GPU or no driver.");

  m.def(
      "cuda_rms_norm",
      [](py::handle x_obj, py::handle weight_obj, py::handle out_obj, double eps, uintptr_t stream) {
        Tensor x(x_obj, "x"), weight(weight_obj, "weight"), out(out_obj, "out");
        check_cuda_operand(x, -1);
        const FloatType type = float_type(x);
        check_cuda_operand(weight, 1);
        check_dtype_as(weight, x);
        check_cuda_operand(out, -1);
        check_dtype_as(out, x);
        check_same_shape(out, x);
        check_one_device(x, {&weight, &out});
        const int64_t dim = x.size(x.dim() - 1);
        check_size(weight, 0, dim, "the last dimension of x");
        check_alias_or_disjoint(out, x);
        check_no_overlap(out, weight);
        check_positive(eps, "eps");
        launch_on(x.device_index(), [&] {
          cuda::rms_norm(x.data<void>(), weight.data<void>(), out.data<void>(), x.numel() / dim, dim,
                         static_cast<float>(eps), type, as_stream(stream));
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream"),
      "CUDA RMSNorm: out = x / sqrt(mean(x^2, -1) + eps) * weight. x, weight, out: one dtype "
      "(float16, bfloat16, float32), contiguous; out may be x. Launched on `stream`.");

  m.def(
      "cuda_add_rms_norm",
      [](py::handle residual_obj, py::handle delta_obj, py::handle weight_obj, py::handle out_obj, double eps,
         uintptr_t stream) {
        Tensor residual(residual_obj, "residual"), delta(delta_obj, "delta"), weight(weight_obj, "weight"),
            out(out_obj, "out");
        check_cuda_operand(residual, -1);
        const FloatType type = float_type(residual);
        for (Tensor* t : {&delta, &out}) {
          check_cuda_operand(*t, -1);
          check_dtype_as(*t, residual);
          check_same_shape(*t, residual);
        }
        check_cuda_operand(weight, 1);
        check_dtype_as(weight, residual);
        check_one_device(residual, {&delta, &weight, &out});
        const int64_t dim = residual.size(residual.dim() - 1);
        check_size(weight, 0, dim, "the last dimension of residual");
        check_no_overlap(out, residual);
        check_no_overlap(out, delta);
        check_no_overlap(out, weight);
        check_no_overlap(delta, residual);
        check_no_overlap(weight, residual);
        check_positive(eps, "eps");
        launch_on(residual.device_index(), [&] {
          cuda::add_rms_norm(residual.data<void>(), delta.data<void>(), weight.data<void>(), out.data<void>(),
                             residual.numel() / dim, dim, static_cast<float>(eps), type, as_stream(stream));
        });
      },
      py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream"),
      "CUDA: residual += delta (in place, rounded to its dtype), then out = rms_norm(residual).");

  m.def(
      "cuda_rope",
      [](py::handle x_obj, py::handle cos_obj, py::handle sin_obj, py::handle positions_obj, bool interleaved,
         uintptr_t stream) {
        Tensor x(x_obj, "x"), cos(cos_obj, "cos"), sin(sin_obj, "sin"), positions(positions_obj, "positions");
        check_cuda_operand(x, 4);
        const FloatType type = float_type(x);
        check_cuda_operand(cos, 2);
        check_dtype(cos, DType::F32);
        check_cuda_operand(sin, 2);
        check_dtype(sin, DType::F32);
        check_same_shape(sin, cos);
        check_cuda_operand(positions, 2);
        check_dtype(positions, DType::I32);
        check_one_device(x, {&cos, &sin, &positions});
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
        launch_on(x.device_index(), [&] {
          cuda::rope(x.data<void>(), cos.data<float>(), sin.data<float>(), positions.data<int32_t>(), batch * seq,
                     heads, head_dim, cos.size(0), interleaved, type, as_stream(stream));
        });
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("interleaved"), py::arg("stream"),
      "CUDA rope, in place: x [B, T, H, D] (float16, bfloat16, float32); cos, sin [P, D/2] float32; "
      "positions [B, T] int32. A token whose position is outside [0, P) is left unrotated (positions "
      "live on the GPU and are not checked on the host).");

  m.def(
      "cuda_silu_mul",
      [](py::handle gate_obj, py::handle up_obj, py::handle out_obj, uintptr_t stream) {
        Tensor gate(gate_obj, "gate"), up(up_obj, "up"), out(out_obj, "out");
        check_cuda_operand(gate, -1);
        const FloatType type = float_type(gate);
        for (Tensor* t : {&up, &out}) {
          check_cuda_operand(*t, -1);
          check_dtype_as(*t, gate);
          check_same_shape(*t, gate);
        }
        check_one_device(gate, {&up, &out});
        check_alias_or_disjoint(out, gate);
        check_alias_or_disjoint(out, up);
        launch_on(gate.device_index(), [&] {
          cuda::silu_mul(gate.data<void>(), up.data<void>(), out.data<void>(), gate.numel(), type, as_stream(stream));
        });
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("stream"),
      "CUDA: out = silu(gate) * up. One dtype (float16, bfloat16, float32), one shape; out may be gate or up.");

  m.def(
      "cuda_attention",
      [](py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle out_obj, py::handle q_start_obj,
         py::handle kv_len_obj, double scale, uintptr_t stream) {
        Tensor q(q_obj, "q"), k_cache(k_obj, "k_cache"), v_cache(v_obj, "v_cache"), out(out_obj, "out"),
            q_start(q_start_obj, "q_start"), kv_len(kv_len_obj, "kv_len");
        check_cuda_operand(q, 4);
        const FloatType type = float_type(q);
        for (Tensor* t : {&k_cache, &v_cache, &out}) {
          check_cuda_operand(*t, 4);
          check_dtype_as(*t, q);
        }
        for (Tensor* t : {&q_start, &kv_len}) {
          check_cuda_operand(*t, 1);
          check_dtype(*t, DType::I32);
        }
        check_one_device(q, {&k_cache, &v_cache, &out, &q_start, &kv_len});
        const int64_t batch = q.size(0), q_len = q.size(1), num_q_heads = q.size(2), head_dim = q.size(3);
        if (head_dim != 64 && head_dim != 128) {
          throw py::value_error("q: head_dim (last dimension) must be 64 or 128 for the CUDA kernel, got shape " +
                                q.shape_str());
        }
        check_size(k_cache, 0, batch, "the batch size of q");
        check_size(k_cache, 3, head_dim, "the head_dim of q");
        const int64_t num_kv_heads = k_cache.size(1), cache_len = k_cache.size(2);
        check_same_shape(v_cache, k_cache);
        check_same_shape(out, q);
        check_size(q_start, 0, batch, "the batch size of q");
        check_size(kv_len, 0, batch, "the batch size of q");
        if (num_q_heads % num_kv_heads != 0) {
          throw py::value_error("q: number of query heads (" + std::to_string(num_q_heads) +
                                ") must be a multiple of k_cache's number of kv heads (" +
                                std::to_string(num_kv_heads) + ")");
        }
        if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
        for (const Tensor* t : {&q, &k_cache, &v_cache, &out}) check_aligned16(*t);
        for (const Tensor* input : {&q, &k_cache, &v_cache, &q_start, &kv_len}) check_no_overlap(out, *input);
        const AttentionShape shape{batch, q_len, num_q_heads, num_kv_heads, cache_len, head_dim};
        launch_on(q.device_index(), [&] {
          cuda::attention(q.data<void>(), k_cache.data<void>(), v_cache.data<void>(), out.data<void>(),
                          q_start.data<int32_t>(), kv_len.data<int32_t>(), shape, static_cast<float>(scale), type,
                          as_stream(stream));
        });
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"), py::arg("q_start"), py::arg("kv_len"),
      py::arg("scale"), py::arg("stream"),
      "CUDA causal GQA attention, the semantics of _C.attention: q, out [B, T, Hq, D]; k_cache, v_cache "
      "[B, Hkv, S, D]; one dtype (float16, bfloat16, float32), D 64 or 128, 16-byte aligned; q_start, "
      "kv_len [B] int32 on the GPU (not checked on the host: kv_len is clamped to [0, S] and a query "
      "that sees no key gets zeros).");

  m.def(
      "cuda_int8_gemv",
      [](py::handle x_obj, py::handle w_obj, py::handle w_scale_obj, py::handle out_obj, py::object bias_obj,
         uintptr_t stream) {
        Tensor x(x_obj, "x"), w_q(w_obj, "w_q"), w_scale(w_scale_obj, "w_scale"), out(out_obj, "out");
        check_cuda_operand(x, 2);
        const FloatType type = float_type(x);
        check_cuda_operand(w_q, 2);
        check_dtype(w_q, DType::I8);
        check_cuda_operand(w_scale, 1);
        check_dtype(w_scale, DType::F32);
        check_cuda_operand(out, 2);
        check_dtype_as(out, x);
        check_one_device(x, {&w_q, &w_scale, &out});
        const int64_t M = x.size(0), K = x.size(1), N = w_q.size(0);
        check_size(w_q, 1, K, "the last dimension of x");
        check_size(w_scale, 0, N, "the first dimension of w_q");
        check_size(out, 0, M, "the first dimension of x");
        check_size(out, 1, N, "the first dimension of w_q");
        for (const Tensor* input : {&x, &w_q, &w_scale}) check_no_overlap(out, *input);
        const void* bias_ptr = nullptr;
        if (!bias_obj.is_none()) {
          Tensor bias(bias_obj, "bias");
          check_cuda_operand(bias, 1);
          check_dtype_as(bias, x);
          check_one_device(x, {&bias});
          check_size(bias, 0, N, "the first dimension of w_q");
          check_no_overlap(out, bias);
          bias_ptr = bias.data<void>();
        }
        launch_on(x.device_index(), [&] {
          cuda::int8_gemv(x.data<void>(), w_q.data<int8_t>(), w_scale.data<float>(), bias_ptr, out.data<void>(), M, N,
                          K, type, as_stream(stream));
        });
      },
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("out"), py::arg("bias"), py::arg("stream"),
      "CUDA weight-only int8 Linear for decode: out[m, n] = w_scale[n] * sum_k x[m, k] * w_q[n, k] + bias[n]. "
      "x [M, K], out [M, N], bias [N] or None: one dtype (float16, bfloat16, float32); w_q [N, K] int8; "
      "w_scale [N] float32. Fastest for M <= 8 (larger M runs 8 rows at a time).");

  m.def(
      "cuda_int8_gemm_i32",
      [](py::handle a_obj, py::handle b_obj, py::handle out_obj, uintptr_t stream) {
        Tensor a(a_obj, "a"), b(b_obj, "b"), out(out_obj, "out");
        for (Tensor* t : {&a, &b}) {
          check_cuda_operand(*t, 2);
          check_dtype(*t, DType::I8);
          check_aligned16(*t);
        }
        check_cuda_operand(out, 2);
        check_dtype(out, DType::I32);
        check_one_device(a, {&b, &out});
        const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
        check_size(b, 1, K, "the last dimension of a");
        check_size(out, 0, M, "the first dimension of a");
        check_size(out, 1, N, "the first dimension of b");
        if (K % 32 != 0) {
          throw py::value_error("a: the last dimension (K) must be a multiple of 32 for the CUDA int8 GEMM, got shape " +
                                a.shape_str());
        }
        check_no_overlap(out, a);
        check_no_overlap(out, b);
        launch_on(a.device_index(), [&] {
          cuda::int8_gemm_i32(a.data<int8_t>(), b.data<int8_t>(), out.data<int32_t>(), M, N, K, as_stream(stream));
        });
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("stream"),
      "CUDA int8 GEMM on tensor cores (sm_80+): out[m, n] = sum_k a[m, k] * b[n, k], int32. a [M, K], "
      "b [N, K] int8, K a multiple of 32, 16-byte aligned; out [M, N] int32.");

  m.def(
      "cuda_quantize_rows",
      [](py::handle x_obj, py::handle q_obj, py::handle scale_obj, uintptr_t stream) {
        Tensor x(x_obj, "x"), q(q_obj, "q"), scale(scale_obj, "scale");
        check_cuda_operand(x, 2);
        const FloatType type = float_type(x);
        check_cuda_operand(q, 2);
        check_dtype(q, DType::I8);
        check_same_shape(q, x);
        check_cuda_operand(scale, 1);
        check_dtype(scale, DType::F32);
        check_size(scale, 0, x.size(0), "the first dimension of x");
        check_one_device(x, {&q, &scale});
        check_no_overlap(q, x);
        check_no_overlap(scale, x);
        check_no_overlap(scale, q);
        launch_on(x.device_index(), [&] {
          cuda::quantize_rows(x.data<void>(), q.data<int8_t>(), scale.data<float>(), x.size(0), x.size(1), type,
                              as_stream(stream));
        });
      },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("stream"),
      "CUDA per-row symmetric int8 quantization: scale[m] = max|x[m]| / 127, q = clamp(round(x / scale), "
      "-127, 127) (round half to even; 0 for an all-zero row). x [M, K] float16/bfloat16/float32.");
}

#else

void bind_cuda(py::module_&) {}  // built without CUDA: _C.cuda_built is False and no cuda_* exists

#endif

}  // namespace pyengine::bind
