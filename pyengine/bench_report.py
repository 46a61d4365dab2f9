"""`pyengine bench` output: the report dict (what --json writes), the terminal table, the plot."""
from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

import torch

SCHEMA_VERSION = 1
HF = "hf-eager"
ESTIMATE_FOOTNOTE = "~ estimate: process CPU time x W/core, not a measurement"
SPEED_RATIO_NOTE = ("every backend is charged the same watts per busy core, so each ~ ratio (saved, int8 vs fp32, "
                    "break-even) is a ratio of CPU time, i.e. a SPEED ratio, not a measured energy difference")
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def machine_info(device) -> dict:
    import pyengine
    from pyengine import _C, ops
    from pyengine.cli import _cpu_model
    from pyengine.memory import transparent_huge_pages

    import transformers

    info = {
        "cpu_model": _cpu_model(), "isa": ops.active_isa(), "detected_isa": ops.detected_isa(),
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


def _median(summary, key):
    s = summary.get(key) if summary else None
    return s["median"] if s else None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _saved_pct(x, ref):
    return (1.0 - x / ref) * 100.0 if x is not None and ref not in (None, 0) else None


def precision_of(row) -> str:
    """The stored width of a result row's weights: the backend's own (fused-int8, fused-bf16), else its dtype's."""
    from pyengine.backends import BACKENDS

    own = getattr(BACKENDS.get(row["backend"]), "weight_precision", None)
    return own or PRECISION.get(row["dtype"], "fp32")


def roofline_of(cfg, mconfig, bandwidth) -> dict | None:
    """The run's bandwidth readings and the average KV length of a decode step (prompt + half the new tokens)."""
    readings = [g for g in (bandwidth or {}).values() if g]
    if not readings:
        return None
    return {"bandwidth_gb_s": max(readings), "bandwidth_gb_s_start": bandwidth.get("start"),
            "bandwidth_gb_s_end": bandwidth.get("end"), "bandwidth_gb_s_readings": dict(bandwidth),
            "probe_mib": cfg.probe_mib,
            "context": cfg.prompt_tokens + cfg.new_tokens // 2,
            "note": "read bandwidth: best of 10 reads of the probe at the start, after each backend and at the end of "
                    "the run, the highest used (a shared machine slows a probe, never speeds it up); bytes per decoded token: the weights at their stored width once per step shared by the "
                    "batch, plus each sequence's KV cache at the average context"}


def _decode_bytes(row, mconfig, roof) -> dict | None:
    from pyengine.roofline import bytes_per_token

    if roof is None:
        return None
    per = bytes_per_token(mconfig, precision_of(row), roof["context"], row["batch_size"])
    tok_s = roof["bandwidth_gb_s"] * 1e9 / per["total"]
    measured = _median(row["summary"], "decode_tokens_per_s")
    return {"precision": precision_of(row), "bytes_per_token": per, "roofline_tok_s": tok_s,
            "fraction": _ratio(measured, tok_s)}


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
                    "decode_speedup": _ratio(_median(s, "decode_tokens_per_s"), _median(hs, "decode_tokens_per_s")),
                    "prefill_speedup": _ratio(_median(s, "prefill_tokens_per_s"), _median(hs, "prefill_tokens_per_s")),
                    "decode_energy_saved_pct": _saved_pct(_median(s, jkey), _median(hs, jkey)),
                    "energy_basis": "active" if use_active else "gross",
                    "estimate_ratio_is_speed_ratio": bool(meter.estimated),
                }
            energy = next((rep["energy"] for rep in r["repeats"] if rep.get("energy")), None)
            row = {"backend": name, "batch_size": b, **load_info[name], "energy": energy,
                   "summary": s, "vs_hf_eager": vs_all.get(HF), "vs_hf": vs_all, "repeats": r["repeats"],
                   "prefill_repeats": r["prefill_repeats"]}
            row["decode_roofline"] = _decode_bytes(row, mconfig, roof)
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
        j8, j32 = _median(by[("fused-int8", b)]["summary"], basis), _median(by[(fp32, b)]["summary"], basis)
        saved = _saved_pct(j8, j32)
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


