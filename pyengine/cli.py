"""`pyengine` command line: generate, quantize, serve, bench, bench-serve, info."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from pyengine.quantize.int8 import METHODS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyengine", description="LLM inference with per-token energy accounting")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (streams to stdout)")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="default", help="local HF model folder, or 'default' (SmolLM2-135M-Instruct)")
    gen.add_argument("--backend", default=None,
                     help="torch, fused, fused-int8 or fused-bf16 (default: fused-bf16 for a bf16 checkpoint, else fused)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--int8-method", default=None, choices=METHODS, help="fused-int8: absmax (default) or gptq")
    gen.add_argument("--int8-weights", default=None, help="fused-int8: a file written by `pyengine quantize`")
    gen.set_defaults(func=_generate)

    quant = sub.add_parser("quantize", help="quantize a model's weights to int8 once, for fused-int8 to reload")
    quant.add_argument("output", help="the safetensors file to write")
    quant.add_argument("--model", default="default", help="local HF model folder, or 'default'")
    quant.add_argument("--method", default="gptq", choices=METHODS,
                       help="gptq (default: closer to fp32, minutes of CPU) or absmax")
    quant.add_argument("--threads", type=int, default=None)
    quant.set_defaults(func=_quantize)

    info = sub.add_parser("info", help="version, CPU ISA, CUDA, energy sources")
    info.set_defaults(func=_info)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                       "/metrics); concurrent requests share one running batch")
    srv.add_argument("--model", default="default", help="local HF model folder, or 'default'")
    srv.add_argument("--backend", default=None, help="torch, fused or fused-int8 (default: fastest exact one)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    srv.add_argument("--kv-budget", type=_bytes, default=None,
                     help="KV cache bytes for the running batch, e.g. 512M or 2G (default: max-batch requests at "
                          "the full context, at most 2 GiB)")
    srv.add_argument("--queue-limit", type=int, default=64, help="waiting requests before HTTP 429 (default 64)")
    srv.add_argument("--prefill-chunk", type=int, default=16,
                     help="the fewest prompt tokens prefilled between two decode steps (default 16; "
                          "about one decode step's worth are)")
    srv.add_argument("--threads", type=int, default=None)
    srv.set_defaults(func=_serve)

    from pyengine.bench import cli as bench_cli, serve as bench_serve

    bench_cli.add_parser(sub)
    bench_serve.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"pyengine: error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    import pyengine
    from pyengine.kernels import ops

    if args.threads is not None:
        ops.set_num_threads(args.threads)
    int8 = {k: v for k, v in (("int8_method", args.int8_method), ("int8_weights", args.int8_weights)) if v}
    engine = pyengine.load(args.model, backend=args.backend, device=args.device, **int8)
    pieces = engine.stream(args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r} (e.g. 536870912, 512M, 2G)") from None


def _serve(args) -> int:
    from pyengine.serve.server import serve

    serve(args.model, backend=args.backend, host=args.host, port=args.port, max_batch=args.max_batch,
          kv_budget=args.kv_budget, queue_limit=args.queue_limit, prefill_chunk=args.prefill_chunk,
          threads=args.threads)
    return 0


def _quantize(args) -> int:
    import pyengine
    from pyengine.kernels import ops

    if args.threads is not None:
        ops.set_num_threads(args.threads)
    engine = pyengine.load(args.model, backend="fused-int8", int8_method=args.method)
    path = engine.save_int8(args.output)
    print(f"wrote {path} ({args.method}); use it with --backend fused-int8 --int8-weights {path}", file=sys.stderr)
    return 0


def _info(args) -> int:
    import pyengine
    from pyengine import _C
    from pyengine.kernels import backends
    from pyengine.kernels import memory
    from pyengine.kernels import ops
    from pyengine.machine import cpu_model

    print(f"pyengine {pyengine.__version__}  (python {platform.python_version()}, torch {torch.__version__})")
    print(f"cpu: {cpu_model()}; {_C.num_threads()} threads")
    print(f"cpu isa: {ops.active_isa()} (detected {ops.detected_isa()}; cap with PYENGINE_ISA=scalar|avx2|avx512)")
    features = _C.cpu_features()
    absent = [name for name, usable in features if not usable]
    print(f"cpu features: {' '.join(name for name, usable in features if usable) or 'none'}"
          + (f" (absent: {' '.join(absent)})" if absent else ""))
    granted, reason = _C.amx_permission()
    print(f"amx tiles: {'permitted' if granted else 'not usable: ' + reason}")
    print(f"transparent huge pages: {memory.transparent_huge_pages()} (fused backends ask for 2 MB pages for "
          "their weights; they get them under 'always' or 'madvise')")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"cuda kernels built: {'yes' if _C.cuda_built else 'no'}; gpu: {gpu}")
    print(f"backends: {', '.join(backends.available_backends('cpu'))} (default {backends.default_backend('cpu')})")
    for line in _energy_lines():
        print(line)
    return 0


def _energy_lines() -> list[str]:
    try:
        from pyengine import energy
    except ImportError:
        return ["energy sources: not yet available in this build"]
    lines = ["energy sources:"]
    for s in energy.available_sources():
        lines.append(f"  {s.name:<9} {'yes' if s.available else 'no '}  {s.detail}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
