"""The op registry: each op's one owner.

An entry (`Op`) holds every face of one op under one name:
  reference   plain torch, written for reading: the maths, and what every test compares against
              (TorchBackend runs these functions)
  fast        our kernel: allocates the outputs and calls ``pyengine._C.<name>``, whose one binding
              checks the arguments and runs the CPU kernel or, on a CUDA tensor, its CUDA twin
  devices     where `fast` runs ("cpu", and "cuda" where a CUDA kernel exists)
  op          the ``torch.library`` custom op ``pyengine::<name>`` generated from `fast` (for
              torch.compile; `pyengine.kernels.ops.<name>` is this)
  fake        output shapes without computing (torch.compile, meta tensors)
  samples     inputs for the shared harness (tests/test_backend_ops.py), with the tolerance per dtype

`reference` and `fast` take the same arguments, mutate the same ones (`mutates`) and return the same.
References compute in at least float32 and round to the input's dtype once, at the end (the kernels' rule).

Adding an op: its C++ kernel and binding (`_C.<name>`), then one `register(Op(...))` here; the
harness then runs it on every ISA and device present.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from pyengine import _C

# ---- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


EXACT = Tolerance(0.0, 0.0)
FLOAT_TOLERANCE = {torch.float32: Tolerance(1e-5, 1e-5), torch.float16: Tolerance(2e-3, 2e-3),
                   torch.bfloat16: Tolerance(2e-2, 2e-2)}


@dataclass(frozen=True)
class Case:
    """One harness call: a label for the report and the arguments (tensors already on the device)."""

    label: str
    args: tuple


@dataclass
class Op:
    name: str
    reference: Callable
    fast: Callable
    fake: Callable
    samples: Callable[[torch.device, torch.dtype], list[Case]]
    devices: tuple[str, ...] = ("cpu",)
    mutates: tuple[str, ...] = ()
    dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=lambda: {"cpu": (torch.float32,)})
    tolerance: dict[torch.dtype, Tolerance] = field(default_factory=lambda: dict(FLOAT_TOLERANCE))
    op: object = None  # the torch.library custom op, set by register()

    @property
    def arg_names(self) -> list[str]:
        """The op's parameters, in order (the fast call's, which the reference shares)."""
        return list(inspect.signature(self.fast).parameters)


REGISTRY: dict[str, Op] = {}


def register(entry: Op) -> Op:
    """Adds an entry and generates its torch.library custom op from `fast` (schema from its annotations)."""
    if entry.name in REGISTRY:
        raise ValueError(f"op {entry.name!r} is registered twice")
    reference_args = list(inspect.signature(entry.reference).parameters)
    if reference_args != entry.arg_names:
        raise TypeError(f"op {entry.name!r}: the reference takes {reference_args}, the fast call {entry.arg_names}")
    unknown = set(entry.mutates) - set(entry.arg_names)
    if unknown:
        raise ValueError(f"op {entry.name!r}: mutates names no parameter: {sorted(unknown)}")
    entry.op = torch.library.custom_op(f"pyengine::{entry.name}", entry.fast, mutates_args=entry.mutates)
    entry.op.register_fake(entry.fake)
    REGISTRY[entry.name] = entry
    return entry


def _stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the bindings take it; 0 for a CPU tensor."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous [rows, last dim]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with contiguous rows: a view where the layout allows, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    rows_ok = rows.is_contiguous() or (rows.stride(1) == 1 and rows.stride(0) >= rows.shape[1])
    return rows if rows_ok else rows.contiguous()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32: the references' working precision (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_generator(seed)) * scale).to(device=device, dtype=dtype)


def _int8(*shape, seed, device):
    return torch.randint(-127, 128, shape, generator=_generator(seed), dtype=torch.int8).to(device)


# Rows x features the row-wise ops are sampled at: one row, odd sizes (vector tails), a multi-dim batch.
_ROW_SHAPES = [(1, 8), (3, 7), (5, 33), (2, 3, 64), (4, 129)]

# ---- norms ---------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = _wide(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * _wide(weight)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.rms_norm(x, weight, out, eps, _stream(x))
    return out


def add_rms_norm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """residual += delta in place; returns rms_norm(residual)."""
    residual.add_(delta)
    return rms_norm_reference(residual, weight, eps)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place); returns rms_norm(residual)."""
    out = torch.empty_like(residual)
    _C.add_rms_norm(residual, delta.contiguous(), weight, out, eps, _stream(residual))
    return out


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    x32 = _wide(x)
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)  # biased, as LayerNorm uses
    out = (x32 - mean) * torch.rsqrt(var + eps) * _wide(weight)
    if bias is not None:
        out = out + _wide(bias)
    return out.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.layer_norm(x, weight, bias, out, eps)
    return out


