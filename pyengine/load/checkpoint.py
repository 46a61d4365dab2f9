"""Hugging Face checkpoint folders: config.json + safetensors (or a weights-only torch file) + tokenizer.

Everything that can be wrong with a checkpoint is caught here and reported as a CheckpointError that
names the file and the problem; nothing past this module sees a malformed input.
"""
from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pyengine.load.config import ModelConfig
from pyengine.errors import CheckpointError, HubUnavailableError
from pyengine.load.tokenizer import Tokenizer

DEFAULT_MODEL = "default"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# safetensors dtype names -> torch dtypes (all little-endian, as the format and x86/ARM are).
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: CheckpointWeights
    tokenizer: Tokenizer


def resolve_model_path(model: str | Path, *, progress: bool = True) -> Path:
    """A local folder for `model`: 'default' (converted once, then cached) or a path."""
    if str(model) == DEFAULT_MODEL:
        from pyengine.load.default_model import ensure_default_model

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


def load_checkpoint(model: str | Path, *, progress: bool = True) -> Checkpoint:
    path = resolve_model_path(model, progress=progress)
    config = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
    weights = CheckpointWeights(path)
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


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


class CheckpointWeights(Mapping):
    """A checkpoint's tensors by name, each read from its file only when asked for, in the dtype it is
    stored in, so that loading holds one tensor at a time on its way to the backend's own form (which
    converts it as it copies it into place, or rounds it to int8 a block of rows at a time), never
    the whole model.

    safetensors tensors are read with ``readinto`` into a buffer of their own, not through a map of
    the file: its touched pages would count in the process's resident memory until the map closed.
    Headers are checked (and names made unique across shards) when the mapping is built.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._stored: dict[str, _StoredTensor | torch.Tensor] = {}
        for file in weight_files(folder):
            if file.suffix == ".safetensors":
                entries = _safetensors_entries(file)
            else:  # a weights-only torch file, memory-mapped by torch.load
                entries = _read_torch_weights_only(file)
            for name, entry in entries.items():
                if name in self._stored:
                    raise CheckpointError(file, f"tensor {name!r} appears in more than one file")
                self._stored[name] = entry

    def __iter__(self):
        return iter(self._stored)

    def __len__(self):
        return len(self._stored)

    def __contains__(self, name):
        return name in self._stored

    def matrix_dtype(self) -> torch.dtype | None:
        """The floating dtype most of the checkpoint's matrices (2-D tensors) are stored in."""
        counts: dict[torch.dtype, int] = {}
        for entry in self._stored.values():
            if entry.dtype.is_floating_point and len(entry.shape) == 2:
                counts[entry.dtype] = counts.get(entry.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._stored[name]
        return entry if isinstance(entry, torch.Tensor) else _read_stored(entry)


def _read_stored(entry: _StoredTensor) -> torch.Tensor:
    # A mapping of its own, not the C heap: glibc raises its mmap threshold after freeing large blocks,
    # so buffers of a few MB freed one after another would stay in the heap and the process's
    # resident memory would grow with each layer loaded.
    # Populated when mapped (one call, not a fault per 4 KB page, which made the read several times
    # slower than the copy), and on 4 KB pages: 2 MB ones, wanted by the arena the weights go to, can
    # stall on compaction while a model loads.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    buffer = (torch.frombuffer(mmap.mmap(-1, entry.nbytes, flags=flags), dtype=torch.uint8)
              if entry.nbytes and hasattr(mmap, "MAP_ANONYMOUS") else torch.empty(entry.nbytes, dtype=torch.uint8))
    try:
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            got = f.readinto(buffer.numpy()) if entry.nbytes else 0
    except OSError as e:
        raise CheckpointError(entry.file, f"cannot be read ({e})") from None
    if got != entry.nbytes:
        raise CheckpointError(entry.file, f"ended {entry.nbytes - got} bytes early (truncated while loading?)")
    return buffer.view(entry.dtype).view(entry.shape)


def _safetensors_entries(file: Path) -> dict[str, _StoredTensor]:
    header, data_start = _check_safetensors_header(file)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _TORCH_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        numel = 1
        for n in shape:
            numel *= n
        if numel * torch.empty((), dtype=dtype).element_size() != end - begin:
            raise CheckpointError(file, f"tensor {name!r}: shape {list(shape)} of {info['dtype']} does not "
                                        f"match its {end - begin} bytes (corrupt header)")
        entries[name] = _StoredTensor(file, dtype, shape, data_start + begin, end - begin)
    return entries


def _check_safetensors_header(file: Path) -> tuple[dict, int]:
    """Validate the header against the file size before any tensor is read; returns the header and
    the file offset where the tensors' data begins."""
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
        if dtype not in _TORCH_DTYPES:
            raise CheckpointError(file, f"tensor {name!r} has unsupported dtype {dtype}")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(begin, int) and isinstance(end, int)):
            raise CheckpointError(file, f"tensor {name!r} has a malformed shape or offsets in its header")
        if not (0 <= begin <= end <= data_size):
            raise CheckpointError(file, f"tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                                        f"{data_size}): the file is truncated or its header is wrong")
    return header, 8 + header_len


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
    """Takes named tensors out of a checkpoint, checking each one's shape; reports what is missing.
    `take` gives floating-point tensors in the model's dtype; `take_stored` in the checkpoint's own,
    for the linear weights a backend converts as it places them."""

    def __init__(self, weights: Mapping, folder: Path, dtype: torch.dtype = torch.float32,
                 prefixes: tuple[str, ...] = ("",)):
        self.weights = weights
        self.folder = folder
        self.dtype = dtype
        # Some checkpoints prefix every name (e.g. 'transformer.' for GPT-2 LM-head models).
        self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in weights)), "")

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.take_stored(name, shape)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def take_stored(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = self.prefix + name
        tensor = self.weights.get(full)
        if tensor is None:
            raise CheckpointError(self.folder, f"tensor {full!r} is missing from the weights")
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(self.folder, f"tensor {full!r} has shape {tuple(tensor.shape)}, "
                                               f"expected {tuple(shape)}")
        return tensor
