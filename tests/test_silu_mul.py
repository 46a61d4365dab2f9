import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params

AWKWARD_DIMS = [1, 2, 7, 8, 9, 64, 576, 1001]


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def exact_silu_mul(gate, up):
    """The maths in float64, rounded once: what a correctly rounded kernel would return."""
    return kernels.silu_mul_reference(gate.double(), up.double()).float()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dim", AWKWARD_DIMS)
def test_silu_mul_matches_reference(isa, rows, dim):
    torch.manual_seed(dim)
    gate, up = torch.randn(rows, dim) * 4, torch.randn(rows, dim)
    out = ops.silu_mul(gate, up)
    torch.testing.assert_close(out, exact_silu_mul(gate, up), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_silu_mul_large_rows_use_threads(isa):
    # Above the threading threshold, with a length that leaves a partial chunk and a SIMD tail.
    torch.manual_seed(0)
    gate, up = torch.randn(37, 8195) * 4, torch.randn(37, 8195)
    torch.testing.assert_close(ops.silu_mul(gate, up), exact_silu_mul(gate, up), rtol=1e-6, atol=1e-6)


def test_silu_mul_extreme_inputs(isa):
    gate = torch.tensor([-3e38, -1e4, -120.0, -89.0, -88.0, -87.0, -30.0, -1e-30, 0.0, 1e-30,
                         30.0, 87.0, 88.0, 89.0, 120.0, 1e4, 3e38])
    up = torch.ones_like(gate)
    out = ops.silu_mul(gate, up)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out, exact_silu_mul(gate, up), rtol=1e-6, atol=1e-30)
    # Very negative gates give (signed) zero or a vanishing value, never NaN; large ones pass through.
    assert (out[:3].abs() < 1e-30).all()
    assert out[-1] == 3e38 and out[-2] == 1e4


def test_silu_mul_propagates_nan(isa):
    gate = torch.tensor([float("nan")] * 9)
    assert ops.silu_mul(gate, torch.ones(9)).isnan().all()


@pytest.mark.parametrize("alias", ["gate", "up"])
def test_silu_mul_in_place(isa, alias):
    torch.manual_seed(1)
    gate, up = torch.randn(5, 77), torch.randn(5, 77)
    expected = exact_silu_mul(gate, up)
    out = gate if alias == "gate" else up
    _C.silu_mul(gate, up, out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 300), scale=st.sampled_from([0.1, 3.0, 40.0]),
       isa_name=st.sampled_from(ops.supported_isas()), seed=st.integers(0, 2**31 - 1))
def test_silu_mul_random_shapes(rows, dim, scale, isa_name, seed):
    gen = torch.Generator().manual_seed(seed)  # drawn by hypothesis, so a failure replays exactly
    gate, up = torch.randn(rows, dim, generator=gen) * scale, torch.randn(rows, dim, generator=gen)
    with ops.use_isa(isa_name):
        out = ops.silu_mul(gate, up)
    torch.testing.assert_close(out, exact_silu_mul(gate, up), rtol=1e-6, atol=1e-6)


def test_silu_mul_scalar_and_simd_agree():
    torch.manual_seed(2)
    gate, up = torch.randn(4, 1001) * 10, torch.randn(4, 1001)
    results = []
    for name in ops.supported_isas():
        with ops.use_isa(name):
            results.append(ops.silu_mul(gate, up))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


