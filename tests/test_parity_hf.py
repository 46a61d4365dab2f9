"""The engine against HF transformers (eager attention, fp32) on the same weights."""
import pytest
import torch
import transformers

import pyengine

BACKENDS = ["torch", "fused"]  # the exact (fp32) backends; fused-int8 is checked for quality in test_int8_engine.py


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def assert_logits_close(ours, ref):
    # Tolerance: 1e-4 of the logit scale (the bar); fp32 paths land around 1e-6.
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(tiny_model, backend):
    engine = pyengine.load(tiny_model, backend=backend)
    torch.manual_seed(1)
    ids = torch.randint(0, engine.config.vocab_size, (2, 50))
    with torch.no_grad():
        ref = hf_model(tiny_model)(ids).logits
    assert_logits_close(engine.logits(ids), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_is_token_identical(tiny_model, backend):
    engine = pyengine.load(tiny_model, backend=backend)
    prompt = "The capital of France is"
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf_model(tiny_model).generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                            eos_token_id=None, pad_token_id=0, min_new_tokens=64)
    expected = out[0, len(ids):].tolist()
    result = engine.generate(prompt, max_new_tokens=64, ignore_eos=True)
    assert result.token_ids == expected
    assert result.finish_reason == "length"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_one_by_one(tiny_model, backend):
    engine = pyengine.load(tiny_model, backend=backend)
    prompts = ["Once upon a time", "The quick brown fox jumps over the lazy dog and", "Energy"]
    singles = [engine.generate(p, max_new_tokens=20, ignore_eos=True).token_ids for p in prompts]
    batched = [r.token_ids for r in engine.generate(prompts, max_new_tokens=20, ignore_eos=True)]
    assert batched == singles
