"""Where the CPU backends keep their weights: memory the kernel is asked to back with 2 MB pages.

Decode streams every weight matrix once per token. With 4 KB pages that is ~130k page translations
per token for the default model in fp32, and under a hypervisor (nested paging) each TLB miss costs
a two-level page walk. 2 MB pages made both a plain read of the model's matrices and decode
measurably faster on the KVM machines here.

Linux gives anonymous memory 2 MB pages when transparent huge pages are "always", or "madvise" and
the range was advised with MADV_HUGEPAGE, which WeightArena does. Elsewhere (no THP, another OS)
the arena is plain memory and everything works the same, only without the gain.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # every tensor starts on a cache line (and a SIMD-vector boundary)
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's THP mode ("always", "madvise", "never"), or "unavailable" (not Linux, or no THP)."""
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def huge_page_buffer(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A zero-filled uint8 tensor of nbytes over fresh anonymous memory advised for 2 MB pages.
    Returns (tensor, advised): advised is False where the OS has no MADV_HUGEPAGE."""
    if nbytes <= 0:
        raise ValueError(f"huge_page_buffer: nbytes must be positive, got {nbytes}")
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # not a POSIX mmap (Windows): plain memory
        return torch.zeros(nbytes, dtype=torch.uint8), False
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # Private anonymous memory (Python's default for fileno -1 is shared, which THP does not cover
    # unless shmem_enabled says so); untouched, so the advice applies from the first touch.
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advised = False
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
            advised = True
        except OSError:  # THP compiled out of this kernel
            pass
    # frombuffer keeps `region` alive for as long as any view of the tensor lives.
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes], advised


class WeightArena:
    """Bump allocator for a model's weights over huge-page-advised chunks.

    Tensors are placed one after another in the order they are added, which for a model is the
    order decode reads them. A chunk is freed when the last tensor placed in it is.
    """

    def __init__(self, chunk_bytes: int = 64 << 20):
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None
        self._used = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous tensor (zero-filled in practice) placed in the arena."""
        shape = tuple(int(n) for n in shape)
        numel = 1
        for n in shape:
            numel *= n
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        start = -(-self._used // _ALIGN) * _ALIGN
        if self._chunk is None or start + nbytes > self._chunk.numel():
            self._chunk, _ = huge_page_buffer(max(self.chunk_bytes, nbytes))
            start = 0
        self._used = start + nbytes
        return self._chunk[start:start + nbytes].view(dtype).view(shape)

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous copy of t in the arena, converted to `dtype` on the way (default: t's own)."""
        out = self.empty(t.shape, dtype or t.dtype)
        out.copy_(t)
        return out
