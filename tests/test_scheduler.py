"""The scheduler: requests joining one running batch at any step, each with its own settings; the KV
budget and queue; cancellation; per-request joules under batching; bad input at the engine's door."""
import asyncio
import gc
import random
import threading
import time

import pytest

import pyengine
from conftest import isa_params
from pyengine.kernels import ops
from pyengine.energy import ReplayMeter

PROMPTS = ["The capital of France is", "Once upon a time there was", "Energy per token is measured in joules",
           "The quick brown fox", "int8 weights are a quarter", "numbers 0123456789 and more numbers",
           "Paris.", "a small language model that liked numbers"]
# Longer prompts (tens of tokens), so that a prompt prefilled while others decode is cut into chunks.
LONG_PROMPTS = [" ".join(random.Random(i).choices(" ".join(PROMPTS).split(), k=random.Random(i).randint(12, 40)))
                for i in range(8)]


def _record_steps(engine):
    """The scheduler's steps as (kind, [requests]), recorded by its on_step hook."""
    steps = []
    engine.scheduler.on_step = lambda kind, seconds, reqs: steps.append((kind, list(reqs)))
    return steps


def _joined_mid_flight(engine, prompts, new_tokens, rng, **settings):
    """A driver stream runs; each other prompt is submitted from its own thread after a random number
    of the driver's pieces. Returns the results in prompt order (driver's text first)."""
    results = [None] * len(prompts)

    def worker(i):
        try:
            results[i] = engine.generate(prompts[i], max_new_tokens=new_tokens, ignore_eos=True, **settings)
        except Exception as e:  # reported by the caller's comparison
            results[i] = e

    starts = sorted(rng.sample(range(1, new_tokens - 4), len(prompts) - 1))
    threads = []
    driver = engine.stream(prompts[0], max_new_tokens=new_tokens + 16, ignore_eos=True, **settings)
    pieces = []
    for n, piece in enumerate(driver):
        pieces.append(piece)
        while starts and n >= starts[0]:
            starts.pop(0)
            threads.append(threading.Thread(target=worker, args=(len(threads) + 1,)))
            threads[-1].start()
    while len(threads) < len(prompts) - 1:  # a driver whose tokens made fewer pieces (partial UTF-8)
        threads.append(threading.Thread(target=worker, args=(len(threads) + 1,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=120)
    results[0] = "".join(pieces)
    return results


def _backend_isa_params():
    params = [pytest.param("torch", None, id="torch")]
    for backend in ("fused", "fused-int8", "fused-bf16"):
        for p in isa_params():
            params.append(pytest.param(backend, *p.values, marks=p.marks, id=f"{backend}-{p.values[0]}"))
    return params


@pytest.mark.parametrize("backend, isa", _backend_isa_params())
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_tokens_are_the_same_alone_and_joined_mid_flight(tiny_models, backend, isa, arch):
    engine = pyengine.load(tiny_models[arch], backend=backend, progress=False, max_batch=4, prefill_chunk=5)
    try:
        with (ops.use_isa(isa) if isa else _nothing()):
            rng = random.Random(f"{backend}{isa}{arch}")
            prompts = rng.sample(LONG_PROMPTS, 6)
            alone = [engine.generate(p, max_new_tokens=24, ignore_eos=True) for p in prompts]
            driver_alone = engine.generate(prompts[0], max_new_tokens=40, ignore_eos=True).text
            steps = _record_steps(engine)
            # Chunks of at most prefill_chunk tokens while joining: the scheduler sizes them from measured
            # speeds, and on a busy host a stretched decode step makes that budget cover whole prompts.
            sched = engine.scheduler
            sized = sched._prefill_chunk
            sched._prefill_chunk = lambda r, n: sized(r, min(n, sched.prefill_chunk))
            try:
                joined = _joined_mid_flight(engine, prompts, 24, rng)
            finally:
                del sched._prefill_chunk
        assert joined[0] == driver_alone
        for a, j in zip(alone[1:], joined[1:]):
            assert not isinstance(j, Exception), j
            assert j.token_ids == a.token_ids and j.text == a.text
        assert max(len(ids) for kind, ids in steps if kind == "decode") > 1, "no request ever shared a step"
        chunked = {id(r) for kind, reqs in steps if kind == "prefill" for r in reqs}
        assert sum(kind == "prefill" for kind, _ in steps) > len(chunked), "no prompt was prefilled in chunks"
        assert max(len(ids) for kind, ids in steps if kind == "decode") <= 4  # max_batch
    finally:
        engine.close()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=4, prefill_chunk=8)
    yield e
    e.close()


def test_each_request_keeps_its_own_settings_in_a_shared_batch(engine):
    settings = [dict(temperature=0.9, top_k=40, seed=5), dict(temperature=1.2, top_p=0.8, seed=11), {},
                dict(stop=["the"]), dict(stop_token_ids=[7, 9])]
    prompts = PROMPTS[:5]
    alone = [engine.generate(p, max_new_tokens=20, ignore_eos=True, **s) for p, s in zip(prompts, settings)]
    out = [None] * 5

    def worker(i):
        out[i] = engine.generate(prompts[i], max_new_tokens=20, ignore_eos=True, **settings[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for a, b in zip(alone, out):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)


def test_a_list_is_several_requests_decoded_as_one_batch(engine):
    alone = [engine.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in LONG_PROMPTS[:4]]
    steps = _record_steps(engine)
    assert [r.token_ids for r in engine.generate(LONG_PROMPTS[:4], max_new_tokens=12, ignore_eos=True)] == alone
    # prompts prefilled first (whole: nothing decodes meanwhile), then 11 steps with all four rows
    assert [kind for kind, _ in steps] == ["prefill"] * 4 + ["decode"] * 11
    assert all(len(reqs) == 4 for kind, reqs in steps if kind == "decode")


def test_a_paused_reader_holds_up_nobody(engine):
    it = engine.stream("The quick brown fox", max_new_tokens=30, ignore_eos=True)
    first = next(it)
    r = engine.generate("fox", max_new_tokens=5, ignore_eos=True)  # answered while the stream is paused
    assert len(r.token_ids) == 5
    rest = "".join(it)
    assert first + rest == engine.generate("The quick brown fox", max_new_tokens=30, ignore_eos=True).text


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_closed_or_dropped_stream_frees_its_place(tiny_models, how):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=1)
    try:
        steps = _record_steps(engine)
        it = engine.stream("The quick brown fox", max_new_tokens=200, ignore_eos=True)
        next(it)
        stream_request = steps[0][1][0]
        if how == "close":
            it.close()
        else:
            del it
            gc.collect()
        assert len(engine.generate("fox", max_new_tokens=4, ignore_eos=True).token_ids) == 4
        stream_steps = sum(stream_request in reqs for _, reqs in steps)
        assert stream_steps < 50  # it stopped, far short of its 200 tokens
        assert engine.scheduler.stats()["running"] == 0
    finally:
        engine.close()


def test_deadline_ends_a_request_within_a_step(tiny_models):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=1)
    try:
        long = threading.Thread(target=engine.generate, args=("fox",), kwargs=dict(max_new_tokens=200, ignore_eos=True))
        long.start()
        r = engine.generate("The capital", max_new_tokens=200, ignore_eos=True, timeout=0.001)  # waits behind it
        assert r.finish_reason == "timeout" and r.token_ids == []
        long.join(timeout=60)
        t0 = time.perf_counter()
        engine.generate("The capital", max_new_tokens=240, ignore_eos=True)
        full = time.perf_counter() - t0
        r = engine.generate("The capital", max_new_tokens=240, ignore_eos=True, timeout=full / 4)
        assert r.finish_reason == "timeout" and 0 < len(r.token_ids) < 240
    finally:
        engine.close()


