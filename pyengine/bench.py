"""`pyengine bench`: HF transformers eager against pyengine's backends, speed and energy per token.

One process, one model, the same prompt token ids for every backend:

* ``hf-eager``: ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")`` in
  float32, the dtype pyengine's backends run in (on a CPU and on a GPU), greedy ``generate`` with
  exactly N new tokens (``min_new_tokens = max_new_tokens = N``). Its prefill is measured as one
  separate forward of the prompt batch that asks for the last position's logits only
  (``logits_to_keep=1``), as pyengine computes them, and **decode = generate - that prefill**
  (seconds and joules): HF's generate gives no phase split of its own.
* ``hf-eager-bf16`` / ``hf-eager-fp16``: the same in that dtype; run by default when the
  checkpoint is stored in it (the eager run a user of that checkpoint would make).
* every pyengine backend that ``available_backends(device)`` lists: ``pyengine.load(path,
  backend=...)`` then ``engine.generate(prompts, max_new_tokens=N, ignore_eos=True,
  measure_energy=True)``; seconds and joules per phase come from ``usage``.

Token accounting: prefill tokens = batch x prompt tokens; decode tokens = batch x (N - 1) (the
first new token comes out of the prefill forward, the other N - 1 out of decode steps); "per 1k
generated tokens" divides the whole generate call (short-prompt prefill + decode) by batch x N.
The prefill columns come from a separate measurement with a long prompt (--prefill-tokens),
where a prefill is long enough to measure; --prefill-tokens 0 uses the generate call's prefill.

Energy: one meter for the whole run. Idle is measured after the first model is loaded (on a GPU,
with its CUDA context up), in --idle-repeats windows, and again at the end; a drift beyond
IDLE_DRIFT_WARN is warned about. Every repeat opens windows around each phase; on NVML, where a
window shorter than NVML_MIN_WINDOW_S is unreliable, a run is repeated k = meter.repeats_for(seconds)
times inside one window, each phase is charged the window's average watts x its own seconds, and
the rest of the window (Python between runs, HF's second prefill inside generate) is reported as
overhead.

Bytes and the roofline (CPU): read bandwidth is probed at the start, after each backend and at the
end of the run (the highest is used: on a shared machine a probe can be slowed, never sped up); each row reports the bytes read per decoded token (pyengine.roofline) and its
decode rate as a fraction of reading those bytes at that bandwidth.
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyengine.quant import METHODS

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
DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "bench_text.txt"
TIMELINE_INTERVAL_S = 0.05

# The prompts: slices of this paragraph (repeated as needed), cut to an exact number of tokens.
PROMPT_TEXT = (
    "A small town at the edge of a river kept a record of every flood for two hundred years. The clerks wrote "
    "the height of the water on the wall of the mill, the date beside it, and sometimes a short note about the "
    "harvest or the price of bread. Today the marks form a ladder of dates that climbs from the floor to the "
    "roof beams, and visitors stand in front of it trying to imagine the river reaching that high. Engineers "
    "who came to study the wall found that it told them more than any model: when the old bridge was built the "
    "floods grew higher, when the marshes upstream were drained they came faster, and when the new weir was "
    "finished they became rare. The lesson they took away was simple. Write down what happened, write down how "
    "you measured it, and be honest about what you guessed. A careful record outlives the people who kept it, "
    "and it lets strangers answer questions that nobody thought to ask at the time."
)


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


# ---- command line --------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare HF eager with pyengine backends (speed, energy, quality)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated: {','.join(HF_VARIANTS)},{','.join(PYENGINE_BACKENDS)} (default: {HF}, "
                        f"{HF} in the checkpoint's dtype where that is not fp32, and every available one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for generation (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    p.add_argument("--prefill-tokens", type=int, default=256,
                   help="prompt length of the separate prefill measurement (default 256; 0: use the generation's)")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up runs (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (our kernels and torch)")
    p.add_argument("--idle-seconds", type=float, default=3.0,
                   help="length of each idle window (default 3; skipped for the estimate source)")
    p.add_argument("--idle-repeats", type=int, default=IDLE_REPEATS,
                   help=f"idle windows after loading, and again at the end (default {IDLE_REPEATS})")
    p.add_argument("--probe-mib", type=int, default=PROBE_MIB,
                   help=f"read-bandwidth probe size in MiB for the roofline columns (default {PROBE_MIB}; 0: skip)")
    p.add_argument("--energy-source", default="auto", help=f"{', '.join(ENERGY_SOURCES)}")
    p.add_argument("--grid-intensity", default=None,
                   help=f"grid region code ({', '.join(grid_regions())}) or gCO2e/kWh (default: "
                        "$PYENGINE_GRID_INTENSITY or WORLD)")
    p.add_argument("--pue", type=float, default=1.0, help="data-centre PUE, >= 1.0 (default 1.0)")
    p.add_argument("--corpus", default=None, help="plain-text file for perplexity (default: a text shipped with pyengine)")
    p.add_argument("--quality-tokens", type=int, default=2048, help="corpus tokens scored (default 2048)")
    p.add_argument("--quality-window", type=int, default=512, help="non-overlapping window length (default 512)")
    p.add_argument("--no-quality", action="store_true", help="skip perplexity / KL / top-1")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG: J/token per backend and phase, power timeline")
    p.add_argument("--cooldown", type=float, default=0.0, help="seconds to sleep between backends (GPU only)")
    p.add_argument("--int8-method", default=None, choices=METHODS,
                   help="how fused-int8 rounds its weights at load: absmax (default, instant) or gptq "
                        "(closer to fp32; minutes of CPU, see pyengine.gptq)")
    p.add_argument("--int8-weights", default=None,
                   help="fused-int8: int8 weights saved by Engine.save_int8 / pyengine quantize, instead of "
                        "quantizing at load")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def grid_regions() -> list[str]:
    from pyengine.energy.carbon import regions

    return list(regions())


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype the checkpoint's config.json says it is stored in (None when it does not say)."""
    from pyengine.loader import read_json

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
    from pyengine.backends import BACKENDS, available_backends
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


