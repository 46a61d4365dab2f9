"""Fixtures for the pytest-benchmark suites: the model to benchmark.

    python -m pytest benchmarks                         # every suite (benchmarks/bench_*.py)
    python -m pytest benchmarks/bench_e2e.py            # one suite
    python -m pytest benchmarks --benchmark-disable     # each benchmark once, untimed: a smoke run

pyproject.toml's python_files collects benchmarks/bench_*.py; its testpaths keep a bare ``pytest``
(the CI run) on tests/ only.

The default model (SmolLM2-135M-Instruct) when ``pyengine.load.default_model`` exists and has it in its
cache; otherwise a random model of the same shape (LlamaConfig as SmolLM2-135M), made once per
session. PYENGINE_BENCH_LAYERS overrides its layer count (default 30, as SmolLM2-135M) for quick runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

LAYERS_ENV = "PYENGINE_BENCH_LAYERS"
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                     max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)


def cached_default_model() -> Path | None:
    """The default model's folder if the module exists and the model is already in its cache."""
    try:
        from pyengine.load.default_model import default_model_dir
    except ImportError:
        return None
    path = Path(default_model_dir())
    return path if (path / "config.json").is_file() else None


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on the bench text (its ids fit inside the model's 49152 vocabulary)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "pyengine" / "data" / "bench_text.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))


def make_smollm2_shaped(folder: Path, layers: int) -> Path:
    import transformers

    config = transformers.LlamaConfig(**{**SMOLLM2_SHAPE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory) -> Path:
    path = cached_default_model()
    if path is not None:
        return path
    layers = int(os.environ.get(LAYERS_ENV, SMOLLM2_SHAPE["num_hidden_layers"]))
    return make_smollm2_shaped(tmp_path_factory.mktemp("smollm2_shaped"), layers)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """--benchmark-json / --benchmark-save: every non-finite float (an extra_info figure that came out
    NaN or inf) as null, so the file is strict JSON (pytest-benchmark's writer would print NaN)."""
    from pyengine.bench.report import json_safe

    cleaned = json_safe(output_json)
    output_json.clear()
    output_json.update(cleaned)
