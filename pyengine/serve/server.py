"""`pyengine serve`: an OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

  POST /v1/completions, /v1/chat/completions   (stream=true: server-sent events; stream_options.include_usage)
  GET  /v1/models, /health, /metrics (Prometheus)

Every request is a request to the engine's scheduler, so concurrent HTTP requests share the running
batch. `usage` carries the request's energy (joules, J/token, prefill/decode split, source, estimate
or not, gCO2e). Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for
bad requests, 429 when the queue is full.

A request may carry `timeout` (seconds, an extension like vLLM's `ignore_eos`; with the openai client,
`extra_body={"timeout": 30}`): past it the request ends within one engine step and frees its place, and
the answer so far comes back with finish_reason "timeout" (a final event when streaming). A 200, not an
error status: the openai client retries 408 and 5xx replies, which would run the request again.
finish_reason is the engine's: "stop", "length", "timeout" (never folded into "length", which would
pass a cut answer off as a whole one), "cancelled" (the server was stopped).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from pyengine.energy.carbon import grams_co2e
from pyengine.errors import Overloaded

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields OpenAI clients send that change nothing here (user, ...)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = None  # vLLM's extension; -1 or None: off
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extensions, sent by benchmark clients
    min_tokens: int = Field(0, ge=0)
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: Optional[dict[str, float]] = None  # refused unless empty: it would change the tokens
    timeout: Optional[float] = Field(None, gt=0.0, allow_inf_nan=False)  # seconds, see the module docstring


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    # refused unless at their defaults: they would change the answer, not just how it is made
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict]]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[dict] = None  # only {"type": "text"}: no JSON mode here


class Metrics:
    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pyengine_requests", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("pyengine_tokens", "Tokens processed", ["kind"], registry=r)
        self.ttft = Histogram("pyengine_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=TIME_BUCKETS)
        self.tbt = Histogram("pyengine_time_between_tokens_seconds", "Between consecutive tokens of a request",
                             registry=r, buckets=TIME_BUCKETS)
        self.queue_time = Histogram("pyengine_queue_seconds", "Waiting for a place in the batch", registry=r,
                                    buckets=TIME_BUCKETS)
        self.joules = Counter("pyengine_energy_joules", "Joules attributed to requests", ["source"], registry=r)
        self.co2 = Counter("pyengine_co2e_grams", "gCO2e of the joules attributed to requests", ["source"], registry=r)
        Gauge("pyengine_queue_depth", "Requests waiting for a place", registry=r).set_function(
            lambda: scheduler.stats()["waiting"])
        Gauge("pyengine_running_batch_size", "Requests being decoded together", registry=r).set_function(
            lambda: scheduler.stats()["running"])
        Gauge("pyengine_kv_bytes", "KV cache bytes held by the running requests", registry=r).set_function(
            lambda: scheduler.stats()["kv_bytes"])

    def finished(self, result, request):
        self.requests.labels(outcome=result.finish_reason).inc()
        self.tokens.labels(kind="prompt").inc(result.usage.prompt_tokens)
        self.tokens.labels(kind="completion").inc(result.usage.completion_tokens)
        self.queue_time.observe(result.usage.queue_seconds)
        times = request.token_times
        if times:
            self.ttft.observe(times[0] - request.t_submit)
        for a, b in zip(times, times[1:]):
            self.tbt.observe(b - a)
        e = result.usage.energy
        if e is not None:
            self.joules.labels(source=e["source"]).inc(e["joules"])
            self.co2.labels(source=e["source"]).inc(grams_co2e(e["joules"]))


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(_error_body(message, kind, param), status)


def create_app(engine, model_name: str | None = None) -> FastAPI:
    """The FastAPI app over `engine` (its scheduler's settings: max_batch, kv_budget, queue_limit)."""
    model_name = model_name or engine.model_path.name
    names = {None, model_name, engine.model_path.name, str(engine.model_path)}
    scheduler = engine.scheduler
    metrics = Metrics(scheduler)
    app = FastAPI(title="pyengine", docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        metrics.requests.labels(outcome="bad_request").inc()
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}", param=where)

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pyengine", "max_model_len": engine.config.max_context}]}

    def refused(param: str, message: str):
        metrics.requests.labels(outcome="bad_request").inc()
        return _error(400, f"{param}: {message}", param=param)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        for param, unsupported in (("echo", body.echo), ("best_of", (body.best_of or 1) > 1),
                                   ("suffix", bool(body.suffix))):
            if unsupported:
                return refused(param, "is not supported by this server")
        return await _serve(http, body, dict(prompt=body.prompt), "text_completion", body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        if body.response_format not in (None, {"type": "text"}):
            return refused("response_format", "only {\"type\": \"text\"} is supported by this server")
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                content = m.content
            else:
                kinds = [part.get("type") for part in m.content]
                if any(kind != "text" for kind in kinds):
                    other = next(kind for kind in kinds if kind != "text")
                    return refused(f"messages.{i}.content", f"only text parts are supported, got {other!r}")
                content = "".join(part.get("text", "") for part in m.content)
            messages.append({"role": m.role, "content": content})
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        return await _serve(http, body, dict(messages=messages), "chat.completion", max_tokens)

    async def _serve(http, body: _Sampling, prompt: dict, kind: str, max_tokens: int):
        if body.model not in names:
            metrics.requests.labels(outcome="bad_request").inc()
            return _error(404, f"model {body.model!r} is not served here; this server has {model_name!r}",
                          "not_found_error", "model")
        # logprobs 0 asks for the chosen tokens' logprobs (completions); false and null ask for none
        if body.logprobs is not None and body.logprobs is not False:
            return refused("logprobs", "logprobs are not supported")
        if body.logit_bias:
            return refused("logit_bias", "is not supported by this server")
        settings = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        top_k=None if body.top_k in (None, -1, 0) else body.top_k, seed=body.seed, stop=body.stop,
                        stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                        min_tokens=min(body.min_tokens, max_tokens), measure_energy=True, timeout=body.timeout)
        try:
            request = engine.astream_request(**prompt, **settings)
        except Overloaded as e:
            metrics.requests.labels(outcome="overloaded").inc()
            return _error(429, str(e), "rate_limit_error")
        except (ValueError, TypeError) as e:
            metrics.requests.labels(outcome="bad_request").inc()
            return _error(400, str(e))
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(request, rid, kind, include_usage), media_type="text/event-stream")
        pieces = asyncio.ensure_future(_drain(request))
        while not pieces.done():  # a client that hangs up cancels its request
            await asyncio.wait([pieces], timeout=0.1)
            if not pieces.done() and await http.is_disconnected():
                request.cancel()
                metrics.requests.labels(outcome="disconnected").inc()
                return Response(status_code=499)
        try:
            pieces.result()
        except Exception as e:  # the engine failed the step (a kernel error): OpenAI's shape, and keep serving
            metrics.requests.labels(outcome="error").inc()
            return _error(500, f"the engine failed while generating: {e}", "server_error")
        result = request.result
        metrics.finished(result, request)
        choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if kind == "text_completion":
            choice["text"] = result.text
        else:
            choice["message"] = {"role": "assistant", "content": result.text}
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": _usage(result)}

    async def _events(request, rid, kind, include_usage):
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

        def event(choices, usage=None):
            data = {"id": rid, "object": chunk_kind, "created": int(time.time()), "model": model_name,
                    "choices": choices}
            if usage is not None or include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def choice(text, finish=None):
            if kind == "text_completion":
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": None}

        try:
            if kind != "text_completion":
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            try:
                async for piece in request.apieces():
                    yield event([choice(piece)])
            except Exception as e:  # the engine failed the step: an error event (the openai client raises it)
                metrics.requests.labels(outcome="error").inc()
                yield f"data: {json.dumps(_error_body(f'the engine failed while generating: {e}', 'server_error'))}\n\n"
                return
            result = request.result
            metrics.finished(result, request)
            yield event([choice("", result.finish_reason)])
            if include_usage:
                yield event([], _usage(result))
            yield "data: [DONE]\n\n"
        finally:
            if request.finish_reason != "error" and (request.result is None or request.finish_reason == "cancelled"):
                request.cancel()
                metrics.requests.labels(outcome="disconnected").inc()

    return app


async def _drain(request):
    async for _ in request.apieces():
        pass


def _usage(result) -> dict:
    u = result.usage
    usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
             "total_tokens": u.prompt_tokens + u.completion_tokens}
    if u.energy is not None:
        usage["energy"] = {**u.energy, "gco2e": grams_co2e(u.energy["joules"])}
    return usage


def serve(model="default", *, backend=None, host="127.0.0.1", port=8000, max_batch=16, kv_budget=None,
          queue_limit=64, prefill_chunk=16, threads=None, log_level="info"):
    """Load the model and serve it until interrupted."""
    import uvicorn

    import pyengine
    from pyengine.kernels import ops

    if threads is not None:
        ops.set_num_threads(threads)
    engine = pyengine.load(model, backend=backend, max_batch=max_batch, kv_budget=kv_budget,
                           queue_limit=queue_limit, prefill_chunk=prefill_chunk)
    app = create_app(engine)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