def _resolve_model(model: str):
    """(path, ModelConfig, Tokenizer) without loading weights: a bad model fails here, before any work."""
    from pyengine.config import ModelConfig
    from pyengine.loader import read_json, resolve_model_path
    from pyengine.tokenizer import Tokenizer

    try:
        path = resolve_model_path(model)
    except ImportError as e:
        raise ValueError(f"--model {model}: the default model is not available in this build ({e}); "
                         "pass a local model folder") from None
    config = ModelConfig.from_hf(read_json(path / "config.json"), path / "config.json")
    return path, config, Tokenizer.from_folder(path)


# ---- prompts and corpus --------------------------------------------------------------------------


def build_prompts(tokenizer, n_tokens: int, batch: int, *, stride: int = 13) -> list[tuple[str, list[int]]]:
    """``batch`` different prompts that each encode (as Engine.generate encodes them) to exactly
    ``n_tokens`` ids: slices of PROMPT_TEXT repeated, starting ``stride`` tokens apart."""
    base = tokenizer.encode(PROMPT_TEXT + " ", add_special_tokens=False)
    reps = math.ceil((n_tokens + stride * (batch + 20) + 32) / max(len(base), 1)) + 1
    stream = tokenizer.encode(" ".join([PROMPT_TEXT] * reps), add_special_tokens=False)
    out = []
    for b in range(batch):
        start = b * stride
        for shift in range(40):
            found = _exact_slice(tokenizer, stream, start + shift, n_tokens)
            if found is not None and found[1] not in [ids for _, ids in out]:
                out.append(found)
                break
        else:
            raise ValueError(f"could not cut a prompt of exactly {n_tokens} tokens from the prompt text")
    return out


