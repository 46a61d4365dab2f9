// What the decode plan's binding (bind_decode_plan.cpp) needs: taking weight tensors out of the
// model's Python objects (checked once, kept alive by the plan), and the checks on a step's per-call
// tensors.
#pragma once
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "bindings/bindings.h"
#include "pyengine/decoder_common.h"

namespace pyengine::bind {

// Checks one weight tensor (named for error messages) and keeps it alive; returns its data.
template <typename T>
T* take(py::handle obj, const std::string& name, DType dtype, std::vector<int64_t> shape,
        std::vector<py::object>& kept) {
  Tensor t(obj, name.c_str());
  check_cpu_contiguous(t, dtype, static_cast<int64_t>(shape.size()));
  for (size_t d = 0; d < shape.size(); ++d) {
    if (t.size(d) != shape[d]) {
      std::string want = "(";
      for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
      throw py::value_error(name + ": expected shape " + want + (shape.size() == 1 ? ",)" : ")") + ", got " +
                            t.shape_str());
    }
  }
  kept.push_back(py::reinterpret_borrow<py::object>(obj));
  return t.data<T>();
}

// A linear layer as pyengine's backends hold it: LinearWeights (weight [N, K] fp32, bias) or
// Int8Linear (qweight [N, K] int8, scale [N] fp32, bias).
DecoderLinear take_linear(py::handle obj, const std::string& name, int64_t N, int64_t K,
                          std::vector<py::object>& kept);

// A ValueError naming the first of the (value, name) pairs that is below 1.
void check_dims_positive(std::initializer_list<std::pair<int64_t, const char*>> dims);

// obj.attr, or a TypeError naming owner and attr when obj has no such attribute.
py::object required_attr(py::handle obj, const std::string& owner, const char* attr);

// A step's tensors: tokens [B] int64, k_cache and v_cache [layers, B, kv_heads, S, head_dim] fp32,
// positions [B] int32, logits [B, vocab] fp32, all contiguous CPU, the outputs overlapping
// nothing. Returns B.
int64_t check_decode_step_tensors(const Tensor& tokens, const Tensor& k, const Tensor& v, const Tensor& positions,
                                  const Tensor& logits, int64_t layers, int64_t kv_heads, int64_t head_dim,
                                  int64_t vocab);

// A step's optional tail, so that greedy decoding makes one call per token: next_tokens [B] int64
// gets each logits row's argmax (argmax_rows), then positions[b] += advance[b] (advance [B] int32,
// the Python loop's `cache.lengths += active`). Either may be None.
struct StepTail {
  int64_t* next_tokens = nullptr;
  const int32_t* advance = nullptr;
  void run(const float* logits, int64_t B, int64_t vocab, int32_t* positions) const;  // after the step
};
// Checks next_tokens / advance (contiguous CPU, [B], overlapping none of the step's tensors) before
// the step runs, so that a bad one fails with nothing written.
StepTail check_step_tail(py::handle next_tokens_obj, py::handle advance_obj, const Tensor& tokens, const Tensor& k,
                         const Tensor& v, const Tensor& positions, const Tensor& logits);

}  // namespace pyengine::bind
