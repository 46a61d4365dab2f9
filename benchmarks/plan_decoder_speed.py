"""Decode and prefill speed of two pyengine builds side by side, e.g. the recorded decode plan against
the per-architecture C++ decoders it replaced:

    python benchmarks/plan_decoder_speed.py --old /tmp/main-checkout --new . [--repeats 5] [--json out.json]

Each of --old / --new is a folder holding an importable `pyengine` package (its _C built). Every
repeat runs old then new, each in a fresh process (the two builds cannot share one), back to back, so
that a busy shared host slows both alike; per repeat and measure the new/old ratio, then the medians
and the spread of the ratios. Measures, on the default model at --threads: decode tokens/s at batch
1 and batch 16 (one token per sequence per step through model.forward, i.e. the C++ decode step) and
prefill tokens/s (one --prefill-tokens prompt), on each --backends.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
import pyengine
from pyengine import ops
args = json.loads(sys.argv[1])
ops.set_num_threads(args["threads"])
torch.set_num_threads(args["threads"])
out = {"pyengine": pyengine.__file__}
with torch.inference_mode():
    for backend in args["backends"]:
        model = pyengine.load(backend=backend).model
        vocab = model.config.vocab_size
        for batch in args["batches"]:
            steps, context = args["decode_tokens"], args["context"]
            cache = model.new_cache(batch, context + steps + 2, torch.float32)
            ids = torch.tensor([[(i * 7919 + b * 31) % vocab for i in range(context)] for b in range(batch)])
            model.forward(ids, cache, logits_at=torch.full((batch,), context - 1))
            cache.lengths += context
            token = torch.full((batch, 1), 42)
            model.forward(token, cache)  # warm-up step (builds the C++ decode step)
            cache.lengths += 1
            t = time.perf_counter()
            for _ in range(steps):
                logits = model.forward(token, cache)
                cache.lengths += 1
                token = logits[:, -1].argmax(-1, keepdim=True)
            out[f"{backend} decode b{batch}"] = batch * steps / (time.perf_counter() - t)
        n = args["prefill_tokens"]
        ids = torch.tensor([[(i * 7919) % vocab for i in range(n)]])
        best = 0.0
        for _ in range(2):  # the first also warms up
            cache = model.new_cache(1, n, torch.float32)
            t = time.perf_counter()
            model.forward(ids, cache, logits_at=torch.tensor([n - 1]))
            best = max(best, n / (time.perf_counter() - t))
        out[f"{backend} prefill {n}"] = best
        del model
print("RESULT " + json.dumps(out))
"""


def run_build(folder: Path, settings: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(folder.resolve()))
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(settings)], env=env, capture_output=True,
                          text=True, cwd="/tmp", check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="fused,fused-int8")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    settings = {"threads": args.threads, "backends": args.backends.split(","),
                "batches": [int(b) for b in args.batches.split(",")], "decode_tokens": args.decode_tokens,
                "context": args.context, "prefill_tokens": args.prefill_tokens}
    runs = {"old": [], "new": []}
    for r in range(args.repeats):
        for name in ("old", "new"):
            runs[name].append(run_build(getattr(args, name), settings))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {runs['new'][-1][k] / runs['old'][-1][k]:.3f}"
                                              for k in runs["new"][-1] if k != "pyengine"), flush=True)
    measures = {}
    for key in runs["new"][0]:
        if key == "pyengine":
            continue
        old = [run[key] for run in runs["old"]]
        new = [run[key] for run in runs["new"]]
        ratios = sorted(n / o for n, o in zip(new, old))
        measures[key] = {"old_tok_s": statistics.median(old), "new_tok_s": statistics.median(new),
                         "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                         "ratios": ratios}
        print(f"{key:<28} old {statistics.median(old):8.1f} tok/s  new {statistics.median(new):8.1f} tok/s  "
              f"new/old {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    if args.json:
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                              "load_average": list(os.getloadavg())},
                  "settings": settings, "repeats": args.repeats,
                  "builds": {"old": runs["old"][0]["pyengine"], "new": runs["new"][0]["pyengine"]},
                  "measures": measures}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
