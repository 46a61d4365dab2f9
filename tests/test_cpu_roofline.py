"""The parts of benchmarks/cpu_roofline.py that compute a reported figure: the bytes a decode step
reads, and the spans of a fused engine's own weights that its "of weights read" column sums."""
import importlib.util
from pathlib import Path

import pytest
import torch

import pyengine

_SPEC = importlib.util.spec_from_file_location(
    "cpu_roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_roofline.py")
cpu_roofline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cpu_roofline)


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
    expected = cpu_roofline.bytes_per_token(engine.config, backend == "fused-int8", context=1)["weights"]
    assert expected == weight_bytes
    assert cpu_roofline.weights_read_gbs(spans, repeats=1) > 0
