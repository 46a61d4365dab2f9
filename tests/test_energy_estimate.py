import time

import pytest

from pyengine.energy import (
    DEFAULT_WATTS_PER_CORE, TDP_ENV, EnergySourceUnavailable, EstimateMeter, available_sources, make_meter,
    resolve_watts_per_core,
)
from pyengine.energy.estimate import lookup_profile


def burn(seconds):
    t = time.process_time()
    x = 0
    while time.process_time() - t < seconds:
        x += 1
    return x


def test_estimate_arithmetic_and_label():
    meter = EstimateMeter(watts_per_core=7.5)
    c0 = time.process_time()
    with meter.measure() as w:
        burn(0.3)
    cpu = time.process_time() - c0
    m = w.measurement
    assert set(m.joules) == {"cpu"}
    assert m.joules["cpu"] == pytest.approx(cpu * 7.5, rel=0.05)
    assert m.joules["cpu"] >= 0.3 * 7.5 * 0.98
    assert m.source == "estimate" and m.estimated is True and m.confidence == "low"
    assert "estimate, not a measurement" in m.confidence_reason
    assert m.sources["cpu"].startswith("estimate: process CPU seconds")
    assert "ESTIMATE" in m.summary()


def test_tdp_over_physical_cores(monkeypatch):
    monkeypatch.delenv(TDP_ENV, raising=False)
    m = EstimateMeter(tdp_w=120.0, physical_cores=8)
    assert m.watts_per_core == 15.0 and "TDP 120 W (argument tdp_w) / 8 physical cores" in m.power_origin


def test_tdp_from_env(monkeypatch):
    monkeypatch.setenv(TDP_ENV, "64")
    w, origin = resolve_watts_per_core(physical_cores=4)
    assert w == 16.0 and TDP_ENV in origin
    monkeypatch.setenv(TDP_ENV, "lots")
    with pytest.raises(ValueError, match="not a number"):
        resolve_watts_per_core()
    monkeypatch.setenv(TDP_ENV, "-5")
    with pytest.raises(ValueError, match="positive"):
        resolve_watts_per_core()


def test_table_and_default(monkeypatch):
    monkeypatch.delenv(TDP_ENV, raising=False)
    w, origin = resolve_watts_per_core(cpuinfo={"model name": "AMD EPYC 7763 64-Core Processor"})
    assert w == pytest.approx(280 / 64) and "EPYC 7763" in origin
    w, _ = resolve_watts_per_core(cpuinfo={"model name": "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz"})
    assert w == pytest.approx(270 / 40)
    w, _ = resolve_watts_per_core(cpuinfo={"model name": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"})
    assert w == pytest.approx(205 / 32)
    # a VM that hides the part number but keeps family 25 model 1 (Milan), or 17 (Genoa, this machine)
    p = lookup_profile({"model name": "AMD EPYC", "cpu family": "25", "model": "1", "vendor_id": "AuthenticAMD"})
    assert p is not None and "Milan" in p.name
    p = lookup_profile({"model name": "AMD EPYC", "cpu family": "25", "model": "17", "vendor_id": "AuthenticAMD"})
    assert p is not None and "Genoa" in p.name
    w, origin = resolve_watts_per_core(cpuinfo={"model name": "Some Unknown CPU"})
    assert w == DEFAULT_WATTS_PER_CORE == 10.0 and "generic default" in origin


def test_family_fallback_over_rather_than_under_estimates():
    """Where only the family is known, any of its parts may be underneath: the family entry must charge
    at least as many W/core as every part of that family in the table (the rule the default follows)."""
    from pyengine.energy.estimate import CPU_PROFILES, FAMILY_PROFILES

    for pattern, family in FAMILY_PROFILES:
        members = [p for _, p in CPU_PROFILES if lookup_profile({"model name": p.name.split(" (")[0]}) is p
                   and __import__("re").search(pattern, p.name.split(" (")[0])]
        assert members, pattern
        assert all(family.watts_per_core >= p.watts_per_core for p in members), family.name
    milan = lookup_profile({"model name": "AMD EPYC 7B13", "cpu family": "25", "model": "1",
                            "vendor_id": "AuthenticAMD"})
    assert milan.watts_per_core == pytest.approx(180 / 8)  # the family's highest, not the 64-core flagship's 4.4
    assert milan.watts_per_core >= 225 / 32  # above the 32-core EPYC 7543


def test_estimate_measurement_names_its_method_and_constants():
    m = EstimateMeter(watts_per_core=7.5)
    with m.measure() as w:
        burn(0.01)
    e = w.measurement
    assert e.method == "estimate: process CPU time (user+system) x W/core"
    assert e.constants["watts_per_core"] == 7.5 and "set by the caller" in e.constants["watts_per_core_origin"]
    assert e.to_dict()["constants"]["watts_per_core"] == 7.5


def test_idle_process_uses_almost_nothing():
    meter = EstimateMeter(watts_per_core=10)
    with meter.measure() as w:
        time.sleep(0.2)
    assert w.measurement.joules["cpu"] < 0.05 * 10  # < 50 ms of CPU while sleeping


def test_this_machine_auto_selects_estimate_with_reason():
    """The real path on this machine (a VM without /sys/class/powercap, no GPU)."""
    import os

    statuses = {s.name: s for s in available_sources()}
    assert set(statuses) == {"nvml", "rapl", "estimate"}
    assert statuses["estimate"].available
    if statuses["rapl"].available:
        pytest.skip("this machine has readable RAPL")
    m = make_meter()  # device="cpu", source="auto"
    assert m.name == "estimate" and m.estimated
    assert m.fallback_reason.startswith("rapl unavailable: ") and m.fallback_reason.endswith("using estimate")
    if not os.path.isdir("/sys/class/powercap"):
        assert "/sys/class/powercap not present" in m.fallback_reason
    with m.measure() as w:
        burn(0.01)
    assert w.measurement.fallback_reason == m.fallback_reason
    assert "fallback: rapl unavailable" in w.measurement.summary()
    with pytest.raises(EnergySourceUnavailable, match="'rapl' is not available"):
        make_meter("rapl")
    with pytest.raises(ValueError, match="unknown energy source"):
        make_meter("magic")


def test_explicit_estimate_has_no_fallback_reason():
    m = make_meter("estimate", watts_per_core=3.0)
    assert m.fallback_reason is None and m.watts_per_core == 3.0
