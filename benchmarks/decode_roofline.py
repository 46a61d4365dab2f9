"""Decode speed at batch 1 against the memory-bandwidth roofline, per backend, in one run.

    python benchmarks/decode_roofline.py [--model default] [--threads 2] [--tokens 64] [--repeats 5]

Measures the machine's read bandwidth (torch sum over a 1 GB fp32 tensor, best of 5), then the decode
tokens/s of backends torch, fused and fused-int8 with the C++ decoder off (op-by-op Python path) and
on, and reports each as a fraction of its roofline: bytes read per token (every weight matrix incl.
lm_head at 4 bytes (fp32) or 1 byte + a 4-byte row scale (int8), the embedding row, the KV cache) /
bandwidth. Ends with a per-phase profile of one C++ step. Other processes share the CPU: medians of
repeats, load average printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import pyengine
from pyengine import _C


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    x = torch.ones(int(gigabytes * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_token(config, int8: bool, context: int) -> float:
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = [(q + 2 * kv, c.hidden_size), (c.hidden_size, q), (2 * c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size)] * c.num_layers + [(c.vocab_size, c.hidden_size)]
    weights = sum(n * k * (1 if int8 else 4) + (4 * n if int8 else 0) for n, k in shapes)
    norms = (2 * c.num_layers + 1) * c.hidden_size * 4
    kv_cache = 2 * c.num_layers * kv * context * 4  # keys and values read by attention
    return weights + norms + c.hidden_size * 4 + kv_cache


def decode_seconds_per_token(engine, tokens: int, repeats: int) -> float:
    prompt = "Write a short story about a robot who learns to paint."
    engine.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up (builds the C++ decoder)
    times = []
    for _ in range(repeats):
        r = engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
        times.append(r.usage.decode_seconds / (len(r.token_ids) - 1))
    return statistics.median(times), r.usage.prompt_tokens


def profile_step(engine, steps: int = 20) -> dict:
    decoder = engine.model._decoder
    decoder.set_profiling(True)
    decoder.reset_profile()
    engine.generate("Profile this.", max_new_tokens=steps + 1, ignore_eos=True)
    profile = decoder.profile()
    decoder.set_profiling(False)
    n = profile.pop("steps")
    return {k: v / n for k, v in profile.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _C.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}")
    bandwidth = read_bandwidth()
    print(f"read bandwidth (torch sum, 1 GB, {args.threads} threads, best of 5): {bandwidth / 1e9:.1f} GB/s")

    rows = []
    engines = {}
    for backend, cpp in [("torch", False), ("fused", False), ("fused", True), ("fused-int8", False),
                         ("fused-int8", True)]:
        if backend not in engines:
            engines[backend] = pyengine.load(args.model, backend=backend, progress=False)
        engine = engines[backend]
        engine.model.cpp_decode = cpp
        seconds, prompt_tokens = decode_seconds_per_token(engine, args.tokens, args.repeats)
        context = prompt_tokens + args.tokens // 2  # mean cache length over the run
        roofline = bytes_per_token(engine.config, backend == "fused-int8", context) / bandwidth
        rows.append((f"{backend} ({'C++ decoder' if cpp else 'Python path'})", seconds, roofline))
    print(f"{'backend':32s} {'ms/token':>9s} {'tokens/s':>9s} {'roofline ms':>12s} {'of roofline':>12s}")
    for name, seconds, roofline in rows:
        print(f"{name:32s} {seconds * 1e3:9.2f} {1 / seconds:9.1f} {roofline * 1e3:12.2f} {roofline / seconds:11.0%}")
    for backend in ("fused", "fused-int8"):
        engines[backend].model.cpp_decode = True
        profile = profile_step(engines[backend])
        total = sum(profile.values())
        print(f"\nprofile of one C++ step, {backend}: {total * 1e3:.2f} ms")
        for phase, seconds in sorted(profile.items(), key=lambda kv: -kv[1]):
            print(f"  {phase:14s} {seconds * 1e3:7.3f} ms  {seconds / total:5.1%}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
