"""`pyengine bench` settings: the variants and backends it runs, BenchConfig, and every argument check
(validate), made before any work is done."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


HF = "hf-eager"
# HF eager variants: the baseline (fp32, our dtype) and the checkpoint's own half-precision dtypes.
HF_VARIANTS = {HF: torch.float32, f"{HF}-bf16": torch.bfloat16, f"{HF}-fp16": torch.float16}

# The greedy-agreement check: this many corpus prompts of this many tokens, this many greedy tokens each.
# 128 prompts: a share measured on them is within ~+-4.4% (one standard error); on 32 it was +-9%.
GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 128, 12, 16
PYENGINE_BACKENDS = ("torch", "fused", "fused-int8")
ENERGY_SOURCES = ("auto", "nvml", "rapl", "estimate", "nvml+rapl")
IDLE_REPEATS = 3
PROBE_MIB = 1024
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "bench_text.txt"
TIMELINE_INTERVAL_S = 0.05


@dataclass
class BenchConfig:
    model: str
    backends: list[str]
    device: torch.device
    batch_sizes: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int
    repeats: int
    warmup: int
    threads: int | None
    idle_seconds: float
    idle_repeats: int
    probe_mib: int
    energy_source: str
    grid: object  # energy.GridIntensity
    pue: float
    corpus: Path
    quality: bool
    quality_tokens: int
    quality_window: int
    json_path: Path | None
    plot_path: Path | None
    cooldown: float
    int8_method: str | None = None  # fused-int8: how its weights are rounded at load (None: absmax)
    int8_weights: Path | None = None  # fused-int8: a saved int8 file instead of quantizing at load
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "backends": self.backends, "device": str(self.device),
            "batch_sizes": self.batch_sizes, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_tokens": self.prefill_tokens, "repeats": self.repeats, "warmup": self.warmup,
            "threads": self.threads, "idle_seconds": self.idle_seconds, "idle_repeats": self.idle_repeats,
            "probe_mib": self.probe_mib, "energy_source": self.energy_source,
            "grid_intensity": str(self.grid.region or self.grid.g_per_kwh), "pue": self.pue,
            "corpus": str(self.corpus), "quality": self.quality, "quality_tokens": self.quality_tokens,
            "quality_window": self.quality_window, "json": str(self.json_path) if self.json_path else None,
            "plot": str(self.plot_path) if self.plot_path else None, "cooldown": self.cooldown,
            "int8_method": self.int8_method, "int8_weights": str(self.int8_weights) if self.int8_weights else None,
        }


def grid_regions() -> list[str]:
    from pyengine.energy.carbon import regions

    return list(regions())


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype the checkpoint's config.json says it is stored in (None when it does not say)."""
    from pyengine.load.checkpoint import read_json

    config = read_json(path / "config.json")
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def hf_native_backend(path: Path) -> str | None:
    """The HF variant in the checkpoint's own dtype, where that is not the fp32 baseline."""
    dtype = checkpoint_dtype(path)
    return next((n for n, d in HF_VARIANTS.items() if d == dtype and n != HF), None)


def _positive_int_list(text: str, what: str) -> list[int]:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"--{what}: {part!r} is not an integer (expected e.g. 1,4,16)") from None
        if v < 1:
            raise ValueError(f"--{what}: {v} is not a positive integer")
        values.append(v)
    return list(dict.fromkeys(values))


