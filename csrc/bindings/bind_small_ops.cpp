// Registers the small fused ops, each bound in its own bind_<op>.cpp (one line each in
// bindings.h / bindings.cpp for the whole group).
#include "bindings/bindings.h"

namespace pyengine::bind {

void bind_rope(py::module_& m);
void bind_silu_mul(py::module_& m);
void bind_gelu(py::module_& m);
void bind_layer_norm(py::module_& m);
void bind_embedding(py::module_& m);
void bind_argmax(py::module_& m);

void bind_small_ops(py::module_& m) {
  bind_rope(m);
  bind_silu_mul(m);
  bind_gelu(m);
  bind_layer_norm(m);
  bind_embedding(m);
  bind_argmax(m);
}

}  // namespace pyengine::bind
