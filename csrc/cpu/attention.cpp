#include "pyengine/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attention_isa.h"
#include "cpu/dispatch.h"
#include "pyengine/attention_window.h"
#include "pyengine/cpu_features.h"

namespace pyengine {
namespace cpu {

void attend_key_block_scalar(const AttnKeyBlock& a) {
  const int64_t D = a.head_dim;
  const float* k0 = a.k + a.key_begin * D;
  const float* v0 = a.v + a.key_begin * D;
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const int64_t n = visible_keys(a, r);
    if (n == 0) continue;
    const float* q = a.q_rows[r];
    float* s = a.scores + r * kAttnKeyBlock;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float* k = k0 + j * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
      s[j] = dot * a.scale;
      block_max = std::max(block_max, s[j]);
    }
    const float old_max = a.row_max[r], new_max = std::max(old_max, block_max);
    // exp(-inf) = 0: the first block simply drops the empty initial state.
    const float rescale = std::exp(old_max - new_max);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - new_max);
      sum += s[j];
    }
    a.row_max[r] = new_max;
    a.row_sum[r] = a.row_sum[r] * rescale + sum;
    float* acc = a.acc + r * D;
    for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
    for (int64_t j = 0; j < n; ++j) {
      const float* v = v0 + j * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += s[j] * v[d];
    }
  }
}

}  // namespace cpu

namespace {

using BlockFn = void (*)(const cpu::AttnKeyBlock&);
using TileFn = void (*)(const cpu::AttnRowTile&);
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Prefill tiles hold up to this many query rows (query positions x heads of one kv group): each
// K/V block serves all of them, and the AVX2 tile kernel packs them in 8-row vectors.
constexpr int64_t kTargetTileRows = 64;
// A tile's rows span at most kTargetTileRows positions, so their windows all start within its first
// key block (AttnRowTile's contract).
static_assert(kTargetTileRows <= cpu::kAttnKeyBlock, "tile rows must start their windows in one key block");
// Decode: the smallest KV chunk one thread takes (below it merging costs more than it saves),
// and how many work items per thread to aim for so uneven chunks still balance.
constexpr int64_t kMinDecodeChunk = 64;
constexpr int64_t kDecodeItemsPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread state of one tile of query rows.
struct RowTile {
  std::vector<const float*> q_rows;
  std::vector<int64_t> limit;
  std::vector<float> row_max, row_sum, acc, scores;

  RowTile() = default;
  RowTile(int64_t max_rows, int64_t head_dim) { resize(max_rows, head_dim); }

  void resize(int64_t max_rows, int64_t head_dim) {
    q_rows.resize(max_rows);
    limit.resize(max_rows);
    row_max.resize(max_rows);
    row_sum.resize(max_rows);
    acc.resize(max_rows * head_dim);
    scores.resize(max_rows * cpu::kAttnKeyBlock);
  }

  void reset(int64_t n_rows, int64_t head_dim) {
    std::fill_n(row_max.begin(), n_rows, kNegInf);
    std::fill_n(row_sum.begin(), n_rows, 0.0f);
    std::fill_n(acc.begin(), n_rows * head_dim, 0.0f);
  }

