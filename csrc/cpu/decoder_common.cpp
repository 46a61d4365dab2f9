#include "pyengine/decoder_common.h"

#include <cstring>
#include <stdexcept>

#include "pyengine/int8_matmul.h"
#include "pyengine/linear_f32.h"
#include "pyengine/linear_bf16.h"

namespace pyengine {

void check_decoder_linear(const DecoderLinear& w, const std::string& name, int64_t out_features,
                          int64_t in_features) {
  if ((w.weight_f32 != nullptr) + (w.weight_bf16 != nullptr) + (w.weight_i8 != nullptr) != 1) {
    throw std::invalid_argument(name + ": exactly one of an fp32, a bf16 or an int8 weight must be given");
  }
  if (w.weight_i8 != nullptr && w.scale == nullptr) {
    throw std::invalid_argument(name + ": an int8 weight needs its per-row scale");
  }
  if (w.out_features != out_features || w.in_features != in_features) {
    throw std::invalid_argument(name + ".weight: expected shape (" + std::to_string(out_features) + ", " +
                                std::to_string(in_features) + "), got (" + std::to_string(w.out_features) +
                                ", " + std::to_string(w.in_features) + ")");
  }
}

void run_decoder_linear(const DecoderLinear& w, const float* x, float* out, int64_t rows) {
  if (w.weight_i8 != nullptr) {
    int8_linear_a16(x, w.weight_i8, w.scale, w.bias, out, rows, w.out_features, w.in_features);
  } else if (w.weight_bf16 != nullptr) {
    linear_bf16(x, w.weight_bf16, w.bias, out, rows, w.out_features, w.in_features);
  } else {
    linear_f32(x, w.weight_f32, w.bias, out, rows, w.out_features, w.in_features);
  }
}

void write_kv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int32_t* positions,
              int64_t batch, int64_t kv_heads, int64_t head_dim, int64_t cache_capacity, float* k_layer,
              float* v_layer) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t slot = ((b * kv_heads + h) * cache_capacity + positions[b]) * head_dim;
      std::memcpy(k_layer + slot, k + b * k_stride + h * head_dim, head_dim * sizeof(float));
      std::memcpy(v_layer + slot, v + b * v_stride + h * head_dim, head_dim * sizeof(float));
    }
  }
}

}  // namespace pyengine
