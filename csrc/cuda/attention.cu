// Causal GQA attention over a KV cache (same semantics as the CPU op, attention.h).
//
// One kernel for prefill and decode. A block owns one (batch, kv head) and a tile of "rows", where
// row r of a (b, kv head) is query t = r / group of query head kv_head * group + r % group: all
// query heads that share a kv head are served by one pass over its keys (GQA without copying KV).
// The block walks the keys in tiles of 32 (K and V converted to fp32 in shared memory) keeping a
// running (max, sum, acc) per row: the online softmax, so no score matrix ever reaches global
// memory. Each warp owns ROWS rows; lane l scores key l of the tile against them, the warp reduces
// max/sum with shuffles, and for P.V lane l accumulates output dims l, l + 32, ...
//
// Prefill (many rows): ROWS = 16, 64 rows a block, the block's key range is the whole causal
// prefix, the result is written normalized. Decode (rows = T * group <= 16): small ROWS, and the
// key range is split across blocks (flash-decoding); each block writes an unnormalized partial
// (max, sum, acc) and attention_merge_kernel combines the splits.
//
// Plain fp32 FMAs (no tensor cores): simple rather than fast; never run at the time of writing.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "pyengine/attention_window.h"

namespace pyengine::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeys = 32;       // keys per tile: one per lane
constexpr int kMaxSplits = 64;  // decode: key-range splits per (batch, kv head)

struct AttentionParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* q_start;
  const int32_t* kv_len;
  int64_t q_len, num_q_heads, num_kv_heads, cache_len;
  int64_t group;  // num_q_heads / num_kv_heads
  int64_t rows;   // q_len * group: rows per (batch, kv head)
  int64_t window;  // > 0: sliding window (key_range, attention_window.h)
  float scale;
  int64_t split_keys;  // SPLIT: keys per split (a multiple of kKeys)
  int num_splits;
  float* part_max;  // SPLIT: [B * T * Hq, splits]
  float* part_sum;  // SPLIT: [B * T * Hq, splits]
  float* part_acc;  // SPLIT: [B * T * Hq, splits, D]
};

template <int D, int ROWS>
constexpr size_t attention_smem_bytes() {
  constexpr int tile_rows = kWarps * ROWS;
  return sizeof(float) * (tile_rows * D + kKeys * (D + 4) + kKeys * D + tile_rows * kKeys);
}

