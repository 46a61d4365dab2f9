// Argument checks shared by the small fused ops' bindings (rope, silu_mul, gelu, layer_norm,
// embedding), on top of tensor_args.h.
#pragma once
#include <stdexcept>
#include <string>

#include "bindings/tensor_args.h"

namespace pyengine::bind {

// t must have exactly ref's shape.
inline void check_same_shape(const Tensor& t, const Tensor& ref) {
  bool same = t.dim() == ref.dim();
  for (int64_t d = 0; same && d < t.dim(); ++d) same = t.size(d) == ref.size(d);
  if (!same) {
    throw py::value_error(std::string(t.name()) + ": expected the shape of " + ref.name() + " " +
                          ref.shape_str() + ", got " + t.shape_str());
  }
}

// For kernels that read element i before writing element i: writing in place (out is exactly in:
// same start, shape and strides) is fine, a shifted or differently laid out overlap would read
// already-written values.
inline void check_alias_or_disjoint(const Tensor& out, const Tensor& in) {
  if (out.address() == in.address() && out.same_layout(in)) return;
  check_no_overlap(out, in);
}

// x and out of an elementwise fp32 CPU op: contiguous, the same non-empty shape, out may be x.
inline void check_elementwise_f32(const Tensor& x, const Tensor& out) {
  check_cpu_contiguous(x, DType::F32, -1);
  check_cpu_contiguous(out, DType::F32, -1);
  check_nonempty(x);
  check_same_shape(out, x);
  check_alias_or_disjoint(out, x);
}

// The size of t's last dimension (1 for a scalar).
inline int64_t last_dim_size(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(t.dim() - 1); }

// The row stride of gate / up for silu_mul and gelu_mul: rows over the last dim of a contiguous tensor,
// or a 2-D view whose rows are contiguous runs (a half of a fused gate_up projection, no copy).
inline int64_t strided_rows(const Tensor& t) {
  if (t.is_contiguous()) return last_dim_size(t);
  if (t.dim() != 2 || (t.size(1) > 1 && t.stride(1) != 1) || t.stride(0) < t.size(1)) {
    throw py::value_error(std::string(t.name()) + ": must be contiguous, or 2-D with contiguous rows "
                          "(stride(1) == 1, stride(0) >= size(1)); got shape " + t.shape_str());
  }
  return t.stride(0);
}

// Runs a kernel call whose C++ API reports a bad argument value with std::invalid_argument
// (already naming the argument) and turns that into ValueError. The GIL is released for the call.
template <typename Fn>
void call_without_gil(Fn fn) {
  try {
    py::gil_scoped_release release;
    fn();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace pyengine::bind
