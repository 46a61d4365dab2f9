// Per-ISA implementations of argmax.h over one row; dispatch lives in argmax.cpp.
#pragma once
#include <cstdint>

namespace pyengine::cpu {

int64_t argmax_row_scalar(const float* x, int64_t n);
int64_t argmax_row_avx2(const float* x, int64_t n);

}  // namespace pyengine::cpu
