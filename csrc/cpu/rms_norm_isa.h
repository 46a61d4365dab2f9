// Per-ISA implementations of rms_norm.h, one row at a time; dispatch lives in rms_norm.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// If residual_in is non-null: x_sum = x + residual_in is written to x_sum_out, then normalized.
void rms_norm_row_scalar(const float* x, const float* delta, float* sum_out, const float* weight,
                         float* out, int64_t dim, float eps);
void rms_norm_row_avx2(const float* x, const float* delta, float* sum_out, const float* weight,
                       float* out, int64_t dim, float eps);

}  // namespace pyengine::cpu
