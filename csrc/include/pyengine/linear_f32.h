// fp32 Linear (torch layout: weight [N, K], row-major). All tensors contiguous; out must not alias
// the inputs. The packed-panel GEMM it runs for many rows is shared with int8_linear_wo (int8_matmul.cpp).
#pragma once
#include <cstdint>

namespace pyengine {

// fp32 Linear: out = x @ w^T + bias. x: [M, K], w: [N, K], bias: [N] or null, out: [M, N].
// Up to 16 rows a streaming GEMV; above, the packed-panel GEMM (6 tokens x 16 features per tile).
void linear_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K);

}  // namespace pyengine
