"""GPU energy through NVML (``pynvml``, package nvidia-ml-py).

Preferred: the cumulative energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules
since the driver loaded; Volta and newer). Where it is missing (NVML_ERROR_NOT_SUPPORTED, or
FUNCTION_NOT_FOUND on an old driver) the meter polls ``nvmlDeviceGetPowerUsage`` (milliwatts)
every ``power_interval_s`` (20 ms) from the background thread and integrates with the trapezoid
rule. Note that on many boards the reported power is itself averaged by the driver (over up to
1 s), so polled power smooths short bursts.

The counter updates about every 100 ms, so a window shorter than 1 s is flagged low confidence
(``NVML_LOW_CONFIDENCE_BELOW_S``) and the bench should lengthen or repeat runs to at least
``NVML_MIN_WINDOW_S`` (5 s; ``meter.min_window_s`` / ``meter.repeats_for()``).

Before every synchronous read (start, mark, stop) pending CUDA work is waited for with
``torch.cuda.synchronize`` when torch has CUDA initialised, so the window covers the kernels the
Python code launched, not just their launch.

Device numbering: ``cuda:N`` is CUDA's numbering. When CUDA_VISIBLE_DEVICES is set, N is mapped
through it (to an NVML index, or a GPU UUID).
"""
from __future__ import annotations

import os
import sys

from pyengine.energy.measurement import EnergySourceError, SourceStatus
from pyengine.energy.meter import Channel, EnergyMeter

NVML_MIN_WINDOW_S = 5.0
NVML_LOW_CONFIDENCE_BELOW_S = 1.0
NVML_POWER_INTERVAL_S = 0.02


def _load_nvml(nvml=None):
    if nvml is not None:
        return nvml
    try:
        import pynvml  # noqa: PLC0415
    except ImportError as e:
        raise EnergySourceError("nvml: the pynvml module (pip package nvidia-ml-py) is not installed") from e
    return pynvml


def _is_error(nvml, e: BaseException) -> bool:
    return isinstance(e, getattr(nvml, "NVMLError", ()))


def _code(nvml, e: BaseException):
    return getattr(e, "value", None)


def _unsupported(nvml, e: BaseException) -> bool:
    codes = {getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3), getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13)}
    return _is_error(nvml, e) and _code(nvml, e) in codes


def _init(nvml):
    try:
        nvml.nvmlInit()
    except Exception as e:
        if _is_error(nvml, e):
            raise EnergySourceError(f"nvml: no NVIDIA driver (nvmlInit failed: {e})") from e
        raise EnergySourceError(f"nvml: nvmlInit failed: {e!r}") from e


def cuda_device_index(device) -> int:
    """The CUDA ordinal of ``device`` ("cuda", "cuda:1", torch.device, int)."""
    if isinstance(device, int):
        return device
    if not isinstance(device, str):  # torch.device
        if getattr(device, "index", None) is not None:
            return int(device.index)
    s = str(device)
    if s.startswith("cuda:"):
        return int(s.split(":", 1)[1])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return 0


def _handle(nvml, cuda_index: int):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if cuda_index >= len(entries):
            raise EnergySourceError(f"nvml: cuda:{cuda_index} is not in CUDA_VISIBLE_DEVICES={visible}")
        entry = entries[cuda_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry)), f"NVML index {entry}"
        if entry.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(entry), entry
        raise EnergySourceError(f"nvml: cannot map CUDA_VISIBLE_DEVICES entry {entry!r} to an NVML device")
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index), f"NVML index {cuda_index}"


def torch_cuda_sync(device_index: int | None = None):
    """A sync hook: ``torch.cuda.synchronize`` when torch is imported with CUDA initialised."""

    def sync():
        torch = sys.modules.get("torch")  # no torch imported: no CUDA work can be pending from it
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(device_index)

    return sync


class NvmlMeter(EnergyMeter):
    """One GPU's energy: the NVML energy counter, or integrated polled power where it is missing."""

    name = "nvml"

    def __init__(self, device="cuda", *, nvml=None, sample_interval_s: float | None = None,
                 power_interval_s: float = NVML_POWER_INTERVAL_S, min_window_s: float = NVML_MIN_WINDOW_S,
                 low_confidence_below_s: float = NVML_LOW_CONFIDENCE_BELOW_S, force_power_polling: bool = False,
                 sync=None, **kw):
        self.nvml = nvml = _load_nvml(nvml)
        _init(nvml)
        self._initialised = True
        try:
            self.cuda_index = cuda_device_index(device)
            count = nvml.nvmlDeviceGetCount()
            if count < 1:
                raise EnergySourceError("nvml: the driver reports no GPU")
            self.handle, where = _handle(nvml, self.cuda_index)
            try:
                name = nvml.nvmlDeviceGetName(self.handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                name = "unknown GPU"
            self.gpu_name = name
            self.mode = "power" if force_power_polling else "counter"
            if self.mode == "counter":
                try:
                    nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
                except Exception as e:
                    if not _unsupported(nvml, e):
                        raise EnergySourceError(f"nvml: reading the energy counter failed: {e}") from e
                    self.mode = "power"
                    self.counter_missing_reason = f"energy counter not supported ({e})"
            if self.mode == "counter":
                channel = Channel("gpu", f"nvml:total_energy_consumption cuda:{self.cuda_index} ({name}, {where})",
                                  self._read_mj, kind="counter", scale=1e-3, wrap=None)
                note = "the NVML energy counter updates about every 100 ms"
            else:
                self._read_mw()
                channel = Channel("gpu", f"nvml:power_usage polled every {power_interval_s * 1e3:g} ms, trapezoid "
                                         f"(cuda:{self.cuda_index}, {name}, {where})", self._read_w, kind="power")
                note = "integrated polled NVML power; the driver averages the power it reports"
            super().__init__([channel], sample_interval_s=sample_interval_s, power_interval_s=power_interval_s,
                             low_confidence_below_s=low_confidence_below_s, min_window_s=min_window_s,
                             resolution_note=note, sync=sync if sync is not None else torch_cuda_sync(self.cuda_index),
                             **kw)
        except BaseException:
            self._shutdown()
            raise

    def _call(self, fn, what):
        try:
            return fn(self.handle)
        except Exception as e:
            raise EnergySourceError(f"nvml: {what} failed: {e}") from e

    def _read_mj(self) -> float:
        return self._call(self.nvml.nvmlDeviceGetTotalEnergyConsumption, "nvmlDeviceGetTotalEnergyConsumption")

    def _read_mw(self) -> float:
        return self._call(self.nvml.nvmlDeviceGetPowerUsage, "nvmlDeviceGetPowerUsage")

    def _read_w(self) -> float:
        return self._read_mw() * 1e-3

    def _shutdown(self):
        if getattr(self, "_initialised", False):
            self._initialised = False
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass

    def close(self) -> None:
        super().close()
        self._shutdown()


def nvml_status(nvml=None) -> SourceStatus:
    try:
        nvml = _load_nvml(nvml)
        _init(nvml)
    except EnergySourceError as e:
        return SourceStatus("nvml", False, str(e).removeprefix("nvml: "))
    try:
        count = nvml.nvmlDeviceGetCount()
        if count < 1:
            return SourceStatus("nvml", False, "the driver reports no GPU")
        modes = []
        for i in range(count):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                modes.append(f"{i}: energy counter")
            except Exception as e:
                if not _unsupported(nvml, e):
                    raise
                modes.append(f"{i}: power polling")
        return SourceStatus("nvml", True, f"{count} GPU(s) ({'; '.join(modes)})")
    except Exception as e:
        return SourceStatus("nvml", False, f"NVML query failed: {e}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
