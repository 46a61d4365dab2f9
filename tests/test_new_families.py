"""Qwen3, Gemma 3 (text) and Phi-3 against HF transformers on tiny random checkpoints built by its own
classes, every feature of each family switched on: logits and greedy tokens on every backend, the
decode path with the C++ decoder asked for and not, ragged batches, the scheduler, and the config
reader's refusals."""
import json

import pytest
import torch

import pyengine
from pyengine.bench import quality
from pyengine.load.config import ModelConfig
from pyengine.errors import CheckpointError
from conftest import TINY_CONFIGS, make_tiny_model
from test_bf16_backend import as_dtype
from test_parity_hf import assert_logits_close, hf_model

HEAD_PAIRS = 8  # head_dim 16 for Phi-3: LongRoPE lists one factor per rotary pair

FAMILIES = {
    "qwen3": TINY_CONFIGS["qwen3"],
    "gemma3": TINY_CONFIGS["gemma3"],
    # fused qkv_proj and gate_up_proj, GQA, a window on every layer, LongRoPE past 32 positions.
    "phi3": dict(model_type="phi3", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 original_max_position_embeddings=32, sliding_window=24, rms_norm_eps=1e-5, pad_token_id=0,
                 rope_scaling={"rope_type": "longrope",
                               "short_factor": [1.0 + 0.1 * i for i in range(HEAD_PAIRS)],
                               "long_factor": [1.5 + 0.5 * i for i in range(HEAD_PAIRS)]}),
}
ORIGINAL_MAX = 32  # Phi-3's original_max_position_embeddings above
ARCHS = list(FAMILIES)


def make_family_model(folder, name, seed=0, fields=None):
    return make_tiny_model(folder, name, seed, fields or FAMILIES[name])


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_model(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def bf16_family_models(family_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("families_bf16")
    return {name: as_dtype(folder, root / name, torch.bfloat16) for name, folder in family_models.items()}


def test_the_features_are_on(family_models):
    """The checkpoints have what the tests claim to cover (read back through our config reader)."""
    qwen3, gemma3, phi3 = (ModelConfig.from_hf(json.loads((family_models[n] / "config.json").read_text()))
                           for n in ("qwen3", "gemma3", "phi3"))
    assert qwen3.qk_norm and qwen3.layer_windows == (0, 12, 12) and qwen3.num_kv_heads < qwen3.num_heads
    assert (gemma3.qk_norm, gemma3.sandwich_norms, gemma3.activation, gemma3.norm_offset) == (True, True, "gelu_tanh", 1.0)
    assert gemma3.embed_scale == 8.0 and gemma3.attn_scale == 24 ** -0.5 and gemma3.final_logit_softcap == 0.5
    assert gemma3.layer_windows == (12, 12, 0, 12) and gemma3.local_rope_layers == (0, 1, 3)
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.rope_scaling) == \
        (10000.0, 500.0, {"rope_type": "linear", "factor": 2.0})
    assert phi3.layer_windows == (24, 24) and phi3.rope_scaling["rope_type"] == "longrope"
    # transformers' default attention factor: sqrt(1 + ln(256 / 32) / ln(32))
    assert phi3.rope_scaling["attention_factor"] == pytest.approx((1 + torch.log(torch.tensor(8.0)).item() /
                                                                  torch.log(torch.tensor(32.0)).item()) ** 0.5)
    assert gemma3.notes == qwen3.notes == phi3.notes == ()


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("length", [20, 50])  # under and over Phi-3's 32, the windows, in one call
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(family_models, arch, backend, length):
    engine = pyengine.load(family_models[arch], backend=backend)
    torch.manual_seed(1)
    ids = torch.randint(0, engine.config.vocab_size, (2, length))
    with torch.no_grad():
        ref = hf_model(family_models[arch])(ids).logits
    assert_logits_close(engine.logits(ids), ref)
    if arch == "gemma3":
        assert 0.4 < ref.abs().max() <= 0.5  # the soft cap bites (uncapped, these logits reach ~0.9)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_checkpoint_matches_transformers_on_the_same_weights(bf16_family_models, arch):
    engine = pyengine.load(bf16_family_models[arch])
    assert engine.backend_name == "fused-bf16"
    torch.manual_seed(1)
    ids = torch.randint(0, engine.config.vocab_size, (2, 50))
    with torch.no_grad():
        ref = hf_model(bf16_family_models[arch])(ids).logits
    assert_logits_close(engine.logits(ids), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_logits_close_to_fp32(family_models, arch):
    fp32 = pyengine.load(family_models[arch], backend="fused")
    int8 = pyengine.load(family_models[arch], backend="fused-int8")
    torch.manual_seed(0)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 64))
    ref, q = fp32.logits(ids), int8.logits(ids)
    assert quality.kl_divergence(ref, q) < 0.01
    assert quality.top1_agreement(ref, q) > 0.9


def hf_greedy(folder, ids, new_tokens):
    with torch.no_grad():
        out = hf_model(folder).generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, min_new_tokens=new_tokens)
    return out[0, len(ids):].tolist()


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # over Phi-3's 32 positions


