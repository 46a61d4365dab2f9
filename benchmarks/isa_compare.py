"""The same kernels at each SIMD level this CPU has, alternating in one process: what the AVX-512 paths
buy over AVX2 on this machine (and AVX2 over scalar), on the default model's linear shapes.

    python benchmarks/isa_compare.py [--threads 2] [--rounds 7] [--json PATH]

Per (kernel, shape, rows): the best time of each level in each round, rounds alternating the levels
so a busy host slows them alike; reported: the median over rounds of each, and the ratio to AVX2.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pyengine import _C
from pyengine.kernels import ops
from pyengine.quantize.int8 import quantize_per_channel

# SmolLM2-135M's linears: qkv, o, gate_up, down, and the tied output projection.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 4, 16, 512)  # decode at batch 1, 4, 16; a 512-token prefill


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    ops.set_num_threads(args.threads)
    levels = [isa for isa in ("avx2", "avx512") if isa in ops.supported_isas()]
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=gen) * K ** -0.5
        q, scale = quantize_per_channel(w)
        w16 = w.to(torch.bfloat16)
        for M in ROWS:
            if name == "lm_head" and M == 512:
                continue  # prefill computes logits at the last position only
            x = torch.randn(M, K, generator=gen)
            out = torch.empty(M, N)
            kernels = {"linear_f32": lambda: _C.linear_f32(x, w, out),
                       "int8_linear_a16": lambda: _C.int8_linear_a16(x, q, scale, out),
                       "linear_bf16": lambda: _C.linear_bf16(x, w16, out)}
            for kernel, fn in kernels.items():
                times = {isa: [] for isa in levels}
                for _ in range(args.rounds):
                    for isa in levels:
                        with ops.use_isa(isa):
                            times[isa].append(_time(fn, 5))
                med = {isa: statistics.median(v) for isa, v in times.items()}
                row = dict(kernel=kernel, shape=name, N=N, K=K, rows=M,
                           median_us={isa: t * 1e6 for isa, t in med.items()},
                           avx512_over_avx2=(med["avx2"] / med["avx512"]) if "avx512" in med else None)
                rows_out.append(row)
                print(f"{kernel:16s} {name:8s} M={M:4d} " + "  ".join(f"{isa} {t * 1e6:9.1f} us" for isa, t in med.items())
                      + (f"  avx512 {row['avx512_over_avx2']:.2f}x avx2" if row["avx512_over_avx2"] else ""), flush=True)
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        report = dict(machine=dict(cpu=cpu, detected_isa=ops.detected_isa(), threads=args.threads),
                      rounds=args.rounds, results=rows_out)
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
