"""The engine: load a checkpoint once, then generate, stream, or score text with it."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from pyengine.backends import default_backend, make_backend
from pyengine.loader import WeightReader, load_checkpoint
from pyengine.models import ARCHITECTURES
from pyengine.sampling import SamplingParams, sample
from pyengine.tokenizer import IncrementalDecoder


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    energy: dict | None = None  # joules, J/token, source... when generate(measure_energy=True)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": an end-of-sequence token or stop string; "length": the token budget or context
    usage: Usage
    prompt_token_ids: list[int] = field(repr=False, default_factory=list)


class Engine:
    """A loaded model. Thread-safe: concurrent calls are serialized (one forward pass at a time);
    pass a list of prompts to generate them as one batch."""

    def __init__(self, model="default", *, backend: str | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, int8_weights: str | Path | None = None,
                 int8_method: str | None = None, progress: bool = True):
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
        del checkpoint, reader  # the model holds what it needs; drop the rest of the state dict
        self.eos_token_ids = self._eos_ids()
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"Engine({str(self.model_path)!r}, model_type={self.config.model_type!r}, "
                f"backend={self.backend_name!r}, device={str(self.device)!r}, dtype={self.dtype})")

    # ---- public API ----------------------------------------------------------------------------

    def generate(self, prompt=None, *, messages=None, chat: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
                 stop=None, stop_token_ids=None, ignore_eos: bool = False, stream: bool = False,
                 measure_energy: bool = False):
        """Generate from one prompt (returns a GenerationResult) or a list (a list, run as one batch).

        prompt: str or list of str. messages: a conversation (list of {"role", "content"}) or a list
        of them, rendered with the model's chat template; chat=True wraps plain prompts as a user turn.
        stream=True returns an iterator of text pieces instead (one prompt only).
        measure_energy: True (this engine's meter, see energy_meter()) or a pyengine.energy meter.
        """
        if stream:
            return self.stream(prompt, messages=messages, chat=chat, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                               stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        texts, single = self._prompt_texts(prompt, messages, chat)
        run = self._start(texts, messages is not None or chat, max_new_tokens, temperature, top_k, top_p,
                          seed, stop, stop_token_ids, ignore_eos, measure_energy)
        for _ in run:
            pass
        results = run.results
        return results[0] if single else results

    def stream(self, prompt=None, *, messages=None, chat: bool = False, **kwargs) -> Iterator[str]:
        """Yield text pieces as tokens are produced. Stopping iteration early ends generation cleanly."""
        texts, single = self._prompt_texts(prompt, messages, chat)
        if not single:
            raise ValueError("stream() takes a single prompt; use generate() for a batch")
        kwargs.setdefault("max_new_tokens", 128)
        allowed = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        params = {k: kwargs.get(k) for k in allowed}
        params["temperature"] = params["temperature"] or 0.0
        params["top_p"] = 1.0 if params["top_p"] is None else params["top_p"]
        params["ignore_eos"] = bool(params["ignore_eos"])
        run = self._start(texts, messages is not None or chat, params["max_new_tokens"], params["temperature"],
                          params["top_k"], params["top_p"], params["seed"], params["stop"],
                          params["stop_token_ids"], params["ignore_eos"], False)
        return run.text_pieces()

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Next-token logits at every position: input_ids [batch, seq] -> [batch, seq, vocab] (fp32)."""
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
        from pyengine.quant import save_int8

        return save_int8(self.backend.linears, self.config, path, source=self.model_path, method=self.int8_method)

    # ---- internals -----------------------------------------------------------------------------

    def _int8_weights(self, int8_weights, int8_method, progress):
        """(preloaded int8 linears or None to round at load, the method that made them)."""
        from pyengine.quant import load_int8

        if int8_weights is not None:
            linears, method = load_int8(int8_weights, self.config)
            if int8_method is not None and int8_method != method:
                raise ValueError(f"int8_weights {str(int8_weights)!r} were made by {method!r}, not {int8_method!r}")
            return linears, method
        if int8_method == "gptq":
            from pyengine.gptq import load_or_quantize

            return load_or_quantize(self.model_path, self.config, progress=progress), "gptq"
        return None, "absmax"

    def _prompt_texts(self, prompt, messages, chat) -> tuple[list[str], bool]:
        if messages is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or messages, not both")
            single = bool(messages) and isinstance(messages[0], dict)
            conversations = [messages] if single else list(messages)
            if not conversations or not all(isinstance(c, list) and c for c in conversations):
                raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
            return [self.tokenizer.apply_chat_template(c) for c in conversations], single
        if prompt is None:
            raise ValueError("a prompt (or messages) is required")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("the list of prompts is empty")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"each prompt must be a string, got {type(p).__name__}")
            if not p:
                raise ValueError("empty prompt")
        if chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        return prompts, single

    def _start(self, texts, templated, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids,
               ignore_eos, measure_energy) -> "_Run":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        extra_ids = list(stop_token_ids or [])
        self._check_ids(extra_ids, "stop_token_ids")
        prompt_ids = [self.tokenizer.encode(t, add_special_tokens=not templated) for t in texts]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
            if len(ids) >= self.config.max_context:
                raise ValueError(f"prompt {i} is {len(ids)} tokens; the model's context is "
                                 f"{self.config.max_context} tokens (room is needed for at least one new token)")
        end_ids = set(extra_ids) | (set() if ignore_eos else set(self.eos_token_ids))
        # measure_energy: True for this engine's meter, or a meter object (e.g. the bench's, so that
        # every backend is measured by the source its idle baseline came from).
        meter = measure_energy if hasattr(measure_energy, "start") else self.energy_meter() if measure_energy else None
        return _Run(self, prompt_ids, max_new_tokens, params, stops, end_ids, meter)

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


