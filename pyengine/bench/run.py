"""The `pyengine bench` run: each backend loaded in turn, measured at every batch size, scored, reported."""
from __future__ import annotations

import gc
import sys
import time

import torch

from pyengine.bench.config import (GREEDY_NEW_TOKENS, GREEDY_PROMPT_TOKENS, HF, HF_VARIANTS, hf_native_backend,
                                   resolve_model, validate)
from pyengine.bench.engine_runner import EngineRunner
from pyengine.bench.hf_runner import HFRunner
from pyengine.bench.measure import make_bench_meter, measure, summarize
from pyengine.bench.plot import plot
from pyengine.bench.prompts import build_prompts, corpus_ids, greedy_rows
from pyengine.bench.report import build_report, format_report, write_json
from pyengine.bench.roofline_columns import read_bandwidth


def run(args) -> int:
    from tqdm import tqdm

    from pyengine.kernels import ops
    from pyengine.bench import quality
    from pyengine.energy import idle_drift, measure_idle

    cfg = validate(args)
    path, mconfig, tokenizer = resolve_model(cfg.model)
    ctx = mconfig.max_context
    if cfg.prompt_tokens + cfg.new_tokens > ctx:
        raise ValueError(f"--prompt-tokens {cfg.prompt_tokens} + --new-tokens {cfg.new_tokens} exceeds the "
                         f"model's context of {ctx} tokens")
    if cfg.prefill_tokens >= ctx:
        cfg.notes.append(f"--prefill-tokens {cfg.prefill_tokens} cut to {ctx - 1}: the model's context is {ctx}")
        cfg.prefill_tokens = ctx - 1
    if cfg.quality and cfg.quality_window > ctx:
        cfg.notes.append(f"--quality-window {cfg.quality_window} cut to the model's context of {ctx}")
        cfg.quality_window = ctx
    if cfg.threads is not None:
        ops.set_num_threads(cfg.threads)
    # transformers' loading bars and warnings would interleave with ours
    import transformers

    transformers.utils.logging.disable_progress_bar()

    if args.backends is None and (native := hf_native_backend(path)) is not None:
        cfg.backends.insert(1, native)
        cfg.notes.append(f"{native}: HF eager in the checkpoint's own dtype, beside the fp32 {HF} baseline")
    bandwidth = {"start": read_bandwidth(cfg)}
    meter = make_bench_meter(cfg)
    idle = idle_end = None
    measure_idle_now = not meter.estimated and cfg.idle_seconds > 0
    if meter.estimated:
        idle_note = "skipped: idle power means nothing for the estimate (it counts this process's CPU time only)"
    elif cfg.idle_seconds <= 0:
        idle_note = "not measured (--idle-seconds 0): active energy not reported"
    else:
        idle_note = ""

    prompts = {b: build_prompts(tokenizer, cfg.prompt_tokens, b) for b in cfg.batch_sizes}
    long_prompts = ({b: build_prompts(tokenizer, cfg.prefill_tokens, b) for b in cfg.batch_sizes}
                    if cfg.prefill_tokens else None)
    wins, greedy_prompts = [], []
    if cfg.quality:
        ids = corpus_ids(tokenizer, cfg.corpus, cfg.quality_tokens)
        wins = quality.windows(ids, cfg.quality_tokens, cfg.quality_window)
        greedy_prompts = greedy_rows(tokenizer, ids)
        if not wins:
            raise ValueError(f"--corpus {cfg.corpus}: too short to score (needs at least 2 tokens)")
        if sum(len(w) for w in wins) < cfg.quality_tokens:
            cfg.notes.append(f"the corpus has only {sum(len(w) for w in wins)} tokens; scored them all")

    reference = ("torch" if "torch" in cfg.backends else next((b for b in cfg.backends if b in HF_VARIANTS),
                                                               cfg.backends[0]))
    order = [reference] + [b for b in cfg.backends if b != reference]
    per_batch = cfg.warmup + cfg.repeats
    total = len(order) * (1 + len(cfg.batch_sizes) * per_batch * (2 if long_prompts else 1) + len(wins)
                          + (1 if greedy_prompts else 0))
    results, qualities, load_info = {}, {}, {}
    ref_logits = ref_greedy = None
    bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, disable=args.no_progress, leave=False)
    try:
        for i, name in enumerate(order):
            if i and cfg.cooldown:
                bar.set_postfix_str(f"cooldown {cfg.cooldown:g}s")
                time.sleep(cfg.cooldown)
            bar.set_description(f"{name}: loading" + (" (GPTQ: minutes the first time, cached after)"
                                                      if name == "fused-int8" and cfg.int8_method == "gptq" else ""))
            t0 = time.perf_counter()
            int8 = ({"int8_method": cfg.int8_method, "int8_weights": cfg.int8_weights}
                    if name == "fused-int8" else {})
            runner = (HFRunner(path, cfg.device, name) if name in HF_VARIANTS
                      else EngineRunner(name, path, cfg.device, meter, **int8))
            load_info[name] = {"load_seconds": time.perf_counter() - t0, "dtype": str(runner.dtype).replace("torch.", ""),
                               **runner.info}
            bar.update(1)
            try:
                if i == 0 and measure_idle_now:
                    # after loading (on a GPU: the CUDA context up), as the runs will find the machine
                    bar.set_description(f"idle power ({cfg.idle_repeats} x {cfg.idle_seconds:g} s)")
                    idle = measure_idle(meter, cfg.idle_seconds, repeats=cfg.idle_repeats)
                    idle_note = f"measured with {name} loaded: {idle.note}"
                for b in cfg.batch_sizes:
                    results[(name, b)] = _bench_batch(runner, name, b, prompts[b],
                                                      long_prompts[b] if long_prompts else None, cfg, meter, idle, bar)
                if cfg.quality:
                    bar.set_description(f"{name}: quality")
                    keep = name == reference
                    res, kept = quality.evaluate(runner.logits, wins, reference=ref_logits,
                                                 reference_name=reference if ref_logits is not None else None,
                                                 keep=keep, progress=bar)
                    if keep:
                        ref_logits = kept
                    if greedy_prompts:  # the greedy continuations of corpus prompts, against the reference's
                        continuations = runner.greedy(greedy_prompts, GREEDY_NEW_TOKENS)
                        if keep:
                            ref_greedy = continuations
                        else:
                            res.extra.update(quality.greedy_agreement(ref_greedy, continuations),
                                             greedy_prompt_tokens=GREEDY_PROMPT_TOKENS,
                                             greedy_new_tokens=GREEDY_NEW_TOKENS)
                        bar.update(1)
                    qualities[name] = res
                bandwidth[f"after {name}"] = read_bandwidth(cfg)
                if i == len(order) - 1 and idle is not None:
                    bar.set_description("idle power again, at the end")
                    idle_end = measure_idle(meter, cfg.idle_seconds, repeats=cfg.idle_repeats)
                    drift, warning = idle_drift(idle, idle_end)
                    if warning:
                        cfg.notes.append(warning)
            finally:
                runner.close()
                del runner
                gc.collect()
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        bar.close()
        meter.close()
    bandwidth["end"] = read_bandwidth(cfg)

    report = build_report(cfg, path, mconfig, meter, idle, idle_note, prompts, long_prompts, results,
                                       qualities, reference, load_info, wins, idle_end=idle_end, bandwidth=bandwidth)
    print(format_report(report))
    if cfg.json_path:
        write_json(report, cfg.json_path)
        print(f"wrote {cfg.json_path}", file=sys.stderr)
    if cfg.plot_path:
        plot(report, cfg.plot_path)
        print(f"wrote {cfg.plot_path}", file=sys.stderr)
    return 0