def add_layer_norm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    residual.add_(delta)
    return layer_norm_reference(residual, weight, bias, eps)


def add_layer_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """residual += delta (in place); returns layer_norm(residual)."""
    out = torch.empty_like(residual)
    _C.add_layer_norm(residual, delta.contiguous(), weight, bias, out, eps)
    return out


def _norm_samples(with_residual: bool, with_bias: bool):
    def samples(device, dtype):
        cases = []
        for i, shape in enumerate(_ROW_SHAPES):
            x = _randn(*shape, seed=i, device=device, dtype=dtype, scale=3.0)
            weight = _randn(shape[-1], seed=100 + i, device=device, dtype=dtype)
            affine = (weight, _randn(shape[-1], seed=200 + i, device=device, dtype=dtype) if i % 2 else None) \
                if with_bias else (weight,)
            head = (x, _randn(*shape, seed=300 + i, device=device, dtype=dtype)) if with_residual else (x,)
            cases.append(Case(f"{shape}", (*head, *affine, 1e-5)))
        return cases
    return samples


def _like_first(*args, **kwargs):
    return torch.empty_like(args[0])


_FLOATS_ON_CUDA = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.float16, torch.bfloat16)}

register(Op("rms_norm", rms_norm_reference, rms_norm, _like_first, _norm_samples(False, False),
            devices=("cpu", "cuda"), dtypes=_FLOATS_ON_CUDA))
register(Op("add_rms_norm", add_rms_norm_reference, add_rms_norm, _like_first, _norm_samples(True, False),
            devices=("cpu", "cuda"), mutates=("residual",), dtypes=_FLOATS_ON_CUDA))
register(Op("layer_norm", layer_norm_reference, layer_norm, _like_first, _norm_samples(False, True)))
register(Op("add_layer_norm", add_layer_norm_reference, add_layer_norm, _like_first, _norm_samples(True, True),
            mutates=("residual",)))

# ---- activations ---------------------------------------------------------------------------------


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the elementwise half of a SwiGLU MLP."""
    return (F.silu(_wide(gate)) * _wide(up)).to(gate.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. On the CPU the gate and up halves of a fused projection (strided views of rows)
    are read in place."""
    if gate.is_cuda:
        gate_rows, up_rows = _rows(gate), _rows(up)
    else:
        gate_rows, up_rows = _as_rows(gate), _as_rows(up)
    out = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    _C.silu_mul(gate_rows, up_rows, out, _stream(gate))
    return out.view(gate.shape)


def _silu_mul_samples(device, dtype):
    cases = []
    for i, shape in enumerate(_ROW_SHAPES):
        cases.append(Case(f"{shape}", (_randn(*shape, seed=i, device=device, dtype=dtype, scale=4.0),
                                       _randn(*shape, seed=50 + i, device=device, dtype=dtype))))
    for rows, width in [(3, 17), (6, 64)]:  # the halves of a fused gate_up projection: strided rows
        gate_up = _randn(rows, 2 * width, seed=rows, device=device, dtype=dtype, scale=4.0)
        cases.append(Case(f"halves of ({rows}, {2 * width})", (gate_up[:, :width], gate_up[:, width:])))
    return cases


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU (transformers' NewGELUActivation, term for term)."""
    x32 = _wide(x)
    inner = math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * torch.pow(x32, 3.0))
    return (0.5 * x32 * (1.0 + torch.tanh(inner))).to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _C.gelu(x, out)
    return out


