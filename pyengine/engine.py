"""The engine: load a checkpoint once, then generate, stream, or score text with it."""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from pyengine.kernels.backends import default_backend, make_backend
from pyengine.load.checkpoint import WeightReader, load_checkpoint
from pyengine.models import ARCHITECTURES
from pyengine.runtime.sampling import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    energy: dict | None = None  # joules, J/token, source... when generate(measure_energy=True)
    queue_seconds: float = 0.0  # waiting for a place in the batch (KV budget, max_batch)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": an end-of-sequence token or stop string; "length": the token budget or context
    usage: Usage
    prompt_token_ids: list[int] = field(repr=False, default_factory=list)


class Engine:
    """A loaded model. Thread- and asyncio-safe: every generate()/stream()/agenerate()/astream() call,
    from any thread or task, joins one running batch (pyengine.runtime.scheduler) at the next decode step.

    Serving settings: max_batch (rows decoded together), kv_budget (bytes of KV cache for the
    running batch; default room for max_batch requests at the full context, at most 2 GiB),
    queue_limit (waiting submissions before pyengine.Overloaded; a generate() list counts once),
    prefill_chunk (the fewest prompt tokens prefilled between two decode steps; about one decode
    step's worth are, see pyengine.runtime.scheduler)."""

    def __init__(self, model="default", *, backend: str | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, int8_weights: str | Path | None = None,
                 int8_method: str | None = None, progress: bool = True, max_batch: int = 16,
                 kv_budget: int | None = None, queue_limit: int = 256, prefill_chunk: int = 16):
        self.device = _check_device(device)
        self.dtype = dtype or torch.float32
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
        # Bad arguments fail before loading (no default backend is fused-int8).
        if backend is not None:
            make_backend(backend, device=self.device, dtype=self.dtype)
        _check_int8_options(backend, int8_weights, int8_method)
        checkpoint = load_checkpoint(model, progress=progress)
        # Without a choice: bf16 checkpoints keep their weights in bf16, others run in fp32.
        self.backend_name = backend or default_backend(self.device, checkpoint.weights.matrix_dtype())
        self.model_path: Path = checkpoint.path
        self.config = checkpoint.config
        options, self.int8_method = {}, None
        if self.backend_name == "fused-int8":
            options["preloaded"], self.int8_method = self._int8_weights(int8_weights, int8_method, progress)
        self.backend = make_backend(self.backend_name, device=self.device, dtype=self.dtype, **options)
        self.tokenizer = checkpoint.tokenizer
        reader = WeightReader(checkpoint.weights, checkpoint.path, self.dtype)
        self.model = ARCHITECTURES[self.config.arch](self.config, reader, self.backend, self.device)
        if options.get("preloaded") is not None:
            self.backend.check_all_preloaded_used()
        del checkpoint, reader  # the model holds what it needs; drop the rest of the state dict
        self.eos_token_ids = self._eos_ids()
        self._lock = threading.Lock()  # one forward pass at a time (the scheduler's steps, logits())
        self._serving = dict(max_batch=max_batch, kv_budget=kv_budget, queue_limit=queue_limit,
                             prefill_chunk=prefill_chunk)
        self._scheduler = None

    def __repr__(self):
        return (f"Engine({str(self.model_path)!r}, model_type={self.config.model_type!r}, "
                f"backend={self.backend_name!r}, device={str(self.device)!r}, dtype={self.dtype})")

    # ---- public API ----------------------------------------------------------------------------

    def generate(self, prompt=None, *, messages=None, chat: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
                 stop=None, stop_token_ids=None, ignore_eos: bool = False, stream: bool = False,
                 measure_energy=False, timeout: float | None = None, min_tokens: int = 0):
        """Generate from one prompt (returns a GenerationResult) or a list (a list of them).

        prompt: str or list of str. messages: a conversation (list of {"role", "content"}) or a list
        of them, rendered with the model's chat template; chat=True wraps plain prompts as a user turn.
        Every prompt is a request to the engine's scheduler: it shares the running batch with every
        other caller's (threads, asyncio tasks, the server). A list's prompt i is seeded with seed + i.
        stream=True returns an iterator of text pieces instead (one prompt only).
        measure_energy: True (this engine's meter, see energy_meter()) or a pyengine.energy meter.
        timeout: seconds; past it the request ends with finish_reason "timeout" (what it has so far).
        min_tokens: no end-of-sequence token or stop string ends it before this many tokens.
        Raises pyengine.Overloaded when the engine's queue is full.
        """
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                        measure_energy=measure_energy, timeout=timeout, min_tokens=min_tokens)
        if stream:
            return self.stream(prompt, messages=messages, chat=chat, **settings)
        requests, single = self._requests(prompt, messages, chat, settings)
        self.scheduler.submit(requests)
        try:
            results = [r.wait() for r in requests]
        finally:  # interrupted (KeyboardInterrupt): stop generating for nobody
            for r in requests:
                r.cancel()
        if not single:
            _batch_usage(requests)
        return results[0] if single else results

    def stream(self, prompt=None, *, messages=None, chat: bool = False, **settings) -> Iterator[str]:
        """Yield text pieces as tokens are produced (the settings of generate()). Closing or dropping
        the iterator cancels the request; a paused reader holds up nobody else."""
        requests, single = self._requests(prompt, messages, chat, settings, streaming=True)
        if not single:
            raise ValueError("stream() takes a single prompt; use generate() for a batch")
        self.scheduler.submit(requests)
        return requests[0].pieces()

    async def agenerate(self, prompt=None, *, messages=None, chat: bool = False, **settings):
        """generate() for asyncio: awaits the result(s) without blocking the event loop."""
        if settings.pop("stream", False):
            raise ValueError("agenerate() does not stream; use astream()")
        requests, single = self._requests(prompt, messages, chat, settings, loop=asyncio.get_running_loop())
        self.scheduler.submit(requests)
        try:
            for r in requests:
                async for _ in r.apieces():
                    pass
        finally:  # a cancelled task cancels its requests
            for r in requests:
                r.cancel()
        results = [r.result for r in requests]
        if not single:
            _batch_usage(requests)
        return results[0] if single else results

    async def astream(self, prompt=None, *, messages=None, chat: bool = False, **settings):
        """stream() for asyncio: an async iterator of text pieces; closing it cancels the request.
        (astream_request() also gives the GenerationResult, with usage, once the pieces are read.)"""
        request = self.astream_request(prompt, messages=messages, chat=chat, **settings)
        async for piece in request.apieces():
            yield piece

    def astream_request(self, prompt=None, *, messages=None, chat: bool = False, **settings):
        """A submitted streaming request for the running event loop: iterate `request.apieces()`, then
        read `request.result` (a GenerationResult with usage). The server uses it."""
        requests, single = self._requests(prompt, messages, chat, settings, streaming=True,
                                          loop=asyncio.get_running_loop())
        if not single:
            raise ValueError("astream() takes a single prompt")
        self.scheduler.submit(requests)
        return requests[0]

    @property
    def scheduler(self):
        """The engine's scheduler (pyengine.runtime.scheduler.Scheduler), created with the serving settings
        given to load() on first use."""
        if self._scheduler is None:
            with _ENGINES_LOCK:  # not self._lock: the scheduler holds that during its steps
                if self._scheduler is None:
                    from pyengine.runtime.scheduler import Scheduler

                    self._scheduler = Scheduler(self, **self._serving)
        return self._scheduler

    def close(self):
        """Stop the scheduler thread (requests still running end with 'cancelled')."""
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Next-token logits at every position: input_ids [batch, seq] -> [batch, seq, vocab] (fp32)."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must hold integer token ids, got a tensor of {input_ids.dtype}")
        else:
            flat = torch.as_tensor(input_ids)
            if flat.dtype.is_floating_point or flat.dtype == torch.bool:
                raise TypeError(f"input_ids must hold integer token ids, got {flat.dtype} values")
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {tuple(ids.shape)}")
        self._check_ids(ids.flatten().tolist(), "input_ids")
        if ids.shape[1] > self.config.max_context:
            raise ValueError(f"input is {ids.shape[1]} tokens; the model's context is {self.config.max_context}")
        with self._lock:
            cache = self.model.new_cache(ids.shape[0], ids.shape[1], self.dtype)
            return self.model.forward(ids, cache).float()

    def save_int8(self, path: str | Path) -> Path:
        """Save this engine's int8 weights (backend 'fused-int8'), to reload with load(..., int8_weights=path)
        and skip quantizing again."""
        if self.backend_name != "fused-int8":
            raise ValueError("save_int8 needs an engine loaded with backend='fused-int8'")
        from pyengine.quantize.int8 import save_int8

        return save_int8(self.backend.linears, self.config, path, source=self.model_path, method=self.int8_method)

    # ---- internals -----------------------------------------------------------------------------

    def _int8_weights(self, int8_weights, int8_method, progress):
        """(preloaded int8 linears or None to round at load, the method that made them)."""
        from pyengine.quantize.int8 import load_int8

        if int8_weights is not None:
            linears, method = load_int8(int8_weights, self.config)
            if int8_method is not None and int8_method != method:
                raise ValueError(f"int8_weights {str(int8_weights)!r} were made by {method!r}, not {int8_method!r}")
            return linears, method
        if int8_method == "gptq":
            from pyengine.quantize.gptq import load_or_quantize

            path = self.model_path
            # Calibration text comes from the model at its default precision, one engine at a time.
            sampler = lambda: Engine(path, progress=progress)  # noqa: E731
            return load_or_quantize(path, self.config, sampler, progress=progress), "gptq"
        return None, "absmax"

    def _prompt_texts(self, prompt, messages, chat) -> tuple[list[str], bool]:
        if messages is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or messages, not both")
            single = isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict)
            conversations = [messages] if single else messages
            if not isinstance(conversations, list) or not conversations or \
                    not all(isinstance(c, list) and c for c in conversations):
                raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
            for c in conversations:
                for m in c:
                    if isinstance(m, dict) and not isinstance(m.get("content"), str):
                        raise TypeError(f"messages: each content must be a string, got {type(m.get('content')).__name__}")
                    if isinstance(m, dict):
                        _check_text(m["content"], "messages content")
            return [self.tokenizer.apply_chat_template(c) for c in conversations], single
        if prompt is None:
            raise ValueError("a prompt (or messages) is required")
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("the list of prompts is empty")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(p).__name__}"
                                + (" in the list" if not single else ""))
            if not p:
                raise ValueError("empty prompt")
            _check_text(p, "prompt")
        if chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        return prompts, single

    def _requests(self, prompt, messages, chat, settings, *, streaming=False, loop=None):
        """Check every argument and build the scheduler's requests (one per prompt); nothing is queued yet."""
        from pyengine.runtime.scheduler import Request

        allowed = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "measure_energy", "timeout", "min_tokens"}
        unknown = set(settings) - allowed
        if unknown:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        get = settings.get
        texts, single = self._prompt_texts(prompt, messages, chat)
        max_new_tokens = get("max_new_tokens", 128)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        seed = get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        params = SamplingParams(temperature=get("temperature") or 0.0, top_k=get("top_k"),
                                top_p=1.0 if get("top_p") is None else get("top_p"), seed=seed)
        stop = get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
        if stops is None and stop is not None or not all(isinstance(s, str) and s for s in stops or []):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        extra_ids = get("stop_token_ids") or []
        if not isinstance(extra_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of token ids, got {type(extra_ids).__name__}")
        self._check_ids(extra_ids, "stop_token_ids")
        min_tokens = get("min_tokens") or 0
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_new_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_new_tokens ({max_new_tokens}), got {min_tokens!r}")
        if seed is not None and not (-2**63 <= seed and seed + len(texts) - 1 < 2**64):  # the generator's range
            raise ValueError(f"seed must be from -2**63 to 2**64 - 1 (a list's prompt i takes seed + i), got {seed!r}")
        timeout = get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        prompt_ids = [self.tokenizer.encode(t, add_special_tokens=not (messages is not None or chat)) for t in texts]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
            if len(ids) >= self.config.max_context:
                raise ValueError(f"prompt {i} is {len(ids)} tokens; the model's context is "
                                 f"{self.config.max_context} tokens (room is needed for at least one new token)")
        end_ids = set(extra_ids) | (set() if get("ignore_eos") else set(self.eos_token_ids))
        # measure_energy: True for this engine's meter, or a meter object (e.g. the bench's, so that
        # every backend is measured by the source its idle baseline came from).
        measure = get("measure_energy")
        if not (measure is None or isinstance(measure, bool) or hasattr(measure, "start")):
            raise TypeError(f"measure_energy must be True, False or a pyengine.energy meter "
                            f"(make_meter(source) for a source by name), got {measure!r}")
        meter = measure if hasattr(measure, "start") else self.energy_meter() if measure else None
        requests = []
        for i, ids in enumerate(prompt_ids):
            p = params if seed is None or single else replace(params, seed=seed + i)
            requests.append(Request(ids, params=p, max_new_tokens=max_new_tokens, stops=stops or [], end_ids=end_ids,
                                    context=self.config.max_context, tokenizer=self.tokenizer,
                                    min_tokens=min_tokens, meter=meter,
                                    timeout=timeout, streaming=streaming, loop=loop))
        if len(requests) > 1:
            for r in requests:
                r.group = tuple(requests)
        return requests, single

    def _complete(self, r) -> GenerationResult:
        """The scheduler's finished request as a GenerationResult (on request.result)."""
        t_first = r.t_first or r.t_end
        prefill_seconds, decode_seconds = t_first - (r.t_start or t_first), r.t_end - t_first
        energy = _energy_usage(r, prefill_seconds, decode_seconds) if r.meter is not None else None
        usage = Usage(prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated),
                      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                      energy=energy, queue_seconds=(r.t_start or r.t_end) - r.t_submit)
        r.result = GenerationResult(text=r.text, token_ids=list(r.generated), finish_reason=r.finish_reason,
                                    usage=usage, prompt_token_ids=r.prompt_ids)
        return r.result

    def energy_meter(self, source: str = "auto"):
        """The meter generate(measure_energy=True) uses: NVML on a GPU, RAPL on a CPU, else an estimate
        (its fallback_reason says why). Created on first use and kept."""
        if getattr(self, "_meter", None) is None:
            from pyengine.energy import make_meter

            self._meter = make_meter(source, device=self.device)
        return self._meter

    def _check_ids(self, ids, what):
        vocab = self.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]!r} is outside the vocabulary [0, {vocab})")

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        gen_config = self.model_path / "generation_config.json"
        if gen_config.is_file():
            try:
                eos = json.loads(gen_config.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError):
                eos = None
            ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        eos_text = self.tokenizer.special_tokens.get("eos_token")
        if eos_text and self.tokenizer.token_to_id(eos_text) is not None:
            ids.add(self.tokenizer.token_to_id(eos_text))
        return tuple(sorted(i for i in ids if 0 <= i < self.config.vocab_size))


