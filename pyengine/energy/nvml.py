"""GPU energy through NVML (``pynvml``, package nvidia-ml-py).

Preferred: the cumulative energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules
since the driver loaded; Volta and newer). Where it is missing (NVML_ERROR_NOT_SUPPORTED, or
FUNCTION_NOT_FOUND on an old driver) the meter polls ``nvmlDeviceGetPowerUsage`` (milliwatts)
every ``power_interval_s`` (20 ms) from the background thread and integrates with the trapezoid
rule. Note that on many boards the reported power is itself averaged by the driver (over up to
1 s), so polled power smooths short bursts.

The counter updates about every 100 ms (``NVML_COUNTER_PERIOD_S``), so a window shorter than 1 s
is flagged low confidence (``NVML_LOW_CONFIDENCE_BELOW_S``) and the bench should lengthen or repeat
runs to at least ``NVML_MIN_WINDOW_S`` (5 s; ``meter.min_window_s`` / ``meter.repeats_for()``).
A power timeline is never sampled faster than the counter updates. A window in which the counter
did not update at all (a GPU prefill of a few milliseconds) is charged the power read at its start
and end x its seconds, labelled as estimated, instead of 0 J (Zeus does the same). The switch from
the counter to polled power is reported in ``fallback_reason``.

Before every synchronous read (start, mark, stop) pending CUDA work is waited for with
``torch.cuda.synchronize`` when torch has CUDA initialised, so the window covers the kernels the
Python code launched, not just their launch.

Device numbering: ``cuda:N`` is CUDA's numbering, which need not be NVML's (CUDA orders devices
fastest first by default, NVML by PCI bus). So the NVML device is found by the UUID torch reports
for ``cuda:N``, else by its PCI bus id; only when torch cannot say (no CUDA in torch) is N mapped
by order through CUDA_VISIBLE_DEVICES (to an NVML index, or a GPU UUID), and the label says so.
"""
from __future__ import annotations

import os
import sys

from pyengine.energy.measurement import EnergySourceError, SourceStatus
from pyengine.energy.meter import Channel, EnergyMeter

NVML_MIN_WINDOW_S = 5.0
NVML_LOW_CONFIDENCE_BELOW_S = 1.0
NVML_POWER_INTERVAL_S = 0.02
NVML_COUNTER_PERIOD_S = 0.1


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


def cuda_device_identity(cuda_index: int) -> dict:
    """{"uuid": ..., "pci_bus_id": ...} of ``cuda:N`` as torch (the CUDA runtime) sees it; {} when
    torch has no CUDA. The UUID is what NVML matches; the PCI bus id is the fallback."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(cuda_index)
    out = {}
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        uuid = str(uuid)
        out["uuid"] = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    if getattr(props, "pci_bus_id", None) is not None:
        out["pci_bus_id"] = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
                             f"{getattr(props, 'pci_device_id', 0):02X}.0")
    return out


def _handle(nvml, cuda_index: int, identity: dict | None = None):
    """(NVML handle, how it was found) for ``cuda:cuda_index``: by UUID, else PCI bus id, else by order."""
    identity = identity or {}
    if identity.get("uuid"):
        return nvml.nvmlDeviceGetHandleByUUID(identity["uuid"]), f"matched by UUID {identity['uuid']}"
    if identity.get("pci_bus_id"):
        return (nvml.nvmlDeviceGetHandleByPciBusId(identity["pci_bus_id"]),
                f"matched by PCI bus id {identity['pci_bus_id']}")
    index, where = _handle_by_order(cuda_index)
    if isinstance(index, str):
        return nvml.nvmlDeviceGetHandleByUUID(index), f"{where}, by order: torch gave no UUID or PCI bus id"
    return nvml.nvmlDeviceGetHandleByIndex(index), f"{where}, by order: torch gave no UUID or PCI bus id"


def _handle_by_order(cuda_index: int):
    """(NVML index or UUID, label) from CUDA's ordinal and CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if cuda_index >= len(entries):
            raise EnergySourceError(f"nvml: cuda:{cuda_index} is not in CUDA_VISIBLE_DEVICES={visible}")
        entry = entries[cuda_index]
        if entry.isdigit():
            return int(entry), f"NVML index {entry}"
        if entry.startswith(("GPU-", "MIG-")):
            return entry, entry
        raise EnergySourceError(f"nvml: cannot map CUDA_VISIBLE_DEVICES entry {entry!r} to an NVML device")
    return cuda_index, f"NVML index {cuda_index}"


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
                 sync=None, identity: dict | None = None, fallback_reason: str | None = None, **kw):
        self.nvml = nvml = _load_nvml(nvml)
        _init(nvml)
        self._initialised = True
        try:
            self.cuda_index = cuda_device_index(device)
            count = nvml.nvmlDeviceGetCount()
            if count < 1:
                raise EnergySourceError("nvml: the driver reports no GPU")
            if identity is None:
                identity = cuda_device_identity(self.cuda_index)
            try:
                self.handle, where = _handle(nvml, self.cuda_index, identity)
            except EnergySourceError:
                raise
            except Exception as e:
                raise EnergySourceError(f"nvml: no NVML device for cuda:{self.cuda_index} ({identity}): {e}") from e
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
                    self.counter_missing_reason = str(e)
            if self.mode == "counter":
                channel = Channel("gpu", f"nvml:total_energy_consumption cuda:{self.cuda_index} ({name}, {where})",
                                  self._read_mj, kind="counter", scale=1e-3, wrap=None, power=self._read_w)
                note = "the NVML energy counter updates about every 100 ms"
                method, period = "NVML energy counter", NVML_COUNTER_PERIOD_S
                constants = {"counter_period_s": NVML_COUNTER_PERIOD_S}
            else:
                self._read_mw()
                channel = Channel("gpu", f"nvml:power_usage polled every {power_interval_s * 1e3:g} ms, trapezoid "
                                         f"(cuda:{self.cuda_index}, {name}, {where})", self._read_w, kind="power")
                note = "integrated polled NVML power; the driver averages the power it reports"
                method, period = "NVML polled power, trapezoid rule", 0.0
                constants = {"power_interval_s": power_interval_s}
                why = ("NVML energy counter " + (f"not supported ({self.counter_missing_reason})"
                                                 if not force_power_polling else "switched off (force_power_polling)")
                       + f": integrating power polled every {power_interval_s * 1e3:g} ms instead")
                fallback_reason = f"{fallback_reason}; {why}" if fallback_reason else why
            super().__init__([channel], sample_interval_s=sample_interval_s, power_interval_s=power_interval_s,
                             low_confidence_below_s=low_confidence_below_s, min_window_s=min_window_s,
                             resolution_note=note, sync=sync if sync is not None else torch_cuda_sync(self.cuda_index),
                             fallback_reason=fallback_reason, method=method, constants=constants,
                             update_period_s=period, **kw)
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
