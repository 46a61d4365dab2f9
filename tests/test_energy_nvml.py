"""NVML through a stand-in module with the few pynvml functions the meter uses."""
import math
import threading
import time

import pytest

import pyengine
from pyengine.energy import EnergySourceError, EnergySourceUnavailable, NvmlMeter, make_meter
from pyengine.energy.nvml import NVML_MIN_WINDOW_S, nvml_status


class FakeNvml:
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_LIBRARY_NOT_FOUND = 12

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value
            super().__init__({3: "Not Supported", 12: "NVML Shared Library Not Found"}.get(value, f"error {value}"))

    def __init__(self, energy_mj=None, power_mw=250_000, init_error=None, gpus=1, uuids=None, pci=None):
        self.energy_mj = energy_mj  # None: the counter is not supported
        self.power_mw = power_mw
        self.init_error = init_error
        self.gpus = gpus
        self.uuids = uuids or [f"GPU-{i:04d}" for i in range(gpus)]  # NVML index i has uuids[i]
        self.pci = pci or [f"00000000:{0x10 + i:02X}:00.0" for i in range(gpus)]
        self.inits = self.shutdowns = self.energy_reads = self.power_reads = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i):
        if i >= self.gpus:
            raise self.NVMLError(2)
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise self.NVMLError(2)
        return ("handle", self.uuids.index(uuid))

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        if bus_id not in self.pci:
            raise self.NVMLError(2)
        return ("handle", self.pci.index(bus_id))

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy_mj is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        self.energy_reads += 1
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        self.power_reads += 1
        return self.power_mw


def clock(*ts):
    it = iter(ts)
    return lambda: next(it)


def test_counter_path(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nv = FakeNvml(energy_mj=1_000_000)
    syncs = []
    meter = NvmlMeter("cuda:0", nvml=nv, sync=lambda: syncs.append(1), clock=clock(10.0, 16.0))
    assert meter.mode == "counter" and meter.min_window_s == NVML_MIN_WINDOW_S == 5.0
    w = meter.start()
    nv.energy_mj += 1_500_000  # 1500 J
    m = meter.stop(w)
    assert m.joules == {"gpu": pytest.approx(1500.0)}
    assert m.seconds == 6.0 and m.average_watts == pytest.approx(250.0)
    assert "total_energy_consumption" in m.sources["gpu"] and "Fake H100" in m.sources["gpu"]
    assert m.confidence == "high" and not m.estimated and m.meets_min_window
    assert len(syncs) == 2  # synchronized before the start and the stop reads
    meter.close()
    assert nv.shutdowns == nv.inits == 1


def test_short_window_is_low_confidence():
    nv = FakeNvml(energy_mj=0)
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, clock=clock(0.0, 0.4))
    meter.start()
    nv.energy_mj = 40_000
    m = meter.stop()
    assert m.confidence == "low" and "shorter than 1 s" in m.confidence_reason and "100 ms" in m.confidence_reason
    assert not m.meets_min_window
    assert meter.repeats_for(0.4) == 13  # ceil(5 / 0.4)


def test_counter_that_did_not_move_is_low_confidence():
    nv = FakeNvml(energy_mj=7)
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, clock=clock(0.0, 2.0))
    meter.start()
    m = meter.stop()
    assert m.confidence == "low" and "did not change" in m.confidence_reason


def test_counter_going_backwards_is_an_error():
    nv = FakeNvml(energy_mj=1000)
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None)
    meter.start()
    nv.energy_mj = 10
    with pytest.raises(EnergySourceError, match="went backwards"):
        meter.stop()


def test_not_supported_falls_back_to_power_polling():
    nv = FakeNvml(energy_mj=None, power_mw=200_000)  # 200 W, constant
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None)
    assert meter.mode == "power" and meter.sample_interval_s == pytest.approx(0.02)
    assert "not supported" in meter.counter_missing_reason.lower()
    with meter.measure() as w:
        time.sleep(0.3)
    m = w.measurement
    assert "power_usage polled every 20 ms" in m.sources["gpu"]
    # the switch from the counter to polled power is a fallback, and says so
    assert "energy counter not supported (Not Supported)" in meter.fallback_reason
    assert m.fallback_reason == meter.fallback_reason and m.method == "NVML polled power, trapezoid rule"
    assert m.joules["gpu"] == pytest.approx(200.0 * m.seconds, rel=1e-6)
    assert nv.power_reads >= 5  # the background thread polled
    assert m.confidence == "low"  # 0.3 s < 1 s


