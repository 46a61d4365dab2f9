import pytest

from pyengine.energy import carbon


def test_hand_computed():
    # 3.6 MJ = 1 kWh; at 481 g/kWh and PUE 1.0 -> 481 g
    assert carbon.grams_co2e(3.6e6, "WORLD") == pytest.approx(481.0)
    # 720 J = 0.0002 kWh; France 56 g/kWh; PUE 1.5 -> 0.0168 g
    assert carbon.grams_co2e(720.0, "FR", pue=1.5) == pytest.approx(0.0002 * 56 * 1.5)
    # a number instead of a region
    assert carbon.grams_co2e(36_000.0, 400) == pytest.approx(4.0)
    assert carbon.grams_co2e(36_000.0, "400") == pytest.approx(4.0)


def test_per_1k_tokens():
    # 1800 J for 500 tokens: 0.0005 kWh; x 713 g/kWh (India) x PUE 1.2 = 0.4278 g; per 1000 tokens: x2
    assert carbon.grams_per_1k_tokens(1800.0, 500, "IN", pue=1.2) == pytest.approx(0.0005 * 713 * 1.2 * 2)
    with pytest.raises(ValueError):
        carbon.grams_per_1k_tokens(1.0, 0)


def test_table_contents():
    r = carbon.regions()
    assert len(r) >= 11
    for code in ["WORLD", "CN", "IN", "FR", "DE", "SE", "NO", "PL", "CA", "AU", "BR"]:
        assert 0 < r[code] < 1200, code
    assert (r["PL"], r["SE"], r["IN"]) == (662, 41, 713)  # Ember 2023, as published
    assert 400 < r["WORLD"] < 550
    about = carbon.load_table()["_about"]
    assert about["year"] == 2023 and "Ember" in about["source"]
    gi = carbon.grid_intensity("global")
    assert gi.region == "WORLD" and "Ember, 2023" in str(gi)


def test_defaults_and_env(monkeypatch):
    monkeypatch.delenv(carbon.INTENSITY_ENV, raising=False)
    assert carbon.DEFAULT_PUE == 1.0
    assert carbon.grid_intensity().region == "WORLD"
    monkeypatch.setenv(carbon.INTENSITY_ENV, "SE")
    assert carbon.grid_intensity().region == "SE"
    monkeypatch.setenv(carbon.INTENSITY_ENV, "123.5")
    assert carbon.grid_intensity().g_per_kwh == 123.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown grid region"):
        carbon.grid_intensity("ATLANTIS")
    with pytest.raises(ValueError, match="PUE"):
        carbon.grams_co2e(1.0, "FR", pue=0.9)
    with pytest.raises(ValueError):
        carbon.grams_co2e(-1.0)
    with pytest.raises(ValueError):
        carbon.grid_intensity(-3)
