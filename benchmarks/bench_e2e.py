"""End-to-end generation per backend, with the energy of each run beside its time.

    pytest benchmarks/bench_e2e.py --benchmark-save=cpu      # then: pytest-benchmark compare

Every pyengine backend that ``available_backends("cpu")`` lists, plus HF transformers eager as the
baseline, generates the same prompt batch with a fixed number of new tokens (greedy, EOS ignored).
Each result's ``extra_info`` carries the energy of the measured rounds: joules (median per run),
J/token, the source and whether it is an estimate, so ``pytest-benchmark compare`` shows energy
beside time.

Environment: PYENGINE_BENCH_LAYERS (layers of the random SmolLM2-shaped model when the default
model is not cached; default 30), PYENGINE_BENCH_NEW_TOKENS (default 32), PYENGINE_BENCH_BATCH
(default 1), PYENGINE_BENCH_PROMPT_TOKENS (default 32), PYENGINE_BENCH_DEVICE (default cpu).
"""
from __future__ import annotations

import gc
import os
import statistics

import pytest
import torch

from pyengine import bench
from pyengine.backends import available_backends

DEVICE = os.environ.get("PYENGINE_BENCH_DEVICE", "cpu")
NEW_TOKENS = int(os.environ.get("PYENGINE_BENCH_NEW_TOKENS", 32))
BATCH = int(os.environ.get("PYENGINE_BENCH_BATCH", 1))
PROMPT_TOKENS = int(os.environ.get("PYENGINE_BENCH_PROMPT_TOKENS", 32))
BACKENDS = [bench.HF, *available_backends(DEVICE)]


@pytest.fixture(scope="module")
def meter():
    from pyengine.energy import make_meter

    m = make_meter("auto", device=DEVICE)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts(bench_model):
    from pyengine.tokenizer import Tokenizer

    return bench.build_prompts(Tokenizer.from_folder(bench_model), PROMPT_TOKENS, BATCH)


def _attach_energy(benchmark, joules, meta, tokens):
    if not joules:
        return
    j = statistics.median(joules)
    benchmark.extra_info.update({
        "joules": j, "joules_per_token": j / tokens, "tokens": tokens, "energy_source": meta["source"],
        "estimated": meta["estimated"], "confidence": meta["confidence"], "fallback_reason": meta["fallback_reason"],
        "batch": BATCH, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
    })


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_e2e(benchmark, backend, bench_model, prompts, meter):
    device = torch.device(DEVICE)
    runner = (bench.HFRunner(bench_model, device) if backend == bench.HF
              else bench.EngineRunner(backend, bench_model, device, meter))
    joules, meta = [], {}

    def once():
        if backend == bench.HF:  # generate() alone, in one meter window
            _, m = runner.run_generate_only(prompts, NEW_TOKENS, meter)
            joules.append(m.total_joules)
            meta.update(bench._energy_meta([m]))
            return
        # pyengine: usage.energy of generate(measure_energy=True), prefill + decode
        ph = runner.run_generate(prompts, NEW_TOKENS, meter)
        joules.append(bench._joules_of(ph.prefill[1]) + bench._joules_of(ph.decode[1]))
        meta.update(bench._energy_meta([ph.prefill[1], ph.decode[1]]))

    try:
        benchmark.pedantic(once, rounds=3, warmup_rounds=1, iterations=1)
        # the warm-up round also appended: keep the measured rounds only
        del joules[:-3]
        _attach_energy(benchmark, joules, meta, BATCH * NEW_TOKENS)
    finally:
        runner.close()
        del runner
        gc.collect()
