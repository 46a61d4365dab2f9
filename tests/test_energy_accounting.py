import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine.energy import (
    ConstantPowerMeter, EnergyMeasurement, EstimateMeter, IdlePower, PhaseRecorder, ReplayMeter, attribute_batch,
    idle_drift, measure_idle,
)


def replay(readings, times, **kw):
    return ReplayMeter(readings, times=times, **kw)


def test_replay_counter_and_wrap():
    m = replay({"gpu": [90, 98, 3]}, [0.0, 1.0, 2.0], wrap=100.0)
    w = m.start()
    m.mark("x")
    r = m.stop(w)
    assert r.joules["gpu"] == pytest.approx(13.0)  # 8 + (100 - 98 + 3)
    assert r.counter_updates == 2 and r.samples == 3


def test_measure_idle_and_active():
    meter = replay({"cpu_package": [0, 20, 100, 160], "dram": [0, 4, 10, 14]}, [0.0, 2.0, 10.0, 15.0])
    idle = measure_idle(meter, seconds=2.0, sleep=lambda s: None)
    assert idle.watts == pytest.approx({"cpu_package": 10.0, "dram": 2.0}) and idle.seconds == 2.0
    m = meter.start()
    gross = meter.stop(m)  # 60 J package, 4 J dram over 5 s
    net = gross.active(idle)
    assert net.joules == pytest.approx({"cpu_package": 10.0, "dram": 0.0})  # dram: 4 - 10 -> clamped at 0
    assert "clamped at 0 for dram" in net.confidence_reason and net.idle_subtracted
    assert gross.joules["dram"] == 4  # the gross measurement is untouched


