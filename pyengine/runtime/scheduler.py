"""Iteration-level batching: requests from any thread or asyncio task share one running batch.

One background thread loops over *iterations*. Each iteration:
  1. drops cancelled requests and those past their deadline;
  2. admits waiting requests while the KV budget and `max_batch` allow (FIFO);
  3. prefills prompt tokens, oldest prompt first: while others decode, about one decode step's
     worth (the tokens the measured prefill speed does in the last step's time, at least
     `prefill_chunk`), else one whole prompt (the kernels' rows do not depend on how a prompt is
     cut, so its tokens are the same either way: tests/test_scheduler.py checks it on every backend);
  4. re-lays the batch's KV cache when requests joined or left;
  5. runs one decode step for every running request (one C++ call on the fused backends).
So a running request waits about two decode steps at most between two of its tokens, and a request joins
the batch as soon as its prompt is in the cache, and leaves it the step it finishes.

KV memory: the running batch is one [layers, rows, kv_heads, capacity, head_dim] tensor (the C++
decode step takes one contiguous cache), capacity being the longest running request's
prompt + max_new_tokens. A request is admitted only if rows x capacity x bytes per token stays
within `kv_budget`; otherwise it waits in the queue, and beyond `queue_limit` waiting submissions
(a generate() list counts once) a new one is refused with `Overloaded`. A prompt being prefilled
holds its own one-row tensor until it joins. Nothing grows with the number of requests served.

Energy (when a request asks for it): one meter window stays open; each prefill chunk's joules go to
its request and each decode step's are split equally among the step's rows, the reads shared by
consecutive steps, so the requests' joules add up to the meter's total (what the meter counts while
no request runs is kept apart as `idle_joules`). A step too short for the counter to resolve (a GPU
prefill chunk of a few ms, which the NVML counter updated every 100 ms reads as 0 J) is charged the
power read at its ends x its seconds, labelled so, and that amount comes off the step whose counter
jump includes it: the ledger runs ahead of the counter by at most the estimates since its last update.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time

import torch

from pyengine.errors import Overloaded
from pyengine.runtime.sampling import SamplingParams, sample
from pyengine.load.tokenizer import IncrementalDecoder

GREEDY = SamplingParams()
IDLE_EXIT_S = 2.0  # the loop thread ends after this long without requests


class Request:
    """One prompt's generation: settings in, tokens and text pieces out (to a thread or an event loop)."""

    def __init__(self, prompt_ids, *, params: SamplingParams, max_new_tokens: int, stops, end_ids, context: int,
                 tokenizer, min_tokens: int = 0, meter=None, timeout: float | None = None, streaming: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.prompt_ids = list(prompt_ids)
        self.params, self.max_new_tokens, self.stops, self.end_ids = params, max_new_tokens, stops, end_ids
        self.min_tokens = min_tokens  # no stop (end id or string) before this many tokens
        self.group = ()  # the other requests of its generate() list: they start decoding together
        self.context = context  # the model's: a request ends with "length" there, never earlier
        self.need = min(len(self.prompt_ids) + max_new_tokens, context)  # KV positions it can use
        self.meter, self.streaming = meter, streaming  # meter: measure this request's joules with it
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.t_submit = time.perf_counter()
        self.deadline = None if timeout is None else self.t_submit + timeout
        self.t_start = self.t_end = None
        self.token_times: list[float] = []  # perf_counter() at each token (time to first token, between tokens)
        self.prefilled = 0
        self.kv = None  # (KVCache, row) holding this request's keys and values
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer)
        self.text, self.emitted = "", 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.prefill_joules = self.decode_joules = self.shared_joules = 0.0  # shared: the whole steps it was in
        self.prefill_updates = self.decode_updates = 0  # energy counter updates seen in its steps
        # per domain: (steps, joules) of its share of the steps too short for the counter, charged from power
        self.from_power: dict[str, tuple[int, float]] = {}
        self.result = None  # set by the engine when done
        self._loop = loop
        self._out = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    # ---- the consumer's side ----------------------------------------------------------------------

    def cancel(self):
        """Stop generating: the scheduler frees this request's place at its next iteration."""
        self.cancelled = True

    def wait(self):
        for _ in self.pieces():
            pass
        return self.result

    def pieces(self):
        """Text pieces as produced (streaming requests); ends with the result set. Closing the
        generator (or dropping it) cancels the request."""
        try:
            while True:
                item = self._out.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return
        finally:
            self.cancel()

    async def apieces(self):
        try:
            while True:
                item = await self._out.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return
        finally:
            self.cancel()

    # ---- the scheduler's side ---------------------------------------------------------------------

    def _send(self, item):
        if self._loop is None:
            self._out.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    def accept(self, token: int):
        """Record a new token; send the text it completes, holding back a possible stop-string prefix."""
        self.generated.append(token)
        self.token_times.append(time.perf_counter())
        self.text += self.decoder.push(token)
        may_stop = len(self.generated) >= self.min_tokens
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1) if may_stop else -1
        if may_stop and token in self.end_ids:
            self.finish_reason = "stop"
        elif cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif len(self.prompt_ids) + len(self.generated) >= self.context or len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.streaming:
            safe = len(self.text) if self.finish_reason else len(self.text) - _stop_prefix_len(self.text, self.stops)
            if safe > self.emitted:
                self._send(self.text[self.emitted:safe])
                self.emitted = safe

    @property
    def t_first(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def cache_len(self) -> int:
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)


