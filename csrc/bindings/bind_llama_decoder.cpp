// _C.LlamaDecoder: the whole decode step of a Llama-family model in one call. Every weight is
// validated once at construction; the object keeps a reference to each tensor it points into so
// none can be freed under it. step() re-checks only the per-call tensors (cheap) and releases the GIL.
#include <memory>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/decoder_args.h"
#include "pyengine/llama_decoder.h"

namespace pyengine::bind {
namespace {

struct PyLlamaDecoder {
  std::unique_ptr<LlamaDecoder> decoder;
  std::vector<py::object> kept;  // every tensor the decoder points into
};

PyLlamaDecoder make_decoder(int64_t vocab, int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t intermediate, double norm_eps, py::handle embed, py::handle final_norm,
                            py::handle lm_head, py::sequence layers) {
  check_dims_positive({{vocab, "vocab_size"}, {hidden, "hidden_size"}, {num_heads, "num_heads"},
                       {num_kv_heads, "num_kv_heads"}, {head_dim, "head_dim"}, {intermediate, "intermediate_size"}});
  if (num_heads % num_kv_heads != 0) throw py::value_error("num_heads must be a multiple of num_kv_heads");
  if (head_dim % 2 != 0) throw py::value_error("head_dim must be even (rotary pairs)");
  check_positive(norm_eps, "norm_eps");
  if (py::len(layers) == 0) throw py::value_error("layers: must not be empty");

  PyLlamaDecoder out;
  auto& kept = out.kept;
  LlamaDims dims;
  dims.vocab = vocab;
  dims.hidden = hidden;
  dims.num_q_heads = num_heads;
  dims.num_kv_heads = num_kv_heads;
  dims.head_dim = head_dim;
  dims.intermediate = intermediate;
  dims.norm_eps = static_cast<float>(norm_eps);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;

  const float* embed_data = take<float>(embed, "embed", DType::F32, {vocab, hidden}, kept);
  const float* final_norm_data = take<float>(final_norm, "final_norm", DType::F32, {hidden}, kept);
  const DecoderLinear head = take_linear(lm_head, "lm_head", vocab, hidden, kept);
  std::vector<LlamaLayerWeights> layer_weights;
  for (size_t i = 0; i < py::len(layers); ++i) {
    py::handle layer = layers[i];
    const std::string p = "layers[" + std::to_string(i) + "]";
    LlamaLayerWeights l;
    l.attn_norm = take<float>(required_attr(layer, p, "attn_norm"), p + ".attn_norm", DType::F32, {hidden}, kept);
    l.qkv = take_linear(required_attr(layer, p, "qkv"), p + ".qkv", q_size + 2 * kv_size, hidden, kept);
    l.out = take_linear(required_attr(layer, p, "out"), p + ".out", hidden, q_size, kept);
    l.mlp_norm = take<float>(required_attr(layer, p, "mlp_norm"), p + ".mlp_norm", DType::F32, {hidden}, kept);
    l.gate_up = take_linear(required_attr(layer, p, "gate_up"), p + ".gate_up", 2 * intermediate, hidden, kept);
    l.down = take_linear(required_attr(layer, p, "down"), p + ".down", hidden, intermediate, kept);
    const py::object window = required_attr(layer, p, "window");
    if (!py::isinstance<py::int_>(window)) {
      throw py::type_error(p + ".window: expected an int, got " + std::string(py::str(py::type::of(window))));
    }
    l.window = window.cast<int64_t>();
    if (l.window < 0) {
      throw py::value_error(p + ".window must be >= 0 (0: full attention), got " + std::to_string(l.window));
    }
    layer_weights.push_back(l);
  }
  out.decoder = std::make_unique<LlamaDecoder>(dims, embed_data, final_norm_data, head, std::move(layer_weights));
  return out;
}

void step(PyLlamaDecoder& self, py::handle tokens_obj, py::handle k_obj, py::handle v_obj, py::handle positions_obj,
          py::handle cos_obj, py::handle sin_obj, py::handle logits_obj, py::handle next_tokens_obj,
          py::handle advance_obj) {
  LlamaDecoder& dec = *self.decoder;
  const LlamaDims& d = dec.dims();
  Tensor tokens(tokens_obj, "tokens"), k(k_obj, "k_cache"), v(v_obj, "v_cache"), positions(positions_obj, "positions"),
      cos(cos_obj, "cos"), sin(sin_obj, "sin"), logits(logits_obj, "logits");
  const int64_t B = check_decode_step_tensors(tokens, k, v, positions, logits, dec.num_layers(), d.num_kv_heads,
                                              d.head_dim, d.vocab);
  check_cpu_contiguous(cos, DType::F32, 2);
  check_nonempty(cos);
  check_size(cos, 1, d.head_dim / 2, "head_dim / 2");
  check_cpu_contiguous(sin, DType::F32, 2);
  check_size(sin, 0, cos.size(0), "the rows of cos");
  check_size(sin, 1, d.head_dim / 2, "head_dim / 2");
  for (const Tensor* in : {&cos, &sin}) {
    check_no_overlap(k, *in);
    check_no_overlap(v, *in);
    check_no_overlap(logits, *in);
  }
  const StepTail tail = check_step_tail(next_tokens_obj, advance_obj, tokens, k, v, positions, logits);
  py::gil_scoped_release release;  // std::invalid_argument from the checks on values -> ValueError
  dec.step(tokens.data<int64_t>(), B, k.data<float>(), v.data<float>(), k.size(3), positions.data<int32_t>(),
           cos.data<float>(), sin.data<float>(), cos.size(0), logits.data<float>());
  tail.run(logits.data<float>(), B, d.vocab, positions.data<int32_t>());
}

}  // namespace

void bind_llama_decoder(py::module_& m) {
  py::class_<PyLlamaDecoder>(m, "LlamaDecoder",
                             "The decode step (one new token per sequence) of a Llama-family model in one C++ call.")
      .def(py::init(&make_decoder), py::arg("vocab_size"), py::arg("hidden_size"), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("intermediate_size"), py::arg("norm_eps"),
           py::arg("embed"), py::arg("final_norm"), py::arg("lm_head"), py::arg("layers"),
           "embed [V, H] fp32; final_norm [H]; lm_head and each layer's qkv/out/gate_up/down: linear weights "
           "(.weight [N, K] fp32, or .qweight [N, K] int8 + .scale [N] fp32; optional .bias [N]); layers: "
           "objects with attn_norm, qkv [(Hq + 2 Hkv) D, H] (q, k, v rows), out [H, Hq D], mlp_norm, "
           "gate_up [2 I, H] (gate rows, then up rows), down [H, I], and window (int: > 0, that layer's "
           "token attends only the last `window` positions; 0: full attention). All contiguous CPU tensors, "
           "kept alive by the decoder.")
      .def("step", &step, py::arg("tokens"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"),
           py::arg("cos"), py::arg("sin"), py::arg("logits"), py::kw_only(), py::arg("next_tokens") = py::none(),
           py::arg("advance") = py::none(),
           "One decode step: tokens [B] int64; k_cache, v_cache [L, B, Hkv, S, D] fp32 (the new k/v are "
           "written at positions[b]); positions [B] int32 (each sequence's current length); cos, sin "
           "[P, D / 2] rotary tables covering every position; logits [B, V] fp32 (written). Then, for "
           "greedy decoding in one call: next_tokens [B] int64 (written: each logits row's argmax, as "
           "argmax_rows) and positions[b] += advance[b] (advance [B] int32).")
      .def_property_readonly("num_layers", [](const PyLlamaDecoder& self) { return self.decoder->num_layers(); })
      .def("set_profiling", [](PyLlamaDecoder& self, bool on) { self.decoder->set_profiling(on); }, py::arg("on"),
           "Time each phase of step() (adds a clock read per op).")
      .def("reset_profile", [](PyLlamaDecoder& self) { self.decoder->reset_profile(); })
      .def("profile",
           [](const PyLlamaDecoder& self) {
             py::dict out;
             const LlamaDecoder& dec = *self.decoder;
             for (int p = 0; p < LlamaDecoder::kPhases; ++p) {
               out[LlamaDecoder::phase_name(p)] = dec.profile_seconds()[p];
             }
             out["steps"] = dec.profiled_steps();
             return out;
           },
           "Seconds spent in each phase, summed over the steps profiled, and the number of steps.");
}

}  // namespace pyengine::bind
