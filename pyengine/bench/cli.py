"""`pyengine bench`: HF transformers eager against pyengine's backends, speed and energy per token.

Its command line; the run is pyengine.bench.run."""
from __future__ import annotations

from pyengine.bench.config import (ENERGY_SOURCES, HF, HF_VARIANTS, IDLE_REPEATS, PROBE_MIB, PYENGINE_BACKENDS,
                                   grid_regions)
from pyengine.bench.run import run
from pyengine.quantize.int8 import METHODS


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
                        "(closer to fp32; minutes of CPU, see pyengine.quantize.gptq)")
    p.add_argument("--int8-weights", default=None,
                   help="fused-int8: int8 weights saved by Engine.save_int8 / pyengine quantize, instead of "
                        "quantizing at load")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
