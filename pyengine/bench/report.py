"""`pyengine bench` output: the report dict (what --json writes) and the terminal table."""
from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

import torch

from pyengine.bench.config import HF
from pyengine.bench.measure import median_of, ratio_of, saved_pct
from pyengine.bench.roofline_columns import decode_bytes, roofline_of


SCHEMA_VERSION = 1
ESTIMATE_FOOTNOTE = "~ estimate: process CPU time x W/core, not a measurement"
SPEED_RATIO_NOTE = ("every backend is charged the same watts per busy core, so each ~ ratio (saved, int8 vs fp32, "
                    "break-even) is a ratio of CPU time, i.e. a SPEED ratio, not a measured energy difference")


def machine_info(device) -> dict:
    import pyengine
    from pyengine import _C
    from pyengine.kernels import ops
    from pyengine.machine import cpu_model
    from pyengine.kernels.memory import transparent_huge_pages

    import transformers

    info = {
        "cpu_model": cpu_model(), "isa": ops.active_isa(), "detected_isa": ops.detected_isa(),
        "threads": _C.num_threads(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "pyengine": pyengine.__version__, "gpu": None, "gpu_driver": None, "cuda": torch.version.cuda,
        "transparent_huge_pages": transparent_huge_pages(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            v = pynvml.nvmlSystemGetDriverVersion()
            info["gpu_driver"] = v.decode() if isinstance(v, bytes) else v
        except Exception:  # noqa: BLE001 - the driver version is informative only
            pass
    return info


def build_report(cfg, path, mconfig, meter, idle, idle_note, prompts, long_prompts, results, qualities,
                 reference, load_info, wins, idle_end=None, bandwidth=None) -> dict:
    from pyengine.energy import idle_drift

    use_active = idle is not None
    jkey = "decode_active_joules_per_token" if use_active else "decode_joules_per_token"
    hf_names = [n for n in cfg.backends if n.startswith(HF)]
    roof = roofline_of(cfg, mconfig, bandwidth)
    rows = []
    for name in cfg.backends:
        for b in cfg.batch_sizes:
            r = results[(name, b)]
            s = r["summary"]
            vs_all = {}
            for hf_name in hf_names:
                hs = results[(hf_name, b)]["summary"]
                vs_all[hf_name] = {
                    "decode_speedup": ratio_of(median_of(s, "decode_tokens_per_s"), median_of(hs, "decode_tokens_per_s")),
                    "prefill_speedup": ratio_of(median_of(s, "prefill_tokens_per_s"), median_of(hs, "prefill_tokens_per_s")),
                    "decode_energy_saved_pct": saved_pct(median_of(s, jkey), median_of(hs, jkey)),
                    "energy_basis": "active" if use_active else "gross",
                    "estimate_ratio_is_speed_ratio": bool(meter.estimated),
                }
            energy = next((rep["energy"] for rep in r["repeats"] if rep.get("energy")), None)
            row = {"backend": name, "batch_size": b, **load_info[name], "energy": energy,
                   "summary": s, "vs_hf_eager": vs_all.get(HF), "vs_hf": vs_all, "repeats": r["repeats"],
                   "prefill_repeats": r["prefill_repeats"]}
            row["decode_roofline"] = decode_bytes(row, mconfig, roof)
            rows.append(row)
    quality = None
    if cfg.quality:
        ref_q = qualities.get(reference)
        per = {}
        for name in cfg.backends:
            q = qualities[name].to_dict()
            q["ppl_delta"] = q["perplexity"] - ref_q.perplexity if ref_q else None
            q["ppl_delta_pct"] = (q["ppl_delta"] / ref_q.perplexity * 100.0) if ref_q else None
            per[name] = q
        g = next((q for q in per.values() if q.get("greedy_prompts")), None)
        quality = {"reference": reference, "corpus": str(cfg.corpus), "tokens": sum(len(w) for w in wins),
                   "window": cfg.quality_window, "windows": len(wins), "backends": per,
                   "kl": "mean over positions of KL(reference || backend), nats",
                   "greedy": (f"share of {g['greedy_prompts']} prompts cut from the corpus "
                              f"({g['greedy_prompt_tokens']} tokens each) whose {g['greedy_new_tokens']} greedy "
                              "tokens equal the reference's" if g else None)}
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "pyengine bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "model": {"path": str(path), "model_type": mconfig.model_type, "vocab_size": mconfig.vocab_size,
                  "max_context": mconfig.max_context},
        "machine": machine_info(cfg.device),
        "energy": {"source": meter.name, "estimated": bool(meter.estimated), "meter": meter.describe(),
                   "method": meter.method, "constants": dict(meter.constants),
                   "estimate_ratios": SPEED_RATIO_NOTE if meter.estimated else None,
                   "fallback_reason": meter.fallback_reason, "min_window_s": meter.min_window_s,
                   "timeline_sampling": bool(meter.record_timeline),
                   "timeline_interval_s": meter.sample_interval_s if meter.record_timeline else None,
                   "idle": _idle_dict(idle), "idle_end": _idle_dict(idle_end),
                   "idle_drift": idle_drift(idle, idle_end)[0] if idle and idle_end else None,
                   "idle_note": idle_note,
                   "saved_basis": "active (gross - idle W x seconds)" if use_active else "gross"},
        "roofline": roof,
        "carbon": {"g_per_kwh": cfg.grid.g_per_kwh, "region": cfg.grid.region, "name": cfg.grid.name,
                   "source": cfg.grid.source, "pue": cfg.pue,
                   "basis": "gross joules of the whole generate call (prefill + decode) per generated token"},
        "prompts": {"prompt_tokens": cfg.prompt_tokens, "prefill_tokens": cfg.prefill_tokens,
                    "new_tokens": cfg.new_tokens,
                    "token_ids": {str(b): [ids for _, ids in rows_] for b, rows_ in prompts.items()}},
        "results": rows,
        "quality": quality,
        "tradeoffs": None,
        "warnings": list(cfg.notes),
        "notes": [
            "decode tokens = batch x (new_tokens - 1): the first new token comes from the prefill forward",
            f"{HF}: prefill measured as one forward of the prompt batch, logits at the last position only "
            "(logits_to_keep=1, as pyengine); decode = generate - prefill",
            f"{HF} runs in fp32, the dtype of pyengine's backends; {HF}-bf16 / -fp16 rows, where present, run HF "
            "in that dtype",
            "prefill columns: a separate run with --prefill-tokens tokens per prompt" if cfg.prefill_tokens
            else "prefill columns: the generate call's own prefill (--prefill-tokens 0)",
        ],
    }
    report["tradeoffs"] = tradeoffs(report)
    return report


def _idle_dict(idle) -> dict | None:
    if idle is None:
        return None
    return {"watts": idle.watts, "total_watts": idle.total_watts, "seconds": idle.seconds, "source": idle.source,
            "window_watts": list(idle.window_watts), "spread_watts": idle.spread_watts, "note": idle.note}


def tradeoffs(report) -> dict:
    """int8 vs fp32: energy saved against quality lost, per batch size, and the break-even batch."""
    names = {r["backend"] for r in report["results"]}
    basis = "decode_active_joules_per_token" if report["energy"]["idle"] else "decode_joules_per_token"
    est = bool(report["energy"].get("estimated"))
    out = {"int8": "fused-int8", "fp32": None, "basis": basis, "by_batch": [], "break_even_batch": None,
           "lines": [], "estimated": est}
    mark = "~ " if est else ""
    if "fused-int8" not in names:
        out["lines"].append("int8 vs fp32: fused-int8 was not run (not requested, or not available in this build)")
        return out
    fp32 = "fused" if "fused" in names else "torch" if "torch" in names else None
    out["fp32"] = fp32
    if fp32 is None:
        out["lines"].append("int8 vs fp32: no fp32 pyengine backend (fused or torch) was run to compare with")
        return out
    by = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    q = (report["quality"] or {}).get("backends", {})
    for b in report["config"]["batch_sizes"]:
        j8, j32 = median_of(by[("fused-int8", b)]["summary"], basis), median_of(by[(fp32, b)]["summary"], basis)
        saved = saved_pct(j8, j32)
        entry = {"batch_size": b, "int8_j_per_token": j8, "fp32_j_per_token": j32, "energy_saved_pct": saved}
        method = by[("fused-int8", b)].get("int8_method")
        line = (f"{mark}batch {b}: fused-int8{f' ({method})' if method else ''} vs {fp32}: decode J/token "
                f"{_fmt(j8, 4)} vs {_fmt(j32, 4)}")
        line += f" ({'saves' if saved is not None and saved >= 0 else 'costs'} {_fmt(abs(saved) if saved is not None else None, 1)}%)"
        if "fused-int8" in q and fp32 in q:
            dppl = q["fused-int8"]["perplexity"] - q[fp32]["perplexity"]
            entry.update(ppl_delta=dppl, ppl_delta_pct=dppl / q[fp32]["perplexity"] * 100.0,
                         kl=q["fused-int8"]["kl"], top1_agreement=q["fused-int8"]["top1_agreement"],
                         greedy_same_share=q["fused-int8"].get("greedy_same_share"))
            line += (f"; quality: ppl {dppl:+.3f} ({entry['ppl_delta_pct']:+.2f}%), KL {_fmt(entry['kl'], 4)}, "
                     f"top-1 {_fmt(_pct(entry['top1_agreement']), 1)}%"
                     + (f", greedy {_fmt(_pct(entry['greedy_same_share']), 0)}%" if entry["greedy_same_share"]
                        is not None else "") + f" vs {q['fused-int8']['reference']}")
        out["by_batch"].append(entry)
        out["lines"].append(line)
        if out["break_even_batch"] is None and j8 is not None and j32 is not None and j8 < j32:
            out["break_even_batch"] = b
    if out["break_even_batch"] is None:
        out["lines"].append(f"{mark}int8 did not save energy at any measured batch size")
    else:
        out["lines"].append(f"{mark}smallest batch size at which int8 uses less decode J/token than fp32 ({fp32}): "
                            f"{out['break_even_batch']}")
    if est:
        out["lines"].append(f"~ ESTIMATE: {SPEED_RATIO_NOTE}")
    return out


def _pct(x):
    return None if x is None else x * 100.0


def _fmt(x, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if digits == "g":
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def _num(x):
    """A compact number: 3 significant digits, no exponent for ordinary magnitudes."""
    if x is None or not math.isfinite(x):
        return "-"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 1 or ax == 0:
        return f"{x:.3g}" if ax < 100 else f"{x:.0f}"
    return f"{x:.3g}"


def _with_spread(stat, est=""):
    if not stat:
        return "-"
    med = stat["median"]
    s = est + _num(med)
    if stat["n"] > 1 and med:
        s += f" ±{(stat['max'] - stat['min']) / 2 / abs(med) * 100:.0f}%"
    return s


def format_report(report) -> str:
    idle = report["energy"]["idle"] is not None
    q = (report["quality"] or {}).get("backends", {})
    head = ["backend", "batch", "prefill tok/s", "decode tok/s", "prefill J/tok", "decode J/tok"]
    if idle:
        head += ["prefill J/tok act", "decode J/tok act"]
    roof = report.get("roofline")
    if roof:
        head += ["MB/tok", "of roofline"]
    head += ["avg W", "gCO2e/1k tok", "speedup", "prefill x", "saved", "ppl", "Δppl", "KL", "top-1", "greedy"]
    body = []
    any_est = False
    for r in report["results"]:
        s, e = r["summary"], r["energy"] or {}
        est = "~" if e.get("estimated") else ""
        any_est = any_est or bool(est)
        vs = r["vs_hf_eager"] or {}
        qq = q.get(r["backend"], {})
        label = r["backend"] + (f" ({r['int8_method']})" if r.get("int8_method") else "")
        row = [label, str(r["batch_size"]), _with_spread(s["prefill_tokens_per_s"]),
               _with_spread(s["decode_tokens_per_s"]), _with_spread(s["prefill_joules_per_token"], est),
               _with_spread(s["decode_joules_per_token"], est)]
        if idle:
            row += [_with_spread(s["prefill_active_joules_per_token"], est),
                    _with_spread(s["decode_active_joules_per_token"], est)]
        if roof:
            dr = r.get("decode_roofline") or {}
            row += [_num(dr["bytes_per_token"]["total"] / 1e6) if dr else "-",
                    "-" if dr.get("fraction") is None else f"{dr['fraction'] * 100:.0f}%"]
        row += [est + _num(median_of(s, "average_watts")), est + _num(median_of(s, "g_co2e_per_1k_tokens")),
                "base" if r["backend"] == HF else
                "-" if vs.get("decode_speedup") is None else f"{vs['decode_speedup']:.2f}x",
                "base" if r["backend"] == HF else
                "-" if vs.get("prefill_speedup") is None else f"{vs['prefill_speedup']:.2f}x",
                "base" if r["backend"] == HF else
                "-" if vs.get("decode_energy_saved_pct") is None else f"{est}{vs['decode_energy_saved_pct']:+.1f}%",
                _num(qq.get("perplexity")),
                "ref" if qq and r["backend"] == (report["quality"] or {}).get("reference") else
                "-" if qq.get("ppl_delta") is None else f"{qq['ppl_delta']:+.3g}",
                "-" if qq.get("kl") is None else f"{qq['kl']:.3g}",
                "-" if qq.get("top1_agreement") is None else f"{qq['top1_agreement'] * 100:.1f}%",
                "-" if qq.get("greedy_same_share") is None else f"{qq['greedy_same_share'] * 100:.0f}%"]
        body.append(row)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    cfgd, m, en, cb = report["config"], report["machine"], report["energy"], report["carbon"]
    lines.append("")
    lines.append(f"medians of {cfgd['repeats']} repeats (± half the min-max range) after {cfgd['warmup']} warm-up; "
                 f"prompt {cfgd['prompt_tokens']} tokens, {cfgd['new_tokens']} new tokens, prefill columns from "
                 + (f"a {cfgd['prefill_tokens']}-token prompt" if cfgd["prefill_tokens"] else "the generate call"))
    lines.append(f"speedup / prefill x: decode / prefill tok/s vs {HF} (fp32, last-position logits); saved: decode "
                 f"J/token vs {HF} ({'active, idle subtracted' if idle else 'gross'}); {HF} decode = generate - one "
                 "prefill forward")
    for r in report["results"]:
        for hf_name, v in (r.get("vs_hf") or {}).items():
            if hf_name != HF and r["backend"] != hf_name and v.get("decode_speedup") is not None:
                lines.append(f"vs {hf_name}: {r['backend']} b={r['batch_size']} decode {v['decode_speedup']:.2f}x, "
                             f"prefill {_fmt(v['prefill_speedup'])}x")
    if roof:
        readings = [g for g in roof["bandwidth_gb_s_readings"].values() if g]
        lines.append(f"MB/tok: bytes read per decoded token (weights at their stored width, shared by the batch, + KV "
                     f"cache at {roof['context']} tokens); of roofline: decode tok/s / reading those bytes at "
                     f"{roof['bandwidth_gb_s']:.1f} GB/s, the highest of {len(readings)} read-bandwidth probes in "
                     f"this run ({_fmt(min(readings), 1)}-{_fmt(max(readings), 1)} GB/s); above 100%: every probe "
                     "was slowed by other work on the machine")
    if any_est:
        w = report["energy"].get("constants", {}).get("watts_per_core")
        lines.append(ESTIMATE_FOOTNOTE + (f" ({w:.3g} W/core: {report['energy']['constants']['watts_per_core_origin']})"
                                          if w else ""))
        lines.append(f"~ ESTIMATE RATIOS ARE SPEED RATIOS: {SPEED_RATIO_NOTE}")
    lines.append("")
    gpu = f"; gpu: {m['gpu']} (driver {m['gpu_driver'] or '?'})" if m.get("gpu") else ""
    lines.append(f"machine: {m['cpu_model']}; isa {m['isa']}; {m['threads']} threads (torch {m['torch_threads']})"
                 f"{gpu}; torch {m['torch']}, transformers {m['transformers']}, pyengine {m['pyengine']}")
    lines.append(f"model: {report['model']['path']} ({report['model']['model_type']}); device {cfgd['device']}")
    lines.append(f"energy source: {en['source']}{' (ESTIMATE)' if en['estimated'] else ''}; "
                 f"fallback: {en['fallback_reason'] or 'none'}")
    if en["idle"]:
        lines.append(f"idle power: {en['idle']['total_watts']:.2f} W ±{en['idle']['spread_watts']:.2f} W "
                     f"({en['idle_note']})")
        if en.get("idle_end"):
            lines.append(f"idle power at the end: {en['idle_end']['total_watts']:.2f} W "
                         f"±{en['idle_end']['spread_watts']:.2f} W (drift {en['idle_drift'] * 100:+.1f}%)")
    else:
        lines.append(f"idle power: {en['idle_note']}")
    lines.append(f"carbon: {cb['g_per_kwh']:g} gCO2e/kWh ({cb['name']}; {cb['source']}), PUE {cb['pue']:g}; "
                 f"{cb['basis']}")
    if report["quality"]:
        qd = report["quality"]
        lines.append(f"quality: {qd['tokens']} tokens of {qd['corpus']} in {qd['windows']} windows of "
                     f"{qd['window']}; reference {qd['reference']}; KL = {qd['kl']}")
        if qd.get("greedy"):
            lines.append(f"greedy: {qd['greedy']}")
    else:
        lines.append("quality: not measured (--no-quality)")
    for line in report["tradeoffs"]["lines"]:
        lines.append(f"trade-off: {line}")
    for note in report["warnings"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def json_safe(x):
    """x for strict JSON: non-finite floats (NaN, +-inf) as None (null), keys as str, paths as str.
    Every result-JSON writer passes its dict through this: write_json here and benchmarks/cpu_roofline.py
    (both then dump with allow_nan=False), and benchmarks/conftest.py's hook on pytest-benchmark's JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(report, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
