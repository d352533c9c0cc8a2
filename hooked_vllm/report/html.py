"""The report: one self-contained HTML file (plotly.js inlined) and PNG exports.

PNGs are drawn with matplotlib, so no browser is needed (plotly's own static export requires
Chrome through kaleido).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from hooked_vllm.report import figures


def write_report(
    out_dir: str | Path,
    aggregates: dict,
    rows: list[dict],
    tokenizer,
    *,
    title: str,
    warning: str | None = None,
) -> Path:
    """Write ``report.html`` and ``phase_diagram.png``/``attention.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    figs = [
        figures.phase_diagram(aggregates, title),
        figures.attention_by_pair(aggregates),
        figures.saliency_maps(aggregates, "saliency_last"),
        figures.saliency_maps(aggregates, "saliency_text"),
        figures.lens_convergence(aggregates),
        figures.verbalization_table(rows, tokenizer),
    ]
    parts = []
    for i, fig in enumerate(f for f in figs if f is not None):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    banner = f'<div class="warn">{html.escape(warning)}</div>' if warning else ""

    def where(phase: dict) -> str:
        return f"layers {phase['start']}-{phase['end']}" if phase["found"] else "not found"

    phases = "".join(
        f"<tr><td>{html.escape(p['name'])}</td><td>{where(p)}</td><td>{html.escape(p['evidence'])}</td></tr>"
        for p in aggregates["phases"]
    )
    skipped = aggregates.get("skipped") or []
    skipped_html = (
        "<p>Skipped images: " + ", ".join(html.escape(path) for path, _ in skipped) + "</p>"
        if skipped
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}
.warn{{background:#ffe08a;border:2px solid #c90;padding:12px;font-weight:bold;margin:12px 0}}
td{{padding:2px 10px}}</style></head><body>
<h1>{html.escape(title)}</h1>{banner}
<p>{aggregates["n_items"]} items, {aggregates["n_layers"]} language-model layers.</p>
<table><tr><th>phase</th><th>where</th><th>evidence</th></tr>{phases}</table>{skipped_html}
{"".join(parts)}</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    write_pngs(out_dir, aggregates, title, warning)
    return path


def write_pngs(out_dir: Path, aggregates: dict, title: str, warning: str | None = None) -> list[Path]:
    """The phase diagram and attention-by-pair figures as PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = aggregates["contextualization"]
    adjusted = aggregates.get("phases_from") == "adjusted_mean"
    key, ci_key = ("adjusted_mean", "adjusted_ci95") if adjusted else ("mean", "ci95")
    x = np.arange(aggregates["n_layers"] + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colours = ["#ffc800", "#0096ff", "#dc0050", "#787878"]
    for i, phase in enumerate(aggregates["phases"]):
        if phase["found"]:
            ax.axvspan(phase["start"], phase["end"], color=colours[i], alpha=0.12)
            ax.text(
                phase["start"], 1.0, "I II III IV".split()[i], transform=ax.get_xaxis_transform(), va="top"
            )
    for group, (label, colour) in figures.CURVES.items():
        mean, ci = np.asarray(ctx[group][key]), np.asarray(ctx[group][ci_key])
        ax.plot(x, mean, marker="o", ms=3, color=colour, label=label)
        ax.fill_between(x, mean - ci, mean + ci, color=colour, alpha=0.15)
    ax.set_xlabel("layer (0 = embedding)")
    ax.set_ylabel(("anisotropy-adjusted " if adjusted else "") + "mean cosine")
    ax.set_title(title + ("\n" + warning if warning else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "phase_diagram.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    layers = np.arange(1, aggregates["n_layers"] + 1)
    for pair, stats in aggregates["norm_attention"].items():
        ax.plot(layers, stats["mean"], marker="o", ms=3, label=pair)
    ax.set_xlabel("layer")
    ax.set_ylabel("norm-based attention (block mean)")
    ax.set_title("Norm-based attention by modality pair (query <- key)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "attention.png")
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
