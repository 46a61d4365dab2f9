"""_C.argmax_rows (greedy decoding's choice, also the C++ decode steps' next_tokens) against numpy's
argmax, on every ISA: ties, NaN, infinities, signed zeros, lengths around the vector width."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyengine import _C
from pyengine.kernels import ops
from conftest import isa_params


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def argmax(x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0],), -1, dtype=torch.long)
    _C.argmax_rows(x, out)
    return out


def expected(x: torch.Tensor) -> list[int]:
    return x.numpy().argmax(axis=-1).tolist()


@pytest.mark.parametrize("cols", [1, 2, 7, 8, 9, 15, 16, 17, 33, 49152])
def test_argmax_matches_numpy_random(isa, cols):
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(5, cols, generator=gen) * 10
    assert argmax(x).tolist() == expected(x)


@pytest.mark.parametrize("cols", [1, 8, 9, 40, 1000])
def test_argmax_ties_take_the_first_index(isa, cols):
    for first in sorted({0, cols // 3, cols - 1}):
        x = torch.zeros(1, cols)
        x[0, first:] = 5.0  # every index from `first` on holds the maximum
        assert argmax(x).tolist() == [first], first
    x = torch.full((1, cols), -0.0)
    x[0, cols // 2] = 0.0  # 0.0 == -0.0: the first zero wins
    assert argmax(x).tolist() == [0]


@pytest.mark.parametrize("cols", [3, 8, 17, 1000])
def test_argmax_nan_and_infinities(isa, cols):
    gen = torch.Generator().manual_seed(cols)
    rows = torch.randn(6, cols, generator=gen)
    rows[0, cols - 1] = float("nan")                 # one NaN at the end: its index
    rows[1, 1] = float("nan")
    rows[1, cols - 1] = float("nan")                 # two: the first
    rows[2, cols // 2] = float("inf")                # +inf beats everything
    rows[3] = float("-inf")                          # all -inf: index 0
    rows[4, 0] = float("nan")
    rows[4, 1] = float("inf")                        # NaN before +inf: the NaN
    rows[5] = float("-inf")
    rows[5, cols - 1] = -3e38                        # the only finite value
    assert argmax(rows).tolist() == expected(rows)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 70)),
                    elements=st.floats(width=32, allow_nan=True) | st.sampled_from([0.0, -0.0, 1.0, float("nan")])))
def test_argmax_hypothesis_every_isa(x):
    t = torch.from_numpy(x.copy())
    for name in ops.supported_isas():
        with ops.use_isa(name):
            assert argmax(t).tolist() == expected(t), name


@pytest.mark.parametrize("x, out, error, message", [
    (torch.zeros(2, 3, dtype=torch.float64), torch.empty(2, dtype=torch.long), TypeError, "x: expected dtype float32"),
    (torch.zeros(3, 2).t(), torch.empty(2, dtype=torch.long), ValueError, "x: must be contiguous"),
    (torch.zeros(6), torch.empty(6, dtype=torch.long), ValueError, "x: expected 2 dimensions"),
    (torch.zeros(2, 0), torch.empty(2, dtype=torch.long), ValueError, "x: must not be empty"),
    (torch.zeros(2, 3), torch.empty(2, dtype=torch.int32), TypeError, "out: expected dtype int64"),
    (torch.zeros(2, 3), torch.empty(3, dtype=torch.long), ValueError, "out: dimension 0"),
    (torch.zeros(2, 3), torch.empty(2, 1, dtype=torch.long), ValueError, "out: expected 1 dimensions"),
    (torch.zeros(2, 3, device="meta"), torch.empty(2, dtype=torch.long), ValueError, "x: tensors on device 'meta'"),
])
def test_argmax_rejects_bad_arguments(x, out, error, message):
    with pytest.raises(error, match=message):
        _C.argmax_rows(x, out)


def test_argmax_rejects_an_out_inside_x():
    buffer = torch.zeros(8, dtype=torch.float32)
    x = buffer.view(2, 4)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        _C.argmax_rows(x, buffer.view(torch.int64)[:2])
