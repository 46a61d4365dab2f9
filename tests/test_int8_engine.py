"""fused-int8 against the fp32 engine: bounded quality loss, and the int8 weights file."""
import json

import pytest
import torch

import pyengine
from pyengine.bench import quality
from pyengine.errors import CheckpointError
from pyengine.quantize.int8 import dequantize, quantize_per_channel


def test_quantize_per_channel_round_trip():
    torch.manual_seed(0)
    w = torch.randn(37, 53)
    w[3] = 0.0  # an all-zero row must stay zero, not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (37,)
    back = dequantize(pyengine.quantize.int8.Int8Linear(q, scale))
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


QKV, OUT, GATE_UP, DOWN = (f"model.layers.0.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                              "mlp.gate_up_proj", "mlp.down_proj"))


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.__setitem__(f"{QKV}.qweight", t[f"{QKV}.qweight"].clone().index_fill_(1, torch.tensor([0]), -128)),
     rf"{QKV}\.qweight: holds -128"),
    (lambda t: t.__setitem__(f"{OUT}.qweight", t[f"{OUT}.qweight"].to(torch.int16)),
     rf"{OUT}\.qweight: expected a 2-D int8 tensor, got torch\.int16"),
    (lambda t: t.__setitem__(f"{GATE_UP}.scale", t[f"{GATE_UP}.scale"].half()),
     rf"{GATE_UP}\.scale: expected float32"),
    (lambda t: t.__setitem__(f"{GATE_UP}.scale", t[f"{GATE_UP}.scale"][:-1].clone()),
     rf"{GATE_UP}\.scale: expected float32 of shape"),
    (lambda t: t[f"{DOWN}.scale"].__setitem__(0, float("nan")), rf"{DOWN}\.scale: holds a negative or non-finite"),
    (lambda t: t[f"{DOWN}.scale"].__setitem__(0, -1.0), rf"{DOWN}\.scale: holds a negative or non-finite"),
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


def _rewrite(path, edit):
    """Rewrite a saved int8 file after edit(tensors, metadata), keeping the tensors in the order edit leaves."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors = edit(tensors, metadata) or tensors
    save_file(tensors, str(path), metadata=metadata)


def test_int8_weights_are_matched_by_layer_name(tiny_models, tmp_path):
    """Each layer's weights are found by its name: a file whose layers come in another order loads
    to the same logits; a missing layer, a wrong shape, or a layer the model lacks is named."""
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8")
    path = engine.save_int8(tmp_path / "int8.safetensors")
    ids = [[1, 2, 3, 50, 60]]

    def reverse(tensors, metadata):
        metadata["linears"] = json.dumps(list(reversed(json.loads(metadata["linears"]))))
        return dict(reversed(list(tensors.items())))

    _rewrite(path, reverse)
    assert torch.equal(pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path).logits(ids),
                       engine.logits(ids))

    def drop(tensors, metadata):  # a partial file: one layer gone, the list of layers agreeing
        metadata["linears"] = json.dumps([n for n in json.loads(metadata["linears"]) if n != DOWN])
        return {k: v for k, v in tensors.items() if not k.startswith(DOWN + ".")}

    _rewrite(path, drop)
    with pytest.raises(ValueError, match=f"no linear layer '{DOWN}'"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)

    path = engine.save_int8(tmp_path / "int8.safetensors")
    _rewrite(path, lambda t, m: {k: v for k, v in t.items() if k != f"{OUT}.scale"})  # listed but gone
    with pytest.raises(CheckpointError, match=rf"{OUT}\.scale is missing"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)

    path = engine.save_int8(tmp_path / "int8.safetensors")

    def swap(tensors, metadata):  # o_proj's weights under gate_up's name: a wrong shape, named
        for part in ("qweight", "scale"):
            tensors[f"{GATE_UP}.{part}"] = tensors[f"{OUT}.{part}"].clone()

    _rewrite(path, swap)
    with pytest.raises(ValueError, match=f"linear layer '{GATE_UP}' has shape"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)

    path = engine.save_int8(tmp_path / "int8.safetensors")

    def extra(tensors, metadata):
        metadata["linears"] = json.dumps(json.loads(metadata["linears"]) + ["model.layers.99.mlp.down_proj"])
        for part in ("qweight", "scale"):
            tensors[f"model.layers.99.mlp.down_proj.{part}"] = tensors[f"{DOWN}.{part}"].clone()

    _rewrite(path, extra)
    with pytest.raises(ValueError, match="does not have: model.layers.99.mlp.down_proj"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)


def test_int8_file_keyed_by_order_is_refused(tiny_models, tmp_path):
    """A file from before the names (pyengine-int8-v1: layers by construction order) is refused with
    what to do, not guessed at."""
    path = pyengine.load(tiny_models["llama"], backend="fused-int8").save_int8(tmp_path / "int8.safetensors")

    def to_v1(tensors, metadata):
        names = json.loads(metadata.pop("linears"))
        metadata.update(format="pyengine-int8-v1", count=str(len(names)))
        return {f"linear.{i}.{part}": tensors[f"{n}.{part}"]
                for i, n in enumerate(names) for part in ("qweight", "scale")}

    _rewrite(path, to_v1)
    with pytest.raises(CheckpointError, match="older pyengine .*quantize again"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=path)
