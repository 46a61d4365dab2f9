"""Decode and prefill speed of two pyengine builds side by side, e.g. the recorded decode plan against
the per-architecture C++ decoders it replaced:

    python benchmarks/plan_decoder_speed.py --old /tmp/main-checkout --new . [--repeats 5] [--json out.json]

Each of --old / --new is a folder holding an importable `pyengine` package (its _C built), run in a
long-lived process of its own (two builds cannot share one). Every measure alternates between the two
within seconds (which goes first alternates too), so that a busy shared host slows both alike; per
repeat and measure the new/old ratio, then the medians and the spread of the ratios. Measures, on the default model at --threads: decode tokens/s at batch
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
try:
    from pyengine.kernels import ops
except ImportError:  # a build from before the kernels/ folder
    from pyengine import ops
settings = json.loads(sys.argv[1])
ops.set_num_threads(settings["threads"])
torch.set_num_threads(settings["threads"])
models = {}
# wall: elapsed time (what a user sees); cpu: this process's CPU time, which a busy shared host
# disturbs far less (with 1 thread it is the work done; with more, OpenMP's spinning counts too)
clock = time.perf_counter if settings["clock"] == "wall" else time.process_time


def model_for(backend):
    if backend not in models:
        models[backend] = pyengine.load(backend=backend).model
    return models[backend]


def decode(model, batch):
    steps, context = settings["decode_tokens"], settings["context"]
    vocab = model.config.vocab_size
    cache = model.new_cache(batch, context + steps + 2, torch.float32)
    ids = torch.tensor([[(i * 7919 + b * 31) % vocab for i in range(context)] for b in range(batch)])
    model.forward(ids, cache, logits_at=torch.full((batch,), context - 1))
    cache.lengths += context
    token = torch.full((batch, 1), 42)
    model.forward(token, cache)  # warm-up step (the first builds the C++ decode step)
    cache.lengths += 1
    t = clock()
    for _ in range(steps):
        logits = model.forward(token, cache)
        cache.lengths += 1
        token = logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (clock() - t)


def prefill(model):
    n = settings["prefill_tokens"]
    ids = torch.tensor([[(i * 7919) % model.config.vocab_size for i in range(n)]])
    cache = model.new_cache(1, n, torch.float32)
    t = clock()
    model.forward(ids, cache, logits_at=torch.tensor([n - 1]))
    return n / (clock() - t)


print("READY " + pyengine.__file__, flush=True)
with torch.inference_mode():
    for line in sys.stdin:  # one measure per line: [backend, "decode", batch] or [backend, "prefill"]
        backend, kind, *rest = json.loads(line)
        model = model_for(backend)
        value = decode(model, rest[0]) if kind == "decode" else prefill(model)
        print("RESULT " + json.dumps(value), flush=True)
"""


class Worker:
    """One build in its own long-lived process (two builds cannot share one), measuring on request, so
    that old and new alternate within seconds of each other."""

    def __init__(self, folder: Path, settings: dict):
        env = dict(os.environ, PYTHONPATH=str(folder.resolve()))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(settings)], env=env, cwd="/tmp",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.where = self._read("READY ")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"worker exited with {self.proc.wait()}")

    def measure(self, request: list) -> float:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


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
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time measures in elapsed seconds, or in the worker's CPU seconds (steadier on a busy host)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    settings = {"threads": args.threads, "backends": args.backends.split(","),
                "batches": [int(b) for b in args.batches.split(",")], "decode_tokens": args.decode_tokens,
                "context": args.context, "prefill_tokens": args.prefill_tokens, "clock": args.clock}
    requests = [[backend, "decode", batch] for backend in settings["backends"] for batch in settings["batches"]]
    requests += [[backend, "prefill"] for backend in settings["backends"]]
    names = {tuple(r): f"{r[0]} decode b{r[2]}" if r[1] == "decode" else f"{r[0]} prefill {args.prefill_tokens}"
             for r in requests}
    workers = {"old": Worker(args.old, settings), "new": Worker(args.new, settings)}
    for worker in workers.values():  # warm-up: load every model, build every decode step
        for request in requests:
            worker.measure(request)
    runs = {name: {"old": [], "new": []} for name in names.values()}
    for r in range(args.repeats):
        for request in requests:
            order = ("old", "new") if r % 2 == 0 else ("new", "old")  # neither always goes first
            for build in order:
                runs[names[tuple(request)]][build].append(workers[build].measure(request))
        print(f"repeat {r + 1}: " + ", ".join(f"{name} {v['new'][-1] / v['old'][-1]:.3f}" for name, v in runs.items()),
              flush=True)
    for worker in workers.values():
        worker.close()
    measures = {}
    for name, v in runs.items():
        ratios = sorted(n / o for n, o in zip(v["new"], v["old"]))
        old, new = statistics.median(v["old"]), statistics.median(v["new"])
        measures[name] = {"old_tok_s": old, "new_tok_s": new, "ratio_median": statistics.median(ratios),
                          "ratio_min": ratios[0], "ratio_max": ratios[-1], "ratios": ratios}
        print(f"{name:<28} old {old:8.1f} tok/s  new {new:8.1f} tok/s  new/old {statistics.median(ratios):.3f} "
              f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    if args.json:
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                              "load_average": list(os.getloadavg())},
                  "settings": settings, "repeats": args.repeats,
                  "builds": {name: w.where for name, w in workers.items()},
                  "measures": measures}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
