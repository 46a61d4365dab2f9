"""Python wrappers of the CUDA kernels (``_C.cuda_*``): allocate the outputs and launch on the
current stream of the inputs' device. Nothing synchronizes.

Each raises RuntimeError when the extension was built without CUDA (``_C.cuda_built`` False), and
the bindings raise ValueError/TypeError naming the argument for a CPU tensor, a wrong dtype,
shape, device or layout. The maths (and the CPU reference each is tested against) is that of the op
of the same name in ``pyengine.ops``; the CUDA versions also take float16 and bfloat16.
"""
from __future__ import annotations

import torch

from pyengine import _C


def _require_cuda_build() -> None:
    if not getattr(_C, "cuda_built", False):
        raise RuntimeError("pyengine was built without CUDA kernels (no nvcc at build time): _C.cuda_built is False")


def _stream(t: torch.Tensor) -> int:
    """The current stream of t's device as an int; 0 for a CPU tensor (the binding then rejects it)."""
    if not t.is_cuda:
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def is_available() -> bool:
    """Built with CUDA kernels and at least one GPU usable from here."""
    return bool(getattr(_C, "cuda_built", False)) and _C.cuda_device_count() > 0


def device_count() -> int:
    _require_cuda_build()
    return _C.cuda_device_count()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _require_cuda_build()
    out = torch.empty_like(x)
    _C.cuda_rms_norm(x, weight, out, eps, _stream(x))
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place); returns rms_norm(residual)."""
    _require_cuda_build()
    out = torch.empty_like(residual)
    _C.cuda_add_rms_norm(residual, delta, weight, out, eps, _stream(residual))
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
         interleaved: bool = False) -> None:
    """Rotates x [B, T, H, D] in place; cos/sin [P, D/2] float32, positions [B, T] int32."""
    _require_cuda_build()
    _C.cuda_rope(x, cos, sin, positions, interleaved, _stream(x))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _require_cuda_build()
    out = torch.empty_like(gate)
    _C.cuda_silu_mul(gate, up, out, _stream(gate))
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
              kv_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of q [B, T, Hq, D] over a KV cache [B, Hkv, S, D]; D 64 or 128."""
    _require_cuda_build()
    out = torch.empty_like(q)
    _C.cuda_attention(q, k_cache, v_cache, out, q_start, kv_len, scale, _stream(q))
    return out


def int8_linear_wo(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 Linear (the decode GEMV): x [..., K] -> [..., N] in x's dtype."""
    _require_cuda_build()
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], w_q.shape[0])
    _C.cuda_int8_gemv(x2, w_q, w_scale, out, bias, _stream(x))
    return out.reshape(*x.shape[:-1], w_q.shape[0])


int8_gemv = int8_linear_wo


def int8_matmul_i32(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 a_q @ b_q.T for int8 [M, K] x [N, K], K a multiple of 32 (tensor cores)."""
    _require_cuda_build()
    out = a_q.new_empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32)
    _C.cuda_int8_gemm_i32(a_q, b_q, out, _stream(a_q))
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [..., K] int8, scale [...] float32), x ~= q * scale."""
    _require_cuda_build()
    x2 = x.reshape(-1, x.shape[-1])
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _C.cuda_quantize_rows(x2, q, scale, _stream(x))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 Linear (prefill): per-token quantize, int8 tensor-core GEMM, rescale in fp32."""
    x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    acc = int8_matmul_i32(x_q, w_q)
    out = acc.float() * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
