"""int8 vs fp32 Linear on the SmolLM2-135M shapes, 2 threads.

  pytest benchmarks/bench_int8_matmul.py -s --benchmark-columns=median,min,rounds

GEMV (M=1, decode): the weights rotate through a pool much larger than L3, so every call streams
its weight from DRAM as decode does; extra_info["weight_GBps"] is weight bytes / median time, and
the summary divides it by the machine's read bandwidth, measured in the same run (a plain read of
1 GB on 2 MB pages, _C.sum_words, as cpu_roofline.py). pyengine's weights are on 2 MB pages, as the engine keeps them (pyengine.kernels.memory); torch's
where torch puts them. GEMM (M=512, prefill): extra_info["GOPps"] = 2*M*N*K / median time.
The CPU is shared with other work: compare rows within one run only. On a loaded machine a
2-thread call whose second thread gets descheduled waits a whole scheduler slice (~4-16 ms), so
medians can be wild; the summary also shows the best round ("best"), the kernel's capability.
PYENGINE_BENCH_THREADS=1 runs everything single-threaded.
"""
import os
import warnings

import pytest
import torch

from pyengine import _C
from pyengine.kernels import ops
from pyengine.machine import cpu_model
from pyengine.kernels.memory import WeightArena
from pyengine.bench.roofline import probe_buffer

