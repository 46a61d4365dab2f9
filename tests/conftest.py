"""Shared fixtures: tiny random-weight models of each architecture, saved in HF format by
transformers itself, so every test goes through the real loading path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyengine import _C

# Every dispatch level the kernels have, lowest first: the C++ table (csrc/cpu/isa_levels.h);
# ops.supported_isas() lists only this CPU's.
ALL_ISAS = tuple(_C.isa_levels())


def isa_params() -> list:
    """Params for an ISA fixture or parametrize: every level, those this CPU lacks skipped with a
    reason naming them (so a report shows which paths did not run, instead of dropping them)."""
    from pyengine.kernels import ops

    supported = ops.supported_isas()
    return [pytest.param(name, marks=pytest.mark.skipif(
                name not in supported, reason=f"this CPU has no {name} path (detected: {ops.detected_isa()})"))
            for name in ALL_ISAS]


# One tiny config per supported architecture; small enough that a forward pass takes milliseconds.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-scaled": dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                          max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                          tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", vocab_size=384, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    max_position_embeddings=256, sliding_window=16, rms_norm_eps=1e-5),
    "qwen2": dict(model_type="qwen2", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, use_sliding_window=False),
    # Qwen2's sliding window on the layers from max_window_layers on: layer 0 full, layer 1 windowed.
    "qwen2-window": dict(model_type="qwen2", vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         use_sliding_window=True, sliding_window=12, max_window_layers=1),
    "gpt2": dict(model_type="gpt2", vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # q/k norm per head, a head_dim that is not hidden / heads, GQA, a window on layers 1 and 2.
    "qwen3": dict(model_type="qwen3", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=True, sliding_window=12,
                  max_window_layers=1),
    # sliding layers (window 12) with their own rotary base, a full layer with linear-scaled rope, GQA,
    # query_pre_attn_scalar unlike head_dim, final logit soft-capping tight enough to bite.
    "gemma3": dict(model_type="gemma3_text", vocab_size=384, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=256, rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=12,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
                   final_logit_softcapping=0.5, pad_token_id=0),
    # Phi-3 without LongRoPE (as the 4k-context checkpoints): fused qkv_proj / gate_up_proj, a window.
    "phi3": dict(model_type="phi3", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=24,
                 rms_norm_eps=1e-5, pad_token_id=0),
}


def _byte_level_tokenizer(folder: Path, vocab_size: int):
    """A real byte-level BPE tokenizer trained on a few sentences, sized to the model's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
            "Energy per token is measured in joules; int8 weights are a quarter of fp32.",
            "Once upon a time there was a small language model that liked numbers 0123456789."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))


def make_tiny_model(folder: Path, name: str, seed: int = 0, fields: dict | None = None) -> Path:
    """A tiny random checkpoint saved by transformers: TINY_CONFIGS[name], or `fields` where given."""
    import transformers

    fields = dict(fields or TINY_CONFIGS[name])
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=2, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger-than-init weights, so differences between implementations show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    _byte_level_tokenizer(folder, config.vocab_size)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make_tiny_model(root / name, name) for name in TINY_CONFIGS}


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]
