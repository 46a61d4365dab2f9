"""The C++ decode steps (_C.LlamaDecoder, _C.Gpt2Decoder) against the op-by-op Python path of the same backend."""
import dataclasses
import gc

import pytest
import torch

import pyengine
from pyengine import _C
from pyengine.backends import LinearWeights

# qwen2: q/k/v bias; llama3: scaled rope tables; qwen2-window: a sliding window on layer 1 only
ARCHS = ["llama", "llama3-scaled", "qwen2", "qwen2-window", "mistral", "gpt2"]
BACKENDS = ["fused", "fused-int8"]


@pytest.fixture(scope="module")
def engines(tiny_models):
    cache = {}

    def get(arch, backend):
        if (arch, backend) not in cache:
            cache[arch, backend] = pyengine.load(tiny_models[arch], backend=backend)
        return cache[arch, backend]

    return get


def prefill(model, prompts, capacity):
    """A cache holding the prompts (Python path), and each prompt's next token (greedy)."""
    lengths = [len(p) for p in prompts]
    cache = model.new_cache(len(prompts), capacity, torch.float32)
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    n_new = torch.tensor(lengths, dtype=torch.int32)
    logits = model.forward(tokens, cache, logits_at=n_new.long() - 1, n_new=n_new)
    cache.lengths += n_new
    return cache, logits.argmax(-1)


def decode_logits(model, prompts, steps, cpp):
    """Logits of `steps` greedy decode steps after the prompts, with or without the C++ decoder."""
    model.cpp_decode = cpp
    try:
        cache, next_ids = prefill(model, prompts, max(map(len, prompts)) + steps)
        out = []
        for _ in range(steps):
            logits = model.forward(next_ids[:, None], cache)
            assert logits.shape == (len(prompts), 1, model.config.vocab_size)
            cache.lengths += 1
            out.append(logits[:, 0])
            next_ids = logits[:, 0].argmax(-1)
        return torch.stack(out, 1), cache
    finally:
        model.cpp_decode = True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_logits_match_python_path(engines, arch, backend):
    model = engines(arch, backend).model
    prompts = [[5, 17, 42, 99, 3, 250, 7]]
    cpp, cpp_cache = decode_logits(model, prompts, 6, cpp=True)
    assert model._decoder, "the C++ decoder was not used"
    ref, ref_cache = decode_logits(model, prompts, 6, cpp=False)
    if backend == "fused-int8":  # the same kernels on the same inputs in the same order
        assert torch.equal(cpp, ref)
        assert torch.equal(cpp_cache.keys, ref_cache.keys) and torch.equal(cpp_cache.values, ref_cache.values)
    else:  # linear_f32 and torch's F.linear sum in different orders
        torch.testing.assert_close(cpp, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cpp_cache.keys, ref_cache.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cpp_cache.values, ref_cache.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_tokens_match_python_path(engines, arch, backend):
    engine = engines(arch, backend)
    prompt = "The capital of France is"
    cpp = engine.generate(prompt, max_new_tokens=32, ignore_eos=True)
    engine.model.cpp_decode = False
    try:
        ref = engine.generate(prompt, max_new_tokens=32, ignore_eos=True)
    finally:
        engine.model.cpp_decode = True
    assert len(cpp.token_ids) == 32
    assert cpp.token_ids == ref.token_ids


def test_env_var_disables_the_decoder(tiny_models, monkeypatch):
    monkeypatch.setenv("PYENGINE_CPP_DECODE", "0")
    engine = pyengine.load(tiny_models["llama"], backend="fused")
    engine.generate("hello", max_new_tokens=3)
    assert engine.model._decoder is None
    # The torch backend has no C++ decoder: decode stays op by op.
    monkeypatch.delenv("PYENGINE_CPP_DECODE")
    engine = pyengine.load(tiny_models["llama"], backend="torch")
    engine.generate("hello", max_new_tokens=3)
    assert engine.model._decoder is False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_ragged_batch_matches_one_by_one(engines, arch, backend):
    model = engines(arch, backend).model
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61], [100, 200, 300, 1, 2, 3]]
    batch, _ = decode_logits(model, prompts, 5, cpp=True)
    for b, p in enumerate(prompts):
        alone, _ = decode_logits(model, [p], 5, cpp=True)
        if backend == "fused-int8":
            # W8A16 for prefill (the padded batch: 33 rows, the GEMM) and decode (GEMV) alike: a
            # row's bits do not depend on the rows it runs with.
            assert torch.equal(batch[b], alone[0])
        else:
            torch.testing.assert_close(batch[b], alone[0], atol=2e-5, rtol=1e-5)
    ref, _ = decode_logits(model, prompts, 5, cpp=False)
    torch.testing.assert_close(batch, ref, atol=2e-5, rtol=1e-5)


