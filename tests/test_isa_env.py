"""PYENGINE_ISA, read once per process: each case runs in its own `python -c` subprocess (all started
at once, so they overlap).

Implemented behaviour (csrc/cpu/cpu_features.cpp): a known level caps dispatch at
min(level, detected), silently, so a level above the CPU's gives the CPU's best; an unknown value
raises ValueError("PYENGINE_ISA: unknown ISA ...") from every call that dispatches (active_isa, set_isa, each
kernel), while importing pyengine still works. `pyengine info` names the level in use and the CPU's
feature flags (not capped).
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyengine import _C
from pyengine.kernels import ops
from conftest import ALL_ISAS

ROOT = Path(__file__).resolve().parents[1]

# rms_norm's scalar row sums squares in double, the SIMD rows in fp32 lanes: on this input the two
# give different bits, so the digest shows which kernels ran, not only what active_isa() says.
PROBE = """
import hashlib, json, torch
from pyengine import _C
from pyengine.kernels import ops
g = torch.Generator().manual_seed(0)
x, w = torch.randn(64, 1000, generator=g) * 3, torch.randn(1000, generator=g)
out = torch.empty_like(x)
_C.rms_norm(x, w, out, 1e-6)
print("PROBE", json.dumps({"active": ops.active_isa(), "detected": ops.detected_isa(),
                           "digest": hashlib.sha256(out.numpy().tobytes()).hexdigest()}))
"""

# `python -m pyengine.cli info`, in the same process as the probe (runpy is what -m runs): one torch
# import fewer. Its exit status becomes the process's.
THEN_INFO = """
import runpy, sys
sys.argv = ["pyengine", "info"]
runpy.run_module("pyengine.cli", run_name="__main__", alter_sys=True)
"""

BOGUS = """
import contextlib, io, json, torch
from pyengine import _C, cli
from pyengine.kernels import ops   # importing works; the value is parsed at first dispatch
result = {"detected": ops.detected_isa()}
def attempt(name, fn):
    try:
        fn()
        result[name] = None
    except Exception as e:
        result[name] = [type(e).__name__, str(e)]
attempt("active_isa", ops.active_isa)
attempt("kernel", lambda: _C.rms_norm(torch.ones(2, 8), torch.ones(8), torch.empty(2, 8), 1e-5))
attempt("custom_op", lambda: ops.silu_mul(torch.ones(4), torch.ones(4)))
attempt("set_isa", lambda: _C.set_isa("scalar"))  # not even lowering recovers
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    result["info_rc"] = cli.main(["info"])
result["info_err"] = err.getvalue()
print("PROBE", json.dumps(result))
"""

CHILDREN = {  # name: (PYENGINE_ISA value, code for python -c)
    "scalar": ("scalar", PROBE + THEN_INFO),
    "avx2": ("avx2", PROBE),
    "avx512": ("avx512", PROBE),
    "bogus": ("sse9", BOGUS),
}


@pytest.fixture(scope="module")
def children():
    """Every subprocess started together, then collected: name -> CompletedProcess-like dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = {}
    for name, (value, code) in CHILDREN.items():
        procs[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYENGINE_ISA": value},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = {"rc": proc.returncode, "out": out, "err": err}
    return results


def json_of(child):
    assert child["rc"] == 0, child["err"]
    lines = child["out"].splitlines()
    return json.loads(next(line for line in lines if line.startswith("PROBE "))[len("PROBE "):])


def digest_under(isa):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 1000, generator=g) * 3, torch.randn(1000, generator=g)
    out = torch.empty_like(x)
    with ops.use_isa(isa):
        _C.rms_norm(x, w, out, 1e-6)
    return hashlib.sha256(out.numpy().tobytes()).hexdigest()


def capped(wanted):
    return ALL_ISAS[min(ALL_ISAS.index(wanted), ALL_ISAS.index(ops.detected_isa()))]


@pytest.mark.parametrize("wanted", ALL_ISAS)
def test_known_value_caps_dispatch(children, wanted):
    got = json_of(children[wanted])
    assert got["detected"] == ops.detected_isa()  # the variable caps; it never changes detection
    assert got["active"] == capped(wanted)
    assert got["digest"] == digest_under(capped(wanted)), "the kernels that ran are not that level's"


def test_scalar_really_runs_the_scalar_kernels(children):
    if ops.detected_isa() == "scalar":
        pytest.skip("this CPU has only the scalar path: nothing to tell it apart from")
    got = json_of(children["scalar"])
    assert got["digest"] == digest_under("scalar") != digest_under(ops.detected_isa())


def test_value_above_the_cpu_is_capped_silently(children):
    if ops.detected_isa() == "avx512":
        pytest.skip("this CPU has the highest level (avx512): no value is above it")
    child = children["avx512"]
    got = json_of(child)
    assert got["active"] == ops.detected_isa()
    assert "PYENGINE_ISA" not in child["err"] and "avx512" not in child["err"]
    # set_isa, by contrast, refuses a level the CPU lacks.
    with pytest.raises(ValueError, match="this CPU does not support avx512"):
        _C.set_isa("avx512")


def test_unknown_value_is_an_error_at_every_dispatch(children):
    got = json_of(children["bogus"])
    assert got["detected"] == ops.detected_isa()
    message = ["ValueError", "PYENGINE_ISA: unknown ISA 'sse9' (expected scalar, avx2 or avx512)"]
    for what in ("active_isa", "kernel", "custom_op", "set_isa"):  # every call, not only the first
        assert got[what] == message, what
    assert got["info_rc"] == 2
    assert "pyengine: error: PYENGINE_ISA: unknown ISA 'sse9'" in got["info_err"]


def test_info_names_the_chosen_path(children):
    child = children["scalar"]
    assert child["rc"] == 0, child["err"]
    lines = [line for line in child["out"].splitlines() if line.startswith("cpu isa:")]
    assert lines and lines[0].startswith(f"cpu isa: scalar (detected {ops.detected_isa()}"), child["out"]
    # The feature flags, whatever the cap: detection is not capped.
    features = [line for line in child["out"].splitlines() if line.startswith("cpu features:")]
    usable = [name for name, ok in _C.cpu_features() if ok]
    assert features and features[0].split("(absent")[0].split()[2:] == (usable or ["none"]), child["out"]
    granted, reason = _C.amx_permission()
    assert f"amx tiles: {'permitted' if granted else 'not usable: ' + reason}" in child["out"]
