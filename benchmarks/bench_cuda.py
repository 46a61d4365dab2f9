"""CUDA kernels vs torch on the GPU (skipped without one).

  pytest benchmarks/bench_cuda.py -s --benchmark-columns=median,min,rounds

Each round runs the op `inner` times between two CUDA events and synchronizes; extra_info holds
the median GPU time per call (gpu_ms) and the achieved rate from it: TFLOPps for attention prefill
and the int8 GEMM (int8 ops), TBps (bytes read / time) for decode attention and the GEMV.
Shapes: a Llama-3-8B layer (32 query heads, 8 kv heads, head_dim 128, hidden 4096, MLP 14336).
"""
import math
import statistics

import pytest
import torch

from pyengine import _C, kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (getattr(_C, "cuda_built", False) and torch.cuda.is_available()),
                       reason="needs a CUDA GPU and pyengine built with CUDA kernels"),
]

HQ, HKV, D = 32, 8, 128


def _run(benchmark, fn, *, flops=None, bytes_moved=None, inner=10, rounds=10):
    fn()
    torch.cuda.synchronize()
    per_call_ms = []

    def timed():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        per_call_ms.append(start.elapsed_time(end) / inner)

    benchmark.pedantic(timed, setup=torch.cuda.synchronize, rounds=rounds, iterations=1)
    seconds = statistics.median(per_call_ms) / 1e3
    benchmark.extra_info["gpu_ms"] = seconds * 1e3
    if flops is not None:
        benchmark.extra_info["TFLOPps"] = flops / seconds / 1e12
    if bytes_moved is not None:
        benchmark.extra_info["TBps"] = bytes_moved / seconds / 1e12


@pytest.mark.parametrize("impl", ["pyengine", "sdpa"])
@pytest.mark.parametrize("q_len", [512, 2048, 8192])
def test_attention_prefill(benchmark, q_len, impl):
    q = torch.randn(1, q_len, HQ, D, device="cuda", dtype=torch.float16)
    k = torch.randn(1, HKV, q_len, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q_start = torch.zeros(1, dtype=torch.int32, device="cuda")
    kv_len = torch.full((1,), q_len, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(D)
    if impl == "pyengine":
        fn = lambda: kernels.attention(q, k, v, q_start, kv_len, scale)  # noqa: E731
    else:
        q_t = q.transpose(1, 2).contiguous()
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q_t, k, v, is_causal=True, scale=scale, enable_gqa=True)
    flops = 4 * HQ * D * q_len * (q_len + 1) / 2  # causal: QK^T and PV over the lower triangle
    _run(benchmark, fn, flops=flops, inner=3 if q_len >= 8192 else 10, rounds=5)


@pytest.mark.parametrize("impl", ["pyengine", "sdpa"])
@pytest.mark.parametrize("cache_len", [1024, 4096, 16384, 32768])
def test_attention_decode(benchmark, cache_len, impl):
    batch = 8
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, HKV, cache_len, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q_start = torch.full((batch,), cache_len - 1, dtype=torch.int32, device="cuda")
    kv_len = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(D)
    if impl == "pyengine":
        fn = lambda: kernels.attention(q, k, v, q_start, kv_len, scale)  # noqa: E731
    else:
        q_t = q.transpose(1, 2).contiguous()
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q_t, k, v, scale=scale, enable_gqa=True)
    _run(benchmark, fn, bytes_moved=2 * k.numel() * k.element_size())


GEMV_SHAPES = {"qkv_o": (4096, 4096), "gate_up": (14336, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}


@pytest.mark.parametrize("impl", ["pyengine_int8", "torch_fp16"])
@pytest.mark.parametrize("shape", list(GEMV_SHAPES))
def test_int8_gemv(benchmark, shape, impl):
    n, k = GEMV_SHAPES[shape]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    if impl == "pyengine_int8":
        w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        w_scale = torch.full((n,), 0.01, device="cuda")
        fn = lambda: kernels.int8_linear_wo(x, w_q, w_scale)  # noqa: E731
        weight_bytes = n * k + 4 * n
    else:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        weight_bytes = 2 * n * k
    _run(benchmark, fn, bytes_moved=weight_bytes)


@pytest.mark.parametrize("impl", ["pyengine", "torch_int_mm"])
@pytest.mark.parametrize("m", [512, 2048])
def test_int8_gemm(benchmark, m, impl):
    n = k = 4096
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    if impl == "pyengine":
        fn = lambda: kernels.int8_matmul_i32(a, b)  # noqa: E731
    else:
        b_t = b.t()
        fn = lambda: torch._int_mm(a, b_t)  # noqa: E731
    _run(benchmark, fn, flops=2 * m * n * k)