def test_ragged_batch_generate(engines):
    engine = engines("llama", "fused")
    prompts = ["The capital", "Energy per token is measured in joules", "Once upon a time"]
    together = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
    for prompt, result in zip(prompts, together):
        assert engine.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == result.token_ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_tail_chooses_the_argmax_and_advances_positions(engines, arch, backend):
    """step(..., next_tokens=, advance=): the same logits as a plain step, next_tokens their argmax
    (numpy's rule), then positions += advance; a zero advance leaves a sequence where it was."""
    model = engines(arch, backend).model
    decoder = model._cpp_decoder()
    prompts = [[5, 17, 42, 99], [9, 8, 7, 6, 5, 4, 3]]
    cache, next_ids = prefill(model, prompts, 16)
    plain_cache, _ = prefill(model, prompts, 16)
    tables = model._decoder_tables(cache)
    V = model.config.vocab_size
    plain = torch.empty(2, V)
    decoder.step(next_ids, plain_cache.keys, plain_cache.values, plain_cache.lengths, *tables, plain)
    logits, chosen = torch.empty(2, V), torch.full((2,), -1, dtype=torch.long)
    advance = torch.tensor([1, 0], dtype=torch.int32)
    before = cache.lengths.clone()
    decoder.step(next_ids, cache.keys, cache.values, cache.lengths, *tables, logits, next_tokens=chosen,
                 advance=advance)
    assert torch.equal(logits, plain)
    assert torch.equal(cache.keys, plain_cache.keys) and torch.equal(cache.values, plain_cache.values)
    assert chosen.tolist() == logits.numpy().argmax(-1).tolist()
    assert cache.lengths.tolist() == (before + advance).tolist()
    # decode_greedy: the same step, from the model.
    cache2, _ = prefill(model, prompts, 16)
    assert torch.equal(model.decode_greedy(next_ids, cache2, advance), chosen)
    assert torch.equal(cache2.lengths, cache.lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_makes_one_cpp_call_per_token(engines, backend):
    """Greedy generate goes through decode_greedy (step, argmax and lengths in one call) and gives
    the tokens of the op-by-op path with sample(), a ragged batch with one sequence stopping early
    included (its advance is 0 from then on)."""
    engine = engines("llama", backend)
    prompts = ["The capital of France is", "Energy per token", "Once"]
    free = engine.generate(prompts, max_new_tokens=20, ignore_eos=True)
    stop = engine.tokenizer.decode(free[1].token_ids[4:6])  # the second prompt stops after ~5 tokens
    calls = []
    real = engine.model._decoder
    class Counting:
        def step(self, *args, **kwargs):
            calls.append(sorted(kwargs))
            return real.step(*args, **kwargs)
    engine.model._decoder = Counting()
    try:
        fast = engine.generate(prompts, max_new_tokens=20, ignore_eos=True, stop=[stop])
    finally:
        engine.model._decoder = real
    assert len(calls) == 19 and all(c == ["advance", "next_tokens"] for c in calls)
    assert fast[1].finish_reason == "stop" and len(fast[1].token_ids) < 20
    engine.model.cpp_decode = False
    try:
        slow = engine.generate(prompts, max_new_tokens=20, ignore_eos=True, stop=[stop])
    finally:
        engine.model.cpp_decode = True
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    assert [r.text for r in fast] == [r.text for r in slow]


# ---- argument checks ---------------------------------------------------------------------------------


def llama_args(model, **changes):
    c = model.config
    args = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_heads=c.num_heads,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                norm_eps=c.norm_eps, embed=model.embed, final_norm=model.final_norm, lm_head=model.lm_head,
                layers=list(model.layers))
    args.update(changes)
    return args


