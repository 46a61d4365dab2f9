"""The decode plan (pyengine.runtime.plan: the model's hidden_states recorded once, replayed in C++ by
_C.DecodePlan) against the op-by-op Python path of the same backend, for every tiny architecture,
backend and ISA; the recorder refusing what it cannot express; the plan's argument checks."""
import gc

import pytest
import torch

import pyengine
from pyengine import _C
from pyengine.kernels import ops
from pyengine.kernels.backends import LinearWeights
from pyengine.models.llama import Llama
from pyengine.runtime.plan import PlanRecordingError, record_decode_plan

from conftest import TINY_CONFIGS

# qwen2: q/k/v bias; llama3: scaled rope tables; qwen2-window: a sliding window on layer 1 only
ARCHS = list(TINY_CONFIGS)
BACKENDS = ["fused", "fused-int8", "fused-bf16"]


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


def assert_same_run(cpp, cpp_cache, ref, ref_cache):
    """The plan replays the kernels the backend calls op by op, on the same inputs in the same order:
    the same bits."""
    assert torch.equal(cpp, ref), f"max difference {(cpp - ref).abs().max().item()}"
    assert torch.equal(cpp_cache.keys, ref_cache.keys) and torch.equal(cpp_cache.values, ref_cache.values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_logits_match_python_path(engines, arch, backend):
    model = engines(arch, backend).model
    prompts = [[5, 17, 42, 99, 3, 250, 7]]
    cpp, cpp_cache = decode_logits(model, prompts, 6, cpp=True)
    assert model._decoder, "the C++ decode step was not used"
    ref, ref_cache = decode_logits(model, prompts, 6, cpp=False)
    assert_same_run(cpp, cpp_cache, ref, ref_cache)


@pytest.mark.parametrize("isa", ops.supported_isas())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["qwen2-window", "gpt2", "qwen3", "gemma3", "phi3"])
def test_every_isa_and_ragged_positions_match_python_path(engines, arch, backend, isa):
    """Several rows at different positions (a sliding window passed on one of them), on each ISA."""
    model = engines(arch, backend).model
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61], [100, 200, 300, 1, 2, 3]]
    with ops.use_isa(isa):
        cpp, cpp_cache = decode_logits(model, prompts, 4, cpp=True)
        ref, ref_cache = decode_logits(model, prompts, 4, cpp=False)
    assert_same_run(cpp, cpp_cache, ref, ref_cache)


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
    # The torch backend has no C++ decode step: decode stays op by op.
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
    assert torch.equal(batch, ref)  # the same kernels on the same rows


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
    tables = model.rope_tables(cache.capacity)
    V = model.config.vocab_size
    plain = torch.empty(2, V)
    decoder.step(next_ids, plain_cache, tables, plain)
    logits, chosen = torch.empty(2, V), torch.full((2,), -1, dtype=torch.long)
    advance = torch.tensor([1, 0], dtype=torch.int32)
    before = cache.lengths.clone()
    decoder.step(next_ids, cache, tables, logits, next_tokens=chosen, advance=advance)
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


# ---- the ops Qwen3 / Gemma 3 / Phi-3 add, recorded and replayed -------------------------------------


