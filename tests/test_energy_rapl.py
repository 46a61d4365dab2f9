import builtins
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from pyengine.energy import EnergyPermissionError, EnergySourceError, RaplMeter, make_meter
from pyengine.energy.rapl import find_zones, rapl_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX = 1_000_000_000  # 1 kJ range, in microjoules


def zone(root, zid, name, energy, max_range=MAX, nested_in=None):
    d = root / zid
    d.mkdir()
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    if nested_in is not None:  # real sysfs: the subzone also sits inside its parent's directory
        os.symlink(d, root / nested_in / zid)
    return d


def set_uj(d, value):
    """Atomic, like sysfs: a sampler thread must never see a half-written file."""
    (d / "energy_uj.tmp").write_text(f"{value}\n")
    os.replace(d / "energy_uj.tmp", d / "energy_uj")


@pytest.fixture
def tree(tmp_path):
    """An Intel server socket: package with core and uncore inside it, dram beside it, and psys."""
    z = {
        "pkg": zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000),
        "core": zone(tmp_path, "intel-rapl:0:0", "core", 500_000, nested_in="intel-rapl:0"),
        "uncore": zone(tmp_path, "intel-rapl:0:1", "uncore", 100_000, nested_in="intel-rapl:0"),
        "dram": zone(tmp_path, "intel-rapl:0:2", "dram", 2_000_000, nested_in="intel-rapl:0"),
        "psys": zone(tmp_path, "intel-rapl:1", "psys", 7_000_000),
    }
    (tmp_path / "intel-rapl").mkdir()  # the control-type directory: not a zone
    (tmp_path / "intel-rapl" / "enabled").write_text("1\n")
    return tmp_path, z


def clock(*ts):
    it = iter(ts)
    return lambda: next(it)


def test_only_package_and_dram_are_counted(tree):
    root, z = tree
    meter = RaplMeter(str(root), clock=clock(0.0, 2.0))
    w = meter.start()
    set_uj(z["pkg"], 1_000_000 + 30_000_000)  # +30 J
    set_uj(z["core"], 500_000 + 20_000_000)  # inside the package: must not be added
    set_uj(z["uncore"], 100_000 + 5_000_000)
    set_uj(z["dram"], 2_000_000 + 4_000_000)  # +4 J
    set_uj(z["psys"], 7_000_000 + 90_000_000)  # whole platform: must not be added
    m = meter.stop(w)
    assert m.joules == pytest.approx({"cpu_package": 30.0, "dram": 4.0})
    assert m.total_joules == pytest.approx(34.0)
    assert m.seconds == 2.0 and m.average_watts == pytest.approx(17.0)
    assert "intel-rapl:0 (package-0)" in m.sources["cpu_package"]
    assert "intel-rapl:0:2 (dram)" in m.sources["dram"]
    assert not m.estimated and m.source == "rapl"
    assert m.confidence == "high", m.confidence_reason
    assert m.counter_updates == 1


def test_amd_layout_package_only(tmp_path):
    pkg = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    zone(tmp_path, "intel-rapl:0:0", "core", 0)
    zone(tmp_path, "intel-rapl:1", "package-1", 0)
    meter = RaplMeter(str(tmp_path), clock=clock(0.0, 1.0))
    meter.start()
    set_uj(pkg, 5_000_000)
    m = meter.stop()
    assert m.joules == pytest.approx({"cpu_package": 5.0})
    assert "package-1" in m.sources["cpu_package"]


def test_wraparound_uses_max_energy_range(tree):
    root, z = tree
    set_uj(z["pkg"], MAX - 1_000_000)  # 1 J before the wrap
    meter = RaplMeter(str(root), clock=clock(0.0, 1.0))
    meter.start()
    set_uj(z["pkg"], 2_000_000)  # wrapped: 1 J + 2 J
    m = meter.stop()
    assert m.joules["cpu_package"] == pytest.approx(3.0)
    assert m.joules["dram"] == 0.0


def test_wraps_across_samples_each_counted_once(tree):
    """Marks are reads too: two wraps in one window, each between two reads."""
    root, z = tree
    meter = RaplMeter(str(root), clock=clock(0.0, 1.0, 2.0, 3.0))
    meter.start("first")
    set_uj(z["pkg"], MAX - 1)  # ~ +1000 J
    meter.mark("a")
    set_uj(z["pkg"], 10)  # wrap
    meter.mark("b")
    set_uj(z["pkg"], MAX - 1)  # ~ +1000 J
    m = meter.stop()
    assert m.joules["cpu_package"] == pytest.approx((MAX - 1 - 1_000_000 + 11 + MAX - 11) * 1e-6)
    assert sum(p.joules["cpu_package"] for p in m.phases.values()) == pytest.approx(m.joules["cpu_package"])


def test_guard_sampler_runs_for_wrapping_counters(tree):
    root, _ = tree
    meter = RaplMeter(str(root))
    assert meter.sample_interval_s is not None and meter.sample_interval_s <= 60
    assert meter.record_timeline is False
    timed = RaplMeter(str(root), sample_interval_s=0.01)
    assert timed.record_timeline and timed.sample_interval_s == 0.01


