// The decode step of a GPT-2 model as one C++ call: the same kernels, in the same order, as
// pyengine/models/gpt2.py runs them from Python, so the numbers match that path.
#include "pyengine/gpt2_decoder.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pyengine/attention.h"
#include "pyengine/embedding.h"
#include "pyengine/gelu.h"
#include "pyengine/layer_norm.h"

namespace pyengine {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace

Gpt2Decoder::Gpt2Decoder(const Gpt2Dims& dims, const float* token_embed, const float* position_embed,
                         const float* final_norm_weight, const float* final_norm_bias, const DecoderLinear& lm_head,
                         std::vector<Gpt2LayerWeights> layers)
    : dims_(dims),
      token_embed_(token_embed),
      position_embed_(position_embed),
      final_norm_weight_(final_norm_weight),
      final_norm_bias_(final_norm_bias),
      lm_head_(lm_head),
      layers_(std::move(layers)) {
  const Gpt2Dims& d = dims_;
  require(d.vocab > 0 && d.hidden > 0 && d.num_heads > 0 && d.head_dim > 0 && d.intermediate > 0 &&
              d.max_positions > 0,
          "Gpt2Decoder: every dimension must be positive");
  require(d.num_heads * d.head_dim == d.hidden, "Gpt2Decoder: num_heads * head_dim must equal hidden");
  require(std::isfinite(d.norm_eps) && d.norm_eps > 0, "Gpt2Decoder: norm_eps must be positive");
  require(!layers_.empty(), "Gpt2Decoder: layers must not be empty");
  require(token_embed_ != nullptr, "token_embed: missing");
  require(position_embed_ != nullptr, "position_embed: missing");
  require(final_norm_weight_ != nullptr && final_norm_bias_ != nullptr, "final_norm: missing");
  check_decoder_linear(lm_head_, "lm_head", d.vocab, d.hidden);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Gpt2LayerWeights& l = layers_[i];
    const std::string p = "layers[" + std::to_string(i) + "].";
    require(l.ln_1_weight != nullptr && l.ln_1_bias != nullptr, p + "ln_1: missing");
    require(l.ln_2_weight != nullptr && l.ln_2_bias != nullptr, p + "ln_2: missing");
    check_decoder_linear(l.qkv, p + "qkv", 3 * d.hidden, d.hidden);
    check_decoder_linear(l.out, p + "out", d.hidden, d.hidden);
    check_decoder_linear(l.fc, p + "fc", d.intermediate, d.hidden);
    check_decoder_linear(l.proj, p + "proj", d.hidden, d.intermediate);
  }
}

void Gpt2Decoder::reserve(int64_t batch) {
  if (batch <= capacity_batch_) return;
  const Gpt2Dims& d = dims_;
  for (auto* v : {&x_, &h_, &delta_, &q_, &attn_}) v->resize(batch * d.hidden);
  qkv_.resize(batch * 3 * d.hidden);
  fc_.resize(batch * d.intermediate);
  kv_len_.resize(batch);
  capacity_batch_ = batch;
}

void Gpt2Decoder::step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache,
                       int64_t cache_capacity, const int32_t* positions, float* logits) {
  const Gpt2Dims& d = dims_;
  check_decode_inputs(tokens, batch, d.vocab, positions, cache_capacity, d.max_positions, "position embedding");
  reserve(batch);

  const int64_t H = d.hidden, D = d.head_dim, heads = d.num_heads, I = d.intermediate;
  const int64_t layer_stride = batch * heads * cache_capacity * D;  // one layer's [B, heads, S, D]
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttentionShape shape{batch, 1, heads, heads, cache_capacity, D};
  for (int64_t b = 0; b < batch; ++b) kv_len_[b] = positions[b] + 1;
  float *x = x_.data(), *h = h_.data(), *delta = delta_.data(), *qkv = qkv_.data(), *q = q_.data(),
        *attn = attn_.data(), *fc = fc_.data();

  embedding(tokens, batch, token_embed_, d.vocab, H, x);
  for (int64_t b = 0; b < batch; ++b) {
    const float* pos = position_embed_ + static_cast<int64_t>(positions[b]) * H;
    for (int64_t i = 0; i < H; ++i) x[b * H + i] += pos[i];
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Gpt2LayerWeights& layer = layers_[i];
    // The previous layer's MLP output (delta) joins the residual inside the norm.
    if (i == 0) {
      layer_norm(x, layer.ln_1_weight, layer.ln_1_bias, h, batch, H, d.norm_eps);
    } else {
      add_layer_norm(x, delta, layer.ln_1_weight, layer.ln_1_bias, h, batch, H, d.norm_eps);
    }
    run_decoder_linear(layer.qkv, h, qkv, batch);
    // Each row is q | k | v: q is gathered for attention, k and v go to the cache at positions[b].
    for (int64_t b = 0; b < batch; ++b) std::memcpy(q + b * H, qkv + b * 3 * H, H * sizeof(float));
    float* k_layer = k_cache + i * layer_stride;
    float* v_layer = v_cache + i * layer_stride;
    write_kv(qkv + H, 3 * H, qkv + 2 * H, 3 * H, positions, batch, heads, D, cache_capacity, k_layer, v_layer);
    attention(q, k_layer, v_layer, attn, positions, kv_len_.data(), shape, scale);
    run_decoder_linear(layer.out, attn, delta, batch);
    add_layer_norm(x, delta, layer.ln_2_weight, layer.ln_2_bias, h, batch, H, d.norm_eps);
    run_decoder_linear(layer.fc, h, fc, batch);
    gelu(fc, fc, batch * I);
    run_decoder_linear(layer.proj, fc, delta, batch);
  }
  add_layer_norm(x, delta, final_norm_weight_, final_norm_bias_, h, batch, H, d.norm_eps);
  run_decoder_linear(lm_head_, h, logits, batch);
}

}  // namespace pyengine
