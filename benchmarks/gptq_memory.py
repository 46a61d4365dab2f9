"""Peak memory of GPTQ quantization (pyengine.quantize.gptq) on a bf16 Llama checkpoint.

    python benchmarks/gptq_memory.py [--shape tinyllama-1.1b|small] [--starts 8] [--tokens 64]
                                     [--reference DIR] [--folder DIR] [--json PATH]

The checkpoint is generated once (benchmarks/load_memory.py: random bf16 weights, sharded). A fresh
process samples calibration text with pyengine.load(folder) (the default backend: fused-bf16 for
bf16 weights), closes that engine, then quantizes the model with pyengine.quantize.gptq.quantize_model. It
reports resident memory (VmRSS/VmHWM) after `import pyengine`, the peak while sampling, and the
peak while calibrating (VmHWM reset in between through /proc/self/clear_refs), beside the bytes of
the int8 result and of the model's weights in fp32.

--starts/--tokens shorten the calibration set (the first --starts of CALIBRATION_STARTS, --tokens
sampled tokens each) so a 1.1B model quantizes in minutes on a few cores; the activations held
while calibrating grow with starts x tokens, nothing else does.
--reference DIR: also run the same in a checkout of an earlier pyengine (whose quantize_model took
the model and sampled itself with an fp32 `fused` engine), in the same run, for the ratio.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_memory  # noqa: E402  benchmarks/load_memory.py: the checkpoint and /proc/self/status readers


def _reset_peak() -> bool:
    """Start VmHWM again from the current resident memory (Linux: '5' to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_in_this_process(folder: str, starts: int, tokens: int, threads: int | None) -> dict:
    import gc

    import pyengine
    from pyengine.quantize import gptq
    from pyengine.kernels import ops

    if threads:
        ops.set_num_threads(threads)
    after_import = load_memory._vm_rss()
    t0 = time.perf_counter()
    sampler = pyengine.load(folder, progress=False)
    windows = gptq.calibration_windows(sampler, starts=gptq.CALIBRATION_STARTS[:starts], tokens=tokens)
    sampler_backend = sampler.backend_name
    sampler.close()
    del sampler
    gc.collect()
    sampling_s, peak_sampling = time.perf_counter() - t0, load_memory._peak_rss()
    reset = _reset_peak()
    before = load_memory._vm_rss()
    t0 = time.perf_counter()
    linears = gptq.quantize_model(folder, windows, progress=False)
    calibration_s, peak_calibration = time.perf_counter() - t0, load_memory._peak_rss()
    int8_bytes = sum(t.numel() * t.element_size() for lin in linears.values()
                     for t in (lin.qweight, lin.scale, lin.bias) if t is not None)
    return dict(code="layer by layer", pyengine=str(Path(pyengine.__file__).parent), sampler_backend=sampler_backend,
                windows=len(windows), window_tokens=min(len(w) for w in windows), rss_after_import=after_import,
                peak_rss_sampling=peak_sampling, sampling_seconds=sampling_s, peak_reset=reset,
                rss_before_calibration=before, peak_rss_calibration=peak_calibration,
                calibration_seconds=calibration_s, int8_bytes=int8_bytes, linears=len(linears))


def measure_reference_in_this_process(folder: str, starts: int, tokens: int, threads: int | None) -> dict:
    """The earlier code (one fp32 `fused` engine, sampled and calibrated in place), same settings."""
    import functools

    import pyengine
    from pyengine.quantize import gptq
    from pyengine.kernels import ops

    if threads:
        ops.set_num_threads(threads)
    after_import = load_memory._vm_rss()
    gptq.calibration_windows = functools.partial(gptq.calibration_windows, starts=gptq.CALIBRATION_STARTS[:starts],
                                                 tokens=tokens)
    t0 = time.perf_counter()
    linears = gptq.quantize_model(folder, progress=False)
    return dict(code="reference", pyengine=str(Path(pyengine.__file__).parent), rss_after_import=after_import,
                peak_rss=load_memory._peak_rss(), seconds=time.perf_counter() - t0, linears=len(linears))


def measure(folder: Path, starts: int, tokens: int, threads: int | None, reference: Path | None = None,
            env: dict | None = None) -> dict:
    """One fresh process (VmHWM is the process's own); with `reference`, that checkout's pyengine;
    `env`: variables to add to its environment."""
    function = "measure_reference_in_this_process" if reference else "measure_in_this_process"
    code = ("import json, sys; sys.path.insert(0, %r); import gptq_memory as m; print(json.dumps(m.%s(%r, %r, %r, %r)))"
            % (str(Path(__file__).resolve().parent), function, str(folder), starts, tokens, threads))
    env = {**os.environ, **(env or {})}
    if reference:
        env["PYTHONPATH"] = str(reference)
    # Run from the checkout whose pyengine is measured: `python -c` puts the working directory first.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=7200, env=env,
                          cwd=str(reference) if reference else None)
    if done.returncode != 0:
        raise RuntimeError(f"GPTQ ({function}) failed, exit code {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fp32_weight_bytes(shape: dict) -> int:
    H, I, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    D = H // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * D
    per_layer = H * (H + 2 * kv) + H * H + 3 * H * I + 2 * H
    return 4 * (L * per_layer + V * H * (1 if shape["tie_word_embeddings"] else 2) + H)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(load_memory.SHAPES))
    ap.add_argument("--starts", type=int, default=8, help="calibration samples (first words), default 8")
    ap.add_argument("--tokens", type=int, default=64, help="sampled tokens per calibration sample, default 64")
    ap.add_argument("--folder", type=Path, default=None, help="where the generated checkpoint lives")
    ap.add_argument("--reference", type=Path, default=None, help="a checkout of an earlier pyengine to compare")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--machine", default=None, help="machine name recorded in the JSON")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = args.folder or Path(os.environ.get("TMPDIR", "/tmp")) / f"pyengine-{args.shape}-bf16"
    shape = load_memory.SHAPES[args.shape]
    load_memory.make_llama_checkpoint(folder, shape)
    gb = 1 << 30
    # Both at once when there is a reference: each process's peak is its own (VmHWM); their seconds
    # are then measured sharing the cores.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ours = pool.submit(measure, folder, args.starts, args.tokens, args.threads)
        theirs = pool.submit(measure, folder, args.starts, args.tokens, args.threads, args.reference) \
            if args.reference else None
        row = ours.result()
    print(f"layer by layer: sampling peak {row['peak_rss_sampling'] / gb:.2f} GB ({row['sampler_backend']}), "
          f"calibration peak {row['peak_rss_calibration'] / gb:.2f} GB, "
          f"after import {row['rss_after_import'] / gb:.2f}, "
          f"int8 result {row['int8_bytes'] / gb:.2f} GB; {row['sampling_seconds']:.0f} s + "
          f"{row['calibration_seconds']:.0f} s", flush=True)
    report = dict(shape=args.shape, config=shape, starts=args.starts, tokens=args.tokens,
                  checkpoint_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                  fp32_weight_bytes=fp32_weight_bytes(shape), result=row,
                  machine=dict(name=args.machine, cpu=load_memory._cpu_name(), nproc=os.cpu_count(),
                               python=platform.python_version()))
    if args.json:  # written now, and again with the reference's figures when they come
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    if args.reference:
        ref = theirs.result()
        report["reference"] = ref
        report["peak_ratio_reference_over_layer_by_layer"] = ref["peak_rss"] / max(
            row["peak_rss_sampling"], row["peak_rss_calibration"])
        print(f"reference: peak {ref['peak_rss'] / gb:.2f} GB, {ref['seconds']:.0f} s "
              f"({report['peak_ratio_reference_over_layer_by_layer']:.2f}x the layer-by-layer peak)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