class GemmaLike(Llama):
    """A test architecture over the tiny Llama's weights that uses every op the newer families add:
    per-head q/k rms_norm, a scaled embedding, GeGLU (gelu_mul), two rotary tables (local layers,
    global layers) and soft-capped logits."""

    def rope_tables(self, needed):
        cos, sin = self._rope_tables(needed)
        return {"default": (cos, sin), "local": ((cos * 0.5).contiguous(), (sin * 0.5).contiguous())}

    def hidden_states(self, tokens, cache, step):
        c, ops_ = self.config, self.backend
        B, T = tokens.shape
        D = c.head_dim
        q_size, kv_size = c.num_heads * D, c.num_kv_heads * D
        x = ops_.embedding(tokens, self.embed, scale=c.hidden_size ** 0.5)
        pending = None
        for i, layer in enumerate(self.layers):
            h = ops_.rms_norm(x, layer.attn_norm, c.norm_eps) if pending is None else \
                ops_.add_rms_norm(x, pending, layer.attn_norm, c.norm_eps)
            q, k, v = ops_.linear(h, layer.qkv).split((q_size, kv_size, kv_size), dim=-1)
            q = ops_.rms_norm(q.reshape(B, T, c.num_heads, D), self.q_norm, c.norm_eps)  # strided: per head
            k = ops_.rms_norm(k.reshape(B, T, c.num_kv_heads, D), self.k_norm, c.norm_eps)
            table = "local" if i % 2 == 0 else "default"
            q, k = ops_.rope(q, step, table=table), ops_.rope(k, step, table=table)
            cache.write(i, k, v.reshape(B, T, c.num_kv_heads, D), step.q_start, step.uniform_start)
            attn = ops_.attention(q, cache.keys[i], cache.values[i], step, D ** -0.5, layer.window)
            h = ops_.add_rms_norm(x, ops_.linear(attn.reshape(B, T, q_size), layer.out), layer.mlp_norm, c.norm_eps)
            gate, up = ops_.linear(h, layer.gate_up).chunk(2, dim=-1)
            pending = ops_.linear(ops_.gelu_mul(gate, up), layer.down)
        return ops_.add_rms_norm(x, pending, self.final_norm, c.norm_eps)

    def logits(self, hidden):
        return self.backend.softcap(self.backend.linear(hidden, self.lm_head), 0.5)


def as_gemma_like(model):
    model.__class__ = GemmaLike
    D = model.config.head_dim
    generator = torch.Generator().manual_seed(3)
    model.q_norm = 1 + 0.1 * torch.randn(D, generator=generator)
    model.k_norm = 1 + 0.1 * torch.randn(D, generator=generator)
    model._decoder = None
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_ops_recorded_and_replayed(tiny_models, backend):
    model = as_gemma_like(pyengine.load(tiny_models["llama"], backend=backend).model)
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61]]
    for isa in ops.supported_isas():
        with ops.use_isa(isa):
            cpp, cpp_cache = decode_logits(model, prompts, 4, cpp=True)
            assert model._decoder, "the plan was not recorded"
            ref, ref_cache = decode_logits(model, prompts, 4, cpp=False)
        assert_same_run(cpp, cpp_cache, ref, ref_cache)
    assert cpp.abs().max() <= 0.5  # soft-capped
    recorded = {ins["op"] for ins in model._decoder.instructions}
    assert recorded >= {"gelu_mul", "softcap", "rope", "rms_norm"}
    assert model._decoder.rope_table_names == ["local", "default"]
    # The torch backend's reference ops (plain torch) give the same logits to float rounding.
    reference = as_gemma_like(pyengine.load(tiny_models["llama"], backend="torch").model)
    reference.q_norm, reference.k_norm = model.q_norm, model.k_norm
    torch_ref, _ = decode_logits(reference, prompts, 4, cpp=False)
    tolerance = 3e-2 if backend != "fused" else 1e-4
    torch.testing.assert_close(cpp, torch_ref, atol=tolerance, rtol=tolerance)