def _energy_usage(r, prefill_seconds: float, decode_seconds: float) -> dict:
    """A request's usage.energy. Its prefill chunks' joules are its own; each decode step's joules are
    split equally among the requests in that step (pyengine.runtime.scheduler), so over any window the
    requests' joules add up to what the meter counted while they ran. The labels (source, method and
    constants, confidence and its reason) are the meter's, for the seconds and counter updates the
    request saw."""
    joules = r.prefill_joules + r.decode_joules
    seconds = prefill_seconds + decode_seconds
    return {
        "joules": joules,
        "prefill_joules": r.prefill_joules,
        "decode_joules": r.decode_joules,
        "joules_per_token": joules / len(r.generated) if r.generated else None,
        **r.meter.labels(seconds, r.prefill_updates + r.decode_updates, r.from_power),
        "power_estimated_joules": {d: j for d, (_, j) in r.from_power.items()},
        "counter_updates": {"prefill": r.prefill_updates, "decode": r.decode_updates},
        "seconds": seconds,
        "prefill_window_seconds": prefill_seconds,
        "decode_window_seconds": decode_seconds,
        "batch_joules": r.shared_joules,  # the whole steps this request took part in
    }


def _batch_usage(requests):
    """A list given to generate() is one batch to its caller (its prompts are prefilled, then decoded
    together): each result's seconds are the list's (first prefill start to last first token, then to
    the last token), batch_joules the list's total."""
    first = max(r.t_first or r.t_end for r in requests)
    prefill, decode = first - min(r.t_start or r.t_end for r in requests), max(r.t_end for r in requests) - first
    results = [r.result for r in requests]
    total = sum(r.usage.energy["joules"] for r in results) if results[0].usage.energy else None
    for r in results:
        r.usage.prefill_seconds, r.usage.decode_seconds = prefill, decode
        if total is not None:
            r.usage.energy["batch_joules"] = total


