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


def build_report(cfg, path, mconfig, meter, idle, idle_note, prompts, long_prompts, results, qualities,
                 reference, load_info, wins) -> dict:
    use_active = idle is not None
    jkey = "decode_active_joules_per_token" if use_active else "decode_joules_per_token"
    rows = []
    for name in cfg.backends:
        for b in cfg.batch_sizes:
            r = results[(name, b)]
            s = r["summary"]
            hf = results.get((HF, b))
            vs = None
            if hf is not None:
                hs = hf["summary"]
                vs = {
                    "decode_speedup": _ratio(_median(s, "decode_tokens_per_s"), _median(hs, "decode_tokens_per_s")),
                    "prefill_speedup": _ratio(_median(s, "prefill_tokens_per_s"), _median(hs, "prefill_tokens_per_s")),
                    "decode_energy_saved_pct": _saved_pct(_median(s, jkey), _median(hs, jkey)),
                    "energy_basis": "active" if use_active else "gross",
                }
            energy = next((rep["energy"] for rep in r["repeats"] if rep.get("energy")), None)
            rows.append({"backend": name, "batch_size": b, **load_info[name], "energy": energy,
                         "summary": s, "vs_hf_eager": vs, "repeats": r["repeats"],
                         "prefill_repeats": r["prefill_repeats"]})
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
                   "fallback_reason": meter.fallback_reason, "min_window_s": meter.min_window_s,
                   "timeline_sampling": bool(meter.record_timeline),
                   "idle": None if idle is None else {"watts": idle.watts, "total_watts": idle.total_watts,
                                                      "seconds": idle.seconds, "source": idle.source,
                                                      "note": idle.note},
                   "idle_note": idle_note,
                   "saved_basis": "active (gross - idle W x seconds)" if use_active else "gross"},
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
            f"{HF}: prefill measured as one forward of the prompt batch; decode = generate - prefill",
            "prefill columns: a separate run with --prefill-tokens tokens per prompt" if cfg.prefill_tokens
            else "prefill columns: the generate call's own prefill (--prefill-tokens 0)",
        ],
    }
    report["tradeoffs"] = tradeoffs(report)
    return report


def tradeoffs(report) -> dict:
    """int8 vs fp32: energy saved against quality lost, per batch size, and the break-even batch."""
    names = {r["backend"] for r in report["results"]}
    basis = "decode_active_joules_per_token" if report["energy"]["idle"] else "decode_joules_per_token"
    out = {"int8": "fused-int8", "fp32": None, "basis": basis, "by_batch": [], "break_even_batch": None,
           "lines": []}
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
        line = (f"batch {b}: fused-int8{f' ({method})' if method else ''} vs {fp32}: decode J/token {_fmt(j8, 4)} "
                f"vs {_fmt(j32, 4)}")
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
        out["lines"].append("int8 did not save energy at any measured batch size")
    else:
        out["lines"].append(f"smallest batch size at which int8 uses less decode J/token than fp32 ({fp32}): "
                            f"{out['break_even_batch']}")
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
    head += ["avg W", "gCO2e/1k tok", "speedup", "saved", "ppl", "Δppl", "KL", "top-1", "greedy"]
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
        row += [est + _num(_median(s, "average_watts")), est + _num(_median(s, "g_co2e_per_1k_tokens")),
                "base" if r["backend"] == HF else
                "-" if vs.get("decode_speedup") is None else f"{vs['decode_speedup']:.2f}x",
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
    lines.append(f"speedup: decode tok/s vs {HF}; saved: decode J/token vs {HF} "
                 f"({'active, idle subtracted' if idle else 'gross'}); {HF} decode = generate - one prefill forward")
    if any_est:
        lines.append(ESTIMATE_FOOTNOTE)
    lines.append("")
    gpu = f"; gpu: {m['gpu']} (driver {m['gpu_driver'] or '?'})" if m.get("gpu") else ""
    lines.append(f"machine: {m['cpu_model']}; isa {m['isa']}; {m['threads']} threads (torch {m['torch_threads']})"
                 f"{gpu}; torch {m['torch']}, transformers {m['transformers']}, pyengine {m['pyengine']}")
    lines.append(f"model: {report['model']['path']} ({report['model']['model_type']}); device {cfgd['device']}")
    lines.append(f"energy source: {en['source']}{' (ESTIMATE)' if en['estimated'] else ''}; "
                 f"fallback: {en['fallback_reason'] or 'none'}")
    if en["idle"]:
        lines.append(f"idle power: {en['idle']['total_watts']:.2f} W ({en['idle']['note']})")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    est = report["energy"]["estimated"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(results) + 4), 9))
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
        title += " (ESTIMATE: process CPU time x W/core)"
    ax1.set_title(title, fontsize=10)
    ax1.legend()
    ax1.set_yscale("log") if _spread_wide(results) else None

    t_off, plotted = 0.0, False
    colors = {"prefill": "#4c72b0", "decode": "#dd8452", "generate": "#c44e52"}
    for r in results:
        tl = (r["repeats"][-1] if r["repeats"] else {}).get("timeline")
        if not tl:
            continue
        for d, pts in tl["power"].items():
            if pts:
                ax2.plot([t_off + p[0] for p in pts], [p[1] for p in pts], lw=1, label=f"{r['backend']} B={r['batch_size']} {d}")
                plotted = True
        for name, a, b in tl["phases"]:
            ax2.axvspan(t_off + a, t_off + b, alpha=0.12, color=colors.get(name, "grey"))
        ax2.text(t_off, 0.98, f"{r['backend']} B={r['batch_size']}", transform=ax2.get_xaxis_transform(),
                 fontsize=7, va="top")
        t_off += tl["seconds"] * 1.05
    if plotted:
        ax2.set_xlabel("seconds (last repeat of each run, laid end to end; shaded: prefill blue, decode orange, "
                       "HF generate red)", fontsize=8)
        ax2.set_ylabel("W")
        ax2.legend(fontsize=6, ncol=2)
        ax2.set_title("power over time", fontsize=10)
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, f"no power timeline: the {report['energy']['source']} meter recorded none\n"
                 "(timelines come from sampling a hardware source, NVML or RAPL; the estimate is not sampled)",
                 ha="center", va="center", fontsize=10, transform=ax2.transAxes)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread_wide(results) -> bool:
    vals = [r["summary"][k]["median"] for r in results for k in ("prefill_joules_per_token", "decode_joules_per_token")
            if r["summary"][k] and r["summary"][k]["median"] > 0]
    return bool(vals) and max(vals) / min(vals) > 50
