// One decode step (one new token per sequence) of a GPT-2 model, driven entirely from C++:
// token + position embedding -> layers (layer_norm, qkv, KV-cache write, attention, out,
// layer_norm, fc, gelu, proj) -> final layer_norm -> lm_head. The GPT-2 counterpart of
// llama_decoder.h: the same kernels in the same order as pyengine/models/gpt2.py runs them from
// Python, in one call per token instead of ~10 op calls per layer.
//
// Built once from raw weight pointers it does not own: the caller keeps the weights alive and
// unchanged for the decoder's lifetime.
#pragma once
#include <cstdint>
#include <vector>

#include "pyengine/decoder_common.h"

namespace pyengine {

struct Gpt2LayerWeights {
  const float* ln_1_weight = nullptr;  // [H]
  const float* ln_1_bias = nullptr;    // [H]
  DecoderLinear qkv;                   // [3 H, H]: q rows, then k rows, then v rows
  DecoderLinear out;                   // [H, H]
  const float* ln_2_weight = nullptr;  // [H]
  const float* ln_2_bias = nullptr;    // [H]
  DecoderLinear fc;                    // [I, H]
  DecoderLinear proj;                  // [H, I]
};

struct Gpt2Dims {
  int64_t vocab = 0;          // V
  int64_t hidden = 0;         // H = num_heads * head_dim
  int64_t num_heads = 0;      // every head has its own keys and values
  int64_t head_dim = 0;       // D
  int64_t intermediate = 0;   // I
  int64_t max_positions = 0;  // P: rows of the position embedding
  float norm_eps = 1e-5f;
};

class Gpt2Decoder {
 public:
  // token_embed [V, H], position_embed [P, H], final norm weight and bias [H]. Throws
  // std::invalid_argument on inconsistent dims or linear shapes (the message names the tensor).
  Gpt2Decoder(const Gpt2Dims& dims, const float* token_embed, const float* position_embed,
              const float* final_norm_weight, const float* final_norm_bias, const DecoderLinear& lm_head,
              std::vector<Gpt2LayerWeights> layers);

  // tokens: [B] ids in [0, V). k_cache, v_cache: [L, B, num_heads, S, D] contiguous fp32
  // (S = cache_capacity). positions: [B] int32 in [0, min(S, P)): the current length of each
  // sequence, where its new k/v go; its query attends cache entries 0 .. positions[b].
  // logits: [B, V]. Arguments are validated before anything is written; bad ones throw
  // std::invalid_argument naming the argument. Not thread-safe (one step at a time per decoder).
  void step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache, int64_t cache_capacity,
            const int32_t* positions, float* logits);

  const Gpt2Dims& dims() const { return dims_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  void reserve(int64_t batch);

  Gpt2Dims dims_;
  const float* token_embed_;
  const float* position_embed_;
  const float* final_norm_weight_;
  const float* final_norm_bias_;
  DecoderLinear lm_head_;
  std::vector<Gpt2LayerWeights> layers_;
  // Scratch, grown to the largest batch seen: decode reuses it every token without allocating.
  int64_t capacity_batch_ = 0;
  std::vector<float> x_, h_, delta_, qkv_, q_, attn_, fc_;
  std::vector<int32_t> kv_len_;
};

}  // namespace pyengine