def test_timeline_when_sampling(tree):
    import time

    root, z = tree
    meter = RaplMeter(str(root), sample_interval_s=0.005)
    with meter.measure() as w:
        for i in range(1, 6):
            set_uj(z["pkg"], 1_000_000 + i * 1_000_000)
            set_uj(z["dram"], 2_000_000 + i * 100_000)
            time.sleep(0.02)
    m = w.measurement
    assert m.joules == pytest.approx({"cpu_package": 5.0, "dram": 0.5})
    assert m.timeline is not None and len(m.timeline["cpu_package"]) >= 2
    assert m.counter_updates >= 2 and m.samples >= 3  # several distinct values seen by the sampler
    assert all(t >= 0 and watts >= 0 for t, watts in m.timeline["cpu_package"])


def test_permission_denied_simulated(tree, monkeypatch):
    root, _ = tree
    real_open = builtins.open

    def guarded(path, *a, **k):
        if str(path).endswith("energy_uj") and "max_energy" not in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(EnergyPermissionError) as e:
        RaplMeter(str(root))
    msg = str(e.value)
    assert "permission denied" in msg and "CVE-2020-8694" in msg
    assert "run as root" in msg and "chmod o+r" in msg and "udev" in msg
    assert isinstance(e.value, PermissionError)
    st = rapl_status(str(root))
    assert not st.available and "permission denied" in st.detail
    with pytest.raises(EnergySourceError, match="not available.*permission denied"):
        make_meter("rapl", rapl_root=str(root))
    m = make_meter("auto", rapl_root=str(root))
    assert m.name == "estimate" and "permission denied" in m.fallback_reason


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop to nobody")
def test_permission_denied_real_kernel_check():
    """The real check: a root-only (0400) energy_uj read by an unprivileged process."""
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    base = tempfile.mkdtemp(prefix="rapl-perm-")
    try:
        os.chmod(base, 0o755)
        from pathlib import Path

        root = Path(base)
        pkg = zone(root, "intel-rapl:0", "package-0", 123)
        os.chmod(pkg / "energy_uj", 0o400)
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {REPO!r})
            from pyengine.energy import RaplMeter, EnergyPermissionError
            try:
                RaplMeter({base!r})
            except EnergyPermissionError as e:
                print("PERMISSION", e)
                sys.exit(0)
            sys.exit(3)
        """)

        def drop():
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        r = None
        for exe in (sys.executable, "/usr/bin/python3"):  # the venv's interpreter may live under /root
            try:
                r = subprocess.run([exe, "-c", script], preexec_fn=drop, capture_output=True, text=True,
                                   timeout=60, cwd="/")
                break
            except (PermissionError, FileNotFoundError):
                continue
        if r is None:
            pytest.skip("no Python interpreter that the nobody user may run")
        if r.returncode != 0 and ("PermissionError" in r.stderr or "ModuleNotFoundError" in r.stderr) \
                and "PERMISSION" not in r.stdout:
            pytest.skip(f"the interpreter cannot run as nobody here: {r.stderr[-300:]}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "CVE-2020-8694" in r.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_missing_root(tmp_path):
    with pytest.raises(EnergySourceError, match="not present"):
        RaplMeter(str(tmp_path / "nope"))
    assert "not present" in rapl_status(str(tmp_path / "nope")).detail


def test_no_zones(tmp_path):
    with pytest.raises(EnergySourceError, match="no intel-rapl zones"):
        RaplMeter(str(tmp_path))


def test_no_package_zone(tmp_path):
    zone(tmp_path, "intel-rapl:0", "psys", 0)
    with pytest.raises(EnergySourceError, match="no package zone.*psys"):
        RaplMeter(str(tmp_path))


def test_missing_energy_file(tree):
    root, z = tree
    (z["pkg"] / "energy_uj").unlink()
    with pytest.raises(EnergySourceError, match="energy_uj file .* is missing"):
        RaplMeter(str(root))


def test_missing_max_range(tree):
    root, z = tree
    (z["dram"] / "max_energy_range_uj").unlink()
    with pytest.raises(EnergySourceError, match="max_energy_range_uj"):
        RaplMeter(str(root))


@pytest.mark.parametrize("garbage", ["", "abc", "12.5", "-4", "0x10"])
def test_garbage_contents(tree, garbage):
    root, z = tree
    (z["pkg"] / "energy_uj").write_text(garbage)
    with pytest.raises(EnergySourceError, match="intel-rapl:0/energy_uj"):
        RaplMeter(str(root))


def test_garbage_mid_window_is_an_error_not_zero(tree):
    root, z = tree
    meter = RaplMeter(str(root))
    meter.start()
    (z["pkg"] / "energy_uj").write_text("garbage\n")
    with pytest.raises(EnergySourceError, match="does not hold an integer"):
        meter.stop()
    set_uj(z["pkg"], 5)
    with meter.measure():  # the meter is usable again afterwards
        pass


def test_reading_above_range_is_an_error(tree):
    root, z = tree
    meter = RaplMeter(str(root))
    meter.start()
    set_uj(z["pkg"], MAX + 5)
    with pytest.raises(EnergySourceError, match="exceeds max_energy_range_uj"):
        meter.stop()


def test_find_zones_dedups_nested_links(tree):
    root, _ = tree
    ids = sorted(z for _, z, _, _ in find_zones(str(root)))
    assert ids == ["intel-rapl:0", "intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:0:2", "intel-rapl:1"]


def test_status_available(tree):
    root, _ = tree
    st = rapl_status(str(root))
    assert st.available and "1 package zone" in st.detail and "1 dram zone" in st.detail
