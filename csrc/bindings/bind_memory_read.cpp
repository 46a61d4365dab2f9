#include <cstring>

#include "bindings/bindings.h"
#include "pyengine/memory_read.h"

namespace pyengine::bind {

void bind_memory_read(py::module_& m) {
  m.def(
      "sum_words",
      [](py::handle words_obj) {
        Tensor words(words_obj, "words");
        check_cpu_contiguous(words, DType::I64, 1);
        check_nonempty(words);  // a probe that reads nothing measures nothing
        uint64_t total;
        {
          py::gil_scoped_release release;
          total = sum_words(words.data<const uint64_t>(), words.numel());
        }
        int64_t as_signed;  // two's complement, as torch's int64 sum wraps
        std::memcpy(&as_signed, &total, sizeof total);
        return as_signed;
      },
      py::arg("words"),
      "The sum of a 1-D contiguous int64 CPU tensor, wrapping like torch's int64 sum: a plain read of "
      "its memory, each thread's share as two sequential streams (the rooflines' bandwidth probe).");
}

}  // namespace pyengine::bind
