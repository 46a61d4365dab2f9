"""Backends: the handful of ops a decoder layer needs, in one class per implementation.

  torch       plain PyTorch, written for reading; the reference every other backend is tested against
  fused       our C++ kernels (attention, norms, rope, activations) with fp32 weights
  fused-int8  as fused, with int8 weights (per-channel scales) dequantized inside the matmul
  fused-bf16  as fused, with the linears' weights kept in bf16 (a bf16 checkpoint's own values), fp32 sums

A model file (models/llama.py, models/gpt2.py) calls only these methods, so switching backends never
touches the model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Step:
    """What one forward call processes, shared by every layer of that call."""

    q_start: torch.Tensor  # [batch] int32: position of each sequence's first new token
    kv_len: torch.Tensor  # [batch] int32: valid cache entries once this step's keys are written
    positions: torch.Tensor  # [batch, n_new] int64
    uniform_start: int | None  # the common q_start when all sequences start at the same position
    rope_cos: torch.Tensor | None  # [positions, head_dim / 2] rotary tables (None: no rotary embedding)
    rope_sin: torch.Tensor | None
    cache: dict = field(default_factory=dict)  # per-step values a backend computes once (masks, gathers)

    def cached(self, key, make):
        """A value computed once per step and shared by every layer."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = make()
        return value


@dataclass
class LinearWeights:
    weight: torch.Tensor  # [out_features, in_features]
    bias: torch.Tensor | None = None


