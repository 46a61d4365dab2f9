// Zero-copy views of torch tensors for the bindings, and the argument checks every op runs.
// A failed check raises ValueError/TypeError naming the argument; nothing reaches a kernel unchecked.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>


namespace pyengine::bind {

namespace py = pybind11;

enum class DType { F32, F16, BF16, I8, I32, I64, U8, Other };

// A borrowed, zero-copy view of a torch.Tensor: pointer, dtype, device, shape and strides, read
// through the tensor's own attributes (no libtorch linkage). The caller's Python reference keeps
// the memory alive for the duration of the call.
class Tensor {
 public:
  Tensor(py::handle obj, const char* name);

  const char* name() const { return name_; }
  DType dtype() const { return dtype_; }
  // The dtype's name: float32, ..., or torch's own name for one no op takes (torch.float64).
  std::string dtype_str() const;
  bool is_cpu() const { return device_index_ < 0; }
  bool is_cuda() const { return device_index_ >= 0; }
  int device_index() const { return device_index_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const { return shape_[d]; }
  int64_t stride(int64_t d) const { return strides_[d]; }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_str() const;
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(data_);
  }
  uintptr_t address() const { return data_; }
  int64_t nbytes() const;
  // Bytes from the first element to the end of the last one: nbytes() when contiguous, more for a
  // strided view (what an overlap check must compare).
  int64_t span_bytes() const;
  bool same_layout(const Tensor& other) const { return shape_ == other.shape_ && strides_ == other.strides_; }

 private:
  const char* name_;
  uintptr_t data_ = 0;
  DType dtype_ = DType::Other;
  std::string other_dtype_;  // str(tensor.dtype), kept only for DType::Other (error messages)
  int device_index_ = -1;  // -1: CPU; otherwise the CUDA device index
  std::vector<int64_t> shape_, strides_;
};

const char* dtype_name(DType d);

// Checks; each throws ValueError/TypeError with the argument's name.
void check_dtype(const Tensor& t, DType expected);
void check_cpu(const Tensor& t);
void check_dim(const Tensor& t, int64_t ndim);
void check_size(const Tensor& t, int64_t d, int64_t expected, const char* what);
void check_contiguous(const Tensor& t);
void check_nonempty(const Tensor& t);
void check_same_device(const Tensor& a, const Tensor& b);
// `out` must not share memory with `in` (for kernels that read inputs after writing outputs).
void check_no_overlap(const Tensor& out, const Tensor& in);
void check_positive(double value, const char* name);

// The int8 operands the AVX2 W8A8 kernels negate (b_q, w_q) must not hold -128: vpsignb cannot
// negate it, so it would give a wrong sum, not an error. A scan at memory speed, before the kernel.
void check_no_int8_min(const Tensor& t);

// Common bundle: a contiguous CPU tensor of the given dtype and rank.
void check_cpu_contiguous(const Tensor& t, DType dtype, int64_t ndim);

}  // namespace pyengine::bind
