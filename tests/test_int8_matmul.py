import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def rand_i8(*shape, gen=None):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)


# ---- quantize_rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 33), (7, 576), (64, 1000), (2, 31)])
def test_quantize_rows_matches_reference_bitwise(isa, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 5
    q, scale = ops.quantize_rows(x)
    q_ref, scale_ref = kernels.quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    assert q.abs().max() <= 127


def test_quantize_rows_ties_round_half_to_even(isa):
    # amax 127 gives scale exactly 1, so x / scale is x itself: halves must go to the even integer.
    row = torch.tensor([127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, 126.5] + [0.0] * 40)
    q, scale = ops.quantize_rows(row[None])
    assert scale.item() == 1.0
    assert q[0, :9].tolist() == [127, 2, -2, 4, -4, 0, 0, 2, 126]


def test_quantize_rows_zero_row_gives_zero_scale_and_values(isa):
    x = torch.randn(3, 40)
    x[1] = 0
    q, scale = ops.quantize_rows(x)
    assert scale[1].item() == 0.0 and not q[1].any()
    assert not (q[1].float() * scale[1]).any()  # dequantizes back to 0, not NaN
    assert scale[0] > 0 and scale[2] > 0


def test_quantize_rows_constant_row_is_all_max(isa):
    x = torch.full((2, 37), -3.25)
    q, scale = ops.quantize_rows(x)
    assert (q == -127).all()
    torch.testing.assert_close(q.float() * scale[:, None], x)


# ---- int8_matmul_i32: exact against an int32 reference --------------------------------------

SHAPES = [  # (M, N, K): K off the 32/64 SIMD widths, N=1, M=1/7/64, M above the decode cutoff
    (1, 1, 1), (1, 1, 5), (1, 5, 33), (7, 1, 1000), (7, 33, 576), (64, 3, 5), (64, 70, 1000),
    (1, 576, 576), (2, 192, 576), (3, 11, 65), (100, 300, 96),
]


@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int8_matmul_i32_exact_random(isa, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    a, b = rand_i8(M, K, gen=gen), rand_i8(N, K, gen=gen)
    assert torch.equal(ops.int8_matmul_i32(a, b), kernels.int8_matmul_i32_reference(a, b))


@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (7, 5, 33), (64, 64, 1000), (1, 9, 576), (5, 3, 1536)])
def test_int8_matmul_i32_exact_extremes(isa, M, N, K):
    gen = torch.Generator().manual_seed(7)
    signs = lambda *s: torch.where(torch.rand(s, generator=gen) < 0.5, -127, 127).to(torch.int8)  # noqa: E731
    cases = [
        (torch.full((M, K), 127, dtype=torch.int8), torch.full((N, K), 127, dtype=torch.int8)),
        (torch.full((M, K), 127, dtype=torch.int8), torch.full((N, K), -127, dtype=torch.int8)),
        (torch.full((M, K), -127, dtype=torch.int8), torch.full((N, K), -127, dtype=torch.int8)),
        (signs(M, K), signs(N, K)),
        (signs(M, K), torch.full((N, K), 127, dtype=torch.int8)),
    ]
    for a, b in cases:
        assert torch.equal(ops.int8_matmul_i32(a, b), kernels.int8_matmul_i32_reference(a, b))
    # Activation rows all equal to the max, as quantize_rows makes of a constant row.
    x_q, _ = ops.quantize_rows(torch.full((M, K), 0.7))
    b = signs(N, K)
    assert torch.equal(ops.int8_matmul_i32(x_q, b), kernels.int8_matmul_i32_reference(x_q, b))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 40), K=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_int8_matmul_i32_random_shapes_every_isa(M, N, K, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = rand_i8(M, K, gen=gen), rand_i8(N, K, gen=gen)
    expected = kernels.int8_matmul_i32_reference(a, b)
    for name in ops.supported_isas():
        with ops.use_isa(name):
            assert torch.equal(ops.int8_matmul_i32(a, b), expected), name


def test_int8_matmul_i32_every_isa_agrees_single_thread():
    a, b = rand_i8(9, 333), rand_i8(17, 333)
    expected = kernels.int8_matmul_i32_reference(a, b)
    previous = _C.num_threads()
    _C.set_num_threads(1)
    try:
        for name in ops.supported_isas():
            with ops.use_isa(name):
                assert torch.equal(ops.int8_matmul_i32(a, b), expected)
    finally:
        _C.set_num_threads(previous)


# ---- int8_linear_w8a8, int8_linear_wo, linear_f32 --------------------------------------------

# Above 16 rows the fp32 and weight-only Linears take the packed-panel GEMM (6-token x 16-feature
# tiles): (17, 1, 1) is the first such shape, (23, 17, 33) has partial tiles both ways, and (600, 20,
# 1000) spans two blocks of packed activations (2 MB each). (13, 29, 40): up to 16 rows, the tiles
# walk blocks of 12 weight rows (two whole, one partial) for each group of 4 rows (the last of 1).
LINEAR_SHAPES = [(1, 1, 1), (1, 576, 576), (1, 192, 576), (7, 33, 1000), (64, 64, 5), (70, 130, 576), (3, 1, 1536),
                 (13, 29, 40), (17, 1, 1), (23, 17, 33), (600, 20, 1000)]


@pytest.mark.parametrize("M, N, K", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_reference(isa, M, N, K, with_bias):
    torch.manual_seed(M + N + K)
    x = torch.randn(M, K) * 2
    w_q, w_scale = ops.quantize_rows(torch.randn(N, K) * 0.05)
    bias = torch.randn(N) if with_bias else None
    # Same integer sums and the same fp32 epilogue ops: bitwise equal.
    torch.testing.assert_close(ops.int8_linear_w8a8(x, w_q, w_scale, bias),
                               kernels.int8_linear_w8a8_reference(x, w_q, w_scale, bias), rtol=0, atol=0)


@pytest.mark.parametrize("M, N, K", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_wo_matches_reference(isa, M, N, K, with_bias):
    torch.manual_seed(M + N + K + 1)
    x = torch.randn(M, K)
    w_q, w_scale = ops.quantize_rows(torch.randn(N, K) * 0.05)
    bias = torch.randn(N) if with_bias else None
    torch.testing.assert_close(ops.int8_linear_wo(x, w_q, w_scale, bias),
                               kernels.int8_linear_wo_reference(x, w_q, w_scale, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M, N, K", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_f32_matches_torch(isa, M, N, K, with_bias):
    torch.manual_seed(M + N + K + 2)
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    bias = torch.randn(N) if with_bias else None
    torch.testing.assert_close(ops.linear_f32(x, w, bias), kernels.linear_f32_reference(x, w, bias),
                               rtol=1e-4, atol=1e-4)


def test_int8_linears_close_to_fp32_on_random_data():
    # The quality the quantization buys: per-channel weights alone lose less than W8A8.
    torch.manual_seed(3)
    x, w = torch.randn(16, 576), torch.randn(1536, 576) * 0.05
    exact = x @ w.T
    w_q, w_scale = ops.quantize_rows(w)
    rel = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    err_w8a8, err_wo = rel(ops.int8_linear_w8a8(x, w_q, w_scale)), rel(ops.int8_linear_wo(x, w_q, w_scale))
    assert err_wo < 0.01
    assert err_w8a8 < 0.02
    assert err_wo < err_w8a8


def test_linear_ops_accept_leading_dims():
    x = torch.randn(2, 3, 64)
    w = torch.randn(10, 64)
    w_q, w_scale = ops.quantize_rows(w)
    assert ops.int8_linear_w8a8(x, w_q, w_scale).shape == (2, 3, 10)
    assert ops.int8_linear_wo(x, w_q, w_scale).shape == (2, 3, 10)
    torch.testing.assert_close(ops.linear_f32(x, w), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)
    q, s = ops.quantize_rows(x)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3)


def test_custom_ops_pass_opcheck():
    x, w = torch.randn(3, 40), torch.randn(6, 40)
    w_q, w_scale = ops.quantize_rows(w)
    torch.library.opcheck(ops.int8_linear_w8a8, (x, w_q, w_scale, torch.randn(6)))
    torch.library.opcheck(ops.int8_linear_wo, (x, w_q, w_scale))
    torch.library.opcheck(ops.linear_f32, (x, w))
    torch.library.opcheck(ops.quantize_rows, (x,))
    torch.library.opcheck(ops.int8_matmul_i32, (w_q, w_q))


# ---- bad arguments ---------------------------------------------------------------------------

I8, F32 = torch.int8, torch.float32


def _linear_args(M=2, N=3, K=8):
    return dict(x=torch.randn(M, K), w_q=torch.zeros(N, K, dtype=I8), w_scale=torch.ones(N), out=torch.empty(M, N))


INT8_LINEARS = ["int8_linear_w8a8", "int8_linear_wo", "int8_linear_a16"]


@pytest.mark.parametrize("fn", INT8_LINEARS)  # one binding and one set of checks for all three
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.randn(2, 8).double()), TypeError, "x: expected dtype float32"),
        (dict(x=torch.randn(8, 2).t()), ValueError, "x: must be contiguous"),
        (dict(x=torch.randn(2, 2, 8)), ValueError, "x: expected 2 dimensions"),
        (dict(x=torch.randn(0, 8), out=torch.empty(0, 3)), ValueError, "x: must not be empty"),
        (dict(x=[1.0]), TypeError, "x: expected a torch.Tensor"),
        (dict(w_q=torch.zeros(3, 8)), TypeError, "w_q: expected dtype int8"),
        (dict(w_q=torch.zeros(3, 7, dtype=I8)), ValueError, "w_q: dimension 1"),
        (dict(w_q=torch.zeros(8, 3, dtype=I8).t()), ValueError, "w_q: must be contiguous"),
        (dict(w_q=torch.zeros(0, 8, dtype=I8), w_scale=torch.ones(0), out=torch.empty(2, 0)), ValueError,
         "w_q: must not be empty"),
        (dict(w_scale=torch.ones(4)), ValueError, "w_scale: dimension 0"),
        (dict(w_scale=torch.ones(3, dtype=torch.float16)), TypeError, "w_scale: expected dtype float32"),
        (dict(out=torch.empty(2, 4)), ValueError, "out: dimension 1"),
        (dict(out=torch.empty(3, 3)), ValueError, "out: dimension 0"),
        (dict(out=torch.empty(2, 3, dtype=torch.float64)), TypeError, "out: expected dtype float32"),
        (dict(bias=torch.ones(4)), ValueError, "bias: dimension 0"),
        (dict(bias=torch.ones(3, dtype=torch.int32)), TypeError, "bias: expected dtype float32"),
        (dict(bias=torch.ones(3, 1)), ValueError, "bias: expected 1 dimensions"),
    ],
)
def test_int8_linears_reject_bad_arguments(fn, change, error, message):
    args = _linear_args()
    args.update(change)
    with pytest.raises(error, match=message):
        getattr(_C, fn)(**args)


