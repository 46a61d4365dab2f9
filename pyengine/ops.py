"""The kernel library's ops, as torch.library custom ops, each beside its torch reference.

Every op here has three faces with one name:
  ``pyengine._C.<op>``          the raw binding (checks arguments, releases the GIL, writes ``out``)
  ``pyengine.ops.<op>``         a ``torch.library`` custom op over it (usable under torch.compile)
  ``pyengine.ops.<op>_reference`` the same maths in plain torch: what the tests compare against
"""
from __future__ import annotations

import contextlib

import torch

from pyengine import _C

# ---- ISA and threads ---------------------------------------------------------------------------


def detected_isa() -> str:
    """Best SIMD level the CPU supports: 'scalar', 'avx2' or 'avx512'."""
    return _C.detected_isa()


def active_isa() -> str:
    """SIMD level the CPU kernels dispatch to now."""
    return _C.active_isa()


@contextlib.contextmanager
def use_isa(name: str):
    """Cap the CPU kernels at ISA ``name`` inside the block (for tests and comparisons)."""
    previous = _C.active_isa()
    _C.set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)


def supported_isas() -> list[str]:
    """Every ISA level this CPU can run, lowest first."""
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(_C.detected_isa()) + 1]


def set_num_threads(n: int) -> None:
    """Threads for both our kernels (OpenMP) and torch's intra-op pool."""
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, got {n}")
    _C.set_num_threads(n)
    torch.set_num_threads(n)


# ---- rms_norm ----------------------------------------------------------------------------------