def _shared():
    return torch.randn(4, 8)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8).double(), torch.randn(2, 8), torch.empty(2, 8)), TypeError, "gate: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 8).half(), torch.empty(2, 8)), TypeError, "up: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.empty(2, 8, dtype=torch.bfloat16)), TypeError, "out: expected dtype float32"),
        (lambda: (torch.randn(8, 2).t(), torch.randn(2, 8), torch.empty(2, 8)), ValueError, "gate: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(8, 2).t(), torch.empty(2, 8)), ValueError, "up: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.empty(8, 2).t()), ValueError, "out: must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 9), torch.empty(2, 8)), ValueError, "up: expected the shape of gate"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 8), torch.empty(16)), ValueError, "out: expected the shape of gate"),
        (lambda: (torch.randn(0, 8), torch.randn(0, 8), torch.empty(0, 8)), ValueError, "gate: must not be empty"),
        (lambda: ([1.0], torch.randn(2, 8), torch.empty(2, 8)), TypeError, "gate: expected a torch.Tensor"),
        (lambda: (torch.randn(2, 8), None, torch.empty(2, 8)), TypeError, "up: expected a torch.Tensor"),
    ],
)
def test_silu_mul_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.silu_mul(*args())


@pytest.mark.parametrize("rows, dim", [(1, 1), (5, 9), (33, 576)])
def test_silu_mul_reads_the_halves_of_a_fused_projection_in_place(isa, rows, dim):
    torch.manual_seed(rows + dim)
    gate_up = torch.randn(rows, 2 * dim) * 4
    gate, up = gate_up.chunk(2, dim=-1)  # strided views: row stride 2 * dim
    out = torch.empty(rows, dim)
    _C.silu_mul(gate, up, out)
    torch.testing.assert_close(out, ops.silu_mul(gate.contiguous(), up.contiguous()), rtol=0, atol=0)
    torch.testing.assert_close(out, exact_silu_mul(gate, up), rtol=1e-6, atol=1e-6)


def test_fused_backend_silu_mul_on_fused_halves_matches_torch():
    from pyengine.kernels.backends import FusedBackend, TorchBackend

    gate_up = torch.randn(2, 7, 2 * 40) * 3  # [batch, tokens, 2 * I], as the Llama MLP makes it
    gate, up = gate_up.chunk(2, dim=-1)
    out = FusedBackend().silu_mul(gate, up)
    assert out.shape == gate.shape and out.is_contiguous()
    torch.testing.assert_close(out, TorchBackend().silu_mul(gate, up), rtol=1e-5, atol=1e-6)
    # Layouts the kernel cannot stride over (a transposed input) still work, through a copy.
    g_t, u_t = torch.randn(40, 7).t(), torch.randn(40, 7).t()
    torch.testing.assert_close(FusedBackend().silu_mul(g_t, u_t), TorchBackend().silu_mul(g_t, u_t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "gate, message",
    [
        (lambda: torch.randn(2, 3, 8)[:, :2], "gate: must be contiguous, or 2-D with contiguous rows"),  # 3-D
        (lambda: torch.randn(64).as_strided((4, 8), (4, 1)), "gate: must be contiguous, or 2-D with contiguous rows"),  # rows overlap
    ],
)
def test_silu_mul_rejects_layouts_it_cannot_stride(gate, message):
    g = gate()
    with pytest.raises(ValueError, match=message):
        _C.silu_mul(g, torch.randn(g.shape), torch.empty(g.shape))


def test_silu_mul_rejects_out_overlapping_a_strided_input():
    gate_up = torch.randn(4, 16)
    gate, up = gate_up.chunk(2, dim=-1)
    # out over the same first bytes as gate but laid out contiguously: not an in-place alias.
    out = gate_up.view(-1)[:32].view(4, 8)
    with pytest.raises(ValueError, match="out: must not share memory with gate"):
        _C.silu_mul(gate, up, out)
    with pytest.raises(ValueError, match="out: must not share memory with up"):
        _C.silu_mul(torch.randn(4, 8), up, gate_up.view(-1)[24:56].view(4, 8))


def test_silu_mul_rejects_shifted_overlap():
    buf = torch.randn(17)
    gate, out = buf[:16].view(2, 8), buf[1:].view(2, 8)
    with pytest.raises(ValueError, match="out: must not share memory with gate"):
        _C.silu_mul(gate, torch.randn(2, 8), out)
