"""Result types of the energy package: what a measurement window reports, and the errors."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

HIGH = "high"
LOW = "low"


class EnergySourceError(RuntimeError):
    """An energy source could not be read, or gave something that is not a reading.

    Raised instead of ever returning a silent zero."""


class EnergyPermissionError(EnergySourceError, PermissionError):
    """The counter exists but this process may not read it (the message says how to fix it)."""


class EnergySourceUnavailable(EnergySourceError):
    """An explicitly requested source is not available here (the message says why)."""


@dataclass(frozen=True)
class SourceStatus:
    """Whether one energy source can be used on this machine, and why (for ``pyengine info``)."""

    name: str
    available: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.detail})"


def net_of_idle(joules: float, idle_watts: float, seconds: float) -> tuple[float, bool]:
    """(joules - idle_watts x seconds clamped at 0, whether it was clamped): the one idle subtraction,
    used by :meth:`EnergyMeasurement.active` and the bench; a clamp is always reported by the caller."""
    net = joules - idle_watts * seconds
    return (0.0, True) if net < 0 else (net, False)


@dataclass(frozen=True)
class IdlePower:
    """Idle power per domain, in watts, as measured by :func:`pyengine.energy.measure_idle`: the
    median over ``len(window_watts)`` windows of ``seconds`` each (``window_watts``: each window's
    total watts; ``spread_watts``: half their min-max range)."""

    watts: dict[str, float]
    seconds: float
    source: str
    note: str = ""
    window_watts: tuple[float, ...] = ()

    @property
    def spread_watts(self) -> float:
        return (max(self.window_watts) - min(self.window_watts)) / 2 if self.window_watts else 0.0

    @property
    def total_watts(self) -> float:
        return math.fsum(self.watts.values())


@dataclass
class EnergyMeasurement:
    """Energy used in one measurement window.

    joules           joules per domain: "gpu", "cpu_package", "dram" (measured), "cpu" (estimate)
    seconds          wall-clock length of the window
    sources          where each domain's number came from (a readable string per domain)
    source           the meter that produced it ("nvml", "rapl", "estimate", "replay", ...)
    estimated        True when a number is a model, not a reading of a hardware counter
    counter_updates  distinct counter (or power) values seen change during the window, taken as
                     the minimum over domains; with no background sampling only the start and
                     stop reads exist, so this is at most 1 there
    samples          reads of the source taken during the window (start, stop, marks, sampler)
    confidence       "high" or "low"; ``confidence_reason`` says why
    timeline         {domain: [(seconds since window start, watts), ...]} when sampling was on
    phases           {phase name: EnergyMeasurement} for phases marked inside the window
    fallback_reason  why the meter that produced this is not the preferred source (or None)
    min_window_s     the meter's recommended minimum window (see ``meets_min_window``)
    idle_subtracted  True for the result of :meth:`active`
    method           how the number was obtained (e.g. "process CPU time x W/core")
    constants        the constants the method used (e.g. {"watts_per_core": 4.375, ...})
    power_estimated  domains whose counter did not update inside the window, so their joules are
                     the power read around the window x its seconds (an estimate)
    """

    joules: dict[str, float]
    seconds: float
    sources: dict[str, str]
    source: str
    estimated: bool
    counter_updates: int
    confidence: str
    confidence_reason: str
    samples: int = 0
    timeline: dict[str, list[tuple[float, float]]] | None = None
    phases: dict[str, "EnergyMeasurement"] = field(default_factory=dict)
    fallback_reason: str | None = None
    min_window_s: float = 0.0
    idle_subtracted: bool = False
    method: str = ""
    constants: dict = field(default_factory=dict)
    power_estimated: list[str] = field(default_factory=list)

    @property
    def total_joules(self) -> float:
        return math.fsum(self.joules.values())

    @property
    def average_watts(self) -> float:
        """Total joules over the window's seconds (0.0 for a zero-length window)."""
        return self.total_joules / self.seconds if self.seconds > 0 else 0.0

    @property
    def meets_min_window(self) -> bool:
        """Whether the window was at least the meter's recommended minimum length."""
        return self.seconds >= self.min_window_s

    def joules_per_token(self, tokens: int) -> float:
        if tokens <= 0:
            raise ValueError(f"tokens must be positive, got {tokens}")
        return self.total_joules / tokens

    def active(self, idle: IdlePower) -> "EnergyMeasurement":
        """Gross minus idle: ``joules[d] - idle.watts[d] * seconds`` per domain, clamped at 0.

        The clamp matters only for windows that used less than the idle power (noise on short
        windows, or an idle measured while something else ran); a clamped domain is reported in
        ``confidence_reason``. Domains missing from ``idle`` are left as they are. Phases are
        treated the same way with their own seconds."""
        if idle.source != self.source and idle.watts and any(idle.watts.values()):
            raise ValueError(f"idle power came from {idle.source!r}, this measurement from {self.source!r}")
        joules, clamped = {}, []
        for d, j in self.joules.items():
            joules[d], was_clamped = net_of_idle(j, idle.watts.get(d, 0.0), self.seconds)
            if was_clamped:
                clamped.append(d)
        reason = self.confidence_reason
        if clamped:
            reason += f"; idle subtraction clamped at 0 for {', '.join(clamped)}"
        return replace(
            self,
            joules=joules,
            confidence_reason=reason,
            phases={k: p.active(idle) for k, p in self.phases.items()},
            timeline=None if self.timeline is None else {
                d: [(t, max(0.0, w - idle.watts.get(d, 0.0))) for t, w in pts] for d, pts in self.timeline.items()
            },
            idle_subtracted=True,
        )

    def __add__(self, other: "EnergyMeasurement") -> "EnergyMeasurement":
        """Combine two windows (e.g. the prefill windows of several requests): joules and seconds
        add, the confidence is low if either is, timelines are dropped."""
        if not isinstance(other, EnergyMeasurement):
            return NotImplemented
        joules = dict(self.joules)
        for d, j in other.joules.items():
            joules[d] = joules.get(d, 0.0) + j
        reasons = []
        for m in (self, other):
            if m.confidence == LOW and m.confidence_reason not in reasons:
                reasons.append(m.confidence_reason)
        phases = dict(self.phases)
        for k, p in other.phases.items():
            phases[k] = phases[k] + p if k in phases else p
        low = self.confidence == LOW or other.confidence == LOW
        return EnergyMeasurement(
            joules=joules,
            seconds=self.seconds + other.seconds,
            sources={**other.sources, **self.sources},
            source=self.source if self.source == other.source else f"{self.source}+{other.source}",
            estimated=self.estimated or other.estimated,
            counter_updates=self.counter_updates + other.counter_updates,
            confidence=LOW if low else HIGH,
            confidence_reason="; ".join(reasons) if low else self.confidence_reason,
            samples=self.samples + other.samples,
            timeline=None,
            phases=phases,
            fallback_reason=self.fallback_reason or other.fallback_reason,
            min_window_s=max(self.min_window_s, other.min_window_s),
            idle_subtracted=self.idle_subtracted and other.idle_subtracted,
            method=self.method if self.method == other.method else f"{self.method} + {other.method}",
            constants={**other.constants, **self.constants},
            power_estimated=sorted(set(self.power_estimated) | set(other.power_estimated)),
        )

    def to_dict(self) -> dict:
        return {
            "joules": dict(self.joules),
            "total_joules": self.total_joules,
            "seconds": self.seconds,
            "average_watts": self.average_watts,
            "sources": dict(self.sources),
            "source": self.source,
            "estimated": self.estimated,
            "counter_updates": self.counter_updates,
            "samples": self.samples,
            "confidence": self.confidence,
            "confidence_reason": self.confidence_reason,
            "fallback_reason": self.fallback_reason,
            "min_window_s": self.min_window_s,
            "idle_subtracted": self.idle_subtracted,
            "method": self.method,
            "constants": dict(self.constants),
            "power_estimated": list(self.power_estimated),
            "phases": {k: p.to_dict() for k, p in self.phases.items()},
            "timeline": None if self.timeline is None else {d: [list(p) for p in v] for d, v in self.timeline.items()},
        }

    def summary(self) -> str:
        parts = ", ".join(f"{d}={j:.3f} J" for d, j in self.joules.items())
        label = "ESTIMATE" if self.estimated else "measured"
        s = (f"{self.total_joules:.3f} J over {self.seconds:.3f} s ({self.average_watts:.2f} W avg; {parts}) "
             f"[{label} by {self.source}; confidence {self.confidence}: {self.confidence_reason}]")
        if self.fallback_reason:
            s += f" [fallback: {self.fallback_reason}]"
        return s
