"""End-to-end decode and prefill per backend: tokens/s, the decode's roofline fraction and the
energy of each run beside its time. benchmarks/cpu_roofline.py's figures as pytest-benchmark cases,
measured with its functions.

    python -m pytest benchmarks/bench_e2e.py --benchmark-save=cpu   # then: pytest-benchmark compare
    python -m pytest benchmarks/bench_e2e.py --benchmark-disable     # each case once, untimed (smoke run)

Backends: HF transformers eager (the baseline; fp32 on CPU), the same HF model through torch's
dynamic int8 quantization (hf-dynamic-int8: quantize_dynamic on every nn.Linear, qint8 weights;
CPU only; skipped, with the reason, where torch no longer has it), and every pyengine backend that
``available_backends(device)`` lists (torch, fused, fused-int8 on CPU). Each backend is loaded once
for both tests and closed before the next one loads.

test_generate_e2e (group "decode"): the prompt batch generates NEW_TOKENS new tokens (greedy, EOS
ignored); the time is the whole generate call. extra_info: decode_tok_s (median over the measured
rounds of batch * (NEW_TOKENS - 1) / decode seconds: the engine's usage.decode_seconds; for HF,
generate minus a prefill forward timed just before it, as cpu_roofline does) and its runs. On CPU at
batch 1, also the keys of cpu_roofline's JSON rows: read_bandwidth_gb_s (a best-of-10 plain read,
once, before any backend loads) and decode_roofline_fraction against it; the bandwidth probed before
each round (bandwidth_beside_gb_s) and decode_roofline_fraction_beside; for the fused backends the
rate of reading their own weights before each round (weights_read_gb_s_beside, of weight_bytes) and
decode_fraction_of_weights_read.
test_prefill_e2e (group "prefill"): one prompt of PREFILL_TOKENS; the time is HF's forward, or the
engine's generate of one token. extra_info: prefill_tok_s (tokens / HF's forward time, or / the
engine's usage.prefill_seconds) and its runs.
Both carry the energy of the measured rounds: joules (median per run), J/token, the source and
whether it is an estimate, so ``pytest-benchmark compare`` shows energy beside time.

Environment: PYENGINE_BENCH_LAYERS (layers of the random SmolLM2-shaped model when the default
model is not cached; default 30), PYENGINE_BENCH_NEW_TOKENS (default 128), PYENGINE_BENCH_BATCH
(default 1), PYENGINE_BENCH_PROMPT_TOKENS (default 32), PYENGINE_BENCH_PREFILL_TOKENS (default 512),
PYENGINE_BENCH_ROUNDS (measured rounds after one warm-up; default 3), PYENGINE_BENCH_DEVICE (default cpu).
"""
from __future__ import annotations

import gc
import os
import statistics

import cpu_roofline  # benchmarks/cpu_roofline.py: pytest's default (prepend) import mode puts benchmarks/ on sys.path
import pytest
import torch

from pyengine.kernels.backends import available_backends
from pyengine.bench.config import HF
from pyengine.bench.engine_runner import EngineRunner
from pyengine.bench.hf_runner import HFRunner
from pyengine.bench.measure import energy_meta, joules_of
from pyengine.bench.prompts import build_prompts

DEVICE = os.environ.get("PYENGINE_BENCH_DEVICE", "cpu")
NEW_TOKENS = int(os.environ.get("PYENGINE_BENCH_NEW_TOKENS", 128))
BATCH = int(os.environ.get("PYENGINE_BENCH_BATCH", 1))
PROMPT_TOKENS = int(os.environ.get("PYENGINE_BENCH_PROMPT_TOKENS", 32))
PREFILL_TOKENS = int(os.environ.get("PYENGINE_BENCH_PREFILL_TOKENS", 512))
ROUNDS = int(os.environ.get("PYENGINE_BENCH_ROUNDS", 3))
CPU = torch.device(DEVICE).type == "cpu"
ROOFLINE = CPU and BATCH == 1  # cpu_roofline's bytes_per_token is one batch-1 decode step on the host
HF_INT8 = "hf-dynamic-int8"
BACKENDS = [HF, *([HF_INT8] if CPU else []), *available_backends(DEVICE)]
INT8 = (HF_INT8, "fused-int8")  # int8 weights: cpu_roofline's int8 bytes per token
FUSED = ("fused", "fused-int8")  # weights on 2 MB pages in decode order: cpu_roofline.weight_spans


@pytest.fixture(scope="module")
def meter():
    from pyengine.energy import make_meter

    m = make_meter("auto", device=DEVICE)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tokenizer(bench_model):
    from pyengine.load.tokenizer import Tokenizer

    return Tokenizer.from_folder(bench_model)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return build_prompts(tokenizer, PROMPT_TOKENS, BATCH)


@pytest.fixture(scope="module")
def prefill_prompt(tokenizer):
    return build_prompts(tokenizer, PREFILL_TOKENS, 1)


@pytest.fixture(scope="module")
def model_config(bench_model):
    """pyengine's ModelConfig of the model, for cpu_roofline.bytes_per_token (HF runners have none)."""
    from pyengine.load.config import ModelConfig
    from pyengine.load.checkpoint import read_json

    return ModelConfig.from_hf(read_json(bench_model / "config.json"), bench_model / "config.json")


@pytest.fixture(scope="module")
def read_bandwidth():
    """GB/s of cpu_roofline's plain read (1 GiB on 2 MB pages, best of 10), taken once before any
    backend loads; None where there is no roofline (not CPU, or batch > 1)."""
    return cpu_roofline.read_bandwidth_gbs() if ROOFLINE else None