def test_overload_refuses_new_requests_and_hurts_nothing_running(tiny_models):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=1, queue_limit=2)
    try:
        expected = engine.generate("The quick brown fox", max_new_tokens=40, ignore_eos=True).text
        running = engine.stream("The quick brown fox", max_new_tokens=40, ignore_eos=True)
        first = next(running)  # admitted and decoding
        waiting = [engine.stream("fox", max_new_tokens=3, ignore_eos=True) for _ in range(2)]
        with pytest.raises(pyengine.Overloaded, match="queue limit is 2"):
            engine.generate("one too many", max_new_tokens=3)
        assert first + "".join(running) == expected
        assert all(len("".join(w)) > 0 for w in waiting)
        assert engine.scheduler.stats()["waiting"] == 0
    finally:
        engine.close()


def test_a_list_longer_than_the_queue_limit_is_one_submission_fed_as_places_free(tiny_models):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=2, queue_limit=1)
    try:
        steps = _record_steps(engine)
        prompts = LONG_PROMPTS[:6]
        alone = [engine.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
        steps.clear()
        results = engine.generate(prompts, max_new_tokens=6, ignore_eos=True)  # 6 > queue_limit, idle engine
        assert [r.token_ids for r in results] == alone
        assert max(len(reqs) for kind, reqs in steps if kind == "decode") == 2  # two places, fed in turn
        # while that list waits it is one submission: the next caller is refused, not a seventh prompt
        # (the scheduler is held at a decode step meanwhile, so the list is all still waiting)
        gate = threading.Event()
        engine.scheduler.on_step = lambda kind, seconds, reqs: gate.wait(60)
        running = engine.stream("The quick brown fox", max_new_tokens=40, ignore_eos=True)
        waiting = threading.Thread(target=engine.generate, args=(prompts,), kwargs=dict(max_new_tokens=2))
        deadline = time.monotonic() + 30
        while not engine.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.001)  # until the stream is prefilled (its first piece may be held: partial UTF-8)
        waiting.start()
        while engine.scheduler.stats()["waiting"] < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            with pytest.raises(pyengine.Overloaded, match="1 submissions are waiting and the queue limit is 1"):
                engine.generate("fox", max_new_tokens=2)
        finally:
            gate.set()
        "".join(running)
        waiting.join(timeout=60)
        with pytest.raises(ValueError, match="queue_limit must be a positive integer"):
            pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, queue_limit=0).scheduler
    finally:
        engine.close()