def test_idle_repeated_median_and_spread():
    # three 2 s windows at 10, 14 and 11 W: the median, and half the min-max range as the spread
    meter = replay({"cpu_package": [0, 20, 20, 48, 48, 70]}, [0.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    idle = measure_idle(meter, seconds=2.0, repeats=3, sleep=lambda s: None)
    assert idle.watts == pytest.approx({"cpu_package": 11.0})
    assert idle.window_watts == pytest.approx((10.0, 14.0, 11.0)) and idle.spread_watts == pytest.approx(2.0)
    assert idle.seconds == pytest.approx(6.0) and "median of 3 window(s) of 2 s" in idle.note
    with pytest.raises(ValueError, match="repeats"):
        measure_idle(meter, seconds=1.0, repeats=0)


def test_idle_drift_warns_beyond_the_threshold():
    start = IdlePower({"gpu": 50.0}, 3.0, "nvml")
    drift, warning = idle_drift(start, IdlePower({"gpu": 52.0}, 3.0, "nvml"))
    assert drift == pytest.approx(0.04) and warning is None
    drift, warning = idle_drift(start, IdlePower({"gpu": 60.0}, 3.0, "nvml"))
    assert drift == pytest.approx(0.2) and "drifted +20.0%" in warning and "50.00 W at the start" in warning


def test_idle_for_estimate_is_zero_and_says_so():
    meter = EstimateMeter(watts_per_core=10)
    idle = measure_idle(meter, seconds=100.0)  # returns at once
    assert idle.watts == {"cpu": 0.0} and "~0 when idle" in idle.note
    m = EnergyMeasurement({"cpu": 5.0}, 2.0, {"cpu": "x"}, "estimate", True, 1, "low", "estimate")
    assert m.active(idle).joules == {"cpu": 5.0}


def test_idle_from_another_source_is_refused():
    m = EnergyMeasurement({"gpu": 5.0}, 2.0, {"gpu": "x"}, "nvml", False, 1, "high", "ok")
    with pytest.raises(ValueError, match="idle power came from"):
        m.active(IdlePower({"gpu": 1.0}, 3.0, "rapl"))


def test_phases_inside_one_window_add_up():
    meter = replay({"gpu": [0, 5, 25, 26, 50, 70]}, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    with meter.measure("prefill") as w:
        meter.mark("decode")
        meter.mark("prefill")
        with meter.phase("sample"):
            pass
    m = w.measurement
    assert m.joules["gpu"] == 70
    # prefill: 0->5, 25->26, and 50->70 (after `with meter.phase(...)` the window goes back to prefill)
    assert m.phases["prefill"].joules["gpu"] == pytest.approx(5 + 1 + 20)
    assert m.phases["prefill"].seconds == pytest.approx(3.0)
    assert m.phases["decode"].joules["gpu"] == pytest.approx(20)
    assert m.phases["sample"].joules["gpu"] == pytest.approx(24)
    assert math.fsum(p.total_joules for p in m.phases.values()) == pytest.approx(m.total_joules)
    assert set(m.phases) == {"prefill", "decode", "sample"}


def test_phases_with_sampled_timeline():
    import time

    meter = ConstantPowerMeter({"gpu": 100.0}, sample_interval_s=0.01)
    with meter.measure("prefill") as w:
        time.sleep(0.05)
        meter.mark("decode")
        time.sleep(0.1)
    m = w.measurement
    assert m.joules["gpu"] == pytest.approx(100.0 * m.seconds)
    total = sum(p.joules["gpu"] for p in m.phases.values())
    assert total == pytest.approx(m.joules["gpu"])
    assert m.phases["decode"].seconds > m.phases["prefill"].seconds
    assert len(m.timeline["gpu"]) >= 5 and all(wt == 100.0 for _, wt in m.timeline["gpu"])


def test_phase_recorder_separate_windows():
    meter = replay({"gpu": [0, 10, 10, 40, 50, 55]}, [0.0, 1.0, 1.0, 3.0, 4.0, 5.0])
    rec = PhaseRecorder(meter)
    with rec.phase("prefill"):
        pass
    with rec.phase("decode"):
        pass
    with rec.phase("prefill"):
        pass
    t = rec.totals()
    assert t["prefill"].joules["gpu"] == 15 and t["prefill"].seconds == 2.0
    assert t["decode"].joules["gpu"] == 30
    assert rec.total().total_joules == 45


def test_overlapping_windows():
    meter = replay({"gpu": [0, 10, 30, 60]}, [0.0, 1.0, 2.0, 3.0])
    outer = meter.start()
    inner = meter.start()
    assert meter.stop(inner).joules["gpu"] == 20
    assert meter.stop(outer).joules["gpu"] == 60


def test_stop_without_start():
    with pytest.raises(RuntimeError, match="no measurement window"):
        replay({"gpu": [0]}, [0.0]).stop()


def test_attribute_batch_example():
    prefill = EnergyMeasurement({"gpu": 30.0}, 1.0, {}, "nvml", False, 1, "high", "")
    parts = attribute_batch(prefill, [(6.0, [0, 1, 2]), (4.0, [0, 2]), (1.0, [2])], [10, 0, 20])
    assert parts == pytest.approx([10 + 2 + 2, 0 + 2, 20 + 2 + 2 + 1])
    assert sum(parts) == pytest.approx(41.0)


def test_attribute_batch_errors():
    with pytest.raises(ValueError, match="no active sequence"):
        attribute_batch(1.0, [(2.0, [])], [1])
    with pytest.raises(ValueError, match="out of range"):
        attribute_batch(1.0, [(2.0, [3])], [1, 2])
    with pytest.raises(ValueError, match="duplicate"):
        attribute_batch(1.0, [(2.0, [0, 0])], [1])
    assert attribute_batch(4.0, [], [0, 0]) == [2.0, 2.0]  # empty prompts: equal split


energy = st.floats(min_value=0, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_attribution_sums_to_total(data):
    n = data.draw(st.integers(1, 8))
    prompts = data.draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    steps = data.draw(st.lists(
        st.tuples(energy, st.sets(st.integers(0, n - 1), min_size=1).map(sorted)), max_size=20))
    prefill = data.draw(energy)
    parts = attribute_batch(prefill, steps, prompts)
    total = prefill + math.fsum(j for j, _ in steps)
    assert len(parts) == n and all(p >= 0 for p in parts)
    assert math.fsum(parts) == pytest.approx(total, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=30).map(sorted),
       st.data())
def test_phase_split_sums_to_window(readings, data):
    names = ["prefill", "decode", "other"]
    marks = [data.draw(st.sampled_from(names)) for _ in readings[1:-1]]
    meter = replay({"gpu": readings}, [float(i) for i in range(len(readings))])
    w = meter.start(data.draw(st.sampled_from(names)))
    for name in marks:
        meter.mark(name)
    m = meter.stop(w)
    assert m.joules["gpu"] == pytest.approx(readings[-1] - readings[0])
    assert math.fsum(p.joules["gpu"] for p in m.phases.values()) == pytest.approx(m.joules["gpu"], rel=1e-9, abs=1e-6)
    assert math.fsum(p.seconds for p in m.phases.values()) == pytest.approx(m.seconds)