def _exact_slice(tokenizer, stream, start, n_tokens):
    k = n_tokens
    for _ in range(8):
        if k < 1 or start + k > len(stream):
            return None
        text = tokenizer.decode(stream[start:start + k])
        ids = tokenizer.encode(text, add_special_tokens=True)
        if len(ids) == n_tokens and text.strip():
            return text, ids
        k += n_tokens - len(ids)
    return None


def greedy_rows(tokenizer, ids: list[int], count: int = GREEDY_PROMPTS,
                length: int = GREEDY_PROMPT_TOKENS) -> list[tuple[str, list[int]]]:
    """Prompts for the greedy-agreement check: slices of the corpus ids, evenly spaced, kept where
    their text encodes back (as Engine.generate encodes it) to exactly `length` ids, so that every
    backend, HF's included, starts from the same ids, and the batch needs no padding."""
    from pyengine import quality

    found = (_exact_slice(tokenizer, piece, 0, length) for piece in quality.greedy_prompts(ids, count, length))
    return [row for row in found if row is not None]


def corpus_ids(tokenizer, path: Path, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of a text file (only as much of it is read as needed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        chars = max(4096, n_tokens * 8)
        while True:
            f.seek(0)
            text = f.read(chars)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > n_tokens or len(text) < chars:
                return ids[:n_tokens]
            chars *= 2


# ---- runners: one backend loaded at a time -------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFRunner:
    """transformers eager: prefill = one forward of the prompt batch (last position's logits only,
    as pyengine), decode = generate - prefill."""

    info: dict = {}  # nothing to add to the load record

    def __init__(self, path: Path, device: torch.device, name: str = HF):
        import transformers

        transformers.logging.set_verbosity_error()
        self.name = name
        self.device = device
        self.dtype = HF_VARIANTS[name]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=self.dtype).to(device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen is not None else None
        pad = gen.pad_token_id if gen is not None and gen.pad_token_id is not None else eos
        if isinstance(pad, list):
            pad = pad[0]
        self.gen_kwargs = dict(do_sample=False, eos_token_id=eos, pad_token_id=pad if pad is not None else 0,
                               temperature=None, top_p=None, top_k=None)

    def _ids(self, rows):
        return torch.tensor([ids for _, ids in rows], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, ids):
        # One position's logits, as pyengine's prefill: logits at every position would be ~27% more
        # matmul work on the default model and inflate every prefill ratio.
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        _sync(self.device)
        return out

    @torch.inference_mode()
    def run_prefill(self, rows, meter):
        ids = self._ids(rows)
        w = meter.start("prefill") if meter else None
        t0 = time.perf_counter()
        self.forward(ids)
        seconds = time.perf_counter() - t0
        m = meter.stop(w) if meter else None
        return Phases(prefill=(seconds, m), decode=None)

    @torch.inference_mode()
    def run_generate(self, rows, new_tokens, meter):
        ids = self._ids(rows)
        wp = meter.start("prefill") if meter else None
        t0 = time.perf_counter()
        self.forward(ids)
        prefill_s = time.perf_counter() - t0
        mp = meter.stop(wp) if meter else None
        wg = meter.start("generate") if meter else None
        t1 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **self.gen_kwargs)
        _sync(self.device)
        gen_s = time.perf_counter() - t1
        mg = meter.stop(wg) if meter else None
        generated = out.shape[1] - ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"{self.name}: generate produced {generated} tokens, expected {new_tokens}")
        # decode = generate - prefill: HF's generate has no phase split of its own
        return Phases(prefill=(prefill_s, mp), decode=(max(gen_s - prefill_s, 0.0), mg), decode_is_total=True)

    @torch.inference_mode()
    def run_generate_only(self, rows, new_tokens, meter):
        """generate() alone in one window (no separate prefill forward): (seconds, measurement)."""
        ids = self._ids(rows)
        w = meter.start("generate") if meter else None
        t0 = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, **self.gen_kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        return seconds, (meter.stop(w) if meter else None)

    @torch.inference_mode()
    def greedy(self, rows, new_tokens):
        """Each row's greedy continuation (token ids), the rows as one batch."""
        ids = self._ids(rows)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **self.gen_kwargs)
        return out[:, ids.shape[1]:].tolist()

    @torch.inference_mode()
    def logits(self, ids):
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(input_ids=t).logits[0].float().cpu()

    def close(self):
        del self.model