@pytest.mark.parametrize("cpp_decode", [True, False], ids=["cpp-decode", "op-by-op"])
@pytest.mark.parametrize("backend", ["torch", "fused", "fused-bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(family_models, bf16_family_models, arch, backend, cpp_decode, monkeypatch):
    if not cpp_decode:
        monkeypatch.setenv("PYENGINE_CPP_DECODE", "0")
    folder = (bf16_family_models if backend == "fused-bf16" else family_models)[arch]
    engine = pyengine.load(folder, backend=backend)
    # The C++ decode step is recorded from the family's own hidden_states; Phi-3's LongRoPE picks each
    # row's table at every step, so that model decodes op by op.
    assert (engine.model._cpp_decoder() is not None) == (cpp_decode and backend != "torch" and arch != "phi3")
    cases = [("The capital of France is", 40)]
    if arch == "phi3":  # stays under original_max_position_embeddings, and starts over it
        cases = [("The capital of France is", ORIGINAL_MAX - len(engine.tokenizer.encode(cases[0][0]))),
                 (LONG_PROMPT, 24)]
        assert len(engine.tokenizer.encode(LONG_PROMPT)) > ORIGINAL_MAX
    for prompt, new_tokens in cases:
        expected = hf_greedy(folder, engine.tokenizer.encode(prompt), new_tokens)
        assert engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids == expected


@pytest.mark.parametrize("backend", ["torch", "fused", "fused-int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_batch_equals_one_by_one(family_models, arch, backend):
    """Prompts of different lengths in one batch; for Phi-3 one row is past original_max_position_embeddings
    and the others not, each with its own LongRoPE factors."""
    engine = pyengine.load(family_models[arch], backend=backend)
    prompts = ["Once upon a time", LONG_PROMPT, "Energy"]
    singles = [engine.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    batched = [r.token_ids for r in engine.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    assert batched == singles


@pytest.mark.parametrize("backend", ["torch", "fused", "fused-int8"])
def test_scheduler_greedy_alone_and_joined_mid_flight(family_models, backend):
    import random

    from test_scheduler import LONG_PROMPTS, _joined_mid_flight

    engine = pyengine.load(family_models["gemma3"], backend=backend, progress=False, max_batch=4, prefill_chunk=5)
    try:
        rng = random.Random(f"gemma3{backend}")
        prompts = rng.sample(LONG_PROMPTS, 4)
        alone = [engine.generate(p, max_new_tokens=24, ignore_eos=True) for p in prompts]
        driver_alone = engine.generate(prompts[0], max_new_tokens=40, ignore_eos=True).text
        steps = []
        engine.scheduler.on_step = lambda kind, seconds, reqs: steps.append((kind, list(reqs)))
        joined = _joined_mid_flight(engine, prompts, 24, rng)
        assert joined[0] == driver_alone
        for a, j in zip(alone[1:], joined[1:]):
            assert not isinstance(j, Exception), j
            assert j.token_ids == a.token_ids
        assert max(len(ids) for kind, ids in steps if kind == "decode") > 1, "no request ever shared a step"
    finally:
        engine.close()


def test_llama_with_linear_rope_scaling_matches_transformers(tmp_path):
    """Linear rope scaling (Gemma 3's full layers) read for the Llama family too, as transformers does."""
    fields = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    folder = make_family_model(tmp_path / "llama-linear", "llama-linear", fields=fields)
    engine = pyengine.load(folder, backend="fused")
    assert engine.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    torch.manual_seed(1)
    ids = torch.randint(0, 384, (2, 50))
    with torch.no_grad():
        ref = hf_model(folder)(ids).logits
    assert_logits_close(engine.logits(ids), ref)
    prompt = "The capital of France is"
    assert engine.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids == \
        hf_greedy(folder, engine.tokenizer.encode(prompt), 24)


def _config(family_models, name, **changes):
    raw = json.loads((family_models[name] / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("name, changes, message", [
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention is not supported"),
    ("gemma3", dict(hidden_activation="silu"), "unsupported Gemma 3 hidden_activation 'silu'"),
    ("gemma3", dict(final_logit_softcapping=-1.0), "final_logit_softcapping must be a positive number"),
    ("gemma3", dict(query_pre_attn_scalar=0), "query_pre_attn_scalar must be a positive number"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "unsupported rope scaling type 'yarn'"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "on the sliding layers"),
    ("qwen3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "unsupported rope scaling type 'longrope'"),
    ("qwen3", dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    ("phi3", dict(partial_rotary_factor=0.75), "partial_rotary_factor"),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
                  rope_scaling=None), "partial_rotary_factor"),
    ("phi3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8},
                  rope_parameters=None), "short_factor must list 8 positive numbers"),
    ("phi3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
                  rope_parameters=None, original_max_position_embeddings=None), "original_max_position_embeddings"),
    ("phi3", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_parameters=None),
     "unsupported rope scaling type 'llama3'"),
])
def test_config_refuses_what_it_cannot_run(family_models, name, changes, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf(_config(family_models, name, **changes))


def test_gemma3_layer_types_from_the_older_pattern(family_models):
    """Without layer_types, every sliding_window_pattern-th layer is full (transformers' default 6); the
    sliding layers keep their local rotary base even where the window covers the whole context."""
    cfg = ModelConfig.from_hf(_config(family_models, "gemma3", layer_types=None, _sliding_window_pattern=None,
                                      sliding_window_pattern=2))
    assert cfg.layer_windows == (12, 0, 12, 0) and cfg.local_rope_layers == (0, 2)
    cfg = ModelConfig.from_hf(_config(family_models, "gemma3", layer_types=None, _sliding_window_pattern=None,
                                      sliding_window=512))
    assert cfg.layer_windows == () and cfg.local_rope_layers == (0, 1, 2, 3)  # 4 layers: none is the 6th
    with pytest.raises(CheckpointError, match="sliding_window_pattern must be a positive integer"):
        ModelConfig.from_hf(_config(family_models, "gemma3", layer_types=None, sliding_window_pattern=0))


def test_config_says_what_it_does_not_apply(family_models):
    """transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it."""
    cfg = ModelConfig.from_hf(_config(family_models, "gemma3", attn_logit_softcapping=50.0))
    assert any("attn_logit_softcapping" in note for note in cfg.notes)