def _check_text(text: str, what: str):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}: not valid Unicode text ({e.reason} at index {e.start}: "
                         f"{text[e.start]!r})") from None


def _check_int8_options(backend_name, int8_weights, int8_method):
    from pyengine.quantize.int8 import METHODS

    if (int8_weights is not None or int8_method is not None) and backend_name != "fused-int8":
        raise ValueError("int8_weights and int8_method are for backend='fused-int8'")
    if int8_method is not None and int8_method not in METHODS:
        raise ValueError(f"int8_method must be one of {', '.join(METHODS)}, got {int8_method!r}")


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (expected 'cpu' or 'cuda')") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (expected 'cpu' or 'cuda')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible to torch")
    return dev


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def load(model="default", *, backend: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
         int8_weights: str | Path | None = None, int8_method: str | None = None, progress: bool = True,
         **serving) -> Engine:
    """Load a model folder (or 'default', SmolLM2-135M-Instruct) for generation.

    backend: 'torch' (reference), 'fused' (our fp32 kernels) or 'fused-int8'; default: the fastest
    exact one here. int8_weights: a file from Engine.save_int8, reused instead of quantizing again.
    int8_method ('fused-int8'): 'absmax' (default: each weight rounded alone, instant) or 'gptq'
    (rounding errors compensated over text the model samples itself: closer to fp32; about two
    minutes of CPU for the default model the first time, then read from the cache; see pyengine.quantize.gptq).
    serving: max_batch, kv_budget, queue_limit, prefill_chunk (see Engine)."""
    return Engine(model, backend=backend, device=device, dtype=dtype, int8_weights=int8_weights,
                  int8_method=int8_method, progress=progress, **serving)


def generate(prompt, model="default", *, backend: str | None = None, device: str = "cpu", dtype=None, **kwargs):
    """One-off generation; the loaded engine is cached for the next call with the same settings."""
    key = (str(model), backend, str(device), dtype)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = load(model, backend=backend, device=device, dtype=dtype)
    return engine.generate(prompt, **kwargs)