class Scheduler:
    def __init__(self, engine, *, max_batch: int = 16, kv_budget: int | None = None, queue_limit: int = 256,
                 prefill_chunk: int = 16):
        # queue_limit 0 would refuse every submission, even on an idle engine: each passes through the queue
        for name, value in (("max_batch", max_batch), ("queue_limit", queue_limit), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        c = engine.config
        self.engine, self.model = engine, engine.model
        self.bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * engine.dtype.itemsize
        if kv_budget is None:  # room for max_batch requests at the full context, up to 2 GiB
            kv_budget = min(max_batch * c.max_context * self.bytes_per_token, 2 << 30)
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < self.bytes_per_token:
            raise ValueError(f"kv_budget must be an integer number of bytes, at least one token's KV "
                             f"({self.bytes_per_token} bytes), got {kv_budget!r}")
        self.max_batch, self.kv_budget, self.queue_limit, self.prefill_chunk = max_batch, kv_budget, queue_limit, prefill_chunk
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []
        self._running: list[Request] = []  # rows of self._batch, in order
        self._batch = None  # KVCache of the running rows
        self._thread: threading.Thread | None = None
        self._closing = False
        # energy: the meter whose window is open, its last reading, and the ledger
        self._meter = self._window = None
        self._last_reading = None
        self._carried: dict[str, float] = {}  # joules charged from power that no counter jump has included yet
        self.attributed_joules = self.idle_joules = 0.0
        self.on_step = None  # optional callback(kind, seconds, requests) after each step (metrics, tests)
        self._prefill_rate = 0.0  # prompt tokens/s of the chunks prefilled between decode steps
        self._step_seconds = 0.0  # the last decode step's

    # ---- submitting ---------------------------------------------------------------------------------

    def submit(self, requests: list[Request]):
        """Queue one caller's requests (all or none): Overloaded when `queue_limit` submissions are
        already waiting. A list counts once, however long: its caller waits for all of it, and its
        requests are admitted as the batch frees places (nothing is held for them before that)."""
        for r in requests:
            if r.need * self.bytes_per_token > self.kv_budget:
                raise ValueError(f"the request needs {r.need} tokens of KV cache ({r.need * self.bytes_per_token} "
                                 f"bytes: prompt + max_new_tokens) and the engine's kv_budget is {self.kv_budget} "
                                 "bytes; lower max_new_tokens or raise kv_budget")
        with self._cond:
            if self._closing:
                raise RuntimeError("the engine is closed")
            waiting = len({id(r.group[0] if r.group else r) for r in self._waiting})  # a list: its first request
            if waiting >= self.queue_limit:
                raise Overloaded(f"the engine is overloaded: {waiting} submissions are waiting and the "
                                 f"queue limit is {self.queue_limit}; retry later")
            self._waiting.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pyengine-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stats(self) -> dict:
        """Requests waiting, being prefilled and decoding now; KV bytes they hold of the budget."""
        with self._cond:
            waiting = len(self._waiting)
        live = [r for r in self._admitted() if r.finish_reason is None]
        return {"waiting": waiting, "prefilling": sum(r.prefilled < len(r.prompt_ids) for r in live),
                "running": sum(r.prefilled == len(r.prompt_ids) for r in live), "kv_bytes": self._kv_bytes(live),
                "kv_budget": self.kv_budget}

    def close(self):
        """Finish the loop thread (requests still queued end with 'cancelled') and close the meter window."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._window is not None:
            self.idle_joules += self._lap().total_joules
            self._meter.stop(self._window)
            self._window = None

    # ---- the loop -----------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._prefilling or self._running):
                    if not self._cond.wait(IDLE_EXIT_S) and not (self._closing or self._waiting):
                        # Idle: end the thread, which holds the engine (a dropped engine is then freed);
                        # submit() starts a new one.
                        self._thread = None
                        return
                if self._closing:
                    self._fail_all(None)
                    return
            if self._window is not None and not (self._prefilling or self._running):
                self.idle_joules += self._lap().total_joules  # what the meter counted while nothing ran
            try:
                with self.engine._lock, torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a kernel or tokenizer error: fail what is in flight, keep serving
                self._fail_all(e)

    def _iteration(self):
        now = time.perf_counter()
        with self._cond:
            for r in list(self._waiting):
                if r.cancelled or (r.deadline is not None and now > r.deadline):
                    self._waiting.remove(r)
                    self._finish(r, "cancelled" if r.cancelled else "timeout")
            self._admit()
        for group in (self._prefilling, self._running):
            for r in list(group):
                if r.cancelled or (r.deadline is not None and now > r.deadline):
                    self._finish(r, "cancelled" if r.cancelled else "timeout")
        joined = self._prefill()
        self._regroup(joined)
        if self._running:
            self._decode_step()

    def _admitted(self) -> list[Request]:
        return self._running + self._prefilling

    def _kv_bytes(self, requests) -> int:
        return len(requests) * max((r.need for r in requests), default=0) * self.bytes_per_token

    def _admit(self):
        while self._waiting:
            r = self._waiting[0]
            admitted = [q for q in self._admitted() if q.finish_reason is None]
            if len(admitted) >= self.max_batch or self._kv_bytes(admitted + [r]) > self.kv_budget:
                return
            if r.meter is not None and r.meter is not self._meter:
                if admitted:
                    return  # another meter is measuring the requests in flight: switch once they are done
                self._use_meter(r.meter)
            self._waiting.popleft()
            r.t_start = time.perf_counter()
            r.kv = (self.model.new_cache(1, r.need, self.engine.dtype), 0)
            self._prefilling.append(r)

    def _prefill(self) -> list[Request]:
        """Prompt tokens, oldest prompt first: about one decode step's worth while requests are decoding
        (the stall those see; a chunk may end one prompt and start the next), else one whole prompt
        (nothing to stall: one large forward is faster). Returns the requests that now go on decoding:
        those whose prompt is all in the cache, once the other prompts of their group (a list given
        to generate()) that are admitted are too, so that a list decodes as one batch."""
        decoding = any(r.finish_reason is None for r in self._running)
        budget = None
        if decoding:  # about one decode step's worth of prompt tokens, at least prefill_chunk
            budget = max(self.prefill_chunk, int(self._prefill_rate * self._step_seconds))
        for r in list(self._prefilling):
            rest = len(r.prompt_ids) - r.prefilled
            if r.finish_reason is not None or rest == 0:
                continue
            self._prefill_chunk(r, rest if budget is None else min(rest, budget))
            if budget is None:
                break
            budget -= min(rest, budget)
            if budget == 0:
                break

        def unfinished(q):
            return q.finish_reason is None and q.prefilled < len(q.prompt_ids) and q in self._prefilling

        joined = [r for r in self._prefilling if r.finish_reason is None and r.prefilled == len(r.prompt_ids)
                  and not any(unfinished(q) for q in r.group)]
        for r in joined:
            self._prefilling.remove(r)
        return joined

    def _prefill_chunk(self, r: Request, n: int):
        t0 = time.perf_counter()
        cache = r.kv[0]
        tokens = torch.tensor([r.prompt_ids[r.prefilled:r.prefilled + n]], device=self.model.device)
        last = r.prefilled + n == len(r.prompt_ids)
        if last:  # the last chunk also gives the first token
            logits = self.model.forward(tokens, cache, logits_at=torch.tensor([n - 1], device=self.model.device))
        else:
            self.model.hidden_states(tokens, cache, self.model.make_step(n, cache))
        cache.lengths += n
        r.prefilled += n
        if self._running:  # the speed of the chunks that run between decode steps sizes the next ones
            rate = n / max(time.perf_counter() - t0, 1e-6)
            self._prefill_rate = rate if not self._prefill_rate else 0.5 * (self._prefill_rate + rate)
        if self._window is not None:
            self._charge([r], "prefill")
        if last:
            r.accept(int(sample(logits, r.params, r.generator)[0]))
            if r.finish_reason is not None:
                self._finish(r, r.finish_reason)
        if self.on_step is not None:
            self.on_step("prefill", time.perf_counter() - t0, [r])

    def _regroup(self, joined: list[Request]):
        """Rebuild the batch's cache when rows left or joined (one copy of the live keys and values)."""
        rows = [r for r in self._running if r.finish_reason is None] + joined
        if rows == self._running:
            return
        if not rows:
            self._running, self._batch = [], None
            return
        batch = self.model.new_cache(len(rows), max(r.need for r in rows), self.engine.dtype)
        for i, r in enumerate(rows):
            cache, row = r.kv
            n = r.cache_len
            batch.keys[:, i, :, :n] = cache.keys[:, row, :, :n]
            batch.values[:, i, :, :n] = cache.values[:, row, :, :n]
            batch.lengths[i] = n
        for i, r in enumerate(rows):
            r.kv = (batch, i)
        self._running, self._batch = rows, batch

    def _decode_step(self):
        t0 = time.perf_counter()
        rows, cache, device = self._running, self._batch, self.model.device
        tokens = torch.tensor([r.generated[-1] for r in rows], device=device)
        next_ids = None
        if all(r.params.greedy for r in rows):  # one C++ call chooses the tokens, where the backend has it
            next_ids = self.model.decode_greedy(tokens, cache, torch.ones(len(rows), dtype=torch.int32))
        if next_ids is None:
            logits = self.model.forward(tokens[:, None], cache)[:, -1]
            cache.lengths += 1
            next_ids = sample(logits, GREEDY, None)
            for i, r in enumerate(rows):  # each sampled row with its own settings and generator
                if not r.params.greedy:
                    next_ids[i] = sample(logits[i:i + 1], r.params, r.generator)[0]
        if self._window is not None:
            self._charge(rows, "decode")
        for r, token in zip(rows, next_ids.tolist()):
            r.accept(token)
            if r.finish_reason is not None:
                self._finish(r, r.finish_reason)
        self._step_seconds = time.perf_counter() - t0
        if self.on_step is not None:
            self.on_step("decode", self._step_seconds, rows)

    def _finish(self, r: Request, reason: str):
        r.finish_reason = reason
        r.t_end = time.perf_counter()
        if r in self._prefilling:
            self._prefilling.remove(r)
        # Drop its caches now (a batch row is left out at the next regroup) and its group: a finished
        # request must not keep any KV tensor alive, even until the garbage collector breaks a cycle.
        r.kv, r.group = None, ()
        self.engine._complete(r)
        r._send(r.result)

    def _fail_all(self, error):
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for r in waiting + self._prefilling + self._running:
            if r.result is None:
                if error is None:
                    self._finish(r, "cancelled")
                else:
                    r.finish_reason = "error"
                    r._send(error)
        self._prefilling, self._running, self._batch = [], [], None

    # ---- energy ---------------------------------------------------------------------------------------

    def _use_meter(self, meter):
        if self._window is not None:
            self.idle_joules += self._lap().total_joules
            self._meter.stop(self._window)
        self._meter, self._window = meter, meter.start()
        self._last_reading, self._carried = meter.reading(), {}

    def _lap(self):
        """The energy since the previous lap (consecutive laps share their reading) as a measurement of
        its own. A lap too short for the counter (no update, under two update periods: a GPU prefill
        chunk of a few ms) is charged the power read at its ends x its seconds, and that amount comes
        off the next lap whose counter jump includes it (EnergyMeter.between), so the laps add up to
        the counter once it has caught up."""
        now = self._meter.reading()
        m = self._meter.between(self._last_reading, now, self._carried)
        self._last_reading = now
        return m

    def _charge(self, rows: list[Request], phase: str):
        """Split the joules of the step just run equally among its rows (a prefill chunk has one)."""
        m = self._lap()
        j = m.total_joules
        self.attributed_joules += j
        for r in rows:
            if phase == "prefill":
                r.prefill_joules += j / len(rows)
                r.prefill_updates += m.counter_updates
            else:
                r.decode_joules += j / len(rows)
                r.decode_updates += m.counter_updates
            r.shared_joules += j
            for d in m.power_estimated:
                steps, joules = r.from_power.get(d, (0, 0.0))
                r.from_power[d] = (steps + 1, joules + m.joules[d] / len(rows))


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest
