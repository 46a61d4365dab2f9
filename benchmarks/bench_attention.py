"""pyengine attention vs torch SDPA vs eager (matmul + softmax) attention, in the same run.

    python -m pytest benchmarks/bench_attention.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=param:model,param:phase,param:tokens

Prefill: a prompt of `tokens` queries from position 0 (causal). Decode: one query over a cache
of `tokens` entries. extra_info: GFLOP/s of the causal work (prefill) or GB/s of K and V read
(decode), computed from the same formula for every implementation.
PYENGINE_BENCH_THREADS=n runs both pyengine and torch on n threads (default: all cores).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from pyengine import _C
from pyengine.kernels import ops

if "PYENGINE_BENCH_THREADS" in os.environ:
    ops.set_num_threads(int(os.environ["PYENGINE_BENCH_THREADS"]))

MODELS = {"smollm2-135m": (9, 3, 64), "llama-8b-like": (32, 8, 128)}  # (Hq, Hkv, D)


def sdpa(q, k, v, causal):
    # Our layout [B, T, H, D] -> SDPA's [B, H, T, D]; the transposes are views.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=causal, enable_gqa=True)


def eager(q, k, v, causal):
    """What an eager HF model does: repeat KV heads, matmul, mask, softmax, matmul."""
    group = q.shape[2] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q.transpose(1, 2) @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("impl", ["pyengine", "sdpa", "eager"])
@pytest.mark.parametrize("tokens", [128, 512, 2048])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("model", list(MODELS))
def test_attention(benchmark, model, phase, tokens, impl):
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    torch.manual_seed(0)
    q_len = tokens if phase == "prefill" else 1
    q = torch.randn(1, q_len, num_q_heads, head_dim)
    k = torch.randn(1, num_kv_heads, tokens, head_dim)
    v = torch.randn(1, num_kv_heads, tokens, head_dim)
    out = torch.empty_like(q)
    q_start = torch.tensor([0 if phase == "prefill" else tokens - 1], dtype=torch.int32)
    kv_len = torch.tensor([tokens], dtype=torch.int32)
    causal = phase == "prefill"
    if impl == "pyengine":
        fn = lambda: _C.attention(q, k, v, out, q_start, kv_len, head_dim**-0.5)  # noqa: E731
    else:
        baseline = sdpa if impl == "sdpa" else eager
        fn = lambda: baseline(q, k, v, causal)  # noqa: E731

    with torch.inference_mode():
        work = 4.0 * num_q_heads * head_dim * tokens * (tokens + 1) / 2 if causal else 0.0
        rounds = 5 if causal and tokens == 2048 else 30
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
    if not benchmark.enabled:  # --benchmark-disable: one untimed call (a smoke run), no stats
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["threads"] = _C.num_threads()
    if causal:
        benchmark.extra_info["gflop_per_s"] = round(work / seconds / 1e9, 2)
    else:
        kv_bytes = 2 * num_kv_heads * tokens * head_dim * 4
        benchmark.extra_info["gb_per_s"] = round(kv_bytes / seconds / 1e9, 2)