def _gelu_samples(device, dtype):
    return [Case(f"{shape}", (_randn(*shape, seed=i, device=device, dtype=dtype, scale=4.0),))
            for i, shape in enumerate(_ROW_SHAPES)]


def gelu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """tanh-GELU(gate) * up: the elementwise half of a GeGLU MLP (Gemma)."""
    return (gelu_reference(_wide(gate)) * _wide(up)).to(gate.dtype)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """As silu_mul, with the tanh GELU; the halves of a fused gate_up projection are read in place."""
    gate_rows, up_rows = _as_rows(gate), _as_rows(up)
    out = torch.empty(gate_rows.shape, dtype=gate.dtype)
    _C.gelu_mul(gate_rows, up_rows, out)
    return out.view(gate.shape)


def softcap_reference(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): logit soft-capping (Gemma's final_logit_softcapping)."""
    return (torch.tanh(_wide(x) / cap) * cap).to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _C.softcap(x, out, cap)
    return out


def _softcap_samples(device, dtype):
    return [Case(f"{shape}, cap {cap}", (_randn(*shape, seed=i, device=device, dtype=dtype, scale=40.0), cap))
            for i, (shape, cap) in enumerate(zip(_ROW_SHAPES, (30.0, 50.0, 1.0, 30.0, 7.5)))]


register(Op("silu_mul", silu_mul_reference, silu_mul, _like_first, _silu_mul_samples, devices=("cpu", "cuda"),
            dtypes=_FLOATS_ON_CUDA))
register(Op("gelu", gelu_reference, gelu, _like_first, _gelu_samples,
            tolerance={torch.float32: Tolerance(1e-5, 1e-4)}))
register(Op("gelu_mul", gelu_mul_reference, gelu_mul, _like_first, _silu_mul_samples,
            tolerance={torch.float32: Tolerance(1e-5, 1e-4)}))
register(Op("softcap", softcap_reference, softcap, _like_first, _softcap_samples))

# ---- rope --------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x rotated by per-token angles: cos/sin [B, T, 1, D/2] (one row per token, all heads), out of place.
    interleaved=False pairs (i, i + D/2) (Llama, NeoX), True pairs (2i, 2i + 1) (GPT-J)."""
    x32 = _wide(x)
    if interleaved:
        a, b = x32[..., 0::2], x32[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)
    a, b = x32.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   interleaved: bool = False) -> None:
    """Rotates x [B, T, H, D] in place by the angles of each token's position: cos/sin [P, D/2]."""
    rows = positions.long()
    x.copy_(rotate(x, cos[rows].unsqueeze(2), sin[rows].unsqueeze(2), interleaved))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
         interleaved: bool = False) -> None:
    """Rotates x [B, T, H, D] in place; cos/sin [P, D/2] float32, positions [B, T] int32."""
    _C.rope(x, cos, sin, positions, interleaved, _stream(x))


