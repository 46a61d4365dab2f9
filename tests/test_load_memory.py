"""Loading holds one tensor at a time on its way to the backend's form, never the whole model in fp32.

A generated bf16 Llama checkpoint of ~240 MB (benchmarks/load_memory.py's "small" shape) is loaded in a
fresh process per backend; its peak resident memory (VmHWM) beyond what it had after `import
pyengine` must stay within the bytes the loaded model keeps plus a margin well below the fp32 copy
of the whole model (0.43 GiB here) that a load converting everything up front would hold.
"""
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("load_memory", BENCHMARKS / "load_memory.py")
load_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_memory)

MARGIN_BYTES = 350 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return load_memory.make_llama_checkpoint(tmp_path_factory.mktemp("bf16") / "small", load_memory.SHAPES["small"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fused-int8", "fused", "torch"])
def test_peak_memory_while_loading(checkpoint, backend):
    row = load_memory.measure(checkpoint, backend, threads=1)
    assert row["pyengine"] == str(Path(__file__).resolve().parents[1] / "pyengine")
    extra = row["peak_rss"] - row["rss_after_import"] - row["kept_bytes"]
    assert extra <= MARGIN_BYTES, (f"{backend}: peak {row['peak_rss'] >> 20} MiB, {row['rss_after_import'] >> 20} "
                                   f"after import, keeps {row['kept_bytes'] >> 20} MiB: {extra >> 20} MiB beyond")
    fp32_bytes = 4 * sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) // 2
    expected_kept = fp32_bytes if backend != "fused-int8" else fp32_bytes // 4
    assert abs(row["kept_bytes"] - expected_kept) < 0.1 * expected_kept  # the accounting sees the weights
