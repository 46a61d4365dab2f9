"""Model configuration: the fields of a Hugging Face config.json that the engine needs, checked."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pyengine.errors import CheckpointError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("gpt2",)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as in config.json: llama, mistral, qwen2, gpt2
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_context: int  # positions the model can attend over
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v (and o for Llama's attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3 parameters, or None
    sliding_window: int | None = None  # a windowed layer's token attends only the last sliding_window positions
    layer_windows: tuple[int, ...] = ()  # per layer: its window (0: full attention); () when no layer has one
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())  # anything the loader simplified, said out loud

    @property
    def arch(self) -> str:
        """The model file that runs it: 'llama' for the whole Llama family, else 'gpt2'."""
        return "llama" if self.model_type in LLAMA_FAMILY else self.model_type

    @classmethod
    def from_hf(cls, raw: dict, source: Path | str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                source, f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(*names, default=None):
            for name in names:
                if raw.get(name) is not None:
                    return raw[name]
            if default is not None:
                return default
            raise CheckpointError(source, f"missing field {names[0]!r}")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        notes = []
        if model_type == "gpt2":
            hidden = need("n_embd", "hidden_size")
            heads = need("n_head", "num_attention_heads")
            if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
                raise CheckpointError(source, "GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                                              "reorder_and_upcast_attn are not supported")
            activation = raw.get("activation_function", "gelu_new")
            if activation not in ("gelu_new", "gelu_pytorch_tanh"):
                raise CheckpointError(source, f"unsupported GPT-2 activation_function {activation!r}")
            config = dict(
                vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("n_layer", "num_hidden_layers"),
                num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                intermediate_size=raw.get("n_inner") or 4 * hidden,
                norm_eps=need("layer_norm_epsilon", default=1e-5),
                max_context=need("n_positions", "max_position_embeddings"),
                tie_word_embeddings=raw.get("tie_word_embeddings", True), attention_bias=True, o_bias=True,
                mlp_bias=True,
            )
        else:
            hidden = need("hidden_size")
            heads = need("num_attention_heads")
            max_context = need("max_position_embeddings")
            sliding_window, layer_windows = _sliding_windows(raw, model_type, need("num_hidden_layers"),
                                                             max_context, source)
            rope_theta, rope_scaling = _rope_parameters(raw, source)
            qkv_bias = model_type == "qwen2" or bool(raw.get("attention_bias", False))
            config = dict(
                vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
                num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or hidden // heads,
                intermediate_size=need("intermediate_size"), norm_eps=need("rms_norm_eps", default=1e-6),
                max_context=max_context, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=qkv_bias, o_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)), rope_theta=rope_theta, rope_scaling=rope_scaling,
                sliding_window=sliding_window, layer_windows=layer_windows,
            )
            act = raw.get("hidden_act", "silu")
            if act != "silu":
                raise CheckpointError(source, f"unsupported hidden_act {act!r} (only silu)")
        cfg = cls(model_type=model_type, bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
                  notes=tuple(notes), **config)
        cfg._validate(source)
        return cfg

    def _validate(self, source):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(source, f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(source, f"num_attention_heads ({self.num_heads}) is not a multiple of "
                                          f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise CheckpointError(source, f"head_dim must be even for rotary embeddings, got {self.head_dim}")


def _sliding_windows(raw: dict, model_type: str, num_layers: int, max_context: int, source):
    """(sliding_window, layer_windows): which layers attend through a sliding window, as transformers
    reads the config. Mistral: every layer. Qwen2 with use_sliding_window: the layers named
    "sliding_attention" in layer_types, or else those from max_window_layers on. A window that covers
    the whole context is no window."""
    window = raw.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise CheckpointError(source, f"sliding_window must be a positive integer or null, got {window!r}")
    if window is None or window >= max_context:
        return None, ()
    if model_type == "mistral":
        windowed = [True] * num_layers
    elif model_type == "qwen2" and raw.get("use_sliding_window", False):
        types = raw.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or len(types) != num_layers or \
                    not set(types) <= {"full_attention", "sliding_attention"}:
                raise CheckpointError(source, "layer_types must list 'full_attention' or 'sliding_attention' "
                                              f"for each of the {num_layers} layers, got {types!r}")
            windowed = [t == "sliding_attention" for t in types]
        else:
            first = raw.get("max_window_layers", 28)  # transformers' Qwen2Config default
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                raise CheckpointError(source, f"max_window_layers must be a non-negative integer, got {first!r}")
            windowed = [i >= first for i in range(num_layers)]
    else:
        return None, ()
    if not any(windowed):
        return None, ()
    return window, tuple(window if w else 0 for w in windowed)


def _rope_parameters(raw: dict, source) -> tuple[float, dict | None]:
    """rope_theta and Llama-3 scaling from either transformers 4's or 5's config layout."""
    params = raw.get("rope_parameters")  # transformers 5
    if isinstance(params, dict) and "rope_theta" not in params and params:
        # Per-layer-type layout ({"full_attention": {...}}): these models use one kind.
        params = next(iter(params.values()))
    scaling = raw.get("rope_scaling") or (params if isinstance(params, dict) else None)
    theta = (params or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(source, f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CheckpointError(source, f"llama3 rope scaling is missing {', '.join(missing)}")
    return float(theta), {k: float(scaling[k]) for k in keys}


def rope_inverse_frequencies(config: ModelConfig):
    """Per-pair rotation frequencies, as transformers computes them (fp32), with Llama 3 scaling."""
    import torch

    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