class EngineRunner:
    """A pyengine backend, timed and metered by the engine itself (usage)."""

    def __init__(self, name: str, path: Path, device: torch.device, meter, **options):
        import pyengine

        self.name = name
        self.engine = pyengine.load(path, backend=name, device=str(device), progress=False, **options)
        self.dtype = self.engine.dtype
        self.info = {"int8_method": self.engine.int8_method} if self.engine.int8_method else {}

    def run_prefill(self, rows, meter):
        # The bench's meter, so every backend is measured by the source the idle baseline came from.
        res = self.engine.generate([t for t, _ in rows], max_new_tokens=1, ignore_eos=True,
                                   measure_energy=meter or False)
        u = res[0].usage
        return Phases(prefill=(u.prefill_seconds, _usage_joules(res, "prefill_joules")), decode=None)

    def run_generate(self, rows, new_tokens, meter):
        res = self.engine.generate([t for t, _ in rows], max_new_tokens=new_tokens, ignore_eos=True,
                                   measure_energy=meter or False)
        for r in res:
            if len(r.token_ids) != new_tokens:
                raise RuntimeError(f"{self.name}: generated {len(r.token_ids)} tokens, expected {new_tokens} "
                                   f"(finish_reason {r.finish_reason!r})")
        u = res[0].usage
        return Phases(prefill=(u.prefill_seconds, _usage_joules(res, "prefill_joules")),
                      decode=(u.decode_seconds, _usage_joules(res, "decode_joules")))

    def greedy(self, rows, new_tokens):
        """Each row's greedy continuation (token ids), the rows as one batch."""
        results = self.engine.generate([t for t, _ in rows], max_new_tokens=new_tokens, ignore_eos=True)
        return [r.token_ids for r in results]

    def logits(self, ids):
        return self.engine.logits([ids])[0].cpu()

    def close(self):
        del self.engine


def _usage_joules(results, key):
    """The batch's joules of one phase from usage.energy (per-sequence shares add up to the batch)."""
    e = results[0].usage.energy
    if e is None:
        return None
    return UsageEnergy(joules=math.fsum(r.usage.energy[key] for r in results), source=e["source"],
                       estimated=e["estimated"], confidence=e["confidence"], fallback_reason=e.get("fallback_reason"),
                       confidence_reason=e["confidence_reason"], method=e["method"], constants=e["constants"])


@dataclass
class UsageEnergy:
    joules: float
    source: str
    estimated: bool
    confidence: str
    fallback_reason: str | None = None
    confidence_reason: str = ""
    method: str = ""
    constants: dict = field(default_factory=dict)


@dataclass
class Phases:
    """One run: (seconds, energy) per phase; energy an EnergyMeasurement, UsageEnergy or None.
    decode_is_total: the decode entry is the whole generate call (HF), prefill to be subtracted."""

    prefill: tuple
    decode: tuple | None
    decode_is_total: bool = False


def _joules_of(e):
    if e is None:
        return None
    return e.total_joules if hasattr(e, "total_joules") else e.joules


# ---- measuring -----------------------------------------------------------------------------------