class TorchBackend:
    name = "torch"
    devices = ("cpu", "cuda")
    weight_precision = None  # the model's dtype (fp32, fp16 or bf16)

    dtype = torch.float32  # the model's; make_backend sets it

    def check_dtype(self, dtype: torch.dtype) -> None:
        pass  # plain torch runs every float dtype

    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, name: str | None = None):
        """The backend's form of a linear layer; `weight` may come in the checkpoint's own dtype.
        `name`: the layer's checkpoint tensor name without ".weight" (a fused projection's own name,
        e.g. "model.layers.3.self_attn.qkv_proj"): int8 weight files are keyed by it."""
        return LinearWeights(weight.to(self.dtype).contiguous(), bias)

    def tied_embedding(self, lm_head, embed: torch.Tensor) -> torch.Tensor:
        """The embedding table a model keeps when its output projection is tied to it: the prepared
        projection's own weight where it holds the same values (one copy in memory, not two)."""
        weight = getattr(lm_head, "weight", None)
        same = weight is not None and weight.dtype == embed.dtype and weight.shape == embed.shape
        return weight if same else embed

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        return F.linear(x, w.weight, w.bias)

    def rms_norm(self, x, weight, eps):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def add_rms_norm(self, residual, delta, weight, eps):
        """residual += delta in place; returns the normalized sum."""
        residual.add_(delta)
        return self.rms_norm(residual, weight, eps)

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add_layer_norm(self, residual, delta, weight, bias, eps):
        residual.add_(delta)
        return self.layer_norm(residual, weight, bias, eps)

    def rope(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Rotate (x[..., i], x[..., i + D/2]) pairs by each position's angles (Llama's half split)."""
        cos, sin = step.cached("rope", lambda: (step.rope_cos[step.positions][:, :, None, :].to(x.dtype),
                                               step.rope_sin[step.positions][:, :, None, :].to(x.dtype)))
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def attention(self, q, k_cache, v_cache, step: Step, scale: float, window: int = 0) -> torch.Tensor:
        """q: [B, T, Hq, D]; caches: [B, Hkv, S, D]. Query t of sequence b sees keys
        j <= q_start[b] + t and j < kv_len[b] (and j > q_start[b] + t - window with a sliding
        window, window > 0). Returns [B, T, Hq, D]."""
        longest = int(step.kv_len.max())
        keys, values = k_cache[:, :, :longest], v_cache[:, :, :longest]

        def visible():
            j = torch.arange(longest, device=q.device)
            query_pos = step.positions[:, None, :, None]  # [B, 1, T, 1]
            seen = (j <= query_pos) & (j < step.kv_len[:, None, None, None])
            if window:
                # As the C++ kernel: a padding query past kv_len + window keeps key kv_len - 1 (its
                # output is unused, but must not be NaN).
                back = torch.minimum(query_pos - window, step.kv_len[:, None, None, None] - 2)
                seen &= j > back
            return seen

        mask = step.cached(("mask", window), visible)  # once per step and window, shared by the layers
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[2] != keys.shape[1])
        return out.transpose(1, 2)

    def silu_mul(self, gate, up):
        return F.silu(gate) * up

    def gelu(self, x):
        return F.gelu(x, approximate="tanh")

    def embedding(self, ids, table):
        return F.embedding(ids, table)

    def make_llama_decoder(self, model):
        """An object whose step() runs a whole Llama decode step in one call, or None: this backend
        runs the layers op by op."""
        return None

    def make_gpt2_decoder(self, model):
        """As make_llama_decoder, for GPT-2."""
        return None


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with contiguous rows: a view where the layout allows, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    rows_ok = rows.is_contiguous() or (rows.stride(1) == 1 and rows.stride(0) >= rows.shape[1])
    return rows if rows_ok else rows.contiguous()


class FusedBackend(TorchBackend):
    """Our C++ kernels for the linear layers, attention, norms, rotary embedding and activations; fp32
    weights. Linears: `_C.linear_f32`, a streaming GEMV for decode and a packed-panel GEMM for
    prefill (faster than torch's `F.linear` on the default model's shapes).

    Calls the raw bindings (pyengine._C) rather than the torch.library ops: the same kernels, without
    the dispatcher's per-call cost, which adds up over hundreds of calls per decode step.
    """

    name = "fused"
    devices = ("cpu",)
    weight_precision = "fp32"
    kernels = ("linear_f32", "attention", "rope", "silu_mul", "gelu", "layer_norm", "add_layer_norm", "embedding",
               "rms_norm")

    def __init__(self):
        from pyengine import _C
        from pyengine.memory import WeightArena

        self._C = _C
        self.arena = WeightArena()  # the linears' weights, on 2 MB pages where the OS gives them
        self.linears: dict[str, object] = {}  # prepared linears by name (save_int8)

    def _keep(self, name, lin):
        if name is None:
            raise ValueError(f"backend {self.name!r}: prepare_linear needs the layer's name (name=...)")
        if name in self.linears:
            raise ValueError(f"backend {self.name!r}: two linear layers are named {name!r}")
        self.linears[name] = lin
        return lin

    def prepare_linear(self, weight, bias=None, *, name=None):
        return self._keep(name, LinearWeights(self.arena.copy(weight, torch.float32), bias))

    def check_dtype(self, dtype):
        if dtype != torch.float32:
            raise ValueError(f"backend {self.name!r} runs fp32 on the CPU, got dtype {dtype}")

    def linear(self, x, w):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(rows.shape[0], w.weight.shape[0], dtype=torch.float32)
        self._C.linear_f32(rows, w.weight, out, w.bias)
        return out.view(*x.shape[:-1], w.weight.shape[0])

    def rms_norm(self, x, weight, eps):
        out = torch.empty_like(x)
        self._C.rms_norm(x, weight, out, eps)
        return out

    def add_rms_norm(self, residual, delta, weight, eps):
        out = torch.empty_like(residual)
        self._C.add_rms_norm(residual, delta.contiguous(), weight, out, eps)
        return out

    def layer_norm(self, x, weight, bias, eps):
        out = torch.empty_like(x)
        self._C.layer_norm(x, weight, bias, out, eps)
        return out

    def add_layer_norm(self, residual, delta, weight, bias, eps):
        out = torch.empty_like(residual)
        self._C.add_layer_norm(residual, delta.contiguous(), weight, bias, out, eps)
        return out

    def rope(self, x, step):
        x = x.contiguous()
        positions = step.cached("positions_i32", lambda: step.positions.to(torch.int32))
        self._C.rope(x, step.rope_cos, step.rope_sin, positions, False)
        return x

    def attention(self, q, k_cache, v_cache, step, scale, window=0):
        out = torch.empty(q.shape, dtype=q.dtype)
        self._C.attention(q.contiguous(), k_cache, v_cache, out, step.q_start, step.kv_len, scale, window)
        return out

    def silu_mul(self, gate, up):
        # As rows: the gate and up halves of a fused projection are then strided views, read in place.
        gate_rows, up_rows = _as_rows(gate), _as_rows(up)
        out = torch.empty(gate_rows.shape, dtype=gate.dtype)
        self._C.silu_mul(gate_rows, up_rows, out)
        return out.view(gate.shape)

    def gelu(self, x):
        out = torch.empty_like(x)
        self._C.gelu(x.contiguous(), out)
        return out

    def embedding(self, ids, table):
        out = torch.empty(ids.shape + (table.shape[1],), dtype=table.dtype)
        self._C.embedding(ids.reshape(-1).contiguous(), table, out.view(-1, table.shape[1]))
        return out

    def make_llama_decoder(self, model):
        """The C++ decode step (_C.LlamaDecoder) over the model's own weights: per token one call instead
        of ~15 Python op calls per layer. Its linears are this backend's (fp32, bf16 or int8) weights."""
        if not self._cpp_decodable(model):
            return None
        c = model.config
        return self._C.LlamaDecoder(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim, intermediate_size=c.intermediate_size, norm_eps=c.norm_eps,
            embed=model.embed, final_norm=model.final_norm, lm_head=model.lm_head, layers=model.layers)

    def make_gpt2_decoder(self, model):
        """The C++ decode step of GPT-2 (_C.Gpt2Decoder), as make_llama_decoder."""
        if not self._cpp_decodable(model):
            return None
        c = model.config
        return self._C.Gpt2Decoder(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_heads=c.num_heads,
            intermediate_size=c.intermediate_size, max_positions=model.positions.shape[0], norm_eps=c.norm_eps,
            embed=model.embed, positions=model.positions, final_norm=model.final_norm, lm_head=model.lm_head,
            layers=model.layers)

    @staticmethod
    def _cpp_decodable(model) -> bool:
        return model.device.type == "cpu" and model.embed.dtype == torch.float32


