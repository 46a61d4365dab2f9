#include "bindings/tensor_args.h"

#include <array>
#include <cstring>

#include <sstream>

namespace pyengine::bind {
namespace {

// torch's dtype objects and Tensor class, looked up once (the module imports torch lazily, so
// the kernels themselves never depend on it).
struct TorchTypes {
  py::object tensor_class;
  std::vector<std::pair<py::object, DType>> dtypes;
};

const TorchTypes& torch_types() {
  static TorchTypes* types = [] {
    py::module_ torch = py::module_::import("torch");
    auto* t = new TorchTypes;  // leaked on purpose: lives until interpreter exit
    t->tensor_class = torch.attr("Tensor");
    t->dtypes = {{torch.attr("float32"), DType::F32}, {torch.attr("float16"), DType::F16},
                 {torch.attr("bfloat16"), DType::BF16}, {torch.attr("int8"), DType::I8},
                 {torch.attr("int32"), DType::I32},   {torch.attr("int64"), DType::I64},
                 {torch.attr("uint8"), DType::U8}};
    return t;
  }();
  return *types;
}

int64_t element_size(DType d) {
  switch (d) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I8: case DType::U8: return 1;
    case DType::I64: return 8;
    default: return 0;
  }
}

}  // namespace

Tensor::Tensor(py::handle obj, const char* name) : name_(name) {
  const TorchTypes& types = torch_types();
  if (!py::isinstance(obj, types.tensor_class)) {
    throw py::type_error(std::string(name) + ": expected a torch.Tensor, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  // Attribute names interned once: these lookups are most of a small op's call cost.
  static const auto* names = new std::array<py::str, 7>{py::str("dtype"),  py::str("is_cpu"), py::str("device"),
                                                        py::str("type"),   py::str("shape"),  py::str("stride"),
                                                        py::str("data_ptr")};
  const auto& [k_dtype, k_is_cpu, k_device, k_type, k_shape, k_stride, k_data_ptr] = *names;
  py::object dtype = obj.attr(k_dtype);
  for (const auto& [torch_dtype, ours] : types.dtypes) {
    if (dtype.is(torch_dtype)) dtype_ = ours;
  }
  if (dtype_ == DType::Other) other_dtype_ = py::str(dtype);
  // is_cpu first: a bool, where .device.type builds a device object and a string (~1 us of a
  // small op's ~10 us call).
  if (obj.attr(k_is_cpu).cast<bool>()) {
    device_index_ = -1;
  } else {
    py::object device = obj.attr(k_device);
    const std::string device_type = device.attr(k_type).cast<std::string>();
    if (device_type != "cuda") {
      // meta, mps, xpu...: no memory we can address from here.
      throw py::value_error(std::string(name) + ": tensors on device '" + device_type +
                            "' are not supported (expected cpu or cuda)");
    }
    py::object index = device.attr("index");
    device_index_ = index.is_none() ? 0 : index.cast<int>();
  }
  for (py::handle v : obj.attr(k_shape)) shape_.push_back(v.cast<int64_t>());
  for (py::handle v : obj.attr(k_stride)()) strides_.push_back(v.cast<int64_t>());
  data_ = obj.attr(k_data_ptr)().cast<uintptr_t>();
  // A view at an odd byte offset (torch.frombuffer(..., offset=1)) would be read through a misaligned
  // pointer: undefined behaviour in C++, and a fault in aligned vector loads.
  const int64_t elem = element_size(dtype_);
  if (elem > 1 && numel() > 0 && data_ % elem != 0) {
    throw py::value_error(std::string(name) + ": data is not aligned to its " + std::to_string(elem) +
                          "-byte elements (a view at an odd byte offset); pass a copy (.clone())");
  }
}

std::string Tensor::dtype_str() const { return dtype_ == DType::Other ? other_dtype_ : dtype_name(dtype_); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

int64_t Tensor::nbytes() const { return numel() * element_size(dtype_); }

int64_t Tensor::span_bytes() const {
  if (numel() == 0) return 0;
  int64_t last = 0;  // element offset of the last element (strides of the tensors we take are >= 0)
  for (int64_t d = 0; d < dim(); ++d) last += (shape_[d] - 1) * strides_[d];
  return (last + 1) * element_size(dtype_);
}

bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to lay out; emptiness is checked separately
  int64_t expected = 1;
  for (int64_t d = dim() - 1; d >= 0; --d) {
    if (shape_[d] != 1 && strides_[d] != expected) return false;
    expected *= shape_[d];
  }
  return true;
}

std::string Tensor::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < dim(); ++i) s << (i ? ", " : "") << shape_[i];
  s << (dim() == 1 ? ",)" : ")");
  return s.str();
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    default: return "an unsupported dtype";
  }
}

void check_dtype(const Tensor& t, DType expected) {
  if (t.dtype() != expected) {
    throw py::type_error(std::string(t.name()) + ": expected dtype " + dtype_name(expected) + ", got " +
                         t.dtype_str());
  }
}

void check_cpu(const Tensor& t) {
  if (!t.is_cpu()) throw py::value_error(std::string(t.name()) + ": expected a CPU tensor");
}

void check_dim(const Tensor& t, int64_t ndim) {
  if (t.dim() != ndim) {
    throw py::value_error(std::string(t.name()) + ": expected " + std::to_string(ndim) +
                          " dimensions, got shape " + t.shape_str());
  }
}

void check_size(const Tensor& t, int64_t d, int64_t expected, const char* what) {
  if (t.size(d) != expected) {
    throw py::value_error(std::string(t.name()) + ": dimension " + std::to_string(d) + " must be " +
                          std::to_string(expected) + " (" + what + "), got shape " + t.shape_str());
  }
}

void check_contiguous(const Tensor& t) {
  if (!t.is_contiguous()) {
    throw py::value_error(std::string(t.name()) + ": must be contiguous (call .contiguous())");
  }
}

void check_nonempty(const Tensor& t) {
  if (t.numel() == 0) throw py::value_error(std::string(t.name()) + ": must not be empty, got shape " + t.shape_str());
}

void check_same_device(const Tensor& a, const Tensor& b) {
  if (a.is_cpu() != b.is_cpu() || a.device_index() != b.device_index()) {
    throw py::value_error(std::string(a.name()) + " and " + b.name() + " must be on the same device");
  }
}

void check_no_overlap(const Tensor& out, const Tensor& in) {
  const uintptr_t a0 = out.address(), a1 = a0 + out.span_bytes();
  const uintptr_t b0 = in.address(), b1 = b0 + in.span_bytes();
  if (a0 < b1 && b0 < a1) {
    throw py::value_error(std::string(out.name()) + ": must not share memory with " + in.name());
  }
}

void check_no_int8_min(const Tensor& t) {
  // Contiguous (checked before): one memchr, glibc's vectorised byte search.
  if (std::memchr(t.data<const void>(), 0x80, static_cast<size_t>(t.numel())) != nullptr) {
    throw py::value_error(std::string(t.name()) + ": holds -128; int8 values must be in [-127, 127] "
                          "(symmetric quantization never produces -128)");
  }
}

void check_positive(double value, const char* name) {
  if (!(value > 0)) throw py::value_error(std::string(name) + " must be positive");
}

void check_cpu_contiguous(const Tensor& t, DType dtype, int64_t ndim) {
  check_dtype(t, dtype);
  check_cpu(t);
  if (ndim >= 0) check_dim(t, ndim);
  check_contiguous(t);
}

}  // namespace pyengine::bind
