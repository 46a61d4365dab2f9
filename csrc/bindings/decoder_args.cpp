#include "bindings/decoder_args.h"

#include "pyengine/argmax.h"

namespace pyengine::bind {
namespace {

py::object attr_or_none(py::handle obj, const char* attr) {
  return py::hasattr(obj, attr) ? py::object(obj.attr(attr)) : py::object(py::none());
}

}  // namespace

DecoderLinear take_linear(py::handle obj, const std::string& name, int64_t N, int64_t K,
                          std::vector<py::object>& kept) {
  DecoderLinear w;
  w.out_features = N;
  w.in_features = K;
  if (py::hasattr(obj, "qweight")) {
    w.weight_i8 = take<int8_t>(obj.attr("qweight"), name + ".qweight", DType::I8, {N, K}, kept);
    w.scale = take<float>(obj.attr("scale"), name + ".scale", DType::F32, {N}, kept);
  } else if (py::hasattr(obj, "weight")) {
    py::object weight = obj.attr("weight");
    if (Tensor(weight, "weight").dtype() == DType::BF16) {
      w.weight_bf16 = take<uint16_t>(weight, name + ".weight", DType::BF16, {N, K}, kept);
    } else {
      w.weight_f32 = take<float>(weight, name + ".weight", DType::F32, {N, K}, kept);
    }
  } else {
    throw py::type_error(name + ": expected linear weights with .weight (fp32 or bf16) or .qweight/.scale (int8), got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::object bias = attr_or_none(obj, "bias");
  if (!bias.is_none()) w.bias = take<float>(bias, name + ".bias", DType::F32, {N}, kept);
  return w;
}

void check_dims_positive(std::initializer_list<std::pair<int64_t, const char*>> dims) {
  for (auto [value, name] : dims) {
    if (value < 1) throw py::value_error(std::string(name) + " must be positive, got " + std::to_string(value));
  }
}

py::object required_attr(py::handle obj, const std::string& owner, const char* attr) {
  if (!py::hasattr(obj, attr)) throw py::type_error(owner + ": has no attribute '" + attr + "'");
  return obj.attr(attr);
}

int64_t check_decode_step_tensors(const Tensor& tokens, const Tensor& k, const Tensor& v, const Tensor& positions,
                                  const Tensor& logits, int64_t layers, int64_t kv_heads, int64_t head_dim,
                                  int64_t vocab) {
  check_cpu_contiguous(tokens, DType::I64, 1);
  check_nonempty(tokens);
  const int64_t B = tokens.size(0);
  check_cpu_contiguous(k, DType::F32, 5);
  check_size(k, 0, layers, "the number of layers");
  check_size(k, 1, B, "the batch of tokens");
  check_size(k, 2, kv_heads, "num_kv_heads");
  check_nonempty(k);
  check_size(k, 4, head_dim, "head_dim");
  check_cpu_contiguous(v, DType::F32, 5);
  for (int64_t i = 0; i < 5; ++i) check_size(v, i, k.size(i), "the shape of k_cache");
  check_cpu_contiguous(positions, DType::I32, 1);
  check_size(positions, 0, B, "the batch of tokens");
  check_cpu_contiguous(logits, DType::F32, 2);
  check_size(logits, 0, B, "the batch of tokens");
  check_size(logits, 1, vocab, "vocab_size");
  check_no_overlap(v, k);
  for (const Tensor* in : {&tokens, &positions}) {
    check_no_overlap(k, *in);
    check_no_overlap(v, *in);
    check_no_overlap(logits, *in);
  }
  check_no_overlap(logits, k);
  check_no_overlap(logits, v);
  return B;
}

StepTail check_step_tail(py::handle next_tokens_obj, py::handle advance_obj, const Tensor& tokens, const Tensor& k,
                         const Tensor& v, const Tensor& positions, const Tensor& logits) {
  StepTail tail;
  const int64_t B = tokens.size(0);
  if (!next_tokens_obj.is_none()) {
    Tensor next(next_tokens_obj, "next_tokens");
    check_cpu_contiguous(next, DType::I64, 1);
    check_size(next, 0, B, "the batch of tokens");
    for (const Tensor* other : {&tokens, &k, &v, &positions, &logits}) check_no_overlap(next, *other);
    tail.next_tokens = next.data<int64_t>();
  }
  if (!advance_obj.is_none()) {
    Tensor advance(advance_obj, "advance");
    check_cpu_contiguous(advance, DType::I32, 1);
    check_size(advance, 0, B, "the batch of tokens");
    check_no_overlap(positions, advance);
    tail.advance = advance.data<int32_t>();
  }
  return tail;
}

void StepTail::run(const float* logits, int64_t B, int64_t vocab, int32_t* positions) const {
  if (next_tokens != nullptr) argmax_rows(logits, B, vocab, next_tokens);
  if (advance != nullptr) {
    for (int64_t b = 0; b < B; ++b) positions[b] += advance[b];
  }
}

}  // namespace pyengine::bind
