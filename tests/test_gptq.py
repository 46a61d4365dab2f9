"""GPTQ (pyengine.quantize.gptq): the rounding it does, and fused-int8 engines built with it."""
import os
import shutil

import pytest
import torch

import pyengine
from pyengine.quantize import gptq as gptq_module
from pyengine.bench import quality
from pyengine.quantize.gptq import quantize_gptq
from pyengine.quantize.int8 import quantize_per_channel


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """GPTQ results of these tests' tiny models go to a cache of their own."""
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _inputs(n, k, seed=0):
    """Calibration-like inputs: features that co-vary (mixed from fewer sources), as a layer's do."""
    mixing = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(1234))  # one distribution per k
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k // 4, generator=g) @ mixing + 0.05 * torch.randn(n, k, generator=g)


def _output_error(x, w, q, scale):
    return float((x @ (w - q.float() * scale[:, None]).T).norm())


def test_uncorrelated_inputs_give_plain_rounding():
    # H a multiple of the identity: no column's error can be compensated by another, so GPTQ
    # must reduce to rounding each weight to nearest, bit for bit.
    w = torch.randn(48, 70, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_gptq(w, 3.0 * torch.eye(70))
    q_ref, scale_ref = quantize_per_channel(w)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("shape", [(64, 96), (33, 200), (1, 130)])
def test_output_error_below_plain_rounding(shape):
    out_features, in_features = shape
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x = _inputs(4 * in_features, in_features)
    held_out = _inputs(512, in_features, seed=7)  # same distribution, not seen by the quantizer
    q, scale = quantize_gptq(w, x.double().T @ x.double(), block=32)  # several blocks, a partial last one
    q_ref, scale_ref = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == shape and q.abs().max() <= 127
    assert torch.equal(scale, scale_ref)  # the same format: only which integer each weight gets changes
    gptq_err, plain_err = _output_error(held_out, w, q, scale), _output_error(held_out, w, q_ref, scale_ref)
    assert gptq_err < 0.8 * plain_err, (gptq_err, plain_err)


def test_block_size_does_not_change_the_result():
    w = torch.randn(20, 90, generator=torch.Generator().manual_seed(3))
    x = _inputs(300, 90)
    h = x.double().T @ x.double()
    assert torch.equal(quantize_gptq(w, h, block=128)[0], quantize_gptq(w, h, block=7)[0])


def test_rows_per_chunk_does_not_change_the_result():
    """Rows are rounded a chunk at a time to bound memory; every row comes out as in one piece."""
    w = torch.randn(301, 90, generator=torch.Generator().manual_seed(5))
    w[7] = 0.0  # an all-zero row in a chunk of its own
    x = _inputs(300, 90)
    x[:, 3] = 0.0
    h = x.double().T @ x.double()
    whole, whole_scale = quantize_gptq(w, h, rows_per_chunk=1000)
    for rows in (1, 64, 300):
        q, scale = quantize_gptq(w, h, rows_per_chunk=rows)
        assert torch.equal(q, whole) and torch.equal(scale, whole_scale), rows
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    with pytest.raises(ValueError, match="rows_per_chunk"):
        quantize_gptq(w, h, rows_per_chunk=0)


def test_unseen_input_features_get_zero_weight():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(4))
    x = _inputs(200, 40)
    x[:, [0, 17]] = 0.0  # features calibration never saw non-zero
    q, _ = quantize_gptq(w, x.double().T @ x.double())
    assert torch.all(q[:, [0, 17]] == 0)
    assert q[:, 1:17].abs().sum() > 0 and q[:, 18:].abs().sum() > 0  # the seen features keep theirs


def test_bad_arguments():
    w = torch.randn(8, 12)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_gptq(w, torch.eye(11))
    with pytest.raises(ValueError, match="damping"):
        quantize_gptq(w, torch.eye(12), damping=0.0)


