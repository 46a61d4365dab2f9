// The decode step of a Llama-family model as one C++ call: the same kernels, in the same order, as
// pyengine/models/llama.py runs them from Python, so the numbers match that path.
#include "pyengine/llama_decoder.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pyengine/attention.h"
#include "pyengine/embedding.h"
#include "pyengine/int8_matmul.h"
#include "pyengine/rms_norm.h"
#include "pyengine/rope.h"
#include "pyengine/silu_mul.h"

namespace pyengine {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void check_linear(const DecoderLinear& w, const std::string& name, int64_t out_features, int64_t in_features) {
  require((w.weight_f32 != nullptr) != (w.weight_i8 != nullptr),
          name + ": exactly one of an fp32 or an int8 weight must be given");
  require(w.weight_i8 == nullptr || w.scale != nullptr, name + ": an int8 weight needs its per-row scale");
  require(w.out_features == out_features && w.in_features == in_features,
          name + ".weight: expected shape (" + std::to_string(out_features) + ", " + std::to_string(in_features) +
              "), got (" + std::to_string(w.out_features) + ", " + std::to_string(w.in_features) + ")");
}

// Accumulates the time since the previous mark into a phase (a no-op unless profiling).
class PhaseClock {
 public:
  PhaseClock(bool on, std::array<double, LlamaDecoder::kPhases>& totals) : on_(on), totals_(totals) {
    if (on_) last_ = Clock::now();
  }
  void mark(int phase) {
    if (!on_) return;
    const auto now = Clock::now();
    totals_[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool on_;
  std::array<double, LlamaDecoder::kPhases>& totals_;
  Clock::time_point last_;
};

}  // namespace

const char* LlamaDecoder::phase_name(int phase) {
  static const char* names[kPhases] = {"embedding", "rms_norm",   "qkv",  "rope_kv_write", "attention",
                                       "out",       "gate_up",    "silu_mul", "down",      "lm_head"};
  return phase >= 0 && phase < kPhases ? names[phase] : "?";
}

LlamaDecoder::LlamaDecoder(const LlamaDims& dims, const float* embed, const float* final_norm,
                           const DecoderLinear& lm_head, std::vector<LlamaLayerWeights> layers)
    : dims_(dims), embed_(embed), final_norm_(final_norm), lm_head_(lm_head), layers_(std::move(layers)) {
  const LlamaDims& d = dims_;
  require(d.vocab > 0 && d.hidden > 0 && d.num_q_heads > 0 && d.num_kv_heads > 0 && d.head_dim > 0 &&
              d.intermediate > 0,
          "LlamaDecoder: every dimension must be positive");
  require(d.num_q_heads % d.num_kv_heads == 0, "LlamaDecoder: num_q_heads must be a multiple of num_kv_heads");
  require(d.head_dim % 2 == 0, "LlamaDecoder: head_dim must be even (rotary pairs)");
  require(std::isfinite(d.norm_eps) && d.norm_eps > 0, "LlamaDecoder: norm_eps must be positive");
  require(!layers_.empty(), "LlamaDecoder: layers must not be empty");
  require(embed_ != nullptr, "embed: missing");
  require(final_norm_ != nullptr, "final_norm: missing");
  check_linear(lm_head_, "lm_head", d.vocab, d.hidden);
  const int64_t q_size = d.num_q_heads * d.head_dim, kv_size = d.num_kv_heads * d.head_dim;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LlamaLayerWeights& l = layers_[i];
    const std::string p = "layers[" + std::to_string(i) + "].";
    require(l.attn_norm != nullptr, p + "attn_norm: missing");
    require(l.mlp_norm != nullptr, p + "mlp_norm: missing");
    check_linear(l.qkv, p + "qkv", q_size + 2 * kv_size, d.hidden);
    check_linear(l.out, p + "out", d.hidden, q_size);
    check_linear(l.gate_up, p + "gate_up", 2 * d.intermediate, d.hidden);
    check_linear(l.down, p + "down", d.hidden, d.intermediate);
  }
}

void LlamaDecoder::reset_profile() {
  profile_seconds_.fill(0.0);
  profiled_steps_ = 0;
}

void LlamaDecoder::reserve(int64_t batch) {
  if (batch <= capacity_batch_) return;
  const LlamaDims& d = dims_;
  const int64_t q_size = d.num_q_heads * d.head_dim, kv_size = d.num_kv_heads * d.head_dim;
  x_.resize(batch * d.hidden);
  h_.resize(batch * d.hidden);
  delta_.resize(batch * d.hidden);
  qkv_.resize(batch * (q_size + 2 * kv_size));
  q_.resize(batch * q_size);
  k_.resize(batch * kv_size);
  attn_.resize(batch * q_size);
  gate_up_.resize(batch * 2 * d.intermediate);
  act_.resize(batch * d.intermediate);
  kv_len_.resize(batch);
  capacity_batch_ = batch;
}

void LlamaDecoder::linear(const DecoderLinear& w, const float* x, float* out, int64_t rows) const {
  if (w.weight_i8 != nullptr) {
    int8_linear_weights(x, w.weight_i8, w.scale, w.bias, out, rows, w.out_features, w.in_features);
  } else {
    linear_f32(x, w.weight_f32, w.bias, out, rows, w.out_features, w.in_features);
  }
}

void LlamaDecoder::step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache,
                        int64_t cache_capacity, const int32_t* positions, const float* cos, const float* sin,
                        int64_t num_positions, float* logits) {
  const LlamaDims& d = dims_;
  require(batch >= 1, "tokens: batch must be at least 1");
  require(cache_capacity >= 1, "k_cache: capacity must be at least 1");
  for (int64_t b = 0; b < batch; ++b) {
    require(tokens[b] >= 0 && tokens[b] < d.vocab,
            "tokens: id " + std::to_string(tokens[b]) + " (sequence " + std::to_string(b) +
                ") is outside the vocabulary [0, " + std::to_string(d.vocab) + ")");
    require(positions[b] >= 0 && positions[b] < cache_capacity,
            "positions: position " + std::to_string(positions[b]) + " (sequence " + std::to_string(b) +
                ") is outside the KV cache [0, " + std::to_string(cache_capacity) + ")");
    require(positions[b] < num_positions,
            "positions: position " + std::to_string(positions[b]) + " (sequence " + std::to_string(b) +
                ") is outside the cos/sin tables [0, " + std::to_string(num_positions) + ")");
  }
  reserve(batch);

  const int64_t H = d.hidden, D = d.head_dim, Hq = d.num_q_heads, Hkv = d.num_kv_heads, I = d.intermediate;
  const int64_t q_size = Hq * D, kv_size = Hkv * D, qkv_size = q_size + 2 * kv_size;
  const int64_t layer_stride = batch * Hkv * cache_capacity * D;  // one layer's [B, Hkv, S, D]
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape shape{batch, 1, Hq, Hkv, cache_capacity, D};
  for (int64_t b = 0; b < batch; ++b) kv_len_[b] = positions[b] + 1;

  float *x = x_.data(), *h = h_.data(), *delta = delta_.data(), *qkv = qkv_.data(), *q = q_.data(),
        *k = k_.data(), *attn = attn_.data(), *gate_up = gate_up_.data(), *act = act_.data();
  PhaseClock clock(profiling_, profile_seconds_);

  embedding(tokens, batch, embed_, d.vocab, H, x);
  clock.mark(kEmbedding);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LlamaLayerWeights& layer = layers_[i];
    // The previous layer's MLP output (delta) joins the residual inside the norm.
    if (i == 0) {
      rms_norm(x, layer.attn_norm, h, batch, H, d.norm_eps);
    } else {
      add_rms_norm(x, delta, layer.attn_norm, h, batch, H, d.norm_eps);
    }
    clock.mark(kNorm);
    linear(layer.qkv, h, qkv, batch);
    clock.mark(kQkv);

    // Split each row's q | k | v, rotate q and k, append k and v to the cache at positions[b].
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(q + b * q_size, qkv + b * qkv_size, q_size * sizeof(float));
      std::memcpy(k + b * kv_size, qkv + b * qkv_size + q_size, kv_size * sizeof(float));
    }
    rope(q, cos, sin, positions, batch, Hq, D, num_positions, false);
    rope(k, cos, sin, positions, batch, Hkv, D, num_positions, false);
    float* k_layer = k_cache + i * layer_stride;
    float* v_layer = v_cache + i * layer_stride;
    for (int64_t b = 0; b < batch; ++b) {
      const float* v = qkv + b * qkv_size + q_size + kv_size;
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        const int64_t slot = ((b * Hkv + kvh) * cache_capacity + positions[b]) * D;
        std::memcpy(k_layer + slot, k + (b * Hkv + kvh) * D, D * sizeof(float));
        std::memcpy(v_layer + slot, v + kvh * D, D * sizeof(float));
      }
    }
    clock.mark(kRopeCache);
    attention(q, k_layer, v_layer, attn, positions, kv_len_.data(), shape, scale);
    clock.mark(kAttention);
    linear(layer.out, attn, delta, batch);
    clock.mark(kOut);
    add_rms_norm(x, delta, layer.mlp_norm, h, batch, H, d.norm_eps);
    clock.mark(kNorm);
    linear(layer.gate_up, h, gate_up, batch);
    clock.mark(kGateUp);
    // The gate and up halves are read in place from the gate_up rows: no split copy.
    silu_mul(gate_up, 2 * I, gate_up + I, 2 * I, act, batch, I);
    clock.mark(kSiluMul);
    linear(layer.down, act, delta, batch);
    clock.mark(kDown);
  }
  add_rms_norm(x, delta, final_norm_, h, batch, H, d.norm_eps);
  clock.mark(kNorm);
  linear(lm_head_, h, logits, batch);
  clock.mark(kLmHead);
  if (profiling_) ++profiled_steps_;
}

}  // namespace pyengine
