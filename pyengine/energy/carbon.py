"""Carbon: grams CO2e = kWh x grid carbon intensity (gCO2e/kWh) x PUE.

The grid intensities ship in ``pyengine/data/grid_intensity.json`` (Ember, 2023 annual averages;
the file cites its source). Choose one with a region code ("WORLD", "FR", "IN", ...) or give a
number in gCO2e/kWh; the PYENGINE_GRID_INTENSITY environment variable (code or number) sets the
default, else the world average. PUE (data-centre power usage effectiveness: facility energy /
IT energy) defaults to 1.0, i.e. the energy measured at the chip is all that is counted; typical
hyperscale data centres report about 1.1 to 1.2.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

JOULES_PER_KWH = 3.6e6
DEFAULT_REGION = "WORLD"
DEFAULT_PUE = 1.0
INTENSITY_ENV = "PYENGINE_GRID_INTENSITY"
_DATA = Path(__file__).resolve().parent.parent / "data" / "grid_intensity.json"


@dataclass(frozen=True)
class GridIntensity:
    g_per_kwh: float
    region: str | None
    name: str
    source: str

    def __str__(self):
        return f"{self.g_per_kwh:g} gCO2e/kWh ({self.name}; {self.source})"


@functools.lru_cache(maxsize=1)
def load_table() -> dict:
    with open(_DATA) as f:
        return json.load(f)


def regions() -> dict[str, float]:
    """{region code: gCO2e/kWh} of the shipped table."""
    return {k: float(v["g_per_kwh"]) for k, v in load_table()["regions"].items()}


def grid_intensity(intensity: str | float | None = None) -> GridIntensity:
    """Resolve a region code or a number (gCO2e/kWh); None: PYENGINE_GRID_INTENSITY, else WORLD."""
    if intensity is None:
        intensity = os.environ.get(INTENSITY_ENV) or DEFAULT_REGION
    if isinstance(intensity, GridIntensity):
        return intensity
    if isinstance(intensity, str):
        try:
            intensity = float(intensity)
        except ValueError:
            pass
    if isinstance(intensity, (int, float)):
        if not (math.isfinite(intensity) and intensity >= 0):
            raise ValueError(f"grid intensity must be a non-negative number of gCO2e/kWh, got {intensity}")
        return GridIntensity(float(intensity), None, "set by the user", "user-supplied")
    table = load_table()
    code = intensity.strip().upper()
    code = table.get("aliases", {}).get(code, code)
    if code not in table["regions"]:
        raise ValueError(f"unknown grid region {intensity!r}; known: {', '.join(sorted(table['regions']))} "
                         "(or pass a number in gCO2e/kWh)")
    entry, about = table["regions"][code], table["_about"]
    return GridIntensity(float(entry["g_per_kwh"]), code, entry["name"], f"Ember, {about['year']}")


def _check_pue(pue: float) -> float:
    if not (math.isfinite(pue) and pue >= 1.0):
        raise ValueError(f"PUE is facility energy / IT energy and must be >= 1.0, got {pue}")
    return float(pue)


def joules_to_kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


def grams_co2e(joules: float, intensity: str | float | None = None, pue: float = DEFAULT_PUE) -> float:
    """gCO2e of ``joules`` of IT energy: kWh x intensity x PUE."""
    if joules < 0:
        raise ValueError(f"energy must be non-negative, got {joules} J")
    return joules_to_kwh(joules) * grid_intensity(intensity).g_per_kwh * _check_pue(pue)


def grams_per_1k_tokens(joules: float, tokens: int, intensity: str | float | None = None,
                        pue: float = DEFAULT_PUE) -> float:
    """gCO2e per 1,000 generated tokens, for ``joules`` spent generating ``tokens`` tokens."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    return grams_co2e(joules, intensity, pue) * 1000.0 / tokens
