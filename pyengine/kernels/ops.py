"""The kernel library's ops as torch.library custom ops, and the CPU's ISA and thread settings.

``pyengine.kernels.ops.<name>`` is the ``torch.library`` op ``pyengine::<name>`` (usable under torch.compile)
generated from the op's registry entry in ``pyengine.kernels``, which also holds its reference (the
maths in plain torch), its fast call and its sample inputs.
"""
from __future__ import annotations

import contextlib

import torch

from pyengine import _C
from pyengine.kernels import REGISTRY

# ---- ISA and threads ---------------------------------------------------------------------------


def detected_isa() -> str:
    """Best SIMD level the CPU supports (a name from isa_levels())."""
    return _C.detected_isa()


def active_isa() -> str:
    """SIMD level the CPU kernels dispatch to now."""
    return _C.active_isa()


def isa_levels() -> list[str]:
    """Every ISA level the kernels dispatch to, lowest first: the C++ table (csrc/cpu/isa_levels.h)."""
    return list(_C.isa_levels())


def supported_isas() -> list[str]:
    """The ISA levels this CPU can run, lowest first."""
    return list(_C.supported_isas())


@contextlib.contextmanager
def use_isa(name: str):
    """Cap the CPU kernels at ISA ``name`` inside the block (for tests and comparisons)."""
    previous = _C.active_isa()
    _C.set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)


def set_num_threads(n: int) -> None:
    """Threads for both our kernels (OpenMP) and torch's intra-op pool."""
    if n < 1:
        raise ValueError(f"number of threads must be at least 1, got {n}")
    _C.set_num_threads(n)
    torch.set_num_threads(n)


# ---- the ops: one module attribute per registry entry --------------------------------------------

globals().update({name: entry.op for name, entry in REGISTRY.items()})
__all__ = ["detected_isa", "active_isa", "isa_levels", "supported_isas", "use_isa", "set_num_threads",
           *REGISTRY]