def test_linears_reject_aliasing():
    x = torch.randn(3, 3)
    w_q = torch.zeros(3, 3, dtype=I8)
    for fn in (getattr(_C, name) for name in INT8_LINEARS):
        with pytest.raises(ValueError, match="out: must not share memory with x"):
            fn(x, w_q, torch.ones(3), x)
        bias = torch.zeros(3, 3)
        with pytest.raises(ValueError, match="out: must not share memory with bias"):
            fn(torch.randn(3, 3), w_q, torch.ones(3), bias, bias[0])
        scale = torch.ones(2, 3)
        with pytest.raises(ValueError, match="out: must not share memory with w_scale"):
            fn(torch.randn(2, 3), w_q, scale[0], scale)
    with pytest.raises(ValueError, match="out: must not share memory with w"):
        w = torch.randn(3, 3)
        _C.linear_f32(torch.randn(3, 3), w, w)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8), torch.zeros(3, 8, dtype=I8), torch.empty(2, 3)), TypeError, "w: expected dtype float32"),
        (lambda: (torch.randn(2, 8), torch.randn(3, 9), torch.empty(2, 3)), ValueError, "w: dimension 1"),
        (lambda: (torch.randn(2, 8), torch.randn(3, 8), torch.empty(2, 2)), ValueError, "out: dimension 1"),
        (lambda: (torch.randn(2, 8), torch.randn(0, 8), torch.empty(2, 0)), ValueError, "w: must not be empty"),
    ],
)
def test_linear_f32_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.linear_f32(*args())


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.zeros(2, 8), torch.zeros(3, 8, dtype=I8), torch.empty(2, 3, dtype=torch.int32)), TypeError,
         "a_q: expected dtype int8"),
        (lambda: (torch.zeros(2, 8, dtype=I8), torch.zeros(3, 8, dtype=torch.uint8), torch.empty(2, 3, dtype=torch.int32)),
         TypeError, "b_q: expected dtype int8"),
        (lambda: (torch.zeros(2, 8, dtype=I8), torch.zeros(3, 7, dtype=I8), torch.empty(2, 3, dtype=torch.int32)),
         ValueError, "b_q: dimension 1"),
        (lambda: (torch.zeros(2, 8, dtype=I8), torch.zeros(3, 8, dtype=I8), torch.empty(2, 3)), TypeError,
         "out_i32: expected dtype int32"),
        (lambda: (torch.zeros(2, 8, dtype=I8), torch.zeros(3, 8, dtype=I8), torch.empty(3, 2, dtype=torch.int32)),
         ValueError, "out_i32: dimension 0"),
        (lambda: (torch.zeros(2, 0, dtype=I8), torch.zeros(3, 0, dtype=I8), torch.empty(2, 3, dtype=torch.int32)),
         ValueError, "a_q: must not be empty"),
    ],
)
def test_int8_matmul_i32_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.int8_matmul_i32(*args())


