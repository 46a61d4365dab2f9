"""End-to-end CPU figures for the default model, all in one process, against the machine's own limits.

    python benchmarks/cpu_roofline.py [--threads 2] [--repeats 3] [--json benchmarks/results/cpu-<kind>.json]

Measures, in this order and in one run:
  * the machine: read bandwidth (a plain read of 1 GB on 2 MB pages, best of 10, at the start and at the
    end: the higher) and fp32 GEMM rate (torch.mm 1024^3). The read is _C.sum_words, each thread's
    share as two sequential streams: as fast as torch's sum over one large buffer, 9-17% faster over
    the engine's weight spans (Zen 3), so every fraction is against the fastest plain read we have;
  * decode tokens/s (32-token prompt, 128 new tokens, batch 1) and prefill tokens/s (512-token prompt)
    for HF transformers eager fp32 (the baseline), HF + torch dynamic int8 (quantize_dynamic, the int8
    a PyTorch user reaches first), and pyengine's torch, fused and fused-int8 backends;
  * each decode figure as a fraction of its roofline: bytes read per token (every weight matrix,
    lm_head included, at 4 bytes fp32 or 1 byte + a 4-byte scale per row int8; norms, one embedding
    row and the KV cache) / the measured bandwidth, twice: against the higher of the two best-of-10
    readings taken at the start and at the end of the run (conservative), and repeat by repeat against a probe taken just before it ("beside": the machine
    is shared and its bandwidth moves by a third within minutes);
  * for the fused backends, decode also against a plain read of the very weights it reads: the bytes of
    its linear layers as they lie in memory (contiguous spans on 2 MB pages, in decode order), summed
    right before each repeat, best of 3 ("of weights read"): how near the kernels come to just reading
    their weights, on this host at that moment;
  * a batch sweep of decode tokens/s;
  * fused and fused-int8 decode with the C++ decode step switched off (the same kernels called op by op
    from Python), and a per-phase profile of one C++ decode step.
Medians over --repeats runs after a warm-up. Timings on shared machines are noisy: compare ratios
within one run, never absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

import pyengine
from pyengine.kernels import ops
from pyengine.bench.report import json_safe
from pyengine.machine import cpu_model
from pyengine.kernels.memory import transparent_huge_pages
from pyengine.bench.roofline import (
    bytes_per_token, fraction_beside, read_bandwidth_gbs, roofline_tok_s, weight_spans, weights_read_gbs,
)

PROMPT = ("The history of the city begins with a small settlement on the river, where traders met to "
          "exchange grain, salt and cloth. Over the centuries the town grew into a market, then a port, "
          "and finally the capital of a region known for its bridges, its libraries and its music. ") * 20


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(values):
    return statistics.median(values)


def hf_dynamic_int8(model):
    """The HF model through torch's dynamic int8 quantization (every nn.Linear, qint8 weights): the
    int8 a PyTorch user reaches first. A copy; raises where torch no longer provides it."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def write_json(result: dict, path: Path) -> None:
    """Strict JSON: non-finite figures (the python rows' prefill is NaN) as null, and allow_nan=False so
    that no NaN or Infinity token can reach the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False) + "\n")


# With `probes` (a list), read bandwidth is probed right before each repeat (a shorter probe: best
# of 3) and appended to it, so each decode figure also has a roofline measured beside it: on a
# shared VM the bandwidth moves by a third within minutes.
def _probe(probes):
    if probes is not None:
        probes.append(read_bandwidth_gbs(repeats=3))


def pyengine_runs(engine, prompt_ids, new_tokens, batch, repeats, probes=None, weight_probes=None):
    """weight_probes: a list, appended the weights-read rate (weights_read_gbs) before each repeat."""
    prompts = [engine.tokenizer.decode(prompt_ids)] * batch
    engine.generate(prompts, max_new_tokens=4, ignore_eos=True)  # warm-up
    spans = weight_spans(engine) if weight_probes is not None else None
    out = []
    for _ in range(repeats):
        _probe(probes)
        if spans is not None:
            weight_probes.append(weights_read_gbs(spans))
        r = engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)[0]
        out.append(batch * (new_tokens - 1) / r.usage.decode_seconds)
    return out


def pyengine_prefill(engine, prompt_ids, repeats):
    text = engine.tokenizer.decode(prompt_ids)
    engine.generate(text, max_new_tokens=1)
    return [len(prompt_ids) / engine.generate(text, max_new_tokens=1).usage.prefill_seconds for _ in range(repeats)]


def hf_runs(model, prompt_ids, new_tokens, batch, repeats, probes=None):
    ids = torch.tensor([prompt_ids] * batch)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
        out = []
        for _ in range(repeats):
            _probe(probes)
            prefill = _time(lambda: model(ids, logits_to_keep=1))  # the last position's logits, as ours
            total = _time(lambda: model.generate(ids, **kwargs))
            out.append(batch * (new_tokens - 1) / (total - prefill))  # decode = generate - prefill
    return out


def hf_prefill(model, prompt_ids, repeats):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
        # logits at the last position only, as pyengine's prefill computes them (all positions: ~27%
        # more matmul work on the default model's 49k vocabulary)
        return [len(prompt_ids) / _time(lambda: model(ids, logits_to_keep=1)) for _ in range(repeats)]


def context_run(engine, context: int, new_tokens: int) -> float:
    """Decode tokens/s at batch 1 after a prompt of `context` tokens (one run: long prompts are slow to
    prefill; the decode after them reads the KV cache of that length every step)."""
    vocab = engine.config.vocab_size
    ids = torch.tensor([[(i * 7919) % vocab for i in range(context)]])  # any ids: decode reads the same bytes
    cache = engine.model.new_cache(1, context + new_tokens, torch.float32)
    with torch.inference_mode():
        logits = engine.model.forward(ids, cache, logits_at=torch.tensor([context - 1]))
        cache.lengths += context
        token = logits.reshape(1, -1).argmax(-1, keepdim=True)
        engine.model.forward(token, cache)  # warm-up step
        cache.lengths += 1
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = engine.model.forward(token, cache)
            cache.lengths += 1
            token = logits[:, -1].argmax(-1, keepdim=True)
        return (new_tokens - 1) / (time.perf_counter() - t)


def profile_step(engine, steps: int = 20) -> dict:
    """Seconds per phase of one C++ decode step (the decoder's own timers), averaged over `steps`."""
    decoder = engine.model._decoder
    decoder.set_profiling(True)
    decoder.reset_profile()
    engine.generate("Profile this.", max_new_tokens=steps + 1, ignore_eos=True)
    profile = decoder.profile()
    decoder.set_profiling(False)
    n = profile.pop("steps")
    return {k: v / n for k, v in profile.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", default="512", help="comma-separated prompt lengths for prefill")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--contexts", default="", help="comma-separated KV lengths for batch-1 decode, fused backends")
    p.add_argument("--backends", default="torch,fused,fused-int8,fused-bf16")
    p.add_argument("--no-python-path", action="store_true", help="skip the op-by-op decode and the step profile")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF baselines")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    ops.set_num_threads(args.threads)
    import transformers

    machine = {"cpu": cpu_model(), "isa": ops.active_isa(), "threads": args.threads,
               "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "pyengine": pyengine.__version__,
               "load_average": list(__import__("os").getloadavg()),
               "transparent_huge_pages": transparent_huge_pages()}
    print(f"machine: {machine['cpu']}, isa {machine['isa']}, {args.threads} threads, "
          f"transparent huge pages {machine['transparent_huge_pages']}", flush=True)
    bandwidth = read_bandwidth_gbs()
    gflops = gemm_gflops()
    print(f"read bandwidth {bandwidth:.1f} GB/s, fp32 GEMM {gflops:.0f} GFLOP/s", flush=True)

    reference = pyengine.load(args.model, backend="torch")
    path, config = reference.model_path, reference.config
    from pyengine.load.checkpoint import CheckpointWeights

    checkpoint_dtype = CheckpointWeights(path).matrix_dtype()
    ids = reference.tokenizer.encode(PROMPT)
    prefill_lengths = [int(n) for n in args.prefill_tokens.split(",")]
    ids = (ids * (max(prefill_lengths) // len(ids) + 1))[: max(prefill_lengths + [args.prompt_tokens])]
    prompt_ids = ids[: args.prompt_tokens]
    del reference
    context = args.prompt_tokens + args.new_tokens // 2  # average KV length during decode
    precisions = ("fp32", "bf16", "int8")
    roofline = {kind: roofline_tok_s(config, kind, context, bandwidth) for kind in precisions}
    print("decode roofline at batch 1: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in roofline.items()), flush=True)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []

    def prefill_by_length(measure):
        """{length: median tok/s} for every --prefill-tokens length (the longer ones: one repeat)."""
        return {n: median(measure(ids[:n], args.repeats if n == prefill_lengths[0] else 1)) for n in prefill_lengths}

    def record(name, precision, decode_by_batch, prefill, beside=None, weights_beside=None, weight_bytes=None):
        """beside: the bandwidth probed before each batch-1 decode repeat; weights_beside: the rate of
        reading the engine's own weights (weight_bytes of them) probed before each."""
        row = {"backend": name, "precision": precision,
               "decode_tok_s": {b: median(v) for b, v in decode_by_batch.items()},
               "decode_tok_s_runs": decode_by_batch}
        if isinstance(prefill, dict):  # {length: tok/s}
            row["prefill_tok_s_by_length"] = prefill
            row["prefill_tok_s"] = prefill[prefill_lengths[0]]
        else:
            row["prefill_tok_s"], row["prefill_runs"] = median(prefill), prefill
        row["decode_roofline_fraction"] = row["decode_tok_s"][1] / roofline[precision] if 1 in decode_by_batch else None
        if beside and 1 in decode_by_batch:
            # Each repeat against the bandwidth probed just before it; the median of those fractions.
            per_byte = bytes_per_token(config, precision, context)["total"]
            row["bandwidth_beside_gb_s"] = beside
            row["decode_roofline_fraction_beside"] = fraction_beside(decode_by_batch[1], beside, per_byte)
        if weights_beside and 1 in decode_by_batch:
            row["weight_bytes"] = weight_bytes
            row["weights_read_gb_s_beside"] = weights_beside
            row["decode_fraction_of_weights_read"] = fraction_beside(decode_by_batch[1], weights_beside, weight_bytes)
        rows.append(row)
        fraction = row["decode_roofline_fraction"]
        print(f"{name:<18} decode b1 {row['decode_tok_s'].get(1, float('nan')):7.1f} tok/s "
              f"({(fraction or 0) * 100:5.1f}% of {precision} roofline, "
              f"{row.get('decode_roofline_fraction_beside', float('nan')) * 100:5.1f}% beside, "
              f"{row.get('decode_fraction_of_weights_read', float('nan')) * 100:5.1f}% of weights read)  "
              f"prefill {row['prefill_tok_s']:7.1f} tok/s  "
              f"batches {', '.join(f'{b}: {v:.1f}' for b, v in row['decode_tok_s'].items())}", flush=True)

    if not args.skip_hf:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
        beside = []
        record("hf-eager", "fp32", {b: hf_runs(hf, prompt_ids, args.new_tokens, b, args.repeats,
                                               probes=beside if b == 1 else None) for b in batch_sizes},
               prefill_by_length(partial(hf_prefill, hf)), beside)
        try:
            hf8 = hf_dynamic_int8(hf)
            beside = []
            record("hf-dynamic-int8", "int8",
                   {1: hf_runs(hf8, prompt_ids, args.new_tokens, 1, args.repeats, probes=beside)},
                   prefill_by_length(partial(hf_prefill, hf8)), beside)
            del hf8
        except Exception as e:  # report, don't hide: this baseline may disappear from torch
            print(f"hf-dynamic-int8: not measured ({type(e).__name__}: {e})")
        del hf
        if checkpoint_dtype in (torch.bfloat16, torch.float16):
            # The eager run a user of a half-precision checkpoint makes: HF in the checkpoint's own dtype.
            half = "bf16" if checkpoint_dtype == torch.bfloat16 else "fp16"
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                   dtype=checkpoint_dtype).eval()
            beside = []
            record(f"hf-eager-{half}", half,
                   {b: hf_runs(hf, prompt_ids, args.new_tokens, b, args.repeats, probes=beside if b == 1 else None)
                    for b in batch_sizes},
                   prefill_by_length(partial(hf_prefill, hf)), beside)
            del hf

    profiles = {}
    from pyengine.kernels.backends import BACKENDS

    contexts = [int(c) for c in args.contexts.split(",") if c]
    for backend in args.backends.split(","):
        engine = pyengine.load(path, backend=backend)
        precision = BACKENDS[backend].weight_precision or "fp32"
        fused = backend != "torch"
        weight_bytes = sum(s.numel() * 8 for s in weight_spans(engine)) if fused else None
        beside, weights_beside = [], [] if fused else None
        record(backend, precision,
               {b: pyengine_runs(engine, prompt_ids, args.new_tokens, b, args.repeats,
                                 probes=beside if b == 1 else None,
                                 weight_probes=weights_beside if b == 1 else None) for b in batch_sizes},
               prefill_by_length(partial(pyengine_prefill, engine)), beside, weights_beside, weight_bytes)
        if fused and contexts:
            by_context = {}
            for n in contexts:
                tok_s = context_run(engine, n, 32)
                roof = roofline_tok_s(config, precision, n, bandwidth)
                by_context[n] = {"decode_tok_s": tok_s, "roofline_tok_s": roof, "fraction": tok_s / roof,
                                 "bytes_per_token": bytes_per_token(config, precision, n)}
                print(f"{backend:<18} decode b1 at context {n}: {tok_s:.1f} tok/s ({tok_s / roof:.0%} of its roofline, "
                      f"{by_context[n]['bytes_per_token']['total'] / 1e6:.0f} MB read per token, KV cache included)", flush=True)
            rows[-1]["decode_by_context"] = by_context
        if fused and not args.no_python_path:
            # The same kernels driven op by op from Python: what the C++ decode step saves.
            engine.model.cpp_decode = False
            beside, weights_beside = [], []
            record(f"{backend} (python)", precision,
                   {1: pyengine_runs(engine, prompt_ids, args.new_tokens, 1, args.repeats, probes=beside,
                                     weight_probes=weights_beside)},
                   [float("nan")], beside, weights_beside, weight_bytes)
            engine.model.cpp_decode = True
            profiles[backend] = profile_step(engine)
        del engine
    for backend, profile in profiles.items():
        total = sum(profile.values())
        print(f"profile of one C++ decode step, {backend}: {total * 1e3:.2f} ms: " +
              ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(profile.items(), key=lambda kv: -kv[1])[:6]))

    # Bandwidth again at the end: on a shared machine a dip at the start would inflate every fraction.
    bandwidth_end = read_bandwidth_gbs()
    if bandwidth_end > bandwidth:
        print(f"read bandwidth at the end {bandwidth_end:.1f} GB/s: roofline fractions recomputed with it")
        bandwidth = bandwidth_end
        roofline = {kind: roofline_tok_s(config, kind, context, bandwidth) for kind in precisions}
        for r in rows:
            if 1 in r["decode_tok_s"]:
                r["decode_roofline_fraction"] = r["decode_tok_s"][1] / roofline[r["precision"]]
    base = next((r for r in rows if r["backend"] == "hf-eager"), None)
    if base:
        for r in rows:
            r["decode_speedup_vs_hf_eager"] = r["decode_tok_s"].get(1, 0) / base["decode_tok_s"][1]
            r["prefill_speedup_vs_hf_eager"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    result = {"machine": machine, "read_bandwidth_gb_s": bandwidth, "fp32_gemm_gflop_s": gflops,
              "roofline_tok_s": roofline, "bytes_per_token": {k: bytes_per_token(config, k, context)
                                                               for k in precisions},
              "settings": vars(args) | {"json": str(args.json) if args.json else None}, "results": rows,
              "decode_step_profile_s": profiles}
    print("\nsummary (decode at batch 1; fraction of the roofline from the higher of the start and end bandwidth "
          "readings, from the bandwidth probed beside each repeat, and of a plain read of the engine's own weights "
          "beside each repeat):")
    for r in rows:
        fraction = r.get("decode_roofline_fraction")
        print(f"  {r['backend']:<20} {r['decode_tok_s'].get(1, float('nan')):7.1f} tok/s  "
              f"{(fraction or 0) * 100:5.1f}% of {r['precision']} roofline "
              f"({r.get('decode_roofline_fraction_beside', float('nan')) * 100:5.1f}% beside, "
              f"{r.get('decode_fraction_of_weights_read', float('nan')) * 100:5.1f}% of weights read)  "
              f"decode x{r.get('decode_speedup_vs_hf_eager', float('nan')):.2f}  "
              f"prefill x{r.get('prefill_speedup_vs_hf_eager', float('nan')):.2f} vs hf-eager")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
