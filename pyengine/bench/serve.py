"""`pyengine bench-serve`: load on the scheduler, as a server sees it.

Concurrency sweep (in-process engine): at each level C, C clients (asyncio tasks) each submit one
request at once (or with Poisson arrivals, --rate): aggregate throughput, time to first token and
between tokens (p50/p99), queue time, J/token per request, and the requests' joules against the
meter's total over the same window. Baselines in the same run: one generate() of the same prompts as
a list, and the same requests one at a time (what the engine did before the scheduler: concurrent
callers were served one after another).

Overload (a real `pyengine serve` subprocess, HTTP): N requests at once against a queue limit:
answers and refusals counted, /health polled throughout, the server's resident memory sampled.

Writes JSON and a PNG (throughput and latency against concurrency).
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

TOPICS = ["the sea", "a mountain", "bread", "the moon", "a violin", "rain", "a library", "trains", "bees",
          "winter", "a lighthouse", "chess", "coffee", "a river", "clocks", "the desert", "glass", "a garden",
          "maps", "snow", "copper", "owls", "a bridge", "tea", "kites", "the wind", "salt", "a forest", "paper",
          "a harbour", "lanterns", "stone"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}." + (f" Part {i // len(TOPICS) + 1}."
                                                                         if i >= len(TOPICS) else "") for i in range(n)]


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


async def _one(engine, prompt, new_tokens, delay):
    await asyncio.sleep(delay)
    request = engine.astream_request(prompt, chat=True, max_new_tokens=new_tokens, ignore_eos=True,
                                     temperature=0.0, measure_energy=True)
    async for _ in request.apieces():
        pass
    return request


def run_level(engine, concurrency: int, new_tokens: int, rate: float | None = None, seed: int = 0) -> dict:
    """C clients, one request each, all at once (rate None) or Poisson arrivals at `rate` per second."""
    import random

    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in range(concurrency):
        delays.append(t if rate else 0.0)
        t += rng.expovariate(rate) if rate else 0.0
    meter = engine.energy_meter()
    steps = []  # this level's decode steps with every client in the batch
    engine.scheduler.on_step = lambda kind, s, reqs: steps.append(s) if len(reqs) == concurrency else None
    window = meter.start()
    t0 = time.perf_counter()

    async def main():
        return await asyncio.gather(*(_one(engine, p, new_tokens, d) for p, d in zip(prompts(concurrency), delays)))

    try:
        requests = asyncio.run(main())
    finally:
        engine.scheduler.on_step = None
    wall = time.perf_counter() - t0
    total = meter.stop(window).total_joules
    tokens = sum(len(r.result.token_ids) for r in requests)
    ttft = [r.token_times[0] - r.t_submit for r in requests]
    tbt = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    joules = [r.result.usage.energy["joules"] for r in requests]
    return {
        "concurrency": concurrency, "rate_per_s": rate, "new_tokens": new_tokens, "wall_s": wall,
        "tokens": tokens, "throughput_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tbt_p50_s": percentile(tbt, 50), "tbt_p99_s": percentile(tbt, 99),
        "full_batch_decode_step_s": percentile(steps, 50),
        "queue_p50_s": percentile([r.result.usage.queue_seconds for r in requests], 50),
        "queue_max_s": max(r.result.usage.queue_seconds for r in requests),
        "joules_per_token": [r.result.usage.energy["joules_per_token"] for r in requests],
        "requests_joules": math.fsum(joules), "meter_joules": total,
        "requests_over_meter": math.fsum(joules) / total if total else None,
        "energy_source": requests[0].result.usage.energy["source"],
        "energy_estimated": requests[0].result.usage.energy["estimated"],
    }


def run_list(engine, n: int, new_tokens: int) -> dict:
    """One generate() of n prompts as a list; its batch-n decode steps timed by the scheduler's hook."""
    steps = []
    engine.scheduler.on_step = lambda kind, seconds, reqs: steps.append(seconds) if len(reqs) == n else None
    t0 = time.perf_counter()
    try:
        results = engine.generate(prompts(n), chat=True, max_new_tokens=new_tokens, ignore_eos=True)
    finally:
        engine.scheduler.on_step = None
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return {"prompts": n, "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall,
            "decode_step_s": percentile(steps, 50), "decode_steps": len(steps)}