def measure(runner, kind, rows, cfg, meter, idle, runs_per_window=1):
    """One measured repeat: a dict of phases with tokens, seconds, joules (gross and active)."""
    from pyengine.energy import net_of_idle

    B = len(rows)
    n_prompt = len(rows[0][1])
    outer = meter.start() if meter is not None and (runs_per_window > 1 or meter.record_timeline) else None
    marks, runs = [], []
    for _ in range(runs_per_window):
        t0 = time.perf_counter()
        if kind == "prefill":
            ph = runner.run_prefill(rows, meter)
        else:
            ph = runner.run_generate(rows, cfg.new_tokens, meter)
        if outer is not None:
            rel, end = t0 - outer.t0, time.perf_counter() - outer.t0
            marks.append(("prefill", rel, rel + ph.prefill[0]))
            if ph.decode is not None:
                marks.append(("generate" if ph.decode_is_total else "decode", rel + ph.prefill[0], end))
        runs.append(ph)
    outer_m = meter.stop(outer) if outer is not None else None

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return math.fsum(xs) / len(xs) if xs else None

    p_sec = mean([r.prefill[0] for r in runs])
    p_j = mean([_joules_of(r.prefill[1]) for r in runs])
    d_sec = d_j = None
    if kind == "generate":
        d_sec = mean([r.decode[0] for r in runs])
        d_j = mean([_joules_of(r.decode[1]) for r in runs])
        if runs[0].decode_is_total and d_j is not None:
            d_j = max(d_j - p_j, 0.0)  # decode = generate - prefill
    energies = [e for r in runs for e in (r.prefill[1], r.decode[1] if r.decode else None) if e is not None]
    method = "one window per phase"
    overhead = None
    if runs_per_window > 1 and outer_m is not None:
        # one window over k runs (NVML minimum window): each phase is charged the window's average
        # watts x its own seconds; the rest of the window (Python between runs, and HF's second
        # prefill inside generate, as decode = generate - prefill) is overhead, charged to no phase
        watts = outer_m.average_watts
        p_j = watts * p_sec
        d_j = watts * d_sec if kind == "generate" else None
        charged_s = p_sec + (d_sec or 0.0)
        rest_s = outer_m.seconds / runs_per_window - charged_s
        overhead = {"seconds": rest_s, "joules": outer_m.total_joules / runs_per_window - watts * charged_s,
                    "average_watts": watts, "per": "run",
                    "what": "window time outside the phases: Python between runs"
                            + (", and HF's prefill inside generate" if runs[0].decode_is_total else "")}
        energies = [outer_m]
        method = f"{runs_per_window} runs in one window, each phase charged the window's average watts x its seconds"
    idle_w = idle.total_watts if idle is not None else None
    clamped = []

    def phase(name, tokens, seconds, joules):
        active = None
        if joules is not None and idle_w is not None:
            active, was_clamped = net_of_idle(joules, idle_w, seconds)
            if was_clamped:
                clamped.append(name)
        out_ = {"tokens": tokens, "seconds": seconds, "joules": joules, "active_joules": active,
                "tokens_per_s": tokens / seconds if seconds and tokens else None,
                "joules_per_token": joules / tokens if joules is not None and tokens else None,
                "active_joules_per_token": active / tokens if active is not None and tokens else None}
        if active is not None:
            out_["active_clamped"] = name in clamped
        return out_

    out = {"prefill": phase("prefill", B * n_prompt, p_sec, p_j), "runs_per_window": runs_per_window,
           "energy_method": method if energies else None}
    if overhead is not None:
        out["overhead"] = overhead
    if kind == "generate":
        out["decode"] = phase("decode", B * (cfg.new_tokens - 1), d_sec, d_j)
        gen_j = None if p_j is None else p_j + (d_j or 0.0)
        out["generate"] = phase("generate", B * cfg.new_tokens, p_sec + d_sec, gen_j)
        out["generate"]["prompt_tokens"] = B * n_prompt
    out["energy"] = _energy_meta(energies)
    if clamped and out["energy"] is not None:
        # as EnergyMeasurement.active() does: a window below idle power is reported, never hidden
        note = f"idle subtraction clamped at 0 for {', '.join(clamped)} (the phase used less than idle power)"
        out["energy"]["confidence"] = "low"
        out["energy"]["confidence_reason"] = "; ".join(x for x in (out["energy"]["confidence_reason"], note) if x)
    if outer_m is not None and outer_m.timeline:
        out["timeline"] = {"power": {d: [list(p) for p in pts] for d, pts in outer_m.timeline.items()},
                           "phases": [list(m) for m in marks], "seconds": outer_m.seconds}
    return out


