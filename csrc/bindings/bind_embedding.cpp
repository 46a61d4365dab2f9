#include "bindings/bindings.h"
#include "bindings/small_ops_args.h"
#include "pyengine/embedding.h"

namespace pyengine::bind {

void bind_embedding(py::module_& m) {
  m.def(
      "embedding",
      [](py::handle ids_obj, py::handle table_obj, py::handle out_obj) {
        Tensor ids(ids_obj, "ids"), table(table_obj, "table"), out(out_obj, "out");
        check_cpu_contiguous(ids, DType::I64, -1);
        check_nonempty(ids);
        if (ids.dim() == 0) throw py::value_error("ids: expected at least 1 dimension, got a scalar");
        check_cpu_contiguous(table, DType::F32, 2);
        check_nonempty(table);
        check_cpu_contiguous(out, DType::F32, ids.dim() + 1);
        for (int64_t d = 0; d < ids.dim(); ++d) check_size(out, d, ids.size(d), "the shape of ids");
        check_size(out, ids.dim(), table.size(1), "the embedding dimension of table");
        check_no_overlap(out, table);
        check_no_overlap(out, ids);
        call_without_gil([&] {
          embedding(ids.data<int64_t>(), ids.numel(), table.data<float>(), table.size(0), table.size(1),
                    out.data<float>());
        });
      },
      py::arg("ids"), py::arg("table"), py::arg("out"),
      "out[..., :] = table[ids[...]]. ids: int64, any shape; table: [V, D] fp32; out: ids.shape + (D,). "
      "An id outside [0, V) raises ValueError naming it.");
}

}  // namespace pyengine::bind
