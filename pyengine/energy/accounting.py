"""Idle baseline, phases over separate windows, and per-request attribution inside a batch."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Sequence, Union

from pyengine.energy.measurement import EnergyMeasurement, IdlePower
from pyengine.energy.meter import EnergyMeter

DEFAULT_IDLE_SECONDS = 3.0
IDLE_DRIFT_WARN = 0.10


def measure_idle(meter: EnergyMeter, seconds: float = DEFAULT_IDLE_SECONDS, *, repeats: int = 1,
                 sleep=time.sleep) -> IdlePower:
    """Watts per domain while this process sleeps: the median over ``repeats`` windows of
    ``seconds`` each, with each window's total kept (``window_watts``) to show the spread.

    Measure it with the model loaded (on a GPU: with its CUDA context up), as the runs are: a GPU
    with no context idles in a lower power state than between kernels.

    For the estimate (process CPU time x W/core) idle is meaningless: a sleeping process uses no
    CPU time, so this returns zeros at once and says so in ``note``."""
    if meter.estimated:
        return IdlePower({d: 0.0 for d in meter.domains}, 0.0, meter.name,
                         note="the estimate counts this process's CPU time only, which is ~0 when idle: "
                              "idle power is taken as 0 and nothing is subtracted")
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    windows = []
    for _ in range(repeats):
        with meter.measure() as w:
            sleep(seconds)
        if w.measurement.seconds <= 0:
            raise ValueError("the idle window has zero length")
        windows.append(w.measurement)
    watts = {d: statistics.median(m.joules[d] / m.seconds for m in windows) for d in meter.domains}
    low = [m for m in windows if m.confidence != "high"]
    conf = f"confidence low: {low[0].confidence_reason}" if low else f"confidence high: {windows[0].confidence_reason}"
    note = (f"median of {repeats} window(s) of {seconds:g} s while sleeping; {conf}")
    return IdlePower(watts, math.fsum(m.seconds for m in windows), meter.name, note=note,
                     window_watts=tuple(m.average_watts for m in windows))


def idle_drift(start: IdlePower, end: IdlePower, warn_above: float = IDLE_DRIFT_WARN) -> tuple[float, str | None]:
    """(relative change of the total idle watts from ``start`` to ``end``, a warning or None).

    A drift beyond ``warn_above`` means the baseline moved during the run (thermals, another job,
    a power state), so active energy (gross - idle) is uncertain by about that much."""
    if start.total_watts <= 0:
        return 0.0, None
    drift = (end.total_watts - start.total_watts) / start.total_watts
    if abs(drift) <= warn_above:
        return drift, None
    return drift, (f"idle power drifted {drift * 100:+.1f}% during the run ({start.total_watts:.2f} W at the start, "
                   f"{end.total_watts:.2f} W at the end; more than {warn_above * 100:g}%): active energy is uncertain "
                   "by about that much")


class PhaseRecorder:
    """Named phases measured as separate windows on one meter, summed per name.

    ``with rec.phase("prefill"): ...`` then ``rec.totals()["prefill"]`` (an EnergyMeasurement
    over all prefill windows). Works with any meter; for phases inside one window (one set of
    boundaries on a sampled timeline) use ``meter.mark()`` / ``meter.phase()`` instead."""

    def __init__(self, meter: EnergyMeter):
        self.meter = meter
        self.records: list[tuple[str, EnergyMeasurement]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        with self.meter.measure(name) as w:
            yield w
        self.records.append((name, w.measurement))

    def add(self, name: str, measurement: EnergyMeasurement) -> None:
        self.records.append((name, measurement))

    def totals(self) -> dict[str, EnergyMeasurement]:
        out: dict[str, EnergyMeasurement] = {}
        for name, m in self.records:
            out[name] = out[name] + m if name in out else m
        return out

    def total(self) -> EnergyMeasurement | None:
        total = None
        for _, m in self.records:
            total = m if total is None else total + m
        return total


Energy = Union[EnergyMeasurement, float, int]


def _joules(e: Energy) -> float:
    j = e.total_joules if isinstance(e, EnergyMeasurement) else float(e)
    if not math.isfinite(j) or j < 0:
        raise ValueError(f"energy must be finite and non-negative, got {j}")
    return j


def attribute_batch(prefill: Energy, decode_steps: Sequence[tuple[Energy, Sequence[int]]],
                    prompt_tokens: Sequence[int]) -> list[float]:
    """Joules per sequence of a batch.

    Sequence i is ``prompt_tokens[i]``. The prefill energy is split in proportion to prompt
    tokens (equally if all prompts are empty); each decode step's energy is split equally among
    the sequence indices active in that step. The parts add up to prefill + all steps. Pass
    ``m.active(idle)`` measurements to attribute active rather than gross energy."""
    n = len(prompt_tokens)
    if n == 0:
        raise ValueError("a batch needs at least one sequence")
    if any(t < 0 for t in prompt_tokens):
        raise ValueError("prompt token counts must be non-negative")
    out = [0.0] * n
    pj = _joules(prefill)
    total_tokens = sum(prompt_tokens)
    for i, t in enumerate(prompt_tokens):
        out[i] += pj * (t / total_tokens) if total_tokens else pj / n
    for step, (energy, active) in enumerate(decode_steps):
        j = _joules(energy)
        active = list(active)
        if len(set(active)) != len(active):
            raise ValueError(f"decode step {step}: duplicate sequence ids {active}")
        if not active:
            if j > 0:
                raise ValueError(f"decode step {step} used {j} J but has no active sequence to attribute it to")
            continue
        for i in active:
            if not 0 <= i < n:
                raise ValueError(f"decode step {step}: sequence id {i} out of range 0..{n - 1}")
            out[i] += j / len(active)
    return out