def _energy_meta(energies) -> dict | None:
    if not energies:
        return None
    first = energies[0]
    low = [e for e in energies if e.confidence == "low"]
    return {"source": first.source, "estimated": any(e.estimated for e in energies),
            "method": first.method, "constants": dict(first.constants),
            "confidence": "low" if low else "high",
            "confidence_reason": (low[0] if low else first).confidence_reason or None,
            "fallback_reason": first.fallback_reason}


def make_bench_meter(cfg):
    from pyengine.energy import make_meter

    meter = make_meter(cfg.energy_source, device=cfg.device)
    if not meter.estimated and meter.name in ("nvml", "rapl", "nvml+rapl"):
        # sample power for a timeline; the estimate is not sampled (its sampler thread's own CPU
        # time would be counted in what it estimates)
        reason = meter.fallback_reason
        meter.close()
        meter = make_meter(meter.name, device=cfg.device, sample_interval_s=TIMELINE_INTERVAL_S)
        meter.fallback_reason = reason
    return meter


def _stats(values):
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) > 1 else (xs[0], xs[0]))
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "n": len(xs)}


METRICS = {
    "prefill_tokens_per_s": ("prefill", "tokens_per_s"),
    "decode_tokens_per_s": ("decode", "tokens_per_s"),
    "prefill_joules_per_token": ("prefill", "joules_per_token"),
    "decode_joules_per_token": ("decode", "joules_per_token"),
    "prefill_active_joules_per_token": ("prefill", "active_joules_per_token"),
    "decode_active_joules_per_token": ("decode", "active_joules_per_token"),
    "generate_joules_per_token": ("generate", "joules_per_token"),
}


def summarize(repeats: list[dict], cfg) -> dict:
    from pyengine.energy import grams_per_1k_tokens

    out = {}
    for key, (ph, field_) in METRICS.items():
        out[key] = _stats([r[ph][field_] for r in repeats if ph in r])
    watts = [r["generate"]["joules"] / r["generate"]["seconds"] for r in repeats
             if r["generate"]["joules"] is not None and r["generate"]["seconds"]]
    out["average_watts"] = _stats(watts)
    grams = [grams_per_1k_tokens(r["generate"]["joules"], r["generate"]["tokens"], cfg.grid.g_per_kwh, cfg.pue)
             for r in repeats if r["generate"]["joules"] is not None]
    out["g_co2e_per_1k_tokens"] = _stats(grams)
    return out


# ---- the run -------------------------------------------------------------------------------------


