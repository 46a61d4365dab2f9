"""CUDA kernels (the CUDA twins of the registry's ops, pyengine.kernels) against the references on the GPU.

The GPU tests skip where there is no GPU or the extension was built without nvcc; the tests at the
top run everywhere: the module answers without a driver or a CUDA build, and half precision is
refused on the CPU with a clear error.
"""
import math
from pathlib import Path

import pytest
import torch

from pyengine import _C, kernels
from pyengine.kernels import cuda as pcuda

pytestmark = pytest.mark.cuda


def _gpu_skip_reason():
    if not getattr(_C, "cuda_built", False):
        return "pyengine was built without CUDA kernels (_C.cuda_built is False)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


requires_gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
HALF_TYPES = [torch.float16, torch.bfloat16]


# ---- without a GPU ------------------------------------------------------------------------------

def test_device_count_never_raises():
    count = _C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not _C.cuda_built:
        assert count == 0
    elif torch.cuda.is_available():
        assert count == torch.cuda.device_count()
    elif not Path("/dev/nvidia0").exists():
        assert count == 0  # no driver: 0, not an exception
    assert pcuda.is_available() == (count > 0) == (pcuda.device_count() > 0)


def _half_precision_calls():
    x = torch.randn(2, 3, 4, 64, dtype=torch.float16)
    w = torch.ones(64, dtype=torch.float16)
    cos = sin = torch.ones(8, 32)
    positions = torch.zeros(2, 3, dtype=torch.int32)
    k = torch.randn(2, 4, 8, 64, dtype=torch.float16)
    q_start = torch.zeros(2, dtype=torch.int32)
    w_q = torch.ones(16, 64, dtype=torch.int8)
    return {
        "rms_norm": lambda: kernels.rms_norm(x, w, 1e-5),
        "add_rms_norm": lambda: kernels.add_rms_norm(x.clone(), x, w, 1e-5),
        "rope": lambda: kernels.rope(x.clone(), cos, sin, positions),
        "silu_mul": lambda: kernels.silu_mul(x, x),
        "attention": lambda: kernels.attention(x, k, k, q_start, q_start + 1, 0.125),
        "int8_linear_wo": lambda: kernels.int8_linear_wo(x[0, 0], w_q, torch.ones(16)),
        "quantize_rows": lambda: kernels.quantize_rows(x[0, 0]),
    }


@pytest.mark.parametrize("name", list(_half_precision_calls()))
def test_half_precision_runs_on_cuda_only(name):
    """One binding per op, checks per device: float16 is a CUDA dtype; on the CPU it is a TypeError
    naming the argument."""
    with pytest.raises(TypeError, match=r"^\w+: expected dtype float32, got float16"):
        _half_precision_calls()[name]()


# ---- attention ----------------------------------------------------------------------------------

def _attention_inputs(batch, q_len, num_q_heads, num_kv_heads, head_dim, cache_len, q_start, kv_len, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, q_len, num_q_heads, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, num_kv_heads, cache_len, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, num_kv_heads, cache_len, head_dim, device="cuda", generator=g).to(dtype)
    # Poison the cache past each kv_len: the kernel must never read it.
    for b, n in enumerate(kv_len):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("inf")
    as_i32 = lambda values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    return q, k, v, as_i32(q_start), as_i32(kv_len)


def _check_attention(q, k, v, q_start, kv_len, scale, tol):
    out = kernels.attention(q, k, v, q_start, kv_len, scale)
    torch.cuda.synchronize()
    # The reference in fp32 from the same (rounded) inputs; attention_reference builds its masks on the CPU.
    expected = kernels.attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), q_start.cpu(),
                                       kv_len.cpu(), scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol)
    return out


