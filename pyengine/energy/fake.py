"""Scripted sources, for tests only: never selected by ``make_meter("auto")``."""
from __future__ import annotations

import itertools
from typing import Iterable

from pyengine.energy.meter import Channel, EnergyMeter


class _Script:
    def __init__(self, values: Iterable[float], what: str):
        self._it = iter(values)
        self.what = what
        self.last = None

    def __call__(self) -> float:
        try:
            self.last = next(self._it)
        except StopIteration:
            if self.last is None:
                raise RuntimeError(f"{self.what}: the script is empty") from None
            raise RuntimeError(f"{self.what}: the script ran out of readings") from None
        return self.last


class ReplayMeter(EnergyMeter):
    """Replays scripted cumulative counter readings (native units x ``scale`` = joules).

    ``readings={"gpu": [0, 10, 25], ...}``: each read of the meter takes the next value of every
    domain. ``times``: the clock's scripted values (one per read), else the real clock. ``wrap``:
    counter range for wraparound tests. With ``repeat_last=True`` the last reading is repeated
    once the script is used up (useful with the background sampler)."""

    name = "replay"

    def __init__(self, readings: dict[str, Iterable[float]], *, times: Iterable[float] | None = None,
                 scale: float = 1.0, wrap: float | None = None, repeat_last: bool = False, estimated: bool = False,
                 **kw):
        channels = []
        for domain, values in readings.items():
            values = list(values)
            if repeat_last and values:
                values = itertools.chain(values, itertools.repeat(values[-1]))
            channels.append(Channel(domain, f"replay:{domain}", _Script(values, f"replay {domain}"), scale=scale,
                                    wrap=wrap))
        if times is not None:
            kw["clock"] = _Script(list(times), "replay clock")
        self.estimated = estimated
        super().__init__(channels, **kw)


class ConstantPowerMeter(EnergyMeter):
    """Power channels at constant watts per domain (integrated by the sampler, like NVML polling)."""

    name = "constant"

    def __init__(self, watts: dict[str, float], **kw):
        channels = [Channel(d, f"constant:{d} {w:g} W", (lambda w=w: w), kind="power") for d, w in watts.items()]
        super().__init__(channels, **kw)
