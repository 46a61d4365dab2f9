// Replays a recorded decode step (decode_plan.h): the kernels the Python backend calls, in the order
// the model's hidden_states calls them, so the numbers match that path.
#include "pyengine/decode_plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "pyengine/attention.h"
#include "pyengine/embedding.h"
#include "pyengine/gelu.h"
#include "pyengine/layer_norm.h"
#include "pyengine/rms_norm.h"
#include "pyengine/rope.h"
#include "pyengine/silu_mul.h"

namespace pyengine {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace

const char* plan_op_name(PlanOp op) {
  static const char* names[] = {"embedding", "add_position_embedding", "rms_norm", "add_rms_norm",
                                "layer_norm", "add_layer_norm", "linear", "rope", "write_kv", "attention",
                                "silu_mul", "gelu_mul", "gelu", "softcap", "copy"};
  static_assert(sizeof(names) / sizeof(names[0]) == static_cast<size_t>(PlanOp::kCount));
  const auto i = static_cast<int32_t>(op);
  return i >= 0 && i < static_cast<int32_t>(PlanOp::kCount) ? names[i] : "?";
}

DecodePlan::DecodePlan(int64_t vocab, std::vector<int64_t> buffer_widths, int32_t output_buffer,
                       std::vector<PlanInstruction> instructions, std::vector<std::string> labels,
                       int32_t num_rope_tables)
    : vocab_(vocab),
      widths_(std::move(buffer_widths)),
      output_buffer_(output_buffer),
      instructions_(std::move(instructions)),
      labels_(std::move(labels)),
      num_rope_tables_(num_rope_tables),
      rope_dims_(std::max(num_rope_tables, 0), 0) {
  require(vocab_ > 0, "DecodePlan: vocab must be positive");
  require(num_rope_tables_ >= 0, "DecodePlan: num_rope_tables must be >= 0");
  const auto nbuf = static_cast<int32_t>(widths_.size());
  for (int32_t i = 0; i < nbuf; ++i) require(widths_[i] > 0, "DecodePlan: buffer " + std::to_string(i) + " has no width");
  require(output_buffer_ >= 0 && output_buffer_ < nbuf, "DecodePlan: output_buffer is not a buffer");
  require(widths_[output_buffer_] == vocab_, "DecodePlan: the output buffer must be vocab wide");
  require(!instructions_.empty(), "DecodePlan: no instructions");

  bool embeds = false, writes_output = false;
  for (size_t n = 0; n < instructions_.size(); ++n) {
    const PlanInstruction& ins = instructions_[n];
    const std::string where = "DecodePlan instruction " + std::to_string(n) + " (" + plan_op_name(ins.op) + "): ";
    require(ins.label >= 0 && ins.label < static_cast<int32_t>(labels_.size()), where + "label out of range");
    const auto view_ok = [&](const PlanView& v, const char* name) {
      require(v.buffer >= 0 && v.buffer < nbuf, where + name + " is not a buffer");
      require(v.offset >= 0 && v.width > 0 && v.offset + v.width <= widths_[v.buffer],
              where + name + " lies outside its buffer");
    };
    const auto dense_ok = [&](const PlanView& v, const char* name) {
      view_ok(v, name);
      require(dense(v), where + name + " must be a whole buffer (contiguous rows)");
    };
    const auto same_width = [&](const PlanView& a, const PlanView& b) {
      require(a.width == b.width, where + "inputs and output must have the same width");
    };
    const auto apart = [&](const PlanView& out, const PlanView& in) {
      require(out.buffer != in.buffer, where + "out must not share a buffer with its inputs");
    };
    const auto rows_of = [&](const PlanView& v) {
      require(ins.dim > 0 && v.width % ins.dim == 0, where + "dim must divide the row width");
    };
    if (ins.out.buffer == output_buffer_) writes_output = true;
    switch (ins.op) {
      case PlanOp::kEmbedding:
        dense_ok(ins.out, "out");
        require(ins.weight != nullptr && ins.table_rows > 0, where + "missing table");
        embeds = true;
        break;
      case PlanOp::kAddPositionEmbedding:
        view_ok(ins.x, "x");
        require(ins.weight != nullptr && ins.table_rows > 0, where + "missing table");
        position_table_rows_ =
            position_table_rows_ < 0 ? ins.table_rows : std::min(position_table_rows_, ins.table_rows);
        break;
      case PlanOp::kAddRmsNorm:
      case PlanOp::kAddLayerNorm:
        view_ok(ins.y, "y");
        same_width(ins.x, ins.y);
        apart(ins.out, ins.y);
        [[fallthrough]];
      case PlanOp::kRmsNorm:
      case PlanOp::kLayerNorm:
        view_ok(ins.x, "x");
        view_ok(ins.out, "out");
        same_width(ins.x, ins.out);
        apart(ins.out, ins.x);
        rows_of(ins.x);
        require(ins.weight != nullptr, where + "missing weight");
        require(std::isfinite(ins.scalar) && ins.scalar > 0, where + "eps must be positive");
        break;
      case PlanOp::kLinear:
        dense_ok(ins.x, "x");
        dense_ok(ins.out, "out");
        apart(ins.out, ins.x);
        check_decoder_linear(ins.linear, where + "linear", ins.out.width, ins.x.width);
        break;
      case PlanOp::kRope:
        view_ok(ins.x, "x");
        dense_ok(ins.out, "out");
        same_width(ins.x, ins.out);
        rows_of(ins.x);
        require(ins.dim % 2 == 0, where + "head_dim must be even (rotary pairs)");
        require(ins.table >= 0 && ins.table < num_rope_tables_, where + "rope table index out of range");
        require(rope_dims_[ins.table] == 0 || rope_dims_[ins.table] == ins.dim,
                where + "one rope table serves two head sizes");
        rope_dims_[ins.table] = ins.dim;
        break;
      case PlanOp::kWriteKv:
      case PlanOp::kAttention: {
        if (ins.op == PlanOp::kWriteKv) {
          view_ok(ins.x, "k");
          view_ok(ins.y, "v");
          require(ins.x.width == ins.kv_heads * ins.dim && ins.y.width == ins.x.width,
                  where + "k and v must be kv_heads x head_dim wide");
        } else {
          dense_ok(ins.x, "q");
          dense_ok(ins.out, "out");
          apart(ins.out, ins.x);
          require(ins.heads > 0 && ins.kv_heads > 0 && ins.heads % ins.kv_heads == 0,
                  where + "heads must be a multiple of kv_heads");
          require(ins.x.width == ins.heads * ins.dim && ins.out.width == ins.x.width,
                  where + "q and out must be heads x head_dim wide");
        }
        require(ins.dim > 0 && ins.kv_heads > 0 && ins.layer >= 0, where + "bad cache layer or shape");
        require((head_dim_ == 0 || head_dim_ == ins.dim) && (kv_heads_ == 0 || kv_heads_ == ins.kv_heads),
                where + "every layer's cache must have the same kv_heads and head_dim");
        head_dim_ = ins.dim;
        kv_heads_ = ins.kv_heads;
        num_layers_ = std::max(num_layers_, ins.layer + 1);
        break;
      }
      case PlanOp::kSiluMul:
      case PlanOp::kGeluMul:
        view_ok(ins.x, "gate");
        view_ok(ins.y, "up");
        dense_ok(ins.out, "out");
        same_width(ins.x, ins.y);
        same_width(ins.x, ins.out);
        break;
      case PlanOp::kSoftcap:
        require(std::isfinite(ins.scalar) && ins.scalar > 0, where + "cap must be positive");
        [[fallthrough]];
      case PlanOp::kGelu:
      case PlanOp::kCopy:
        view_ok(ins.x, "x");
        dense_ok(ins.out, "out");
        same_width(ins.x, ins.out);
        break;
      default:
        throw std::invalid_argument(where + "unknown op code");
    }
  }
  require(embeds, "DecodePlan: no embedding instruction (the step's tokens are never read)");
  require(writes_output, "DecodePlan: no instruction writes the output buffer");
  require(num_layers_ > 0, "DecodePlan: no KV cache layer is written or read");
  for (int32_t t = 0; t < num_rope_tables_; ++t) {
    require(rope_dims_[t] > 0, "DecodePlan: rope table " + std::to_string(t) + " is never used");
  }
  storage_.resize(widths_.size());
  buffers_.assign(widths_.size(), nullptr);
  profile_seconds_.assign(labels_.size(), 0.0);
}

void DecodePlan::reset_profile() {
  std::fill(profile_seconds_.begin(), profile_seconds_.end(), 0.0);
  profiled_steps_ = 0;
}

void DecodePlan::reserve(int64_t batch) {
  if (batch <= capacity_batch_) return;
  for (size_t i = 0; i < widths_.size(); ++i) {
    if (static_cast<int32_t>(i) != output_buffer_) storage_[i].resize(batch * widths_[i]);
  }
  kv_len_.resize(batch);
  capacity_batch_ = batch;
}

void DecodePlan::step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache, int64_t cache_capacity,
                      const int32_t* positions, const std::vector<const float*>& rope_cos,
                      const std::vector<const float*>& rope_sin, const std::vector<int64_t>& rope_positions,
                      float* logits) {
  require(batch >= 1, "tokens: batch must be at least 1");
  require(cache_capacity >= 1, "k_cache: capacity must be at least 1");
  require(static_cast<int32_t>(rope_cos.size()) == num_rope_tables_ &&
              static_cast<int32_t>(rope_sin.size()) == num_rope_tables_ &&
              static_cast<int32_t>(rope_positions.size()) == num_rope_tables_,
          "rope_tables: expected " + std::to_string(num_rope_tables_) + " tables");
  int64_t vocab_in = -1;  // the smallest embedding table: every token must index it
  for (const PlanInstruction& ins : instructions_) {
    if (ins.op == PlanOp::kEmbedding) vocab_in = vocab_in < 0 ? ins.table_rows : std::min(vocab_in, ins.table_rows);
  }
  // Messages are built only on failure: this runs every token.
  const auto where = [](int64_t b) { return " (sequence " + std::to_string(b) + ")"; };
  for (int64_t b = 0; b < batch; ++b) {
    require(tokens[b] >= 0 && tokens[b] < vocab_in, "tokens: id " + std::to_string(tokens[b]) + where(b) +
                                                         " is outside the vocabulary [0, " + std::to_string(vocab_in) + ")");
    const int32_t p = positions[b];
    const auto position = [&] { return "positions: position " + std::to_string(p) + where(b); };
    if (p < 0 || p >= cache_capacity) {
      throw std::invalid_argument(position() + " is outside the KV cache [0, " + std::to_string(cache_capacity) + ")");
    }
    for (int32_t t = 0; t < num_rope_tables_; ++t) {
      if (p >= rope_positions[t]) {
        throw std::invalid_argument(position() + " is outside rope table " + std::to_string(t) + " [0, " +
                                    std::to_string(rope_positions[t]) + ")");
      }
    }
    if (position_table_rows_ >= 0 && p >= position_table_rows_) {
      throw std::invalid_argument(position() + " is outside the position embedding [0, " +
                                  std::to_string(position_table_rows_) + ")");
    }
  }
  reserve(batch);
  for (size_t i = 0; i < widths_.size(); ++i) buffers_[i] = storage_[i].data();
  buffers_[output_buffer_] = logits;
  for (int64_t b = 0; b < batch; ++b) kv_len_[b] = positions[b] + 1;

  using Clock = std::chrono::steady_clock;
  Clock::time_point last = profiling_ ? Clock::now() : Clock::time_point{};
  for (const PlanInstruction& ins : instructions_) {
    run(ins, tokens, batch, k_cache, v_cache, cache_capacity, positions, rope_cos, rope_sin, rope_positions);
    if (profiling_) {
      const auto now = Clock::now();
      profile_seconds_[ins.label] += std::chrono::duration<double>(now - last).count();
      last = now;
    }
  }
  if (profiling_) ++profiled_steps_;
}

