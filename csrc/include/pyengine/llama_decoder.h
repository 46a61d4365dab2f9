// One decode step (one new token per sequence) of a Llama-family decoder, driven entirely from C++:
// embedding -> layers (rms_norm, qkv, rope, KV-cache write, attention, out, rms_norm, gate_up,
// silu*up, down) -> final norm -> lm_head. A Python-driven step costs ~15 op calls per layer of
// interpreter and binding overhead; this is one call per token.
//
// Built once from raw weight pointers it does not own: the caller keeps the weights alive and
// unchanged for the decoder's lifetime.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "pyengine/decoder_common.h"

namespace pyengine {

struct LlamaLayerWeights {
  const float* attn_norm = nullptr;  // [H]
  DecoderLinear qkv;                 // [(Hq + 2 Hkv) D, H]: q rows, then k rows, then v rows
  DecoderLinear out;                 // [H, Hq D]
  const float* mlp_norm = nullptr;   // [H]
  DecoderLinear gate_up;             // [2 I, H]: gate rows, then up rows
  DecoderLinear down;                // [H, I]
  int64_t window = 0;                // > 0: this layer attends only the last `window` positions (sliding)
};

struct LlamaDims {
  int64_t vocab = 0;         // V
  int64_t hidden = 0;        // H
  int64_t num_q_heads = 0;   // Hq
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D (even)
  int64_t intermediate = 0;  // I
  float norm_eps = 1e-5f;
};

class LlamaDecoder {
 public:
  // Phases of a step, for the optional per-op profile.
  enum Phase { kEmbedding, kNorm, kQkv, kRopeCache, kAttention, kOut, kGateUp, kSiluMul, kDown, kLmHead, kPhases };
  static const char* phase_name(int phase);

  // Throws std::invalid_argument on inconsistent dims or linear shapes (message names the tensor).
  LlamaDecoder(const LlamaDims& dims, const float* embed, const float* final_norm, const DecoderLinear& lm_head,
               std::vector<LlamaLayerWeights> layers);

  // tokens: [B] ids in [0, V). k_cache, v_cache: [L, B, Hkv, S, D] contiguous fp32 (S = cache_capacity).
  // positions: [B] int32 in [0, S): the current length of each sequence, where its new k/v go;
  // its query attends cache entries 0 .. positions[b].
  // cos, sin: [num_positions, D / 2] rotary tables (half-split layout) covering every positions[b].
  // logits: [B, V]. Arguments are validated before anything is written; bad ones throw
  // std::invalid_argument naming the argument. Not thread-safe (one step at a time per decoder).
  void step(const int64_t* tokens, int64_t batch, float* k_cache, float* v_cache, int64_t cache_capacity,
            const int32_t* positions, const float* cos, const float* sin, int64_t num_positions, float* logits);

  const LlamaDims& dims() const { return dims_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // Per-phase wall time (seconds) summed over the steps run while profiling was on; timing adds a
  // clock read per op, so it is off by default.
  void set_profiling(bool on) { profiling_ = on; }
  bool profiling() const { return profiling_; }
  const std::array<double, kPhases>& profile_seconds() const { return profile_seconds_; }
  int64_t profiled_steps() const { return profiled_steps_; }
  void reset_profile();

 private:
  void reserve(int64_t batch);

  LlamaDims dims_;
  const float* embed_;
  const float* final_norm_;
  DecoderLinear lm_head_;
  std::vector<LlamaLayerWeights> layers_;
  // Scratch, grown to the largest batch seen: decode reuses it every token without allocating.
  int64_t capacity_batch_ = 0;
  std::vector<float> x_, h_, qkv_, q_, k_, attn_, delta_, gate_up_, act_;
  std::vector<int32_t> kv_len_;

  bool profiling_ = false;
  std::array<double, kPhases> profile_seconds_{};
  int64_t profiled_steps_ = 0;
};

}  // namespace pyengine