def run(args) -> int:
    from tqdm import tqdm

    from pyengine import bench_report, ops, quality
    from pyengine.energy import idle_drift, measure_idle

    cfg = validate(args)
    path, mconfig, tokenizer = _resolve_model(cfg.model)
    ctx = mconfig.max_context
    if cfg.prompt_tokens + cfg.new_tokens > ctx:
        raise ValueError(f"--prompt-tokens {cfg.prompt_tokens} + --new-tokens {cfg.new_tokens} exceeds the "
                         f"model's context of {ctx} tokens")
    if cfg.prefill_tokens >= ctx:
        cfg.notes.append(f"--prefill-tokens {cfg.prefill_tokens} cut to {ctx - 1}: the model's context is {ctx}")
        cfg.prefill_tokens = ctx - 1
    if cfg.quality and cfg.quality_window > ctx:
        cfg.notes.append(f"--quality-window {cfg.quality_window} cut to the model's context of {ctx}")
        cfg.quality_window = ctx
    if cfg.threads is not None:
        ops.set_num_threads(cfg.threads)
    # transformers' loading bars and warnings would interleave with ours
    import transformers

    transformers.utils.logging.disable_progress_bar()

    if args.backends is None and (native := hf_native_backend(path)) is not None:
        cfg.backends.insert(1, native)
        cfg.notes.append(f"{native}: HF eager in the checkpoint's own dtype, beside the fp32 {HF} baseline")
    bandwidth = {"start": read_bandwidth(cfg)}
    meter = make_bench_meter(cfg)
    idle = idle_end = None
    measure_idle_now = not meter.estimated and cfg.idle_seconds > 0
    if meter.estimated:
        idle_note = "skipped: idle power means nothing for the estimate (it counts this process's CPU time only)"
    elif cfg.idle_seconds <= 0:
        idle_note = "not measured (--idle-seconds 0): active energy not reported"
    else:
        idle_note = ""

    prompts = {b: build_prompts(tokenizer, cfg.prompt_tokens, b) for b in cfg.batch_sizes}
    long_prompts = ({b: build_prompts(tokenizer, cfg.prefill_tokens, b) for b in cfg.batch_sizes}
                    if cfg.prefill_tokens else None)
    wins, greedy_prompts = [], []
    if cfg.quality:
        ids = corpus_ids(tokenizer, cfg.corpus, cfg.quality_tokens)
        wins = quality.windows(ids, cfg.quality_tokens, cfg.quality_window)
        greedy_prompts = greedy_rows(tokenizer, ids)
        if not wins:
            raise ValueError(f"--corpus {cfg.corpus}: too short to score (needs at least 2 tokens)")
        if sum(len(w) for w in wins) < cfg.quality_tokens:
            cfg.notes.append(f"the corpus has only {sum(len(w) for w in wins)} tokens; scored them all")

    reference = ("torch" if "torch" in cfg.backends else next((b for b in cfg.backends if b in HF_VARIANTS),
                                                               cfg.backends[0]))
    order = [reference] + [b for b in cfg.backends if b != reference]
    per_batch = cfg.warmup + cfg.repeats
    total = len(order) * (1 + len(cfg.batch_sizes) * per_batch * (2 if long_prompts else 1) + len(wins)
                          + (1 if greedy_prompts else 0))
    results, qualities, load_info = {}, {}, {}
    ref_logits = ref_greedy = None
    bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, disable=args.no_progress, leave=False)
    try:
        for i, name in enumerate(order):
            if i and cfg.cooldown:
                bar.set_postfix_str(f"cooldown {cfg.cooldown:g}s")
                time.sleep(cfg.cooldown)
            bar.set_description(f"{name}: loading" + (" (GPTQ: minutes the first time, cached after)"
                                                      if name == "fused-int8" and cfg.int8_method == "gptq" else ""))
            t0 = time.perf_counter()
            int8 = ({"int8_method": cfg.int8_method, "int8_weights": cfg.int8_weights}
                    if name == "fused-int8" else {})
            runner = (HFRunner(path, cfg.device, name) if name in HF_VARIANTS
                      else EngineRunner(name, path, cfg.device, meter, **int8))
            load_info[name] = {"load_seconds": time.perf_counter() - t0, "dtype": str(runner.dtype).replace("torch.", ""),
                               **runner.info}
            bar.update(1)
            try:
                if i == 0 and measure_idle_now:
                    # after loading (on a GPU: the CUDA context up), as the runs will find the machine
                    bar.set_description(f"idle power ({cfg.idle_repeats} x {cfg.idle_seconds:g} s)")
                    idle = measure_idle(meter, cfg.idle_seconds, repeats=cfg.idle_repeats)
                    idle_note = f"measured with {name} loaded: {idle.note}"
                for b in cfg.batch_sizes:
                    results[(name, b)] = _bench_batch(runner, name, b, prompts[b],
                                                      long_prompts[b] if long_prompts else None, cfg, meter, idle, bar)
                if cfg.quality:
                    bar.set_description(f"{name}: quality")
                    keep = name == reference
                    res, kept = quality.evaluate(runner.logits, wins, reference=ref_logits,
                                                 reference_name=reference if ref_logits is not None else None,
                                                 keep=keep, progress=bar)
                    if keep:
                        ref_logits = kept
                    if greedy_prompts:  # the greedy continuations of corpus prompts, against the reference's
                        continuations = runner.greedy(greedy_prompts, GREEDY_NEW_TOKENS)
                        if keep:
                            ref_greedy = continuations
                        else:
                            res.extra.update(quality.greedy_agreement(ref_greedy, continuations),
                                             greedy_prompt_tokens=GREEDY_PROMPT_TOKENS,
                                             greedy_new_tokens=GREEDY_NEW_TOKENS)
                        bar.update(1)
                    qualities[name] = res
                bandwidth[f"after {name}"] = read_bandwidth(cfg)
                if i == len(order) - 1 and idle is not None:
                    bar.set_description("idle power again, at the end")
                    idle_end = measure_idle(meter, cfg.idle_seconds, repeats=cfg.idle_repeats)
                    drift, warning = idle_drift(idle, idle_end)
                    if warning:
                        cfg.notes.append(warning)
            finally:
                runner.close()
                del runner
                gc.collect()
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        bar.close()
        meter.close()
    bandwidth["end"] = read_bandwidth(cfg)

    report = bench_report.build_report(cfg, path, mconfig, meter, idle, idle_note, prompts, long_prompts, results,
                                       qualities, reference, load_info, wins, idle_end=idle_end, bandwidth=bandwidth)
    print(bench_report.format_report(report))
    if cfg.json_path:
        bench_report.write_json(report, cfg.json_path)
        print(f"wrote {cfg.json_path}", file=sys.stderr)
    if cfg.plot_path:
        bench_report.plot(report, cfg.plot_path)
        print(f"wrote {cfg.plot_path}", file=sys.stderr)
    return 0