# ---- terminal ------------------------------------------------------------------------------------


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
        row += [est + _num(_median(s, "average_watts")), est + _num(_median(s, "g_co2e_per_1k_tokens")),
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


# ---- JSON ----------------------------------------------------------------------------------------


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


# ---- plot ----------------------------------------------------------------------------------------


def plot(report, path: Path) -> None:
    """J/token per backend and phase; the power timeline where one was sampled; then what the user
    came for: decode J/token against quality lost and against bytes read per decoded token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    est = report["energy"]["estimated"]
    has_timeline = any((r["repeats"][-1] if r["repeats"] else {}).get("timeline") for r in results)
    n_rows = 3 if has_timeline else 2
    fig = plt.figure(figsize=(max(10, 1.2 * len(results) + 4), 4.5 * n_rows))
    grid = fig.add_gridspec(n_rows, 2)
    ax1 = fig.add_subplot(grid[0, :])
    labels = [f"{r['backend']}\nB={r['batch_size']}" for r in results]
    xs = range(len(results))
    width = 0.38
    for off, phase, color in ((-width / 2, "prefill", "#4c72b0"), (width / 2, "decode", "#dd8452")):
        vals, errs = [], [[], []]
        for r in results:
            st = r["summary"][f"{phase}_joules_per_token"]
            v = st["median"] if st else float("nan")
            vals.append(v)
            errs[0].append(v - st["min"] if st else 0)
            errs[1].append(st["max"] - v if st else 0)
        ax1.bar([x + off for x in xs], vals, width, yerr=errs, capsize=3, label=phase, color=color,
                hatch="//" if est else None, edgecolor="white" if est else None)
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("J / token (gross, median, min-max)")
    title = f"energy per token by backend and phase - source: {report['energy']['source']}"
    if est:
        title += "\n(ESTIMATE: process CPU time x W/core; its ratios between backends are SPEED ratios)"
    ax1.set_title(title, fontsize=10)
    ax1.legend()
    ax1.set_yscale("log") if _spread_wide(results) else None
    if has_timeline:
        _plot_timeline(fig.add_subplot(grid[1, :]), results)
    _plot_tradeoffs(fig.add_subplot(grid[n_rows - 1, 0]), fig.add_subplot(grid[n_rows - 1, 1]), report)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_timeline(ax, results) -> None:
    t_off = 0.0
    colors = {"prefill": "#4c72b0", "decode": "#dd8452", "generate": "#c44e52"}
    for r in results:
        tl = (r["repeats"][-1] if r["repeats"] else {}).get("timeline")
        if not tl:
            continue
        for d, pts in tl["power"].items():
            if pts:
                ax.plot([t_off + p[0] for p in pts], [p[1] for p in pts], lw=1,
                        label=f"{r['backend']} B={r['batch_size']} {d}")
        for name, a, b in tl["phases"]:
            ax.axvspan(t_off + a, t_off + b, alpha=0.12, color=colors.get(name, "grey"))
        ax.text(t_off, 0.98, f"{r['backend']} B={r['batch_size']}", transform=ax.get_xaxis_transform(),
                fontsize=7, va="top")
        t_off += tl["seconds"] * 1.05
    ax.set_xlabel("seconds (last repeat of each run, laid end to end; shaded: prefill blue, decode orange, "
                  "HF generate red)", fontsize=8)
    ax.set_ylabel("W")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("power over time", fontsize=10)


def _plot_tradeoffs(ax_q, ax_b, report) -> None:
    """Decode J/token (one point per backend and batch size) against quality lost (perplexity
    change vs the reference, %) and against bytes read per decoded token."""
    est = report["energy"]["estimated"]
    q = (report["quality"] or {}).get("backends", {})
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    ylabel = "decode J / token" + (" (ESTIMATE)" if est else "")
    plotted_q = plotted_b = False
    for r in report["results"]:
        j = _median(r["summary"], "decode_joules_per_token")
        if j is None:
            continue
        c, label = colors[r["backend"]], f"{r['backend']} B={r['batch_size']}"
        x = (q.get(r["backend"]) or {}).get("ppl_delta_pct")
        if x is not None:
            ax_q.scatter([x], [j], color=c, marker="o" if r["batch_size"] == 1 else "s")
            ax_q.annotate(label, (x, j), fontsize=6, xytext=(3, 3), textcoords="offset points")
            plotted_q = True
        dr = r.get("decode_roofline")
        if dr:
            mb = dr["bytes_per_token"]["total"] / 1e6
            ax_b.scatter([mb], [j], color=c, marker="o" if r["batch_size"] == 1 else "s")
            ax_b.annotate(label, (mb, j), fontsize=6, xytext=(3, 3), textcoords="offset points")
            plotted_b = True
    if plotted_q:
        ax_q.set_xlabel(f"quality lost: perplexity change vs {report['quality']['reference']}, %", fontsize=8)
        ax_q.set_ylabel(ylabel)
        ax_q.set_title("energy against quality lost", fontsize=10)
    else:
        ax_q.axis("off")
        ax_q.text(0.5, 0.5, "quality not measured (--no-quality)", ha="center", va="center", transform=ax_q.transAxes)
    if plotted_b:
        ax_b.set_xlabel("MB read per decoded token (weights at stored width / batch + KV cache)", fontsize=8)
        ax_b.set_ylabel(ylabel)
        ax_b.set_title("energy against bytes moved per token", fontsize=10)
    else:
        ax_b.axis("off")
        ax_b.text(0.5, 0.5, "no bytes per token: the roofline probe was off (--probe-mib 0) or not a CPU run",
                  ha="center", va="center", fontsize=8, transform=ax_b.transAxes)


def _spread_wide(results) -> bool:
    vals = [r["summary"][k]["median"] for r in results for k in ("prefill_joules_per_token", "decode_joules_per_token")
            if r["summary"][k] and r["summary"][k]["median"] > 0]
    return bool(vals) and max(vals) / min(vals) > 50