@pytest.fixture(scope="module", params=BACKENDS)
def runner(request, bench_model, meter, read_bandwidth):
    """One backend, loaded once for both tests. The parameter is module-scoped, so pytest runs both
    tests of one backend together and closes it before loading the next: one model in memory."""
    backend, device = request.param, torch.device(DEVICE)
    if backend in (HF, HF_INT8):
        r = HFRunner(bench_model, device)
        if backend == HF_INT8:
            r.name = HF_INT8
            try:
                r.model = cpu_roofline.hf_dynamic_int8(r.model)
            except Exception as e:  # report, don't hide: this baseline may disappear from torch
                r.close()
                pytest.skip(f"{HF_INT8}: not measured ({type(e).__name__}: {e})")
    else:
        r = EngineRunner(backend, bench_model, device, meter)
    yield r
    r.close()
    del r
    gc.collect()


def _measured(values):
    """The measured rounds' entries: the warm-up round appended too (a --benchmark-disable run: one call)."""
    return values[-ROUNDS:]


def _attach_energy(benchmark, joules, meta, tokens):
    if not joules:
        return
    j = statistics.median(joules)
    benchmark.extra_info.update({
        "joules": j, "joules_per_token": j / tokens, "tokens": tokens, "energy_source": meta["source"],
        "estimated": meta["estimated"], "confidence": meta["confidence"], "fallback_reason": meta["fallback_reason"],
    })


@pytest.mark.benchmark(group="decode")
def test_generate_e2e(benchmark, runner, prompts, meter, model_config, read_bandwidth):
    hf = isinstance(runner, HFRunner)
    spans = cpu_roofline.weight_spans(runner.engine) if ROOFLINE and runner.name in FUSED else None
    joules, meta, decode_s, hf_prefill_s = [], {}, [], []
    beside = [] if ROOFLINE else None  # cpu_roofline._probe appends to a list, does nothing with None
    weights_beside = []

    def setup():  # untimed, before every round (the warm-up's too), in cpu_roofline's order
        cpu_roofline._probe(beside)
        if spans is not None:
            weights_beside.append(cpu_roofline.weights_read_gbs(spans))
        if hf:  # HF's generate has no phase split: decode = generate - this prefill forward
            hf_prefill_s.append(runner.run_prefill(prompts, None).prefill[0])

    def once():
        if hf:  # generate() alone, in one meter window
            seconds, m = runner.run_generate_only(prompts, NEW_TOKENS, meter)
            decode_s.append(seconds - hf_prefill_s[-1])
            joules.append(m.total_joules)
            meta.update(energy_meta([m]))
            return
        # pyengine: usage.energy of generate(measure_energy=True), prefill + decode
        ph = runner.run_generate(prompts, NEW_TOKENS, meter)
        decode_s.append(ph.decode[0])
        joules.append(joules_of(ph.prefill[1]) + joules_of(ph.decode[1]))
        meta.update(energy_meta([ph.prefill[1], ph.decode[1]]))

    benchmark.pedantic(once, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    tok_s = [BATCH * (NEW_TOKENS - 1) / s if s > 0 else float("nan") for s in _measured(decode_s)]
    info = benchmark.extra_info
    info.update({"batch": BATCH, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
                 "decode_tok_s": statistics.median(tok_s), "decode_tok_s_runs": tok_s})
    if ROOFLINE:
        precision = "int8" if runner.name in INT8 else "fp32"
        context = PROMPT_TOKENS + NEW_TOKENS // 2  # the average KV length during decode, as cpu_roofline
        info.update({
            "precision": precision, "read_bandwidth_gb_s": read_bandwidth,
            "decode_roofline_fraction":
                info["decode_tok_s"] / cpu_roofline.roofline_tok_s(model_config, precision, context, read_bandwidth),
            "bandwidth_beside_gb_s": _measured(beside),
            "decode_roofline_fraction_beside": cpu_roofline.fraction_beside(
                tok_s, _measured(beside), cpu_roofline.bytes_per_token(model_config, precision, context)["total"]),
        })
        if spans is not None:
            weight_bytes = sum(s.numel() * 8 for s in spans)
            info.update({"weight_bytes": weight_bytes, "weights_read_gb_s_beside": _measured(weights_beside),
                         "decode_fraction_of_weights_read":
                             cpu_roofline.fraction_beside(tok_s, _measured(weights_beside), weight_bytes)})
    _attach_energy(benchmark, _measured(joules), meta, BATCH * NEW_TOKENS)


@pytest.mark.benchmark(group="prefill")
def test_prefill_e2e(benchmark, runner, prefill_prompt, meter):
    seconds, joules, meta = [], [], {}

    def once():  # HF: one forward; pyengine: generate(max_new_tokens=1), its usage.prefill_seconds
        s, energy = runner.run_prefill(prefill_prompt, meter).prefill
        seconds.append(s)
        if energy is not None:
            joules.append(joules_of(energy))
            meta.update(energy_meta([energy]))

    benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    tok_s = [PREFILL_TOKENS / s for s in _measured(seconds)]
    benchmark.extra_info.update({"prefill_tokens": PREFILL_TOKENS, "prefill_tok_s": statistics.median(tok_s),
                                 "prefill_tok_s_runs": tok_s})
    _attach_energy(benchmark, _measured(joules), meta, PREFILL_TOKENS)
