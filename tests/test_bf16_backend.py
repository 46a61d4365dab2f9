"""fused-bf16: a bf16 checkpoint's weights kept as they are, against HF transformers running the same
weights upcast to fp32; and the default backend chosen from the checkpoint's dtype."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pyengine
from conftest import TINY_CONFIGS
from test_parity_hf import assert_logits_close


def as_dtype(folder, dst, dtype):
    shutil.copytree(folder, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def bf16_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {arch: as_dtype(folder, root / arch, torch.bfloat16) for arch, folder in tiny_models.items()}


def hf_fp32(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_logits_match_transformers_on_the_same_weights(bf16_models, arch):
    engine = pyengine.load(bf16_models[arch])  # the default for a bf16 checkpoint
    assert engine.backend_name == "fused-bf16"
    torch.manual_seed(1)
    ids = torch.randint(0, engine.config.vocab_size, (2, 50))
    with torch.no_grad():
        ref = hf_fp32(bf16_models[arch])(ids).logits
    assert_logits_close(engine.logits(ids), ref)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_greedy_decode_is_token_identical(bf16_models, arch):
    # Decode runs the C++ step over bf16 weights (and prefill the widened GEMM).
    engine = pyengine.load(bf16_models[arch], backend="fused-bf16")
    assert engine.model._cpp_decoder() is not None
    prompt = "The capital of France is"
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf_fp32(bf16_models[arch]).generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                                  eos_token_id=None, pad_token_id=0, min_new_tokens=48)
    assert engine.generate(prompt, max_new_tokens=48, ignore_eos=True).token_ids == out[0, len(ids):].tolist()


def test_weights_are_kept_exactly_in_bf16(bf16_models):
    engine = pyengine.load(bf16_models["llama"], backend="fused-bf16")
    stored = load_file(bf16_models["llama"] / "model.safetensors")
    layer = engine.model.layers[0]
    p = "model.layers.0."
    assert layer.qkv.weight.dtype == torch.bfloat16
    expected = torch.cat([stored[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(layer.qkv.weight, expected)
    assert torch.equal(layer.down.weight, stored[p + "mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "fused"), (torch.float16, "fused"),
                                            (torch.bfloat16, "fused-bf16")])
def test_default_backend_follows_the_checkpoint(tiny_models, tmp_path, dtype, backend):
    # fp16 is not bf16's subset (10 mantissa bits against 7): it runs in fp32, exactly.
    folder = as_dtype(tiny_models["llama"], tmp_path / "m", dtype)
    assert pyengine.load(folder).backend_name == backend
