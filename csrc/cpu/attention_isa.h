// Per-ISA inner steps of attention.cpp: one key block of online softmax for a few query rows (decode;
// and prefill on the scalar path), and a whole prefill tile of query rows (AVX2).
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// Longest key range one call handles; `scores` holds kAttnKeyBlock floats per row.
constexpr int64_t kAttnKeyBlock = 64;

struct AttnKeyBlock {
  const float* const* q_rows;  // n_rows pointers to head_dim floats
  const int64_t* row_limit;    // row r sees keys j < row_limit[r]
  int64_t n_rows;
  const float* k;  // this kv head's keys: key j at k + j * head_dim
  const float* v;
  int64_t key_begin, key_end;  // 0 < key_end - key_begin <= kAttnKeyBlock, key_end <= max row_limit
  int64_t head_dim;
  float scale;
  // Running online-softmax state per row: max score, sum of exp(score - max), and the
  // un-normalized weighted sum of V ([n_rows, head_dim]).
  float* row_max;
  float* row_sum;
  float* acc;
  float* scores;  // scratch [n_rows, kAttnKeyBlock]
};

// Folds keys [key_begin, key_end) into the state of each row; a row that sees none is unchanged.
void attend_key_block_scalar(const AttnKeyBlock& a);
void attend_key_block_avx2(const AttnKeyBlock& a);

// Prefill: a tile of query rows (query positions x the heads of one kv group) against keys
// [key_begin, key_end) of their kv head, every key block in one call, normalized output per row.
struct AttnRowTile {
  const float* const* q_rows;  // n_rows pointers to head_dim floats
  // Row r sees keys row_start[r] <= j < row_limit[r]; every row_start[r] < key_begin + kAttnKeyBlock,
  // so the online softmax's first key block gives every row a finite max.
  const int64_t* row_start;
  const int64_t* row_limit;
  int64_t n_rows;
  const float* k;  // key j at k + j * head_dim
  const float* v;
  int64_t key_begin, key_end;  // min of row_start, max of row_limit
  int64_t head_dim;
  float scale;
  float* const* out_rows;  // n_rows pointers to head_dim floats
};

// AVX2 in outer-product form (rows across the vector lanes): Q is packed transposed once per tile,
// so scores and P.V are register-blocked multiply-adds like the GEMM micro-kernel, and the online
// softmax runs on eight rows per vector with no horizontal reductions.
void attend_tile_avx2(const AttnRowTile& t);

// Keys of the block row r sees.
inline int64_t visible_keys(const AttnKeyBlock& a, int64_t r) {
  const int64_t n = a.row_limit[r] - a.key_begin, block = a.key_end - a.key_begin;
  return n < 0 ? 0 : (n > block ? block : n);
}

}  // namespace pyengine::cpu
