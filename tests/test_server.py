"""`pyengine serve`: a real uvicorn server on 127.0.0.1, driven by the official openai client and by
raw HTTP (errors, a client hanging up mid-stream, overload)."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import pyengine
from pyengine.serve.server import create_app


@contextlib.contextmanager
def running_server(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def slow_steps(engine, seconds):
    """Each scheduler step takes at least `seconds` (a tiny model decodes in microseconds; this gives
    a client time to hang up mid-stream, and requests time to pile up)."""
    engine.scheduler.on_step = lambda kind, s, reqs: time.sleep(seconds)


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def url(engine):
    with running_server(engine) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


ENERGY_KEYS = {"joules", "joules_per_token", "prefill_joules", "decode_joules", "source", "estimated", "gco2e"}


def test_completion_matches_the_engine_and_carries_energy(engine, client):
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    expected = engine.generate("The capital of France is", max_new_tokens=12, ignore_eos=True)
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == expected.usage.prompt_tokens
    energy = r.usage.model_extra["energy"]
    assert ENERGY_KEYS <= set(energy) and energy["joules"] > 0
    assert energy["joules_per_token"] == pytest.approx(energy["joules"] / 12)


def test_chat_streaming_with_usage_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Tell me about the fox"}]
    full = client.chat.completions.create(model="llama", messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == full.choices[0].message.content and finish == "length"
    assert usage.completion_tokens == 16 and ENERGY_KEYS <= set(usage.model_extra["energy"])


def test_completion_stream_and_min_tokens(client):
    chunks = list(client.completions.create(model="llama", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, extra_body={"min_tokens": 10}))
    assert sum(len(c.choices[0].text) for c in chunks if c.choices) > 0
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_clients_share_the_batch(engine, url):
    steps = []
    engine.scheduler.on_step = lambda kind, s, reqs: steps.append(len(reqs))

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        return await asyncio.gather(*(client.completions.create(
            model="llama", prompt=f"Story {i}:", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            for i in range(4)))

    try:
        results = asyncio.run(main())
    finally:
        engine.scheduler.on_step = None
    assert [r.usage.completion_tokens for r in results] == [40] * 4
    assert max(steps) > 1


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "context"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", b'{"prompt": "a \\ud800 b"}', 400, "Unicode"),  # a lone surrogate
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "not served"),
    ("/v1/completions", {"prompt": "hi", "timeout": 0}, 400, "timeout"),
    ("/v1/completions", {"prompt": "hi", "timeout": "soon"}, 400, "timeout"),
    ("/v1/completions", b'{"prompt": "hi", "timeout": Infinity}', 400, "timeout"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed must be from"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 0}, 400, "logprobs"),  # 0: the chosen tokens' logprobs
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "the end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "timeout": -1}, 400, "timeout"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "only text parts"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message.lower() in error["message"].lower() and error["type"]
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_client_that_hangs_up_mid_stream_frees_its_place(engine, url):
    slow_steps(engine, 0.01)
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 240, "stream": True, "ignore_eos": True,
                "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["text"] is not None
        # hung up after the first event: its place is free within a few steps, far from 240 tokens
        deadline = time.monotonic() + 1.0
        while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json()["running"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert 'pyengine_requests_total{outcome="disconnected"}' in metrics
    finally:
        engine.scheduler.on_step = None


def _record_steps_slowly(engine, seconds):
    """slow_steps(), recording (time the step ended, its requests)."""
    steps = []

    def on_step(kind, s, reqs):
        steps.append((time.perf_counter(), list(reqs)))
        time.sleep(seconds)

    engine.scheduler.on_step = on_step
    return steps


def test_a_request_past_its_timeout_ends_within_a_step_and_says_so(engine, url, client):
    steps = _record_steps_slowly(engine, 0.02)
    try:
        t0 = time.perf_counter()
        r = client.completions.create(model="llama", prompt="The quick brown fox", max_tokens=240, temperature=0,
                                      extra_body={"ignore_eos": True, "timeout": 0.3})
        assert r.choices[0].finish_reason == "timeout" and 0 < r.usage.completion_tokens < 240
        assert time.perf_counter() - t0 < 0.3 + 5.0
        request = steps[0][1][0]
        after = [t for t, reqs in steps if request in reqs and t > request.deadline]
        assert len(after) <= 1  # the step under way when the deadline passed, then its place is free
        health = httpx.get(url + "/health").json()
        assert health["running"] == health["prefilling"] == 0 and health["kv_bytes"] == 0
        assert r.choices[0].text == engine.generate("The quick brown fox", max_new_tokens=r.usage.completion_tokens,
                                                    ignore_eos=True).text  # what it had, not cut further

        # streaming, chat: the final event says timeout; raw HTTP sees the same
        stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Tell a story"}],
                                                max_tokens=240, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True, "timeout": 0.3})
        finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finishes == ["timeout"]
        body = {"prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "timeout": 0.2, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
            events = [json.loads(line[5:]) for line in reply.iter_lines()
                      if line.startswith("data:") and line != "data: [DONE]"]
        assert events[-1]["choices"][0]["finish_reason"] == "timeout"
        metrics = httpx.get(url + "/metrics").text
        assert 'pyengine_requests_total{outcome="timeout"}' in metrics
    finally:
        engine.scheduler.on_step = None


def test_an_engine_failure_is_an_openai_error_and_the_server_keeps_serving(engine, url, client, monkeypatch):
    def failing_step(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(engine.model, "decode_greedy", failing_step)
    with pytest.raises(openai.InternalServerError, match="injected kernel failure"):
        client.completions.create(model="llama", prompt="fox", max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match="injected kernel failure"):
        list(stream)
    monkeypatch.undo()
    ok = client.completions.create(model="llama", prompt="fox", max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 4
    metrics = httpx.get(url + "/metrics").text
    assert 'pyengine_requests_total{outcome="error"} 2.0' in metrics


def test_overload_is_refused_with_429_and_answers_the_rest(tiny_models):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False, max_batch=2, queue_limit=3)
    slow_steps(engine, 0.005)
    try:
        with running_server(engine) as base:
            async def main():
                health = []
                async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                    async def one(i):
                        return await http.post("/v1/completions", json={
                            "prompt": f"Request {i}", "max_tokens": 30, "ignore_eos": True, "temperature": 0})

                    async def poll():
                        for _ in range(10):
                            health.append((await http.get("/health")).status_code)
                            await asyncio.sleep(0.02)

                    *replies, _ = await asyncio.gather(*(one(i) for i in range(12)), poll())
                return replies, health

            replies, health = asyncio.run(main())
            codes = [r.status_code for r in replies]
            assert set(codes) == {200, 429} and codes.count(200) >= 3  # at least the queue's worth
            for r in replies:
                if r.status_code == 200:
                    assert r.json()["usage"]["completion_tokens"] == 30
                else:
                    assert "queue limit is 3" in r.json()["error"]["message"]
            assert health == [200] * 10
            metrics = httpx.get(base + "/metrics").text
            assert 'pyengine_requests_total{outcome="overloaded"}' in metrics
            for name in ("pyengine_time_to_first_token_seconds_bucket", "pyengine_time_between_tokens_seconds_count",
                         "pyengine_queue_depth", "pyengine_running_batch_size", "pyengine_energy_joules_total",
                         "pyengine_co2e_grams_total", 'pyengine_tokens_total{kind="completion"}'):
                assert name in metrics
    finally:
        engine.close()