@torch.library.custom_op("pyengine::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.rms_norm(x, weight, out, eps)
    return out


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.library.custom_op("pyengine::add_rms_norm", mutates_args=("residual",))
def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place); returns rms_norm(residual)."""
    out = torch.empty_like(residual)
    _C.add_rms_norm(residual, delta, weight, out, eps)
    return out


@add_rms_norm.register_fake
def _(residual, delta, weight, eps):
    return torch.empty_like(residual)


def add_rms_norm_reference(residual, delta, weight, eps):
    residual.add_(delta)
    return rms_norm_reference(residual, weight, eps)


# ---- small fused ops: rope, silu_mul, gelu, gelu_mul, softcap, layer_norm, embedding -------------------------------

import math  # noqa: E402  (kept in this section: the sections above belong to other ops)


@torch.library.custom_op("pyengine::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the elementwise half of a SwiGLU MLP."""
    out = torch.empty_like(gate)
    _C.silu_mul(gate, up, out)
    return out


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@torch.library.custom_op("pyengine::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU (transformers' ``gelu_new``)."""
    out = torch.empty_like(x)
    _C.gelu(x, out)
    return out


@gelu.register_fake
def _(x):
    return torch.empty_like(x)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    # transformers.activations.NewGELUActivation, term for term.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@torch.library.custom_op("pyengine::gelu_mul", mutates_args=())
def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with the tanh GELU: the elementwise half of a GeGLU MLP (Gemma)."""
    out = torch.empty_like(gate)
    _C.gelu_mul(gate, up, out)
    return out


@gelu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def gelu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_reference(gate) * up


@torch.library.custom_op("pyengine::softcap", mutates_args=())
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): logit soft-capping (Gemma 2/3's final_logit_softcapping)."""
    out = torch.empty_like(x)
    _C.softcap(x, out, cap)
    return out


@softcap.register_fake
def _(x, cap):
    return torch.empty_like(x)


def softcap_reference(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


@torch.library.custom_op("pyengine::rope", mutates_args=("x",))
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> None:
    """Rotates x [B, T, H, D] in place; cos/sin [P, D/2] tables, positions [B, T] int32."""
    _C.rope(x, cos, sin, positions, interleaved)


@rope.register_fake
def _(x, cos, sin, positions, interleaved):
    return None


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """The rotated x, out of place (x is left alone)."""
    c = cos[positions.long()].unsqueeze(2)  # [B, T, 1, D/2]: one row of angles per token, all heads
    s = sin[positions.long()].unsqueeze(2)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


@torch.library.custom_op("pyengine::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _C.layer_norm(x, weight, bias, out, eps)
    return out


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased, as LayerNorm uses
    out = (x - mean) * torch.rsqrt(var + eps) * weight
    return out + bias if bias is not None else out


@torch.library.custom_op("pyengine::add_layer_norm", mutates_args=("residual",))
def add_layer_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """residual += delta (in place); returns layer_norm(residual)."""
    out = torch.empty_like(residual)
    _C.add_layer_norm(residual, delta, weight, bias, out, eps)
    return out


@add_layer_norm.register_fake
def _(residual, delta, weight, bias, eps):
    return torch.empty_like(residual)


def add_layer_norm_reference(residual, delta, weight, bias, eps):
    residual.add_(delta)
    return layer_norm_reference(residual, weight, bias, eps)


@torch.library.custom_op("pyengine::embedding", mutates_args=())
def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[ids]: ids int64 of any shape, table [V, D] fp32; returns ids.shape + (D,)."""
    out = table.new_empty((*ids.shape, table.shape[1]))
    _C.embedding(ids, table, out)
    return out


@embedding.register_fake
def _(ids, table):
    return table.new_empty((*ids.shape, table.shape[1]))


def embedding_reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, table)

# ---- attention ---------------------------------------------------------------------------------


@torch.library.custom_op("pyengine::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Causal GQA attention of q [B, T, Hq, D] over a KV cache [B, Hkv, S, D], with a sliding window
    of `window` positions if > 0; see _C.attention."""
    out = torch.empty_like(q)
    _C.attention(q, k_cache, v_cache, out, q_start, kv_len, scale, window)
    return out


@attention.register_fake
def _(q, k_cache, v_cache, q_start, kv_len, scale, window=0):
    return torch.empty_like(q)


def attention_reference(q, k_cache, v_cache, q_start, kv_len, scale, window=0):
    """Plain torch: expand KV heads, mask (causal, j < kv_len, and j > position - window with a sliding
    window), softmax. Result is [B, T, Hq, D]."""
    batch, q_len, num_q_heads, _ = q.shape
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    k = k_cache.repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    v = v_cache.repeat_interleave(group, dim=1)
    scores = torch.einsum("bthd,bhsd->bhts", q, k) * scale
    position = q_start.long()[:, None] + torch.arange(q_len)[None, :]  # [B, T]
    key = torch.arange(cache_len)[None, None, :]
    visible = (key <= position[:, :, None]) & (key < kv_len.long()[:, None, None])  # [B, T, S]
    if window:  # a padding query past kv_len + window keeps key kv_len - 1, as the kernel does
        back = torch.minimum(position - window, kv_len.long()[:, None] - 2)
        visible &= key > back[:, :, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Entries past kv_len get probability 0, but 0 * garbage can still be NaN: zero them.
    v = v.masked_fill(~(key[0, 0] < kv_len.long()[:, None])[:, None, :, None], 0.0)
    return torch.einsum("bhts,bhsd->bthd", probs, v)

# ---- int8 matmul: quantize_rows, W8A8 and weight-only int8 Linear, fp32 Linear ----------------
# Weights are [N, K] int8 (torch Linear layout) with one fp32 scale per output row; activations
# may have any leading dims ([..., K]), flattened to rows for the kernels.


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("pyengine::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q [..., K] int8, scale [...] fp32), x ~= q * scale."""
    x2 = _rows(x)
    q = torch.empty(x2.shape, dtype=torch.int8)
    scale = torch.empty(x2.shape[0], dtype=torch.float32)
    _C.quantize_rows(x2, q, scale)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


@quantize_rows.register_fake
def _(x):
    return torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[:-1], dtype=torch.float32)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    q = torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(x), torch.round(x / safe))
    return q.clamp(-127, 127).to(torch.int8), scale


@torch.library.custom_op("pyengine::int8_matmul_i32", mutates_args=())
def int8_matmul_i32(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 a_q @ b_q^T for int8 [M, K] x [N, K] (values in [-127, 127])."""
    out = torch.empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32)
    _C.int8_matmul_i32(a_q, b_q, out)
    return out


@int8_matmul_i32.register_fake
def _(a_q, b_q):
    return a_q.new_empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32)


def int8_matmul_i32_reference(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    return (a_q.long() @ b_q.long().T).to(torch.int32)


@torch.library.custom_op("pyengine::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 Linear with dynamic per-token activation quantization. x [..., K] -> [..., N]."""
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w_q.shape[0], dtype=torch.float32)
    _C.int8_linear(x2, w_q, w_scale, out, bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@int8_linear.register_fake
def _(x, w_q, w_scale, bias=None):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


def int8_linear_reference(x, w_q, w_scale, bias=None):
    x_q, x_scale = quantize_rows_reference(_rows(x))
    acc = int8_matmul_i32_reference(x_q, w_q).float()
    out = acc * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op("pyengine::int8_linear_wo", mutates_args=())
def int8_linear_wo(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 Linear: x @ (w_q * w_scale[:, None])^T + bias, fp32 activations."""
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w_q.shape[0], dtype=torch.float32)
    _C.int8_linear_wo(x2, w_q, w_scale, out, bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@int8_linear_wo.register_fake
def _(x, w_q, w_scale, bias=None):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


def int8_linear_wo_reference(x, w_q, w_scale, bias=None):
    return torch.nn.functional.linear(x, w_q.float() * w_scale[:, None], bias)


@torch.library.custom_op("pyengine::linear_f32", mutates_args=())
def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 Linear: x @ w^T + bias. x [..., K], w [N, K]."""
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
    _C.linear_f32(x2, w, out, bias)
    return out.reshape(*x.shape[:-1], w.shape[0])


@linear_f32.register_fake
def _(x, w, bias=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear_f32_reference(x, w, bias=None):
    return torch.nn.functional.linear(x, w, bias)


# ---- int8_linear_a16: W8A16 Linear for decode (int16 activations x int8 weights, exact sums) ----


@torch.library.custom_op("pyengine::int8_linear_a16", mutates_args=())
def int8_linear_a16(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 Linear: x rows quantized to int16 per row, exact integer dot products with the int8
    weights, then scaled. x [..., K] -> [..., N]. Meant for few rows (decode)."""
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], w_q.shape[0], dtype=torch.float32)
    _C.int8_linear_a16(x2, w_q, w_scale, out, bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@int8_linear_a16.register_fake
def _(x, w_q, w_scale, bias=None):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


def quantize_rows_i16_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int16 (as int8_linear_a16 quantizes activations): scale = max|x| / 32767."""
    scale = x.abs().amax(-1) / 32767
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    q = torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(x), torch.round(x / safe))
    return q.clamp(-32767, 32767).to(torch.int16), scale


def int8_linear_a16_reference(x, w_q, w_scale, bias=None):
    x_q, x_scale = quantize_rows_i16_reference(_rows(x))
    acc = (x_q.long() @ w_q.long().T).float()  # exact int64 sums, rounded to fp32 once
    out = acc * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w_q.shape[0])
