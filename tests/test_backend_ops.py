"""Every registered op on every ISA this CPU has and every device present, against its reference.

In the spirit of ggml's test-backend-ops: the cases come from the registry (pyengine.kernels), so a
new op is covered by its entry, a new ISA level by its row in the C++ table (csrc/cpu/isa_levels.h),
a new device by its name in DEVICES. Each case runs the op's fast call and its reference on copies of
the same inputs and compares what they return and what they change in place, within the entry's
tolerance for the dtype."""
from __future__ import annotations

import pytest
import torch

from pyengine import _C, kernels
from pyengine.kernels import ops

DEVICES = ("cpu", "cuda")


def _device_available(device: str) -> str | None:
    """Why `device` cannot run here, or None."""
    if device == "cuda":
        if not _C.cuda_built:
            return "pyengine was built without CUDA kernels"
        if not torch.cuda.is_available() or _C.cuda_device_count() == 0:
            return "no CUDA GPU"
    return None


def _targets():
    """(op, device, dtype, isa) for every entry: the CPU at each ISA level, CUDA at none."""
    params = []
    for name, entry in kernels.REGISTRY.items():
        for device in DEVICES:
            if device not in entry.devices:
                continue
            missing = _device_available(device)
            for dtype in entry.dtypes[device]:
                dtype_name = str(dtype).removeprefix("torch.")
                isas = ops.supported_isas() if device == "cpu" else [None]
                for isa in isas:
                    marks = [pytest.mark.skip(reason=missing)] if missing else []
                    params.append(pytest.param(name, device, dtype, isa, marks=marks,
                                               id=f"{name}-{device}-{dtype_name}" + (f"-{isa}" if isa else "")))
    return params


def _clone_mutated(entry: kernels.Op, args: tuple) -> tuple:
    """args with fresh copies of the tensors the op changes in place; inputs it only reads are shared,
    so their layout (strided rows) reaches the kernel as the case built it."""
    names = entry.arg_names
    return tuple(a.clone() if names[i] in entry.mutates else a for i, a in enumerate(args))


def _compare(got, expected, tolerance: kernels.Tolerance, what: str):
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            _compare(g, e, tolerance, f"{what}[{i}]")
        return
    if expected is None:
        assert got is None, what
        return
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device, \
        f"{what}: {got.dtype} {tuple(got.shape)} {got.device} vs {expected.dtype} {tuple(expected.shape)} " \
        f"{expected.device}"
    if got.is_floating_point():
        torch.testing.assert_close(got, expected, atol=tolerance.atol, rtol=tolerance.rtol,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, expected), f"{what}: differs at {(got != expected).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("name,device,dtype,isa", _targets())
def test_op_matches_reference(name, device, dtype, isa):
    entry = kernels.REGISTRY[name]
    cases = entry.samples(torch.device(device), dtype)
    assert cases, f"{name} has no sample inputs on {device} {dtype}"
    tolerance = entry.tolerance[dtype]
    names = entry.arg_names
    for case in cases:
        ref_args, fast_args = _clone_mutated(entry, case.args), _clone_mutated(entry, case.args)
        expected = entry.reference(*ref_args)
        if isa is None:
            got = entry.fast(*fast_args)
        else:
            with ops.use_isa(isa):
                got = entry.fast(*fast_args)
        if device == "cuda":
            torch.cuda.synchronize()
        _compare(got, expected, tolerance, f"{name} {case.label}: result")
        for i, arg_name in enumerate(names[: len(case.args)]):
            if arg_name in entry.mutates:
                _compare(fast_args[i], ref_args[i], tolerance, f"{name} {case.label}: {arg_name} after the call")


@pytest.mark.parametrize("name", list(kernels.REGISTRY))
def test_torch_library_op_matches_the_fast_call(name):
    """ops.<name>, the custom op generated from the entry, runs the same kernel as the fast call."""
    entry = kernels.REGISTRY[name]
    dtype = entry.dtypes["cpu"][0]
    case = entry.samples(torch.device("cpu"), dtype)[1]
    fast_args, op_args = _clone_mutated(entry, case.args), _clone_mutated(entry, case.args)
    _compare(getattr(ops, name)(*op_args), entry.fast(*fast_args), kernels.EXACT, f"ops.{name}")


def test_every_registered_op_has_a_binding_of_its_name():
    """One name everywhere: the registry entry, ops.<name> and _C.<name>."""
    for name in kernels.REGISTRY:
        assert hasattr(_C, name), name
        assert getattr(ops, name) is kernels.REGISTRY[name].op


def test_isa_levels_come_from_the_cpp_table():
    levels = ops.isa_levels()
    supported = ops.supported_isas()
    assert levels[0] == "scalar" == supported[0]
    assert set(supported) <= set(levels) and supported[-1] == ops.detected_isa()
    for level in ops.supported_isas():
        with ops.use_isa(level):
            assert ops.active_isa() == level
