"""pyengine.load.gguf_convert on GGUF files written here, the way llama.cpp's converter writes them.

A tiny random Llama (transformers) and a tiny byte-level BPE tokenizer are written to GGUF with the
gguf package (q/k rows interleaved per head as llama.cpp does), converted back, and compared with
the originals: tensors, logits through transformers, token ids. The default model's own conversion
is checked against recorded digests in test_default_model.py.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from pyengine.load.gguf_convert import GGUFConversionError, convert_llama_gguf

gguf = pytest.importorskip("gguf")

TEXTS = ["The capital of France is Paris.", "  two  spaces\tand a tab\n", "numbers 0123456789 and ünïcödé 日本 👍",
         "<|im_start|>user\nHi<|im_end|>\n"]


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf: the two rotary halves of each head interleaved row by row.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_gguf(hf_folder, path, *, quant=None, arch="llama"):
    """The HF folder's model and tokenizer as a llama.cpp-style GGUF file; matrices in ``quant``
    (a GGMLQuantizationType) where given, norms always F32."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in added else 1 for _, i in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in load_file(str(hf_folder / "model.safetensors")).items():
        w = t.float().numpy()
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{_NAMES[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if gname.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, heads)
        elif gname.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, kv_heads)
        if quant is not None and w.ndim == 2:
            writer.add_tensor(gname, gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # GQA (4 query / 2 kv heads) so that q and k are un-permuted with different head counts.
    return make_tiny_model(tmp_path_factory.mktemp("gguf") / "hf", "llama")


def test_f32_round_trip_is_exact(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    out.mkdir()
    config = convert_llama_gguf(write_gguf(tiny, tmp_path / "m.gguf"), out)
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2

    original, converted = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)
    for name, t in original.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], t.float()), name

    # transformers reads the folder as an ordinary checkpoint and computes the same logits.
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    a = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)


def test_tokenizer_gives_the_same_ids(tiny, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    out.mkdir()
    convert_llama_gguf(write_gguf(tiny, tmp_path / "m.gguf"), out)
    original = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = original.encode(text).ids
        assert converted.encode(text).ids == ids, text
        assert hf(text)["input_ids"] == ids, text
        assert converted.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]


def test_quantized_tensors_are_dequantized(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    out.mkdir()
    convert_llama_gguf(write_gguf(tiny, tmp_path / "m.gguf", quant=gguf.GGMLQuantizationType.Q8_0), out)
    original, converted = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, t in original.items():
        if t.ndim != 2:
            assert torch.equal(converted[name], t), name
            continue
        # Q8_0: 32 weights share a scale d = max|w| / 127, stored as fp16 (relative error <= 2^-11), so
        # each weight is within d/2 + 127 * d * 2^-11 < 0.57 d of the original.
        step = t.abs().reshape(t.shape[0], -1, 32).amax(-1, keepdim=True) / 127
        err = (converted[name] - t).abs().reshape(t.shape[0], -1, 32)
        assert bool((err <= step * 0.57 + 1e-7).all()), name
        assert not torch.equal(converted[name], t)  # the rounding did happen


def test_conversion_does_not_import_transformers(tiny, tmp_path):
    gguf_path = write_gguf(tiny, tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import sys\n"
        "from pyengine.load.gguf_convert import convert_llama_gguf\n"
        f"convert_llama_gguf({str(gguf_path)!r}, {str(out)!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_other_architectures_are_refused(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFConversionError, match="architecture 'qwen2' is not supported"):
        convert_llama_gguf(write_gguf(tiny, tmp_path / "m.gguf", arch="qwen2"), out)
    assert not (out / "model.safetensors").exists()
