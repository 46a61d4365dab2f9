"""A llama-architecture GGUF file -> a Hugging Face folder (fp32 safetensors, config, tokenizer).

Only the ``gguf`` package (reading and dequantizing) and ``tokenizers`` (the byte-level BPE
tokenizer) are used: transformers' own GGUF loader is an optional path whose dependencies have
changed between releases, so the default model is not built through it.

What the conversion undoes:

* quantization: every tensor is dequantized to fp32 with ``gguf.quants.dequantize``;
* llama.cpp's row order of ``attn_q`` / ``attn_k``: its converter interleaves the two rotary halves
  of each head (rows ``0, d/2, 1, d/2+1, ...``); HF keeps them as two halves, so the rows are put back;
* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on.

The tokenizer is rebuilt from the file's vocabulary, merges and token types: GPT-2's byte-level BPE
(pre-tokenizer regex and byte alphabet), the control tokens as special added tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["GGUFConversionError", "convert_llama_gguf", "read_llama_config"]


class GGUFConversionError(RuntimeError):
    """The GGUF file is not one this converter can turn into an HF folder."""


# GGUF tensor names (per layer, after "blk.N.") -> HF names (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF token types (llama.cpp's enum): 3 = control, 4 = user-defined. Both become added tokens.
_CONTROL, _USER_DEFINED = 3, 4


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFConversionError(f"the GGUF file has no {key!r} entry")
        return default
    return field.contents()


def read_llama_config(reader) -> dict:
    """The HF ``config.json`` of a llama-architecture GGUF file (``reader``: a ``gguf.GGUFReader``)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"architecture {arch!r} is not supported here (only 'llama')")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    if "llama.rope.scaling.type" in reader.fields:
        raise GGUFConversionError("rope scaling in a GGUF file is not supported by this converter")
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
    rope_theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        # GGUF stores eps as float32 (9.9999997e-06 for 1e-05): six significant digits give back the
        # value the model was released with.
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": rope_theta,  # read by transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                   _field(reader, "tokenizer.ggml.eos_token_id"))),
        "unk_token_id": int(_field(reader, "tokenizer.ggml.unknown_token_id", 0)),
        "torch_dtype": "float32",  # transformers < 4.56 reads this key,
        "dtype": "float32",  # newer ones this one
    }


def _unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the two rotary halves (rows of q_proj / k_proj)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
        return f"model.layers.{int(layer)}.{_LAYER_TENSORS[suffix]}"
    raise GGUFConversionError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def read_llama_weights(reader, config: dict) -> dict:
    """HF-named fp32 torch tensors of a llama GGUF file, dequantized and in HF's row order."""
    import torch
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        if w.shape != expected:
            raise GGUFConversionError(f"{tensor.name}: dequantized to {w.shape}, expected {expected}")
        if name.endswith("q_proj.weight"):
            w = _unpermute_rotary_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rotary_rows(w, config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: F32 data is mapped
    return state


def build_tokenizer(reader):
    """The byte-level BPE ``tokenizers.Tokenizer`` described by a GGUF file's ``tokenizer.ggml.*``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(f"tokenizer model {kind!r} is not supported here (only 'gpt2', byte-level BPE)")
    if _field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise GGUFConversionError("a byte-level tokenizer that adds a space prefix is not supported here")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    if len(types) != len(tokens) or any(len(m) != 2 for m in merges):
        raise GGUFConversionError("the GGUF tokenizer's tokens, token types or merges are malformed")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    # No BOS is added (tokenizer.ggml.add_bos_token is false for the models converted here).
    if _field(reader, "tokenizer.ggml.add_bos_token", False):
        raise GGUFConversionError("a tokenizer that adds a BOS token is not supported here")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tokenizer.add_special_tokens([
        AddedToken(tokens[i], single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)
    ])
    return tokenizer


def convert_llama_gguf(gguf_path: str | Path, out: str | Path) -> dict:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32),
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out``.

    Returns the config. The tied ``lm_head`` is not written (HF ties it to the embedding)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    out = Path(out)
    reader = GGUFReader(str(gguf_path))
    config = read_llama_config(reader)

    state = read_llama_weights(reader, config)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    })

    tokenizer = build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    special = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
        "unk_token": tokens[config["unk_token_id"]],
    }
    added = [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items())]
    _write_json(out / "special_tokens_map.json", {**special, "additional_special_tokens": added})
    tokenizer_config = {
        **special,
        "tokenizer_class": "GPT2Tokenizer",  # readable by transformers 4.x and 5.x
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    chat_template = _field(reader, "tokenizer.chat_template", "")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return config


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
