"""GPTQ for the int8 weights: the same format as plain rounding (int8, one fp32 scale per output
row), with each column's rounding error pushed onto the columns not yet rounded, weighted by how
the layer's inputs co-vary, so that the layer's *outputs* move less (Frantar et al., "GPTQ", 2022).

Plain rounding (pyengine.quant.quantize_per_channel) minimizes the error of each weight alone. GPTQ
minimizes || X W^T - X Q^T || over inputs X seen on calibration text, through H = X^T X:

    for each column i (largest diag(H) first, "act order"):
        Q[:, i] = round(W[:, i] / scale) * scale
        W[:, i+1:] -= (W[:, i] - Q[:, i]) / U[i, i] * U[i, i+1:]      U = cholesky(H^-1), upper

Calibration text is sampled from the fp32 model itself (a fixed seed, a few common first words), so
no corpus ships with pyengine and none of the text used to judge quality is seen here. All of it runs
through the model as one batch, and each layer is rounded as the pass reaches it, so the layers after
it are calibrated on the inputs they will see in int8 (GPTQ's layer-by-layer order).
It costs about two minutes for the default model on 2 cores, once: the result is kept in the
pyengine cache ($PYENGINE_CACHE/int8/), keyed by the model's files and these settings, and
load(..., int8_method="gptq") reads it from there the next time. The sampled text depends on the
fp32 kernels' rounding, which differs between ISAs, so two machines may make slightly different
weights; to use one set everywhere, write it once with `pyengine quantize` and load that file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from pyengine.errors import CheckpointError
from pyengine.quant import Int8Linear, dequantize, load_int8, model_fingerprint, save_int8

# First words of the calibration samples; each is continued by the fp32 model.
CALIBRATION_STARTS = ("The", "In", "A", "It", "When", "This", "He", "She", "There", "We", "After", "On",
                      "For", "One", "If", "My", "As", "They", "At", "His", "Her", "Our", "By", "From",
                      "While", "Some", "Many", "Each", "During", "Although", "Most", "Today")
CALIBRATION_TOKENS = 256  # new tokens per sample
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal: keeps H invertible with few samples
BLOCK = 128  # columns updated together (the result is the same; only the speed changes)
VERSION = 2  # part of the cache key: bump when a change to this file changes the weights it makes


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, *, damping: float = DAMPING,
                  block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and H = X^T X [in, in] over calibration inputs -> (int8 [out, in], fp32 scale [out]).

    The scales are plain rounding's (max |W_row| / 127), so the result reads exactly like
    quantize_per_channel's. An input feature never seen non-zero (H[i, i] == 0) gets weight 0.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(in_features, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

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
    q = q[:, torch.argsort(order)]
    return q.to(torch.int8).contiguous(), scale.float().contiguous()


def calibration_windows(engine, *, starts=CALIBRATION_STARTS, tokens: int = CALIBRATION_TOKENS,
                        seed: int = 0) -> list[list[int]]:
    """Token ids of text the model samples itself (temperature 1) from each first word: one window each."""
    results = engine.generate(list(starts), max_new_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True)
    return [r.prompt_token_ids + r.token_ids for r in results]


def _rounded(lin, inputs: torch.Tensor) -> Int8Linear:
    """An fp32 linear layer (weight, bias) rounded by GPTQ over `inputs` [..., in]; the bias stays fp32."""
    rows = inputs.reshape(-1, inputs.shape[-1]).float()
    q, scale = quantize_gptq(lin.weight, (rows.T @ rows).double())
    return Int8Linear(q, scale, None if lin.bias is None else lin.bias.float().contiguous())


@contextmanager
def _quantizing_linears(backend, done: dict, say):
    """Within the block, each backend.linear(x, w) call rounds w by GPTQ over the rows of x (every
    calibration token at once), keeps the result in done[id(w)], and computes the layer's output
    with the rounded weights. So each layer is calibrated on the inputs it will see in int8, the
    errors of the layers before it included: GPTQ's layer-by-layer order, in one forward pass."""
    def linear(x, w):
        if id(w) in done:
            raise RuntimeError("a linear layer ran twice in one calibration pass")
        done[id(w)] = _rounded(w, x)
        w.weight.copy_(dequantize(done[id(w)]))
        if len(done) % 20 == 0:
            say(f"{len(done)}/{len(backend.linears)} linear layers")
        return plain(x, w)

    plain = backend.linear
    backend.linear = linear
    try:
        yield
    finally:
        del backend.linear  # back to the class's method


