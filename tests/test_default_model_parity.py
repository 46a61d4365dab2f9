"""The default model (SmolLM2-135M-Instruct, real weights) against HF transformers, fp32."""
import pytest
import torch

import pyengine

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_path():
    from pyengine.load.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="module")
def hf(default_path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(default_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(default_path):
    return pyengine.load("default", backend="torch")


def test_default_config(engine):
    c = engine.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_logits_match_transformers(engine, hf):
    ids = engine.tokenizer.encode("The capital of France is Paris. Energy per token is measured in joules.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
    ours = engine.logits([ids])
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_paris(engine):
    assert engine.generate("The capital of France is", max_new_tokens=8).text.startswith(" Paris")


def test_greedy_64_tokens_identical_to_transformers(engine, hf):
    prompt = "Once upon a time, in a small village,"
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert engine.generate(prompt, max_new_tokens=64, ignore_eos=True).token_ids == out[0, len(ids):].tolist()


def test_chat_answer(engine):
    r = engine.generate("What is the capital of France?", chat=True, max_new_tokens=30)
    assert "Paris" in r.text and r.finish_reason == "stop"
