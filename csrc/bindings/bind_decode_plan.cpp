// _C.DecodePlan: a recorded decode step (pyengine/runtime/plan.py) replayed in one C++ call per token. The
// instructions arrive as dicts in the plan's own vocabulary (op name, views, scalars, weights);
// every weight is checked once here and kept alive by the plan. step() re-checks only the per-call
// tensors (cheap) and releases the GIL.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "bindings/decoder_args.h"
#include "bindings/small_ops_args.h"
#include "pyengine/decode_plan.h"

namespace pyengine::bind {
namespace {

struct PyDecodePlan {
  std::unique_ptr<DecodePlan> plan;
  std::vector<py::object> kept;  // every tensor the plan points into
};

PlanOp parse_op(const std::string& name, const std::string& where) {
  for (int32_t i = 0; i < static_cast<int32_t>(PlanOp::kCount); ++i) {
    if (name == plan_op_name(static_cast<PlanOp>(i))) return static_cast<PlanOp>(i);
  }
  throw py::value_error(where + ": unknown op '" + name + "'");
}

// A field of one instruction dict: `required` ones raise a ValueError naming the instruction.
class Fields {
 public:
  Fields(py::dict d, std::string where) : d_(std::move(d)), where_(std::move(where)) {}
  bool has(const char* key) const { return d_.contains(key) && !d_[key].is_none(); }
  py::object get(const char* key) const {
    if (!has(key)) throw py::value_error(where_ + ": missing '" + key + "'");
    return d_[key];
  }
  template <typename T>
  T value(const char* key, T fallback) const {
    return has(key) ? get(key).cast<T>() : fallback;
  }
  PlanView view(const char* key) const {
    if (!has(key)) return {};
    auto t = get(key).cast<py::tuple>();
    if (py::len(t) != 3) throw py::value_error(where_ + ": '" + key + "' must be (buffer, offset, width)");
    return {t[0].cast<int32_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()};
  }
  const std::string& where() const { return where_; }

