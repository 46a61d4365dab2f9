import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import NewGELUActivation

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params

AWKWARD_DIMS = [1, 2, 7, 8, 9, 64, 576, 1001]


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def exact_gelu(x):
    """gelu_new in float64, rounded once."""
    return kernels.gelu_reference(x.double()).float()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dim", AWKWARD_DIMS)
def test_gelu_matches_reference(isa, rows, dim):
    torch.manual_seed(dim)
    x = torch.randn(rows, dim) * 3
    out = ops.gelu(x)
    torch.testing.assert_close(out, exact_gelu(x), rtol=1e-6, atol=1e-6)
    # transformers' own module, in float32 (its 1 + tanh cancels for negative x: hence atol).
    torch.testing.assert_close(out, NewGELUActivation()(x), rtol=1e-5, atol=1e-6)


def test_gelu_large_tensor_uses_threads(isa):
    torch.manual_seed(0)
    x = torch.randn(9, 30001) * 4
    torch.testing.assert_close(ops.gelu(x), exact_gelu(x), rtol=1e-6, atol=1e-6)


def test_gelu_extreme_inputs(isa):
    x = torch.tensor([-3e38, -1e20, -1e4, -100.0, -20.0, -10.0, -5.0, -1e-30, 0.0, 1e-30,
                      5.0, 10.0, 20.0, 100.0, 1e4, 1e20, 3e38])
    out = ops.gelu(x)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out, exact_gelu(x), rtol=2e-6, atol=1e-30)
    assert (out[:4].abs() < 1e-30).all()  # far left: 0, not NaN from inf * 0
    assert out[-1] == 3e38 and out[-2] == 1e20


def test_gelu_propagates_nan(isa):
    assert ops.gelu(torch.full((11,), float("nan"))).isnan().all()


def test_gelu_in_place(isa):
    torch.manual_seed(1)
    x = torch.randn(4, 333)
    expected = exact_gelu(x)
    _C.gelu(x, x)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), scale=st.sampled_from([0.1, 3.0, 30.0]),
       isa_name=st.sampled_from(ops.supported_isas()), seed=st.integers(0, 2**31 - 1))
def test_gelu_random_shapes(shape, scale, isa_name, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale  # replays on failure
    with ops.use_isa(isa_name):
        out = ops.gelu(x)
    torch.testing.assert_close(out, exact_gelu(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8).double(), torch.empty(2, 8)), TypeError, "x: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 8).half()), TypeError, "out: expected dtype float32"),
        (lambda: (torch.randn(8, 2).t(), torch.empty(2, 8)), ValueError, "x: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.empty(8, 2).t()), ValueError, "out: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 9)), ValueError, "out: expected the shape of x"),
        (lambda: (torch.randn(0), torch.empty(0)), ValueError, "x: must not be empty"),
        (lambda: ("x", torch.empty(2, 8)), TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_gelu_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.gelu(*args())


def test_gelu_rejects_shifted_overlap():
    buf = torch.randn(20)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        _C.gelu(buf[:16], buf[4:])


# ---- gelu_mul (GeGLU) and softcap: the ops Gemma's decode plan replays ------------------------------


@pytest.mark.parametrize("dim", AWKWARD_DIMS)
def test_gelu_mul_matches_reference_on_strided_halves(isa, dim):
    torch.manual_seed(dim)
    gate_up = torch.randn(3, 2 * dim) * 3
    gate, up = gate_up.chunk(2, dim=-1)  # the halves of a fused projection, read in place
    expected = (kernels.gelu_reference(gate.double()) * up.double()).float()
    out = torch.empty(3, dim)
    _C.gelu_mul(gate, up, out)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)
    up_copy = up.contiguous()
    _C.gelu_mul(gate.contiguous(), up_copy, up_copy)  # in place over up
    assert torch.equal(up_copy, out)


def test_softcap_matches_reference(isa):
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([0.0, -3e38, 3e38, float("inf")])])
    out = ops.softcap(x, 30.0)
    torch.testing.assert_close(out, kernels.softcap_reference(x.double(), 30.0).float(), rtol=1e-6, atol=1e-5)
    assert out.abs().max() <= 30.0


@pytest.mark.parametrize(
    "op, args, error, message",
    [
        ("gelu_mul", lambda: (torch.randn(2, 8), torch.randn(2, 9), torch.empty(2, 8)), ValueError,
         "up: expected the shape of gate"),
        ("gelu_mul", lambda: (torch.randn(2, 8).double(), torch.randn(2, 8), torch.empty(2, 8)), TypeError,
         "gate: expected dtype float32"),
        ("gelu_mul", lambda: (torch.randn(2, 3, 8)[:, :, :4], torch.randn(2, 3, 4), torch.empty(2, 3, 4)), ValueError,
         "gate: must be contiguous, or 2-D"),
        ("softcap", lambda: (torch.randn(4), torch.empty(4), 0.0), ValueError, "cap must be positive"),
        ("softcap", lambda: (torch.randn(4), torch.empty(5), 1.0), ValueError, "out: expected the shape of x"),
    ],
)
def test_gelu_mul_and_softcap_reject_bad_arguments(op, args, error, message):
    with pytest.raises(error, match=message):
        getattr(_C, op)(*args())
