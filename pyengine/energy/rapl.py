"""CPU energy from RAPL counters through the Linux powercap interface (Intel and AMD).

Layout (``/sys/class/powercap``, configurable for tests): ``intel-rapl:N`` is a top-level zone
(``name``: ``package-N`` on Intel and on AMD Zen, whose driver registers under the same
``intel-rapl`` control type; ``psys`` on some Intel client parts), ``intel-rapl:N:M`` its
subzones (``core``, ``uncore``, ``dram``). Each zone has ``energy_uj`` (cumulative microjoules)
and ``max_energy_range_uj`` (where it wraps to 0).

What is counted, and why (never sum nested domains):
  cpu_package = sum over sockets of the ``package-*`` zones. ``core`` and ``uncore`` are parts of
                the package and are NOT added on top. ``psys`` (whole platform, contains the
                package) is skipped. ``intel-rapl-mmio:*`` zones repeat the package through MMIO
                and are skipped.
  dram        = sum of the ``dram`` subzones (outside the package on Intel servers; absent on most
                client parts and on AMD).

Wraparound: a reading lower than the previous one is one wrap (``+ max_energy_range_uj``); a
background read every ``guard_interval_s`` (default: a quarter of the time the smallest range
takes to fill at ``RAPL_MAX_WATTS_PER_ZONE``, at most 60 s) keeps it to one wrap between reads.

Permissions: since the November 2020 fix for CVE-2020-8694 ("Platypus") ``energy_uj`` is
readable by root only; that is reported as :class:`EnergyPermissionError` with the fix.
"""
from __future__ import annotations

import os
import re

from pyengine.energy.measurement import EnergyPermissionError, EnergySourceError, SourceStatus
from pyengine.energy.meter import Channel, EnergyMeter

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
RAPL_MIN_WINDOW_S = 0.5
RAPL_LOW_CONFIDENCE_BELOW_S = 0.05  # the counters update about every millisecond
RAPL_MAX_WATTS_PER_ZONE = 1000.0  # a generous ceiling, only used to pick the guard interval

_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")

PERMISSION_FIX = (
    "since the fix for CVE-2020-8694 (Nov 2020) the RAPL energy_uj files are readable by root only. "
    "Fix: run as root, or grant read access: `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj` (until reboot), or permanently with a udev rule, e.g. "
    "/etc/udev/rules.d/99-rapl.rules: "
    'ACTION=="add", SUBSYSTEM=="powercap", RUN+="/bin/chmod o+r /sys%p/energy_uj" '
    "(note that this exposes a power side channel to every user)")


def _read_int(path: str, what: str) -> int:
    try:
        with open(path) as f:
            text = f.read()
    except PermissionError as e:
        raise EnergyPermissionError(f"rapl: cannot read {path}: permission denied; {PERMISSION_FIX}") from e
    except FileNotFoundError as e:
        raise EnergySourceError(f"rapl: {what} file {path} is missing") from e
    except OSError as e:
        raise EnergySourceError(f"rapl: cannot read {path}: {e}") from e
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        raise EnergySourceError(f"rapl: {path} does not hold an integer ({what}): {text[:40]!r}") from None
    if value < 0:
        raise EnergySourceError(f"rapl: {path} holds a negative {what}: {value}")
    return value


def _read_name(path: str) -> str:
    try:
        with open(os.path.join(path, "name")) as f:
            return f.read().strip()
    except OSError as e:
        raise EnergySourceError(f"rapl: cannot read the zone name {os.path.join(path, 'name')}: {e}") from e


class RaplZone:
    def __init__(self, path: str, zone_id: str, name: str):
        self.path, self.zone_id, self.name = path, zone_id, name
        self.energy_path = os.path.join(path, "energy_uj")
        self.max_range_uj = _read_int(os.path.join(path, "max_energy_range_uj"), "max_energy_range_uj")
        if self.max_range_uj == 0:
            raise EnergySourceError(f"rapl: {path}/max_energy_range_uj is 0: cannot handle wraparound")

    def read_uj(self) -> int:
        value = _read_int(self.energy_path, "energy_uj")
        if value > self.max_range_uj:
            raise EnergySourceError(
                f"rapl: {self.energy_path} = {value} exceeds max_energy_range_uj = {self.max_range_uj}")
        return value

    def __repr__(self):
        return f"RaplZone({self.zone_id}, {self.name})"