  // Online softmax of the first n_rows rows over keys [key_begin, key_end), block by block.
  void attend(BlockFn fn, int64_t n_rows, const float* k, const float* v, int64_t key_begin,
              int64_t key_end, int64_t head_dim, float scale) {
    cpu::AttnKeyBlock a{q_rows.data(), limit.data(), n_rows, k, v, 0, 0, head_dim, scale,
                        row_max.data(), row_sum.data(), acc.data(), scores.data()};
    for (int64_t kb = key_begin; kb < key_end; kb += cpu::kAttnKeyBlock) {
      a.key_begin = kb;
      a.key_end = std::min(kb + cpu::kAttnKeyBlock, key_end);
      fn(a);
    }
  }
};

// Each row on its own: scores over its keys, their max, then the normalized weighted sum of V.
void attend_tile_scalar(const cpu::AttnRowTile& t) {
  const int64_t D = t.head_dim;
  thread_local std::vector<float> scores;
  for (int64_t r = 0; r < t.n_rows; ++r) {
    const int64_t begin = t.row_start[r], n = t.row_limit[r] - begin;  // n >= 1
    const float* q = t.q_rows[r];
    scores.resize(n);
    float max_score = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      const float* k = t.k + (begin + j) * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
      scores[j] = dot * t.scale;
      max_score = std::max(max_score, scores[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += scores[j] = std::exp(scores[j] - max_score);
    float* o = t.out_rows[r];
    std::fill_n(o, D, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* v = t.v + (begin + j) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += scores[j] * v[d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= sum;
  }
}

void prefill(TileFn fn, const float* q, const float* k_cache, const float* v_cache, float* out,
             const int32_t* q_start, const int32_t* kv_len, const AttentionShape& s, float scale) {
  const int64_t B = s.batch, T = s.q_len, Hq = s.num_q_heads, Hkv = s.num_kv_heads, D = s.head_dim;
  const int64_t group = Hq / Hkv;
  // Rows of a tile: query positions t0..t1 times the `group` heads sharing one kv head, so a
  // K/V block serves all of them (GQA without copying KV).
  const int64_t block_q = std::max<int64_t>(1, kTargetTileRows / group);
  const int64_t n_qblocks = ceil_div(T, block_q);
  const int64_t n_items = B * Hkv * n_qblocks;
#pragma omp parallel num_threads(num_threads()) if (n_items > 1)
  {
    std::vector<const float*> q_rows(block_q * group);
    std::vector<float*> out_rows(block_q * group);
    std::vector<int64_t> starts(block_q * group), limits(block_q * group);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      // Latest query blocks see the most keys: hand them out first.
      const int64_t qb = n_qblocks - 1 - item % n_qblocks;
      const int64_t kvh = (item / n_qblocks) % Hkv, b = item / (n_qblocks * Hkv);
      const int64_t t0 = qb * block_q, t1 = std::min(T, t0 + block_q);
      int64_t key_begin = s.cache_len, key_end = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const KeyRange keys = key_range(q_start[b] + t, kv_len[b], s.window);
        key_begin = std::min(key_begin, keys.start);
        key_end = std::max(key_end, keys.limit);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (t - t0) * group + g, offset = ((b * T + t) * Hq + kvh * group + g) * D;
          q_rows[r] = q + offset;
          out_rows[r] = out + offset;
          starts[r] = keys.start;
          limits[r] = keys.limit;
        }
      }
      const int64_t kv_offset = (b * Hkv + kvh) * s.cache_len * D;
      // Keys outside [key_begin, key_end) lie above the causal diagonal, or behind the window, of
      // every row: never visited.
      fn({q_rows.data(), starts.data(), limits.data(), (t1 - t0) * group, k_cache + kv_offset, v_cache + kv_offset,
          key_begin, key_end, D,
          scale, out_rows.data()});
    }
  }
}

// T == 1: flash-decoding. Each sequence's visible keys are cut into chunks; a work item is
// (sequence, kv head, chunk) over all query heads of that kv head, so every K/V row is read once.
// Items leave partial (max, sum, weighted V) results that a second pass merges.
void decode(BlockFn fn, const float* q, const float* k_cache, const float* v_cache, float* out,
            const int32_t* q_start, const int32_t* kv_len, const AttentionShape& s, float scale) {
  const int64_t B = s.batch, Hq = s.num_q_heads, Hkv = s.num_kv_heads, D = s.head_dim;
  const int64_t group = Hq / Hkv;
  std::vector<KeyRange> keys(B);
  std::vector<int64_t> first_chunk(B + 1, 0);
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    keys[b] = key_range(q_start[b], kv_len[b], s.window);
    total_keys += keys[b].limit - keys[b].start;
  }
  const int64_t threads = num_threads();
  const int64_t chunk = std::max(
      kMinDecodeChunk, ceil_div(total_keys * Hkv, kDecodeItemsPerThread * threads));
  for (int64_t b = 0; b < B; ++b) {
    first_chunk[b + 1] = first_chunk[b] + ceil_div(keys[b].limit - keys[b].start, chunk);
  }
  const int64_t n_chunks = first_chunk[B];  // over all sequences, per kv head
  const int64_t n_items = n_chunks * Hkv;
  const int64_t partial_stride = group * (D + 2);  // per item: group x (max, sum, acc[D])
  std::vector<float> partials(n_items * partial_stride);

#pragma omp parallel num_threads(num_threads()) if (n_items > 1)
  {
    RowTile tile(group, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t kvh = item % Hkv, global_chunk = item / Hkv;
      const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), global_chunk) -
                        first_chunk.begin() - 1;
      const int64_t c = global_chunk - first_chunk[b];
      for (int64_t g = 0; g < group; ++g) {
        tile.q_rows[g] = q + (b * Hq + kvh * group + g) * D;
        tile.limit[g] = keys[b].limit;
      }
      tile.reset(group, D);
      const int64_t kv_offset = (b * Hkv + kvh) * s.cache_len * D;
      const int64_t begin = keys[b].start + c * chunk;
      tile.attend(fn, group, k_cache + kv_offset, v_cache + kv_offset, begin, std::min(keys[b].limit, begin + chunk),
                  D, scale);
      float* p = partials.data() + item * partial_stride;
      for (int64_t g = 0; g < group; ++g, p += D + 2) {
        p[0] = tile.row_max[g];
        p[1] = tile.row_sum[g];
        std::copy_n(tile.acc.data() + g * D, D, p + 2);
      }
    }