def test_power_polling_trapezoid_with_scripted_clock():
    nv = FakeNvml(energy_mj=None)
    powers = iter([100_000, 100_000, 300_000, 300_000])  # first read is the probe in __init__
    nv.nvmlDeviceGetPowerUsage = lambda h: next(powers)
    # no background thread: power_interval_s huge, so only start / mark / stop read
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, power_interval_s=1e9, clock=clock(0.0, 2.0, 3.0),
                      sample_interval_s=1e9)
    meter.start("prefill")
    meter.mark("decode")
    m = meter.stop()
    # 0-2 s: (100+300)/2 * 2 = 400 J; 2-3 s: 300 J
    assert m.joules["gpu"] == pytest.approx(700.0)
    assert m.phases["prefill"].joules["gpu"] == pytest.approx(400.0)
    assert m.phases["decode"].joules["gpu"] == pytest.approx(300.0)
    assert m.timeline is not None and [w for _, w in m.timeline["gpu"]] == [300.0, 300.0]


def test_force_power_polling():
    meter = NvmlMeter(0, nvml=FakeNvml(energy_mj=5), sync=lambda: None, force_power_polling=True,
                      fallback_reason="rapl not asked")
    assert meter.mode == "power"
    assert meter.fallback_reason == ("rapl not asked; NVML energy counter switched off (force_power_polling): "
                                     "integrating power polled every 20 ms instead")
    meter.close()


def test_counter_that_cannot_resolve_a_short_window_is_estimated_from_power():
    # A 4 ms prefill: the counter (updated every 100 ms) does not move; 300 W read at start and end.
    nv = FakeNvml(energy_mj=1000, power_mw=300_000)
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, clock=clock(0.0, 0.004, 0.5), identity={})
    meter.start("prefill")
    meter.mark("decode")
    nv.energy_mj += 150_000  # the counter updates during decode: 150 J
    m = meter.stop()
    pre, dec = m.phases["prefill"], m.phases["decode"]
    assert pre.joules["gpu"] == pytest.approx(300.0 * 0.004)  # not 0 J
    assert pre.power_estimated == ["gpu"] and pre.confidence == "low"
    assert "ESTIMATED from the power read" in pre.confidence_reason
    assert "mean power read at its start and end" in pre.sources["gpu"]
    assert dec.power_estimated == []
    # the counter's 150 J jump in decode includes the prefill's energy: charged once, not twice
    assert dec.joules["gpu"] == pytest.approx(150.0 - 300.0 * 0.004)
    assert pre.joules["gpu"] + dec.joules["gpu"] == pytest.approx(m.joules["gpu"])
    # a still counter over a long window is a stuck counter: flagged, not estimated
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, clock=clock(0.0, 2.0), identity={})
    meter.start()
    m = meter.stop()
    assert m.joules["gpu"] == 0.0 and m.power_estimated == [] and "did not change" in m.confidence_reason


def test_timeline_is_not_sampled_faster_than_the_counter_updates():
    meter = NvmlMeter(0, nvml=FakeNvml(energy_mj=0), sync=lambda: None, sample_interval_s=0.02, identity={})
    assert meter.update_period_s == 0.1 and meter.sample_interval_s == pytest.approx(0.1)
    polled = NvmlMeter(0, nvml=FakeNvml(energy_mj=None), sync=lambda: None, sample_interval_s=0.02, identity={})
    assert polled.sample_interval_s == pytest.approx(0.02)  # polled power: no counter period