def with_layer(model, index, **fields):
    layers = list(model.layers)
    layers[index] = dataclasses.replace(layers[index], **fields)
    return layers


def test_constructor_rejects_bad_weights(engines):
    model = engines("llama", "fused").model
    _C.LlamaDecoder(**llama_args(model))  # the good arguments build
    layer = model.layers[1]
    H = model.config.hidden_size
    bad = [
        (dict(layers=with_layer(model, 1, qkv=LinearWeights(layer.qkv.weight.double()))), TypeError,
         r"layers\[1\]\.qkv\.weight: expected dtype float32"),
        (dict(layers=with_layer(model, 1, out=LinearWeights(layer.out.weight[:, :-1].contiguous()))), ValueError,
         r"layers\[1\]\.out\.weight: expected shape"),
        (dict(layers=with_layer(model, 0, gate_up=LinearWeights(layer.gate_up.weight.t()))), ValueError,
         r"layers\[0\]\.gate_up\.weight"),
        (dict(layers=with_layer(model, 1, attn_norm=torch.ones(H + 1))), ValueError, r"layers\[1\]\.attn_norm"),
        (dict(layers=with_layer(model, 0, down=LinearWeights(layer.down.weight, torch.zeros(H + 1)))), ValueError,
         r"layers\[0\]\.down\.bias"),
        (dict(layers=with_layer(model, 0, mlp_norm="weights")), TypeError, r"layers\[0\]\.mlp_norm"),
        (dict(layers=with_layer(model, 1, window=-1)), ValueError, r"layers\[1\]\.window must be >= 0"),
        (dict(layers=with_layer(model, 1, window="16")), TypeError, r"layers\[1\]\.window: expected an int"),
        (dict(layers=[object()]), TypeError, r"layers\[0\]: has no attribute 'attn_norm'"),
        (dict(layers=[]), ValueError, "layers: must not be empty"),
        (dict(lm_head=object()), TypeError, "lm_head: expected linear weights"),
        (dict(embed=model.embed[:, :-1]), ValueError, "embed"),
        (dict(final_norm=torch.ones(H, dtype=torch.float64)), TypeError, "final_norm"),
        (dict(num_heads=3), ValueError, "multiple of num_kv_heads"),
        (dict(head_dim=0), ValueError, "head_dim must be positive"),
        (dict(norm_eps=0.0), ValueError, "norm_eps"),
    ]
    for changes, error, message in bad:
        with pytest.raises(error, match=message):
            _C.LlamaDecoder(**llama_args(model, **changes))


def test_constructor_rejects_bad_int8_weights(engines):
    model = engines("qwen2", "fused-int8").model
    layer = model.layers[0]
    scale_wrong = dataclasses.replace(layer.qkv, scale=layer.qkv.scale[:-1].contiguous())
    with pytest.raises(ValueError, match=r"layers\[0\]\.qkv\.scale"):
        _C.LlamaDecoder(**llama_args(model, layers=with_layer(model, 0, qkv=scale_wrong)))
    as_int32 = dataclasses.replace(layer.qkv, qweight=layer.qkv.qweight.int())
    with pytest.raises(TypeError, match=r"layers\[0\]\.qkv\.qweight: expected dtype int8"):
        _C.LlamaDecoder(**llama_args(model, layers=with_layer(model, 0, qkv=as_int32)))
    bias_wrong = dataclasses.replace(layer.qkv, bias=layer.qkv.bias.double())
    with pytest.raises(TypeError, match=r"layers\[0\]\.qkv\.bias"):
        _C.LlamaDecoder(**llama_args(model, layers=with_layer(model, 0, qkv=bias_wrong)))


def step_args(model, batch=1, capacity=16):
    c = model.config
    cache = model.new_cache(batch, capacity, torch.float32)
    cos, sin = model._rope_tables(capacity)
    return dict(tokens=torch.zeros(batch, dtype=torch.long), k_cache=cache.keys, v_cache=cache.values,
                positions=torch.zeros(batch, dtype=torch.int32), cos=cos, sin=sin,
                logits=torch.empty(batch, c.vocab_size))