    // Merge: out = sum_c acc_c * e^(max_c - M) / sum_c sum_c * e^(max_c - M), M = max_c max_c.
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hq; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq, kvh = h / group, g = h % group;
      const auto part = [&](int64_t c) {
        return partials.data() + ((first_chunk[b] + c) * Hkv + kvh) * partial_stride + g * (D + 2);
      };
      const int64_t chunks = first_chunk[b + 1] - first_chunk[b];
      float global_max = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) global_max = std::max(global_max, part(c)[0]);
      float* dst = out + bh * D;
      std::fill_n(dst, D, 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = part(c);
        const float w = std::exp(p[0] - global_max);
        sum += p[1] * w;
        for (int64_t d = 0; d < D; ++d) dst[d] += p[2 + d] * w;
      }
      const float inv_sum = 1.0f / sum;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv_sum;
    }
  }
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, float* out,
               const int32_t* q_start, const int32_t* kv_len, const AttentionShape& s, float scale) {
  if (s.batch < 1 || s.q_len < 1 || s.num_q_heads < 1 || s.num_kv_heads < 1 || s.cache_len < 1 ||
      s.head_dim < 1) {
    throw std::invalid_argument("attention: every dimension must be at least 1");
  }
  if (s.num_q_heads % s.num_kv_heads != 0) {
    throw std::invalid_argument("attention: num_q_heads must be a multiple of num_kv_heads");
  }
  if (s.window < 0) throw std::invalid_argument("attention: window must be >= 0 (0: no sliding window)");
  for (int64_t b = 0; b < s.batch; ++b) {
    if (kv_len[b] < 1 || kv_len[b] > s.cache_len) {
      throw std::invalid_argument("attention: kv_len[" + std::to_string(b) + "] = " +
                                  std::to_string(kv_len[b]) + " is outside [1, cache_len]");
    }
    if (q_start[b] < 0) throw std::invalid_argument("attention: q_start must be >= 0");
  }
  if (s.q_len == 1) {
    const BlockFn block_fn = cpu::pick_kernel<BlockFn>(
        {{Isa::Avx2, cpu::attend_key_block_avx2}, {Isa::Scalar, cpu::attend_key_block_scalar}});
    decode(block_fn, q, k_cache, v_cache, out, q_start, kv_len, s, scale);
  } else {
    const TileFn tile_fn =
        cpu::pick_kernel<TileFn>({{Isa::Avx2, cpu::attend_tile_avx2}, {Isa::Scalar, attend_tile_scalar}});
    prefill(tile_fn, q, k_cache, v_cache, out, q_start, kv_len, s, scale);
  }
}

}  // namespace pyengine