def test_kv_budget_bounds_the_batch_and_never_shortens_a_request(tiny_models):
    probe = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False)
    per_token = probe.scheduler.bytes_per_token
    probe.close()
    # Room for two requests of (prompt + 30) tokens at once.
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=8,
                           kv_budget=2 * 40 * per_token)
    try:
        steps = _record_steps(engine)
        results = engine.generate(["The quick brown fox"] * 5, max_new_tokens=30, ignore_eos=True)
        assert all(len(r.token_ids) == 30 for r in results)  # full answers, one pair at a time
        assert max(len(ids) for kind, ids in steps if kind == "decode") == 2
        assert engine.scheduler.stats()["kv_bytes"] == 0  # nothing kept once done
        with pytest.raises(ValueError, match="kv_budget"):
            engine.generate("fox", max_new_tokens=200)
    finally:
        engine.close()


def test_per_request_joules_split_each_step_and_add_up(tiny_models):
    # The counter rises 1 J per read; the scheduler reads once per step, so each prefill chunk is
    # worth 1 J to its request and each decode step 1 J split among its rows.
    meter = ReplayMeter({"cpu": range(10**6)})
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=3, prefill_chunk=4)
    try:
        steps = _record_steps(engine)
        rng = random.Random(3)
        results = _joined_mid_flight(engine, LONG_PROMPTS[:5], 20, rng, measure_energy=meter)
        scheduler = engine.scheduler
        expected = {}
        for kind, reqs in steps:
            for r in reqs:
                expected[r] = expected.get(r, 0.0) + (1.0 if kind == "prefill" else 1.0 / len(reqs))
        assert len(expected) == 5 and max(len(reqs) for _, reqs in steps) == 3  # they did share steps
        for r, joules in expected.items():
            e = r.result.usage.energy
            assert e["source"] == "replay"
            assert e["joules"] == pytest.approx(joules, abs=1e-9)
            assert e["joules"] == pytest.approx(e["prefill_joules"] + e["decode_joules"])
            assert e["joules_per_token"] == pytest.approx(e["joules"] / len(r.result.token_ids))
            assert e["prefill_joules"] == sum(kind == "prefill" and r in reqs for kind, reqs in steps)  # 1 J a chunk
        assert results[1].usage.energy is not None
        # every step's joule went to requests, none lost or counted twice
        assert sum(expected.values()) == pytest.approx(len(steps)) == pytest.approx(scheduler.attributed_joules)
    finally:
        engine.close()


