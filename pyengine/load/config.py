"""Model configuration: the fields of a Hugging Face config.json that the engine needs, checked."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pyengine.errors import CheckpointError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# Llama-like families with their own model file (models/qwen3.py, gemma3.py, phi3.py): model_type -> arch
LLAMA_LIKE = {"qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + tuple(LLAMA_LIKE) + ("gpt2",)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as in config.json: llama, mistral, qwen2, qwen3, gemma3_text, phi3, gpt2
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
    rope_scaling: dict | None = None  # Llama 3 parameters, {"rope_type": "linear" | "longrope", ...}, or None
    sliding_window: int | None = None  # a windowed layer's token attends only the last sliding_window positions
    layer_windows: tuple[int, ...] = ()  # per layer: its window (0: full attention); () when no layer has one
    # What Llama-like families change (the defaults are Llama's):
    qk_norm: bool = False  # RMSNorm over each query and key head before the rotation (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm on each sub-block's output too, before the residual add (Gemma 3)
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    norm_offset: float = 0.0  # added to every RMSNorm weight at load (Gemma's x * (1 + w))
    attn_scale: float | None = None  # attention's score scale; None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # the sliding-window layers' own rotary base (Gemma 3), unscaled
    local_rope_layers: tuple[int, ...] = ()  # the layers rotated with local_rope_theta (Gemma 3's sliding ones)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())  # anything the loader simplified, said out loud

    @property
    def arch(self) -> str:
        """The model file that runs it: 'llama' for the Llama family, a Llama-like family's own, or 'gpt2'."""
        return "llama" if self.model_type in LLAMA_FAMILY else LLAMA_LIKE.get(self.model_type, self.model_type)

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
            head_dim = raw.get("head_dim") or hidden // heads
            if model_type == "gemma3_text":
                rope_theta, rope_scaling, local_theta = _gemma3_rope(raw, source)
                # By layer type, also where the window covers the whole context (then no window).
                local_layers = tuple(i for i, w in enumerate(_windowed_layers(raw, model_type, need("num_hidden_layers"),
                                                                               source)) if w)
            else:
                rope_theta, rope_scaling = _rope_parameters(raw, source, longrope=model_type == "phi3",
                                                            head_dim=head_dim, max_context=max_context)
                local_theta, local_layers = None, ()
            # Qwen2 always has q/k/v bias; Phi-3 never has any; the others as attention_bias says (o too).
            bias = model_type != "phi3" and bool(raw.get("attention_bias", False))
            config = dict(
                vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
                num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
                intermediate_size=need("intermediate_size"), norm_eps=need("rms_norm_eps", default=1e-6),
                max_context=max_context, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bias, o_bias=bias and model_type in ("llama", "qwen3", "gemma3_text"),
                mlp_bias=bool(raw.get("mlp_bias", False)), rope_theta=rope_theta, rope_scaling=rope_scaling,
                sliding_window=sliding_window, layer_windows=layer_windows, local_rope_theta=local_theta,
                local_rope_layers=local_layers,
                **_family_fields(raw, model_type, hidden, source, notes),
            )
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