def _bench_batch(runner, name, b, rows, long_rows, cfg, meter, idle, bar):
    """Warm-up then repeats of the prefill measurement (long prompt) and of generation."""
    kinds = [("prefill", long_rows)] if long_rows else []
    kinds.append(("generate", rows))
    out = {"repeats": [], "prefill_repeats": []}
    for kind, r in kinds:
        bar.set_description(f"{name} b={b}: {kind} warm-up")
        run_s = None
        for _ in range(cfg.warmup):
            t0 = time.perf_counter()
            (runner.run_prefill(r, None) if kind == "prefill" else runner.run_generate(r, cfg.new_tokens, None))
            run_s = time.perf_counter() - t0
            bar.update(1)
        k = 1
        if meter.name.startswith("nvml") and meter.min_window_s > 0:
            if run_s is None:  # no warm-up: time one run to size the window
                t0 = time.perf_counter()
                (runner.run_prefill(r, None) if kind == "prefill" else runner.run_generate(r, cfg.new_tokens, None))
                run_s = time.perf_counter() - t0
            k = meter.repeats_for(max(run_s, 1e-6))
        bar.set_description(f"{name} b={b}: {kind}" + (f" (x{k} per window)" if k > 1 else ""))
        for _ in range(cfg.repeats):
            m = measure(runner, kind, r, cfg, meter, idle, runs_per_window=k)
            out["repeats" if kind == "generate" else "prefill_repeats"].append(m)
            bar.update(1)
    # the table's prefill columns come from the long-prompt measurement where there is one
    merged = []
    for i, rep in enumerate(out["repeats"]):
        rep = dict(rep)
        rep["generate_prefill"] = rep["prefill"]
        if out["prefill_repeats"]:
            rep["prefill"] = out["prefill_repeats"][i]["prefill"]
        merged.append(rep)
    return {"repeats": merged, "prefill_repeats": out["prefill_repeats"], "summary": summarize(merged, cfg)}
