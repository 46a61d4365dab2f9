// Fused causal attention over a KV cache (fp32), with grouped-query heads and ragged lengths.
#pragma once
#include <cstdint>

namespace pyengine {

struct AttentionShape {
  int64_t batch;         // B
  int64_t q_len;         // T: new queries per sequence (1 = decode, >1 = prefill)
  int64_t num_q_heads;   // Hq
  int64_t num_kv_heads;  // Hkv; Hq % Hkv == 0, query head h reads kv head h / (Hq / Hkv)
  int64_t cache_len;     // S: capacity of the cache
  int64_t head_dim;      // D
  int64_t window = 0;    // > 0: sliding window, a query at position p sees only keys j > p - window
};

// q, out: [B, T, Hq, D]; k_cache, v_cache: [B, Hkv, S, D]; all contiguous, out overlaps nothing.
// q_start[b] >= 0: absolute position of q[b, 0]; kv_len[b] in [1, S]: valid cache entries.
// Query t of sequence b (position p = q_start[b] + t) attends keys j with j <= p and j < kv_len[b],
// and j > p - window with a sliding window (Mistral); cache entries outside that are never read.
// Throws std::invalid_argument on bad sizes.
void attention(const float* q, const float* k_cache, const float* v_cache, float* out,
               const int32_t* q_start, const int32_t* kv_len, const AttentionShape& shape, float scale);

}  // namespace pyengine