def test_int8_matmul_i32_rejects_aliasing():
    buf = torch.zeros(64, dtype=I8)
    a = buf[:16].view(2, 8)
    with pytest.raises(ValueError, match="out_i32: must not share memory with a_q"):
        _C.int8_matmul_i32(a, torch.zeros(2, 8, dtype=I8), buf.view(torch.int32)[:4].view(2, 2))


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: (torch.randn(2, 8).double(), torch.empty(2, 8, dtype=I8), torch.empty(2)), TypeError, "x: expected"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 8), torch.empty(2)), TypeError, "q_out: expected dtype int8"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 7, dtype=I8), torch.empty(2)), ValueError, "q_out: dimension 1"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 8, dtype=I8), torch.empty(3)), ValueError, "scale_out: dimension 0"),
        (lambda: (torch.randn(2, 8), torch.empty(2, 8, dtype=I8), torch.empty(2).half()), TypeError, "scale_out: expected"),
        (lambda: (torch.randn(8, 2).t(), torch.empty(2, 8, dtype=I8), torch.empty(2)), ValueError, "x: must be contiguous"),
        (lambda: (torch.randn(0, 8), torch.empty(0, 8, dtype=I8), torch.empty(0)), ValueError, "x: must not be empty"),
        (lambda: (torch.randn(8), torch.empty(8, dtype=I8), torch.empty(1)), ValueError, "x: expected 2 dimensions"),
    ],
)
def test_quantize_rows_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.quantize_rows(*args())