def test_gptq_engine_save_and_reload(tiny_models, tmp_path):
    path_model = tiny_models["llama"]
    fp32 = pyengine.load(path_model, backend="fused")
    gptq = pyengine.load(path_model, backend="fused-int8", int8_method="gptq", progress=False)
    plain = pyengine.load(path_model, backend="fused-int8")
    assert (gptq.int8_method, plain.int8_method, fp32.int8_method) == ("gptq", "absmax", None)
    ids = torch.randint(0, fp32.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ref, q = fp32.logits(ids), gptq.logits(ids)
    assert quality.kl_divergence(ref, q) < 0.01 and quality.top1_agreement(ref, q) > 0.9
    # Not plain rounding under another name: the integers differ.
    assert any(not torch.equal(a.qweight, b.qweight) for a, b in zip(gptq.backend.linears.values(), plain.backend.linears.values()))

    saved = gptq.save_int8(tmp_path / "gptq.safetensors")
    reloaded = pyengine.load(path_model, backend="fused-int8", int8_weights=saved)
    assert reloaded.int8_method == "gptq"
    assert torch.equal(reloaded.logits(ids), q)
    with pytest.raises(ValueError, match="made by 'gptq', not 'absmax'"):
        pyengine.load(path_model, backend="fused-int8", int8_weights=saved, int8_method="absmax")


def test_int8_method_checked(tiny_models):
    with pytest.raises(ValueError, match="int8_method must be one of absmax, gptq"):
        pyengine.load(tiny_models["llama"], backend="fused-int8", int8_method="awq")
    with pytest.raises(ValueError, match="for backend='fused-int8'"):
        pyengine.load(tiny_models["llama"], backend="fused", int8_method="gptq")


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "mistral", "qwen2-window"])
def test_gptq_other_architectures(tiny_models, name):
    # GPT-2's linears are stored transposed in the checkpoint and its output projection is tied;
    # Qwen2 has q/k/v biases; Mistral and qwen2-window attend through sliding windows in the
    # calibration pass: each linear layer must still get its own calibration inputs.
    fp32 = pyengine.load(tiny_models[name], backend="fused")
    gptq = pyengine.load(tiny_models[name], backend="fused-int8", int8_method="gptq", progress=False)
    ids = torch.randint(0, fp32.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    ref, q = fp32.logits(ids), gptq.logits(ids)
    assert quality.kl_divergence(ref, q) < 0.01 and quality.top1_agreement(ref, q) > 0.9


def test_cli_quantize_then_generate(tiny_models, tmp_path, capsys):
    from pyengine.cli import main

    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(out), "--model", str(tiny_models["llama"]), "--method", "gptq"]) == 0
    assert "wrote" in capsys.readouterr().err
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=out)
    assert engine.int8_method == "gptq"
    assert main(["generate", "hello", "--model", str(tiny_models["llama"]), "--backend", "fused-int8",
                 "--int8-weights", str(out), "--max-new-tokens", "3"]) == 0
    for bad in (["quantize", str(tmp_path / "x.safetensors"), "--method", "awq"],
                ["generate", "hello", "--backend", "fused-int8", "--int8-method", "awq"]):
        with pytest.raises(SystemExit) as exit_info:  # argparse: before any model loads
            main([*bad, "--model", str(tiny_models["llama"])])
        assert exit_info.value.code == 2
        assert "invalid choice: 'awq'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_gptq_result_is_cached(tiny_models, private_cache, monkeypatch, capsys):
    first = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_method="gptq", progress=False)
    entries = list((private_cache / "int8").glob("*.safetensors"))
    assert len(entries) == 1 and not list((private_cache / "int8").glob(".*tmp*"))

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(gptq_module, "quantize_model", no_quantizing)
    second = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_method="gptq", progress=False)
    assert all(torch.equal(a.qweight, b.qweight) for a, b in zip(first.backend.linears.values(), second.backend.linears.values()))
    monkeypatch.undo()
    monkeypatch.setenv("PYENGINE_CACHE", str(private_cache))

    # A damaged entry is rebuilt, with a message, not trusted.
    entries[0].write_bytes(b"not a safetensors file")
    third = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_method="gptq", progress=False)
    assert "GPTQ cache entry unreadable" in capsys.readouterr().err
    assert all(torch.equal(a.qweight, b.qweight) for a, b in zip(first.backend.linears.values(), third.backend.linears.values()))
    assert pyengine.load(tiny_models["llama"], backend="fused-int8", int8_weights=entries[0]).int8_method == "gptq"


def test_cache_key_follows_the_model_files(tiny_models, tmp_path):
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_models["llama"], copy)
    config = pyengine.load(copy, backend="torch").config
    before = gptq_module.cache_path(copy, config)
    assert before == gptq_module.cache_path(copy, config)
    weights = next(copy.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if the weights were replaced
    assert gptq_module.cache_path(copy, config) != before