template <typename T, int D, int ROWS, bool SPLIT>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionParams p) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  constexpr int kTileRows = kWarps * ROWS;
  constexpr int kDimsPerLane = D / 32;
  constexpr int kKStride = D + 4;  // padding: lanes read different K rows with float4, no bank conflicts

  extern __shared__ float4 smem_f4[];
  float* q_s = reinterpret_cast<float*>(smem_f4);  // [kTileRows][D], pre-scaled
  float* k_s = q_s + kTileRows * D;                // [kKeys][kKStride]
  float* v_s = k_s + kKeys * kKStride;             // [kKeys][D]
  float* p_s = v_s + kKeys * D;                    // [kTileRows][kKeys]: probabilities of the tile

  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.x;  // batch * num_kv_heads + kv_head
  const int64_t b = bh / p.num_kv_heads, kv_head = bh % p.num_kv_heads;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;

  // Query head and token of a row; out/q row index (b, t, h) in [B * T * Hq].
  auto token_row = [&](int64_t row) {
    const int64_t t = row / p.group, h = kv_head * p.group + row % p.group;
    return (b * p.q_len + t) * p.num_q_heads + h;
  };

  // ---- Q tile, scaled, to shared memory (rows past the end are zeros) ----
  for (int idx = tid; idx < kTileRows * (D / 4); idx += kThreads) {
    const int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
    const int64_t row = row0 + r;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < p.rows) {
      v = load4(q + token_row(row) * D + c);
      v.x *= p.scale; v.y *= p.scale; v.z *= p.scale; v.w *= p.scale;
    }
    *reinterpret_cast<float4*>(q_s + r * D + c) = v;
  }

  // ---- key range of this block ----
  const int64_t start = p.q_start[b];
  const int64_t len = min(max(static_cast<int64_t>(p.kv_len[b]), int64_t{0}), p.cache_len);
  const int64_t last_row = min(row0 + kTileRows, p.rows) - 1;
  // A row's range moves forward with its position: the block's first row starts it, its last ends it.
  int64_t k_begin = key_range(start + row0 / p.group, len, p.window).start;
  int64_t k_end = max(int64_t{0}, key_range(start + last_row / p.group, len, p.window).limit);
  if (SPLIT) {
    const int64_t split_begin = static_cast<int64_t>(blockIdx.z) * p.split_keys;
    k_begin = max(k_begin, split_begin);
    k_end = min(k_end, split_begin + p.split_keys);
  }

  // ---- per-row online-softmax state (each lane keeps a copy of max/sum, and its output dims) ----
  const bool warp_active = row0 + warp * ROWS < p.rows;  // warp-uniform
  KeyRange keys[ROWS];
  float row_max[ROWS], row_sum[ROWS], acc[ROWS][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    keys[i] = key_range(start + (row0 + warp * ROWS + i) / p.group, len, p.window);
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) acc[i][d] = 0.0f;
  }

  const int64_t kv_base = bh * p.cache_len;  // first cache row of this (batch, kv head)
  for (int64_t tile = k_begin; tile < k_end; tile += kKeys) {
    __syncthreads();  // the previous tile's K/V/P are no longer read (and the Q tile is written)
    for (int idx = tid; idx < kKeys * (D / 4); idx += kThreads) {
      const int j = idx / (D / 4), c = (idx % (D / 4)) * 4;
      float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
      if (tile + j < k_end) {  // never read cache entries outside the range (past kv_len)
        const int64_t offset = (kv_base + tile + j) * D + c;
        kv = load4(k_cache + offset);
        vv = load4(v_cache + offset);
      }
      *reinterpret_cast<float4*>(k_s + j * kKStride + c) = kv;
      *reinterpret_cast<float4*>(v_s + j * D + c) = vv;
    }
    __syncthreads();
    if (!warp_active) continue;

    // Scores of key (tile + lane) against the warp's rows.
    float score[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) score[i] = 0.0f;
    const float* k_row = k_s + lane * kKStride;
#pragma unroll 4
    for (int c = 0; c < D; c += 4) {
      const float4 kk = *reinterpret_cast<const float4*>(k_row + c);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const float4 qq = *reinterpret_cast<const float4*>(q_s + (warp * ROWS + i) * D + c);
        score[i] += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
      }
    }
    const int64_t key = tile + lane;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const bool visible = key < k_end && key >= keys[i].start && key < keys[i].limit;
      const float s = visible ? score[i] : -INFINITY;
      const float new_max = fmaxf(row_max[i], warp_max(s));  // warp-uniform
      float prob = 0.0f, rescale = 1.0f;
      if (new_max != -INFINITY) {  // else no key visible to this row yet: nothing to add
        prob = visible ? __expf(s - new_max) : 0.0f;
        rescale = __expf(row_max[i] - new_max);  // 0 when row_max was -inf
      }
      row_sum[i] = row_sum[i] * rescale + warp_sum(prob);
      row_max[i] = new_max;
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d) acc[i][d] *= rescale;
      p_s[(warp * ROWS + i) * kKeys + lane] = prob;
    }
    __syncwarp();

    // acc[i][d] += sum_j prob[i][j] * V[j][lane + 32 d]
    const int valid_keys = static_cast<int>(min(static_cast<int64_t>(kKeys), k_end - tile));
    for (int j = 0; j < valid_keys; ++j) {
      float v[kDimsPerLane];
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d) v[d] = v_s[j * D + lane + 32 * d];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const float prob = p_s[(warp * ROWS + i) * kKeys + j];
#pragma unroll
        for (int d = 0; d < kDimsPerLane; ++d) acc[i][d] += prob * v[d];
      }
    }
  }

  if (!warp_active) return;  // no barrier follows
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t row = row0 + warp * ROWS + i;
    if (row >= p.rows) continue;
    const int64_t out_row = token_row(row);
    if (SPLIT) {
      const int64_t part = out_row * p.num_splits + blockIdx.z;
      if (lane == 0) {
        p.part_max[part] = row_max[i];
        p.part_sum[part] = row_sum[i];
      }
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d) p.part_acc[part * D + lane + 32 * d] = acc[i][d];
    } else {
      const float inv = row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f;  // no visible key: zeros
      T* out = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
      for (int d = 0; d < kDimsPerLane; ++d) out[lane + 32 * d] = from_float<T>(acc[i][d] * inv);
    }
  }
}

// One block per output row (b, t, h), one thread per dim: combine the splits' partials.
template <typename T>
__global__ void attention_merge_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                       const float* __restrict__ part_acc, T* __restrict__ out, int num_splits,
                                       int head_dim) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float* maxes = part_max + row * num_splits;
  const float* sums = part_sum + row * num_splits;
  float global_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) global_max = fmaxf(global_max, maxes[s]);
  float total = 0.0f, value = 0.0f;
  if (global_max != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      if (maxes[s] == -INFINITY) continue;  // split saw no key
      const float w = __expf(maxes[s] - global_max);
      total += sums[s] * w;
      value += part_acc[(row * num_splits + s) * head_dim + d] * w;
    }
  }
  out[row * head_dim + d] = from_float<T>(total > 0.0f ? value / total : 0.0f);
}

