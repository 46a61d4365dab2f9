import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C, kernels
from pyengine.kernels import ops

AWKWARD_DIMS = [1, 2, 7, 8, 9, 64, 576, 1001]


@pytest.mark.parametrize("dim", AWKWARD_DIMS)
def test_embedding_matches_torch(dim):
    torch.manual_seed(dim)
    table = torch.randn(50, dim)
    ids = torch.tensor([0, 49, 3, 3, 17, 0])
    out = ops.embedding(ids, table)
    assert torch.equal(out, kernels.embedding_reference(ids, table))
    assert torch.equal(out, table[ids])


@pytest.mark.parametrize("shape", [(1,), (2, 7), (3, 1, 5)])
def test_embedding_any_ids_shape(shape):
    torch.manual_seed(1)
    table = torch.randn(1000, 96)
    ids = torch.randint(0, 1000, shape)
    out = ops.embedding(ids, table)
    assert out.shape == (*shape, 96)
    assert torch.equal(out, torch.nn.functional.embedding(ids, table))


def test_embedding_large_batch_uses_threads():
    torch.manual_seed(2)
    table = torch.randn(32000, 576)
    ids = torch.randint(0, 32000, (4, 300))
    assert torch.equal(ops.embedding(ids, table), table[ids])


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 50), vocab=st.integers(1, 200), dim=st.integers(1, 130), seed=st.integers(0, 1000))
def test_embedding_random_shapes(count, vocab, dim, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, dim, generator=g)
    ids = torch.randint(0, vocab, (count,), generator=g)
    assert torch.equal(ops.embedding(ids, table), table[ids])


@pytest.mark.parametrize("bad, index", [(-1, 2), (50, 2), (2**62, 2), (-(2**63), 2)])
def test_embedding_rejects_out_of_range_ids_naming_them(bad, index):
    table = torch.randn(50, 8)
    ids = torch.tensor([1, 2, bad, 4])
    out = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=rf"ids: id {bad} \(at flat index {index}\) is outside .* \[0, 50\)"):
        _C.embedding(ids, table, out)
    assert torch.equal(out, torch.zeros(4, 8))  # nothing written


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.tensor([1, 2], dtype=torch.int32), torch.randn(5, 8), torch.empty(2, 8)), TypeError, "ids: expected dtype int64"),
        (lambda: (torch.tensor([1.0, 2.0]), torch.randn(5, 8), torch.empty(2, 8)), TypeError, "ids: expected dtype int64"),
        (lambda: (torch.tensor([[1, 2], [3, 4]]).t(), torch.randn(5, 8), torch.empty(2, 2, 8)), ValueError, "ids: must be contiguous"),
        (lambda: (torch.tensor([], dtype=torch.int64), torch.randn(5, 8), torch.empty(0, 8)), ValueError, "ids: must not be empty"),
        (lambda: (torch.tensor(1), torch.randn(5, 8), torch.empty(8)), ValueError, "ids: expected at least 1 dimension"),
        (lambda: (torch.tensor([1, 2]), torch.randn(5, 8).half(), torch.empty(2, 8)), TypeError, "table: expected dtype float32"),
        (lambda: (torch.tensor([1, 2]), torch.randn(40), torch.empty(2, 8)), ValueError, "table: expected 2 dimensions"),
        (lambda: (torch.tensor([1, 2]), torch.randn(8, 5).t(), torch.empty(2, 8)), ValueError, "table: must be contiguous"),
        (lambda: (torch.tensor([0]), torch.randn(0, 8), torch.empty(1, 8)), ValueError, "table: must not be empty"),
        (lambda: (torch.tensor([1, 2]), torch.randn(5, 8), torch.empty(2, 9)), ValueError, "out: dimension 1 must be 8"),
        (lambda: (torch.tensor([1, 2]), torch.randn(5, 8), torch.empty(3, 8)), ValueError, "out: dimension 0 must be 2"),
        (lambda: (torch.tensor([1, 2]), torch.randn(5, 8), torch.empty(16)), ValueError, "out: expected 2 dimensions"),
        (lambda: (torch.tensor([1, 2]), torch.randn(5, 8), torch.empty(2, 8).double()), TypeError, "out: expected dtype float32"),
        (lambda: ([1, 2], torch.randn(5, 8), torch.empty(2, 8)), TypeError, "ids: expected a torch.Tensor"),
    ],
)
def test_embedding_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.embedding(*args())


def test_embedding_rejects_out_overlapping_table():
    table = torch.randn(5, 8)
    with pytest.raises(ValueError, match="out: must not share memory with table"):
        _C.embedding(torch.tensor([1, 2]), table, table[:2])
