"""torch.library.opcheck over every pyengine custom op: the schema (declared mutations match what
the op really mutates), the fake (meta) kernel against the real one, and the op under
aot_dispatch / torch.compile's tracing. One case per op, on small realistic inputs; the op list is
read from pyengine.ops, so a new op without a case here fails test_every_op_has_a_case."""
import pytest
import torch

from pyengine import ops


def _gen():
    return torch.Generator().manual_seed(0)


def _rope_args(interleaved):
    g = _gen()
    B, T, H, D, P = 2, 5, 3, 16, 12
    angles = torch.arange(P)[:, None] * torch.rand(D // 2, generator=g)[None, :]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], dtype=torch.int32)
    return (torch.randn(B, T, H, D, generator=g), angles.cos(), angles.sin(), positions, interleaved)


def _attention_args(window):
    g = _gen()
    q = torch.randn(2, 3, 6, 16, generator=g)
    k, v = torch.randn(2, 2, 10, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g)
    return (q, k, v, torch.tensor([7, 1], dtype=torch.int32), torch.tensor([10, 4], dtype=torch.int32), 0.25, window)


def _weights(n, k):
    return ops.quantize_rows(torch.randn(n, k, generator=_gen()) * 0.05)


# op name -> list of (id, args builder). Builders, so every check gets fresh inputs.
CASES = {
    "rms_norm": [("2d", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(40), 1e-5)),
                 ("3d", lambda: (torch.randn(2, 3, 33, generator=_gen()), torch.randn(33), 1e-6))],
    "add_rms_norm": [("2d", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(3, 40), torch.randn(40), 1e-5))],
    "silu_mul": [("2d", lambda: (torch.randn(4, 24, generator=_gen()), torch.randn(4, 24)))],
    "gelu": [("3d", lambda: (torch.randn(2, 3, 20, generator=_gen()),))],
    "gelu_mul": [("2d", lambda: (torch.randn(4, 24, generator=_gen()), torch.randn(4, 24)))],
    "softcap": [("3d", lambda: (torch.randn(2, 3, 20, generator=_gen()) * 50, 30.0))],
    "rope": [("neox", lambda: _rope_args(False)), ("interleaved", lambda: _rope_args(True))],
    "layer_norm": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(40), torch.randn(40), 1e-5)),
                   ("no_bias", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(40), None, 1e-5))],
    "add_layer_norm": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(3, 40), torch.randn(40),
                                         torch.randn(40), 1e-5)),
                       ("no_bias", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(3, 40), torch.randn(40),
                                            None, 1e-5))],
    "embedding": [("1d", lambda: (torch.tensor([0, 5, 5, 9]), torch.randn(10, 24, generator=_gen()))),
                  ("2d", lambda: (torch.tensor([[1, 2, 3], [9, 0, 4]]), torch.randn(10, 24, generator=_gen())))],
    "attention": [("causal", lambda: _attention_args(0)), ("window", lambda: _attention_args(3))],
    "quantize_rows": [("3d", lambda: (torch.randn(2, 3, 40, generator=_gen()),))],
    "int8_matmul_i32": [("2d", lambda: (_weights(3, 40)[0], _weights(5, 40)[0]))],
    "int8_linear": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), *_weights(6, 40), torch.randn(6))),
                    ("no_bias_3d", lambda: (torch.randn(2, 3, 40, generator=_gen()), *_weights(6, 40)))],
    "int8_linear_wo": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), *_weights(6, 40), torch.randn(6))),
                       ("prefill", lambda: (torch.randn(20, 40, generator=_gen()), *_weights(6, 40)))],
    "int8_linear_a16": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), *_weights(6, 40), torch.randn(6))),
                        ("prefill_3d", lambda: (torch.randn(2, 10, 40, generator=_gen()), *_weights(6, 40)))],
    "linear_f32": [("bias", lambda: (torch.randn(3, 40, generator=_gen()), torch.randn(6, 40), torch.randn(6))),
                   ("prefill_3d", lambda: (torch.randn(2, 10, 40, generator=_gen()), torch.randn(6, 40)))],
}


def registered_ops():
    return {name: op for name, op in vars(ops).items() if isinstance(op, torch.library.CustomOpDef)}


def test_every_op_has_a_case():
    registered = registered_ops()
    assert set(registered) == set(CASES)
    # Every op pyengine registers with torch lives in pyengine.ops (none registered elsewhere).
    in_namespace = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyengine::")}
    assert in_namespace == set(registered)


@pytest.mark.parametrize("name, build", [pytest.param(n, b, id=f"{n}-{i}") for n, cases in CASES.items()
                                         for i, b in cases])
def test_opcheck(name, build):
    torch.library.opcheck(getattr(ops, name), build())


# opcheck's schema test catches an undeclared mutation; these pin which arguments are declared.
@pytest.mark.parametrize("name, mutated", [("add_rms_norm", {"residual"}), ("add_layer_norm", {"residual"}),
                                           ("rope", {"x"})] + [(n, set()) for n in
                                                               ("rms_norm", "silu_mul", "gelu", "gelu_mul", "softcap", "layer_norm",
                                                                "embedding", "attention", "quantize_rows",
                                                                "int8_matmul_i32", "int8_linear", "int8_linear_wo",
                                                                "int8_linear_a16", "linear_f32")])
def test_declared_mutations(name, mutated):
    schema = getattr(torch.ops.pyengine, name).default._schema
    declared = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert declared == mutated


def test_mutating_ops_really_mutate_only_what_they_declare():
    """The in-place halves, observed directly: residual / x change, every other input is untouched."""
    res, delta, w = (torch.randn(3, 40, generator=_gen()), torch.randn(3, 40), torch.randn(40))
    before = res.clone()
    d0, w0 = delta.clone(), w.clone()
    ops.add_rms_norm(res, delta, w, 1e-5)
    assert torch.equal(res, before + delta) and torch.equal(delta, d0) and torch.equal(w, w0)
    res = before.clone()
    ops.add_layer_norm(res, delta, w, None, 1e-5)
    assert torch.equal(res, before + delta) and torch.equal(delta, d0)
    x, cos, sin, positions, interleaved = _rope_args(False)
    expected = ops.rope_reference(x, cos, sin, positions, interleaved)
    c0, s0, p0 = cos.clone(), sin.clone(), positions.clone()
    assert ops.rope(x, cos, sin, positions, interleaved) is None
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cos, c0) and torch.equal(sin, s0) and torch.equal(positions, p0)
