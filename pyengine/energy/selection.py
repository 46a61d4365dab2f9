"""Which source measures what: ``available_sources()`` and ``make_meter()``."""
from __future__ import annotations

from pyengine.energy.estimate import EstimateMeter, estimate_status
from pyengine.energy.measurement import EnergySourceError, EnergySourceUnavailable, SourceStatus
from pyengine.energy.meter import CombinedMeter, EnergyMeter
from pyengine.energy.nvml import NvmlMeter, nvml_status
from pyengine.energy.rapl import DEFAULT_POWERCAP_ROOT, RaplMeter, rapl_status

SOURCES = ("nvml", "rapl", "estimate", "nvml+rapl")


def available_sources(*, rapl_root: str = DEFAULT_POWERCAP_ROOT, nvml=None) -> list[SourceStatus]:
    """Status of every source on this machine, in order of preference (for ``pyengine info``)."""
    return [nvml_status(nvml), rapl_status(rapl_root), estimate_status()]


def is_cuda(device) -> bool:
    if isinstance(device, int):
        return True
    return str(getattr(device, "type", device)).startswith("cuda")


def make_meter(source: str = "auto", device="cpu", *, rapl_root: str = DEFAULT_POWERCAP_ROOT, nvml=None,
               sample_interval_s: float | None = None, tdp_w: float | None = None,
               watts_per_core: float | None = None, **kw) -> EnergyMeter:
    """A meter for ``device``.

    source="auto": nvml for a CUDA device, else rapl if readable, else the estimate; every step
    down records why in ``meter.fallback_reason`` (which measurements carry and outputs print).
    For a CUDA device without NVML, rapl and the estimate measure the CPU side only, and the
    reason says so. An explicit source that is unavailable raises EnergySourceUnavailable with the
    reason. source="nvml+rapl": the GPU and the host's CPU package (+ DRAM) in one window.
    Extra keyword arguments go to the meter (min_window_s, clock, ...)."""
    if source not in ("auto", *SOURCES):
        raise ValueError(f"unknown energy source {source!r}; choose from auto, {', '.join(SOURCES)}")

    def build(name, fallback_reason=None):
        if name == "nvml+rapl":
            parts = [build("nvml")]
            try:
                parts.append(build("rapl"))
            except BaseException:
                parts[0].close()
                raise
            return CombinedMeter(parts, sample_interval_s=sample_interval_s, fallback_reason=fallback_reason)
        extra = dict(kw, sample_interval_s=sample_interval_s, fallback_reason=fallback_reason)
        if name == "nvml":
            return NvmlMeter(device, nvml=nvml, **extra)
        if name == "rapl":
            return RaplMeter(rapl_root, **extra)
        return EstimateMeter(tdp_w=tdp_w, watts_per_core=watts_per_core, **extra)

    if source != "auto":
        try:
            return build(source)
        except EnergySourceError as e:
            raise EnergySourceUnavailable(f"energy source {source!r} is not available: {e}") from e

    order = ["nvml", "rapl", "estimate"] if is_cuda(device) else ["rapl", "estimate"]
    reasons = []
    for name in order:
        why = "; ".join(reasons) + f"; using {name}" if reasons else None
        if why and is_cuda(device):
            why += f" ({name} does not measure the GPU: GPU energy is NOT included)"
        try:
            return build(name, why)
        except EnergySourceError as e:
            if name == "estimate":
                raise
            reasons.append(f"{name} unavailable: {str(e).removeprefix(name + ': ')}")
    raise AssertionError("unreachable")
