"""The memory-bandwidth roofline of decode: bytes a decode step reads, the machine's read bandwidth,
and how near a measured decode rate comes to reading those bytes at that bandwidth.

Decode at small batch is bound by reading the weights once per step (plus each sequence's KV
cache), so bytes read per decoded token is what its time and energy follow. Used by
``pyengine bench`` and ``benchmarks/cpu_roofline.py``.

The read probe is ``_C.sum_words`` over a buffer on 2 MB pages, each thread's share as two
sequential streams: the fastest plain read we have, so a fraction is against the best this machine
gives, not one lowered by 4 KB-page TLB misses.
"""
from __future__ import annotations

import statistics
import time

import torch

# bytes per stored element of the weights and of the KV cache / activations, by precision
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4}  # int8 weights, fp32 KV cache
INT8_SCALE_BYTES = 4  # one fp32 scale per output row
DTYPE_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def probe_buffer(nbytes: int = 1 << 30) -> torch.Tensor:
    """``nbytes`` on 2 MB pages (fp32 ones, as int64 words), as the fused backends keep their weights."""
    from pyengine.kernels.memory import huge_page_buffer

    return huge_page_buffer(nbytes)[0].view(torch.float32).fill_(1.0).view(torch.int64)


def read_bandwidth_gbs(repeats: int = 10, nbytes: int = 1 << 30) -> float:
    """Best-of-``repeats`` rate of reading ``nbytes`` (GB/s)."""
    from pyengine import _C

    x = probe_buffer(nbytes)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _C.sum_words(x)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 8 / best / 1e9


def bytes_per_token(config, precision: str, context: int, batch: int = 1) -> dict:
    """Bytes read per decoded token at ``batch`` sequences of ``context`` cached tokens each: the
    weights (every matrix, lm_head included, at their stored width; int8 adds a 4-byte scale per
    row) once per step shared by the batch, plus each sequence's KV cache, norms and embedding row."""
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision must be one of {', '.join(WEIGHT_BYTES)}, got {precision!r}")
    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0, got {batch}, {context}")
    c = config
    H, D, I, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    matrices = [((c.num_heads + 2 * c.num_kv_heads) * D, H), (H, c.num_heads * D), (2 * I, H), (H, I)]
    weight_elems = c.num_layers * sum(n * k for n, k in matrices) + V * H  # + lm_head
    rows = c.num_layers * sum(n for n, _ in matrices) + V
    weights = weight_elems * WEIGHT_BYTES[precision] + (rows * INT8_SCALE_BYTES if precision == "int8" else 0)
    act = ACTIVATION_BYTES[precision]
    small = (2 * c.num_layers + 1) * H * act + H * act  # norms, one embedding row
    kv = 2 * c.num_layers * c.num_kv_heads * D * act * context
    per_token = weights / batch
    return {"weights": per_token, "kv": kv, "other": small + kv, "total": per_token + small + kv}


def roofline_tok_s(config, precision: str, context: int, bandwidth_gbs: float, batch: int = 1) -> float:
    """Decode tokens/s (all ``batch`` sequences together) if a step took only the time to read its
    bytes at ``bandwidth_gbs``."""
    return bandwidth_gbs * 1e9 / bytes_per_token(config, precision, context, batch)["total"]


def fraction_beside(tok_s_runs, gbs_runs, bytes_per_step: int) -> float:
    """The median over repeats of each repeat's tokens/s against reading bytes_per_step at the rate
    probed just before it (gbs_runs, paired with tok_s_runs in order)."""
    return statistics.median([tok_s / (gbs * 1e9 / bytes_per_step) for tok_s, gbs in zip(tok_s_runs, gbs_runs)])


def weight_spans(engine) -> list[torch.Tensor]:
    """The linear layers' weights (and int8 scales) of a fused engine as they lie in memory: one int64
    view per contiguous span. The fused backends place them back to back in decode order, in 64 MB
    chunks, so a few spans cover them, with at most alignment padding between tensors."""
    model = engine.model
    linears = [value for layer in model.layers for value in vars(layer).values()] + [model.lm_head]
    tensors = [t for linear in linears for name in ("weight", "qweight", "scale")
               if isinstance(t := getattr(linear, name, None), torch.Tensor)]
    bounds = {}  # storage address -> (first byte, end byte)
    for t in tensors:
        storage = t.untyped_storage()
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        first, end, _ = bounds.get(storage.data_ptr(), (lo, hi, storage))
        bounds[storage.data_ptr()] = (min(first, lo), max(end, hi), storage)
    spans = []
    for base, (first, end, storage) in bounds.items():
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        spans.append(raw[first - base:first - base + (end - first) // 8 * 8].view(torch.int64))
    return spans


def weights_read_gbs(spans, repeats: int = 3) -> float:
    """Best-of-`repeats` rate of reading every span (_C.sum_words: integer sums, the bytes are not floats)."""
    from pyengine import _C

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for span in spans:
            _C.sum_words(span)
        best = min(best, time.perf_counter() - t)
    return sum(s.numel() * 8 for s in spans) / best / 1e9