template <typename T, int D, int ROWS, bool SPLIT>
void launch_attention_kernel(const AttentionParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = attention_smem_bytes<D, ROWS>();
  auto* kernel = attention_kernel<T, D, ROWS, SPLIT>;
  if (smem > 48 * 1024) {
    throw_on_error(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                   "attention: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_launch("attention_kernel");
}

// Stream-ordered scratch for the decode partials, freed (stream-ordered) on every exit path.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    throw_on_error(cudaMallocAsync(&ptr_, bytes, stream), "attention: cudaMallocAsync");
  }
  ~StreamBuffer() { if (ptr_) cudaFreeAsync(ptr_, stream_); }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  float* data() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

int multiprocessor_count() {
  int device = 0, count = 0;
  throw_on_error(cudaGetDevice(&device), "cudaGetDevice");
  throw_on_error(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return std::max(count, 1);
}

template <typename T, int D>
void attention_for(AttentionParams p, int64_t batch, cudaStream_t stream) {
  const int64_t bh = batch * p.num_kv_heads;
  if (p.rows > kWarps * 4) {
    // Prefill: 64 rows a block, one block over each causal prefix.
    constexpr int kRows = 16;
    const int64_t row_tiles = (p.rows + kWarps * kRows - 1) / (kWarps * kRows);
    if (row_tiles > 65535) throw std::invalid_argument("attention: q_len * group too large for one launch");
    launch_attention_kernel<T, D, kRows, false>(p, dim3(static_cast<unsigned>(bh), static_cast<unsigned>(row_tiles)),
                                                stream);
    return;
  }
  // Decode: split the cache length so that about two blocks per SM are busy.
  const int64_t max_tiles = (p.cache_len + kKeys - 1) / kKeys;
  const int64_t wanted = (2 * static_cast<int64_t>(multiprocessor_count()) + bh - 1) / bh;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({wanted, max_tiles, kMaxSplits}));
  p.split_keys = ((max_tiles + splits - 1) / splits) * kKeys;
  p.num_splits = static_cast<int>((p.cache_len + p.split_keys - 1) / p.split_keys);

  const int64_t out_rows = batch * p.q_len * p.num_q_heads;
  const int64_t parts = out_rows * p.num_splits;
  StreamBuffer workspace(static_cast<size_t>(parts) * (2 + D) * sizeof(float), stream);
  p.part_max = workspace.data();
  p.part_sum = p.part_max + parts;
  p.part_acc = p.part_sum + parts;
  const dim3 grid(static_cast<unsigned>(bh), 1, static_cast<unsigned>(p.num_splits));
  if (p.rows <= kWarps) {
    launch_attention_kernel<T, D, 1, true>(p, grid, stream);
  } else if (p.rows <= kWarps * 2) {
    launch_attention_kernel<T, D, 2, true>(p, grid, stream);
  } else {
    launch_attention_kernel<T, D, 4, true>(p, grid, stream);
  }
  attention_merge_kernel<T><<<static_cast<unsigned>(out_rows), D, 0, stream>>>(
      p.part_max, p.part_sum, p.part_acc, static_cast<T*>(p.out), p.num_splits, D);
  check_launch("attention_merge_kernel");
}

}  // namespace

void attention(const void* q, const void* k_cache, const void* v_cache, void* out, const int32_t* q_start,
               const int32_t* kv_len, const AttentionShape& shape, float scale, FloatType t, void* stream) {
  if (shape.batch <= 0 || shape.q_len <= 0 || shape.num_q_heads <= 0 || shape.num_kv_heads <= 0 ||
      shape.cache_len <= 0 || shape.num_q_heads % shape.num_kv_heads != 0) {
    throw std::invalid_argument("attention: bad shape");
  }
  if (shape.window < 0) throw std::invalid_argument("attention: window must be >= 0 (0: no sliding window)");
  if (shape.head_dim != 64 && shape.head_dim != 128) {
    throw std::invalid_argument("attention: head_dim must be 64 or 128 on CUDA");
  }
  AttentionParams p{};
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.out = out;
  p.q_start = q_start;
  p.kv_len = kv_len;
  p.q_len = shape.q_len;
  p.num_q_heads = shape.num_q_heads;
  p.num_kv_heads = shape.num_kv_heads;
  p.cache_len = shape.cache_len;
  p.group = shape.num_q_heads / shape.num_kv_heads;
  p.rows = shape.q_len * p.group;
  p.window = shape.window;
  p.scale = scale;
  p.num_splits = 1;
  const cudaStream_t s = as_stream(stream);
  dispatch_float_type(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (shape.head_dim == 64) {
      attention_for<T, 64>(p, shape.batch, s);
    } else {
      attention_for<T, 128>(p, shape.batch, s);
    }
  });
}

}  // namespace pyengine::cuda
