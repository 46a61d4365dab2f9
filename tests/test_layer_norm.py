import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params

AWKWARD_DIMS = [1, 2, 7, 8, 9, 15, 16, 17, 64, 576, 1001]


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def exact_layer_norm(x, weight, bias, eps):
    b = bias.double() if bias is not None else None
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), b, eps).float()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dim", AWKWARD_DIMS)
def test_layer_norm_matches_torch(isa, dim, with_bias):
    torch.manual_seed(dim)
    x = torch.randn(3, dim) * 2 + 0.5
    weight = torch.randn(dim)
    bias = torch.randn(dim) if with_bias else None
    out = ops.layer_norm(x, weight, bias, 1e-5)
    torch.testing.assert_close(out, exact_layer_norm(x, weight, bias, 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.layer_norm(x, (dim,), weight, bias, 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, kernels.layer_norm_reference(x, weight, bias, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 3, 5, 64), (300, 128), (1024,)])
def test_layer_norm_any_rank_and_threaded_sizes(isa, shape):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(shape), torch.randn(shape[-1]), torch.randn(shape[-1])
    torch.testing.assert_close(ops.layer_norm(x, weight, bias, 1e-5), exact_layer_norm(x, weight, bias, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_layer_norm_large_mean_small_spread(isa):
    # The mean dwarfs the spread: a one-pass E[x^2] - E[x]^2 would lose every digit here.
    torch.manual_seed(2)
    x = 1000.0 + torch.randn(4, 1001) * 0.5
    weight, bias = torch.ones(1001), torch.zeros(1001)
    expected = exact_layer_norm(x, weight, bias, 1e-5)
    # x itself holds only ~6e-5 absolute precision at 1000; relative to the spread 0.5 that is ~1e-4.
    torch.testing.assert_close(ops.layer_norm(x, weight, bias, 1e-5), expected, rtol=1e-4, atol=2e-4)


def test_layer_norm_constant_row_gives_bias(isa):
    x = torch.full((2, 37), 3.25)
    bias = torch.randn(37)
    torch.testing.assert_close(ops.layer_norm(x, torch.randn(37), bias, 1e-5), bias.expand(2, 37), rtol=0, atol=1e-6)


def test_layer_norm_in_place(isa):
    torch.manual_seed(3)
    x, weight, bias = torch.randn(5, 100), torch.randn(100), torch.randn(100)
    expected = exact_layer_norm(x, weight, bias, 1e-5)
    _C.layer_norm(x, weight, bias, x, 1e-5)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 9), (4, 576), (70, 1024)])
def test_add_layer_norm_updates_residual(isa, shape, with_bias):
    torch.manual_seed(4)
    residual, delta, weight = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
    bias = torch.randn(shape[-1]) if with_bias else None
    residual_ref = residual.clone()
    out = ops.add_layer_norm(residual, delta, weight, bias, 1e-5)
    expected = kernels.add_layer_norm_reference(residual_ref, delta, weight, bias, 1e-5)
    torch.testing.assert_close(residual, residual_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), dim=st.integers(1, 300), offset=st.sampled_from([0.0, 5.0, -20.0]),
       isa_name=st.sampled_from(ops.supported_isas()), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_random_shapes(rows, dim, offset, isa_name, seed):
    gen = torch.Generator().manual_seed(seed)  # drawn by hypothesis, so a failure replays exactly
    x = torch.randn(rows, dim, generator=gen) + offset
    weight, bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    with ops.use_isa(isa_name):
        out = ops.layer_norm(x, weight, bias, 1e-5)
    exact = exact_layer_norm(x, weight, bias, 1e-5)
    # fp32 rounding of x - mean costs up to ~eps * max|x| per element, and normalizing divides it by
    # the row's spread: a row far from zero with a small spread (offset -20, two values) is
    # ill-conditioned, so the allowed error grows with max|x| / std, as fp32 arithmetic must.
    std = (x.double().var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    condition = (x.double().abs().amax(-1, keepdim=True) / std).float()
    tol = 3e-5 + 1e-5 * exact.abs() + 16 * 2.0**-24 * condition * weight.abs().max()
    assert ((out - exact).abs() <= tol).all(), (out - exact).abs().max()


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8).half(), torch.randn(8), torch.randn(8), torch.empty(2, 8)), TypeError, "x: expected dtype float32"),
        (lambda: (torch.randn(8, 2).t(), torch.randn(8), torch.randn(8), torch.empty(2, 8)), ValueError, "x: must be contiguous"),
        (lambda: (torch.randn(0, 8), torch.randn(8), torch.randn(8), torch.empty(0, 8)), ValueError, "x: must not be empty"),
        (lambda: (torch.tensor(1.0), torch.randn(1), None, torch.tensor(1.0)), ValueError, "x: expected at least 1 dimension"),
        (lambda: (torch.randn(2, 8), torch.randn(7), torch.randn(8), torch.empty(2, 8)), ValueError, "weight: dimension 0"),
        (lambda: (torch.randn(2, 8), torch.randn(1, 8), torch.randn(8), torch.empty(2, 8)), ValueError, "weight: expected 1 dimensions"),
        (lambda: (torch.randn(2, 8), torch.randn(8).double(), torch.randn(8), torch.empty(2, 8)), TypeError, "weight: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.randn(9), torch.empty(2, 8)), ValueError, "bias: dimension 0"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.randn(8).half(), torch.empty(2, 8)), TypeError, "bias: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.randn(8), 0.0, torch.empty(2, 8)), TypeError, "bias: expected a torch.Tensor"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.randn(8), torch.empty(2, 9)), ValueError, "out: expected the shape of x"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.randn(8), torch.empty(8, 2).t()), ValueError, "out: must be contiguous"),
    ],
)
def test_layer_norm_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.layer_norm(*args(), 1e-5)


def test_layer_norm_rejects_bad_eps_and_shifted_overlap():
    with pytest.raises(ValueError, match="eps must be positive"):
        _C.layer_norm(torch.randn(2, 8), torch.randn(8), None, torch.empty(2, 8), 0.0)
    buf = torch.randn(20)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        _C.layer_norm(buf[:16].view(2, 8), torch.randn(8), None, buf[4:].view(2, 8), 1e-5)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda r: (r, torch.randn(2, 9), torch.randn(8), None, torch.empty(2, 8)), ValueError, "delta: expected the shape of residual"),
        (lambda r: (r, torch.randn(2, 8).double(), torch.randn(8), None, torch.empty(2, 8)), TypeError, "delta: expected dtype float32"),
        (lambda r: (r, torch.randn(2, 8), torch.randn(8), None, r), ValueError, "out: must not share memory with residual"),
        (lambda r: (r, r, torch.randn(8), None, torch.empty(2, 8)), ValueError, "delta: must not share memory with residual"),
        (lambda r: (r, torch.randn(2, 8), torch.randn(9), None, torch.empty(2, 8)), ValueError, "weight: dimension 0"),
        (lambda r: (r.t(), torch.randn(8, 2), torch.randn(2), None, torch.empty(8, 2)), ValueError, "residual: must be contiguous"),
        (lambda r: (r, torch.randn(2, 8), torch.randn(8), torch.randn(8), torch.empty(2, 8).half()), TypeError, "out: expected dtype float32"),
    ],
)
def test_add_layer_norm_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.add_layer_norm(*args(torch.randn(2, 8)), 1e-5)
