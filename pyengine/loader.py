"""Hugging Face checkpoint folders: config.json + safetensors (or a weights-only torch file) + tokenizer.

Everything that can be wrong with a checkpoint is caught here and reported as a CheckpointError that
names the file and the problem; nothing past this module sees a malformed input.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pyengine.config import ModelConfig
from pyengine.errors import CheckpointError, HubUnavailableError
from pyengine.tokenizer import Tokenizer

DEFAULT_MODEL = "default"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFETENSORS_DTYPES = {"F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"}


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def resolve_model_path(model: str | Path, *, progress: bool = True) -> Path:
    """A local folder for `model`: 'default' (converted once, then cached) or a path."""
    if str(model) == DEFAULT_MODEL:
        from pyengine.default_model import ensure_default_model

        return ensure_default_model(progress=progress)
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(path, "expected a model folder (with config.json), got a file")
    if _HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")):
        raise HubUnavailableError(
            f"{model!r} looks like a Hugging Face hub id, but downloads from the hub are not available "
            f"here. Download the model elsewhere (config.json, *.safetensors, tokenizer.json) and pass "
            f"its local folder, e.g. pyengine.load('/models/{str(model).split('/')[-1]}'), or use "
            f"model='default'."
        )
    raise CheckpointError(path, "no such model folder")


def load_checkpoint(model: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = True) -> Checkpoint:
    path = resolve_model_path(model, progress=progress)
    config = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
    weights = load_weights(path, dtype)
    tokenizer = Tokenizer.from_folder(path)
    return Checkpoint(path=path, config=config, weights=weights, tokenizer=tokenizer)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


# ---- weights -----------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in a fixed order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index, "has no weight_map")
        files = sorted({folder / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, f"shard listed in {index.name} is missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return [legacy]
    raise CheckpointError(folder, "no weights found (expected model.safetensors, sharded "
                                  "model-0000N-of-0000M.safetensors with an index, or pytorch_model.bin)")


def load_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        tensors = _read_safetensors(file) if file.suffix == ".safetensors" else _read_torch_weights_only(file)
        for name, tensor in tensors.items():
            if name in weights:
                raise CheckpointError(file, f"tensor {name!r} appears in more than one file")
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            weights[name] = tensor
    return weights


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_header(file)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(file, f"corrupt safetensors file ({e})") from None


def _check_safetensors_header(file: Path) -> None:
    """Validate the header against the file size before any tensor is mapped."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(file, f"truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(file, f"header length {header_len} does not fit in a {size}-byte file "
                                        "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(file, "safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(file, "safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(file, f"tensor {name!r} has a malformed header entry") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(file, f"tensor {name!r} has unsupported dtype {dtype}")
        if not (0 <= begin <= end <= data_size):
            raise CheckpointError(file, f"tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                                        f"{data_size}): the file is truncated or its header is wrong")


def _read_torch_weights_only(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: never run pickled code from a checkpoint.
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for bad pickles
        raise CheckpointError(file, f"cannot be read as a weights-only torch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(file, "expected a state dict of tensors")
    return state


class WeightReader:
    """Takes named tensors out of a checkpoint, checking each one's shape; reports what is missing."""

    def __init__(self, weights: dict[str, torch.Tensor], folder: Path, prefixes: tuple[str, ...] = ("",)):
        self.weights = weights
        self.folder = folder
        # Some checkpoints prefix every name (e.g. 'transformer.' for GPT-2 LM-head models).
        self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in weights)), "")

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = self.prefix + name
        tensor = self.weights.get(full)
        if tensor is None:
            raise CheckpointError(self.folder, f"tensor {full!r} is missing from the weights")
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(self.folder, f"tensor {full!r} has shape {tuple(tensor.shape)}, "
                                               f"expected {tuple(shape)}")
        return tensor
