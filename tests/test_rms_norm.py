import pytest
import torch

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


# rms_norm and add_rms_norm against the reference on every ISA, shape and device: test_backend_ops.py.


@pytest.mark.parametrize("shape", [(3, 576), (5, 1000), (2, 3, 4096), (130, 64)])
def test_rms_norm_wide_and_many_rows(isa, shape):
    """Rows wider than the harness's samples (several vector blocks and a tail) and more rows than threads."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1])
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), kernels.rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_rms_norm_in_place_alias():
    x = torch.randn(3, 64)
    w = torch.randn(64)
    expected = kernels.rms_norm_reference(x, w, 1e-5)
    _C.rms_norm(x, w, x, 1e-5)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8).half(), torch.randn(8), torch.empty(2, 8)), TypeError, "x: expected dtype float32"),
        (lambda: (torch.randn(8, 2).t(), torch.randn(8), torch.empty(2, 8)), ValueError, "x: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(7), torch.empty(2, 8)), ValueError, "weight: dimension 0"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.empty(2, 9)), ValueError, "out: dimension 1"),
        (lambda: (torch.randn(0, 8), torch.randn(8), torch.empty(0, 8)), ValueError, "must not be empty"),
        (lambda: ([1.0], torch.randn(8), torch.empty(2, 8)), TypeError, "expected a torch.Tensor"),
        (lambda: (torch.randn(2, 8, dtype=torch.float64), torch.randn(8), torch.empty(2, 8)), TypeError, "float32"),
    ],
)
def test_rms_norm_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.rms_norm(*args(), 1e-5)


def test_rms_norm_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        _C.rms_norm(torch.randn(2, 8), torch.randn(8), torch.empty(2, 8), 0.0)


def test_add_rms_norm_rejects_aliasing():
    r = torch.randn(2, 8)
    with pytest.raises(ValueError, match="must not share memory"):
        _C.add_rms_norm(r, torch.randn(2, 8), torch.randn(8), r, 1e-5)


def test_isa_control():
    assert ops.detected_isa() in ops.isa_levels()
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.set_isa("sse9")
    with ops.use_isa("scalar"):
        assert ops.active_isa() == "scalar"
    assert ops.active_isa() == ops.detected_isa()
