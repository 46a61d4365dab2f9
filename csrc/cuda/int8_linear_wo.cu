// Weight-only int8 GEMV / skinny GEMM for decode: out[m, n] = w_scale[n] * sum_k x[m, k] w_q[n, k] + bias[n].
//
// Memory bound on the weight: each warp streams kRowsPerWarp weight rows with 16-byte loads (16
// int8 per lane per step), converts them to fp32 in registers and multiplies them with up to 8 rows
// of x (read through L1/L2: x is small), so every weight byte is read from DRAM once per launch.
// Lanes end with partial sums that one warp reduction per (m, n) completes.
#include "common.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kMaxRows = 8;  // rows of x per launch (the host loops over larger M)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;

// Sixteen consecutive elements of x as fp32 (16-element aligned).
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 f = load4(p + 4 * i);
    v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
  }
}

__device__ __forceinline__ float int8_lane(int word, int byte) {
  return static_cast<float>(static_cast<int8_t>(static_cast<uint32_t>(word) >> (8 * byte)));
}

// kVector: K % 16 == 0 and x, w_q 16-byte aligned, so every 16-element chunk is one aligned load.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
int8_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
                 const T* __restrict__ bias, T* __restrict__ out, int rows, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  if (n0 >= N) return;  // whole warp; no block barrier in this kernel

  float acc[kMaxRows][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.0f;

  if (kVector) {
#pragma unroll 2
    for (int64_t k = lane * 16; k < K; k += 32 * 16) {
      int4 wv[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        wv[r] = n0 + r < N ? __ldg(reinterpret_cast<const int4*>(w + (n0 + r) * K + k)) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m >= rows) break;
        float xv[16];
        load16(x + m * K + k, xv);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int words[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
          float sum = 0.0f;
#pragma unroll
          for (int e = 0; e < 16; ++e) sum += xv[e] * int8_lane(words[e / 4], e % 4);
          acc[m][r] += sum;
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      float wf[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) wf[r] = n0 + r < N ? static_cast<float>(w[(n0 + r) * K + k]) : 0.0f;
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m >= rows) break;
        const float xv = to_float(x[m * K + k]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] += xv * wf[r];
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m >= rows) break;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float total = warp_sum(acc[m][r]);
      const int64_t n = n0 + r;
      if (lane == 0 && n < N) {
        const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
        out[m * N + n] = from_float<T>(total * w_scale[n] + b);
      }
    }
  }
}

}  // namespace

void int8_linear_wo(const void* x, const int8_t* w_q, const float* w_scale, const void* bias, void* out, int64_t M,
                    int64_t N, int64_t K, FloatType t, void* stream) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  const int64_t rows_per_block = kWarps * kRowsPerWarp;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("int8_linear_wo: N too large");
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const bool vector = K % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(w_q) % 16 == 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int rows = static_cast<int>(M - m0 < kMaxRows ? M - m0 : kMaxRows);
      const T* x_chunk = xt + m0 * K;
      T* out_chunk = static_cast<T*>(out) + m0 * N;
      if (vector) {
        int8_gemv_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(
            x_chunk, w_q, w_scale, static_cast<const T*>(bias), out_chunk, rows, N, K);
      } else {
        int8_gemv_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(
            x_chunk, w_q, w_scale, static_cast<const T*>(bias), out_chunk, rows, N, K);
      }
      check_launch("int8_gemv_kernel");
    }
  });
}

}  // namespace pyengine::cuda
