// A model's decode step (one new token per sequence) as a recorded list of kernel calls over fixed
// buffers, replayed each token from C++. The Python model defines the architecture once
// (hidden_states); pyengine/runtime/plan.py records that code for one token into instructions, and this
// class replays them: one call per token instead of ~15 Python op calls per layer.
//
// Buffers hold `width` floats per batch row (row stride = width) and are grown to the largest batch
// seen. A view is a run of floats inside each row of one buffer. Weights are raw pointers the plan
// does not own: the caller keeps them alive and unchanged for the plan's lifetime.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "pyengine/decoder_common.h"

namespace pyengine {

// Per batch row: `width` floats starting `offset` floats into the row of buffer `buffer`.
struct PlanView {
  int32_t buffer = -1;
  int64_t offset = 0;
  int64_t width = 0;
};

enum class PlanOp : int32_t {
  kEmbedding,             // out = table[tokens] (* scale where has_scale)
  kAddPositionEmbedding,  // x += table[positions] (GPT-2's learned positions), in place
  kRmsNorm,               // out = rms_norm(x) over runs of `dim` (dim < width: per head)
  kAddRmsNorm,            // x += y (in place), out = rms_norm(x)
  kLayerNorm,             // out = layer_norm(x) (weight, bias)
  kAddLayerNorm,          // x += y, out = layer_norm(x)
  kLinear,                // out = x @ W^T + bias (x dense)
  kRope,                  // out = x rotated by rope table `table` at each row's position (heads of `dim`)
  kWriteKv,               // cache layer `layer` at positions[b] = x (keys), y (values): kv_heads x dim
  kAttention,             // out = attention(x (dense q, heads x dim), cache layer `layer`)
  kSiluMul,               // out = silu(x) * y
  kGeluMul,               // out = gelu(x) * y (tanh GELU)
  kGelu,                  // out = gelu(x)
  kSoftcap,               // out = cap * tanh(x / cap), cap in `scalar`
  kCopy,                  // out = x
  kCount
};
const char* plan_op_name(PlanOp op);

struct PlanInstruction {
  PlanOp op = PlanOp::kCopy;
  PlanView x, y, out;
  const float* weight = nullptr;  // norm weight, or the embedding / position table
  const float* bias = nullptr;    // layer_norm bias
  DecoderLinear linear;           // kLinear
  int64_t table_rows = 0;         // rows of the embedding / position table
  int64_t dim = 0;                // norm row length, head_dim (rope, write_kv, attention)
  int64_t heads = 0;              // attention query heads
  int64_t kv_heads = 0;           // attention / write_kv
  int64_t layer = 0;              // KV cache layer
  int64_t window = 0;             // attention sliding window (0: full)
  int32_t table = 0;              // rope table index
  float scalar = 0.0f;            // eps, attention scale, embedding scale, softcap cap
  bool has_scale = false;         // kEmbedding
  int32_t label = 0;              // profile slot
};

class DecodePlan {
 public:
  // Throws std::invalid_argument on an inconsistent plan (bad buffer refs, views out of their buffer,
  // a linear's shape not matching its views, layers or KV heads that disagree), naming the instruction.
  // output_buffer: the buffer holding the logits [B, vocab]; step() writes it straight into `logits`.
  // labels: profile names, one per distinct instruction label.
  DecodePlan(int64_t vocab, std::vector<int64_t> buffer_widths, int32_t output_buffer,
             std::vector<PlanInstruction> instructions, std::vector<std::string> labels, int32_t num_rope_tables);

  // tokens [B]; k_cache, v_cache [L, B, Hkv, S, D] fp32; positions [B] int32 in [0, S) (each sequence's
  // length, where its new k/v go); rope_cos / rope_sin: one [rope_positions[t], head_dim / 2] table
  // each per rope table index; logits [B, vocab]. Values are checked before anything is written
  // (std::invalid_argument naming the argument). Not thread-safe: one step at a time per plan.
  void step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache, int64_t cache_capacity,
            const int32_t* positions, const std::vector<const float*>& rope_cos,
            const std::vector<const float*>& rope_sin, const std::vector<int64_t>& rope_positions, float* logits);

  int64_t vocab() const { return vocab_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int32_t num_rope_tables() const { return num_rope_tables_; }
  int64_t rope_dim(int32_t table) const { return rope_dims_[table]; }
  const std::vector<PlanInstruction>& instructions() const { return instructions_; }

  // Wall time (seconds) per label summed over the steps run while profiling was on (a clock read per
  // instruction, so off by default).
  void set_profiling(bool on) { profiling_ = on; }
  const std::vector<std::string>& labels() const { return labels_; }
  const std::vector<double>& profile_seconds() const { return profile_seconds_; }
  int64_t profiled_steps() const { return profiled_steps_; }
  void reset_profile();

 private:
  void reserve(int64_t batch);
  void run(const PlanInstruction& ins, const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache,
           int64_t cache_capacity, const int32_t* positions, const std::vector<const float*>& rope_cos,
           const std::vector<const float*>& rope_sin, const std::vector<int64_t>& rope_positions);
  float* at(const PlanView& v) const { return buffers_[v.buffer] + v.offset; }
  int64_t stride(const PlanView& v) const { return widths_[v.buffer]; }
  bool dense(const PlanView& v) const { return v.offset == 0 && v.width == widths_[v.buffer]; }

  int64_t vocab_;
  std::vector<int64_t> widths_;
  int32_t output_buffer_;
  std::vector<PlanInstruction> instructions_;
  std::vector<std::string> labels_;
  int32_t num_rope_tables_;
  std::vector<int64_t> rope_dims_;     // head_dim each rope table serves
  int64_t position_table_rows_ = -1;   // smallest position-embedding table (-1: none)
  int64_t num_layers_ = 0, kv_heads_ = 0, head_dim_ = 0;

  int64_t capacity_batch_ = 0;
  std::vector<std::vector<float>> storage_;
  std::vector<float*> buffers_;  // per step: storage, and `logits` for the output buffer
  std::vector<int32_t> kv_len_;

  bool profiling_ = false;
  std::vector<double> profile_seconds_;
  int64_t profiled_steps_ = 0;
};

}  // namespace pyengine
