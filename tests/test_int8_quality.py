"""fused-int8 on the default model: the quality it gives up, measured on WikiText-2 (shared data)."""
import pytest
import torch

import pyengine
from pyengine import quality
from tests_paths import WIKITEXT

pytestmark = pytest.mark.default_model

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The best way to learn a language is",
           "Water boils at", "def fibonacci(n):", "The three primary colors are", "In 1969, the first humans",
           "A healthy breakfast includes"]


@pytest.fixture(scope="module")
def engines():
    return pyengine.load("default", backend="fused"), pyengine.load("default", backend="fused-int8")


def test_int8_perplexity_within_one_percent(engines):
    if not WIKITEXT.is_file():
        pytest.skip(f"shared data not found at {WIKITEXT}")
    fp32, int8 = engines
    ids = fp32.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:40000])
    wins = quality.windows(ids, 2048, 512)
    ref, kept = quality.evaluate(lambda w: fp32.logits([w])[0], wins, keep=True)
    q, _ = quality.evaluate(lambda w: int8.logits([w])[0], wins, reference=kept)
    assert ref.positions == q.positions == 2044
    assert abs(q.perplexity / ref.perplexity - 1) < 0.01
    assert q.kl < 0.02 and q.top1_agreement > 0.9


def test_int8_greedy_text_mostly_unchanged(engines):
    fp32, int8 = engines
    same = sum(fp32.generate(p, max_new_tokens=16, ignore_eos=True).token_ids ==
               int8.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS)
    assert same >= len(PROMPTS) // 2, f"only {same}/{len(PROMPTS)} prompts keep their first 16 greedy tokens"
