"""WeightArena: where the fused backends keep their weights (pyengine/kernels/memory.py)."""
from __future__ import annotations

import mmap

import pytest
import torch

import pyengine
from pyengine import _C
from pyengine.kernels import ops
from pyengine.kernels.memory import WeightArena, huge_page_buffer, transparent_huge_pages
from conftest import isa_params

THP_ON = transparent_huge_pages() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")
needs_thp = pytest.mark.skipif(not THP_ON, reason=f"transparent huge pages: {transparent_huge_pages()}")


def smaps_entry(address: int) -> dict[str, str]:
    """This process's /proc/self/smaps fields for the mapping that holds `address`."""
    entry, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line: start-end perms ...
                if inside:
                    break
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside:
                key, _, value = line.partition(":")
                entry[key] = value.strip()
    return entry


def test_arena_places_copies_aligned_and_in_order():
    arena = WeightArena(chunk_bytes=1 << 20)
    sources = [torch.randn(7, 13), torch.randint(-127, 128, (5, 3), dtype=torch.int8), torch.randn(31)]
    placed = [arena.copy(t) for t in sources]
    for src, out in zip(sources, placed):
        assert out.dtype == src.dtype and out.shape == src.shape and out.is_contiguous()
        assert torch.equal(out, src) and out.data_ptr() != src.data_ptr()
        assert out.data_ptr() % 64 == 0
    addresses = [t.data_ptr() for t in placed]
    assert addresses == sorted(addresses) and addresses[-1] - addresses[0] < 1 << 20  # one chunk, in order


def test_arena_tensor_larger_than_a_chunk_and_empty_tensors():
    arena = WeightArena(chunk_bytes=1 << 16)
    big = torch.arange(100_000, dtype=torch.float32)
    assert torch.equal(arena.copy(big), big)
    small = arena.copy(torch.ones(3))  # does not fit the rest of the big one's chunk: a new chunk
    assert torch.equal(small, torch.ones(3))
    assert arena.copy(torch.empty(0, 5)).shape == (0, 5)


def test_arena_memory_outlives_the_arena():
    t = WeightArena().copy(torch.full((1000,), 3.0))
    import gc

    gc.collect()
    assert torch.equal(t, torch.full((1000,), 3.0))


def test_huge_page_buffer_rejects_bad_size():
    with pytest.raises(ValueError, match="nbytes"):
        huge_page_buffer(0)


@needs_thp
def test_huge_page_buffer_is_eligible_for_huge_pages():
    buf, advised = huge_page_buffer(8 << 20)
    assert advised
    buf.fill_(1)
    entry = smaps_entry(buf.data_ptr())
    assert entry.get("THPeligible") == "1", entry


@needs_thp
@pytest.mark.parametrize("backend", ["fused", "fused-int8"])
def test_fused_backends_keep_linear_weights_on_huge_pages(tiny_models, backend):
    engine = pyengine.load(tiny_models["llama3-scaled"], backend=backend)  # tied embedding
    model = engine.model
    weight = model.lm_head.weight if backend == "fused" else model.lm_head.qweight
    assert smaps_entry(weight.data_ptr()).get("THPeligible") == "1"
    assert smaps_entry(model.layers[0].gate_up.weight.data_ptr() if backend == "fused"
                       else model.layers[0].gate_up.qweight.data_ptr()).get("THPeligible") == "1"
    if backend == "fused":  # tied: the embedding table is the output projection's weight, not a copy
        assert model.embed.data_ptr() == model.lm_head.weight.data_ptr()


def test_tied_embedding_is_not_duplicated_and_logits_unchanged(tiny_models):
    fused = pyengine.load(tiny_models["qwen2"], backend="fused")
    torch_ref = pyengine.load(tiny_models["qwen2"], backend="torch")
    assert fused.model.embed.data_ptr() == fused.model.lm_head.weight.data_ptr()
    assert torch_ref.model.embed.data_ptr() == torch_ref.model.lm_head.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    torch.testing.assert_close(fused.logits(ids), torch_ref.logits(ids), rtol=1e-4, atol=1e-4)


# ---- _C.sum_words: the rooflines' bandwidth probe ---------------------------------------------

@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sum_words_matches_torch_on_every_isa(isa, threads):
    """Every word read once, whatever the ISA, thread count and length (leftovers past whole cache
    lines, past a thread's share, an odd word in a stream); full 64-bit values, so sums wrap."""
    gen = torch.Generator().manual_seed(threads)
    before = _C.num_threads()
    try:
        ops.set_num_threads(threads)
        with ops.use_isa(isa):
            for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099]:
                words = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=gen)
                assert _C.sum_words(words) == int(words.sum()), (isa, threads, n)
    finally:
        ops.set_num_threads(before)


def test_sum_words_reads_a_huge_page_buffer_through_an_int64_view():
    buffer, _ = huge_page_buffer(4 << 20)
    words = buffer.view(torch.float32).fill_(1.0).view(torch.int64)
    assert _C.sum_words(words) == int(words.sum())
    assert _C.sum_words(words[1:]) == int(words[1:].sum())  # not 64-byte aligned


@pytest.mark.parametrize("args, error, message", [
    (lambda: torch.zeros(8, dtype=torch.int32), TypeError, "words: expected dtype int64"),
    (lambda: torch.zeros(2, 4, dtype=torch.int64), ValueError, "words: expected 1 dimension"),
    (lambda: torch.zeros(16, dtype=torch.int64)[::2], ValueError, "words: .*contiguous"),
    (lambda: [1, 2, 3], TypeError, "words"),
])
def test_sum_words_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.sum_words(args())
