"""The engine before the scheduler, for bench-serve's comparison: N threads each calling generate()
at once (they were served one after another), and one generate() of the same N prompts as a list.

Run it on the commit before the scheduler, with this checkout's compiled module:
    git archive 36ca0ed pyengine | tar -x -C /tmp/old && cp pyengine/_C*.so /tmp/old/pyengine/
    PYTHONPATH=/tmp/old python benchmarks/serve_pre_scheduler.py --out pre.json
The prompts and settings are bench-serve's (chat template, greedy, ignore_eos, 128 new tokens).
"""
import argparse
import json
import threading
import time

import pyengine
from pyengine.kernels import ops

TOPICS = ["the sea", "a mountain", "bread", "the moon", "a violin", "rain", "a library", "trains", "bees",
          "winter", "a lighthouse", "chess", "coffee", "a river", "clocks", "the desert"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ops.set_num_threads(args.threads)
    prompts = [f"Write a short story about {t}." for t in TOPICS][:args.clients]
    engine = pyengine.load("default", backend="fused-int8", progress=False)
    engine.generate("warm up", max_new_tokens=4)
    t0 = time.perf_counter()
    results = engine.generate(prompts, chat=True, max_new_tokens=args.new_tokens, ignore_eos=True)
    list_wall = time.perf_counter() - t0
    done = []

    def client(prompt):
        engine.generate(prompt, chat=True, max_new_tokens=args.new_tokens, ignore_eos=True)
        done.append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = len(prompts) * args.new_tokens
    out = {"engine": pyengine.__file__, "clients": len(prompts), "new_tokens": args.new_tokens,
           "list_throughput_tok_s": tokens / list_wall,
           "list_decode_step_s": results[0].usage.decode_seconds / (args.new_tokens - 1),
           "threads_throughput_tok_s": tokens / (max(done) - t0), "threads_last_answer_s": max(done) - t0}
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
