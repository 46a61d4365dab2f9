// What the C++ decode step (decode_plan.h) runs besides the single ops: its linear layers, with the
// kernels the Python path uses for the same weights, and the write of the new keys and values into
// the cache.
#pragma once
#include <cstdint>
#include <string>

namespace pyengine {

// out = x @ W^T + bias for W [out_features, in_features]: fp32 (weight_f32, linear_f32), bf16
// (weight_bf16, linear_bf16) or int8 (weight_i8 + one fp32 scale per output row, the layout of
// pyengine.quantize.int8.Int8Linear, run by int8_linear_a16). Exactly one weight is set; bias may be null.
struct DecoderLinear {
  const float* weight_f32 = nullptr;
  const uint16_t* weight_bf16 = nullptr;
  const int8_t* weight_i8 = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t out_features = 0;
  int64_t in_features = 0;
};

// Throws std::invalid_argument (naming `name`) unless w is one complete fp32, bf16 or int8 weight of
// shape [out_features, in_features].
void check_decoder_linear(const DecoderLinear& w, const std::string& name, int64_t out_features,
                          int64_t in_features);

// out [rows, out_features] = x [rows, in_features] @ W^T + bias.
void run_decoder_linear(const DecoderLinear& w, const float* x, float* out, int64_t rows);

// Writes each sequence's new keys and values (sequence b's Hkv x D at k + b * k_stride and at
// v + b * v_stride) into one layer's cache [B, Hkv, S, D] at positions[b].
void write_kv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int32_t* positions,
              int64_t batch, int64_t kv_heads, int64_t head_dim, int64_t cache_capacity, float* k_layer,
              float* v_layer);

}  // namespace pyengine
