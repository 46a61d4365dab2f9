"""Energy windows around each phase of a run, net of idle power, and the statistics over repeats."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from pyengine.bench.config import TIMELINE_INTERVAL_S


@dataclass
class UsageEnergy:
    joules: float
    source: str
    estimated: bool
    confidence: str
    fallback_reason: str | None = None
    confidence_reason: str = ""
    method: str = ""
    constants: dict = field(default_factory=dict)


@dataclass
class Phases:
    """One run: (seconds, energy) per phase; energy an EnergyMeasurement, UsageEnergy or None.
    decode_is_total: the decode entry is the whole generate call (HF), prefill to be subtracted."""

    prefill: tuple
    decode: tuple | None
    decode_is_total: bool = False


def joules_of(e):
    if e is None:
        return None
    return e.total_joules if hasattr(e, "total_joules") else e.joules


def measure(runner, kind, rows, cfg, meter, idle, runs_per_window=1):
    """One measured repeat: a dict of phases with tokens, seconds, joules (gross and active)."""
    from pyengine.energy import net_of_idle

    B = len(rows)
    n_prompt = len(rows[0][1])
    outer = meter.start() if meter is not None and (runs_per_window > 1 or meter.record_timeline) else None
    marks, runs = [], []
    for _ in range(runs_per_window):
        t0 = time.perf_counter()
        if kind == "prefill":
            ph = runner.run_prefill(rows, meter)
        else:
            ph = runner.run_generate(rows, cfg.new_tokens, meter)
        if outer is not None:
            rel, end = t0 - outer.t0, time.perf_counter() - outer.t0
            marks.append(("prefill", rel, rel + ph.prefill[0]))
            if ph.decode is not None:
                marks.append(("generate" if ph.decode_is_total else "decode", rel + ph.prefill[0], end))
        runs.append(ph)
    outer_m = meter.stop(outer) if outer is not None else None

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return math.fsum(xs) / len(xs) if xs else None

    p_sec = mean([r.prefill[0] for r in runs])
    p_j = mean([joules_of(r.prefill[1]) for r in runs])
    d_sec = d_j = None
    if kind == "generate":
        d_sec = mean([r.decode[0] for r in runs])
        d_j = mean([joules_of(r.decode[1]) for r in runs])
        if runs[0].decode_is_total and d_j is not None:
            d_j = max(d_j - p_j, 0.0)  # decode = generate - prefill
    energies = [e for r in runs for e in (r.prefill[1], r.decode[1] if r.decode else None) if e is not None]
    method = "one window per phase"
    overhead = None
    if runs_per_window > 1 and outer_m is not None:
        # one window over k runs (NVML minimum window): each phase is charged the window's average
        # watts x its own seconds; the rest of the window (Python between runs, and HF's second
        # prefill inside generate, as decode = generate - prefill) is overhead, charged to no phase
        watts = outer_m.average_watts
        p_j = watts * p_sec
        d_j = watts * d_sec if kind == "generate" else None
        charged_s = p_sec + (d_sec or 0.0)
        rest_s = outer_m.seconds / runs_per_window - charged_s
        overhead = {"seconds": rest_s, "joules": outer_m.total_joules / runs_per_window - watts * charged_s,
                    "average_watts": watts, "per": "run",
                    "what": "window time outside the phases: Python between runs"
                            + (", and HF's prefill inside generate" if runs[0].decode_is_total else "")}
        energies = [outer_m]
        method = f"{runs_per_window} runs in one window, each phase charged the window's average watts x its seconds"
    idle_w = idle.total_watts if idle is not None else None
    clamped = []

    def phase(name, tokens, seconds, joules):
        active = None
        if joules is not None and idle_w is not None:
            active, was_clamped = net_of_idle(joules, idle_w, seconds)
            if was_clamped:
                clamped.append(name)
        out_ = {"tokens": tokens, "seconds": seconds, "joules": joules, "active_joules": active,
                "tokens_per_s": tokens / seconds if seconds and tokens else None,
                "joules_per_token": joules / tokens if joules is not None and tokens else None,
                "active_joules_per_token": active / tokens if active is not None and tokens else None}
        if active is not None:
            out_["active_clamped"] = name in clamped
        return out_

    out = {"prefill": phase("prefill", B * n_prompt, p_sec, p_j), "runs_per_window": runs_per_window,
           "energy_method": method if energies else None}
    if overhead is not None:
        out["overhead"] = overhead
    if kind == "generate":
        out["decode"] = phase("decode", B * (cfg.new_tokens - 1), d_sec, d_j)
        gen_j = None if p_j is None else p_j + (d_j or 0.0)
        out["generate"] = phase("generate", B * cfg.new_tokens, p_sec + d_sec, gen_j)
        out["generate"]["prompt_tokens"] = B * n_prompt
    out["energy"] = energy_meta(energies)
    if clamped and out["energy"] is not None:
        # as EnergyMeasurement.active() does: a window below idle power is reported, never hidden
        note = f"idle subtraction clamped at 0 for {', '.join(clamped)} (the phase used less than idle power)"
        out["energy"]["confidence"] = "low"
        out["energy"]["confidence_reason"] = "; ".join(x for x in (out["energy"]["confidence_reason"], note) if x)
    if outer_m is not None and outer_m.timeline:
        out["timeline"] = {"power": {d: [list(p) for p in pts] for d, pts in outer_m.timeline.items()},
                           "phases": [list(m) for m in marks], "seconds": outer_m.seconds}
    return out


def energy_meta(energies) -> dict | None:
    if not energies:
        return None
    first = energies[0]
    low = [e for e in energies if e.confidence == "low"]
    return {"source": first.source, "estimated": any(e.estimated for e in energies),
            "method": first.method, "constants": dict(first.constants),
            "confidence": "low" if low else "high",
            "confidence_reason": (low[0] if low else first).confidence_reason or None,
            "fallback_reason": first.fallback_reason}


def make_bench_meter(cfg):
    from pyengine.energy import make_meter

    meter = make_meter(cfg.energy_source, device=cfg.device)
    if not meter.estimated and meter.name in ("nvml", "rapl", "nvml+rapl"):
        # sample power for a timeline; the estimate is not sampled (its sampler thread's own CPU
        # time would be counted in what it estimates)
        reason = meter.fallback_reason
        meter.close()
        meter = make_meter(meter.name, device=cfg.device, sample_interval_s=TIMELINE_INTERVAL_S)
        meter.fallback_reason = reason
    return meter


def stats_of(values):
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) > 1 else (xs[0], xs[0]))
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "n": len(xs)}


METRICS = {
    "prefill_tokens_per_s": ("prefill", "tokens_per_s"),
    "decode_tokens_per_s": ("decode", "tokens_per_s"),
    "prefill_joules_per_token": ("prefill", "joules_per_token"),
    "decode_joules_per_token": ("decode", "joules_per_token"),
    "prefill_active_joules_per_token": ("prefill", "active_joules_per_token"),
    "decode_active_joules_per_token": ("decode", "active_joules_per_token"),
    "generate_joules_per_token": ("generate", "joules_per_token"),
}


def summarize(repeats: list[dict], cfg) -> dict:
    from pyengine.energy import grams_per_1k_tokens

    out = {}
    for key, (ph, field_) in METRICS.items():
        out[key] = stats_of([r[ph][field_] for r in repeats if ph in r])
    watts = [r["generate"]["joules"] / r["generate"]["seconds"] for r in repeats
             if r["generate"]["joules"] is not None and r["generate"]["seconds"]]
    out["average_watts"] = stats_of(watts)
    grams = [grams_per_1k_tokens(r["generate"]["joules"], r["generate"]["tokens"], cfg.grid.g_per_kwh, cfg.pue)
             for r in repeats if r["generate"]["joules"] is not None]
    out["g_co2e_per_1k_tokens"] = stats_of(grams)
    return out


def median_of(summary, key):
    s = summary.get(key) if summary else None
    return s["median"] if s else None


def ratio_of(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def saved_pct(x, ref):
    return (1.0 - x / ref) * 100.0 if x is not None and ref not in (None, 0) else None
