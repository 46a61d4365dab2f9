"""Checkpoint loading: formats, and a clear error for every way a checkpoint can be broken."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyengine
from pyengine import CheckpointError, HubUnavailableError


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], dst)
    return dst


def reference_logits(folder):
    engine = pyengine.load(folder, backend="torch")
    return engine.logits([[1, 5, 9, 200]])


def test_sharded_safetensors(model_copy, tmp_path):
    expected = reference_logits(model_copy)
    tensors = load_file(model_copy / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_copy / file)
    (model_copy / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(reference_logits(model_copy), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_fp32(model_copy, dtype):
    tensors = load_file(model_copy / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, model_copy / "model.safetensors")
    engine = pyengine.load(model_copy, backend="torch")
    assert engine.model.embed.dtype == torch.float32
    assert engine.logits([[1, 2, 3]]).isfinite().all()


def test_pytorch_bin_is_loaded_weights_only(model_copy):
    expected = reference_logits(model_copy)
    torch.save(load_file(model_copy / "model.safetensors"), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    torch.testing.assert_close(reference_logits(model_copy), expected)


def test_pickle_with_code_is_refused(model_copy):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": Evil()}, model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights-only"):
        pyengine.load(model_copy, backend="torch")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file is missing"):
        pyengine.load(model_copy)


def test_unsupported_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'mamba'"):
        pyengine.load(model_copy)


def test_malformed_config_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pyengine.load(model_copy)


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        pyengine.load(model_copy)


def test_truncated_safetensors(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|outside the file)"):
        pyengine.load(model_copy)


def test_header_that_lies_about_sizes(model_copy):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    f.write_bytes(bytes(data[:8]) + b"\x00" * 4)  # header length says more bytes than the file has
    with pytest.raises(CheckpointError, match="header length"):
        pyengine.load(model_copy)


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"x" * 64)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pyengine.load(model_copy)


def test_missing_tensor(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.down_proj.weight' is missing"):
        pyengine.load(model_copy)


def test_wrong_shape_tensor(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \(7, 64\), expected \(32, 64\)"):
        pyengine.load(model_copy)


def test_missing_shard(model_copy):
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00009.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard listed"):
        pyengine.load(model_copy)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        pyengine.load(model_copy)


def test_hub_id_is_refused_with_guidance():
    with pytest.raises(HubUnavailableError, match="hub.*local folder"):
        pyengine.load("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        pyengine.load(tmp_path / "nope")


def test_rope_parameters_layout(model_copy):
    """transformers 5 writes rope_parameters; older configs write rope_theta (+ rope_scaling)."""
    from pyengine.load.config import ModelConfig

    cfg = json.loads((model_copy / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 1234.0}
    new = {k: v for k, v in cfg.items() if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    assert ModelConfig.from_hf(old).rope_theta == ModelConfig.from_hf(new).rope_theta == 1234.0
    yarn = dict(old, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_hf(yarn)


def test_sliding_window_config(tiny_models):
    """Which layers attend through a window, as transformers reads the config: Mistral every layer;
    Qwen2 (use_sliding_window) those named in layer_types, else those from max_window_layers on. No
    context cap; a window covering the context is none; nonsense is an error."""
    from pyengine.load.config import ModelConfig

    mistral = json.loads((tiny_models["mistral"] / "config.json").read_text())
    cfg = ModelConfig.from_hf(mistral)
    assert (cfg.sliding_window, cfg.layer_windows, cfg.max_context, cfg.notes) == (16, (16, 16), 256, ())
    assert ModelConfig.from_hf(dict(mistral, sliding_window=256)).layer_windows == ()  # covers the context
    assert ModelConfig.from_hf(dict(mistral, sliding_window=None)).sliding_window is None
    for bad in (0, -4, "16", 2.5, True):
        with pytest.raises(CheckpointError, match="sliding_window must be a positive integer"):
            ModelConfig.from_hf(dict(mistral, sliding_window=bad))
    qwen2 = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    assert qwen2.pop("layer_types") == ["full_attention"] * 2  # transformers writes it out; tested below
    assert ModelConfig.from_hf(dict(qwen2, use_sliding_window=False, sliding_window=32)).layer_windows == ()
    windowed = dict(qwen2, use_sliding_window=True, sliding_window=32)
    cfg = ModelConfig.from_hf(dict(windowed, max_window_layers=1))
    assert (cfg.sliding_window, cfg.layer_windows, cfg.max_context, cfg.notes) == (32, (0, 32), 256, ())
    assert ModelConfig.from_hf(dict(windowed, max_window_layers=0)).layer_windows == (32, 32)
    assert ModelConfig.from_hf(windowed).layer_windows == ()  # transformers' default max_window_layers: 28
    explicit = ModelConfig.from_hf(dict(windowed, layer_types=["sliding_attention", "full_attention"]))
    assert explicit.layer_windows == (32, 0)  # layer_types wins over max_window_layers
    for bad in (["sliding_attention"], ["full_attention", "chunked_attention"], "sliding_attention"):
        with pytest.raises(CheckpointError, match="layer_types must list"):
            ModelConfig.from_hf(dict(windowed, layer_types=bad))
    with pytest.raises(CheckpointError, match="max_window_layers must be a non-negative integer"):
        ModelConfig.from_hf(dict(windowed, max_window_layers=-1))


def test_gpt2_vocab_merges_tokenizer(tiny_models, tmp_path):
    """GPT-2 folders may carry vocab.json + merges.txt instead of tokenizer.json."""
    dst = tmp_path / "gpt2"
    shutil.copytree(tiny_models["gpt2"], dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    (dst / "vocab.json").write_text(json.dumps(tok["model"]["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    expected = pyengine.load(tiny_models["gpt2"], backend="torch").tokenizer.encode("The quick brown fox")
    (dst / "tokenizer.json").unlink()
    assert pyengine.load(dst, backend="torch").tokenizer.encode("The quick brown fox") == expected
