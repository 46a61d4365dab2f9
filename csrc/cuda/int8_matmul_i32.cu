// int8 x int8 -> int32 GEMM on tensor cores (mma.sync m16n8k32, sm_80+) for prefill, and the
// per-token symmetric quantization of activations that feeds it.
//
// out[m, n] = sum_k a[m, k] * b[n, k]: a [M, K] row-major is the MMA's "row" A operand and b
// [N, K] row-major is exactly its "col" B operand, so both tiles are copied to shared memory as they
// are. A block computes a 64x64 tile of out with 4 warps (2x2, 32x32 each = 2x4 MMAs per 32-wide k
// step), looping over K in 64-byte slices: plain synchronous loads, no cp.async or pipelining.
#include "common.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 64;
constexpr int kThreads = 128;
// Shared-memory row stride in bytes: 16 bytes of padding make the fragment reads (8 rows x 4
// words per warp) hit 32 distinct banks, and keep every row 16-byte aligned.
constexpr int kStride = kTileK + 16;

__device__ __forceinline__ void mma_s8_16x8x32(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t load_u32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Copies rows [row0, row0 + 64) x bytes [k0, k0 + 64) of src [rows, K] into the tile; out-of-range
// rows and k are zeros (K % 16 == 0, so a 16-byte chunk is wholly in or out).
__device__ __forceinline__ void load_tile(int8_t* tile, const int8_t* __restrict__ src, int64_t rows, int64_t K,
                                          int64_t row0, int64_t k0) {
  for (int chunk = threadIdx.x; chunk < 64 * (kTileK / 16); chunk += kThreads) {
    const int r = chunk / (kTileK / 16), col = (chunk % (kTileK / 16)) * 16;
    const int64_t row = row0 + r, k = k0 + col;
    int4 v = make_int4(0, 0, 0, 0);
    if (row < rows && k < K) v = *reinterpret_cast<const int4*>(src + row * K + k);
    *reinterpret_cast<int4*>(tile + r * kStride + col) = v;
  }
}

__global__ void __launch_bounds__(kThreads)
int8_gemm_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ b, int32_t* __restrict__ out, int64_t M,
                 int64_t N, int64_t K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // not built for these architectures (CMake targets sm_80 and sm_90)
#else
  __shared__ __align__(16) int8_t a_s[kTileM * kStride];
  __shared__ __align__(16) int8_t b_s[kTileN * kStride];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, thread_in_group = lane & 3;  // the PTX fragment layout's names
  const int warp_m = (warp >> 1) * 32, warp_n = (warp & 1) * 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  int acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    load_tile(a_s, a, M, K, m0, k0);
    load_tile(b_s, b, N, K, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 32) {
      // A fragment (16x32): a0 = (row g, k 4t..4t+3), a1 = (g + 8, same k), a2/a3 = the same at k + 16.
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int8_t* base = a_s + (warp_m + i * 16 + group) * kStride + kk + thread_in_group * 4;
        af[i][0] = load_u32(base);
        af[i][1] = load_u32(base + 8 * kStride);
        af[i][2] = load_u32(base + 16);
        af[i][3] = load_u32(base + 8 * kStride + 16);
      }
      // B fragment (32x8, column n = g): b0 = k 4t..4t+3, b1 = k + 16.
      uint32_t bf[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int8_t* base = b_s + (warp_n + j * 8 + group) * kStride + kk + thread_in_group * 4;
        bf[j][0] = load_u32(base);
        bf[j][1] = load_u32(base + 16);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8_16x8x32(acc[i][j], af[i], bf[j]);
    }
    __syncthreads();
  }

  // C fragment (16x8): c0, c1 = (row g, cols 2t, 2t + 1), c2, c3 = (row g + 8, same cols).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + warp_n + j * 8 + thread_in_group * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + warp_m + i * 16 + group + half * 8;
        if (row >= M) continue;
        if (col < N) out[row * N + col] = acc[i][j][2 * half];
        if (col + 1 < N) out[row * N + col + 1] = acc[i][j][2 * half + 1];
      }
    }
  }
#endif
}

constexpr int kQuantThreads = 256;

// One block per row: scale = max|x| / 127, q = clamp(rint(x / scale)) (true division, round half to
// even: the CPU op's and torch's round(x / scale)). As on the CPU, a row holding a NaN or an infinity
// gets scale NaN and q 0 (fmaxf alone would drop a NaN).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int64_t K) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * K;
  int8_t* q_row = q + blockIdx.x * K;
  float amax = 0.0f;
  int non_finite = 0;
  for (int64_t i = threadIdx.x; i < K; i += kQuantThreads) {
    const float v = to_float(row[i]);
    amax = fmaxf(amax, fabsf(v));
    non_finite |= !isfinite(v);
  }
  non_finite = __syncthreads_or(non_finite);
  amax = block_max(amax, scratch);
  const float s = non_finite ? __int_as_float(0x7fc00000) : amax / 127.0f;
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  for (int64_t i = threadIdx.x; i < K; i += kQuantThreads) {
    int v = 0;
    if (s > 0.0f) v = min(127, max(-127, __float2int_rn(__fdiv_rn(to_float(row[i]), s))));
    q_row[i] = static_cast<int8_t>(v);
  }
}

}  // namespace

void int8_matmul_i32(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K, void* stream) {
  if (M <= 0 || N <= 0) return;
  if (K % 32 != 0) throw std::invalid_argument("int8_matmul_i32: K must be a multiple of 32");
  const int64_t grid_m = (M + kTileM - 1) / kTileM, grid_n = (N + kTileN - 1) / kTileN;
  if (grid_m > 65535 || grid_n > 0x7fffffffLL) throw std::invalid_argument("int8_matmul_i32: M or N too large");
  if (K == 0) {
    throw_on_error(cudaMemsetAsync(out, 0, sizeof(int32_t) * M * N, as_stream(stream)), "int8_matmul_i32: memset");
    return;
  }
  int8_gemm_kernel<<<dim3(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m)), kThreads, 0,
                     as_stream(stream)>>>(a, b, out, M, N, K);
  check_launch("int8_gemm_kernel");
}

void quantize_rows(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, FloatType t, void* stream) {
  if (M <= 0 || K <= 0) return;
  if (M > 0x7fffffffLL) throw std::invalid_argument("quantize_rows: too many rows");
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_rows_kernel<T><<<static_cast<unsigned>(M), kQuantThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), q, scale, K);
  });
  check_launch("quantize_rows_kernel");
}

}  // namespace pyengine::cuda