def test_quantize_rows_rejects_aliasing():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="scale_out: must not share memory with x"):
        _C.quantize_rows(x, torch.empty(2, 8, dtype=I8), x[0, :2])


@pytest.mark.parametrize("K", [5, 576])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_decode_gemvs_split_rows_into_two_streams_correctly(isa, M, K):
    """Decode: each thread's weight rows are read as two streams, the second one row shorter or empty
    for some N (fp32: up to 4 activation rows; W8A16: up to 2). Every output must be the same bits as
    that activation row and weight row alone (fp32: the same sum in the same order; W8A16: exact)."""
    gen = torch.Generator().manual_seed(K + M)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(41, K, generator=gen) * 0.05
    w_q, w_scale = ops.quantize_rows(w)
    for N in list(range(1, 14)) + [33, 41]:
        f32 = ops.linear_f32(x, w[:N])
        a16 = ops.int8_linear_a16(x, w_q[:N], w_scale[:N])
        torch.testing.assert_close(f32, kernels.linear_f32_reference(x, w[:N]), rtol=1e-4, atol=1e-4)
        assert torch.equal(a16, kernels.int8_linear_a16_reference(x, w_q[:N], w_scale[:N])), N
        for m in range(M):
            for n in range(N):
                assert torch.equal(f32[m, n], ops.linear_f32(x[m:m + 1], w[n:n + 1])[0, 0]), (M, N, m, n)


