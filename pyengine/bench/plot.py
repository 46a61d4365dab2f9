"""`pyengine bench --plot`: J/token per backend and phase, the power timeline, the quality trade-offs."""
from __future__ import annotations

from pathlib import Path

from pyengine.bench.measure import median_of


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
        j = median_of(r["summary"], "decode_joules_per_token")
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