def test_new_ops_fused_match_torch():
    from pyengine.kernels.backends import FusedBackend, Step, TorchBackend

    torch_ops, fused = TorchBackend(), FusedBackend()
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(3, 1, 2 * 40, generator=g) * 3
    gate, up = gate_up.chunk(2, dim=-1)  # strided halves, read in place
    torch.testing.assert_close(fused.gelu_mul(gate, up), torch_ops.gelu_mul(gate, up), atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 7, generator=g) * 40
    torch.testing.assert_close(fused.softcap(x, 30.0), torch_ops.softcap(x, 30.0), atol=1e-5, rtol=1e-6)
    assert fused.softcap(x, 30.0).abs().max() < 30
    table = torch.randn(11, 8, generator=g)
    ids = torch.tensor([[3, 10], [0, 4]])
    assert torch.equal(fused.embedding(ids, table, scale=8 ** 0.5), torch_ops.embedding(ids, table, scale=8 ** 0.5))
    heads = torch.randn(2, 1, 3 * 16, generator=g)[..., :32].reshape(2, 1, 2, 16)  # a strided view
    w = torch.randn(16, generator=g)
    torch.testing.assert_close(fused.rms_norm(heads, w, 1e-6), torch_ops.rms_norm(heads, w, 1e-6), atol=1e-6, rtol=1e-5)
    cos, sin = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    positions = torch.tensor([[2], [5]])
    step = Step(q_start=positions[:, 0].int(), kv_len=positions[:, 0].int() + 1, positions=positions, uniform_start=None,
                rope_tables={"default": (torch.zeros(6, 8), torch.zeros(6, 8)), "local": (cos, sin)})
    q = torch.randn(2, 1, 2, 16, generator=g)
    torch.testing.assert_close(fused.rope(q.clone(), step, table="local"), torch_ops.rope(q, step, table="local"))
    for bad, message in (((x, 0.0), "cap must be positive"),):
        with pytest.raises(ValueError, match=message):
            _C.softcap(bad[0], torch.empty_like(bad[0]), bad[1])
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        _C.gelu_mul(gate, up[..., :-1], torch.empty(3, 1, 40))


# ---- the recorder refuses what it cannot express ----------------------------------------------------


class Doubling(Llama):
    def hidden_states(self, tokens, cache, step):
        return super().hidden_states(tokens, cache, step) * 2


class UnknownOp(Llama):
    def hidden_states(self, tokens, cache, step):
        return self.backend.rotate_everything(super().hidden_states(tokens, cache, step))


class TorchCall(Llama):
    def hidden_states(self, tokens, cache, step):
        hidden = super().hidden_states(tokens, cache, step)
        return torch.cat([hidden], dim=-1)


class ReadsPositions(Llama):
    def hidden_states(self, tokens, cache, step):
        step.positions
        return super().hidden_states(tokens, cache, step)


