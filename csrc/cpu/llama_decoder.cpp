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
#include "pyengine/rms_norm.h"
#include "pyengine/rope.h"
#include "pyengine/silu_mul.h"

namespace pyengine {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
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
  check_decoder_linear(lm_head_, "lm_head", d.vocab, d.hidden);
  const int64_t q_size = d.num_q_heads * d.head_dim, kv_size = d.num_kv_heads * d.head_dim;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LlamaLayerWeights& l = layers_[i];
    const std::string p = "layers[" + std::to_string(i) + "].";
    require(l.attn_norm != nullptr, p + "attn_norm: missing");
    require(l.mlp_norm != nullptr, p + "mlp_norm: missing");
    check_decoder_linear(l.qkv, p + "qkv", q_size + 2 * kv_size, d.hidden);
    check_decoder_linear(l.out, p + "out", d.hidden, q_size);
    check_decoder_linear(l.gate_up, p + "gate_up", 2 * d.intermediate, d.hidden);
    check_decoder_linear(l.down, p + "down", d.hidden, d.intermediate);
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

void LlamaDecoder::step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache,
                        int64_t cache_capacity, const int32_t* positions, const float* cos, const float* sin,
                        int64_t num_positions, float* logits) {
  const LlamaDims& d = dims_;
  check_decode_inputs(tokens, batch, d.vocab, positions, cache_capacity, num_positions, "cos/sin tables");
  reserve(batch);

  const int64_t H = d.hidden, D = d.head_dim, Hq = d.num_q_heads, Hkv = d.num_kv_heads, I = d.intermediate;
  const int64_t q_size = Hq * D, kv_size = Hkv * D, qkv_size = q_size + 2 * kv_size;
  const int64_t layer_stride = batch * Hkv * cache_capacity * D;  // one layer's [B, Hkv, S, D]
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AttentionShape shape{batch, 1, Hq, Hkv, cache_capacity, D, 0};
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
    run_decoder_linear(layer.qkv, h, qkv, batch);
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
    write_kv(k, kv_size, qkv + q_size + kv_size, qkv_size, positions, batch, Hkv, D, cache_capacity, k_layer,
             v_layer);
    clock.mark(kRopeCache);
    shape.window = layer.window;
    attention(q, k_layer, v_layer, attn, positions, kv_len_.data(), shape, scale);
    clock.mark(kAttention);
    run_decoder_linear(layer.out, attn, delta, batch);
    clock.mark(kOut);
    add_rms_norm(x, delta, layer.mlp_norm, h, batch, H, d.norm_eps);
    clock.mark(kNorm);
    run_decoder_linear(layer.gate_up, h, gate_up, batch);
    clock.mark(kGateUp);
    // The gate and up halves are read in place from the gate_up rows: no split copy.
    silu_mul(gate_up, 2 * I, gate_up + I, 2 * I, act, batch, I);
    clock.mark(kSiluMul);
    run_decoder_linear(layer.down, act, delta, batch);
    clock.mark(kDown);
  }
  add_rms_norm(x, delta, final_norm_, h, batch, H, d.norm_eps);
  clock.mark(kNorm);
  run_decoder_linear(lm_head_, h, logits, batch);
  clock.mark(kLmHead);
  if (profiling_) ++profiled_steps_;
}

}  // namespace pyengine
