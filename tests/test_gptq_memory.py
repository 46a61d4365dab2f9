"""GPTQ holds one layer's fp32 weights at a time, never the fp32 model (issue 22).

A generated bf16 Llama checkpoint of many narrow layers (212 MB of weights in fp32) is quantized in a
fresh process (benchmarks/gptq_memory.py): calibration text sampled by the default engine, closed,
then pyengine.quantize.gptq.quantize_model. While calibrating, resident memory beyond what the process had
after `import pyengine` must stay within the int8 result plus a margin for one layer's fp32 weights,
GPTQ's [in, in] float64 work matrices and the activations: well below the fp32 weights, which the
whole-model calibration held at once.
"""
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("gptq_memory", BENCHMARKS / "gptq_memory.py")
gptq_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gptq_memory)

NARROW_DEEP = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=384, tie_word_embeddings=False, shards=2)
MARGIN_BYTES = 128 << 20
# glibc's malloc keeps freed blocks below its (self-raising) mmap threshold in the heap, where the
# int8 results placed between them fragment it: a fixed threshold makes resident memory show what
# the code holds rather than the allocator's policy (on a 1.1B model the large work matrices are
# mapped anyway: benchmarks/gptq_memory.py).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@pytest.mark.slow
def test_gptq_peak_memory_is_one_layer_not_the_model(tmp_path_factory):
    folder = gptq_memory.load_memory.make_llama_checkpoint(tmp_path_factory.mktemp("bf16") / "narrow-deep",
                                                           NARROW_DEEP)
    row = gptq_memory.measure(folder, starts=4, tokens=16, threads=1, env=ALLOCATOR)
    assert row["pyengine"] == str(Path(__file__).resolve().parents[1] / "pyengine")
    assert row["linears"] == 4 * NARROW_DEEP["num_hidden_layers"] + 1 and row["sampler_backend"] == "fused-bf16"
    fp32_bytes = gptq_memory.fp32_weight_bytes(NARROW_DEEP)
    assert MARGIN_BYTES + row["int8_bytes"] < fp32_bytes  # the bound below tells the two designs apart
    if not row["peak_reset"]:
        pytest.skip("VmHWM cannot be reset here (/proc/self/clear_refs): the sampling peak would hide calibration's")
    extra = row["peak_rss_calibration"] - row["rss_after_import"]
    assert extra <= row["int8_bytes"] + MARGIN_BYTES, (
        f"calibration peak {row['peak_rss_calibration'] >> 20} MiB, {row['rss_after_import'] >> 20} MiB after import: "
        f"{extra >> 20} MiB for an int8 result of {row['int8_bytes'] >> 20} MiB (fp32 weights: {fp32_bytes >> 20} MiB)")