def read_bandwidth(cfg) -> float | None:
    """Read bandwidth (GB/s, best of 10) for the roofline columns; None when --probe-mib is 0."""
    if not cfg.probe_mib:
        return None
    from pyengine.roofline import read_bandwidth_gbs

    return read_bandwidth_gbs(repeats=10, nbytes=cfg.probe_mib << 20)


def _bench_batch(runner, name, b, rows, long_rows, cfg, meter, idle, bar):
    """Warm-up then repeats of the prefill measurement (long prompt) and of generation."""
    kinds = [("prefill", long_rows)] if long_rows else []
    kinds.append(("generate", rows))
    out = {"repeats": [], "prefill_repeats": []}
    for kind, r in kinds:
        bar.set_description(f"{name} b={b}: {kind} warm-up")
        run_s = None
        for _ in range(cfg.warmup):
            t0 = time.perf_counter()
            (runner.run_prefill(r, None) if kind == "prefill" else runner.run_generate(r, cfg.new_tokens, None))
            run_s = time.perf_counter() - t0
            bar.update(1)
        k = 1
        if meter.name.startswith("nvml") and meter.min_window_s > 0:
            if run_s is None:  # no warm-up: time one run to size the window
                t0 = time.perf_counter()
                (runner.run_prefill(r, None) if kind == "prefill" else runner.run_generate(r, cfg.new_tokens, None))
                run_s = time.perf_counter() - t0
            k = meter.repeats_for(max(run_s, 1e-6))
        bar.set_description(f"{name} b={b}: {kind}" + (f" (x{k} per window)" if k > 1 else ""))
        for _ in range(cfg.repeats):
            m = measure(runner, kind, r, cfg, meter, idle, runs_per_window=k)
            out["repeats" if kind == "generate" else "prefill_repeats"].append(m)
            bar.update(1)
    # the table's prefill columns come from the long-prompt measurement where there is one
    merged = []
    for i, rep in enumerate(out["repeats"]):
        rep = dict(rep)
        rep["generate_prefill"] = rep["prefill"]
        if out["prefill_repeats"]:
            rep["prefill"] = out["prefill_repeats"][i]["prefill"]
        merged.append(rep)
    return {"repeats": merged, "prefill_repeats": out["prefill_repeats"], "summary": summarize(merged, cfg)}