void DecodePlan::run(const PlanInstruction& ins, const int64_t* tokens, int64_t batch, float* k_cache,
                     float* v_cache, int64_t cache_capacity, const int32_t* positions,
                     const std::vector<const float*>& rope_cos, const std::vector<const float*>& rope_sin,
                     const std::vector<int64_t>& rope_positions) {
  // Row-wise kernels run once over all rows where every view is a whole buffer, else once per
  // sequence (a view inside a wider row, e.g. q of a fused qkv projection, read in place).
  const auto rowwise = [&](std::initializer_list<PlanView> views, auto&& fn) {
    bool all_dense = true;
    for (const PlanView& v : views) all_dense = all_dense && dense(v);
    if (all_dense) {
      fn(int64_t{0}, batch);
    } else {
      for (int64_t b = 0; b < batch; ++b) fn(b, int64_t{1});
    }
  };
  const auto row = [&](const PlanView& v, int64_t b) { return at(v) + b * stride(v); };
  const int64_t layer_stride = batch * kv_heads_ * cache_capacity * head_dim_;  // one layer's [B, Hkv, S, D]

  switch (ins.op) {
    case PlanOp::kEmbedding: {
      float* out = at(ins.out);
      embedding(tokens, batch, ins.weight, ins.table_rows, ins.out.width, out);
      if (ins.has_scale) {
        for (int64_t i = 0; i < batch * ins.out.width; ++i) out[i] *= ins.scalar;
      }
      break;
    }
    case PlanOp::kAddPositionEmbedding:
      for (int64_t b = 0; b < batch; ++b) {
        const float* pos = ins.weight + static_cast<int64_t>(positions[b]) * ins.x.width;
        float* x = row(ins.x, b);
        for (int64_t i = 0; i < ins.x.width; ++i) x[i] += pos[i];
      }
      break;
    case PlanOp::kRmsNorm:
      rowwise({ins.x, ins.out}, [&](int64_t b, int64_t n) {
        rms_norm(row(ins.x, b), ins.weight, row(ins.out, b), n * ins.x.width / ins.dim, ins.dim, ins.scalar);
      });
      break;
    case PlanOp::kAddRmsNorm:
      rowwise({ins.x, ins.y, ins.out}, [&](int64_t b, int64_t n) {
        add_rms_norm(row(ins.x, b), row(ins.y, b), ins.weight, row(ins.out, b), n * ins.x.width / ins.dim, ins.dim,
                     ins.scalar);
      });
      break;
    case PlanOp::kLayerNorm:
      rowwise({ins.x, ins.out}, [&](int64_t b, int64_t n) {
        layer_norm(row(ins.x, b), ins.weight, ins.bias, row(ins.out, b), n * ins.x.width / ins.dim, ins.dim,
                   ins.scalar);
      });
      break;
    case PlanOp::kAddLayerNorm:
      rowwise({ins.x, ins.y, ins.out}, [&](int64_t b, int64_t n) {
        add_layer_norm(row(ins.x, b), row(ins.y, b), ins.weight, ins.bias, row(ins.out, b),
                       n * ins.x.width / ins.dim, ins.dim, ins.scalar);
      });
      break;
    case PlanOp::kLinear:
      run_decoder_linear(ins.linear, at(ins.x), at(ins.out), batch);
      break;
    case PlanOp::kRope: {
      float* out = at(ins.out);
      if (!dense(ins.x) || at(ins.x) != out) {
        for (int64_t b = 0; b < batch; ++b) std::memcpy(out + b * ins.out.width, row(ins.x, b), ins.x.width * sizeof(float));
      }
      rope(out, rope_cos[ins.table], rope_sin[ins.table], positions, batch, ins.out.width / ins.dim, ins.dim,
           rope_positions[ins.table], false);
      break;
    }
    case PlanOp::kWriteKv:
      write_kv(at(ins.x), stride(ins.x), at(ins.y), stride(ins.y), positions, batch, ins.kv_heads, ins.dim,
               cache_capacity, k_cache + ins.layer * layer_stride, v_cache + ins.layer * layer_stride);
      break;
    case PlanOp::kAttention: {
      const AttentionShape shape{batch, 1, ins.heads, ins.kv_heads, cache_capacity, ins.dim, ins.window};
      attention(at(ins.x), k_cache + ins.layer * layer_stride, v_cache + ins.layer * layer_stride, at(ins.out),
                positions, kv_len_.data(), shape, ins.scalar);
      break;
    }
    case PlanOp::kSiluMul:
      silu_mul(at(ins.x), stride(ins.x), at(ins.y), stride(ins.y), at(ins.out), batch, ins.out.width);
      break;
    case PlanOp::kGeluMul:
      gelu_mul(at(ins.x), stride(ins.x), at(ins.y), stride(ins.y), at(ins.out), batch, ins.out.width);
      break;
    case PlanOp::kGelu:
      rowwise({ins.x, ins.out}, [&](int64_t b, int64_t n) { gelu(row(ins.x, b), row(ins.out, b), n * ins.x.width); });
      break;
    case PlanOp::kSoftcap:
      rowwise({ins.x, ins.out},
              [&](int64_t b, int64_t n) { softcap(row(ins.x, b), row(ins.out, b), n * ins.x.width, ins.scalar); });
      break;
    case PlanOp::kCopy:
      for (int64_t b = 0; b < batch; ++b) std::memcpy(row(ins.out, b), row(ins.x, b), ins.x.width * sizeof(float));
      break;
    default:
      break;
  }
}

}  // namespace pyengine
