"""The parts of benchmarks/cpu_roofline.py that compute a reported figure: the bytes a decode step
reads, and the spans of a fused engine's own weights that its "of weights read" column sums; and the
benchmarks' JSON (cpu_roofline's file, the pytest-benchmark hook, the committed results): strict JSON,
a non-finite figure written as null."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import pyengine

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_roofline = _load("cpu_roofline", "cpu_roofline.py")


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (not JSON; Python's parser takes them)."""
    def reject(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=reject)


def linear_tensors(engine):
    model = engine.model
    owners = [value for layer in model.layers for value in vars(layer).values()] + [model.lm_head]
    return [t for w in owners for name in ("weight", "qweight", "scale")
            if isinstance(t := getattr(w, name, None), torch.Tensor)]


@pytest.mark.parametrize("backend", ["fused", "fused-int8"])
def test_weight_spans_cover_exactly_the_linear_weights(tiny_models, backend):
    engine = pyengine.load(tiny_models["llama"], backend=backend)
    spans = cpu_roofline.weight_spans(engine)
    tensors = linear_tensors(engine)
    # Every weight byte inside some span, and the spans no larger than the weights plus the arena's
    # alignment padding (64 bytes per tensor at most).
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(s.data_ptr() <= start and end <= s.data_ptr() + s.numel() * 8 + 8 for s in spans)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    span_bytes = sum(s.numel() * 8 for s in spans)
    assert weight_bytes - 8 * len(spans) <= span_bytes <= weight_bytes + 64 * len(tensors)
    # bytes_per_token's weights are these bytes (tiny llama: lm_head untied, no biases in the spans).
    expected = cpu_roofline.bytes_per_token(engine.config, "int8" if backend == "fused-int8" else "fp32",
                                            context=1)["weights"]
    assert expected == weight_bytes
    assert cpu_roofline.weights_read_gbs(spans, repeats=1) > 0


def test_roofline_tok_s_and_fraction_beside(tiny_models):
    config = pyengine.load(tiny_models["llama"], backend="torch").config
    per_token = cpu_roofline.bytes_per_token(config, "fp32", context=8)["total"]
    assert cpu_roofline.roofline_tok_s(config, "fp32", 8, 10.0) == pytest.approx(10e9 / per_token)
    # Each repeat against its own probe, then the median: 0.5, 0.25 and 1.0 of reading 1 GB at the rate.
    assert cpu_roofline.fraction_beside([5.0, 5.0, 20.0], [10.0, 20.0, 20.0], 10**9) == pytest.approx(0.5)


def test_bytes_per_token_widths_batch_and_kv(tiny_models):
    from pyengine.bench import roofline

    config = pyengine.load(tiny_models["llama"], backend="torch").config
    fp32, bf16, int8 = (roofline.bytes_per_token(config, p, context=10) for p in ("fp32", "bf16", "int8"))
    assert bf16["weights"] * 2 == fp32["weights"]  # weights at their stored width
    assert fp32["weights"] / 4 < int8["weights"] < fp32["weights"] / 4 * 1.1  # 1 byte + a scale per row
    kv_per_position = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    assert fp32["kv"] == kv_per_position * 10 and bf16["kv"] == kv_per_position * 10 // 2
    b4 = roofline.bytes_per_token(config, "fp32", context=10, batch=4)
    assert b4["weights"] == fp32["weights"] / 4 and b4["kv"] == fp32["kv"]  # weights shared, KV per sequence
    assert roofline.roofline_tok_s(config, "fp32", 10, 10.0, batch=4) == pytest.approx(10e9 / b4["total"])
    with pytest.raises(ValueError, match="precision"):
        roofline.bytes_per_token(config, "int4", context=1)


def test_hf_baselines_ask_for_the_last_position_only(tiny_models):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="eager").eval()
    seen = []
    original = hf.forward
    hf.forward = lambda *a, **kw: seen.append(kw.get("logits_to_keep")) or original(*a, **kw)
    cpu_roofline.hf_prefill(hf, list(range(3, 19)), repeats=1)
    assert seen == [1, 1]  # warm-up and the timed forward: one position's logits, as pyengine computes


def test_write_json_is_strict_with_non_finite_as_null(tmp_path):
    # The shape of a "(python)" row: no prefill figure (NaN), so no prefill speedup either.
    result = {"results": [{"backend": "fused (python)", "decode_tok_s": {1: 60.0}, "prefill_tok_s": math.nan,
                           "prefill_runs": [math.nan], "prefill_speedup_vs_hf_eager": math.inf}],
              "settings": {"json": tmp_path / "x.json"}}
    path = tmp_path / "results" / "cpu.json"
    cpu_roofline.write_json(result, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")
    row = strict_json(text)["results"][0]
    assert row["decode_tok_s"] == {"1": 60.0}
    assert row["prefill_tok_s"] is None and row["prefill_runs"] == [None]
    assert row["prefill_speedup_vs_hf_eager"] is None
    assert text == json.dumps(strict_json(text), indent=2) + "\n"  # the committed files' format


def test_benchmark_json_hook_writes_non_finite_as_null():
    conftest = _load("benchmarks_conftest", "conftest.py")
    output = {"benchmarks": [{"name": "test_generate_e2e[hf-eager]", "stats": {"median": 1.0},
                              "extra_info": {"decode_tok_s": math.nan, "decode_tok_s_runs": [math.nan, 5.0],
                                             "ratio": -math.inf}}]}
    conftest.pytest_benchmark_update_json(config=None, benchmarks=[], output_json=output)
    info = strict_json(json.dumps(output, allow_nan=False))["benchmarks"][0]["extra_info"]
    assert info == {"decode_tok_s": None, "decode_tok_s_runs": [None, 5.0], "ratio": None}


@pytest.mark.parametrize("path", sorted((BENCHMARKS / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_results_are_strict_json(path):
    strict_json(path.read_text())
