"""The one interface over every energy source: a meter of channels, read in windows.

A meter owns *channels*. A channel is one hardware reading of one domain:

* a ``"counter"`` channel returns a cumulative value in native units (RAPL microjoules, NVML
  millijoules, process CPU seconds for the estimate); ``scale`` turns a delta into joules, and
  ``wrap`` (the counter's range, or None) turns a reading lower than the previous one into one
  wraparound;
* a ``"power"`` channel returns watts now; the meter integrates successive readings with the
  trapezoid rule, so it needs the background sampler.

A domain's joules are the sum of its channels (e.g. "cpu_package" over the sockets).

Windows: ``start()`` / ``stop()`` or ``with meter.measure() as w:`` (then ``w.measurement``).
Windows may overlap (an outer per-request window and inner per-phase ones); each is a snapshot of
the meter's running per-channel totals. ``mark(name)`` inside a window starts a named phase (the
window's ``phases`` then gives joules per phase name, summed over repeats).

Sampling: a background thread reads every channel every ``sample_interval_s`` while a window is
open. It is on when asked for (``sample_interval_s=...``; the windows then carry a power
timeline), when a power channel needs integrating (NVML without the energy counter, every 20 ms),
and at a slow guard interval for wrapping counters so that at most one wrap happens between two
reads (RAPL). A read error in the thread is raised by the next ``stop()``, never swallowed.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pyengine.energy.measurement import HIGH, LOW, EnergyMeasurement, EnergySourceError


@dataclass
class Channel:
    domain: str
    label: str  # where the number comes from, e.g. "rapl:intel-rapl:0 (package-0) energy_uj"
    read: Callable[[], float]
    kind: str = "counter"  # or "power"
    scale: float = 1.0  # native counter unit -> joules (counter channels)
    wrap: float | None = None  # counter range in native units, None when it never wraps
    # watts now, read beside a counter: a window the counter did not resolve (no update inside it)
    # is charged the mean of the power read at its start and end x its seconds, and labelled so
    power: Callable[[], float] | None = None

    def __post_init__(self):
        if self.kind not in ("counter", "power"):
            raise ValueError(f"channel kind must be 'counter' or 'power', got {self.kind!r}")


class _ChannelState:
    __slots__ = ("prev_raw", "prev_t", "joules", "updates", "wraps", "watts")

    def __init__(self):
        self.prev_raw = None
        self.prev_t = None
        self.joules = 0.0  # cumulative joules since the meter was created
        self.updates = 0  # reads whose value differed from the previous read
        self.wraps = 0
        self.watts = None  # the channel's power at the last read, where it has a power reading


@dataclass(frozen=True)
class Reading:
    """Every channel of a meter read once: the clock, and per channel (joules since the meter was
    created, counter updates, watts or None)."""

    t: float
    snap: list[tuple[float, int, float | None]]

    @property
    def joules(self) -> float:
        return math.fsum(j for j, _, _ in self.snap)


class Window:
    """One open measurement window; ``measurement`` is set when it is stopped."""

    def __init__(self, meter: "EnergyMeter", t0: float, snap: list[tuple[float, int]], n_samples: int,
                 tl_index: int, phase: str | None):
        self.meter = meter
        self.t0 = t0
        self.start_snap = snap
        self.samples_at_start = n_samples
        self.timeline_index = tl_index
        # (phase name or None, t, snapshot) at every phase boundary
        self.segments: list[tuple[str | None, float, list[tuple[float, int]]]] = [(phase, t0, snap)]
        self.measurement: EnergyMeasurement | None = None

    @property
    def open(self) -> bool:
        return self.measurement is None


class EnergyMeter:
    """Base meter: see the module docstring. Subclasses build the channels."""

    name = "meter"
    estimated = False

    def __init__(self, channels: list[Channel], *, sample_interval_s: float | None = None,
                 power_interval_s: float = 0.02, guard_interval_s: float | None = None,
                 low_confidence_below_s: float = 0.0, min_window_s: float = 0.0,
                 resolution_note: str = "", sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, fallback_reason: str | None = None,
                 estimate_note: str = "", method: str = "", constants: dict | None = None,
                 update_period_s: float = 0.0):
        if not channels:
            raise EnergySourceError(f"{self.name}: no channels to read")
        self.channels = list(channels)
        self.domains = sorted({c.domain for c in self.channels}, key=[c.domain for c in self.channels].index)
        self.record_timeline = sample_interval_s is not None
        # A timeline sampled faster than its counter updates shows zeros and spikes, not power.
        self.update_period_s = update_period_s
        if sample_interval_s is not None:
            sample_interval_s = max(sample_interval_s, update_period_s)
        self.method = method or self.name
        self.constants = dict(constants or {})
        intervals = [x for x in (sample_interval_s, guard_interval_s) if x]
        if any(c.kind == "power" for c in self.channels):
            intervals.append(power_interval_s)
        self.sample_interval_s = min(intervals) if intervals else None
        self.low_confidence_below_s = low_confidence_below_s
        self.min_window_s = min_window_s
        self.resolution_note = resolution_note
        self.estimate_note = estimate_note
        self.sync = sync
        self.clock = clock
        self.fallback_reason = fallback_reason
        self._state = [_ChannelState() for _ in self.channels]
        self._lock = threading.RLock()
        self._windows: list[Window] = []
        self._timeline: list[tuple[float, dict[str, float]]] = []
        self._n_samples = 0
        self._thread: threading.Thread | None = None
        self._stop_evt = threading.Event()
        self._thread_error: BaseException | None = None

    # ---- reading -------------------------------------------------------------------------------

    def _sample(self, reset: bool = False) -> tuple[float, list[tuple[float, int]]]:
        """Read every channel once, fold the readings into the running totals, return (t, snapshot)."""
        with self._lock:
            raws = [c.read() for c in self.channels]
            powers = [None if c.power is None else float(c.power()) for c in self.channels]
            t = self.clock()
            watts: dict[str, float] = {}
            for c, st, raw, power in zip(self.channels, self._state, raws, powers):
                st.watts = power
                raw = float(raw)
                if not math.isfinite(raw):
                    raise EnergySourceError(f"{c.label}: read a non-finite value {raw!r}")
                if c.kind == "power" and raw < 0:
                    raise EnergySourceError(f"{c.label}: read a negative power {raw!r} W")
                if st.prev_raw is None or reset:
                    st.prev_raw, st.prev_t = raw, t
                    continue
                dt = t - st.prev_t
                if c.kind == "counter":
                    delta = raw - st.prev_raw
                    if delta < 0:
                        if c.wrap is None:
                            raise EnergySourceError(
                                f"{c.label}: counter went backwards ({st.prev_raw:g} -> {raw:g}) and it has no "
                                "wraparound range (driver reset?)")
                        delta += c.wrap  # at most one wrap between two reads: the sampler guarantees it
                        st.wraps += 1
                    j = delta * c.scale
                else:
                    j = 0.5 * (st.prev_raw + raw) * dt
                if raw != st.prev_raw:
                    st.updates += 1
                st.joules += j
                if dt > 0:
                    w = j / dt if c.kind == "counter" else raw
                    watts[c.domain] = watts.get(c.domain, 0.0) + w
                st.prev_raw, st.prev_t = raw, t
            self._n_samples += 1
            if self.record_timeline and self._windows and watts and not reset:
                self._timeline.append((t, watts))
            return t, [(st.joules, st.updates, st.watts) for st in self._state]

    def _sampler(self, stop_evt: threading.Event):
        while not stop_evt.wait(self.sample_interval_s):
            try:
                self._sample()
            except BaseException as e:  # reported by stop()
                self._thread_error = e
                return

    def _sync(self):
        if self.sync is not None:
            self.sync()

    # ---- windows -------------------------------------------------------------------------------

    def start(self, phase: str | None = None) -> Window:
        """Open a window (optionally already inside phase ``phase``) and return it."""
        self._sync()
        with self._lock:
            first = not self._windows
            if first:
                self._thread_error = None
                self._timeline.clear()
            t, snap = self._sample(reset=first)
            w = Window(self, t, snap, self._n_samples, len(self._timeline), phase)
            self._windows.append(w)
            if first and self.sample_interval_s:
                self._stop_evt = threading.Event()
                self._thread = threading.Thread(target=self._sampler, args=(self._stop_evt,),
                                                name=f"pyengine-energy-{self.name}", daemon=True)
                self._thread.start()
            return w

    def mark(self, phase: str | None, window: Window | None = None) -> None:
        """From now on, the window's energy goes to phase ``phase`` (None: to no phase)."""
        self._sync()
        with self._lock:
            w = window or self._last_open()
            t, snap = self._sample()
            w.segments.append((phase, t, snap))

    def reading(self) -> Reading:
        """Every channel read now (one read): its joules and counter updates since the meter was created,
        and its watts where it has a power reading. For a caller that splits a long open window into many
        short steps (the scheduler) without a window per step: ``between()`` two successive readings,
        which share their end points, so the steps add up to the window."""
        self._sync()
        return Reading(*self._sample())

    def total_joules(self) -> float:
        """reading()'s joules."""
        return self.reading().joules

    def between(self, a: Reading, b: Reading, carried: dict[str, float] | None = None) -> EnergyMeasurement:
        """The measurement from reading ``a`` to reading ``b``, as a window of its own (a counter that did
        not update in it, if it is shorter than two update periods, is charged power x seconds).
        ``carried``: per domain, the joules earlier steps were charged from power that no counter jump
        has included yet; updated here, so that the steps add up to the counter (see ``_settle``)."""
        m = self._build(a.snap, b.snap, a.t, b.t, 2, None)
        if carried is not None:
            self._settle(m, carried)
        return m

    def _settle(self, m: EnergyMeasurement, carried: dict[str, float]):
        """Joules charged from power to a step whose counter had not moved yet: the counter's next jump
        includes them, so they come off the step that sees it (the steps add up to the window)."""
        for d in self.domains:
            if d in m.power_estimated:
                carried[d] = carried.get(d, 0.0) + m.joules[d]
            elif carried.get(d) and m.joules[d] > 0:
                taken = min(carried[d], m.joules[d])
                m.joules[d] -= taken
                carried[d] -= taken

    def labels(self, seconds: float, updates: int, from_power: dict[str, tuple[int, float]] | None = None) -> dict:
        """What a number this meter counted over `seconds`, while its counters updated `updates` times
        (the fewest of any channel), says of itself: source, method and constants, per-domain
        sources, confidence and its reason, fallback. `from_power`: per domain, (steps, joules) of the
        short steps its counter did not resolve, whose joules were estimated from power instead."""
        from_power = from_power or {}
        conf, reason = self._confidence(seconds, {d: updates for d in self.domains}, list(from_power), steps=True)
        if from_power:
            notes = [f"{d}: {n} step(s) the counter did not resolve (no update, shorter than two "
                     f"{self.update_period_s:g} s update periods), {j:.4g} J of them ESTIMATED from the power read "
                     "at each step's start and end" for d, (n, j) in from_power.items()]
            conf, reason = LOW, "; ".join(notes + ([reason] if conf == LOW else []))
        return {"source": self.name, "estimated": self.estimated, "method": self.method,
                "constants": dict(self.constants),
                "sources": {d: " + ".join(c.label for c in self.channels if c.domain == d) for d in self.domains},
                "confidence": conf, "confidence_reason": reason, "fallback_reason": self.fallback_reason,
                "power_estimated": sorted(from_power)}

    @contextlib.contextmanager
    def phase(self, name: str, window: Window | None = None):
        """``with meter.phase("decode"):`` marks ``name`` inside the open window, then back."""
        w = window or self._last_open()
        previous = w.segments[-1][0]
        self.mark(name, w)
        try:
            yield w
        finally:
            if w.open:
                self.mark(previous, w)

    def stop(self, window: Window | None = None) -> EnergyMeasurement:
        """Close ``window`` (default: the most recently opened one) and return its measurement."""
        self._sync()
        thread = None
        try:
            with self._lock:
                w = window or self._last_open()
                if w not in self._windows:
                    raise RuntimeError("this window is not open on this meter")
                try:
                    t, snap = self._sample()
                finally:
                    self._close(w)
                    if not self._windows:
                        thread = self._stop_thread()
        finally:
            if thread is not None:  # joined outside the lock: the sampler may be waiting for it
                thread.join()
        with self._lock:
            err = self._thread_error
            timeline = self._timeline[w.timeline_index:] if self.record_timeline else None
            n_samples = self._n_samples - w.samples_at_start + 1
            if err is not None:
                raise EnergySourceError(f"{self.name}: the background sampler failed: {err}") from err
            m = self._build(w.start_snap, snap, w.t0, t, n_samples, timeline)
            phases: dict[str, EnergyMeasurement] = {}
            bounds = w.segments + [(None, t, snap)]
            carried: dict[str, float] = {}  # joules phases were charged from power, not yet in a counter jump
            for (name, t_a, s_a), (_, t_b, s_b) in zip(bounds[:-1], bounds[1:]):
                pm = self.between(Reading(t_a, s_a), Reading(t_b, s_b), carried)
                if name is None:
                    continue
                phases[name] = phases[name] + pm if name in phases else pm
            m.phases = phases
            w.measurement = m
            return m

    @contextlib.contextmanager
    def measure(self, phase: str | None = None):
        """``with meter.measure() as w: ...`` then ``w.measurement``."""
        w = self.start(phase)
        try:
            yield w
        except BaseException:
            thread = None
            with self._lock:
                self._close(w)
                if not self._windows:
                    thread = self._stop_thread()
            if thread is not None:
                thread.join()
            raise
        self.stop(w)

    def _last_open(self) -> Window:
        if not self._windows:
            raise RuntimeError(f"{self.name}: no measurement window is open (call start() first)")
        return self._windows[-1]

    def _close(self, w: Window):
        if w in self._windows:
            self._windows.remove(w)

    def _stop_thread(self) -> threading.Thread | None:
        """Tell the sampler to stop; return it for the caller to join once the lock is released."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop_evt.set()
        return thread

    # ---- results -------------------------------------------------------------------------------

    def _build(self, snap_a, snap_b, t_a, t_b, n_samples, timeline_pts) -> EnergyMeasurement:
        seconds = max(0.0, t_b - t_a)
        joules = {d: 0.0 for d in self.domains}
        updates = {d: 0 for d in self.domains}
        sources: dict[str, list[str]] = {d: [] for d in self.domains}
        from_power = []
        # Shorter than two counter periods with no update: the counter could not resolve the window.
        # Longer, a still counter is a stuck one, flagged below, not papered over.
        unresolved = 0 < seconds < 2 * self.update_period_s
        for c, (ja, ua, wa), (jb, ub, wb) in zip(self.channels, snap_a, snap_b):
            if unresolved and c.kind == "counter" and ub == ua and wa is not None and wb is not None:
                joules[c.domain] += 0.5 * (wa + wb) * seconds
                sources[c.domain].append(f"{c.label}; this window: mean power read at its start and end x seconds")
                from_power.append(c.domain)
            else:
                joules[c.domain] += jb - ja
                sources[c.domain].append(c.label)
            updates[c.domain] += ub - ua
        conf, reason = self._confidence(seconds, updates, from_power)
        timeline = None
        if timeline_pts is not None:
            timeline = {d: [(tt - t_a, ws[d]) for tt, ws in timeline_pts if d in ws] for d in self.domains}
        return EnergyMeasurement(
            joules=joules, seconds=seconds, sources={d: " + ".join(v) for d, v in sources.items()},
            source=self.name, estimated=self.estimated, counter_updates=min(updates.values()),
            confidence=conf, confidence_reason=reason, samples=n_samples, timeline=timeline,
            fallback_reason=self.fallback_reason, min_window_s=self.min_window_s, method=self.method,
            constants=dict(self.constants), power_estimated=sorted(set(from_power)))

    def _confidence(self, seconds: float, updates: dict, from_power, steps: bool = False) -> tuple[str, str]:
        """(confidence, reason) of a window of `seconds` whose counters updated `updates[domain]` times;
        `from_power`: the domains whose joules came from power readings instead of the counter (all of
        them; with `steps`, only those of some steps, which the caller describes)."""
        reasons = []
        if self.estimated:
            reasons.append(f"estimate, not a measurement: {self.estimate_note}".rstrip(": "))
        if seconds < self.low_confidence_below_s:
            reasons.append(f"window {seconds:.3f} s is shorter than {self.low_confidence_below_s:g} s"
                           + (f" ({self.resolution_note})" if self.resolution_note else ""))
        kinds = {c.domain: c.kind for c in self.channels}
        for d in dict.fromkeys(() if steps else from_power):
            reasons.append(f"the {d} counter did not update during this {seconds:.3f} s window: its joules are "
                           "ESTIMATED from the power read at the window's start and end")
        for d in self.domains:
            if (kinds[d] == "counter" and seconds > 0 and updates[d] == 0 and not self.estimated
                    and d not in from_power):
                reasons.append(f"the {d} counter did not change during the window")
        conf = LOW if reasons else HIGH
        reason = "; ".join(reasons) if reasons else (
            f"hardware counter, window {seconds:.3f} s >= {self.low_confidence_below_s:g} s")
        return conf, reason

    # ---- helpers -------------------------------------------------------------------------------

    def repeats_for(self, seconds_per_run: float) -> int:
        """How many back-to-back runs of ``seconds_per_run`` fill the meter's minimum window."""
        if seconds_per_run <= 0:
            raise ValueError("seconds_per_run must be positive")
        return max(1, math.ceil(self.min_window_s / seconds_per_run))

    def describe(self) -> str:
        s = f"{self.name}: " + "; ".join(f"{c.domain} <- {c.label}" for c in self.channels)
        if self.estimated:
            s += " [ESTIMATE]"
        if self.fallback_reason:
            s += f" [fallback: {self.fallback_reason}]"
        return s

    def close(self) -> None:
        with self._lock:
            thread = self._stop_thread()
            self._windows.clear()
        if thread is not None:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class CombinedMeter(EnergyMeter):
    """Several meters' channels read together in one window: e.g. NVML + RAPL, so that a GPU run
    counts the host's CPU package and DRAM too. Joules per domain ("gpu", "cpu_package", "dram")."""

    def __init__(self, meters: list[EnergyMeter], *, sample_interval_s: float | None = None,
                 fallback_reason: str | None = None):
        self.parts = list(meters)
        self.name = "+".join(m.name for m in self.parts)
        self.estimated = any(m.estimated for m in self.parts)
        syncs = [m.sync for m in self.parts if m.sync is not None]
        intervals = [m.sample_interval_s for m in self.parts if m.sample_interval_s]
        constants = {}
        for m in self.parts:
            constants.update({f"{m.name}.{k}": v for k, v in m.constants.items()})
        super().__init__(
            [c for m in self.parts for c in m.channels], sample_interval_s=sample_interval_s,
            guard_interval_s=min(intervals) if intervals else None, power_interval_s=min(intervals or [0.02]),
            low_confidence_below_s=max(m.low_confidence_below_s for m in self.parts),
            min_window_s=max(m.min_window_s for m in self.parts),
            resolution_note="; ".join(m.resolution_note for m in self.parts if m.resolution_note),
            sync=(lambda: [s() for s in syncs]) if syncs else None, clock=self.parts[0].clock,
            fallback_reason=fallback_reason or "; ".join(m.fallback_reason for m in self.parts if m.fallback_reason)
            or None, estimate_note="; ".join(m.estimate_note for m in self.parts if m.estimate_note),
            method=" + ".join(m.method for m in self.parts), constants=constants,
            update_period_s=max(m.update_period_s for m in self.parts))

    def close(self) -> None:
        super().close()
        for m in self.parts:
            m.close()
