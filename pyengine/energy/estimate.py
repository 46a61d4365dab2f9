"""An ESTIMATE of CPU energy where no counter exists (VMs, containers without powercap, macOS).

    joules = (user + system CPU seconds of this process over the window) x watts per core
    watts per core = CPU TDP / physical cores

This is the per-core TDP model of Green Algorithms (Lannelongue, Grealey & Inouye, "Green
Algorithms: Quantifying the Carbon Footprint of Computation", Advanced Science, 2021). It is a
model, not a measurement: it assumes a busy core draws its share of TDP, ignores idle and uncore
power, DRAM, turbo above TDP and SMT sharing, and counts only this process. Every result is
labelled source="estimate", estimated=True, confidence="low".

CPU seconds come from ``time.process_time()`` (user + system time of this process, all threads;
the same quantity as ``os.times()`` user+system but with nanosecond rather than clock-tick
resolution).

Watts per core, first match wins:
  1. ``watts_per_core=`` argument;
  2. ``tdp_w=`` argument, else the PYENGINE_CPU_TDP_W environment variable, divided by
     ``physical_cores=`` (default: physical cores this OS sees, psutil). In a VM the OS sees vCPUs,
     so give the TDP share of your vCPUs, or ``watts_per_core`` directly;
  3. the built-in table below, by /proc/cpuinfo model name (then AMD family/model), with each
     part's TDP / cores from the vendor's spec sheet; where only the family is known, the family's
     highest TDP per core (its parts with the fewest cores), by the rule below;
  4. ``DEFAULT_WATTS_PER_CORE`` = 10 W: a round figure above today's server parts (about 3 to 7
     W per core at TDP, see the table) and near desktop parts (e.g. 65 W / 6 to 8 cores).
The rule for every fallback: an unknown CPU is over- rather than under-estimated.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from pyengine.energy.measurement import SourceStatus
from pyengine.energy.meter import Channel, EnergyMeter

TDP_ENV = "PYENGINE_CPU_TDP_W"
DEFAULT_WATTS_PER_CORE = 10.0
ESTIMATE_MIN_WINDOW_S = 1.0


@dataclass(frozen=True)
class CpuPowerProfile:
    name: str
    tdp_w: float
    physical_cores: int
    source: str

    @property
    def watts_per_core(self) -> float:
        return self.tdp_w / self.physical_cores


_AMD = "AMD product specifications (amd.com)"
_INTEL = "Intel ARK (ark.intel.com)"

# (regex on the model name, profile). A family entry stands for any part of the family (the model
# name gave the family only): it takes the family's highest TDP per core, its parts with the fewest
# cores, so that an unknown part is over- rather than under-estimated (the rule for every fallback).
CPU_PROFILES: list[tuple[str, CpuPowerProfile]] = [
    (r"EPYC 7763\b", CpuPowerProfile("AMD EPYC 7763 (Zen 3, Milan)", 280, 64, _AMD)),
    (r"EPYC 7713\b", CpuPowerProfile("AMD EPYC 7713 (Zen 3, Milan)", 225, 64, _AMD)),
    (r"EPYC 7543\b", CpuPowerProfile("AMD EPYC 7543 (Zen 3, Milan)", 225, 32, _AMD)),
    (r"EPYC 9654\b", CpuPowerProfile("AMD EPYC 9654 (Zen 4, Genoa)", 360, 96, _AMD)),
    (r"EPYC 9554\b", CpuPowerProfile("AMD EPYC 9554 (Zen 4, Genoa)", 360, 64, _AMD)),
    (r"Xeon.*Platinum 8380\b", CpuPowerProfile("Intel Xeon Platinum 8380 (Ice Lake-SP)", 270, 40, _INTEL)),
    (r"Xeon.*Gold 6338\b", CpuPowerProfile("Intel Xeon Gold 6338 (Ice Lake-SP)", 205, 32, _INTEL)),
]
MILAN = CpuPowerProfile("AMD EPYC 7003 family (Zen 3, Milan), part unknown: as EPYC 72F3, the family's highest "
                        "TDP per core", 180, 8, _AMD)
GENOA = CpuPowerProfile("AMD EPYC 9004 family (Zen 4, Genoa), part unknown: as EPYC 9174F, the family's highest "
                        "TDP per core", 320, 16, _AMD)
ICE_LAKE_SP = CpuPowerProfile("Intel Xeon 3rd gen Scalable (Ice Lake-SP), part unknown: as Gold 6334, the "
                              "family's highest TDP per core", 165, 8, _INTEL)
FAMILY_PROFILES: list[tuple[str, CpuPowerProfile]] = [
    (r"EPYC 7[0-9F]{2}3\b", MILAN),
    (r"EPYC 9[0-9F]{2}4", GENOA),
    (r"Xeon.*(Platinum|Gold|Silver) [0-9]3[0-9]{2}", ICE_LAKE_SP),
]
# AMD family 0x19 models 0x00-0x0f are Zen 3 server (Milan), 0x10-0x1f Zen 4 server (Genoa); VMs
# often hide the model number and show only "AMD EPYC" but keep the family/model fields.
_AMD_FAMILY_MODEL = {**{(25, m): MILAN for m in range(0x00, 0x10)}, **{(25, m): GENOA for m in range(0x10, 0x20)}}


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def lookup_profile(cpuinfo: dict[str, str]) -> CpuPowerProfile | None:
    model_name = cpuinfo.get("model name", "")
    for pattern, profile in CPU_PROFILES + FAMILY_PROFILES:
        if re.search(pattern, model_name):
            return profile
    if "AMD" in model_name or cpuinfo.get("vendor_id") == "AuthenticAMD":
        try:
            key = (int(cpuinfo.get("cpu family", "")), int(cpuinfo.get("model", "")))
        except ValueError:
            return None
        if "EPYC" in model_name:
            return _AMD_FAMILY_MODEL.get(key)
    return None


def physical_core_count() -> int:
    try:
        import psutil  # noqa: PLC0415

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    return os.cpu_count() or 1


def resolve_watts_per_core(watts_per_core: float | None = None, tdp_w: float | None = None,
                           physical_cores: int | None = None, cpuinfo: dict[str, str] | None = None,
                           environ=None) -> tuple[float, str]:
    """(watts per core, where that figure came from)."""
    environ = os.environ if environ is None else environ
    if watts_per_core is not None:
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be positive, got {watts_per_core}")
        return float(watts_per_core), f"{watts_per_core:g} W/core (set by the caller)"
    origin = "argument tdp_w"
    if tdp_w is None and environ.get(TDP_ENV):
        try:
            tdp_w = float(environ[TDP_ENV])
        except ValueError:
            raise ValueError(f"{TDP_ENV}={environ[TDP_ENV]!r} is not a number of watts") from None
        origin = f"{TDP_ENV}"
    if tdp_w is not None:
        if not tdp_w > 0:
            raise ValueError(f"CPU TDP must be positive, got {tdp_w} ({origin})")
        cores = physical_cores or physical_core_count()
        return tdp_w / cores, f"TDP {tdp_w:g} W ({origin}) / {cores} physical cores"
    profile = lookup_profile(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if profile is not None:
        return profile.watts_per_core, (f"{profile.name}: TDP {profile.tdp_w:g} W / {profile.physical_cores} cores "
                                        f"({profile.source})")
    return DEFAULT_WATTS_PER_CORE, (f"generic default {DEFAULT_WATTS_PER_CORE:g} W/core (CPU not in the table; "
                                    f"set {TDP_ENV} to override)")


class EstimateMeter(EnergyMeter):
    """Process CPU time x watts per core, domain "cpu". Always an estimate, always low confidence."""

    name = "estimate"
    estimated = True

    def __init__(self, *, watts_per_core: float | None = None, tdp_w: float | None = None,
                 physical_cores: int | None = None, cpuinfo: dict[str, str] | None = None,
                 cpu_time=time.process_time, min_window_s: float = ESTIMATE_MIN_WINDOW_S, **kw):
        self.watts_per_core, self.power_origin = resolve_watts_per_core(watts_per_core, tdp_w, physical_cores,
                                                                        cpuinfo)
        label = (f"estimate: process CPU seconds (user+system) x {self.watts_per_core:.3f} W/core "
                 f"[{self.power_origin}]")
        super().__init__([Channel("cpu", label, cpu_time, kind="counter", scale=self.watts_per_core)],
                         min_window_s=min_window_s, method="estimate: process CPU time (user+system) x W/core",
                         constants={"watts_per_core": self.watts_per_core, "watts_per_core_origin": self.power_origin},
                         estimate_note=f"process CPU time x {self.watts_per_core:.3f} W/core ({self.power_origin})",
                         **kw)


def estimate_status() -> SourceStatus:
    try:
        w, origin = resolve_watts_per_core()
    except ValueError as e:
        return SourceStatus("estimate", False, str(e))
    return SourceStatus("estimate", True, f"always available, an ESTIMATE: process CPU time x {w:.3f} W/core "
                                          f"({origin})")