class PerHeadSplit(Llama):  # a slice of the head dim of a [B, T, heads, D] view is not one run per row
    def hidden_states(self, tokens, cache, step):
        c = self.config
        x = self.backend.embedding(tokens, self.embed)
        first, _ = x.reshape(*tokens.shape, 2, c.hidden_size // 2).split((1, c.hidden_size // 2 - 1), dim=-1)
        return super().hidden_states(tokens, cache, step)


@pytest.mark.parametrize("cls, message", [
    (Doubling, "__mul__"), (UnknownOp, "backend op 'rotate_everything'"), (TorchCall, "torch function 'cat'"),
    (ReadsPositions, "step.positions"), (PerHeadSplit, "not one run of each row"),
])
def test_recorder_refuses_what_it_cannot_express(tiny_models, cls, message):
    engine = pyengine.load(tiny_models["llama"], backend="fused")
    model = engine.model
    model.__class__ = cls
    with pytest.raises(PlanRecordingError, match=message):
        record_decode_plan(model)
    assert model.backend is engine.model.backend and type(model.backend).__name__ == "FusedBackend"


def test_unrecordable_model_decodes_op_by_op(tiny_models):
    """A model the recorder refuses still decodes: op by op, with a warning naming what failed."""
    engine = pyengine.load(tiny_models["llama"], backend="fused")
    expected = engine.generate("hello there", max_new_tokens=5, ignore_eos=True).token_ids
    engine.model.__class__ = ReadsPositions
    engine.model._decoder = None
    with pytest.warns(UserWarning, match="step.positions"):
        got = engine.generate("hello there", max_new_tokens=5, ignore_eos=True).token_ids
    assert engine.model._decoder is False
    assert got == expected


# ---- the plan's checks ------------------------------------------------------------------------------


def native_args(model, batch=1, capacity=16):
    c = model.config
    cache = model.new_cache(batch, capacity, torch.float32)
    return dict(tokens=torch.zeros(batch, dtype=torch.long), k_cache=cache.keys, v_cache=cache.values,
                positions=torch.zeros(batch, dtype=torch.int32), rope_tables=[model._rope_tables(capacity)],
                logits=torch.empty(batch, c.vocab_size))


def build(model, instructions, **changes):
    recorded = model._cpp_decoder()
    args = dict(vocab_size=model.config.vocab_size, buffer_widths=list(recorded_widths(recorded)), output_buffer=0,
                instructions=instructions, num_rope_tables=len(recorded.rope_table_names))
    args.update(changes)
    return _C.DecodePlan(**args)


def recorded_widths(plan):
    widths = {}
    for ins in plan.instructions:
        for key in ("x", "y", "out"):
            if key in ins:
                buffer, offset, width = ins[key]
                widths[buffer] = max(widths.get(buffer, 0), offset + width)
    return [widths[b] for b in range(len(widths))]


def edited(instructions, index, **fields):
    out = [dict(ins) for ins in instructions]
    out[index].update(fields)
    for key, value in fields.items():
        if value is None:
            del out[index][key]
    return out


def test_constructor_rejects_bad_plans(engines):
    model = engines("qwen2", "fused").model
    plan = model._cpp_decoder()
    good = plan.instructions
    build(model, good)  # the recorded plan builds
    linear = next(i for i, ins in enumerate(good) if ins["op"] == "linear")
    norm = next(i for i, ins in enumerate(good) if ins["op"] == "rms_norm")
    lin = good[linear]["linear"]
    bad = [
        (edited(good, linear, linear=LinearWeights(lin.weight.double(), lin.bias)), TypeError,
         r"instructions\[\d+\] \(linear\)\.linear\.weight: expected dtype float32"),
        (edited(good, linear, linear=LinearWeights(lin.weight[:, :-1].contiguous(), lin.bias)), ValueError,
         r"\.linear\.weight: expected shape"),
        (edited(good, linear, linear=object()), TypeError, "expected linear weights"),
        (edited(good, norm, weight=torch.ones(7)), ValueError, r"\(rms_norm\)\.weight: expected shape"),
        (edited(good, norm, weight=None), ValueError, r"instructions\[\d+\]: missing 'weight'"),
        (edited(good, norm, op="rms_normalize"), ValueError, "unknown op 'rms_normalize'"),
        (edited(good, norm, x=(99, 0, 64)), ValueError, "x is not a buffer"),
        (edited(good, norm, x=(1, 8, 64)), ValueError, "x lies outside its buffer"),
        (edited(good, linear, x=(good[linear]["x"][0], 0, 32)), ValueError, "linear"),
        (edited(good, next(i for i, s in enumerate(good) if s["op"] == "attention"), window=-1), ValueError,
         "window must be >= 0"),
        (good[1:], ValueError, "no embedding instruction"),
        (good + [{"op": "rms_norm"}], ValueError, "missing 'weight'"),
        ([*good[:-1]], ValueError, "no instruction writes the output buffer"),
        (good[:1] + ["linear"], TypeError, r"instructions\[1\]: expected a dict"),
    ]
    for instructions, error, message in bad:
        with pytest.raises(error, match=message):
            build(model, instructions)
    with pytest.raises(ValueError, match="output buffer must be vocab wide"):
        build(model, good, output_buffer=1)
    with pytest.raises(ValueError, match="rope table 1 is never used"):
        build(model, good, num_rope_tables=2)


def test_step_rejects_bad_arguments(engines):
    model = engines("llama", "fused").model
    native = model._cpp_decoder().native
    args = native_args(model, batch=2, capacity=8)
    native.step(**args)
    V = model.config.vocab_size
    cos, sin = args["rope_tables"][0]
    bad = [
        (dict(tokens=torch.tensor([1, V])), ValueError, f"tokens: id {V} .* outside the vocabulary"),
        (dict(tokens=torch.tensor([1, -1])), ValueError, "tokens: id -1"),
        (dict(tokens=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "tokens: expected dtype int64"),
        (dict(tokens=torch.tensor([1])), ValueError, "k_cache: dimension 1 must be 1"),
        (dict(positions=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "positions: position 8 .* KV cache"),
        (dict(positions=torch.tensor([0, -2], dtype=torch.int32)), ValueError, "positions: position -2"),
        (dict(positions=torch.tensor([0, 1])), TypeError, "positions: expected dtype int32"),
        (dict(rope_tables=[(cos[:4], sin[:4])], positions=torch.tensor([0, 5], dtype=torch.int32)),
         ValueError, "positions: position 5 .* rope table 0"),
        (dict(rope_tables=[(cos, sin[:4])]), ValueError, "sin: dimension 0"),
        (dict(rope_tables=[(cos[:, :-1].contiguous(), sin)]), ValueError, "cos: dimension 1"),
        (dict(rope_tables=[]), ValueError, "rope_tables: the plan uses 1"),
        (dict(rope_tables=[(cos,)]), ValueError, r"rope_tables\[0\]: expected \(cos, sin\)"),
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
            native.step(**{**args, **changes})
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
            native.step(**args, **changes)
        assert torch.equal(args["k_cache"], before) and torch.equal(args["positions"], positions)


def test_gpt2_step_rejects_positions_past_its_position_embedding(engines):
    model = engines("gpt2", "fused-int8").model
    native = model._cpp_decoder().native
    V, P = model.config.vocab_size, model.positions.shape[0]
    cache = model.new_cache(2, P + 4, torch.float32)  # room past the position embedding
    args = dict(tokens=torch.zeros(2, dtype=torch.long), k_cache=cache.keys, v_cache=cache.values,
                positions=torch.tensor([0, 3], dtype=torch.int32), rope_tables=[], logits=torch.empty(2, V))
    native.step(**args)
    with pytest.raises(ValueError, match=f"positions: position {P} .* position embedding"):
        native.step(**{**args, "positions": torch.tensor([0, P], dtype=torch.int32)})


def test_plan_keeps_its_weights_alive(engines):
    model = engines("qwen2", "fused").model
    recorded = model._cpp_decoder()
    copies = [{k: (v.clone() if isinstance(v, torch.Tensor) else
                   LinearWeights(v.weight.clone(), None if v.bias is None else v.bias.clone())
                   if isinstance(v, LinearWeights) else v) for k, v in ins.items()} for ins in recorded.instructions]
    native = build(model, copies)
    args = native_args(model)
    native.step(**args)
    expected = args["logits"].clone()
    del copies
    gc.collect()
    for _ in range(50):  # churn the allocator: freed weights would likely be overwritten
        torch.randn(1000, 64).sum()
    args = native_args(model)
    native.step(**args)
    assert torch.equal(args["logits"], expected)


def test_profile(engines):
    model = engines("llama", "fused-int8").model
    native = model._cpp_decoder().native
    assert native.num_layers == model.config.num_layers
    native.set_profiling(True)
    args = native_args(model)
    native.step(**args)
    native.step(**{**args, "positions": torch.tensor([1], dtype=torch.int32)})
    native.set_profiling(False)
    profile = native.profile()
    assert profile.pop("steps") == 2
    assert set(profile) >= {"embedding", "rms_norm", "linear", "rope", "write_kv", "attention", "silu_mul", "lm_head"}
    assert all(t >= 0 for t in profile.values()) and sum(profile.values()) > 0
    native.reset_profile()
    assert native.profile()["steps"] == 0