def validate(args) -> BenchConfig:
    """Every argument check, before any work is done. Raises ValueError with a message."""
    from pyengine.kernels.backends import BACKENDS, available_backends
    from pyengine.energy import grid_intensity
    from pyengine.engine import _check_device

    device = _check_device(args.device)
    available = available_backends(device)
    known = [*HF_VARIANTS, *dict.fromkeys([*PYENGINE_BACKENDS, *BACKENDS])]
    if args.backends is None:
        backends = [HF, *available]  # + the checkpoint-dtype HF run, added once the model is resolved
    else:
        backends = list(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
        if not backends:
            raise ValueError("--backends: no backend given")
        for b in backends:
            if b not in known:
                raise ValueError(f"--backends: unknown backend {b!r}; known: {', '.join(known)}")
            if b not in HF_VARIANTS and b not in available:
                raise ValueError(f"--backends: backend {b!r} is not available on {device} in this build; "
                                 f"available: {', '.join([HF, *available])}")
    batch_sizes = _positive_int_list(args.batch_sizes, "batch-sizes")
    checks = [("prompt-tokens", args.prompt_tokens, 1), ("new-tokens", args.new_tokens, 1),
              ("idle-repeats", args.idle_repeats, 1), ("probe-mib", args.probe_mib, 0),
              ("prefill-tokens", args.prefill_tokens, 0), ("repeats", args.repeats, 1), ("warmup", args.warmup, 0),
              ("quality-tokens", args.quality_tokens, 2), ("quality-window", args.quality_window, 2)]
    for name, value, low in checks:
        if value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    for name, value in (("idle-seconds", args.idle_seconds), ("cooldown", args.cooldown)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a non-negative number of seconds, got {value}")
    if args.energy_source not in ENERGY_SOURCES:
        raise ValueError(f"--energy-source: unknown energy source {args.energy_source!r}; "
                         f"choose from {', '.join(ENERGY_SOURCES)}")
    if not (math.isfinite(args.pue) and args.pue >= 1.0):
        raise ValueError(f"--pue is facility energy / IT energy and must be >= 1.0, got {args.pue}")
    grid = grid_intensity(args.grid_intensity)
    corpus = Path(args.corpus).expanduser() if args.corpus else DEFAULT_CORPUS
    if not args.no_quality and not corpus.is_file():
        raise ValueError(f"--corpus: {corpus} does not exist or is not a file")
    int8_weights = Path(args.int8_weights).expanduser() if args.int8_weights else None
    if (args.int8_method or int8_weights) and "fused-int8" not in backends:
        raise ValueError("--int8-method / --int8-weights apply to the fused-int8 backend, which is not in --backends")
    if int8_weights is not None and not int8_weights.is_file():
        raise ValueError(f"--int8-weights: {int8_weights} does not exist or is not a file")
    notes = []
    if args.probe_mib and device.type != "cpu":
        notes.append("roofline columns: CPU only (the probe reads host memory)")
    if args.cooldown and device.type != "cuda":
        notes.append(f"--cooldown {args.cooldown:g} ignored: it applies to GPU runs only")
    return BenchConfig(
        model=args.model, backends=backends, device=device, batch_sizes=batch_sizes,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, idle_seconds=args.idle_seconds,
        idle_repeats=args.idle_repeats, probe_mib=args.probe_mib if device.type == "cpu" else 0,
        energy_source=args.energy_source, grid=grid, pue=float(args.pue), corpus=corpus,
        quality=not args.no_quality, quality_tokens=args.quality_tokens, quality_window=args.quality_window,
        json_path=Path(args.json) if args.json else None, plot_path=Path(args.plot) if args.plot else None,
        cooldown=args.cooldown if device.type == "cuda" else 0.0, int8_method=args.int8_method,
        int8_weights=int8_weights, notes=notes)


def resolve_model(model: str):
    """(path, ModelConfig, Tokenizer) without loading weights: a bad model fails here, before any work."""
    from pyengine.load.config import ModelConfig
    from pyengine.load.checkpoint import read_json, resolve_model_path
    from pyengine.load.tokenizer import Tokenizer

    try:
        path = resolve_model_path(model)
    except ImportError as e:
        raise ValueError(f"--model {model}: the default model is not available in this build ({e}); "
                         "pass a local model folder") from None
    config = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
    return path, config, Tokenizer.from_folder(path)


PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def precision_of(row) -> str:
    """The stored width of a result row's weights: the backend's own (fused-int8, fused-bf16), else its dtype's."""
    from pyengine.kernels.backends import BACKENDS

    own = getattr(BACKENDS.get(row["backend"]), "weight_precision", None)
    return own or PRECISION.get(row["dtype"], "fp32")
