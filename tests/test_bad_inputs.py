"""Every bound CPU op against every kind of bad argument: wrong dtype, wrong device, non-contiguous,
misaligned, mismatched shape, empty. Each must raise TypeError/ValueError naming the argument before
any kernel runs (never a crash, never a silent wrong answer). One table of valid calls; the bad
calls are made from it by spoiling one tensor argument at a time."""
from __future__ import annotations

import pytest
import torch

from pyengine import _C
from pyengine.kernels import ops

F32, BF16, I8, I32, I64 = torch.float32, torch.bfloat16, torch.int8, torch.int32, torch.int64


def _rand(*shape, dtype=F32):
    if dtype == F32:
        return torch.randn(*shape)
    if dtype == I8:
        return torch.randint(-127, 128, shape, dtype=I8)
    return torch.zeros(*shape, dtype=dtype)


def _attention_args():
    b, t, hq, hkv, s, d = 2, 3, 4, 2, 8, 16
    return dict(q=_rand(b, t, hq, d), k_cache=_rand(b, hkv, s, d), v_cache=_rand(b, hkv, s, d),
                out=_rand(b, t, hq, d), q_start=torch.tensor([0, 2], dtype=I32),
                kv_len=torch.tensor([3, 5], dtype=I32), scale=0.25)


def _linear_args(w_dtype, scaled=True):
    args = dict(x=_rand(3, 40), w_q=_rand(5, 40, dtype=w_dtype))
    if scaled:
        args["w_scale"] = torch.rand(5) + 0.1
    args["out"] = _rand(3, 5)
    args["bias"] = _rand(5)
    return args


# op name -> a function returning valid keyword arguments (tensors, then scalars).
VALID_CALLS = {
    "rms_norm": lambda: dict(x=_rand(3, 40), weight=_rand(40), out=_rand(3, 40), eps=1e-5),
    "add_rms_norm": lambda: dict(residual=_rand(3, 40), delta=_rand(3, 40), weight=_rand(40), out=_rand(3, 40),
                                 eps=1e-5),
    "layer_norm": lambda: dict(x=_rand(3, 40), weight=_rand(40), bias=_rand(40), out=_rand(3, 40), eps=1e-5),
    "add_layer_norm": lambda: dict(residual=_rand(3, 40), delta=_rand(3, 40), weight=_rand(40), bias=_rand(40),
                                   out=_rand(3, 40), eps=1e-5),
    "rope": lambda: dict(x=_rand(2, 3, 4, 16), cos=_rand(32, 8), sin=_rand(32, 8),
                         positions=torch.arange(6, dtype=I32).view(2, 3), interleaved=False),
    "gelu": lambda: dict(x=_rand(3, 40), out=_rand(3, 40)),
    "silu_mul": lambda: dict(gate=_rand(3, 40), up=_rand(3, 40), out=_rand(3, 40)),
    "gelu_mul": lambda: dict(gate=_rand(3, 40), up=_rand(3, 40), out=_rand(3, 40)),
    "softcap": lambda: dict(x=_rand(3, 40), out=_rand(3, 40), cap=30.0),
    "embedding": lambda: dict(ids=torch.tensor([[1, 4, 0]]), table=_rand(6, 40), out=_rand(1, 3, 40)),
    "quantize_rows": lambda: dict(x=_rand(3, 40), q_out=_rand(3, 40, dtype=I8), scale_out=_rand(3)),
    "int8_matmul_i32": lambda: dict(a_q=_rand(3, 40, dtype=I8), b_q=_rand(5, 40, dtype=I8),
                                    out_i32=_rand(3, 5, dtype=I32)),
    "int8_linear_w8a8": lambda: _linear_args(I8),
    "int8_linear_wo": lambda: _linear_args(I8),
    "int8_linear_a16": lambda: _linear_args(I8),
    "linear_f32": lambda: {("w" if k == "w_q" else k): v for k, v in _linear_args(F32, scaled=False).items()},
    "linear_bf16": lambda: {("w" if k == "w_q" else k): v for k, v in _linear_args(BF16, scaled=False).items()},
    "attention": _attention_args,
    "argmax_rows": lambda: dict(x=_rand(3, 40), out=_rand(3, dtype=I64)),
    "sum_words": lambda: dict(words=_rand(40, dtype=I64)),
}

TENSOR_ARGS = [(op, name) for op, make in VALID_CALLS.items()
               for name, value in make().items() if isinstance(value, torch.Tensor)]
WRONG_DTYPE = {F32: torch.float64, BF16: torch.float16, I8: torch.uint8, I32: I64, I64: I32}


def _call(op, args):
    getattr(_C, op)(**args)


def _spoiled(op, name, spoil):
    args = VALID_CALLS[op]()
    args[name] = spoil(args[name])
    return args


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values and shape, every second element of a wider last dimension: not contiguous."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values and shape, one byte off the element alignment (a view into a byte buffer)."""
    buf = bytearray(t.numel() * t.element_size() + 1)  # torch's own views refuse a misaligned offset
    view = torch.frombuffer(buf, dtype=t.dtype, offset=1, count=t.numel()).view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("op", VALID_CALLS)
def test_valid_call_runs(op):
    """The table itself is right: each spoiled call below differs from a call that works."""
    _call(op, VALID_CALLS[op]())


