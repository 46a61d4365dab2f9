"""Whether the CUDA kernels can run here.

The CUDA kernels are not separate ops: an op whose registry entry (pyengine.kernels) lists "cuda"
among its devices runs its CUDA twin when given CUDA tensors, through the same fast call
(``pyengine.kernels.<op>``), torch.library op (``pyengine.kernels.ops.<op>``) and binding (``_C.<op>``),
launched on the current stream of the inputs' device. Nothing synchronizes. The CUDA kernels also
take float16 and bfloat16.
"""
from __future__ import annotations

from pyengine import _C


def is_available() -> bool:
    """Built with CUDA kernels and at least one GPU usable from here."""
    return bool(_C.cuda_built) and _C.cuda_device_count() > 0


def device_count() -> int:
    """GPUs the kernels can use; 0 without a GPU, a driver or a CUDA build (never raises)."""
    return _C.cuda_device_count()
