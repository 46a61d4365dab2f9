"""torch.library.opcheck over every pyengine custom op: the schema (declared mutations match what
the op really mutates), the fake (meta) kernel against the real one, and the op under
aot_dispatch / torch.compile's tracing. The inputs are the registry's own samples (pyengine.kernels),
the first few per op, so a new op is covered by its entry."""
import pytest
import torch

from pyengine import kernels
from pyengine.kernels import ops

CASES_PER_OP = 2


def _rope_args(interleaved):
    g = torch.Generator().manual_seed(0)
    B, T, H, D, P = 2, 5, 3, 16, 12
    angles = torch.arange(P)[:, None] * torch.rand(D // 2, generator=g)[None, :]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], dtype=torch.int32)
    return (torch.randn(B, T, H, D, generator=g), angles.cos(), angles.sin(), positions, interleaved)


def _opcheck_params():
    params = []
    for name, entry in kernels.REGISTRY.items():
        dtype = entry.dtypes["cpu"][0]
        for case in entry.samples(torch.device("cpu"), dtype)[:CASES_PER_OP]:
            params.append(pytest.param(name, case.args, id=f"{name}-{case.label}"))
    return params


def registered_ops():
    return {name: op for name, op in vars(ops).items() if isinstance(op, torch.library.CustomOpDef)}


def test_every_op_is_a_registry_entry():
    registered = registered_ops()
    assert set(registered) == set(kernels.REGISTRY)
    # Every op pyengine registers with torch lives in pyengine.kernels.ops (none registered elsewhere).
    in_namespace = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyengine::")}
    assert in_namespace == set(registered)


@pytest.mark.parametrize("name, args", _opcheck_params())
def test_opcheck(name, args):
    entry = kernels.REGISTRY[name]
    names = entry.arg_names
    args = tuple(a.clone() if n in entry.mutates else a for n, a in zip(names, args))
    torch.library.opcheck(getattr(ops, name), args)


# opcheck's schema test catches an undeclared mutation; these pin which arguments are declared.
@pytest.mark.parametrize("name, mutated", [("add_rms_norm", {"residual"}), ("add_layer_norm", {"residual"}),
                                           ("rope", {"x"})] + [(n, set()) for n in
                                                               ("rms_norm", "silu_mul", "gelu", "gelu_mul", "softcap", "layer_norm",
                                                                "embedding", "attention", "quantize_rows",
                                                                "int8_matmul_i32", "int8_linear_w8a8", "int8_linear_wo",
                                                                "int8_linear_a16", "linear_f32", "linear_bf16",
                                                                "argmax_rows")])
def test_declared_mutations(name, mutated):
    schema = getattr(torch.ops.pyengine, name).default._schema
    declared = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert declared == mutated


def test_mutating_ops_really_mutate_only_what_they_declare():
    """The in-place halves, observed directly: residual / x change, every other input is untouched."""
    g = torch.Generator().manual_seed(0)
    res, delta, w = (torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(40, generator=g))
    before = res.clone()
    d0, w0 = delta.clone(), w.clone()
    ops.add_rms_norm(res, delta, w, 1e-5)
    assert torch.equal(res, before + delta) and torch.equal(delta, d0) and torch.equal(w, w0)
    res = before.clone()
    ops.add_layer_norm(res, delta, w, None, 1e-5)
    assert torch.equal(res, before + delta) and torch.equal(delta, d0)
    x, cos, sin, positions, interleaved = _rope_args(False)
    expected = x.clone()
    kernels.rope_reference(expected, cos, sin, positions, interleaved)
    c0, s0, p0 = cos.clone(), sin.clone(), positions.clone()
    assert ops.rope(x, cos, sin, positions, interleaved) is None
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cos, c0) and torch.equal(sin, s0) and torch.equal(positions, p0)
