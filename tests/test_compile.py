"""The custom ops under torch.compile: a Llama decoder layer built from them traces as one graph
(fullgraph: no graph break at any op, mutating ones included) and computes what eager computes."""
import pytest
import torch

from pyengine.kernels import ops

B, T, HQ, HKV, D, I, S = 2, 5, 6, 2, 16, 40, 12
H = HQ * D


def layer(x, delta, norm1, norm2, w_qkv, w_out, gu_q, gu_scale, w_down, k_cache, v_cache, cos, sin, positions,
          q_start, kv_len):
    """One pre-norm layer with every step on a pyengine op (as pyengine/models/llama.py runs it)."""
    residual = x.clone()  # add_rms_norm updates its residual in place; keep the caller's x
    h = ops.add_rms_norm(residual, delta, norm1, 1e-5)
    q, k, v = ops.linear_f32(h, w_qkv).split((HQ * D, HKV * D, HKV * D), dim=-1)
    q = q.reshape(B, T, HQ, D).contiguous()
    k = k.reshape(B, T, HKV, D).contiguous()
    ops.rope(q, cos, sin, positions, False)
    ops.rope(k, cos, sin, positions, False)
    k_cache = k_cache.clone()
    v_cache = v_cache.clone()
    k_cache[:, :, :T] = k.transpose(1, 2)
    v_cache[:, :, :T] = v.reshape(B, T, HKV, D).transpose(1, 2)
    attn = ops.attention(q, k_cache, v_cache, q_start, kv_len, D ** -0.5)
    h = ops.add_rms_norm(residual, ops.linear_f32(attn.reshape(B, T, H), w_out), norm2, 1e-5)
    gate, up = ops.int8_linear_a16(h, gu_q, gu_scale).chunk(2, dim=-1)
    return residual, ops.linear_f32(ops.silu_mul(gate.contiguous(), up.contiguous()), w_down)


def inputs():
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    w_gate_up = r(2 * I, H) * 0.1
    gu_q, gu_scale = ops.quantize_rows(w_gate_up)
    angles = torch.arange(S)[:, None] * torch.rand(D // 2, generator=gen)[None, :]
    return (r(B, T, H), r(B, T, H), 1 + r(H) * 0.1, 1 + r(H) * 0.1, r(H + 2 * HKV * D, H) * 0.1, r(H, H) * 0.1,
            gu_q, gu_scale, r(H, I) * 0.1, torch.zeros(B, HKV, S, D), torch.zeros(B, HKV, S, D),
            angles.cos(), angles.sin(), torch.arange(T, dtype=torch.int32).repeat(B, 1),
            torch.zeros(B, dtype=torch.int32), torch.full((B,), T, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decoder_layer_compiles_as_one_graph_and_matches_eager(backend):
    torch._dynamo.reset()
    args = inputs()
    expected = layer(*args)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)  # a graph break raises
    got = compiled(*args)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # The caller's tensors are untouched, as in eager (the in-place ops worked on clones).
    torch.testing.assert_close(args[0], inputs()[0], rtol=0, atol=0)
    explanation = torch._dynamo.explain(layer)(*args)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code  # our ops stay opaque calls in the graph, not inlined torch
    for op in ["add_rms_norm", "linear_f32", "rope", "attention", "int8_linear_a16", "silu_mul"]:
        assert f"torch.ops.pyengine.{op}." in code, op
