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

from pyengine import kernels


@dataclass
class Step:
    """What one forward call processes, shared by every layer of that call."""

    q_start: torch.Tensor  # [batch] int32: position of each sequence's first new token
    kv_len: torch.Tensor  # [batch] int32: valid cache entries once this step's keys are written
    positions: torch.Tensor  # [batch, n_new] int64
    uniform_start: int | None  # the common q_start when all sequences start at the same position
    # name -> (cos, sin) or (cos, sin, positions), each table [positions, head_dim / 2]: the model's
    # rotary tables ("default", and any others a model uses, e.g. Gemma 3's "local"); positions, where
    # given, index that table's rows instead of step.positions (LongRoPE: short and long tables
    # stacked, each row pointed at the half its length picks); empty without rotary embedding
    rope_tables: dict
    cache: dict = field(default_factory=dict)  # per-step values a backend computes once (masks, gathers)

    def rope_table(self, name: str = "default") -> tuple:
        """(cos, sin, positions) of rotary table `name`."""
        table = self.rope_tables.get(name)
        if table is None:
            raise ValueError(f"this step has no rotary table {name!r}; it has: {', '.join(self.rope_tables)}")
        return table if len(table) == 3 else (*table, self.positions)

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

    # The ops are the registry's references (pyengine.kernels): the maths every kernel is tested against.

    def rms_norm(self, x, weight, eps):
        """x / sqrt(mean(x^2) + eps) * weight over the last dim: a hidden state [B, T, H], or per head
        ([B, T, heads, D] with weight [D], Qwen3 / Gemma 3's q/k norms)."""
        return kernels.rms_norm_reference(x, weight, eps)

    def add_rms_norm(self, residual, delta, weight, eps):
        """residual += delta in place; returns the normalized sum."""
        return kernels.add_rms_norm_reference(residual, delta, weight, eps)

    def layer_norm(self, x, weight, bias, eps):
        return kernels.layer_norm_reference(x, weight, bias, eps)

    def add_layer_norm(self, residual, delta, weight, bias, eps):
        return kernels.add_layer_norm_reference(residual, delta, weight, bias, eps)

    def rope(self, x: torch.Tensor, step: Step, table: str = "default") -> torch.Tensor:
        """Rotate (x[..., i], x[..., i + D/2]) pairs of x [B, T, heads, D] by each position's angles
        (Llama's half split), from the step's rotary table `table` (step.rope_table)."""
        def gather():
            cos, sin, positions = step.rope_table(table)
            return cos[positions][:, :, None, :], sin[positions][:, :, None, :]

        cos, sin = step.cached(("rope", table), gather)
        return kernels.rotate(x, cos, sin, interleaved=False)

    def attention(self, q, k_cache, v_cache, step: Step, scale: float, window: int = 0) -> torch.Tensor:
        """q: [B, T, Hq, D]; caches: [B, Hkv, S, D]. Query t of sequence b sees keys
        j <= q_start[b] + t and j < kv_len[b] (and j > q_start[b] + t - window with a sliding
        window, window > 0). Returns [B, T, Hq, D]."""
        longest = int(step.kv_len.max())
        keys, values = k_cache[:, :, :longest], v_cache[:, :, :longest]
        # Once per step and window, shared by the layers.
        mask = step.cached(("mask", window),
                           lambda: kernels.attention_mask(step.positions, step.kv_len, longest, window))
        return kernels.attend(q, keys, values, mask, scale)

    def silu_mul(self, gate, up):
        return kernels.silu_mul_reference(gate, up)

    def gelu(self, x):
        """The tanh approximation of GELU (GPT-2's gelu_new, Gemma's gelu_pytorch_tanh)."""
        return kernels.gelu_reference(x)

    def gelu_mul(self, gate, up):
        """GeGLU's elementwise half (Gemma): gelu(gate) * up with the tanh GELU."""
        return kernels.gelu_mul_reference(gate, up)

    def softcap(self, x, cap: float):
        """cap * tanh(x / cap): Gemma 2/3's final logit soft-capping (final_logit_softcapping)."""
        return kernels.softcap_reference(x, cap)

    def embedding(self, ids, table, scale: float | None = None):
        """table[ids]; with `scale`, times scale rounded to the table's dtype first (Gemma's
        sqrt(hidden) normalizer, as HF multiplies by torch.tensor(hidden ** 0.5, dtype))."""
        out = kernels.embedding_reference(ids, table)
        return out if scale is None else out * torch.tensor(scale, dtype=out.dtype)

    def add_position_embedding(self, x, table, step: Step):
        """x += table[step.positions] in place (GPT-2's learned positions); returns x."""
        return x.add_(table[step.positions])

    def make_cpp_decoder(self, model):
        """An object whose step() runs a whole decode step of `model` in one call (pyengine.runtime.plan's
        recorded plan), or None: this backend runs the layers op by op."""
        return None


