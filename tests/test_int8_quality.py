"""fused-int8 on the default model: the quality it gives up, measured on WikiText-2 (shared data)."""
import pytest

import pyengine
from pyengine.bench import quality
from tests_paths import WIKITEXT

pytestmark = pytest.mark.default_model

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The best way to learn a language is",
           "Water boils at", "def fibonacci(n):", "The three primary colors are", "In 1969, the first humans",
           "A healthy breakfast includes"]


@pytest.fixture(scope="module")
def engines():
    return pyengine.load("default", backend="fused"), pyengine.load("default", backend="fused-int8")


@pytest.fixture(scope="module")
def wikitext_scores(engines):
    """fp32's WikiText-2 windows (2048 tokens) and its kept logits, to score int8 engines against."""
    if not WIKITEXT.is_file():
        pytest.skip(f"shared data not found at {WIKITEXT}")
    fp32, _ = engines
    ids = fp32.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:40000])
    wins = quality.windows(ids, 2048, 512)
    ref, kept = quality.evaluate(lambda w: fp32.logits([w])[0], wins, keep=True)
    return wins, ref, kept


def test_int8_perplexity_within_one_percent(engines, wikitext_scores):
    _, int8 = engines
    wins, ref, kept = wikitext_scores
    q, _ = quality.evaluate(lambda w: int8.logits([w])[0], wins, reference=kept)
    assert ref.positions == q.positions == 2044
    assert abs(q.perplexity / ref.perplexity - 1) < 0.01
    assert q.kl < 0.02 and q.top1_agreement > 0.9


@pytest.fixture(scope="module")
def gptq():
    # Quantized once per machine (about 2 minutes on 2 cores), then read from the pyengine cache.
    return pyengine.load("default", backend="fused-int8", int8_method="gptq", progress=False)


def test_gptq_closer_to_fp32_than_plain_rounding(engines, wikitext_scores, gptq):
    # The same int8 format; only which integer each weight gets differs. Calibrated on text the
    # model samples itself, so WikiText-2 is unseen. Measured: KL 0.0021-0.0028 against 0.0043-0.0050.
    _, int8 = engines
    wins, ref, kept = wikitext_scores
    plain, _ = quality.evaluate(lambda w: int8.logits([w])[0], wins, reference=kept)
    q, _ = quality.evaluate(lambda w: gptq.logits([w])[0], wins, reference=kept)
    assert abs(q.perplexity / ref.perplexity - 1) < 0.01
    assert q.kl < 0.8 * plain.kl, (q.kl, plain.kl)
    assert q.top1_agreement > plain.top1_agreement


def test_absmax_greedy_text_half_unchanged(engines):
    # Plain rounding (the default) keeps 4 of 8 here and 40% of 128 WikiText-2 prompts (README): the
    # issue's "most prompts" is reached with GPTQ weights only (the test below). This guards the half.
    fp32, int8 = engines
    same = sum(fp32.generate(p, max_new_tokens=16, ignore_eos=True).token_ids ==
               int8.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS)
    assert same >= len(PROMPTS) // 2, f"only {same}/{len(PROMPTS)} prompts keep their first 16 greedy tokens"


def test_gptq_greedy_text_mostly_unchanged(engines, gptq):
    # The bar, "most prompts": more than half. Measured on AMD EPYC Zen 3: 6 of 8 (plain
    # rounding: 4 of 8); one prompt of room for a calibration text that differs on another ISA.
    fp32, _ = engines
    same = sum(fp32.generate(p, max_new_tokens=16, ignore_eos=True).token_ids ==
               gptq.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS)
    assert same > len(PROMPTS) // 2, f"only {same}/{len(PROMPTS)} prompts keep their first 16 greedy tokens"