class FusedInt8Backend(FusedBackend):
    """As fused, with every linear layer (the tied output projection too) in int8: weights
    quantized per output channel at load time.

    Every Linear is W8A16 (`_C.int8_linear_a16`): activations quantized to int16 per row, exact
    int16 x int8 sums, so a row's output is the same bits whichever rows share the call (prefill,
    decode, a batch) and the C++ decode step (LlamaDecoder) matches this path bit for bit.
    Decode (up to 16 rows): a GEMV that streams the int8 weights once. Prefill: a packed-panel GEMM
    on int16 pairs (`vpmaddwd`), faster than the fp32 FMA GEMM that the weight-only kernel
    (`_C.int8_linear_wo`, kept for comparison) feeds with dequantized panels.
    Chosen over W8A8 (int8 activations too, `_C.int8_linear`) for quality: int8 activations lost
    several times the perplexity and KL of 16-bit ones, which stay next to the weight-only result.
    """

    name = "fused-int8"
    weight_precision = "int8"
    kernels = FusedBackend.kernels + ("int8_linear_a16",)

    def __init__(self, preloaded: dict | None = None):
        """preloaded: int8 linears by layer name (pyengine.quant.load_int8, pyengine.gptq), used
        instead of rounding the checkpoint's weights."""
        super().__init__()
        if preloaded is not None and not isinstance(preloaded, dict):
            raise TypeError(f"preloaded must be a dict of int8 linears by layer name, got {type(preloaded).__name__}")
        self._preloaded = dict(preloaded) if preloaded is not None else None

    def prepare_linear(self, weight, bias=None, *, name=None):
        from pyengine.quant import Int8Linear, quantize_per_channel

        if self._preloaded is not None:
            lin = self._preloaded.pop(name, None)
            if lin is None:
                raise ValueError(f"the int8 weights have no linear layer {name!r}, which this model needs")
            if lin.shape != tuple(weight.shape):
                raise ValueError(f"the int8 weights' linear layer {name!r} has shape {lin.shape}, "
                                 f"the model needs {tuple(weight.shape)}")
            lin = Int8Linear(self.arena.copy(lin.qweight), self.arena.copy(lin.scale), lin.bias)
        else:  # rounded straight into the arena, a chunk of rows at a time
            placed = (self.arena.empty(weight.shape, torch.int8), self.arena.empty(weight.shape[:1], torch.float32))
            lin = Int8Linear(*quantize_per_channel(weight, out=placed),
                             None if bias is None else bias.float().contiguous())
        return self._keep(name, lin)

    def check_all_preloaded_used(self) -> None:
        """After the model is built: int8 weights it never asked for mean they were made for another
        layout (the names differ), which a wrong answer would otherwise hide."""
        if self._preloaded:
            raise ValueError(f"the int8 weights hold linear layers this model does not have: "
                             f"{', '.join(sorted(self._preloaded))}")

    def linear(self, x, w):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(rows.shape[0], w.qweight.shape[0], dtype=torch.float32)
        self._C.int8_linear_a16(rows, w.qweight, w.scale, out, w.bias)
        return out.view(*x.shape[:-1], w.qweight.shape[0])


