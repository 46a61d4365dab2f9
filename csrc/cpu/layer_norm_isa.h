// Per-ISA implementations of layer_norm.h, one row at a time; dispatch lives in layer_norm.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

// If delta is non-null, x + delta is written to sum_out and that is normalized. bias may be null.
void layer_norm_row_scalar(const float* x, const float* delta, float* sum_out, const float* weight,
                           const float* bias, float* out, int64_t dim, float eps);
void layer_norm_row_avx2(const float* x, const float* delta, float* sum_out, const float* weight,
                         const float* bias, float* out, int64_t dim, float eps);

}  // namespace pyengine::cpu