def find_zones(root: str = DEFAULT_POWERCAP_ROOT) -> list[tuple[str, str, str, int | None]]:
    """(path, zone id, name, parent index or None) for every intel-rapl zone, flat or nested."""
    if not os.path.isdir(root):
        raise EnergySourceError(f"rapl: {root} not present (no powercap: not Linux, a VM, or the kernel "
                                "has no intel_rapl / rapl driver loaded)")
    found: dict[str, tuple[str, str, str, int | None]] = {}

    def visit(directory: str, depth: int):
        try:
            entries = sorted(os.listdir(directory))
        except OSError as e:
            raise EnergySourceError(f"rapl: cannot list {directory}: {e}") from e
        for entry in entries:
            m = _ZONE_RE.match(entry)
            path = os.path.join(directory, entry)
            if not m or not os.path.isdir(path) or entry in found:
                continue
            found[entry] = (path, entry, _read_name(path), None if m.group(2) is None else int(m.group(1)))
            if depth < 1:
                visit(path, depth + 1)  # subzones also live inside their parent's directory

    visit(root, 0)
    return list(found.values())


def select_zones(root: str = DEFAULT_POWERCAP_ROOT) -> dict[str, list[RaplZone]]:
    """The zones that are counted: {"cpu_package": [package zones], "dram": [dram zones]}."""
    zones = find_zones(root)
    if not zones:
        raise EnergySourceError(f"rapl: no intel-rapl zones under {root}")
    packages = [RaplZone(p, z, n) for p, z, n, parent in zones if parent is None and n.startswith("package")]
    drams = [RaplZone(p, z, n) for p, z, n, parent in zones if parent is not None and n == "dram"]
    # some platforms expose DRAM as a top-level zone named "dram"
    drams += [RaplZone(p, z, n) for p, z, n, parent in zones if parent is None and n == "dram"]
    if not packages:
        names = ", ".join(f"{z}={n}" for _, z, n, _ in zones)
        raise EnergySourceError(f"rapl: no package zone under {root} (found: {names})")
    out = {"cpu_package": packages}
    if drams:
        out["dram"] = drams
    return out


class RaplMeter(EnergyMeter):
    """CPU package (+ DRAM where present) energy from RAPL counters."""

    name = "rapl"

    def __init__(self, root: str = DEFAULT_POWERCAP_ROOT, *, sample_interval_s: float | None = None,
                 guard_interval_s: float | None = None, min_window_s: float = RAPL_MIN_WINDOW_S,
                 low_confidence_below_s: float = RAPL_LOW_CONFIDENCE_BELOW_S, **kw):
        self.root = root
        selected = select_zones(root)
        channels = []
        for domain, zones in selected.items():
            for z in zones:
                z.read_uj()  # fail now (permission, garbage) rather than at the first window
                channels.append(Channel(domain, f"rapl:{z.zone_id} ({z.name}) energy_uj", z.read_uj,
                                        scale=1e-6, wrap=float(z.max_range_uj)))
        if guard_interval_s is None:
            smallest = min(z.max_range_uj for zs in selected.values() for z in zs) * 1e-6  # joules
            guard_interval_s = max(0.5, min(60.0, smallest / RAPL_MAX_WATTS_PER_ZONE / 4))
        super().__init__(channels, sample_interval_s=sample_interval_s, guard_interval_s=guard_interval_s,
                         low_confidence_below_s=low_confidence_below_s, min_window_s=min_window_s,
                         resolution_note="RAPL counters update about every 1 ms", method="RAPL energy counter",
                         **kw)


def rapl_status(root: str = DEFAULT_POWERCAP_ROOT) -> SourceStatus:
    try:
        selected = select_zones(root)
        for zones in selected.values():
            for z in zones:
                z.read_uj()
    except EnergySourceError as e:
        return SourceStatus("rapl", False, str(e).removeprefix("rapl: "))
    pk = selected["cpu_package"]
    dram = selected.get("dram", [])
    return SourceStatus("rapl", True, f"{len(pk)} package zone(s) ({', '.join(z.zone_id for z in pk)}), "
                                      f"{len(dram)} dram zone(s) under {root}")