 private:
  py::dict d_;
  std::string where_;
};

PyDecodePlan make_plan(int64_t vocab, std::vector<int64_t> buffer_widths, int32_t output_buffer,
                       py::sequence instructions, int32_t num_rope_tables) {
  PyDecodePlan out;
  std::vector<PlanInstruction> list;
  std::vector<std::string> labels;
  std::map<std::string, int32_t> label_ids;
  for (size_t n = 0; n < py::len(instructions); ++n) {
    const std::string where = "instructions[" + std::to_string(n) + "]";
    if (!py::isinstance<py::dict>(instructions[n])) throw py::type_error(where + ": expected a dict");
    Fields f(instructions[n].cast<py::dict>(), where);
    PlanInstruction ins;
    const std::string op = f.get("op").cast<std::string>();
    ins.op = parse_op(op, where);
    ins.x = f.view("x");
    ins.y = f.view("y");
    ins.out = f.view("out");
    ins.dim = f.value<int64_t>("dim", 0);
    ins.heads = f.value<int64_t>("heads", 0);
    ins.kv_heads = f.value<int64_t>("kv_heads", 0);
    ins.layer = f.value<int64_t>("layer", 0);
    ins.window = f.value<int64_t>("window", 0);
    ins.table = f.value<int32_t>("table", 0);
    ins.scalar = static_cast<float>(f.value<double>("scalar", 0.0));
    if (ins.window < 0) throw py::value_error(where + ": window must be >= 0 (0: full attention)");
    const std::string name = where + " (" + op + ")";
    switch (ins.op) {
      case PlanOp::kEmbedding:
      case PlanOp::kAddPositionEmbedding: {
        const PlanView& row = ins.op == PlanOp::kEmbedding ? ins.out : ins.x;
        Tensor table(f.get("weight"), "weight");
        ins.table_rows = table.dim() == 2 ? table.size(0) : 0;
        ins.weight = take<float>(f.get("weight"), name + ".weight", DType::F32, {ins.table_rows, row.width}, out.kept);
        ins.has_scale = f.has("scalar");
        break;
      }
      case PlanOp::kRmsNorm:
      case PlanOp::kAddRmsNorm:
      case PlanOp::kLayerNorm:
      case PlanOp::kAddLayerNorm:
        ins.weight = take<float>(f.get("weight"), name + ".weight", DType::F32, {ins.dim}, out.kept);
        if (f.has("bias")) ins.bias = take<float>(f.get("bias"), name + ".bias", DType::F32, {ins.dim}, out.kept);
        break;
      case PlanOp::kLinear:
        ins.linear = take_linear(f.get("linear"), name + ".linear", ins.out.width, ins.x.width, out.kept);
        break;
      default:
        break;
    }
    const std::string label = f.has("label") ? f.get("label").cast<std::string>() : op;
    auto [it, added] = label_ids.emplace(label, static_cast<int32_t>(labels.size()));
    if (added) labels.push_back(label);
    ins.label = it->second;
    list.push_back(ins);
  }
  try {
    out.plan = std::make_unique<DecodePlan>(vocab, std::move(buffer_widths), output_buffer, std::move(list),
                                            std::move(labels), num_rope_tables);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return out;
}

void step(PyDecodePlan& self, py::handle tokens_obj, py::handle k_obj, py::handle v_obj, py::handle positions_obj,
          py::sequence rope_tables, py::handle logits_obj, py::handle next_tokens_obj, py::handle advance_obj) {
  DecodePlan& plan = *self.plan;
  Tensor tokens(tokens_obj, "tokens"), k(k_obj, "k_cache"), v(v_obj, "v_cache"), positions(positions_obj, "positions"),
      logits(logits_obj, "logits");
  const int64_t B = check_decode_step_tensors(tokens, k, v, positions, logits, plan.num_layers(), plan.kv_heads(),
                                              plan.head_dim(), plan.vocab());
  if (static_cast<int64_t>(py::len(rope_tables)) != plan.num_rope_tables()) {
    throw py::value_error("rope_tables: the plan uses " + std::to_string(plan.num_rope_tables()) +
                          " rotary tables, got " + std::to_string(py::len(rope_tables)));
  }
  std::vector<const float*> cos_data, sin_data;
  std::vector<int64_t> rows;
  for (int32_t t = 0; t < plan.num_rope_tables(); ++t) {
    auto pair = rope_tables[t].cast<py::sequence>();
    if (py::len(pair) != 2) throw py::value_error("rope_tables[" + std::to_string(t) + "]: expected (cos, sin)");
    Tensor cos(pair[0], "cos"), sin(pair[1], "sin");
    const int64_t half = plan.rope_dim(t) / 2;
    check_cpu_contiguous(cos, DType::F32, 2);
    check_nonempty(cos);
    check_size(cos, 1, half, "head_dim / 2");
    check_cpu_contiguous(sin, DType::F32, 2);
    check_size(sin, 0, cos.size(0), "the rows of cos");
    check_size(sin, 1, half, "head_dim / 2");
    for (const Tensor* in : {&cos, &sin}) {
      check_no_overlap(k, *in);
      check_no_overlap(v, *in);
      check_no_overlap(logits, *in);
    }
    cos_data.push_back(cos.data<float>());
    sin_data.push_back(sin.data<float>());
    rows.push_back(cos.size(0));
  }
  const StepTail tail = check_step_tail(next_tokens_obj, advance_obj, tokens, k, v, positions, logits);
  call_without_gil([&] {
    plan.step(tokens.data<int64_t>(), B, k.data<float>(), v.data<float>(), k.size(3), positions.data<int32_t>(),
              cos_data, sin_data, rows, logits.data<float>());
    tail.run(logits.data<float>(), B, plan.vocab(), positions.data<int32_t>());
  });
}

}  // namespace

void bind_decode_plan(py::module_& m) {
  py::class_<PyDecodePlan>(m, "DecodePlan",
                           "A model's decode step, recorded once by pyengine.runtime.plan, replayed in one C++ call per token.")
      .def(py::init(&make_plan), py::arg("vocab_size"), py::arg("buffer_widths"), py::arg("output_buffer"),
           py::arg("instructions"), py::arg("num_rope_tables"),
           "buffer_widths: floats per batch row of each buffer; output_buffer: the one holding the logits "
           "(vocab_size wide), written straight into step()'s logits; instructions: dicts with 'op' (embedding, "
           "add_position_embedding, rms_norm, add_rms_norm, layer_norm, add_layer_norm, linear, rope, write_kv, "
           "attention, silu_mul, gelu_mul, gelu, softcap, copy), views 'x', 'y', 'out' as (buffer, offset, width), "
           "and per op: 'weight' / 'bias' tensors, 'linear' (backend linear weights), 'dim', 'heads', "
           "'kv_heads', 'layer', 'window', 'table', 'scalar' (eps, scale or cap), 'label' (profile name). "
           "Weights must be contiguous CPU tensors; the plan keeps them alive.")
      .def("step", &step, py::arg("tokens"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"),
           py::arg("rope_tables"), py::arg("logits"), py::kw_only(), py::arg("next_tokens") = py::none(),
           py::arg("advance") = py::none(),
           "One decode step: tokens [B] int64; k_cache, v_cache [L, B, Hkv, S, D] fp32 (the new k/v are "
           "written at positions[b]); positions [B] int32 (each sequence's current length); rope_tables: a "
           "(cos, sin) pair of [P, D / 2] fp32 tables per table index the plan uses; logits [B, V] fp32 "
           "(written). Then, for greedy decoding in one call: next_tokens [B] int64 (written: each logits row's "
           "argmax, as argmax_rows) and positions[b] += advance[b] (advance [B] int32).")
      .def_property_readonly("num_layers", [](const PyDecodePlan& self) { return self.plan->num_layers(); })
      .def_property_readonly("num_instructions",
                             [](const PyDecodePlan& self) { return self.plan->instructions().size(); })
      .def("set_profiling", [](PyDecodePlan& self, bool on) { self.plan->set_profiling(on); }, py::arg("on"),
           "Time each instruction of step(), summed per label (adds a clock read per instruction).")
      .def("reset_profile", [](PyDecodePlan& self) { self.plan->reset_profile(); })
      .def("profile",
           [](const PyDecodePlan& self) {
             py::dict out;
             const DecodePlan& plan = *self.plan;
             for (size_t i = 0; i < plan.labels().size(); ++i) out[plan.labels()[i].c_str()] = plan.profile_seconds()[i];
             out["steps"] = plan.profiled_steps();
             return out;
           },
           "Seconds spent per instruction label, summed over the steps profiled, and the number of steps.");
}

}  // namespace pyengine::bind