# ---- int8_linear_a16 (W8A16): exact integer sums, bitwise equal to the int64 reference ---------

# Up to 16 rows the GEMV (decode), above the packed-panel GEMM (prefill): 17 and 23 leave partial
# 6-row tiles, 30 an odd number of whole ones.
A16_M = [1, 2, 7, 16, 17, 23, 30]
A16_N = [1, 3, 64]
# Off the 16-wide step; odd K pads the GEMM's last pair of k; 2049 and 4100 cross the GEMV's 2048
# flush and the GEMM's 512-k (256-pair) int64 chunks.
A16_K = [1, 5, 17, 576, 1536, 2049, 4100]


@pytest.mark.parametrize("K", A16_K)
def test_int8_linear_a16_exact_awkward_shapes(isa, K):
    for M in A16_M:
        for N in A16_N:
            gen = torch.Generator().manual_seed(M * 100000 + N * 10000 + K)
            x = torch.randn(M, K, generator=gen) * 3
            w_q = rand_i8(N, K, gen=gen)
            w_scale = torch.rand(N, generator=gen) * 0.01 + 1e-3
            bias = torch.randn(N, generator=gen) if (M + N) % 2 else None
            assert torch.equal(ops.int8_linear_a16(x, w_q, w_scale, bias),
                               kernels.int8_linear_a16_reference(x, w_q, w_scale, bias)), (M, N, K)


