"""Property tests: random shapes (K off every SIMD width, M across the 16-row GEMV/GEMM switch) and
random per-row magnitudes (all-zero, tiny, huge, one spike) for rms_norm, add_rms_norm,
quantize_rows and the three Linears, on every ISA path, against references written here.

Where the contract promises exact results (quantize_rows; W8A8's exact integer sums and fp32
epilogue) the comparison is bitwise. Where it promises fp32 accumulation it is against float64 with
the textbook rounding-error bound for a K-term sum in fp32: |error| <= (K + c) u sum_k |terms|,
u = 2^-24, whatever the summation order. That bound holds for any correct kernel, yet a dropped or
doubled term of typical size (~ sum / K) exceeds it ~40x even at K = 600 (and see the last test).

Outputs start as NaN, so an element a kernel forgets to write fails the comparison.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C
from pyengine.kernels import ops
from conftest import isa_params

U = 2.0 ** -24  # unit roundoff of fp32
SMALLEST_NORMAL = 2.0 ** -126

# Per-row magnitudes: 0.0 gives an all-zero row, "spike" a row of tiny values with one huge one.
NORM_SCALES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e15, "spike"]       # 1e15^2 * 600 stays inside fp32
QUANT_SCALES = [0.0, 1e-42, 1e-30, 1e-3, 1.0, 1e3, 1e30, "spike", "ties"]  # 1e-42: subnormal
LINEAR_SCALES = [0.0, 1e-12, 1e-3, 1.0, 1e3, 1e12, "spike"]     # products stay normal and finite

EXAMPLES = settings(max_examples=30, deadline=None)


@st.composite
def row_scales(draw, choices, max_rows=40):
    rows = draw(st.integers(1, max_rows))
    return draw(st.lists(st.sampled_from(choices), min_size=rows, max_size=rows))


def make_rows(scales, cols, gen):
    """One row per entry of `scales`: randn times the scale, or a special pattern."""
    x = torch.empty(len(scales), cols)
    for r, s in enumerate(scales):
        row = torch.randn(cols, generator=gen)
        if s == "spike":
            row = row * 1e-6
            row[torch.randint(cols, (1,), generator=gen)] = 1e6
        elif s == "ties":
            # amax = 127 * 2^e makes the scale exactly 2^e, and the other values (n + 0.5) * 2^e
            # fall exactly halfway: only round-half-to-even gives the expected integers.
            e = int(torch.randint(-20, 20, (1,), generator=gen))
            row = (torch.randint(-127, 127, (cols,), generator=gen) + 0.5) * 2.0 ** e
            row[torch.randint(cols, (1,), generator=gen)] = 127 * 2.0 ** e * (1 if cols % 2 else -1)
        else:
            row = row * s
        x[r] = row
    return x


def within_sum_bound(got, expected64, abs_terms64, extra_terms):
    """|got - expected| <= (K + extra_terms) u * sum|terms| elementwise, K = number of terms."""
    bound = (abs_terms64.shape[-1] + extra_terms) * U * abs_terms64.sum(-1) + SMALLEST_NORMAL
    return (got.double() - expected64).abs() <= bound


def assert_all(mask, got, expected, what):
    if not bool(mask.all()):
        bad = (~mask).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~mask).sum())} elements out of bound; first at {bad}: "
                             f"got {got[tuple(bad)].item()!r}, expected {expected[tuple(bad)].item()!r}")


# ---- rms_norm / add_rms_norm -------------------------------------------------------------------


def rms_norm64(x, weight, eps):
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def check_rms_norm(out, x, weight, eps):
    """sum of squares of K positive terms: relative error <= (K - 1) u, halved by the sqrt; then a
    division, an add, a sqrt, a reciprocal and two products: (K + 8) u relative covers it twice."""
    expected = rms_norm64(x, weight, eps)
    rtol = (x.shape[-1] + 8) * U
    ok = (out.double() - expected).abs() <= rtol * expected.abs() + SMALLEST_NORMAL
    assert_all(ok, out, expected, "rms_norm")
    zero_rows = (x == 0).all(-1)
    assert (out[zero_rows] == 0).all(), "an all-zero row must normalize to exactly zero"


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(scales=row_scales(NORM_SCALES), dim=st.integers(1, 600), eps=st.sampled_from([1e-12, 1e-6, 1e-5]),
       in_place=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_random(isa, scales, dim, eps, in_place, seed):
    gen = torch.Generator().manual_seed(seed)  # drawn by hypothesis, so a failure replays exactly
    x = make_rows(scales, dim, gen)
    weight = torch.randn(dim, generator=gen)
    out = x.clone() if in_place else torch.full_like(x, float("nan"))
    with ops.use_isa(isa):
        _C.rms_norm(out if in_place else x, weight, out, eps)
    check_rms_norm(out, x, weight, eps)


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(res_scales=row_scales(NORM_SCALES), dim=st.integers(1, 600), delta_scale=st.sampled_from(NORM_SCALES),
       cancel_row=st.integers(0, 40), eps=st.sampled_from([1e-12, 1e-6]), seed=st.integers(0, 2**31 - 1))
def test_add_rms_norm_random(isa, res_scales, dim, delta_scale, cancel_row, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    residual = make_rows(res_scales, dim, gen)
    delta = make_rows([delta_scale] * len(res_scales), dim, gen)
    if cancel_row < len(res_scales):
        delta[cancel_row] = -residual[cancel_row]  # the sum is an all-zero row
    weight = torch.randn(dim, generator=gen)
    expected_residual = residual + delta  # one fp32 add per element: the kernel's must be the same
    out = torch.full_like(residual, float("nan"))
    with ops.use_isa(isa):
        _C.add_rms_norm(residual, delta, weight, out, eps)
    assert torch.equal(residual, expected_residual)
    check_rms_norm(out, expected_residual, weight, eps)


# ---- quantize_rows -----------------------------------------------------------------------------


def quantize_rows_here(x):
    """The contract in fp32 torch: scale = max|x| / 127 (one IEEE division), q = clamp(round half
    to even(x / scale), -127, 127); a row whose scale is 0 gets q 0."""
    scale = x.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    q = torch.round(x / safe).clamp(-127, 127)  # torch.round: half to even
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(scales=row_scales(QUANT_SCALES), cols=st.integers(1, 600), seed=st.integers(0, 2**31 - 1))
def test_quantize_rows_random_bitwise(isa, scales, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_rows(scales, cols, gen)
    q = torch.full((len(scales), cols), -128, dtype=torch.int8)  # -128 is never a valid output
    scale = torch.full((len(scales),), float("nan"))
    with ops.use_isa(isa):
        _C.quantize_rows(x, q, scale)
    q_ref, scale_ref = quantize_rows_here(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    # Properties the reference itself must have (so it is the contract, not a copy of a bug).
    assert q.abs().max() <= 127
    normal = scale >= SMALLEST_NORMAL
    amax_at = x.abs().argmax(-1)
    assert (q[normal, amax_at[normal]].abs() == 127).all(), "the largest |x| must map to +-127"
    # |q - x / scale| <= 1/2, plus the fp32 division's rounding of a quotient up to ~127: u * 128.
    err = (q.double() * scale.double()[:, None] - x.double()).abs()[normal]
    assert (err <= (0.5 + 128 * U) * scale.double()[normal, None]).all(), "dequantized error above scale / 2"
    for r, s in enumerate(scales):
        if s == 0.0:
            assert scale[r] == 0 and not q[r].any()
        if s == "ties":  # x / scale is exactly n + 0.5 off the max: n even wins
            away = x[r] / scale[r]
            ties = away.abs() != 127
            assert torch.equal(q[r][ties].float(), torch.round(away[ties]))
            assert (q[r][ties] % 2 == 0).all()


# ---- the Linears -------------------------------------------------------------------------------


@st.composite
def linear_case(draw, x_choices=LINEAR_SCALES):
    return dict(x_scales=draw(row_scales(x_choices)), N=draw(st.integers(1, 48)), K=draw(st.integers(1, 600)),
                w_scale=draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3])), with_bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def linear_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_rows(case["x_scales"], case["K"], gen)
    N, K = case["N"], case["K"]
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    if N > 2:
        w_q[N // 2] = 0  # an all-zero weight row
    # Per-row weight scales spread over two decades around the case's magnitude.
    w_scale = (case["w_scale"] * 10 ** (torch.rand(N, generator=gen) * 2 - 1)).float()
    bias = torch.randn(N, generator=gen) * case["w_scale"] if case["with_bias"] else None
    return x, w_q, w_scale, bias


def nan_out(x, n):
    return torch.full((x.shape[0], n), float("nan"))


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(case=linear_case(QUANT_SCALES[:-1]))  # W8A8: exact, so even 1e30 and subnormal rows are fair
def test_int8_linear_w8a8_random_bitwise(isa, case):
    x, w_q, w_scale, bias = linear_inputs(case)
    out = nan_out(x, w_q.shape[0])
    with ops.use_isa(isa):
        _C.int8_linear_w8a8(x, w_q, w_scale, out, bias)
    # The contract term for term, in fp32: exact integer sums (|sum| <= 600 * 127^2 < 2^24, so the
    # conversion to float is exact too), then float(sum) * (x_scale * w_scale) (+ bias).
    x_q, x_scale = quantize_rows_here(x)
    acc = (x_q.long() @ w_q.long().T).float()
    expected = acc * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        expected = expected + bias
    assert torch.equal(out, expected)


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(case=linear_case())
def test_int8_linear_wo_random(isa, case):
    x, w_q, w_scale, bias = linear_inputs(case)
    out = nan_out(x, w_q.shape[0])
    with ops.use_isa(isa):
        _C.int8_linear_wo(x, w_q, w_scale, out, bias)
    w64 = w_q.double() * w_scale.double()[:, None]  # exact: an int8 times an fp32 fits a double
    terms = (x.double()[:, None, :] * w64[None, :, :]).abs()
    expected = x.double() @ w64.T
    if bias is not None:
        expected = expected + bias.double()
        terms = torch.cat([terms, bias.double().abs()[None, :, None].expand(x.shape[0], -1, 1)], dim=-1)
    # + 4: the dequantized weight (or the per-row scale after the sum), bias add, and slack.
    assert_all(within_sum_bound(out, expected, terms, 4), out, expected, "int8_linear_wo")


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(case=linear_case())
def test_linear_f32_random(isa, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_rows(case["x_scales"], case["K"], gen)
    w = torch.randn(case["N"], case["K"], generator=gen) * case["w_scale"]
    bias = torch.randn(case["N"], generator=gen) * case["w_scale"] if case["with_bias"] else None
    out = nan_out(x, case["N"])
    with ops.use_isa(isa):
        _C.linear_f32(x, w, out, bias)
    terms = (x.double()[:, None, :] * w.double()[None, :, :]).abs()
    expected = x.double() @ w.double().T
    if bias is not None:
        expected = expected + bias.double()
        terms = torch.cat([terms, bias.double().abs()[None, :, None].expand(x.shape[0], -1, 1)], dim=-1)
    assert_all(within_sum_bound(out, expected, terms, 2), out, expected, "linear_f32")


@pytest.mark.parametrize("isa", isa_params())
@EXAMPLES
@given(case=linear_case())
def test_linear_bf16_random(isa, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_rows(case["x_scales"], case["K"], gen)
    w = (torch.randn(case["N"], case["K"], generator=gen) * case["w_scale"]).to(torch.bfloat16)
    bias = torch.randn(case["N"], generator=gen) * case["w_scale"] if case["with_bias"] else None
    out = nan_out(x, case["N"])
    with ops.use_isa(isa):
        _C.linear_bf16(x, w, out, bias)
    terms = (x.double()[:, None, :] * w.double()[None, :, :]).abs()  # a bf16's double is its exact value
    expected = x.double() @ w.double().T
    if bias is not None:
        expected = expected + bias.double()
        terms = torch.cat([terms, bias.double().abs()[None, :, None].expand(x.shape[0], -1, 1)], dim=-1)
    # + 4: AVX-512 BF16 adds each activation's three bf16 parts one after another.
    assert_all(within_sum_bound(out, expected, terms, 4), out, expected, "linear_bf16")


def test_sum_bound_catches_a_dropped_term():
    """The tolerance above is not vacuous: leaving out one term of a 600-term sum breaks it."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 600, generator=gen), torch.randn(5, 600, generator=gen)
    terms = (x.double()[:, None, :] * w.double()[None, :, :]).abs()
    expected = x.double() @ w.double().T
    assert within_sum_bound((x @ w.T), expected, terms, 2).all()
    dropped = x[:, :-1] @ w[:, :-1].T
    assert not within_sum_bound(dropped, expected, terms, 2).all()
