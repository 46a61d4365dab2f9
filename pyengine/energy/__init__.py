"""Energy measurement: what each generated token costs, in joules, and where the number came from.

Sources (``available_sources()`` says which work here):
  nvml      GPU: NVML's cumulative energy counter, or integrated polled power where it is missing
  rapl      CPU package (+ DRAM) through /sys/class/powercap, wraparound handled
  estimate  process CPU time x watts per core: an ESTIMATE, always labelled so, low confidence.
            Every busy core is charged the same watts, so ratios between two runs on the
            estimate are ratios of CPU time: speed ratios, not measured energy differences
  nvml+rapl GPU and host CPU in one window
  replay / constant   scripted sources for tests

Use::

    meter = make_meter("auto", device="cuda:0")   # meter.fallback_reason says why, if it fell back
    with meter.measure("prefill") as w:
        ...
        meter.mark("decode")
        ...
    m = w.measurement  # m.joules, m.seconds, m.sources, m.confidence, m.phases["decode"], ...
"""
from pyengine.energy.accounting import (
    DEFAULT_IDLE_SECONDS, IDLE_DRIFT_WARN, PhaseRecorder, attribute_batch, idle_drift, measure_idle,
)
from pyengine.energy.carbon import GridIntensity, grams_co2e, grams_per_1k_tokens, grid_intensity
from pyengine.energy.estimate import DEFAULT_WATTS_PER_CORE, TDP_ENV, EstimateMeter, resolve_watts_per_core
from pyengine.energy.fake import ConstantPowerMeter, ReplayMeter
from pyengine.energy.measurement import (
    EnergyMeasurement,
    EnergyPermissionError,
    EnergySourceError,
    EnergySourceUnavailable,
    IdlePower,
    SourceStatus,
    net_of_idle,
)
from pyengine.energy.meter import Channel, CombinedMeter, EnergyMeter, Window
from pyengine.energy.nvml import NVML_LOW_CONFIDENCE_BELOW_S, NVML_MIN_WINDOW_S, NvmlMeter
from pyengine.energy.rapl import RAPL_MIN_WINDOW_S, RaplMeter
from pyengine.energy.selection import available_sources, make_meter

__all__ = [
    "Channel", "CombinedMeter", "ConstantPowerMeter", "IDLE_DRIFT_WARN", "idle_drift", "net_of_idle", "DEFAULT_IDLE_SECONDS", "DEFAULT_WATTS_PER_CORE", "EnergyMeasurement",
    "EnergyMeter", "EnergyPermissionError", "EnergySourceError", "EnergySourceUnavailable", "EstimateMeter",
    "GridIntensity", "IdlePower", "NVML_LOW_CONFIDENCE_BELOW_S", "NVML_MIN_WINDOW_S", "NvmlMeter", "PhaseRecorder",
    "RAPL_MIN_WINDOW_S", "RaplMeter", "ReplayMeter", "SourceStatus", "TDP_ENV", "Window", "attribute_batch",
    "available_sources", "grams_co2e", "grams_per_1k_tokens", "grid_intensity", "make_meter", "measure_idle",
    "resolve_watts_per_core",
]
