// Each op's bindings live in bindings/bind_<op>.cpp and are registered from bindings.cpp. An op that
// runs on the CPU and on CUDA has one binding for both (device_args.h).
#pragma once
#include <pybind11/pybind11.h>

#include "bindings/tensor_args.h"

namespace pyengine::bind {
namespace py = pybind11;

void bind_rms_norm(py::module_& m);
void bind_small_ops(py::module_& m);  // rope, silu_mul, gelu, gelu_mul, softcap, layer_norm, embedding, argmax_rows
void bind_attention(py::module_& m);
void bind_int8_matmul(py::module_& m);
void bind_decode_plan(py::module_& m);  // _C.DecodePlan: a recorded decode step replayed per token
void bind_memory_read(py::module_& m);  // sum_words: the rooflines' bandwidth probe

}  // namespace pyengine::bind
