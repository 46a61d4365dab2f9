// _C.Gpt2Decoder: the whole decode step of a GPT-2 model in one call, bound as _C.LlamaDecoder is:
// every weight validated once at construction and kept alive by the object; step() re-checks only
// the per-call tensors and releases the GIL.
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/decoder_args.h"
#include "pyengine/gpt2_decoder.h"

namespace pyengine::bind {
namespace {

struct PyGpt2Decoder {
  std::unique_ptr<Gpt2Decoder> decoder;
  std::vector<py::object> kept;  // every tensor the decoder points into
};

// A LayerNorm as pyengine.models.gpt2 holds it: a (weight, bias) pair of [H] tensors.
std::pair<const float*, const float*> take_norm(py::handle obj, const std::string& name, int64_t H,
                                                std::vector<py::object>& kept) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 2) {
    throw py::type_error(name + ": expected a (weight, bias) tuple");
  }
  py::tuple pair = py::reinterpret_borrow<py::tuple>(obj);
  return {take<float>(pair[0], name + ".weight", DType::F32, {H}, kept),
          take<float>(pair[1], name + ".bias", DType::F32, {H}, kept)};
}

PyGpt2Decoder make_decoder(int64_t vocab, int64_t hidden, int64_t num_heads, int64_t intermediate,
                           int64_t max_positions, double norm_eps, py::handle embed, py::handle positions,
                           py::handle final_norm, py::handle lm_head, py::sequence layers) {
  check_dims_positive({{vocab, "vocab_size"}, {hidden, "hidden_size"}, {num_heads, "num_heads"},
                       {intermediate, "intermediate_size"}, {max_positions, "max_positions"}});
  if (hidden % num_heads != 0) throw py::value_error("hidden_size must be a multiple of num_heads");
  check_positive(norm_eps, "norm_eps");
  if (py::len(layers) == 0) throw py::value_error("layers: must not be empty");
  PyGpt2Decoder out;
  auto& kept = out.kept;
  Gpt2Dims dims;
  dims.vocab = vocab;
  dims.hidden = hidden;
  dims.num_heads = num_heads;
  dims.head_dim = hidden / num_heads;
  dims.intermediate = intermediate;
  dims.max_positions = max_positions;
  dims.norm_eps = static_cast<float>(norm_eps);
  const float* embed_data = take<float>(embed, "embed", DType::F32, {vocab, hidden}, kept);
  const float* positions_data = take<float>(positions, "positions", DType::F32, {max_positions, hidden}, kept);
  const auto [final_weight, final_bias] = take_norm(final_norm, "final_norm", hidden, kept);
  const DecoderLinear head = take_linear(lm_head, "lm_head", vocab, hidden, kept);
  std::vector<Gpt2LayerWeights> layer_weights;
  for (size_t i = 0; i < py::len(layers); ++i) {
    py::handle layer = layers[i];
    const std::string p = "layers[" + std::to_string(i) + "]";
    Gpt2LayerWeights l;
    std::tie(l.ln_1_weight, l.ln_1_bias) = take_norm(required_attr(layer, p, "ln_1"), p + ".ln_1", hidden, kept);
    l.qkv = take_linear(required_attr(layer, p, "qkv"), p + ".qkv", 3 * hidden, hidden, kept);
    l.out = take_linear(required_attr(layer, p, "out"), p + ".out", hidden, hidden, kept);
    std::tie(l.ln_2_weight, l.ln_2_bias) = take_norm(required_attr(layer, p, "ln_2"), p + ".ln_2", hidden, kept);
    l.fc = take_linear(required_attr(layer, p, "fc"), p + ".fc", intermediate, hidden, kept);
    l.proj = take_linear(required_attr(layer, p, "proj"), p + ".proj", hidden, intermediate, kept);
    layer_weights.push_back(l);
  }
  out.decoder = std::make_unique<Gpt2Decoder>(dims, embed_data, positions_data, final_weight, final_bias, head,
                                              std::move(layer_weights));
  return out;
}

void step(PyGpt2Decoder& self, py::handle tokens_obj, py::handle k_obj, py::handle v_obj, py::handle positions_obj,
          py::handle logits_obj, py::handle next_tokens_obj, py::handle advance_obj) {
  Gpt2Decoder& dec = *self.decoder;
  const Gpt2Dims& d = dec.dims();
  Tensor tokens(tokens_obj, "tokens"), k(k_obj, "k_cache"), v(v_obj, "v_cache"), positions(positions_obj, "positions"),
      logits(logits_obj, "logits");
  const int64_t B = check_decode_step_tensors(tokens, k, v, positions, logits, dec.num_layers(), d.num_heads,
                                              d.head_dim, d.vocab);
  const StepTail tail = check_step_tail(next_tokens_obj, advance_obj, tokens, k, v, positions, logits);
  py::gil_scoped_release release;  // std::invalid_argument from the checks on values -> ValueError
  dec.step(tokens.data<int64_t>(), B, k.data<float>(), v.data<float>(), k.size(3), positions.data<int32_t>(),
           logits.data<float>());
  tail.run(logits.data<float>(), B, d.vocab, positions.data<int32_t>());
}

}  // namespace

void bind_gpt2_decoder(py::module_& m) {
  py::class_<PyGpt2Decoder>(m, "Gpt2Decoder", "The decode step (one new token per sequence) of a GPT-2 model in one C++ call.")
      .def(py::init(&make_decoder), py::arg("vocab_size"), py::arg("hidden_size"), py::arg("num_heads"),
           py::arg("intermediate_size"), py::arg("max_positions"), py::arg("norm_eps"), py::arg("embed"),
           py::arg("positions"), py::arg("final_norm"), py::arg("lm_head"), py::arg("layers"),
           "embed [V, H] and positions [P, H] fp32; final_norm and each layer's ln_1, ln_2: (weight, bias) "
           "[H] pairs; lm_head and each layer's qkv [3 H, H] (q, k, v rows), out [H, H], fc [I, H], proj [H, I]: "
           "linear weights (.weight [N, K] fp32, or .qweight [N, K] int8 + .scale [N] fp32; optional .bias "
           "[N]). All contiguous CPU tensors, kept alive by the decoder.")
      .def("step", &step, py::arg("tokens"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"),
           py::arg("logits"), py::kw_only(), py::arg("next_tokens") = py::none(), py::arg("advance") = py::none(),
           "One decode step: tokens [B] int64; k_cache, v_cache [L, B, heads, S, D] fp32 (the new k/v are "
           "written at positions[b]); positions [B] int32 (each sequence's current length); logits [B, V] "
           "fp32 (written). next_tokens, advance: as LlamaDecoder.step's.")
      .def_property_readonly("num_layers", [](const PyGpt2Decoder& self) { return self.decoder->num_layers(); });
}

}  // namespace pyengine::bind