def _rope_samples(device, dtype):
    cases = []
    for i, (batch, seq, heads, head_dim) in enumerate([(1, 1, 1, 2), (1, 5, 3, 18), (2, 3, 4, 64), (2, 7, 2, 130)]):
        angles = torch.rand(64, head_dim // 2, generator=_generator(i)) * 6.3
        positions = torch.randint(0, 64, (batch, seq), generator=_generator(10 + i), dtype=torch.int32)
        for interleaved in (False, True):
            x = _randn(batch, seq, heads, head_dim, seed=20 + i, device=device, dtype=dtype)
            cases.append(Case(f"{(batch, seq, heads, head_dim)} interleaved={interleaved}",
                              (x, angles.cos().to(device), angles.sin().to(device), positions.to(device),
                               interleaved)))
    return cases


register(Op("rope", rope_reference, rope, lambda x, cos, sin, positions, interleaved=False: None, _rope_samples,
            devices=("cpu", "cuda"), mutates=("x",), dtypes=_FLOATS_ON_CUDA))

# ---- embedding ---------------------------------------------------------------------------------


def embedding_reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[ids]


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[ids]: ids int64 of any shape, table [V, D]; returns ids.shape + (D,)."""
    out = table.new_empty((*ids.shape, table.shape[1]))
    _C.embedding(ids.reshape(-1).contiguous(), table, out.view(-1, table.shape[1]))
    return out


def _embedding_samples(device, dtype):
    cases = []
    for i, (vocab, dim, ids_shape) in enumerate([(5, 3, (1,)), (50, 17, (2, 3)), (300, 64, (7,))]):
        ids = torch.randint(0, vocab, ids_shape, generator=_generator(i)).to(device)
        cases.append(Case(f"V={vocab} D={dim} ids {ids_shape}", (ids, _randn(vocab, dim, seed=i, device=device,
                                                                              dtype=dtype))))
    return cases


register(Op("embedding", embedding_reference, embedding,
            lambda ids, table: table.new_empty((*ids.shape, table.shape[1])), _embedding_samples,
            tolerance={torch.float32: EXACT}))

# ---- attention ---------------------------------------------------------------------------------


def attention_mask(positions: torch.Tensor, kv_len: torch.Tensor, num_keys: int, window: int = 0) -> torch.Tensor:
    """Which keys each query sees, [B, T, num_keys] bool, for queries at `positions` [B, T]: key j with
    j <= position and j < kv_len[b], and with a sliding window (window > 0) j > position - window. A
    query past kv_len + window (the padding of a shorter prompt in a batch) keeps key kv_len - 1, so
    its unused output stays finite. The kernels' rule is the same: key_range in
    csrc/include/pyengine/attention_window.h."""
    key = torch.arange(num_keys, device=positions.device)
    kv_len = kv_len.long()[:, None, None]
    position = positions.long()[:, :, None]
    visible = (key <= position) & (key < kv_len)
    if window:
        visible &= key > torch.minimum(position - window, kv_len - 2)
    return visible


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, where mask) v, with grouped-query heads: q [B, T, Hq, D], keys and
    values [B, Hkv, S, D], mask [B, T, S]. Returns [B, T, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=q.shape[2] != keys.shape[1])
    return out.transpose(1, 2)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
                        kv_len: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """Causal GQA attention of q [B, T, Hq, D] over a KV cache [B, Hkv, S, D]: query t of sequence b
    sits at position q_start[b] + t and sees the keys attention_mask gives it."""
    positions = q_start.long()[:, None] + torch.arange(q.shape[1], device=q.device)[None, :]
    longest = int(kv_len.max())  # entries past every kv_len are never read
    keys, values = k_cache[:, :, :longest], v_cache[:, :, :longest]
    mask = attention_mask(positions, kv_len, longest, window)
    # A probability of 0 times a non-finite value is NaN: an entry past a shorter sequence's kv_len
    # may hold anything.
    values = values.masked_fill(~(torch.arange(longest, device=q.device) < kv_len.long()[:, None])[:, None, :, None],
                                0.0)
    return attend(_wide(q), _wide(keys), _wide(values), mask, scale).to(q.dtype)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
              kv_len: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """Causal GQA attention of q [B, T, Hq, D] over a KV cache [B, Hkv, S, D], with a sliding window
    of `window` positions if > 0; see _C.attention."""
    out = torch.empty_like(q)
    _C.attention(q, k_cache, v_cache, out, q_start, kv_len, scale, window, _stream(q))
    return out


def _attention_samples(device, dtype):
    # (batch, q_len, Hq, Hkv, cache_len, head_dim, q_start, kv_len, window): decode, prefill, ragged
    # batches, GQA, odd head sizes (CPU), sliding windows.
    shapes = [(1, 1, 2, 1, 8, 16, [4], [5], 0), (2, 5, 4, 2, 16, 19, [0, 3], [5, 8], 0),
              (3, 1, 6, 2, 40, 64, [10, 0, 33], [11, 1, 34], 0), (2, 9, 4, 4, 24, 64, [0, 6], [9, 15], 4),
              (1, 1, 8, 2, 70, 128, [60], [61], 16), (2, 4, 2, 1, 12, 8, [0, 1], [4, 2], 3)]
    cases = []
    for i, (b, t, hq, hkv, s, d, q_start, kv_len, window) in enumerate(shapes):
        if device.type == "cuda" and d not in (64, 128):
            continue  # the CUDA kernel has head_dim 64 and 128
        cases.append(Case(f"B={b} T={t} Hq={hq} Hkv={hkv} S={s} D={d} window={window}",
                          (_randn(b, t, hq, d, seed=i, device=device, dtype=dtype),
                           _randn(b, hkv, s, d, seed=10 + i, device=device, dtype=dtype),
                           _randn(b, hkv, s, d, seed=20 + i, device=device, dtype=dtype),
                           torch.tensor(q_start, dtype=torch.int32, device=device),
                           torch.tensor(kv_len, dtype=torch.int32, device=device), 1 / math.sqrt(d), window)))
    return cases


register(Op("attention", attention_reference, attention,
            lambda q, k_cache, v_cache, q_start, kv_len, scale, window=0: torch.empty_like(q), _attention_samples,
            devices=("cpu", "cuda"), dtypes=_FLOATS_ON_CUDA,
            tolerance={torch.float32: Tolerance(1e-5, 1e-4), torch.float16: Tolerance(3e-3, 3e-3),
                       torch.bfloat16: Tolerance(2e-2, 2e-2)}))

# ---- argmax ------------------------------------------------------------------------------------


def argmax_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value (the first of equal ones), int64."""
    return x.argmax(-1)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    x = _rows(x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _C.argmax_rows(x, out)
    return out


def _argmax_samples(device, dtype):
    cases = [Case(f"{shape}", (_randn(*shape, seed=i, device=device, dtype=dtype),))
             for i, shape in enumerate([(1, 1), (3, 7), (5, 33), (2, 1000)])]
    ties = torch.zeros(2, 19, device=device, dtype=dtype)
    ties[:, [4, 11]] = 1.0
    cases.append(Case("ties", (ties,)))
    return cases


register(Op("argmax_rows", argmax_rows_reference, argmax_rows,
            lambda x: x.new_empty(x.shape[0], dtype=torch.int64), _argmax_samples,
            tolerance={torch.float32: EXACT}))

# ---- linears and int8 --------------------------------------------------------------------------
# Weights are [N, K] (torch Linear layout), int8 ones with one float32 scale per output row;
# activations may have any leading dims ([..., K]), flattened to rows for the kernels.


def _linear_fake(x, w, *rest, **kwargs):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear_f32_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 Linear: x @ w^T + bias. x [..., K], w [N, K]."""
    rows = _rows(x)
    out = torch.empty(rows.shape[0], w.shape[0], dtype=torch.float32)
    _C.linear_f32(rows, w, out, bias)
    return out.view(*x.shape[:-1], w.shape[0])


def linear_bf16_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ float(w)^T + bias: each bf16 weight's exact value, fp32 sums."""
    return F.linear(x, _wide(w), bias)


def linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear with bf16 weights [N, K] and fp32 activations, sums and output."""
    rows = _rows(x)
    out = torch.empty(rows.shape[0], w.shape[0], dtype=torch.float32)
    _C.linear_bf16(rows, w, out, bias)
    return out.view(*x.shape[:-1], w.shape[0])


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale = max|x| / 127, q = round(x / scale) (half to even), so x ~= q *
    scale; an all-zero row gets scale 0 and q 0."""
    x32 = x.float()
    scale = x32.abs().amax(-1) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    q = torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(x32), torch.round(x32 / safe))
    return q.clamp(-127, 127).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q [..., K] int8, scale [...] float32), x ~= q * scale."""
    rows = _rows(x)
    q = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    _C.quantize_rows(rows, q, scale, _stream(x))
    return q.view(x.shape), scale.view(x.shape[:-1])


def int8_matmul_i32_reference(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact a_q @ b_q^T in int32 (int64 sums on the CPU, wrapped as int32 would)."""
    return (a_q.cpu().long() @ b_q.cpu().long().T).to(torch.int32).to(a_q.device)