class _Run:
    """One generate() call: prefill, then decode steps, as an iterator of per-step events."""

    def __init__(self, engine: Engine, prompt_ids, max_new_tokens, params, stops, end_ids, meter=None):
        self.engine, self.prompt_ids, self.max_new_tokens = engine, prompt_ids, max_new_tokens
        self.params, self.stops, self.end_ids, self.meter = params, stops, end_ids, meter
        self.results: list[GenerationResult] = []

    def text_pieces(self) -> Iterator[str]:
        """For a single sequence: text as it is produced, holding back a possible stop-string prefix."""
        emitted = 0
        for texts in self:
            text = texts[0]
            safe = len(text) - _stop_prefix_len(text, self.stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        final = self.results[0].text
        if len(final) > emitted:
            yield final[emitted:]

    @torch.inference_mode()
    def __iter__(self):
        engine, model = self.engine, self.engine.model
        B = len(self.prompt_ids)
        lengths = [len(p) for p in self.prompt_ids]
        context = engine.config.max_context
        capacity = min(max(lengths) + self.max_new_tokens, context)
        generator = None
        if self.params.seed is not None:
            generator = torch.Generator(device=engine.device).manual_seed(self.params.seed)
        generated = [[] for _ in range(B)]
        decoders = [IncrementalDecoder(engine.tokenizer) for _ in range(B)]
        texts = [""] * B
        finish = [None] * B
        active_per_step = []  # which sequences each decode step computed for (energy attribution)
        with engine._lock:
            if self.meter is not None:
                self.meter.start("prefill")
            t0 = time.perf_counter()
            cache = model.new_cache(B, capacity, engine.dtype)
            tokens = torch.zeros(B, max(lengths), dtype=torch.long, device=engine.device)
            for b, ids in enumerate(self.prompt_ids):
                tokens[b, :len(ids)] = torch.tensor(ids)
            last = torch.tensor(lengths, device=engine.device) - 1
            logits = model.forward(tokens, cache, logits_at=last, n_new=torch.tensor(lengths, dtype=torch.int32))
            cache.lengths += torch.tensor(lengths, dtype=torch.int32, device=engine.device)
            next_ids = sample(logits, self.params, generator)
            prefill_seconds = time.perf_counter() - t0
            if self.meter is not None:
                prefill_energy = self.meter.stop()
                self.meter.start("decode")
            t1 = time.perf_counter()
            active = torch.ones(B, dtype=torch.int32, device=engine.device)  # rebuilt only when one finishes
            for step in range(self.max_new_tokens):
                ids = next_ids.tolist()
                for b in range(B):
                    if finish[b] is not None:
                        continue
                    generated[b].append(ids[b])
                    texts[b] += decoders[b].push(ids[b])
                    finish[b] = self._finished(b, ids[b], texts, generated[b], lengths[b], context)
                    if finish[b] is not None:
                        active = torch.tensor([f is None for f in finish], dtype=torch.int32, device=engine.device)
                yield texts
                if all(f is not None for f in finish) or step == self.max_new_tokens - 1:
                    break
                active_per_step.append([b for b in range(B) if finish[b] is None])
                # Finished sequences stay put (advance 0) and rewrite their last slot.
                stepped = model.decode_greedy(next_ids, cache, active) if self.params.greedy else None
                if stepped is not None:  # the C++ step chose the tokens: one call per token
                    next_ids = stepped
                else:
                    logits = model.forward(next_ids[:, None], cache)[:, -1]
                    cache.lengths += active
                    next_ids = sample(logits, self.params, generator)
            decode_seconds = time.perf_counter() - t1
            energy = None
            if self.meter is not None:
                energy = _attribute_energy(prefill_energy, self.meter.stop(), active_per_step, lengths, generated)
        for b in range(B):
            usage = Usage(prompt_tokens=lengths[b], completion_tokens=len(generated[b]),
                          prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                          energy=energy[b] if energy else None)
            self.results.append(GenerationResult(text=texts[b], token_ids=generated[b],
                                                 finish_reason=finish[b] or "length", usage=usage,
                                                 prompt_token_ids=self.prompt_ids[b]))

    def _finished(self, b, token, texts, generated, prompt_len, context):
        if token in self.end_ids:
            return "stop"
        for s in self.stops:
            cut = texts[b].find(s)
            if cut >= 0:
                texts[b] = texts[b][:cut]
                return "stop"
        if prompt_len + len(generated) >= context:
            return "length"
        return None


def _attribute_energy(prefill, decode, active_per_step, prompt_lengths, generated) -> list[dict]:
    """Each sequence's share of a batch's energy.

    Rule: prefill energy is split in proportion to prompt tokens; decode energy is spread evenly
    over the decode steps (one window covers them all, since a counter read per step would cost
    more than the step on small models), and each step's share is split equally among the
    sequences still generating in it. The shares add up to the measured total.
    """
    from pyengine.energy import attribute_batch

    steps = max(len(active_per_step), 1)
    per_step = decode.total_joules / steps
    decode_steps = [(per_step, active) for active in active_per_step] or [(decode.total_joules, range(len(prompt_lengths)))]
    prefill_shares = attribute_batch(prefill, [], prompt_lengths)
    decode_shares = attribute_batch(0.0, decode_steps, prompt_lengths)
    both = prefill + decode  # labels of the two windows together (confidence, reasons, constants)
    labels = {
        "source": both.source,
        "estimated": both.estimated,
        "method": both.method,
        "constants": dict(both.constants),
        "sources": dict(both.sources),
        "confidence": both.confidence,
        "confidence_reason": both.confidence_reason,
        "counter_updates": {"prefill": prefill.counter_updates, "decode": decode.counter_updates},
        "power_estimated": list(both.power_estimated),
        "seconds": both.seconds,
        "prefill_window_seconds": prefill.seconds,
        "decode_window_seconds": decode.seconds,
        "batch_joules": both.total_joules,
        "fallback_reason": both.fallback_reason,
    }
    out = []
    for b, ids in enumerate(generated):
        joules = prefill_shares[b] + decode_shares[b]
        out.append({
            "joules": joules,
            "prefill_joules": prefill_shares[b],
            "decode_joules": decode_shares[b],
            "joules_per_token": joules / len(ids) if ids else None,
            **labels,
        })
    return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


def _check_int8_options(backend_name, int8_weights, int8_method):
    from pyengine.quant import METHODS

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
         int8_weights: str | Path | None = None, int8_method: str | None = None, progress: bool = True) -> Engine:
    """Load a model folder (or 'default', SmolLM2-135M-Instruct) for generation.

    backend: 'torch' (reference), 'fused' (our fp32 kernels) or 'fused-int8'; default: the fastest
    exact one here. int8_weights: a file from Engine.save_int8, reused instead of quantizing again.
    int8_method ('fused-int8'): 'absmax' (default: each weight rounded alone, instant) or 'gptq'
    (rounding errors compensated over text the model samples itself: closer to fp32; about two
    minutes of CPU for the default model the first time, then read from the cache; see pyengine.gptq)."""
    return Engine(model, backend=backend, device=device, dtype=dtype, int8_weights=int8_weights,
                  int8_method=int8_method, progress=progress)


def generate(prompt, model="default", *, backend: str | None = None, device: str = "cpu", dtype=None, **kwargs):
    """One-off generation; the loaded engine is cached for the next call with the same settings."""
    key = (str(model), backend, str(device), dtype)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = load(model, backend=backend, device=device, dtype=dtype)
    return engine.generate(prompt, **kwargs)
