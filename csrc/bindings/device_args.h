// Checks and dispatch for the ops that run on the CPU and on CUDA. Each such op has one binding
// (_C.<op>) that checks what both devices need once, then what the tensors' device needs, then runs
// the CPU kernel (pyengine/<op>.h) or the CUDA one (pyengine/cuda_ops.h) with the GIL released.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "bindings/small_ops_args.h"
#include "bindings/tensor_args.h"
#include "pyengine/cuda_ops.h"

namespace pyengine::bind {

// Whether this build has the CUDA kernels (without them cuda_absent.cpp's launchers only throw).
#ifdef PYENGINE_WITH_CUDA
inline constexpr bool kCudaBuilt = true;
#else
inline constexpr bool kCudaBuilt = false;
#endif

// A non-empty contiguous tensor of rank ndim (-1: any rank >= 1) on either device. Emptiness is
// checked before contiguity: an empty tensor's strides need not look contiguous.
inline void check_operand(const Tensor& t, int64_t ndim) {
  if (ndim >= 0) check_dim(t, ndim);
  if (t.dim() == 0) throw py::value_error(std::string(t.name()) + ": expected at least one dimension");
  check_nonempty(t);
  check_contiguous(t);
}

// The float types the kernels take: float32 on the CPU; float16, bfloat16 or float32 on CUDA.
inline void check_float_dtype(const Tensor& t) {
  if (t.is_cpu()) return check_dtype(t, DType::F32);
  if (t.dtype() != DType::F16 && t.dtype() != DType::BF16 && t.dtype() != DType::F32) {
    throw py::type_error(std::string(t.name()) + ": expected dtype float16, bfloat16 or float32, got " +
                         t.dtype_str());
  }
}

inline cuda::FloatType float_type(const Tensor& t) {
  switch (t.dtype()) {
    case DType::F16: return cuda::FloatType::F16;
    case DType::BF16: return cuda::FloatType::BF16;
    default: return cuda::FloatType::F32;  // check_float_dtype ran before
  }
}

inline void check_dtype_as(const Tensor& t, const Tensor& ref) {
  if (t.dtype() != ref.dtype()) {
    throw py::type_error(std::string(t.name()) + ": expected dtype " + dtype_name(ref.dtype()) + " (that of " +
                         ref.name() + "), got " + t.dtype_str());
  }
}

// Every tensor on ref's device: the CPU, or one CUDA device.
inline void check_on_device_of(const Tensor& ref, std::initializer_list<const Tensor*> others) {
  auto where = [](const Tensor& t) {
    return t.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(t.device_index());
  };
  for (const Tensor* t : others) {
    if (t->device_index() != ref.device_index()) {
      throw py::value_error(std::string(t->name()) + ": is on " + where(*t) + " but " + ref.name() + " is on " +
                            where(ref) + ": all tensors must be on one device");
    }
  }
}

// For the CUDA kernels' vector loads.
inline void check_aligned16(const Tensor& t) {
  if (t.address() % 16 != 0) {
    throw py::value_error(std::string(t.name()) + ": data pointer must be 16-byte aligned (call .clone())");
  }
}

// Runs a CUDA launch with the GIL released and ref's device current. The launchers report a bad
// argument with std::invalid_argument (ValueError here) and a CUDA error with std::runtime_error.
template <typename Fn>
void run_cuda(const Tensor& ref, Fn launch) {
  if (!kCudaBuilt) {
    throw py::value_error(std::string(ref.name()) + ": a CUDA tensor, but pyengine was built without CUDA kernels");
  }
  try {
    py::gil_scoped_release release;
    cuda::DeviceGuard guard(ref.device_index());
    launch();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

inline void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

}  // namespace pyengine::bind