def int8_matmul_i32(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 a_q @ b_q^T for int8 [M, K] x [N, K]; on the CPU b_q in [-127, 127], on CUDA K a
    multiple of 32."""
    out = torch.empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32, device=a_q.device)
    _C.int8_matmul_i32(a_q, b_q, out, _stream(a_q))
    return out


def _scaled_sums(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 x: torch.Tensor, n: int) -> torch.Tensor:
    """acc [M, N] integer sums as float32, times x_scale[m] * w_scale[n], plus bias, in x's dtype and shape."""
    out = acc.float() * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int8_linear_w8a8_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 Linear: activations quantized per row to int8 (quantize_rows), exact int32 sums with the
    int8 weights, then scaled."""
    x_q, x_scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    return _scaled_sums(int8_matmul_i32_reference(x_q, w_q), x_scale, w_scale, bias, x, w_q.shape[0])


def int8_linear_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 Linear with dynamic per-token activation quantization. x [..., K] -> [..., N]. On CUDA:
    quantize_rows, the tensor-core int8_matmul_i32, and the scaling in torch."""
    if x.is_cuda:
        x_q, x_scale = quantize_rows(_rows(x))
        return _scaled_sums(int8_matmul_i32(x_q, w_q), x_scale, w_scale, bias, x, w_q.shape[0])
    rows = _rows(x)
    out = torch.empty(rows.shape[0], w_q.shape[0], dtype=torch.float32)
    _C.int8_linear_w8a8(rows, w_q, w_scale, out, bias)
    return out.view(*x.shape[:-1], w_q.shape[0])


def int8_linear_wo_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 Linear: x @ (w_q * w_scale[:, None])^T + bias, fp32 sums."""
    x32 = _wide(x)
    weight = w_q.to(x32.dtype) * w_scale[:, None].to(x32.dtype)
    out = F.linear(x32, weight, None if bias is None else bias.to(x32.dtype))
    return out.to(x.dtype)


def int8_linear_wo(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 Linear: x [..., K] -> [..., N] in x's dtype."""
    rows = _rows(x)
    out = torch.empty(rows.shape[0], w_q.shape[0], dtype=x.dtype, device=x.device)
    _C.int8_linear_wo(rows, w_q, w_scale, out, bias, _stream(x))
    return out.view(*x.shape[:-1], w_q.shape[0])


def quantize_rows_i16_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int16 (as int8_linear_a16 quantizes activations): scale = max|x| / 32767."""
    scale = x.abs().amax(-1) / 32767
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    q = torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(x), torch.round(x / safe))
    return q.clamp(-32767, 32767).to(torch.int16), scale


def int8_linear_a16_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 Linear: activations quantized per row to int16, exact integer sums with the int8 weights
    (int64 here), rounded to float32 once, then scaled."""
    x_q, x_scale = quantize_rows_i16_reference(x.reshape(-1, x.shape[-1]))
    return _scaled_sums(x_q.long() @ w_q.long().T, x_scale, w_scale, bias, x, w_q.shape[0])


def int8_linear_a16(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 Linear, the fused-int8 engine's: x [..., K] -> [..., N]."""
    rows = _rows(x)
    out = torch.empty(rows.shape[0], w_q.shape[0], dtype=torch.float32)
    _C.int8_linear_a16(rows, w_q, w_scale, out, bias)
    return out.view(*x.shape[:-1], w_q.shape[0])


# (rows, N, K): decode's few rows (the GEMV), prefill's many (the packed GEMM), odd sizes for the tails.
_LINEAR_SHAPES = [(1, 8, 16), (3, 5, 40), (4, 33, 72), (17, 19, 96), (40, 24, 64)]


def _linear_samples(weight: str, cuda_k_multiple: int = 1):
    def samples(device, dtype):
        cases = []
        for i, (m, n, k) in enumerate(_LINEAR_SHAPES):
            if device.type == "cuda" and k % cuda_k_multiple:
                continue
            x = _randn(m, k, seed=i, device=device, dtype=dtype)
            bias = _randn(n, seed=30 + i, device=device, dtype=dtype) if i % 2 else None
            if weight == "f32":
                w = (_randn(n, k, seed=10 + i, device=device),)
            elif weight == "bf16":
                w = (_randn(n, k, seed=10 + i, device=device).to(torch.bfloat16),)
            else:
                w = (_int8(n, k, seed=10 + i, device=device), torch.rand(n, generator=_generator(i)).to(device) / 50)
            cases.append(Case(f"M={m} N={n} K={k} bias={bias is not None}", (x, *w, bias)))
        x3 = _randn(2, 3, 40, seed=99, device=device, dtype=dtype)  # leading dims
        w = _randn(6, 40, seed=98, device=device)
        if weight == "bf16":
            w = w.to(torch.bfloat16)
        if weight == "int8":
            cases.append(Case("x [2, 3, 40]", (x3, _int8(6, 40, seed=98, device=device),
                                               torch.full((6,), 0.01, device=device), None)))
        else:
            cases.append(Case("x [2, 3, 40]", (x3, w, None)))
        return cases
    return samples


def _quantize_samples(device, dtype):
    cases = [Case(f"{shape}", (_randn(*shape, seed=i, device=device, dtype=dtype, scale=3.0),))
             for i, shape in enumerate([(1, 16), (3, 40), (5, 33), (2, 3, 72)])]
    with_zero_row = _randn(3, 24, seed=7, device=device, dtype=dtype)
    with_zero_row[1] = 0
    cases.append(Case("an all-zero row", (with_zero_row,)))
    return cases


def _i32_samples(device, dtype):
    shapes = [(1, 8, 32), (3, 5, 40), (17, 9, 64), (33, 20, 96)]
    return [Case(f"M={m} N={n} K={k}", (_int8(m, k, seed=i, device=device), _int8(n, k, seed=10 + i, device=device)))
            for i, (m, n, k) in enumerate(shapes) if device.type == "cpu" or k % 32 == 0]


_LINEAR_TOLERANCE = {torch.float32: Tolerance(1e-4, 1e-4), torch.float16: Tolerance(1e-2, 1e-2),
                     torch.bfloat16: Tolerance(5e-2, 5e-2)}
register(Op("linear_f32", linear_f32_reference, linear_f32, _linear_fake, _linear_samples("f32"),
            tolerance=_LINEAR_TOLERANCE))
register(Op("linear_bf16", linear_bf16_reference, linear_bf16, _linear_fake, _linear_samples("bf16"),
            tolerance=_LINEAR_TOLERANCE))
register(Op("quantize_rows", quantize_rows_reference, quantize_rows,
            lambda x: (torch.empty(x.shape, dtype=torch.int8, device=x.device),
                       torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)),
            _quantize_samples, devices=("cpu", "cuda"), dtypes=_FLOATS_ON_CUDA,
            tolerance={t: EXACT for t in FLOAT_TOLERANCE}))
register(Op("int8_matmul_i32", int8_matmul_i32_reference, int8_matmul_i32,
            lambda a_q, b_q: a_q.new_empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32), _i32_samples,
            devices=("cpu", "cuda"), dtypes={"cpu": (torch.int8,), "cuda": (torch.int8,)},
            tolerance={torch.int8: EXACT}))
register(Op("int8_linear_w8a8", int8_linear_w8a8_reference, int8_linear_w8a8, _linear_fake,
            _linear_samples("int8", cuda_k_multiple=32), devices=("cpu", "cuda"), dtypes=_FLOATS_ON_CUDA,
            tolerance={torch.float32: EXACT, torch.float16: Tolerance(1e-2, 1e-2),
                       torch.bfloat16: Tolerance(5e-2, 5e-2)}))
register(Op("int8_linear_wo", int8_linear_wo_reference, int8_linear_wo, _linear_fake, _linear_samples("int8"),
            devices=("cpu", "cuda"), dtypes=_FLOATS_ON_CUDA, tolerance=_LINEAR_TOLERANCE))
register(Op("int8_linear_a16", int8_linear_a16_reference, int8_linear_a16, _linear_fake, _linear_samples("int8"),
            tolerance={torch.float32: EXACT}))