def test_nvml_plus_rapl_in_one_window(tmp_path):
    from pyengine.energy import CombinedMeter

    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("1000000\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    nv = FakeNvml(energy_mj=0)
    meter = make_meter("nvml+rapl", device="cuda:0", nvml=nv, rapl_root=str(tmp_path))
    assert isinstance(meter, CombinedMeter) and meter.name == "nvml+rapl"
    w = meter.start()
    nv.energy_mj += 200_000  # 200 J on the GPU
    (zone / "energy_uj").write_text(f"{1_000_000 + 30_000_000}\n")  # 30 J on the CPU package
    m = meter.stop(w)
    assert m.joules == {"gpu": pytest.approx(200.0), "cpu_package": pytest.approx(30.0)}
    assert m.source == "nvml+rapl" and m.method == "NVML energy counter + RAPL energy counter"
    meter.close()
    assert nv.shutdowns == 1
    with pytest.raises(EnergySourceUnavailable, match="'nvml\\+rapl' is not available"):
        make_meter("nvml+rapl", device="cuda:0", nvml=nv, rapl_root=str(tmp_path / "none"))


def test_other_counter_error_is_not_hidden():
    nv = FakeNvml(energy_mj=0)

    def boom(h):
        raise nv.NVMLError(999)

    nv.nvmlDeviceGetTotalEnergyConsumption = boom
    with pytest.raises(EnergySourceError, match="energy counter failed"):
        NvmlMeter(0, nvml=nv, sync=lambda: None)
    assert nv.shutdowns == 1  # init balanced by shutdown on failure


def test_init_failure():
    nv = FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(EnergySourceError, match="no NVIDIA driver.*Library Not Found"):
        NvmlMeter(0, nvml=nv)
    st = nvml_status(nv)
    assert not st.available and "no NVIDIA driver" in st.detail
    with pytest.raises(EnergySourceUnavailable, match="'nvml' is not available: nvml: no NVIDIA driver"):
        make_meter("nvml", device="cuda:0", nvml=nv)


def test_status_with_fake():
    assert nvml_status(FakeNvml(energy_mj=0, gpus=2)).detail == "2 GPU(s) (0: energy counter; 1: energy counter)"
    assert "power polling" in nvml_status(FakeNvml(energy_mj=None)).detail
    assert not nvml_status(FakeNvml(gpus=0)).available


def test_cuda_visible_devices_mapping(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    meter = NvmlMeter("cuda:0", nvml=FakeNvml(energy_mj=0, gpus=2), sync=lambda: None, identity={})
    assert meter.handle == ("handle", 1) and "NVML index 1" in meter.channels[0].label
    assert "by order" in meter.channels[0].label
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(EnergySourceError, match="not in CUDA_VISIBLE_DEVICES"):
        NvmlMeter("cuda:1", nvml=FakeNvml(energy_mj=0, gpus=2), sync=lambda: None, identity={})


def test_cuda_device_found_by_uuid_then_pci_bus_id_not_by_order(monkeypatch):
    # CUDA's cuda:0 is NVML's index 1 (CUDA orders fastest first, NVML by PCI bus): the UUID decides.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nv = FakeNvml(energy_mj=0, gpus=2, uuids=["GPU-slow", "GPU-fast"])
    meter = NvmlMeter("cuda:0", nvml=nv, sync=lambda: None, identity={"uuid": "GPU-fast"})
    assert meter.handle == ("handle", 1) and "matched by UUID GPU-fast" in meter.channels[0].label
    meter = NvmlMeter("cuda:0", nvml=nv, sync=lambda: None, identity={"pci_bus_id": "00000000:11:00.0"})
    assert meter.handle == ("handle", 1) and "PCI bus id 00000000:11:00.0" in meter.channels[0].label
    with pytest.raises(EnergySourceError, match="no NVML device for cuda:0"):
        NvmlMeter("cuda:0", nvml=nv, sync=lambda: None, identity={"uuid": "GPU-missing"})


def test_cuda_device_identity_from_torch_properties(monkeypatch):
    import sys
    from types import SimpleNamespace

    from pyengine.energy.nvml import cuda_device_identity

    props = SimpleNamespace(uuid="1b2c", pci_bus_id=0x3B, pci_device_id=0, pci_domain_id=0)
    cuda = SimpleNamespace(is_available=lambda: True, get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert cuda_device_identity(0) == {"uuid": "GPU-1b2c", "pci_bus_id": "00000000:3B:00.0"}
    cuda.is_available = lambda: False
    assert cuda_device_identity(0) == {}


def test_auto_picks_nvml_for_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    m = make_meter("auto", device="cuda:0", nvml=FakeNvml(energy_mj=0), rapl_root=str(tmp_path / "none"))
    assert m.name == "nvml" and m.fallback_reason is None


def test_auto_cuda_without_nvml_says_gpu_not_included(tmp_path):
    m = make_meter("auto", device="cuda", nvml=FakeNvml(init_error=12), rapl_root=str(tmp_path / "none"))
    assert m.name == "estimate"
    assert "nvml unavailable: no NVIDIA driver" in m.fallback_reason
    assert "rapl unavailable" in m.fallback_reason and "GPU energy is NOT included" in m.fallback_reason


def _real_gpu_or_skip():
    try:
        import pynvml
    except ImportError:
        pytest.skip("pynvml not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA GPU / driver here: {e}")
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            pytest.skip("NVML reports no GPU")
    finally:
        pynvml.nvmlShutdown()


def test_real_nvml():
    _real_gpu_or_skip()
    with NvmlMeter(0) as meter:
        with meter.measure() as w:
            time.sleep(1.2)
        m = w.measurement
    assert m.joules["gpu"] > 0 and 1.0 < m.seconds < 5.0
    assert m.source == "nvml" and not m.estimated


# ---- the scheduler's per-request joules with a counter too coarse for short steps ---------------------

COUNTER_PERIOD_S = 0.1


class FakeGpuTime:
    """GPU time for a CPU engine: each prefill chunk takes `per_prompt_token_s` x its tokens and each
    decode step `decode_step_s`, on a clock the meter reads. The model's work advances it (the outermost
    of forward / hidden_states / decode_greedy), so step lengths are the same on any host."""

    def __init__(self, engine, monkeypatch, *, per_prompt_token_s, decode_step_s, t0=0.0005):
        self.t = t0
        self.depth = 0
        model = engine.model
        for name in ("forward", "hidden_states", "decode_greedy"):
            monkeypatch.setattr(model, name, self._timed(getattr(model, name), engine, per_prompt_token_s,
                                                         decode_step_s))

    def _timed(self, fn, engine, per_prompt_token_s, decode_step_s):
        def run(tokens, cache, *args, **kwargs):
            self.depth += 1
            try:
                return fn(tokens, cache, *args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    decoding = cache is engine.scheduler._batch
                    self.t += decode_step_s if decoding else per_prompt_token_s * tokens.shape[-1]
        return run

    def __call__(self):
        return self.t


class SteppedCounterNvml(FakeNvml):
    """A GPU drawing `watts` whose energy counter shows it, like NVML's, only every 100 ms: the counter
    reads watts x the last 100 ms boundary of the fake GPU clock."""

    def __init__(self, watts, clock):
        super().__init__(energy_mj=0, power_mw=watts * 1000)
        self.watts, self.clock = watts, clock

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return round(self.watts * 1000 * COUNTER_PERIOD_S * math.floor(self.clock() / COUNTER_PERIOD_S))


def _gpu_engine(tiny_models, monkeypatch, **gpu_time):
    engine = pyengine.load(tiny_models["llama"], backend="fused-int8", progress=False)
    clock = FakeGpuTime(engine, monkeypatch, **gpu_time)
    nv = SteppedCounterNvml(300, clock)
    meter = NvmlMeter(0, nvml=nv, sync=lambda: None, clock=clock, identity={})
    assert meter.update_period_s == COUNTER_PERIOD_S
    return engine, clock, nv, meter


def _idle_until_the_counter_has_caught_up(engine, clock):
    """The GPU idles (at the same 300 W) past the next counter updates; closing the engine reads that
    idle lap, whose counter jump settles what earlier short steps were charged from power."""
    clock.t += 3 * COUNTER_PERIOD_S
    scheduler = engine.scheduler
    engine.close()
    return scheduler


def test_a_short_prefill_is_charged_from_power_and_a_long_one_from_the_counter(tiny_models, monkeypatch):
    # Prefill 8 ms a prompt token, a decode step 30 ms; the counter updates every 100 ms.
    engine, clock, nv, meter = _gpu_engine(tiny_models, monkeypatch, per_prompt_token_s=0.008, decode_step_s=0.03)
    outer = meter.start()  # the meter's own total over everything the engine runs
    try:
        long_prompt = "The quick brown fox jumps over the lazy dog " * 4
        t0, c0 = clock.t, nv.nvmlDeviceGetTotalEnergyConsumption(None) / 1000
        long = engine.generate(long_prompt, max_new_tokens=6, ignore_eos=True, measure_energy=meter)
        prefill_s = 0.008 * long.usage.prompt_tokens
        assert prefill_s > 2 * COUNTER_PERIOD_S  # long enough for the counter: it moved, and counts
        counter_jump = 300 * COUNTER_PERIOD_S * math.floor((t0 + prefill_s) / COUNTER_PERIOD_S) - c0
        e = long.usage.energy
        assert e["prefill_joules"] == pytest.approx(counter_jump)
        assert e["prefill_joules"] != pytest.approx(300 * prefill_s)  # the counter's, not a power estimate
        assert e["counter_updates"]["prefill"] == 1

        # Idle to just past a counter update, once the scheduler has let the long request go (else the
        # idle time could land in the short prefill's step).
        deadline = time.monotonic() + 30
        while engine.scheduler._running and time.monotonic() < deadline:
            time.sleep(0.001)
        clock.t = math.ceil(clock.t / COUNTER_PERIOD_S) * COUNTER_PERIOD_S + 0.0005
        short = engine.generate("fox", max_new_tokens=8, ignore_eos=True, measure_energy=meter)
        e = short.usage.energy
        prefill_s = 0.008 * short.usage.prompt_tokens
        assert prefill_s < COUNTER_PERIOD_S / 2
        assert e["counter_updates"]["prefill"] == 0
        assert e["prefill_joules"] == pytest.approx(300 * prefill_s) and e["prefill_joules"] > 0  # not 0 J
        assert e["power_estimated"] == ["gpu"] and e["confidence"] == "low"
        assert "ESTIMATED from the power read" in e["confidence_reason"]
        assert e["power_estimated_joules"]["gpu"] >= e["prefill_joules"]  # the prefill and the short decode steps
        assert e["joules"] == pytest.approx(e["prefill_joules"] + e["decode_joules"])
    finally:
        scheduler = _idle_until_the_counter_has_caught_up(engine, clock)
        total = meter.stop(outer)
        meter.close()
    # what was charged from power came off later counter jumps: nothing counted twice or lost
    requests = long.usage.energy["joules"] + short.usage.energy["joules"]
    assert requests == pytest.approx(scheduler.attributed_joules)
    assert scheduler.attributed_joules + scheduler.idle_joules == pytest.approx(total.joules["gpu"])
    assert total.power_estimated == [] and total.joules["gpu"] > 0


def test_concurrent_requests_short_steps_from_power_add_up_to_the_counter(tiny_models, monkeypatch):
    # A decode step 50 ms, prompt tokens 0.5 ms: every decode step and every prefill chunk is shorter
    # than the counter can resolve; a request joins while another decodes.
    engine, clock, nv, meter = _gpu_engine(tiny_models, monkeypatch, per_prompt_token_s=0.0005, decode_step_s=0.05)
    outer = meter.start()
    steps = []
    joiner_submitted = threading.Event()

    def on_step(kind, seconds, reqs):
        steps.append((kind, list(reqs)))
        if sum(k == "decode" for k, _ in steps) == 3:  # the driver decodes on only once the joiner is queued
            joiner_submitted.wait(60)

    engine.scheduler.on_step = on_step
    try:
        driver = engine.stream("The quick brown fox", max_new_tokens=24, ignore_eos=True, measure_energy=meter)
        deadline = time.monotonic() + 60
        while not engine.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.001)  # until the driver is prefilled: it decodes from now on
        joiner = engine.stream("fox", max_new_tokens=10, ignore_eos=True, measure_energy=meter)
        joiner_submitted.set()
        for stream in (driver, joiner):
            for _ in stream:
                pass
        requests = list(dict.fromkeys(r for _, reqs in steps for r in reqs))
        results = [r.result for r in requests]
        assert len(results) == 2 and all(r.finish_reason == "length" for r in results)
        assert steps[1][0] == "decode" and any(kind == "prefill" and reqs == [requests[1]] for kind, reqs in steps[2:])
        assert any(kind == "decode" and len(reqs) == 2 for kind, reqs in steps)  # they shared steps
        for r in results:
            e = r.usage.energy
            assert e["counter_updates"]["prefill"] == 0
            assert e["prefill_joules"] == pytest.approx(300 * 0.0005 * r.usage.prompt_tokens)
            assert e["power_estimated"] == ["gpu"] and "ESTIMATED" in e["confidence_reason"]
            assert e["decode_joules"] > 0
    finally:
        scheduler = _idle_until_the_counter_has_caught_up(engine, clock)
        total = meter.stop(outer)
        meter.close()
    assert sum(r.usage.energy["joules"] for r in results) == pytest.approx(scheduler.attributed_joules)
    assert scheduler.attributed_joules + scheduler.idle_joules == pytest.approx(total.joules["gpu"])
    # the GPU drew 300 W the whole time: the requests' joules are its active seconds' worth, within a period
    active_s = 0.0005 * sum(r.usage.prompt_tokens for r in results) + 0.05 * sum(k == "decode" for k, _ in steps)
    assert abs(scheduler.attributed_joules - 300 * active_s) <= 300 * COUNTER_PERIOD_S
