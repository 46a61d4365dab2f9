// Linear with bf16 weights, as a bf16 checkpoint ships them: out = x @ W^T + bias, with x and out in
// fp32 and W [N, K] in bf16 (raw 16-bit patterns, torch.bfloat16's layout). Each product is that of
// the fp32 activation with the weight's exact value, summed in fp32, so the result agrees with an fp32
// Linear over the same weights upcast to fp32 to float rounding; half the bytes of fp32 weights are read.
#pragma once
#include <cstdint>

namespace pyengine {

// x: [M, K] fp32, w: [N, K] bf16, bias: [N] fp32 or null, out: [M, N] fp32.
// Up to 16 rows (decode) a GEMV streams the weights once; above, blocks of weight rows are widened to
// fp32 and run through linear_f32's GEMM.
void linear_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t N,
                 int64_t K);

}  // namespace pyengine
