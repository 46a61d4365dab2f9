// Per-ISA inner step of attention.cpp: one key block of online softmax for a set of query rows.
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

// Keys of the block row r sees.
inline int64_t visible_keys(const AttnKeyBlock& a, int64_t r) {
  const int64_t n = a.row_limit[r] - a.key_begin, block = a.key_end - a.key_begin;
  return n < 0 ? 0 : (n > block ? block : n);
}

}  // namespace pyengine::cpu
