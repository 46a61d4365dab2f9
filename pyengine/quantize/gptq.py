"""GPTQ for the int8 weights: the same format as plain rounding (int8, one fp32 scale per output
row), with each column's rounding error pushed onto the columns not yet rounded, weighted by how
the layer's inputs co-vary, so that the layer's *outputs* move less (Frantar et al., "GPTQ", 2022).

Plain rounding (pyengine.quantize.int8.quantize_per_channel) minimizes the error of each weight alone. GPTQ
minimizes || X W^T - X Q^T || over inputs X seen on calibration text, through H = X^T X:

    for each column i (largest diag(H) first, "act order"):
        Q[:, i] = round(W[:, i] / scale) * scale
        W[:, i+1:] -= (W[:, i] - Q[:, i]) / U[i, i] * U[i, i+1:]      U = cholesky(H^-1), upper

Calibration text is sampled from the model itself (a fixed seed, a few common first words) by an
engine the caller provides (its default backend: fp32 weights stay fp32, bf16 stay bf16), so no
corpus ships with pyengine and none of the text used to judge quality is seen here. That engine is
closed before calibration, which holds one linear layer's fp32 weights at a time: each is read back
from a scratch file (written while the model's layers are built, in the checkpoint's own dtype) when
the calibration pass reaches it, rounded over every calibration token at once, run with its rounded
weights so the layers after it are calibrated on the inputs they will see in int8 (GPTQ's
layer-by-layer order), and dropped. Peak memory: one linear layer's fp32 weights and GPTQ's float64
work matrices ([in, in], and ROWS_PER_CHUNK rows), the calibration activations and KV cache, and
the int8 results: not the fp32 model (benchmarks/gptq_memory.py measures it).
It costs about two minutes for the default model on 2 cores, once: the result is kept in the
pyengine cache ($PYENGINE_CACHE/int8/), keyed by the model's files and these settings, and
load(..., int8_method="gptq") reads it from there the next time. The sampled text depends on the
kernels' rounding, which differs between ISAs, so two machines may make slightly different
weights; to use one set everywhere, write it once with `pyengine quantize` and load that file.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pyengine.kernels.backends import FusedBackend, LinearWeights
from pyengine.errors import CheckpointError
from pyengine.load.checkpoint import WeightReader, load_checkpoint
from pyengine.models import ARCHITECTURES
from pyengine.quantize.int8 import Int8Linear, dequantize, load_int8, model_fingerprint, save_int8

# First words of the calibration samples; each is continued by the fp32 model.
CALIBRATION_STARTS = ("The", "In", "A", "It", "When", "This", "He", "She", "There", "We", "After", "On",
                      "For", "One", "If", "My", "As", "They", "At", "His", "Her", "Our", "By", "From",
                      "While", "Some", "Many", "Each", "During", "Although", "Most", "Today")
CALIBRATION_TOKENS = 256  # new tokens per sample
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal: keeps H invertible with few samples
BLOCK = 128  # columns updated together (the result is the same; only the speed changes)
ROWS_PER_CHUNK = 4096  # rows rounded together (the result is the same; only the memory changes)
VERSION = 3  # part of the cache key: bump when a change to this file changes the weights it makes


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, *, damping: float = DAMPING,
                  block: int = BLOCK, rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and H = X^T X [in, in] over calibration inputs -> (int8 [out, in], fp32 scale [out]).

    The scales are plain rounding's (max |W_row| / 127), so the result reads exactly like
    quantize_per_channel's. An input feature never seen non-zero (H[i, i] == 0) gets weight 0.
    Rows are rounded `rows_per_chunk` at a time: each row's errors move only along that row, so the
    float64 work copies stay a chunk's size (a large vocabulary's output projection) at no change.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}")
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(in_features, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    del h
    back = torch.argsort(order)

    q = torch.empty((out_features, in_features), dtype=torch.int8)
    scale = torch.empty(out_features, dtype=torch.float32)
    for first in range(0, out_features, rows_per_chunk):
        rows = slice(first, first + rows_per_chunk)
        w = weight[rows].detach().to(torch.float64, copy=True)
        row_scale = w.abs().amax(dim=1) / 127.0
        w[:, dead] = 0.0
        q[rows] = _round_rows(w[:, order], u, row_scale, block)[:, back]
        scale[rows] = row_scale
    return q, scale


def _round_rows(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """GPTQ's column loop over rows `w` (float64, columns in act order, consumed): the rounded
    integers, as float64."""
    in_features = w.shape[1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.empty_like(w)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        wb, ub = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.empty_like(wb)
        for j in range(end - start):
            rounded = torch.round(wb[:, j] / safe).clamp_(-127, 127)
            q[:, start + j] = rounded
            err = (wb[:, j] - rounded * safe) / ub[j, j]
            wb[:, j + 1:] -= err[:, None] * ub[j, j + 1:][None, :]
            errors[:, j] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return q


def calibration_windows(engine, *, starts=CALIBRATION_STARTS, tokens: int = CALIBRATION_TOKENS,
                        seed: int = 0) -> list[list[int]]:
    """Token ids of text the model samples itself (temperature 1) from each first word: one window each."""
    results = engine.generate(list(starts), max_new_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True)
    return [r.prompt_token_ids + r.token_ids for r in results]


def _rounded(weight: torch.Tensor, bias, inputs: torch.Tensor) -> Int8Linear:
    """An fp32 linear layer rounded by GPTQ over `inputs` [..., in]; the bias stays fp32."""
    rows = inputs.reshape(-1, inputs.shape[-1]).float()
    q, scale = quantize_gptq(weight, (rows.T @ rows).double())
    return Int8Linear(q, scale, None if bias is None else bias.float().contiguous())


@dataclass
class _ScratchLinear:
    """A linear layer whose weight waits in the scratch file until the calibration pass reaches it."""
    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    bias: torch.Tensor | None


class _CalibratingBackend(FusedBackend):
    """The fused backend for one calibration pass. prepare_linear parks each weight in `scratch` (a
    file) instead of memory; linear(x, w) reads it back in fp32, rounds it by GPTQ over the rows of x,
    keeps the int8 result in self.rounded, and computes the output with the rounded weights."""

    def __init__(self, scratch, say):
        super().__init__()
        self.scratch, self.say = scratch, say
        self.rounded: dict[str, Int8Linear] = {}

    def prepare_linear(self, weight, bias=None, *, name=None):
        stored = weight.contiguous()
        offset = self.scratch.seek(0, os.SEEK_END)
        self.scratch.write(stored.view(torch.uint8).numpy().data if stored.numel() else b"")
        return self._keep(name, _ScratchLinear(name, offset, stored.dtype, tuple(stored.shape), bias))

    def fp32_weight(self, lin: _ScratchLinear) -> torch.Tensor:
        stored = torch.empty(lin.shape, dtype=lin.dtype)
        self.scratch.seek(lin.offset)
        if stored.numel() and self.scratch.readinto(stored.view(torch.uint8).numpy().data) != stored.nbytes:
            raise RuntimeError(f"the GPTQ scratch file ended before linear layer {lin.name!r}")
        return stored.float()

    def round_linear(self, lin: _ScratchLinear, inputs: torch.Tensor) -> Int8Linear:
        if lin.name in self.rounded:
            raise RuntimeError(f"linear layer {lin.name!r} ran twice in one calibration pass")
        rounded = _rounded(self.fp32_weight(lin), lin.bias, inputs)
        # Kept in the arena, apart from the heap where the work matrices come and go: results placed
        # between freed temporaries would keep the heap from shrinking, layer after layer.
        self.rounded[lin.name] = Int8Linear(self.arena.copy(rounded.qweight), self.arena.copy(rounded.scale),
                                            rounded.bias)
        if len(self.rounded) % 20 == 0:
            self.say(f"{len(self.rounded)}/{len(self.linears)} linear layers")
        return self.rounded[lin.name]

    def linear(self, x, w):
        rounded = LinearWeights(dequantize(self.round_linear(w, x)), w.bias)
        return super().linear(x, rounded)

    def tied_embedding(self, lm_head, embed):
        return embed  # the parked projection is not in memory to share


@torch.inference_mode()
def quantize_model(model_path: Path | str, windows: list[list[int]], *, progress: bool = True,
                   scratch_dir: Path | str | None = None) -> dict[str, Int8Linear]:
    """GPTQ int8 linears, by layer name, of the model in the folder `model_path`, calibrated on
    `windows` (token ids; cut to the shortest, to run as one batch); what FusedInt8Backend takes
    as `preloaded`. The model is built once with its linear weights parked in a scratch file
    (deleted afterwards) and run once over the windows, rounding each linear as the pass reaches it."""
    def say(text):
        if progress:
            print(f"pyengine: GPTQ: {text}", file=sys.stderr, flush=True)

    if not windows or not all(isinstance(w, list) and w for w in windows):
        raise ValueError("windows must be a non-empty list of non-empty token id lists")
    checkpoint = load_checkpoint(model_path, progress=progress)
    config = checkpoint.config
    with tempfile.TemporaryFile(dir=scratch_dir) as scratch:
        backend = _CalibratingBackend(scratch, say)
        model = ARCHITECTURES[config.arch](config, WeightReader(checkpoint.weights, checkpoint.path), backend)
        del checkpoint
        say("rounding the linear layers in order, each on the inputs the rounded layers before it give")
        length = min(len(w) for w in windows)
        tokens = torch.tensor([w[:length] for w in windows], dtype=torch.long)
        cache = model.new_cache(len(windows), length, torch.float32)
        hidden = model.hidden_states(tokens, cache, model.make_step(length, cache, None))
        del cache
        # The output projection last, from the final hidden states (its [tokens, vocab] output is not needed).
        backend.round_linear(model.lm_head, hidden)
    missing = [name for name in backend.linears if name not in backend.rounded]
    if missing:
        raise RuntimeError(f"calibration never ran linear layers {missing}: they cannot be quantized with GPTQ")
    return backend.rounded


def sample_and_quantize(model_path: Path | str, make_sampler, *, progress: bool = True) -> dict[str, Int8Linear]:
    """Calibration text sampled by the engine make_sampler() returns (closed and dropped before the
    layers are rounded, so the two never share memory), then quantize_model over it."""
    def say(text):
        if progress:
            print(f"pyengine: GPTQ: {text}", file=sys.stderr, flush=True)

    sampler = make_sampler()
    say(f"sampling {len(CALIBRATION_STARTS)} x {CALIBRATION_TOKENS} calibration tokens with backend "
        f"{sampler.backend_name!r}")
    try:
        windows = calibration_windows(sampler)
    finally:
        sampler.close()
    del sampler
    gc.collect()
    return quantize_model(model_path, windows, progress=progress)


def cache_path(model_path: Path, config, cache_dir=None) -> Path:
    """Where the GPTQ weights of the model at `model_path` are kept: named after the model's config,
    its weight files (name, size, modification time) and the calibration settings, so that a change
    to any of them makes a new entry rather than reusing a stale one."""
    from pyengine.load.default_model import default_cache_dir

    files = sorted(p for p in Path(model_path).iterdir() if p.suffix == ".safetensors")
    key = json.dumps({"config": model_fingerprint(config),
                      "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                      "starts": CALIBRATION_STARTS, "tokens": CALIBRATION_TOKENS, "damping": DAMPING,
                      "version": VERSION})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir(cache_dir) / "int8" / f"{Path(model_path).name}-gptq-{digest}.safetensors"


def load_or_quantize(model_path: Path, config, make_sampler, *, progress: bool = True,
                     cache_dir=None) -> dict[str, Int8Linear]:
    """The model's GPTQ int8 linears by layer name: from the cache, else computed (sample_and_quantize,
    calibration text from the engine make_sampler() returns) and cached."""
    path = cache_path(model_path, config, cache_dir)
    if path.is_file():
        try:
            linears, method = load_int8(path, config)
            if method == "gptq":
                return linears
        except CheckpointError as e:  # a damaged entry is rebuilt, not trusted
            print(f"pyengine: GPTQ cache entry unreadable, quantizing again: {e}", file=sys.stderr)
    linears = sample_and_quantize(model_path, make_sampler, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_int8(linears, config, partial, source=model_path, method="gptq")
        os.replace(partial, path)  # readers see the whole file or none
    finally:
        partial.unlink(missing_ok=True)
    return linears