@torch.inference_mode()
def quantize_in_one_pass(engine, windows: list[list[int]], say=lambda text: None) -> list[Int8Linear]:
    """GPTQ int8 linears of an fp32 `fused` engine, in construction order, calibrated on `windows`
    (cut to the shortest, to run as one batch). The engine's own fp32 weights are overwritten with
    their rounded values on the way: it is spent afterwards."""
    model, backend = engine.model, engine.backend
    length = min(len(w) for w in windows)
    tokens = torch.tensor([w[:length] for w in windows], dtype=torch.long)
    done: dict = {}
    with _quantizing_linears(backend, done, say):
        cache = model.new_cache(len(windows), length, torch.float32)
        hidden = model.hidden_states(tokens, cache, model.make_step(length, cache, None))
    # The output projection last, from the final hidden states (its [tokens, vocab] output is not needed).
    done[id(model.lm_head)] = _rounded(model.lm_head, hidden)
    missing = [i for i, lin in enumerate(backend.linears) if id(lin) not in done]
    if missing:
        raise RuntimeError(f"calibration never ran linear layers {missing}: they cannot be quantized with GPTQ")
    return [done[id(lin)] for lin in backend.linears]


def quantize_model(model, *, progress: bool = True) -> list[Int8Linear]:
    """The int8 linears of `model` (a folder or 'default'), in construction order, by GPTQ over text
    the fp32 model samples; what FusedInt8Backend takes as `preloaded`."""
    from pyengine.engine import Engine

    def say(text):
        if progress:
            print(f"pyengine: GPTQ: {text}", file=sys.stderr, flush=True)

    reference = Engine(model, backend="fused", progress=progress)
    say(f"sampling {len(CALIBRATION_STARTS)} x {CALIBRATION_TOKENS} calibration tokens from the fp32 model")
    windows = calibration_windows(reference)
    say("rounding the linear layers in order, each on the inputs the rounded layers before it give")
    return quantize_in_one_pass(reference, windows, say)


def cache_path(model_path: Path, config, cache_dir=None) -> Path:
    """Where the GPTQ weights of the model at `model_path` are kept: named after the model's config,
    its weight files (name, size, modification time) and the calibration settings, so that a change
    to any of them makes a new entry rather than reusing a stale one."""
    from pyengine.default_model import default_cache_dir

    files = sorted(p for p in Path(model_path).iterdir() if p.suffix == ".safetensors")
    key = json.dumps({"config": model_fingerprint(config),
                      "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                      "starts": CALIBRATION_STARTS, "tokens": CALIBRATION_TOKENS, "damping": DAMPING,
                      "version": VERSION})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir(cache_dir) / "int8" / f"{Path(model_path).name}-gptq-{digest}.safetensors"


def load_or_quantize(model_path: Path, config, *, progress: bool = True, cache_dir=None) -> list[Int8Linear]:
    """The model's GPTQ int8 linears: from the cache, else computed (quantize_model) and cached."""
    path = cache_path(model_path, config, cache_dir)
    if path.is_file():
        try:
            linears, method = load_int8(path, config)
            if method == "gptq":
                return linears
        except CheckpointError as e:  # a damaged entry is rebuilt, not trusted
            print(f"pyengine: GPTQ cache entry unreadable, quantizing again: {e}", file=sys.stderr)
    linears = quantize_model(model_path, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_int8(linears, config, partial, source=model_path, method="gptq")
        os.replace(partial, path)  # readers see the whole file or none
    finally:
        partial.unlink(missing_ok=True)
    return linears