def _family_fields(raw: dict, model_type: str, hidden: int, source, notes: list) -> dict:
    """What a Llama-like family changes from Llama (ModelConfig's qk_norm ... final_logit_softcap); a
    setting the engine cannot run is refused here, not ignored."""
    if model_type == "gemma3_text":
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise CheckpointError(source, f"unsupported Gemma 3 hidden_activation {act!r} (only gelu_pytorch_tanh)")
        if raw.get("use_bidirectional_attention"):
            raise CheckpointError(source, "Gemma 3 with use_bidirectional_attention is not supported (causal only)")
        if raw.get("attn_logit_softcapping") is not None:
            # transformers' Gemma 3 keeps the field but never passes it to its attention: neither do we.
            notes.append("attn_logit_softcapping is not applied (transformers' Gemma 3 does not apply it either)")
        cap = raw.get("final_logit_softcapping")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
            raise CheckpointError(source, f"final_logit_softcapping must be a positive number or null, got {cap!r}")
        scalar = raw.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise CheckpointError(source, f"query_pre_attn_scalar must be a positive number, got {scalar!r}")
        return dict(qk_norm=True, sandwich_norms=True, activation="gelu_tanh", embed_scale=hidden ** 0.5,
                    norm_offset=1.0, attn_scale=scalar ** -0.5,
                    final_logit_softcap=None if cap is None else float(cap))
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(source, f"unsupported hidden_act {act!r} (only silu)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    partial = raw.get("partial_rotary_factor") or (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
    if model_type == "phi3" and (partial or 1.0) != 1.0:
        raise CheckpointError(source, "Phi-3 with partial_rotary_factor != 1 (rotation of part of each head) "
                                      "is not supported")
    return dict(qk_norm=model_type == "qwen3")


def _sliding_windows(raw: dict, model_type: str, num_layers: int, max_context: int, source):
    """(sliding_window, layer_windows): which layers attend through a sliding window, as transformers
    reads the config. Mistral, Phi-3: every layer. Qwen2/Qwen3 with use_sliding_window, and Gemma 3
    always: the layers named "sliding_attention" in layer_types, or else (Qwen) those from
    max_window_layers on, (Gemma 3) all but every sliding_window_pattern-th. A window that covers the
    whole context is no window."""
    window = raw.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise CheckpointError(source, f"sliding_window must be a positive integer or null, got {window!r}")
    if window is None or window >= max_context:
        return None, ()
    windowed = _windowed_layers(raw, model_type, num_layers, source)
    if not any(windowed):
        return None, ()
    return window, tuple(window if w else 0 for w in windowed)


def _windowed_layers(raw: dict, model_type: str, num_layers: int, source) -> list[bool]:
    """Per layer: whether the family's config makes it a sliding-window layer (see _sliding_windows)."""
    if model_type in ("mistral", "phi3"):
        windowed = [True] * num_layers
    elif model_type == "gemma3_text" or (model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window", False)):
        types = raw.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or len(types) != num_layers or \
                    not set(types) <= {"full_attention", "sliding_attention"}:
                raise CheckpointError(source, "layer_types must list 'full_attention' or 'sliding_attention' "
                                              f"for each of the {num_layers} layers, got {types!r}")
            windowed = [t == "sliding_attention" for t in types]
        elif model_type == "gemma3_text":  # transformers' default: every 6th layer full, the others windowed
            pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise CheckpointError(source, f"sliding_window_pattern must be a positive integer, got {pattern!r}")
            windowed = [bool((i + 1) % pattern) for i in range(num_layers)]
        else:
            first = raw.get("max_window_layers", 28)  # transformers' Qwen2Config default
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                raise CheckpointError(source, f"max_window_layers must be a non-negative integer, got {first!r}")
            windowed = [i >= first for i in range(num_layers)]
    else:
        windowed = [False] * num_layers
    return windowed


def _rope_parameters(raw: dict, source, longrope: bool = False, head_dim: int = 0,
                     max_context: int = 0) -> tuple[float, dict | None]:
    """rope_theta and scaling (Llama 3; LongRoPE where `longrope`) from transformers 4's or 5's layout."""
    params = raw.get("rope_parameters")  # transformers 5
    if isinstance(params, dict) and "rope_theta" not in params and params:
        # Per-layer-type layout ({"full_attention": {...}}): these models use one kind.
        params = next(iter(params.values()))
    scaling = raw.get("rope_scaling") or (params if isinstance(params, dict) else None)
    theta = (params or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta), _rope_scaling(scaling, source, longrope, head_dim, max_context,
                                       raw.get("original_max_position_embeddings"))


def _rope_scaling(scaling: dict | None, source, longrope: bool = False, head_dim: int = 0, max_context: int = 0,
                  original_max: int | None = None) -> dict | None:
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("su", "yarn") and longrope:
        rope_type = "longrope"  # Phi3Config renames these
    if rope_type in (None, "default"):
        return None
    if rope_type == "longrope" and longrope:
        return _longrope(scaling, source, head_dim, max_context, original_max)
    if rope_type == "linear" and not longrope:
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(source, f"linear rope scaling needs a positive factor, got {factor!r}")
        return {"rope_type": "linear", "factor": float(factor)}
    if rope_type != "llama3" or longrope:
        supported = "default, longrope" if longrope else "default, llama3, linear"
        raise CheckpointError(source, f"unsupported rope scaling type {rope_type!r} (supported: {supported})")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CheckpointError(source, f"llama3 rope scaling is missing {', '.join(missing)}")
    return {k: float(scaling[k]) for k in keys}


def _longrope(scaling: dict, source, head_dim: int, max_context: int, original_max: int | None) -> dict:
    """Phi-3's LongRoPE, as transformers reads it: the config's top-level original_max_position_embeddings
    wins over the scaling dict's; attention_factor defaults to sqrt(1 + ln(factor) / ln(original)) with
    factor = max_position_embeddings / original when not given."""
    original = original_max if original_max is not None else scaling.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise CheckpointError(source, f"longrope needs original_max_position_embeddings, a positive integer, "
                                      f"got {original!r}")
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = scaling.get(name)
        if not isinstance(values, list) or len(values) != head_dim // 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise CheckpointError(source, f"longrope {name} must list {head_dim // 2} positive numbers "
                                          f"(one per rotary pair), got {values!r}")
        factors[name] = tuple(float(v) for v in values)
    factor = scaling.get("factor") or max_context / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "attention_factor": float(attention_factor), **factors}


def _gemma3_rope(raw: dict, source) -> tuple[float, dict | None, float]:
    """Gemma 3's two rotary tables: (global theta, global scaling, local theta) from transformers 5's
    per-layer-type rope_parameters or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = raw.get("rope_parameters") or {}
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise CheckpointError(source, f"unsupported rope scaling type {local['rope_type']!r} on the sliding "
                                      "layers (supported: default)")
    theta = full.get("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    scaling = raw.get("rope_scaling") or full
    return float(theta), _rope_scaling(scaling, source), float(local_theta)


def rope_inverse_frequencies(config: ModelConfig, theta: float | None = None, scaling: dict | None = None,
                             long: bool = False):
    """Per-pair rotation frequencies, as transformers computes them (fp32): base `theta` (default the
    config's rope_theta) with `scaling` (default the config's: Llama 3, linear, or LongRoPE's short
    factors, its long ones where `long`)."""
    import torch

    dim = config.head_dim
    theta = config.rope_theta if theta is None else theta
    s = config.rope_scaling if scaling is None else scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if s is not None and s.get("rope_type") == "longrope":
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if not s:
        return inv_freq
    if s.get("rope_type") == "linear":
        return inv_freq / s["factor"]
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
