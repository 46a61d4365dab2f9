"""The serving API: arguments, results, streaming, stop conditions, batching, threads."""
import threading

import pytest
import torch

import pyengine
import pyengine.energy


@pytest.fixture(scope="module")
def engine(tiny_models):
    return pyengine.load(tiny_models["llama"], backend="torch")


def test_result_fields(engine):
    r = engine.generate("The capital of France is", max_new_tokens=8, ignore_eos=True)
    assert isinstance(r, pyengine.GenerationResult)
    assert len(r.token_ids) == 8 and r.finish_reason == "length"
    assert r.text == engine.tokenizer.decode(r.token_ids)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens == 8
    assert r.usage.prefill_seconds > 0 and r.usage.decode_seconds > 0
    assert engine.model_path.is_dir() and (engine.model_path / "config.json").is_file()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
])
def test_invalid_arguments_raise(engine, kwargs, message):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=message):
        engine.generate("hello", **kwargs)


def test_bad_prompts(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        engine.generate("word " * 400, max_new_tokens=2)  # tiny models have 256 positions
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(None, max_new_tokens=2)


def test_unknown_backend_and_device(tiny_models):
    with pytest.raises(ValueError, match="unknown backend"):
        pyengine.load(tiny_models["llama"], backend="tensorrt")
    with pytest.raises(ValueError, match="device"):
        pyengine.load(tiny_models["llama"], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pyengine.load(tiny_models["llama"], device="cuda")


def test_generation_stops_at_context(tiny_models):
    engine = pyengine.load(tiny_models["gpt2"], backend="torch")  # 256 learned positions
    prompt_ids = engine.tokenizer.encode("fox " * 60)
    r = engine.generate("fox " * 60, max_new_tokens=1000, ignore_eos=True)
    assert r.finish_reason == "length"
    assert len(prompt_ids) + len(r.token_ids) == engine.config.max_context


def test_stop_token_ids_and_stop_strings(engine):
    free = engine.generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    r = engine.generate("Once upon a time", max_new_tokens=12, stop_token_ids=[stop_id], ignore_eos=True)
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[:first + 1]
    # A stop string cuts the text before it.
    target = free.text[len(free.text) // 2:][:3]
    if target:
        r = engine.generate("Once upon a time", max_new_tokens=12, stop=[target], ignore_eos=True)
        assert r.finish_reason == "stop"
        assert target not in r.text and free.text.startswith(r.text)


def test_stream_yields_the_same_text(engine):
    full = engine.generate("The quick brown fox", max_new_tokens=15, ignore_eos=True).text
    pieces = list(engine.stream("The quick brown fox", max_new_tokens=15, ignore_eos=True))
    assert len(pieces) > 1 and "".join(pieces) == full
    assert "".join(engine.generate("The quick brown fox", max_new_tokens=15, ignore_eos=True, stream=True)) == full


def test_stream_can_be_abandoned(engine):
    it = engine.stream("The quick brown fox", max_new_tokens=50, ignore_eos=True)
    next(it)
    it.close()  # releases the engine: the next call must not deadlock
    assert len(engine.generate("fox", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_sampling_is_seeded(engine):
    a = engine.generate("Energy", max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = engine.generate("Energy", max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate("Energy", max_new_tokens=10, ignore_eos=True)
    sampled = engine.generate("Energy", max_new_tokens=10, temperature=0.8, top_k=1, seed=3, ignore_eos=True)
    assert sampled.token_ids == greedy.token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sampling_is_argmax_with_first_index_ties(dtype):
    from pyengine.runtime.sampling import SamplingParams, sample

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 5.0, 2.0], [-1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0, 0]
    wide = torch.randn(3, 5, 49152, dtype=dtype)[:, -1]  # a strided view, as the engine passes
    picked = sample(wide, SamplingParams(), None)
    assert picked.dtype == torch.int64 and torch.equal(picked, wide.argmax(-1))


def test_chat_template(engine):
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    r1 = engine.generate("hi", chat=True, max_new_tokens=5, ignore_eos=True)
    r2 = engine.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=5, ignore_eos=True)
    assert r1.token_ids == r2.token_ids
    assert r1.prompt_token_ids == engine.tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError, match="role"):
        engine.generate(messages=[{"content": "no role"}], max_new_tokens=2)


def test_concurrent_calls_are_safe(engine):
    expected = engine.generate("The capital", max_new_tokens=10, ignore_eos=True).token_ids
    results, errors = [], []

    def worker():
        try:
            results.append(engine.generate("The capital", max_new_tokens=10, ignore_eos=True).token_ids)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 4


def test_logits_api(engine):
    ids = engine.tokenizer.encode("The capital of France")
    logits = engine.logits(ids)
    assert logits.shape == (1, len(ids), engine.config.vocab_size)
    # The last position's argmax is the first greedy token.
    first = engine.generate("The capital of France", max_new_tokens=1, ignore_eos=True).token_ids[0]
    assert int(logits[0, -1].argmax()) == first
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.logits([[1, 2, 10**6]])


def test_module_level_generate_caches_engine(tiny_models):
    a = pyengine.generate("fox", model=tiny_models["qwen2"], backend="torch", max_new_tokens=3, ignore_eos=True)
    b = pyengine.generate("fox", model=tiny_models["qwen2"], backend="torch", max_new_tokens=3, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 3


def test_measure_energy_fills_usage(engine):
    r = engine.generate("The capital", max_new_tokens=6, ignore_eos=True, measure_energy=True)
    e = r.usage.energy
    assert e["source"] == engine.energy_meter().name  # estimate on machines without counters
    assert e["joules"] > 0 and e["joules"] == pytest.approx(e["prefill_joules"] + e["decode_joules"])
    assert e["joules_per_token"] == pytest.approx(e["joules"] / 6)
    if e["source"] == "estimate":
        assert e["estimated"] and e["fallback_reason"]


def test_usage_energy_names_its_method_constants_and_windows(engine):
    from pyengine.energy import ReplayMeter

    # an estimate: the W/core it charged, its origin, why it is low confidence
    r = engine.generate("The capital", max_new_tokens=4, ignore_eos=True,
                        measure_energy=pyengine.energy.EstimateMeter(watts_per_core=7.5))
    e = r.usage.energy
    assert e["method"] == "estimate: process CPU time (user+system) x W/core"
    assert e["constants"]["watts_per_core"] == 7.5 and "set by the caller" in e["constants"]["watts_per_core_origin"]
    assert "estimate, not a measurement" in e["confidence_reason"]
    assert e["sources"]["cpu"].startswith("estimate: process CPU seconds")
    # a counter that moves 10 J on every read: the updates the request's prefill and decode steps saw,
    # its seconds, and the meter's labels for them
    meter = ReplayMeter({"gpu": [10.0 * i for i in range(10_000)]})
    e = engine.generate("fox", max_new_tokens=3, ignore_eos=True, measure_energy=meter).usage.energy
    assert e["counter_updates"]["prefill"] >= 1 and e["counter_updates"]["decode"] >= 1
    assert e["joules"] == 10.0 * (e["counter_updates"]["prefill"] + e["counter_updates"]["decode"])
    assert e["seconds"] == pytest.approx(e["prefill_window_seconds"] + e["decode_window_seconds"])
    assert e["source"] == "replay" and e["sources"]["gpu"] == "replay:gpu"
    assert e["confidence"] == "high" and e["confidence_reason"].startswith("hardware counter")


def test_batch_energy_shares_add_up(engine):
    results = engine.generate(["The capital of France", "fox"], max_new_tokens=5, ignore_eos=True, measure_energy=True)
    shares = [r.usage.energy["joules"] for r in results]
    assert sum(shares) == pytest.approx(results[0].usage.energy["batch_joules"])
    # each prompt's prefill is its own, each decode step split among its rows (exactly: tests/test_scheduler.py)
    assert all(r.usage.energy["prefill_joules"] > 0 and r.usage.energy["decode_joules"] > 0 for r in results)


@pytest.mark.parametrize("which", ["tiny", pytest.param("default", marks=pytest.mark.default_model)])
def test_incremental_decoder_pieces_add_up_to_the_full_decode(tiny_models, which):
    import random

    from pyengine.load.default_model import ensure_default_model
    from pyengine.load.tokenizer import IncrementalDecoder, Tokenizer

    tokenizer = Tokenizer.from_folder(tiny_models["llama"] if which == "tiny" else ensure_default_model())
    rng = random.Random(0)
    sequences = [tokenizer.encode("Héllo wörld, ünïcödé 日本語のテキスト 🙂 and   spaces\n\ttabs. " * 3)]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(100)]
    for ids in sequences:
        decoder = IncrementalDecoder(tokenizer)
        text = "".join(decoder.push(i) for i in ids)
        full = tokenizer.decode(ids)
        # Everything is emitted, except a trailing incomplete character, which waits for more ids.
        assert text == full or (full.endswith("\ufffd") and full.startswith(text)), ids


@pytest.mark.parametrize("backend", ["torch", "fused", "fused-int8", "fused-bf16"])
def test_batch_with_an_early_stop_matches_single_runs(tiny_models, backend):
    # One sequence stops after a few tokens; the others must go on exactly as they would alone
    # (the finished one's cache position stays put while the batch keeps stepping).
    engine = pyengine.load(tiny_models["llama"], backend=backend)
    prompts = ["Once upon a time", "The capital of France is", "Energy per token"]
    free = [engine.generate(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    stop_id = free[0].token_ids[2]
    alone = [engine.generate(p, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]) for p in prompts]
    batch = engine.generate(prompts, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    assert batch[0].finish_reason == "stop" and len(batch[0].token_ids) <= 3
    assert any(len(r.token_ids) > len(batch[0].token_ids) for r in batch[1:])
    for b, a in zip(batch, alone):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
