"""The W8A16 kernels (`fused-int8`) of this tree against another build of them, same run: kernel times
per shape, decode tokens/s by batch and 512-token prefill, with torch's dynamic int8 and HF eager fp32.

    python benchmarks/int8_kernels_compare.py --baseline DIR [--threads 2] [--rounds 5] [--json PATH]

DIR holds the other build's `pyengine` package (e.g. main's tree, its _C built). Each measurement runs
in a fresh process per build, the builds alternating within every round (their order flipping from
round to round), so a busy host slows both alike; reported: the medians over rounds, their spread
(min, max), and new/old ratios of the medians. The HF baselines run once per round, in this tree's
process. Kernel times are the best of 7 calls of `_C.int8_linear_a16` on the default model's linear
shapes; each is also given as a fraction of the VNNI peak (vpdpwssd: --peak-gmacs int16 multiply-adds
per second per core, times the threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2-135M's linears: qkv, o, gate_up, down, and the tied output projection.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
KERNEL_ROWS = (1, 4, 16, 512)
PROMPT = ("The history of the city begins with a small settlement on the river, where traders met to "
          "exchange grain, salt and cloth. Over the centuries the town grew into a market, then a port, "
          "and finally the capital of a region known for its bridges, its libraries and its music. ") * 20


# "wall": time.perf_counter. "cpu": the CPU time of this process (time.process_time), for a host so busy
# that a thread waits for a core longer than it computes: with one thread, the time the work itself
# takes on a core, whatever else runs there (cache sharing aside).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def _best(fn, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def worker_kernels(threads: int) -> dict:
    import torch

    from pyengine import _C
    from pyengine.kernels import ops
    from pyengine.quantize.int8 import quantize_per_channel

    ops.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (N, K) in SHAPES.items():
        q, scale = quantize_per_channel(torch.randn(N, K, generator=gen) * K ** -0.5)
        for M in KERNEL_ROWS:
            if name == "lm_head" and M == 512:
                continue  # prefill computes logits at the last position only
            x = torch.randn(M, K, generator=gen)
            y = torch.empty(M, N)
            out[f"{name}/{M}"] = _best(lambda: _C.int8_linear_a16(x, q, scale, y))
    return out


def worker_engine(threads: int, batches: list[int], new_tokens: int, prefill_tokens: int) -> dict:
    import torch

    import pyengine
    from pyengine.kernels import ops

    ops.set_num_threads(threads)
    torch.set_num_threads(threads)
    engine = pyengine.load(backend="fused-int8")
    ids = engine.tokenizer.encode(PROMPT)
    prompt = engine.tokenizer.decode(ids[:32])
    out = {}
    for b in batches:
        engine.generate([prompt] * b, max_new_tokens=4, ignore_eos=True)  # warm-up
        if clock is time.perf_counter:
            r = engine.generate([prompt] * b, max_new_tokens=new_tokens, ignore_eos=True)[0]
            out[f"decode/{b}"] = b * (new_tokens - 1) / r.usage.decode_seconds
        else:  # decode = the whole generate less a 1-token generate (prefill and the first token)
            whole = _best(lambda: engine.generate([prompt] * b, max_new_tokens=new_tokens, ignore_eos=True), 1)
            first = _best(lambda: engine.generate([prompt] * b, max_new_tokens=1, ignore_eos=True), 2)
            out[f"decode/{b}"] = b * (new_tokens - 1) / (whole - first)
    text = engine.tokenizer.decode(ids[:prefill_tokens])
    engine.generate(text, max_new_tokens=1)
    if clock is time.perf_counter:
        out["prefill"] = max(prefill_tokens / engine.generate(text, max_new_tokens=1).usage.prefill_seconds
                             for _ in range(2))
    else:
        out["prefill"] = prefill_tokens / _best(lambda: engine.generate(text, max_new_tokens=1), 2)
    return out


def worker_hf(threads: int, prefill_tokens: int) -> dict:
    import torch
    import transformers

    import pyengine
    from pyengine.kernels import ops

    ops.set_num_threads(threads)
    torch.set_num_threads(threads)
    reference = pyengine.load(backend="torch")
    ids = reference.tokenizer.encode(PROMPT)[:prefill_tokens]
    model = transformers.AutoModelForCausalLM.from_pretrained(reference.model_path, attn_implementation="eager",
                                                              torch_dtype=torch.float32).eval()
    del reference
    x = torch.tensor([ids])
    out = {}
    with torch.inference_mode():
        out["hf_fp32_prefill"] = prefill_tokens / _best(lambda: model(x, logits_to_keep=1), 2)
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        out["torch_dynamic_int8_prefill"] = prefill_tokens / _best(lambda: q(x, logits_to_keep=1), 2)
    return out


def run_worker(package_root: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(package_root))
    done = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="folder holding the other build's pyengine package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--peak-gmacs", type=float, default=114.0,
                    help="measured vpdpwssd zmm peak, G int16 multiply-adds/s per core (AMD EPYC Zen 4)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: process CPU time, for a busy shared host (meant for --threads 1)")
    ap.add_argument("--machine", default="cpu-amd-epyc-zen4")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    global clock
    clock = CLOCKS[args.clock]
    if args.worker is not None:
        kind = args.worker[0]
        result = (worker_kernels(args.threads) if kind == "kernels"
                  else worker_engine(args.threads, batches, args.new_tokens, args.prefill_tokens) if kind == "engine"
                  else worker_hf(args.threads, args.prefill_tokens))
        print(json.dumps(result), flush=True)
        # Straight out: at interpreter exit after an engine ran, the process sometimes aborted
        # ("terminate called without an active exception") after the result was printed.
        os._exit(0)
    if args.baseline is None:
        ap.error("--baseline is required")
    builds = {"old": args.baseline.resolve(), "new": ROOT}
    common = ["--clock", args.clock, "--threads", str(args.threads), "--batches", args.batches, "--new-tokens", str(args.new_tokens),
              "--prefill-tokens", str(args.prefill_tokens)]
    runs = {"old": {}, "new": {}, "hf": {}}
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for kind in ("kernels", "engine"):
            for build in order:
                for key, value in run_worker(builds[build], [kind, *common]).items():
                    runs[build].setdefault(key, []).append(value)
        for key, value in run_worker(ROOT, ["hf", *common]).items():
            runs["hf"].setdefault(key, []).append(value)
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}

    kernels = []
    for name, (N, K) in SHAPES.items():
        for M in KERNEL_ROWS:
            key = f"{name}/{M}"
            if key not in runs["new"]:
                continue
            old, new = summary(runs["old"][key]), summary(runs["new"][key])
            peak = args.peak_gmacs * 1e9 * args.threads
            kernels.append(dict(shape=name, N=N, K=K, rows=M, old_us={k: v * 1e6 if k != "runs" else [x * 1e6 for x in v]
                                                                       for k, v in old.items()},
                                new_us={k: v * 1e6 if k != "runs" else [x * 1e6 for x in v] for k, v in new.items()},
                                speedup=old["median"] / new["median"],
                                old_fraction_of_vnni_peak=M * N * K / old["median"] / peak,
                                new_fraction_of_vnni_peak=M * N * K / new["median"] / peak))
            print(f"{name:8s} M={M:4d}  old {old['median'] * 1e6:9.1f} us  new {new['median'] * 1e6:9.1f} us  "
                  f"{kernels[-1]['speedup']:.2f}x  peak fraction {kernels[-1]['old_fraction_of_vnni_peak']:.2f} -> "
                  f"{kernels[-1]['new_fraction_of_vnni_peak']:.2f}", flush=True)
    engine = {}
    for key in [f"decode/{b}" for b in batches] + ["prefill"]:
        old, new = summary(runs["old"][key]), summary(runs["new"][key])
        engine[key] = dict(old_tok_s=old, new_tok_s=new, speedup=new["median"] / old["median"])
        print(f"fused-int8 {key:10s} old {old['median']:8.1f} tok/s  new {new['median']:8.1f} tok/s  "
              f"{engine[key]['speedup']:.2f}x", flush=True)
    hf = {key: summary(v) for key, v in runs["hf"].items()}
    prefill_new = engine["prefill"]["new_tok_s"]["median"]
    prefill_old = engine["prefill"]["old_tok_s"]["median"]
    ratios = {f"{build}_prefill_over_{key.removesuffix('_prefill')}": value / hf[key]["median"]
              for build, value in (("old", prefill_old), ("new", prefill_new)) for key in hf}
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x", flush=True)
    if args.json:
        import platform

        import torch

        report = dict(machine=dict(kind=args.machine, cpu=platform.processor() or "x86_64", threads=args.threads,
                                   clock=args.clock,
                                   vnni_peak_gmacs_per_core=args.peak_gmacs, torch=torch.__version__,
                                   load_average_at_end=list(os.getloadavg())),
                      method=("fresh process per build and measurement, builds alternating within each round "
                              "(order flipped per round); medians over rounds, spread as min/max"),
                      rounds=args.rounds, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
                      kernels=kernels, fused_int8=engine, hf=hf, prefill_ratios=ratios)
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