def test_async_forms_share_the_batch(engine):
    alone = [engine.generate(p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS[:4]]

    async def main():
        results = await asyncio.gather(*(engine.agenerate(p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS[:4]))
        pieces = [piece async for piece in engine.astream(PROMPTS[0], max_new_tokens=10, ignore_eos=True)]
        stream = engine.astream(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
        await stream.__anext__()
        await stream.aclose()  # cancels: the next request is answered at once
        short = await asyncio.wait_for(engine.agenerate("fox", max_new_tokens=3, ignore_eos=True), 30)
        return results, "".join(pieces), short

    results, text, short = asyncio.run(main())
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert text == alone[0].text and len(short.token_ids) == 3


@pytest.mark.parametrize("call, error, message", [
    (lambda e: e.generate(123), TypeError, "prompt must be a string"),
    (lambda e: e.generate(b"hi"), TypeError, "prompt must be a string.*bytes"),
    (lambda e: e.generate(["ok", 5]), TypeError, "prompt must be a string.*int"),
    (lambda e: e.generate("a \ud800 b"), ValueError, "prompt: not valid Unicode"),
    (lambda e: e.generate(messages=[{"role": "user", "content": 3}]), TypeError, "content"),
    (lambda e: e.logits([[1.0, 2.5]]), TypeError, "input_ids must hold integer"),
    (lambda e: e.logits(__import__("torch").tensor([[1.0, 2.0]])), TypeError, "input_ids must hold integer"),
    (lambda e: e.generate("hi", temperature=float("inf")), ValueError, "temperature"),
    (lambda e: e.generate("hi", temperature=float("nan")), ValueError, "temperature"),
    (lambda e: e.generate("hi", seed="7"), TypeError, "seed"),
    (lambda e: e.generate("hi", seed=2**64), ValueError, "seed must be from"),
    (lambda e: e.generate(["hi", "fox"], seed=2**64 - 1), ValueError, "seed must be from"),
    (lambda e: e.generate("hi", stop=5), ValueError, "stop"),
    (lambda e: e.generate("hi", timeout=-1), ValueError, "timeout"),
    (lambda e: e.generate("hi", top_k=True), ValueError, "top_k"),
    (lambda e: e.generate("hi", measure_energy="rapl"), TypeError, "measure_energy must be True, False or a"),
])
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(engine, call, error, message):
    with pytest.raises(error, match=message):
        call(engine)
    assert len(engine.generate("fox", max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_memory_does_not_grow_with_requests_served(engine):
    from pyengine.runtime.kv_cache import KVCache

    gc.collect()
    gc.disable()  # finished requests must free their KV by reference counting, not wait for a collection
    try:
        for _ in range(3):
            engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        threads = [threading.Thread(target=engine.generate, args=(p,), kwargs=dict(max_new_tokens=6)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(isinstance(o, KVCache) for o in gc.get_objects()) <= 1  # at most the batch's, until regroup
    finally:
        gc.enable()
    deadline = time.monotonic() + 10
    while engine.scheduler._batch is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the finished rows leave the batch tensor at the scheduler's next iteration
    assert engine.scheduler._batch is None and engine.scheduler.stats()["kv_bytes"] == 0


@pytest.mark.default_model
@pytest.mark.parametrize("backend", ["fused-int8", "fused"])
def test_default_model_greedy_tokens_alone_and_joined(backend):
    """The default model: chat prompts of ~35 tokens, cut into 32-token chunks when they arrive while
    others decode, whole when alone; the same tokens either way."""
    engine = pyengine.load("default", backend=backend, progress=False, max_batch=4)
    try:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}])
                   for t in ("the sea", "bread", "the moon", "a violin", "rain")]
        alone = [engine.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
        driver_alone = engine.generate(prompts[0], max_new_tokens=32, ignore_eos=True).text
        steps = _record_steps(engine)
        joined = _joined_mid_flight(engine, prompts, 16, random.Random(1))
        assert joined[0] == driver_alone
        assert [j.token_ids for j in joined[1:]] == [a.token_ids for a in alone[1:]]
        assert sum(kind == "prefill" for kind, _ in steps) > len(prompts)  # some prompt was cut into chunks
    finally:
        engine.close()


def test_an_idle_engine_holds_no_thread_and_can_be_freed(tiny_models, monkeypatch):
    import weakref

    from pyengine.runtime import scheduler

    monkeypatch.setattr(scheduler, "IDLE_EXIT_S", 0.05)
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False)
    assert len(engine.generate("fox", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    thread = engine.scheduler._thread
    if thread is not None:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert len(engine.generate("fox", max_new_tokens=3, ignore_eos=True).token_ids) == 3  # a new thread serves
    thread = engine.scheduler._thread
    if thread is not None:
        thread.join(timeout=10)
    del thread
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None