@pytest.mark.parametrize("op,name", TENSOR_ARGS)
def test_wrong_dtype_is_a_type_error_naming_the_argument(op, name):
    args = _spoiled(op, name, lambda t: t.to(WRONG_DTYPE[t.dtype]))
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype"):
        _call(op, args)


def test_unsupported_dtype_is_named():
    args = VALID_CALLS["rms_norm"]()
    args["x"] = args["x"].double()
    with pytest.raises(TypeError, match=r"x: expected dtype float32, got torch\.float64"):
        _call("rms_norm", args)


@pytest.mark.parametrize("op,name", TENSOR_ARGS)
def test_wrong_device_is_a_value_error_naming_the_argument(op, name):
    args = _spoiled(op, name, lambda t: t.to("meta"))
    with pytest.raises(ValueError, match=rf"^{name}: tensors on device 'meta'"):
        _call(op, args)


@pytest.mark.parametrize("op,name", [(op, n) for op, n in TENSOR_ARGS if VALID_CALLS[op]()[n].shape[-1] > 1])
def test_non_contiguous_is_a_value_error_naming_the_argument(op, name):
    args = _spoiled(op, name, _strided)
    with pytest.raises(ValueError, match=rf"^{name}: .*contiguous"):
        _call(op, args)


@pytest.mark.parametrize("op,name", [(op, n) for op, n in TENSOR_ARGS if VALID_CALLS[op]()[n].element_size() > 1])
def test_misaligned_is_a_value_error_naming_the_argument(op, name):
    args = _spoiled(op, name, _misaligned)
    with pytest.raises(ValueError, match=rf"^{name}: data is not aligned"):
        _call(op, args)


@pytest.mark.parametrize("op,name", [a for a in TENSOR_ARGS if a != ("sum_words", "words")])
def test_mismatched_shape_is_a_value_error(op, name):
    """One more element along a dimension the other arguments fix: the last one, or the rows where
    the last is free (argmax_rows's x)."""
    dim = 0 if (op, name) == ("argmax_rows", "x") else -1
    args = _spoiled(op, name, lambda t: torch.cat([t, t.narrow(dim, 0, 1)], dim=dim))
    names = [n for n, v in args.items() if isinstance(v, torch.Tensor)]
    with pytest.raises(ValueError, match=rf"^({'|'.join(names)}):"):
        _call(op, args)


@pytest.mark.parametrize("op,name", TENSOR_ARGS)
def test_empty_is_a_value_error(op, name):
    args = _spoiled(op, name, lambda t: t[..., :0].contiguous())
    names = [n for n, v in args.items() if isinstance(v, torch.Tensor)]
    with pytest.raises(ValueError, match=rf"^({'|'.join(names)}):"):
        _call(op, args)


@pytest.mark.parametrize("op,name", [("int8_matmul_i32", "b_q"), ("int8_linear_w8a8", "w_q")])
def test_minus_128_where_avx2_would_negate_it_is_rejected(op, name):
    """vpsignb cannot negate -128: on AVX2 it would be a wrong sum, so the binding refuses it."""
    def with_min(t):
        t = t.clone()
        t[-1, -1] = -128
        return t
    with pytest.raises(ValueError, match=rf"^{name}: holds -128"):
        _call(op, _spoiled(op, name, with_min))


def test_minus_128_in_a_q_and_in_w8a16_weights_is_exact():
    """-128 is fine where no kernel negates it: a_q of int8_matmul_i32, and W8A16's weights."""
    a = torch.full((2, 64), -128, dtype=I8)
    b = torch.full((3, 64), -127, dtype=I8)
    out = torch.empty(2, 3, dtype=I32)
    _C.int8_matmul_i32(a, b, out)
    assert (out == 128 * 127 * 64).all()
    x = torch.full((1, 64), -1.0)
    w = torch.full((3, 64), -128, dtype=I8)
    y = torch.empty(1, 3)
    _C.int8_linear_a16(x, w, torch.ones(3), y)
    assert torch.equal(y, torch.full((1, 3), 128.0 * 64))


@pytest.mark.parametrize("isa", ops.supported_isas())
@pytest.mark.parametrize("rows", [2, 40])  # the decode GEMV and the prefill GEMM
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_give_nan_rows_not_numbers(isa, rows, bad):
    """A NaN or an infinity in a row must not turn into finite garbage through the int8 rounding: its
    scale is NaN and its outputs NaN (as fp32 would give non-finite ones); the other rows are as
    without it."""
    x = torch.randn(rows, 72)
    clean = x.clone()
    x[1, 70] = bad  # in the scalar tail of a row of 72 (not a multiple of 16)
    w = torch.randint(-127, 128, (9, 72), dtype=I8)
    w_scale = torch.rand(9) + 0.1
    with ops.use_isa(isa):
        q, scale = torch.empty(rows, 72, dtype=I8), torch.empty(rows)
        _C.quantize_rows(x, q, scale)
        assert torch.isnan(scale[1]) and not q[1].any()
        for linear in (_C.int8_linear_w8a8, _C.int8_linear_a16):
            out, ref = torch.empty(rows, 9), torch.empty(rows, 9)
            linear(x, w, w_scale, out)
            linear(clean, w, w_scale, ref)
            assert torch.isnan(out[1]).all()
            others = [r for r in range(rows) if r != 1]
            assert torch.equal(out[others], ref[others])