@pytest.mark.parametrize("M, N", [(1, 9), (2, 3), (7, 17), (16, 64), (17, 33), (36, 16)])
def test_int8_linear_a16_exact_extremes(isa, M, N):
    # Every product at its largest magnitude (32767 * 127) over K = 4100: the per-lane int32 sums
    # would overflow without the GEMV's 2048-wide flush or the GEMM's int64 chunks (which such rows
    # must take: their int32 bound fails), and the row total exceeds 2^31 (needs int64).
    K = 4100
    gen = torch.Generator().manual_seed(11)
    w_scale = torch.full((N,), 0.5)
    signs = lambda *s: torch.where(torch.rand(s, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    weights = [torch.full((N, K), 127, dtype=torch.int8), torch.full((N, K), -127, dtype=torch.int8),
               (signs(N, K) * 127).to(torch.int8)]
    activations = [torch.full((M, K), 2.5), torch.full((M, K), -0.1), signs(M, K) * 3.0]
    for w_q in weights:
        for x in activations:
            x_q, _ = kernels.quantize_rows_i16_reference(x)
            assert (x_q.abs() == 32767).all()
            out = ops.int8_linear_a16(x, w_q, w_scale)
            assert torch.equal(out, kernels.int8_linear_a16_reference(x, w_q, w_scale))
    # The all-+max case really reaches K * 32767 * 127 (> 2^34): not wrapped.
    out = ops.int8_linear_a16(torch.full((M, K), 1.0), torch.full((N, K), 127, dtype=torch.int8), torch.ones(N))
    torch.testing.assert_close(out, torch.full((M, N), float(K * 127)), rtol=1e-6, atol=0)


def test_int8_linear_a16_zero_rows_and_bias(isa):
    x = torch.randn(5, 100)
    x[1] = 0
    x[4] = 0
    w_q, w_scale = ops.quantize_rows(torch.randn(7, 100))
    bias = torch.randn(7)
    out = ops.int8_linear_a16(x, w_q, w_scale, bias)
    assert torch.equal(out[1], bias) and torch.equal(out[4], bias)  # no NaN from a 0 scale
    assert torch.equal(out, kernels.int8_linear_a16_reference(x, w_q, w_scale, bias))
    assert not ops.int8_linear_a16(x[1:2], w_q, w_scale).any()


def test_int8_linear_a16_rounds_half_to_even(isa):
    # amax 32767 gives x_scale exactly 1: halves must go to the even integer.
    x = torch.tensor([[32767.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5] + [0.0] * 20])
    w_q = torch.zeros(7, 27, dtype=torch.int8)
    for i in range(7):
        w_q[i, i] = 1
    out = ops.int8_linear_a16(x, w_q, torch.ones(7))
    assert out[0].tolist() == [32767.0, 2.0, -2.0, 4.0, -4.0, 0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_int8_linear_a16_random_shapes_every_isa(M, N, K, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w_q, w_scale = rand_i8(N, K, gen=gen), torch.rand(N, generator=gen) + 0.01
    expected = kernels.int8_linear_a16_reference(x, w_q, w_scale)
    for name in ops.supported_isas():
        with ops.use_isa(name):
            assert torch.equal(ops.int8_linear_a16(x, w_q, w_scale), expected), name


def test_int8_linear_a16_single_thread_and_large_n_match():
    # Decode-sized: several threads split N; one thread must give the same bits.
    x = torch.randn(3, 576)
    w_q, w_scale = ops.quantize_rows(torch.randn(3000, 576))
    expected = kernels.int8_linear_a16_reference(x, w_q, w_scale)
    previous = _C.num_threads()
    try:
        for threads in (1, 2):
            _C.set_num_threads(threads)
            for name in ops.supported_isas():
                with ops.use_isa(name):
                    assert torch.equal(ops.int8_linear_a16(x, w_q, w_scale), expected), (threads, name)
    finally:
        _C.set_num_threads(previous)


def test_int8_linear_a16_close_to_fp32_dequantized():
    # 16-bit activations: the only error left is int16 rounding of x (~1e-5 relative) and fp32 sums.
    torch.manual_seed(4)
    x, w = torch.randn(16, 1536), torch.randn(576, 1536) * 0.05
    w_q, w_scale = ops.quantize_rows(w)
    dequantized = x @ (w_q.float() * w_scale[:, None]).T
    out = ops.int8_linear_a16(x, w_q, w_scale)
    rel = ((out - dequantized).norm() / dequantized.norm()).item()
    assert rel < 2e-4
    # Far closer to the weight-only result than W8A8 is.
    rel_w8a8 = ((ops.int8_linear_w8a8(x, w_q, w_scale) - dequantized).norm() / dequantized.norm()).item()
    assert rel < rel_w8a8 / 10


def test_int8_linear_a16_leading_dims_and_opcheck():
    x = torch.randn(2, 3, 64)
    w_q, w_scale = ops.quantize_rows(torch.randn(10, 64))
    assert ops.int8_linear_a16(x, w_q, w_scale).shape == (2, 3, 10)
    torch.library.opcheck(ops.int8_linear_a16, (torch.randn(3, 40), w_q[:, :40].contiguous(), w_scale, torch.randn(10)))


@pytest.mark.parametrize("M", [17, 40, 101])
def test_int8_linear_a16_prefill_rows_are_decode_rows(isa, M):
    """The GEMM (prefill) and the GEMV (decode) give each row the same bits: a row's output does not
    depend on the rows it is computed with. Holds for the fused-int8 engine's prefill against its
    decode steps, and for ragged batches."""
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, 577, generator=gen) * torch.rand(M, 1, generator=gen) * 4
    w_q, w_scale = ops.quantize_rows(torch.randn(45, 577, generator=gen))
    bias = torch.randn(45, generator=gen)
    out = ops.int8_linear_a16(x, w_q, w_scale, bias)
    for m in range(M):
        assert torch.equal(out[m:m + 1], ops.int8_linear_a16(x[m:m + 1], w_q, w_scale, bias)), m


@pytest.mark.parametrize("K", [511, 512, 513])
def test_int8_linear_a16_prefill_at_the_int32_bound(isa, K):
    """Rows at full scale (every |xq| = 32767) against +-127 weights: up to K = 512 a row's sums fit
    int32 and take the GEMM kernel with the fused epilogue (the sums reach 2.13e9, just under 2^31);
    at 513 they take the int64 chunks. Exact either way."""
    gen = torch.Generator().manual_seed(K)
    signs = lambda *s: torch.where(torch.rand(s, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    x = torch.cat([torch.full((12, K), 0.75), signs(12, K)])
    w_q = torch.cat([torch.full((8, K), 127, dtype=torch.int8), torch.full((8, K), -127, dtype=torch.int8),
                     (signs(16, K) * 127).to(torch.int8)])
    w_scale = torch.full((32,), 0.25)
    out = ops.int8_linear_a16(x, w_q, w_scale)
    assert torch.equal(out, kernels.int8_linear_a16_reference(x, w_q, w_scale))
    assert out[0, 0].item() == pytest.approx(K * 127 * 0.75 * 0.25, rel=1e-6)  # the largest sum, not wrapped


# ---- int8_linear_a16 decode at 8..16 rows: the AVX-512 weight-panel kernel ------------------------
# From 8 rows up to 16 the AVX-512 decode transposes 16 weight rows x 32 pairs of k at a time; these
# shapes cut that grid everywhere: N off the 16 rows (1, 15, 17, 33), K off the 64-byte block, odd K
# (the last pair half empty), K past 512 (the int32 lanes go into int64 every 256 pairs), and every
# row count around the 1-2 / 3-7 / 8-16 / 17+ boundaries.

@pytest.mark.parametrize("K", [1, 2, 63, 64, 65, 129, 1025])
def test_int8_linear_a16_every_decode_row_count(isa, K):
    for M in range(1, 18):
        for N in (1, 15, 16, 17, 33):
            gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
            x = torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 5
            w_q = torch.randint(-128 if isa == "avx512" else -127, 128, (N, K), dtype=torch.int8, generator=gen)
            w_scale = torch.rand(N, generator=gen) * 0.01 + 1e-3
            bias = torch.randn(N, generator=gen) if (M + N) % 2 else None
            assert torch.equal(ops.int8_linear_a16(x, w_q, w_scale, bias),
                               kernels.int8_linear_a16_reference(x, w_q, w_scale, bias)), (M, N, K)


@pytest.mark.parametrize("M", [4, 8, 9, 16])
def test_int8_linear_a16_decode_rows_do_not_depend_on_their_batch(isa, M):
    """Each row of a 4..16-row batch (8..16: the panel kernel on AVX-512) has the bits it has alone (the
    row-dot GEMV) and the bits of the prefill GEMM: a request's output does not depend on the batch."""
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, 577, generator=gen) * torch.rand(M, 1, generator=gen) * 4
    w_q, w_scale = ops.quantize_rows(torch.randn(50, 577, generator=gen))
    bias = torch.randn(50, generator=gen)
    out = ops.int8_linear_a16(x, w_q, w_scale, bias)
    padded = ops.int8_linear_a16(torch.cat([x, x[:17 - M]]), w_q, w_scale, bias)  # 17 rows: the GEMM
    assert torch.equal(out, padded[:M])
    for m in range(M):
        assert torch.equal(out[m:m + 1], ops.int8_linear_a16(x[m:m + 1], w_q, w_scale, bias)), m


@pytest.mark.parametrize("M", [4, 8, 16])
def test_int8_linear_a16_decode_extremes_with_minus_128(M):
    """AVX-512 takes weights of -128 too: every product at 32767 * 128, over K = 4100 (eight 256-pair
    int32 chunks, each summing to 2^31 - 65536 at most, and the row past 2^34)."""
    if "avx512" not in ops.supported_isas():
        pytest.skip("the -128 weights are allowed on the AVX-512 kernels only")
    K, N = 4100, 19
    gen = torch.Generator().manual_seed(M)
    signs = torch.where(torch.rand(N, K, generator=gen) < 0.5, -128, 127).to(torch.int8)
    for w_q in (torch.full((N, K), -128, dtype=torch.int8), signs):
        for x in (torch.full((M, K), -1.5), torch.full((M, K), 2.0)):
            with ops.use_isa("avx512"):
                out = ops.int8_linear_a16(x, w_q, torch.ones(N))
            assert torch.equal(out, kernels.int8_linear_a16_reference(x, w_q, torch.ones(N)))
    with ops.use_isa("avx512"):
        out = ops.int8_linear_a16(torch.full((M, K), 2.0), torch.full((N, K), -128, dtype=torch.int8), torch.ones(N))
    # -K * 32767 * 128 in int64, not wrapped, times the row scale 2 / 32767
    torch.testing.assert_close(out, torch.full((M, N), -K * 128 * 2.0), rtol=1e-6, atol=0)