def test_step_rejects_bad_arguments(engines):
    model = engines("llama", "fused").model
    decoder = _C.LlamaDecoder(**llama_args(model))
    args = step_args(model, batch=2, capacity=8)
    decoder.step(**args)
    V = model.config.vocab_size
    bad = [
        (dict(tokens=torch.tensor([1, V])), ValueError, f"tokens: id {V} .* outside the vocabulary"),
        (dict(tokens=torch.tensor([1, -1])), ValueError, "tokens: id -1"),
        (dict(tokens=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "tokens: expected dtype int64"),
        (dict(tokens=torch.tensor([1])), ValueError, "k_cache: dimension 1 must be 1"),
        (dict(positions=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "positions: position 8 .* KV cache"),
        (dict(positions=torch.tensor([0, -2], dtype=torch.int32)), ValueError, "positions: position -2"),
        (dict(positions=torch.tensor([0, 1])), TypeError, "positions: expected dtype int32"),
        (dict(cos=args["cos"][:4], sin=args["sin"][:4], positions=torch.tensor([0, 5], dtype=torch.int32)),
         ValueError, "positions: position 5 .* cos/sin"),
        (dict(sin=args["sin"][:4]), ValueError, "sin: dimension 0"),
        (dict(k_cache=args["k_cache"][:1]), ValueError, "k_cache: dimension 0 must be"),
        (dict(k_cache=args["k_cache"].double()), TypeError, "k_cache: expected dtype float32"),
        (dict(v_cache=args["v_cache"][:, :, :, :4].contiguous()), ValueError, "v_cache: dimension 3"),
        (dict(v_cache=args["v_cache"].transpose(3, 4)), ValueError, "v_cache"),
        (dict(v_cache=args["k_cache"]), ValueError, "v_cache: must not share memory with k_cache"),
        (dict(logits=torch.empty(2, V - 1)), ValueError, "logits: dimension 1"),
        (dict(logits=torch.empty(2, V).t().contiguous().t()), ValueError, "logits: must be contiguous"),
        (dict(logits=torch.empty(2, V, device="meta")), ValueError, "logits: tensors on device 'meta'"),
    ]
    for changes, error, message in bad:
        before = args["k_cache"].clone()
        with pytest.raises(error, match=message):
            decoder.step(**{**args, **changes})
        assert torch.equal(args["k_cache"], before), "a rejected step wrote to the cache"
    # The greedy tail: checked before the step writes anything (cache and positions untouched).
    long, i32 = torch.long, torch.int32
    bad_tail = [
        (dict(next_tokens=torch.empty(2, dtype=i32)), TypeError, "next_tokens: expected dtype int64"),
        (dict(next_tokens=torch.empty(3, dtype=long)), ValueError, "next_tokens: dimension 0 must be 2"),
        (dict(next_tokens=torch.empty(2, 2, dtype=long)[:, 0]), ValueError, "next_tokens: must be contiguous"),
        (dict(next_tokens=args["tokens"]), ValueError, "next_tokens: must not share memory with tokens"),
        (dict(advance=torch.ones(2, dtype=long)), TypeError, "advance: expected dtype int32"),
        (dict(advance=torch.ones(1, dtype=i32)), ValueError, "advance: dimension 0 must be 2"),
        (dict(advance=args["positions"]), ValueError, "positions: must not share memory with advance"),
    ]
    for changes, error, message in bad_tail:
        before, positions = args["k_cache"].clone(), args["positions"].clone()
        with pytest.raises(error, match=message):
            decoder.step(**args, **changes)
        assert torch.equal(args["k_cache"], before) and torch.equal(args["positions"], positions)


def test_decoder_keeps_its_weights_alive(engines):
    model = engines("qwen2", "fused").model
    copies = [dataclasses.replace(layer, attn_norm=layer.attn_norm.clone(),
                                  qkv=LinearWeights(layer.qkv.weight.clone(), layer.qkv.bias.clone()))
              for layer in model.layers]
    decoder = _C.LlamaDecoder(**llama_args(model, layers=copies, embed=model.embed.clone()))
    args = step_args(model)
    decoder.step(**args)
    expected = args["logits"].clone()
    del copies
    gc.collect()
    for _ in range(50):  # churn the allocator: freed weights would likely be overwritten
        torch.randn(1000, 64).sum()
    args = step_args(model)
    decoder.step(**args)
    assert torch.equal(args["logits"], expected)


def test_profile(engines):
    model = engines("llama", "fused-int8").model
    decoder = _C.LlamaDecoder(**llama_args(model))
    assert decoder.num_layers == model.config.num_layers
    decoder.set_profiling(True)
    args = step_args(model)
    decoder.step(**args)
    decoder.step(**{**args, "positions": torch.tensor([1], dtype=torch.int32)})
    profile = decoder.profile()
    assert profile.pop("steps") == 2
    assert set(profile) >= {"qkv", "attention", "gate_up", "down", "lm_head"}
    assert all(t >= 0 for t in profile.values()) and sum(profile.values()) > 0
    decoder.reset_profile()
    assert decoder.profile()["steps"] == 0


# ---- GPT-2 ----------------------------------------------------------------------------------------


def gpt2_args(model, **changes):
    c = model.config
    args = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_heads=c.num_heads,
                intermediate_size=c.intermediate_size, max_positions=model.positions.shape[0], norm_eps=c.norm_eps,
                embed=model.embed, positions=model.positions, final_norm=model.final_norm, lm_head=model.lm_head,
                layers=list(model.layers))
    args.update(changes)
    return args


def test_gpt2_constructor_rejects_bad_weights(engines):
    model = engines("gpt2", "fused").model
    _C.Gpt2Decoder(**gpt2_args(model))  # the good arguments build
    layer = model.layers[1]
    H, P = model.config.hidden_size, model.positions.shape[0]
    bad = [
        (dict(layers=with_layer(model, 1, fc=LinearWeights(layer.fc.weight.t()))), ValueError, r"layers\[1\]\.fc\.weight"),
        (dict(layers=with_layer(model, 0, ln_2=(torch.ones(H), torch.zeros(H + 1)))), ValueError,
         r"layers\[0\]\.ln_2\.bias"),
        (dict(layers=with_layer(model, 0, ln_1=torch.ones(H))), TypeError, r"layers\[0\]\.ln_1: expected a \(weight, bias\)"),
        (dict(layers=[object()]), TypeError, r"layers\[0\]: has no attribute 'ln_1'"),
        (dict(positions=model.positions[:, :-1].contiguous()), ValueError, "positions: expected shape"),
        (dict(max_positions=P + 1), ValueError, "positions: expected shape"),
        (dict(final_norm=(torch.ones(H), torch.zeros(H, dtype=torch.float64))), TypeError, "final_norm.bias"),
        (dict(num_heads=5), ValueError, "multiple of num_heads"),
        (dict(max_positions=0), ValueError, "max_positions must be positive"),
    ]
    for changes, error, message in bad:
        with pytest.raises(error, match=message):
            _C.Gpt2Decoder(**gpt2_args(model, **changes))


def test_gpt2_step_rejects_bad_arguments(engines):
    model = engines("gpt2", "fused-int8").model
    decoder = _C.Gpt2Decoder(**gpt2_args(model))
    V, P = model.config.vocab_size, model.positions.shape[0]
    cache = model.new_cache(2, P + 4, torch.float32)  # room past the position embedding
    args = dict(tokens=torch.zeros(2, dtype=torch.long), k_cache=cache.keys, v_cache=cache.values,
                positions=torch.tensor([0, 3], dtype=torch.int32), logits=torch.empty(2, V))
    decoder.step(**args)
    bad = [
        (dict(tokens=torch.tensor([1, V])), ValueError, f"tokens: id {V} .* outside the vocabulary"),
        (dict(positions=torch.tensor([0, P], dtype=torch.int32)), ValueError,
         f"positions: position {P} .* position embedding"),
        (dict(positions=torch.tensor([0, P + 4], dtype=torch.int32)), ValueError, "KV cache"),
        (dict(k_cache=args["k_cache"][:, :, :1].contiguous()), ValueError, "k_cache: dimension 2"),
        (dict(logits=torch.empty(2, V + 1)), ValueError, "logits: dimension 1"),
    ]
    for changes, error, message in bad:
        before = args["k_cache"].clone()
        with pytest.raises(error, match=message):
            decoder.step(**{**args, **changes})
        assert torch.equal(args["k_cache"], before), "a rejected step wrote to the cache"
