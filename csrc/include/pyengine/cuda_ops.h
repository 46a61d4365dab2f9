// CUDA kernels, one launcher per op of the same name (the CPU op's header has its maths): launch
// functions over raw device pointers (plain C++, no CUDA headers, so the
// bindings include it without nvcc). Built only where CMake found nvcc (PYENGINE_WITH_CUDA).
//
// Every function launches on `stream` (a cudaStream_t passed as void*; from Python
// torch.cuda.current_stream().cuda_stream), returns without synchronizing, and throws
// std::runtime_error carrying cudaGetErrorString if a launch fails. The caller makes the tensors'
// device current (DeviceGuard) and has checked shapes, dtypes and devices. Device-side values
// (positions, q_start, kv_len) cannot be checked on the host without a sync: kernels clamp them so
// a bad value never reads or writes out of bounds (see each function).
#pragma once
#include <cstdint>

#include "pyengine/attention.h"  // AttentionShape

namespace pyengine::cuda {

enum class FloatType { F32, F16, BF16 };

// Number of CUDA devices; 0 (never an exception) when there is no device or no usable driver.
int device_count();

// Makes `device` current for the lifetime of the guard and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; x, weight, out all of type t (fp32 sums).
// x, out: [rows, dim] (out may be x); weight: [dim].
void rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim, float eps, FloatType t,
              void* stream);

// residual += delta (rounded to t and stored), then out = rms_norm(residual). out must not alias
// residual.
void add_rms_norm(void* residual, const void* delta, const void* weight, void* out, int64_t rows, int64_t dim,
                  float eps, FloatType t, void* stream);

// Rotary embedding in place, same layout and meaning as pyengine::rope (rope.h). x: [tokens,
// heads, head_dim] of type t; cos, sin: [num_positions, head_dim / 2] fp32; positions: [tokens]
// int32. A token whose position is outside [0, num_positions) is left unrotated.
void rope(void* x, const float* cos, const float* sin, const int32_t* positions, int64_t tokens, int64_t heads,
          int64_t head_dim, int64_t num_positions, bool interleaved, FloatType t, void* stream);

// out = silu(gate) * up over n elements of type t (out may be gate or up).
void silu_mul(const void* gate, const void* up, void* out, int64_t n, FloatType t, void* stream);

// Causal GQA attention, same semantics as pyengine::attention (attention.h), sliding window
// included, for q, caches and out of type t and head_dim 64 or 128; fp32 accumulation. Data pointers
// 16-byte aligned. kv_len[b] is clamped to [0, S]; a query that sees no key (kv_len[b] < 1, or
// q_start[b] + t < 0) gets zeros.
// May allocate a stream-ordered workspace (cudaMallocAsync) for the decode split.
void attention(const void* q, const void* k_cache, const void* v_cache, void* out, const int32_t* q_start,
               const int32_t* kv_len, const AttentionShape& shape, float scale, FloatType t, void* stream);

// Weight-only int8 Linear: out[m, n] = w_scale[n] * sum_k x[m, k] * w_q[n, k] (+ bias[n]).
// x: [M, K] and out: [M, N] of type t (F16 or BF16 or F32); w_q: [N, K] int8; w_scale: [N] fp32;
// bias: [N] of type t, or null. Any M (processed 8 rows per launch); fp32 accumulation.
void int8_linear_wo(const void* x, const int8_t* w_q, const float* w_scale, const void* bias, void* out, int64_t M,
                    int64_t N, int64_t K, FloatType t, void* stream);

// out[m, n] = sum_k a[m, k] * b[n, k] in int32 (tensor cores, sm_80+). a: [M, K], b: [N, K] int8,
// out: [M, N] int32; K a multiple of 32; a and b 16-byte aligned.
void int8_matmul_i32(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K, void* stream);

// Symmetric per-row int8: scale[m] = max|x[m]| / 127, q = clamp(round_half_even(x / scale), +-127)
// (0 for an all-zero row). x: [M, K] of type t; q: [M, K] int8; scale: [M] fp32.
void quantize_rows(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, FloatType t, void* stream);

}  // namespace pyengine::cuda