class FusedBackend(TorchBackend):
    """Our C++ kernels for the linear layers, attention, norms, rotary embedding and activations; fp32
    weights. Linears: `_C.linear_f32`, a streaming GEMV for decode and a packed-panel GEMM for
    prefill (faster than torch's `F.linear` on the default model's shapes).

    Calls the registry's fast calls (pyengine.kernels) rather than the torch.library ops: the same
    kernels, without the dispatcher's per-call cost, which adds up over hundreds of calls per step.
    """

    name = "fused"
    devices = ("cpu",)
    weight_precision = "fp32"
    kernels = ("linear_f32", "attention", "rope", "silu_mul", "gelu", "gelu_mul", "softcap", "layer_norm",
               "add_layer_norm", "embedding", "rms_norm", "DecodePlan")

    def __init__(self):
        from pyengine import _C
        from pyengine.kernels.memory import WeightArena

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
        return kernels.linear_f32(x, w.weight, w.bias)

    def rms_norm(self, x, weight, eps):
        return kernels.rms_norm(x.contiguous(), weight, eps)  # per-head norms take q/k views of a fused projection

    def add_rms_norm(self, residual, delta, weight, eps):
        return kernels.add_rms_norm(residual, delta, weight, eps)

    def layer_norm(self, x, weight, bias, eps):
        return kernels.layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, residual, delta, weight, bias, eps):
        return kernels.add_layer_norm(residual, delta, weight, bias, eps)

    def rope(self, x, step, table="default"):
        x = x.contiguous()
        cos, sin, positions = step.rope_table(table)
        positions = step.cached(("positions_i32", table), lambda: positions.to(torch.int32))
        kernels.rope(x, cos, sin, positions, False)
        return x

    def attention(self, q, k_cache, v_cache, step, scale, window=0):
        return kernels.attention(q.contiguous(), k_cache, v_cache, step.q_start, step.kv_len, scale, window)

    def silu_mul(self, gate, up):
        return kernels.silu_mul(gate, up)

    def gelu(self, x):
        return kernels.gelu(x)

    def gelu_mul(self, gate, up):
        return kernels.gelu_mul(gate, up)

    def softcap(self, x, cap):
        return kernels.softcap(x, cap)

    def embedding(self, ids, table, scale=None):
        out = kernels.embedding(ids, table)
        return out if scale is None else out.mul_(scale)  # an fp32 multiply per element, as the plan's

    def make_cpp_decoder(self, model):
        """The model's decode step recorded once from its own hidden_states and replayed in C++
        (pyengine.runtime.plan): one call per token instead of ~15 Python op calls per layer, over this
        backend's (fp32, bf16 or int8) linears. None where the plan cannot run (a model off the CPU)."""
        if model.device.type != "cpu":
            return None
        from pyengine.runtime.plan import record_decode_plan

        return record_decode_plan(model)


class FusedInt8Backend(FusedBackend):
    """As fused, with every linear layer (the tied output projection too) in int8: weights
    quantized per output channel at load time.

    Every Linear is W8A16 (`_C.int8_linear_a16`): activations quantized to int16 per row, exact
    int16 x int8 sums, so a row's output is the same bits whichever rows share the call (prefill,
    decode, a batch) and the C++ decode step (pyengine.runtime.plan) matches this path bit for bit.
    Decode (up to 16 rows): a GEMV that streams the int8 weights once. Prefill: a packed-panel GEMM
    on int16 pairs (`vpmaddwd`), faster than the fp32 FMA GEMM that the weight-only kernel
    (`_C.int8_linear_wo`, kept for comparison) feeds with dequantized panels.
    Chosen over W8A8 (int8 activations too, `_C.int8_linear_w8a8`) for quality: int8 activations lost
    several times the perplexity and KL of 16-bit ones, which stay next to the weight-only result.
    """

    name = "fused-int8"
    weight_precision = "int8"
    kernels = FusedBackend.kernels + ("int8_linear_a16",)

    def __init__(self, preloaded: dict | None = None):
        """preloaded: int8 linears by layer name (pyengine.quantize.int8.load_int8, pyengine.quantize.gptq), used
        instead of rounding the checkpoint's weights."""
        super().__init__()
        if preloaded is not None and not isinstance(preloaded, dict):
            raise TypeError(f"preloaded must be a dict of int8 linears by layer name, got {type(preloaded).__name__}")
        self._preloaded = dict(preloaded) if preloaded is not None else None

    def prepare_linear(self, weight, bias=None, *, name=None):
        from pyengine.quantize.int8 import Int8Linear, quantize_per_channel

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
        return kernels.int8_linear_a16(x, w.qweight, w.scale, w.bias)


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
        return kernels.linear_bf16(x, w.weight, w.bias)


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