def _sdpa(q, k, v, group, causal):
    """torch's SDPA on [B, T, Hq, D] q and [B, Hkv, S, D] caches (all S entries valid)."""
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=causal)
    return out.transpose(1, 2)


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("q_len", [1, 17, 128, 512])
def test_attention_prefill(q_len, group, head_dim, dtype):
    num_kv_heads = 2
    # Ragged: sequence 0 starts empty, sequence 1 continues after 5 cached tokens; spare capacity.
    q_start, kv_len = [0, 5], [q_len, 5 + q_len]
    q, k, v, qs, kl = _attention_inputs(2, q_len, group * num_kv_heads, num_kv_heads, head_dim, q_len + 9,
                                        q_start, kv_len, dtype)
    _check_attention(q, k, v, qs, kl, 1 / math.sqrt(head_dim), tol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("cache_len", [1, 100, 1024, 4096])
def test_attention_decode(cache_len, group, head_dim, dtype):
    num_kv_heads = 2
    kv_len = [cache_len, max(1, cache_len // 3)]  # full cache and a shorter sequence
    q_start = [n - 1 for n in kv_len]
    q, k, v, qs, kl = _attention_inputs(2, 1, group * num_kv_heads, num_kv_heads, head_dim, cache_len, q_start,
                                        kv_len, dtype)
    _check_attention(q, k, v, qs, kl, 1 / math.sqrt(head_dim), tol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("q_len", [1, 17, 128, 512])
def test_attention_matches_sdpa_causal_prefill(q_len, group, head_dim, dtype):
    q, k, v, qs, kl = _attention_inputs(1, q_len, 2 * group, 2, head_dim, q_len, [0], [q_len], dtype, seed=1)
    out = kernels.attention(q, k, v, qs, kl, 1 / math.sqrt(head_dim))
    expected = _sdpa(q.float(), k.float(), v.float(), group, causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("cache_len", [1, 100, 1024, 4096])
def test_attention_matches_sdpa_decode(cache_len, group, dtype):
    head_dim = 128
    q, k, v, qs, kl = _attention_inputs(3, 1, 2 * group, 2, head_dim, cache_len, [cache_len - 1] * 3,
                                        [cache_len] * 3, dtype, seed=2)
    out = kernels.attention(q, k, v, qs, kl, 1 / math.sqrt(head_dim))
    expected = _sdpa(q.float(), k.float(), v.float(), group, causal=False)  # the last query sees every key
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("q_len,group", [(2, 8), (3, 5), (4, 4), (16, 1), (5, 4)])
def test_attention_few_rows_take_the_split_path(q_len, group):
    # q_len * group <= 16 runs the split (flash-decoding) kernel even for q_len > 1; causal still holds.
    kv_len = [700, 40]
    q_start = [n - q_len for n in kv_len]
    q, k, v, qs, kl = _attention_inputs(2, q_len, 2 * group, 2, 64, 800, q_start, kv_len, torch.float16, seed=3)
    _check_attention(q, k, v, qs, kl, 0.125, tol=2e-2)


@requires_gpu
def test_attention_float32_and_queries_past_the_cache():
    # fp32 storage; sequence 1's queries sit past kv_len (they see keys < kv_len only); a large scale.
    q, k, v, qs, kl = _attention_inputs(2, 40, 6, 2, 128, 96, [0, 70], [40, 64], torch.float32, seed=4)
    _check_attention(q, k, v, qs, kl, 0.5, tol=1e-4)


@requires_gpu
def test_attention_rejects_bad_arguments():
    q, k, v, qs, kl = _attention_inputs(1, 4, 4, 2, 64, 8, [0], [4], torch.float16)
    with pytest.raises(TypeError, match="k_cache"):
        kernels.attention(q, k.float(), v, qs, kl, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.attention(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), qs, kl, 0.1)
    with pytest.raises(ValueError, match="kv heads"):
        kernels.attention(q[:, :, :3].contiguous(), k, v, qs, kl, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.attention(q.transpose(1, 2), k, v, qs, kl, 0.1)
    with pytest.raises(ValueError, match="aligned"):
        flat = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
        kernels.attention(flat[1:].view(q.shape), k, v, qs, kl, 0.1)
    with pytest.raises(ValueError, match="q_start: is on cpu but q is on cuda:0"):
        kernels.attention(q, k, v, qs.cpu(), kl, 0.1)


# ---- int8 GEMM, GEMV, quantize ---------------------------------------------------------------------

def _int8(shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda", generator=g)


@requires_gpu
@pytest.mark.parametrize("M,N,K", [(1, 1, 32), (5, 3, 64), (16, 8, 96), (17, 8, 32), (64, 64, 64), (100, 72, 96),
                                   (33, 130, 4096), (200, 1000, 352), (129, 77, 160)])
def test_int8_gemm_exact(M, N, K):
    a, b = _int8((M, K), 0), _int8((N, K), 1)
    out = kernels.int8_matmul_i32(a, b)
    if M > 16 and K % 8 == 0 and N % 8 == 0:
        expected = torch._int_mm(a, b.t())
    else:
        expected = (a.cpu().long() @ b.cpu().long().t()).to(torch.int32).cuda()
    assert out.dtype == torch.int32
    assert torch.equal(out, expected)


@requires_gpu
def test_int8_gemm_rejects_k_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.int8_matmul_i32(_int8((4, 48), 0), _int8((4, 48), 1))
    with pytest.raises(ValueError, match="b: dimension 1"):
        kernels.int8_matmul_i32(_int8((4, 64), 0), _int8((4, 32), 1))


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 16), (1, 256, 4096), (3, 7, 40), (8, 300, 1024), (11, 64, 512),
                                   (2, 33, 1000)])
def test_int8_gemv_matches_dequantized_matmul(M, N, K, with_bias, dtype):
    g = torch.Generator(device="cuda").manual_seed(M * N + K)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    w_q = _int8((N, K), 5)
    w_scale = torch.rand(N, device="cuda", generator=g) * 0.02 + 0.001
    bias = torch.randn(N, device="cuda", generator=g).to(dtype) if with_bias else None
    out = kernels.int8_linear_wo(x, w_q, w_scale, bias)
    expected = x.float() @ (w_q.float() * w_scale[:, None]).t()
    if bias is not None:
        expected += bias.float()
    assert out.dtype == dtype and out.shape == (M, N)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@requires_gpu
def test_int8_gemv_unaligned_x_takes_the_scalar_path():
    x_buffer = torch.randn(3 * 64 + 1, device="cuda").half()
    x = x_buffer[1:].view(3, 64)  # contiguous but 2 bytes off 16-byte alignment
    w_q, w_scale = _int8((10, 64), 6), torch.full((10,), 0.01, device="cuda")
    expected = x.float() @ (w_q.float() * w_scale[:, None]).t()
    torch.testing.assert_close(kernels.int8_linear_wo(x, w_q, w_scale).float(), expected, rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_TYPES + [torch.float32])
@pytest.mark.parametrize("M,K", [(1, 1), (3, 100), (17, 4096), (64, 576)])
def test_quantize_rows_matches_reference(M, K, dtype):
    x = torch.randn(M, K, device="cuda").to(dtype)
    x[0, :] = 0  # an all-zero row: scale 0, q 0
    q, scale = kernels.quantize_rows(x)
    q_ref, scale_ref = kernels.quantize_rows_reference(x.float())
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


@requires_gpu
def test_w8a8_linear_close_to_float_matmul():
    x = torch.randn(40, 256, device="cuda").half()
    w = torch.randn(96, 256, device="cuda")
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    out = kernels.int8_linear_w8a8(x, w_q, w_scale)
    expected = x.float() @ w.t()
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


# ---- rms_norm, rope, silu_mul ------------------------------------------------------------------------

ELEMENT_TYPES = [torch.float16, torch.bfloat16, torch.float32]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 576), (4, 4096), (1, 10000)])
def test_rms_norm(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    w = torch.randn(shape[-1], device="cuda").to(dtype)
    out = kernels.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out.float(), kernels.rms_norm_reference(x.float(), w.float(), 1e-5), **_tol(dtype))
    in_place = x.clone()
    _C.rms_norm(in_place, w, in_place, 1e-5, stream=torch.cuda.current_stream().cuda_stream)
    assert torch.equal(in_place, out)


@requires_gpu
@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("shape", [(1, 3), (5, 576), (3, 2, 4096)])
def test_add_rms_norm(shape, dtype):
    residual = torch.randn(shape, device="cuda").to(dtype)
    delta = torch.randn(shape, device="cuda").to(dtype)
    w = torch.randn(shape[-1], device="cuda").to(dtype)
    expected_residual = residual + delta  # rounded to dtype, as the kernel stores it
    expected = kernels.rms_norm_reference(expected_residual.float(), w.float(), 1e-6)
    out = kernels.add_rms_norm(residual, delta, w, 1e-6)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), expected, **_tol(dtype))