class FusedBf16Backend(FusedBackend):
    """As fused, with every linear layer's weight in bf16: half the bytes of fp32, which decode reads
    once per token. On a bf16 checkpoint these are its exact values, so the results agree with fp32
    to float rounding (`_C.linear_bf16` multiplies each fp32 activation by the weight's exact value
    and sums in fp32). fp32 or fp16 weights are rounded to bf16 (lossy: fp16 has 10 mantissa bits,
    bf16 7), so this is the default only for bf16 checkpoints. The embedding table stays fp32."""

    name = "fused-bf16"
    weight_precision = "bf16"
    kernels = FusedBackend.kernels + ("linear_bf16",)

    def prepare_linear(self, weight, bias=None, *, name=None):
        return self._keep(name, LinearWeights(self.arena.copy(weight, torch.bfloat16), bias))

    def linear(self, x, w):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(rows.shape[0], w.weight.shape[0], dtype=torch.float32)
        self._C.linear_bf16(rows, w.weight, out, w.bias)
        return out.view(*x.shape[:-1], w.weight.shape[0])


BACKENDS = {"torch": TorchBackend, "fused": FusedBackend, "fused-int8": FusedInt8Backend,
            "fused-bf16": FusedBf16Backend}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that run on `device` with the kernels this build has."""
    from pyengine import _C

    return [name for name, cls in BACKENDS.items()
            if torch.device(device).type in cls.devices and all(hasattr(_C, k) for k in getattr(cls, "kernels", ()))]


def default_backend(device: torch.device | str = "cpu", weights_dtype: torch.dtype | None = None) -> str:
    """The fastest backend that is exact on this device for weights stored in `weights_dtype`: bf16
    weights stay bf16 (fused-bf16), others run in fp32 (fused)."""
    names = available_backends(device)
    if weights_dtype == torch.bfloat16 and "fused-bf16" in names:
        return "fused-bf16"
    return "fused" if "fused" in names else "torch"


def make_backend(name: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **options):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if name not in available_backends(device):
        raise ValueError(f"backend {name!r} does not run on device {str(device)!r}; "
                         f"available there: {', '.join(available_backends(device))}")
    backend = BACKENDS[name](**options)
    backend.check_dtype(dtype)
    backend.dtype = dtype
    return backend
