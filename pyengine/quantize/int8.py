"""int8 weights: symmetric per-output-channel quantization, and saving/reloading it as safetensors.

A weight matrix W [out, in] becomes int8 Q and one fp32 scale per output row, W ~= Q * scale[:, None],
scale = max|W_row| / 127. Activations are quantized per token at run time by the int8 kernels.
Which integer each weight gets is the method's choice: "absmax" rounds each to nearest (here),
"gptq" compensates rounding errors across a row (pyengine.quantize.gptq); the file format is the same.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pyengine.errors import CheckpointError

FORMAT = "pyengine-int8-v2"  # tensors keyed by layer name
OLD_FORMAT = "pyengine-int8-v1"  # keyed by the order a model built its layers: refused
# How layers are named (written into each file): the checkpoint's tensor name without ".weight";
# a projection the model fuses from several checkpoint tensors is named after their shared prefix.
NAMING = ("name of the checkpoint's weight tensor without '.weight' (as Hugging Face names it, without a "
          "'transformer.' prefix); fused projections: '<layer>.self_attn.qkv_proj' = the rows of q_proj, "
          "k_proj, v_proj stacked in that order, '<layer>.mlp.gate_up_proj' = gate_proj then up_proj; "
          "'lm_head' also when tied to the embedding")
METHODS = ("absmax", "gptq")  # plain rounding (quantize_per_channel) or GPTQ (pyengine.quantize.gptq); one format


@dataclass
class Int8Linear:
    qweight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] fp32
    bias: torch.Tensor | None = None

    @property
    def shape(self):
        return tuple(self.qweight.shape)


def quantize_per_channel(weight: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                         rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (int8 [out, in], fp32 scale [out]); round half to even, clamp to +-127.

    Rows are independent, so they are quantized in chunks: the fp32 temporaries stay a chunk's size
    whatever the matrix (a large vocabulary's output projection included). `out`: tensors to write
    into (e.g. placed in a WeightArena) instead of new ones."""
    rows = weight.shape[0]
    qweight, scale = out if out is not None else (torch.empty(weight.shape, dtype=torch.int8),
                                                  torch.empty(rows, dtype=torch.float32))
    for start in range(0, rows, rows_per_chunk):
        w = weight[start:start + rows_per_chunk].float()
        s = w.abs().amax(dim=1) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
        qweight[start:start + rows_per_chunk] = torch.round(w / safe[:, None]).clamp_(-127, 127)
        scale[start:start + rows_per_chunk] = s
    return qweight, scale


def dequantize(linear: Int8Linear) -> torch.Tensor:
    return linear.qweight.float() * linear.scale[:, None]


def model_fingerprint(config) -> str:
    """Identifies the architecture and shapes a saved int8 file belongs to."""
    text = json.dumps({k: v for k, v in vars(config).items() if k != "notes"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_int8(linears: dict[str, Int8Linear], config, path: Path | str, *, source: Path | str | None = None,
              method: str = "absmax") -> Path:
    """Write the quantized linears, keyed by layer name (see NAMING), to one safetensors file, with the
    method that rounded them."""
    from safetensors.torch import save_file

    if not isinstance(linears, dict):
        raise TypeError(f"linears must be a dict of Int8Linear by layer name, got {type(linears).__name__}")
    tensors = {}
    for name, lin in linears.items():
        tensors[f"{name}.qweight"] = lin.qweight.contiguous()
        tensors[f"{name}.scale"] = lin.scale.contiguous()
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.contiguous()
    path = Path(path)
    metadata = {"format": FORMAT, "fingerprint": model_fingerprint(config), "linears": json.dumps(sorted(linears)),
                "naming": NAMING, "source": str(source or ""), "method": method}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _check_int8_linear(path: Path, name: str, lin: Int8Linear) -> None:
    """What the kernels assume of a layer, checked once at load rather than trusted from the file."""
    q, scale, bias = lin.qweight, lin.scale, lin.bias
    if q.dtype != torch.int8 or q.dim() != 2:
        raise CheckpointError(path, f"{name}.qweight: expected a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    rows = q.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        raise CheckpointError(path, f"{name}.scale: expected float32 of shape ({rows},), "
                                    f"got {scale.dtype} {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CheckpointError(path, f"{name}.scale: holds a negative or non-finite scale")
    if bool((q == -128).any()):
        raise CheckpointError(path, f"{name}.qweight: holds -128, but {FORMAT} weights are symmetric, in "
                                    "[-127, 127] (a damaged file, or not written by pyengine)")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (rows,)):
        raise CheckpointError(path, f"{name}.bias: expected float32 of shape ({rows},), "
                                    f"got {bias.dtype} {tuple(bias.shape)}")


def load_int8(path: Path | str, config) -> tuple[dict[str, Int8Linear], str]:
    """Read a file written by save_int8, checking that it belongs to this model: (linears by layer
    name, method). Which layer each one is comes from its name, never from its place in the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "int8 weights file is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == OLD_FORMAT:
                raise CheckpointError(path, f"written by an older pyengine ({OLD_FORMAT}: layers matched by their "
                                            "order, which this version does not trust); quantize again, e.g. "
                                            "`pyengine quantize OUT.safetensors`")
            if meta.get("format") != FORMAT:
                raise CheckpointError(path, f"not a {FORMAT} file (format {meta.get('format')!r})")
            if meta.get("fingerprint") != model_fingerprint(config):
                raise CheckpointError(path, "int8 weights were made for a different model (fingerprint mismatch)")
            method = meta.get("method")
            if method not in METHODS:
                raise CheckpointError(path, f"int8 weights made by an unknown method {method!r}")
            listed = json.loads(meta.get("linears", "null"))
            if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                raise CheckpointError(path, "metadata 'linears' is not a list of layer names")
            stored = set(f.keys())
            out = {}
            for name in listed:
                for part in ("qweight", "scale"):
                    if f"{name}.{part}" not in stored:
                        raise CheckpointError(path, f"{name}.{part} is missing (the file lists layer {name!r})")
                bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in stored else None
                lin = Int8Linear(f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scale"), bias)
                _check_int8_linear(path, name, lin)
                out[name] = lin
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(path, f"cannot read int8 weights ({e})") from None
    return out, method
