"""fused-int8 against the fp32 engine: bounded quality loss, and the int8 weights file."""
import pytest
import torch

import pyengine
from pyengine import quality
from pyengine.errors import CheckpointError
from pyengine.quant import dequantize, quantize_per_channel


def test_quantize_per_channel_round_trip():
    torch.manual_seed(0)
    w = torch.randn(37, 53)
    w[3] = 0.0  # an all-zero row must stay zero, not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (37,)
    back = dequantize(pyengine.quant.Int8Linear(q, scale))
    assert torch.all(back[3] == 0)
    # Rounding to nearest: error at most half a step per element.
    assert torch.all((back - w).abs() <= scale[:, None] / 2 + 1e-7)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_int8_logits_close_to_fp32(tiny_models, name):
    fp32 = pyengine.load(tiny_models[name], backend="fused")
    int8 = pyengine.load(tiny_models[name], backend="fused-int8")
    torch.manual_seed(0)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 64))
    ref, q = fp32.logits(ids), int8.logits(ids)
    assert quality.kl_divergence(ref, q) < 0.01
    assert quality.top1_agreement(ref, q) > 0.9


def test_int8_weights_save_and_reload(tiny_models, tmp_path):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8")
    path = engine.save_int8(tmp_path / "int8.safetensors")
    reloaded = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)
    ids = [[1, 2, 3, 50, 60]]
    assert torch.equal(engine.logits(ids), reloaded.logits(ids))
    # A file made for another model is refused, naming the file.
    with pytest.raises(CheckpointError, match="different model"):
        pyengine.load(tiny_models["qwen2"], backend="fused-int8", int8_weights=path)
    with pytest.raises(ValueError, match="fused-int8"):
        pyengine.load(tiny_models["llama"], backend="fused", int8_weights=path)
    with pytest.raises(ValueError, match="save_int8 needs"):
        pyengine.load(tiny_models["llama"], backend="fused").save_int8(tmp_path / "x.safetensors")


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.__setitem__("linear.0.qweight", t["linear.0.qweight"].clone().index_fill_(1, torch.tensor([0]), -128)),
     r"linear\.0\.qweight: holds -128"),
    (lambda t: t.__setitem__("linear.1.qweight", t["linear.1.qweight"].to(torch.int16)),
     r"linear\.1\.qweight: expected a 2-D int8 tensor, got torch\.int16"),
    (lambda t: t.__setitem__("linear.2.scale", t["linear.2.scale"].half()),
     r"linear\.2\.scale: expected float32"),
    (lambda t: t.__setitem__("linear.2.scale", t["linear.2.scale"][:-1].clone()),
     r"linear\.2\.scale: expected float32 of shape"),
    (lambda t: t["linear.3.scale"].__setitem__(0, float("nan")), r"linear\.3\.scale: holds a negative or non-finite"),
    (lambda t: t["linear.3.scale"].__setitem__(0, -1.0), r"linear\.3\.scale: holds a negative or non-finite"),
])
def test_int8_weights_file_with_bad_tensors_is_refused(tiny_models, tmp_path, damage, message):
    """What the kernels assume of each layer is checked at load, naming the file and the tensor,
    instead of reaching a kernel (where -128 or a NaN scale would be a wrong answer, not an error)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = pyengine.load(tiny_models["llama"], backend="fused-int8").save_int8(tmp_path / "int8.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    damage(tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=message) as err:
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)
    assert str(path) in str(err.value)


def test_fused_backends_reject_other_dtypes(tiny_models):
    with pytest.raises(ValueError, match="fp32"):
        pyengine.load(tiny_models["llama"], backend="fused", dtype=torch.bfloat16)