@requires_gpu
@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 7, 3, 64), (1, 33, 9, 128)])
def test_rope(shape, interleaved, dtype):
    batch, seq, _, head_dim = shape
    positions_count = 64
    angles = torch.rand(positions_count, head_dim // 2, device="cuda") * 6
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, positions_count, (batch, seq), dtype=torch.int32, device="cuda")
    x = torch.randn(shape, device="cuda").to(dtype)
    expected = x.float().clone()
    kernels.rope_reference(expected, cos, sin, positions, interleaved)
    kernels.rope(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(x.float(), expected, **_tol(dtype))


@requires_gpu
def test_rope_leaves_out_of_range_positions_unrotated():
    cos, sin = torch.zeros(4, 32, device="cuda"), torch.ones(4, 32, device="cuda")
    x = torch.randn(1, 2, 2, 64, device="cuda")
    before = x.clone()
    kernels.rope(x, cos, sin, torch.tensor([[1, 4]], dtype=torch.int32, device="cuda"))
    assert not torch.equal(x[0, 0], before[0, 0])
    assert torch.equal(x[0, 1], before[0, 1])


@requires_gpu
@pytest.mark.parametrize("dtype", ELEMENT_TYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (4, 1536), (3, 5, 11008)])
def test_silu_mul(shape, dtype):
    gate = (torch.randn(shape, device="cuda") * 4).to(dtype)
    up = torch.randn(shape, device="cuda").to(dtype)
    out = kernels.silu_mul(gate, up)
    torch.testing.assert_close(out.float(), kernels.silu_mul_reference(gate.float(), up.float()), **_tol(dtype))
    _C.silu_mul(gate, up, gate, stream=torch.cuda.current_stream().cuda_stream)  # in place
    assert torch.equal(gate, out)


@requires_gpu
def test_elementwise_reject_bad_arguments():
    x = torch.randn(4, 8, device="cuda").half()
    with pytest.raises(TypeError, match="weight"):
        kernels.rms_norm(x, torch.ones(8, device="cuda"), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, torch.ones(7, device="cuda").half(), 1e-5)
    with pytest.raises(TypeError, match="gate"):
        kernels.silu_mul(x.to(torch.int32), x.to(torch.int32))
    with pytest.raises(ValueError, match="up"):
        kernels.silu_mul(x, x[:2].contiguous())
    with pytest.raises(ValueError, match="empty"):
        kernels.silu_mul(x[:0], x[:0])