THREADS = int(os.environ.get("PYENGINE_BENCH_THREADS", "2"))
SHAPES = {  # name: (N, K), torch Linear weight layout
    "q_o": (576, 576),
    "k_v": (192, 576),
    "gate_up": (1536, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
POOL_BYTES = 192 << 20  # >> 32 MiB L3
# int8_w8a16 is the fused-int8 engine's Linear (GEMV for decode, the int16-pair GEMM for prefill).
IMPLS = ["int8_w8a16", "int8_w8a8", "int8_weight_only", "pyengine_f32", "torch_f32", "torch_dynamic_qint8"]
INT8_KERNELS = {"int8_w8a8": "int8_linear_w8a8", "int8_weight_only": "int8_linear_wo", "int8_w8a16": "int8_linear_a16"}
RESULTS = {"gemv": {}, "gemm": {}}


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    ops.set_num_threads(THREADS)
    yield
    ops.set_num_threads(previous)


def _torch_dynamic(weights):
    """torch.ao dynamic-quantized Linears (qint8 weights, per-tensor), one per weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        linears = torch.nn.ModuleList()
        for w in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            linears.append(lin)
        return list(quantize_dynamic(linears, {torch.nn.Linear}, dtype=torch.qint8))


_pools = {}


def _pool(name, impl):
    """(callables over a rotating pool of weights, weight bytes per call)."""
    key = (name, impl)
    if key in _pools:
        return _pools[key]
    N, K = SHAPES[name]
    x = torch.randn(1, K)
    out = torch.empty(1, N)
    elem = 4 if impl in ("pyengine_f32", "torch_f32") else 1
    copies = max(2, POOL_BYTES // (N * K * elem))
    if impl == "torch_dynamic_qint8":
        copies = min(copies, 256)  # module construction is slow; 256 x the smallest still > L3
    gen = torch.Generator().manual_seed(0)
    if elem == 4 or impl == "torch_dynamic_qint8":
        weights = [torch.randn(N, K, generator=gen) * 0.05 for _ in range(copies)]
    arena = WeightArena()  # pyengine's Linears get their weights where the engine keeps them
    if impl in INT8_KERNELS:
        w_q = arena.copy(torch.randint(-127, 128, (copies, N, K), dtype=torch.int8, generator=gen))
        w_scale = torch.rand(copies, N, generator=gen) * 1e-3
        kernel = getattr(_C, INT8_KERNELS[impl])
        calls = [lambda i=i: kernel(x, w_q[i], w_scale[i], out) for i in range(copies)]
    elif impl == "pyengine_f32":
        weights = [arena.copy(w) for w in weights]
        calls = [lambda w=w: _C.linear_f32(x, w, out) for w in weights]
    elif impl == "torch_f32":
        calls = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
    else:
        calls = [lambda m=m: m(x) for m in _torch_dynamic(weights)]
    _pools.clear()  # keep one pool alive at a time
    _pools[key] = (calls, N * K * elem)
    return _pools[key]


def test_read_bandwidth(benchmark):
    """Machine read bandwidth: a plain read of 1 GB (2 MB pages) on THREADS threads, _C.sum_words as in
    cpu_roofline.py."""
    big = probe_buffer()
    _C.sum_words(big)
    benchmark.pedantic(_C.sum_words, args=(big,), rounds=7, iterations=1, warmup_rounds=1)
    if not benchmark.enabled:  # --benchmark-disable: one untimed call (a smoke run), no stats
        return
    gbps = big.numel() * 8 / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["read_GBps"] = round(gbps, 2)
    RESULTS["read_GBps"] = gbps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_gemv(benchmark, name, impl):
    calls, weight_bytes = _pool(name, impl)
    state = {"i": 0}

    def step():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    for _ in range(min(len(calls), 64)):
        step()
    benchmark.pedantic(step, rounds=max(100, len(calls)), iterations=1)
    if not benchmark.enabled:  # --benchmark-disable: one untimed call (a smoke run), no stats
        return
    stats = benchmark.stats.stats
    gbps, best_gbps = weight_bytes / stats.median / 1e9, weight_bytes / stats.min / 1e9
    benchmark.extra_info["weight_GBps"] = round(gbps, 2)
    benchmark.extra_info["weight_GBps_best"] = round(best_gbps, 2)
    if "read_GBps" in RESULTS:
        benchmark.extra_info["fraction_of_read_bw"] = round(gbps / RESULTS["read_GBps"], 3)
        benchmark.extra_info["fraction_of_read_bw_best"] = round(best_gbps / RESULTS["read_GBps"], 3)
    RESULTS["gemv"][(name, impl)] = (stats.median, gbps, best_gbps)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["q_o", "k_v", "gate_up", "down"])
def test_gemm(benchmark, name, impl):
    M = 512
    N, K = SHAPES[name]
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    out = torch.empty(M, N)
    if impl in INT8_KERNELS:
        w_q, w_scale = ops.quantize_rows(w)
        kernel = getattr(_C, INT8_KERNELS[impl])
        fn = lambda: kernel(x, w_q, w_scale, out)  # noqa: E731
    elif impl == "pyengine_f32":
        fn = lambda: _C.linear_f32(x, w, out)  # noqa: E731
    elif impl == "torch_f32":
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    else:
        qlin = _torch_dynamic([w])[0]
        fn = lambda: qlin(x)  # noqa: E731
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)
    if not benchmark.enabled:  # --benchmark-disable: one untimed call (a smoke run), no stats
        return
    stats = benchmark.stats.stats
    gops, best_gops = 2 * M * N * K / stats.median / 1e9, 2 * M * N * K / stats.min / 1e9
    benchmark.extra_info["GOPps"] = round(gops, 1)
    benchmark.extra_info["GOPps_best"] = round(best_gops, 1)
    RESULTS["gemm"][(name, impl)] = (stats.median, gops, best_gops)


def _errors():
    """Relative error against fp32 on random data (K=576, N=1536, 16 tokens)."""
    torch.manual_seed(0)
    x, w = torch.randn(16, 576), torch.randn(1536, 576) * 0.05
    exact = x @ w.T
    w_q, w_scale = ops.quantize_rows(w)
    rel = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    qlin = _torch_dynamic([w])[0]
    return {"int8_w8a8": rel(ops.int8_linear_w8a8(x, w_q, w_scale)),
            "int8_weight_only": rel(ops.int8_linear_wo(x, w_q, w_scale)),
            "int8_w8a16": rel(ops.int8_linear_a16(x, w_q, w_scale)),
            "torch_dynamic_qint8": rel(qlin(x))}


def test_zz_summary():
    """Prints the table (run with -s)."""
    read = RESULTS.get("read_GBps")
    lines = [f"\nCPU: {cpu_model()}, {THREADS} threads, ISA {ops.active_isa()}"]
    if read:
        lines.append(f"read bandwidth (1 GB, _C.sum_words): {read:.1f} GB/s")
    lines.append("GEMV M=1, weights from DRAM: weight GB/s median/best (fraction of read bandwidth), median us")
    for name in SHAPES:
        cells = []
        for impl in IMPLS:
            if (name, impl) in RESULTS["gemv"]:
                t, g, best = RESULTS["gemv"][(name, impl)]
                frac = f" ({g / read:.0%}/{best / read:.0%})" if read else ""
                cells.append(f"{impl} {g:.1f}/{best:.1f}{frac} {t * 1e6:.0f}us")
        lines.append(f"  {name:8s} " + " | ".join(cells))
    lines.append("GEMM M=512: GOP/s median/best")
    for name in ["q_o", "k_v", "gate_up", "down"]:
        cells = [f"{impl} {RESULTS['gemm'][(name, impl)][1]:.0f}/{RESULTS['gemm'][(name, impl)][2]:.0f}"
                 for impl in IMPLS if (name, impl) in RESULTS["gemm"]]
        lines.append(f"  {name:8s} " + " | ".join(cells))
    lines.append("relative error vs fp32 (random x, w): " +
                 ", ".join(f"{k} {v:.2e}" for k, v in _errors().items()))
    print("\n".join(lines))