def run_serialized(engine, n: int, new_tokens: int) -> dict:
    """n requests one after another (batch 1), as concurrent callers were served before the scheduler."""
    t0 = time.perf_counter()
    tokens = sum(len(engine.generate(p, chat=True, max_new_tokens=new_tokens, ignore_eos=True).token_ids)
                 for p in prompts(n))
    wall = time.perf_counter() - t0
    return {"requests": n, "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall}


def run_overload(model, backend, n_requests: int, queue_limit: int, max_batch: int, kv_budget: int,
                 new_tokens: int, threads: int | None, prefill_chunk: int) -> dict:
    """A `pyengine serve` subprocess; n_requests POSTs at once; /health polled; its RSS sampled."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pyengine.cli", "serve", "--model", str(model), "--port", str(port),
           "--queue-limit", str(queue_limit), "--max-batch", str(max_batch), "--kv-budget", str(kv_budget),
           "--prefill-chunk", str(prefill_chunk)]
    cmd += (["--backend", backend] if backend else []) + (["--threads", str(threads)] if threads else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.2)
        proc = psutil.Process(server.pid)
        httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=60)
        rss_ready = proc.memory_info().rss

        async def main():
            limits = httpx.Limits(max_connections=n_requests + 8, max_keepalive_connections=n_requests + 8)
            async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
                health, rss, done = [], [], asyncio.Event()

                async def poll():
                    while not done.is_set():
                        t = time.perf_counter()
                        try:
                            ok = (await http.get("/health", timeout=5)).status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        health.append((ok, time.perf_counter() - t))
                        rss.append(proc.memory_info().rss)
                        await asyncio.sleep(0.1)

                async def one(i):
                    try:
                        return await http.post("/v1/completions", json={
                            "prompt": prompts(n_requests)[i], "max_tokens": new_tokens, "ignore_eos": True,
                            "temperature": 0})
                    except httpx.HTTPError as e:
                        return e

                poller = asyncio.ensure_future(poll())
                replies = await asyncio.gather(*(one(i) for i in range(n_requests)))
                done.set()
                await poller
                return replies, health, rss

        t0 = time.perf_counter()
        replies, health, rss = asyncio.run(main())
        wall = time.perf_counter() - t0
        full = sum(1 for r in replies if not isinstance(r, Exception) and r.status_code == 200
                   and r.json()["usage"]["completion_tokens"] == new_tokens)
        refused = sum(1 for r in replies if not isinstance(r, Exception) and r.status_code == 429
                      and "queue limit" in r.json()["error"]["message"])
        return {"requests": n_requests, "queue_limit": queue_limit, "max_batch": max_batch, "kv_budget": kv_budget,
                "new_tokens": new_tokens, "wall_s": wall, "full_answers": full, "refused_429": refused,
                "other": n_requests - full - refused, "server_alive": server.poll() is None,
                "health_ok": sum(ok for ok, _ in health), "health_polls": len(health),
                "health_max_latency_s": max((t for _, t in health), default=None),
                "rss_ready_bytes": rss_ready, "rss_peak_bytes": max(rss, default=rss_ready),
                "rss_growth_bytes": max(rss, default=rss_ready) - rss_ready,
                "rss_growth_within_kv_budget": max(rss, default=rss_ready) - rss_ready <= kv_budget}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    c = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [lv["throughput_tok_s"] for lv in levels], "o-", label="concurrent clients (scheduler)")
    a.axhline(result["list_generate"]["throughput_tok_s"], color="g", ls="--",
              label=f"one generate() of {result['list_generate']['prompts']} prompts")
    a.axhline(result["serialized"]["throughput_tok_s"], color="r", ls=":", label="one request at a time")
    a.set(xlabel="concurrent clients", ylabel="tokens/s (all clients)", xscale="log", title="throughput")
    a.set_xticks(c, [str(x) for x in c])
    a.legend(fontsize=8)
    for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("tbt_p50_s", "TBT p50"),
                       ("tbt_p99_s", "TBT p99")):
        b.plot(c, [lv[key] * 1000 for lv in levels], "o-", label=label)
    b.set(xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log", title="latency")
    b.set_xticks(c, [str(x) for x in c])
    b.legend(fontsize=8)
    fig.suptitle(f"{result['model']} {result['backend']}, {result['threads']} threads, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parser(sub):
    p = sub.add_parser("bench-serve", help="load benchmark of the scheduler and server: concurrency sweep, "
                                           "overload; JSON + PNG")
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="fused-int8")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--serialized", type=int, default=4, help="requests run one at a time for the baseline")
    p.add_argument("--overload", type=int, default=200, help="requests at once against the server (0: skip)")
    p.add_argument("--queue-limit", type=int, default=64)
    p.add_argument("--overload-tokens", type=int, default=32)
    p.add_argument("--kv-budget", type=int, default=512 << 20)
    p.add_argument("--prefill-chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="list vs top level, back to back, this many times")
    p.add_argument("--machine", default="local", help="the machine's name in the results file, e.g. cpu-amd-epyc-zen4")
    p.add_argument("--out", default="benchmarks/results")
    p.set_defaults(func=main)


def main(args) -> int:
    import pyengine
    from pyengine.kernels import ops
    from pyengine import _C
    from pyengine.bench.report import machine_info

    if args.threads is not None:
        ops.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = pyengine.load(args.model, backend=args.backend, progress=False, max_batch=max(levels),
                           kv_budget=args.kv_budget, prefill_chunk=args.prefill_chunk)
    engine.generate("warm up", max_new_tokens=4)
    machine = args.machine
    result = {"machine": machine, "machine_info": machine_info(engine.device), "model": engine.model_path.name,
              "backend": engine.backend_name, "threads": _C.num_threads(), "new_tokens": args.new_tokens,
              "kv_budget": args.kv_budget, "prefill_chunk": engine.scheduler.prefill_chunk}
    result["serialized"] = run_serialized(engine, args.serialized, args.new_tokens)
    print(f"one at a time: {result['serialized']['throughput_tok_s']:.1f} tok/s", file=sys.stderr)
    result["levels"] = []
    for c in levels:
        lv = run_level(engine, c, args.new_tokens, args.rate)
        result["levels"].append(lv)
        print(f"{c:3d} clients: {lv['throughput_tok_s']:.1f} tok/s, TTFT p50/p99 {lv['ttft_p50_s'] * 1000:.0f}/"
              f"{lv['ttft_p99_s'] * 1000:.0f} ms, TBT p50/p99 {lv['tbt_p50_s'] * 1000:.1f}/{lv['tbt_p99_s'] * 1000:.1f}"
              f" ms, requests/meter joules {lv['requests_over_meter']:.4f}", file=sys.stderr)
    # The top level against one generate() of its prompts, back to back, `repeats` times: on a shared,
    # noisy machine a ratio is only meaningful between neighbouring runs.
    pairs = []
    for i in range(args.repeats):
        listed = run_list(engine, max(levels), args.new_tokens)
        top = result["levels"][-1] if i == 0 else run_level(engine, max(levels), args.new_tokens, args.rate)
        pairs.append({"list": listed, "level": top})
        print(f"pair {i}: list {listed['throughput_tok_s']:.1f} tok/s (step {listed['decode_step_s'] * 1000:.1f} ms), "
              f"{max(levels)} clients {top['throughput_tok_s']:.1f} tok/s, TBT p99 {top['tbt_p99_s'] * 1000:.1f} ms",
              file=sys.stderr)
    result["list_generate"] = pairs[0]["list"]
    result["pairs"] = pairs

    def median(values):
        return sorted(values)[len(values) // 2]

    result["targets"] = {
        "throughput_vs_list": median([p["level"]["throughput_tok_s"] / p["list"]["throughput_tok_s"] for p in pairs]),
        "throughput_vs_serialized": median([p["level"]["throughput_tok_s"] for p in pairs])
        / result["serialized"]["throughput_tok_s"],
        "tbt_p99_over_list_batch_step": median([p["level"]["tbt_p99_s"] / p["list"]["decode_step_s"] for p in pairs]),
        "tbt_p99_over_same_level_batch_step": median([p["level"]["tbt_p99_s"] / p["level"]["full_batch_decode_step_s"]
                                                      for p in pairs]),
        "requests_joules_over_meter": median([p["level"]["requests_over_meter"] for p in pairs]),
    }
    engine.close()
    del engine
    if args.overload:
        result["overload"] = run_overload(args.model, args.backend, args.overload, args.queue_limit, 16,
                                          args.kv_budget, args.overload_tokens, args.threads, args.prefill_chunk)
        print(f"overload: {json.dumps(result['overload'])}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{machine}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{stem}.png")
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m pyengine.bench_serve ...
    import argparse

    parser = argparse.ArgumentParser(prog="bench-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(main(parser.parse_args(["bench-serve"] + sys.argv[1:])))

