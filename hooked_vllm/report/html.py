"""The report: one self-contained HTML file (plotly.js and the explorer's script inlined, images as
data URIs; it opens offline) and PNG exports.

Layout: an overview (the phase diagram with each phase's rule, where it was found and the evidence,
and what "not found" means for this run; the dataset figures, each with a line on how to read it),
then the explorer of a few chosen items (:mod:`hooked_vllm.report.explorer`): the image, the prompt
as tokens, the model's answer (and whether it is right, where the item has a label), saliency on the
image with a layer slider and a head selector (by default the outline of the top cells on the
untouched picture and the heat map beside it, so the picture's colours stay as they are), the logit
lens on the image grid and at the last position. Layer numbers are the same everywhere
(:data:`LAYER_CONVENTION`).

The file's size does not grow with the number of items: the dataset figures hold per-layer means,
and only the explored items (``--report-items``) carry per-item data.

PNGs are drawn with matplotlib, so no browser is needed (plotly's own static export requires
Chrome through kaleido).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np

from hooked_vllm.analysis.phases import PHASE_RULES
from hooked_vllm.report import figures
from hooked_vllm.report.explorer import ItemView, payload
from hooked_vllm.runs.files import atomic_path, write_text_atomically
from hooked_vllm.runs.phase_diagram import nonfinite_summary

#: how every figure numbers its layers (in the page, the back-quoted names are code)
LAYER_CONVENTION = (
    "Layer numbers are TransformerLens's block indices. The residual stream at layer l is what block l "
    "reads (`blocks.{l}.hook_resid_pre`, HF's `hidden_states[l]`): layer 0 is the embedding and layer L "
    "the final stream after the last block. Attention at layer l is block l's attention (0 to L-1)."
)


def with_code(text: str) -> str:
    """``text`` as HTML, its back-quoted parts as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if k % 2 else part for k, part in enumerate(parts))


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px;color:#222}
.warn{background:#ffe08a;border:2px solid #c90;padding:12px;font-weight:bold;margin:12px 0}
td,th{padding:2px 10px;text-align:left;vertical-align:top} table{border-collapse:collapse}
tr:nth-child(even){background:#f4f4f4} .how{color:#444;max-width:900px}
.notfound{background:#eef4ff;border-left:4px solid #48c;padding:8px 12px;max-width:900px}
#item-index{display:flex;flex-wrap:wrap;gap:8px} #item-index a{display:block;width:110px;font-size:12px;
text-decoration:none;color:#222;border:2px solid transparent} #item-index a.current{border-color:#48c}
#item-index img{width:106px;height:80px;object-fit:contain;display:block;background:#fff}
.right{color:#1a7f37;font-weight:bold} .wrong{color:#c0262d;font-weight:bold}
#item-head{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
#item-answer{font-size:18px;line-height:1.6} #item-answer q{font-family:monospace;background:#f0f0f0;
padding:1px 4px}
.controls{display:flex;flex-wrap:wrap;gap:16px;align-items:center;margin:8px 0}
.tiles{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} figure{margin:0}
figcaption{font-size:12px;color:#555} canvas{image-rendering:pixelated;border:1px solid #ccc}
#bar{width:256px;height:12px;vertical-align:middle} .hover{font-family:monospace;min-height:1.3em}
#prompt{font-family:monospace;line-height:1.8} .tok{padding:1px 2px;margin:0 1px;border-radius:3px;
white-space:pre} .tok.image{background:#ffd9a8} .tok.text{background:#c8f0c8} .tok.special{background:#e4e4e4}
#picture img{border:1px solid #ccc;display:block} code{white-space:nowrap}"""


HOW_TO_READ = {
    "phase": "Mean cosine similarity between tokens, per layer: within the image tokens, within the "
    "instruction tokens, and across the two (inter-modal), baseline-adjusted for anisotropy (the "
    "similarity of tokens from different items is subtracted). Bands: 95% intervals over items. "
    "Shaded: the phases found.",
    "attention": "How much each modality pair contributes to attention outputs: the norm of the part of "
    "a query's attention output that comes from the keys of a group (Kobayashi et al. 2020), left; "
    "the plain attention weight, right. 'text<-image' reads: instruction queries attending to image keys.",
    "saliency": "The norm-based attention each image patch receives, laid out on the image grid "
    "(tiles side by side), averaged over the items that share one layout. Every panel of a figure "
    "shares one colour scale.",
    "lens": "The logit lens at the last position: each layer's residual stream decoded by the final "
    "norm and unembedding. Left axis: KL divergence from the final distribution; right axis: the "
    "fraction of items whose top-1 token is already the final prediction.",
}


def not_found_note(aggregates: dict) -> str | None:
    """What "not found" means for this run, and what to try; None when every phase was found."""
    missing = [p["name"] for p in aggregates["phases"] if not p["found"]]
    if not missing:
        return None
    n_items, n_layers = aggregates["n_items"], aggregates["n_layers"]
    tips = []
    if n_items < 100:
        tips.append(
            f"more items: this run averaged {n_items}; the 95% bands of the phase diagram below show "
            "how noisy that is (the paper used about 1,000 COCO images); raise --n"
        )
    if n_layers < 16:
        tips.append(
            f"a deeper model: the rules look for an early peak, a dip, a late peak and a fall of the "
            f"smoothed curves, which {n_layers} layers barely hold (LLaVA-1.5-7B has 32)"
        )
    tips.append("the curves themselves: the evidence column says which part of each rule failed")
    return (
        f"Not found ({', '.join(missing)}) means this run's curves do not meet that phase's rule by "
        "more than the noise margin (10% of the curve's range after smoothing over 3 layers); the "
        "phase is left out rather than guessed. It is not evidence that the model has no such phase. "
        "To try: " + "; ".join(tips) + "."
    )


def _overview(aggregates: dict) -> str:
    def where(phase: dict) -> str:
        return f"layers {phase['start']}-{phase['end']}" if phase["found"] else "not found"

    rows = "".join(
        f"<tr><td>{'I II III IV'.split()[i]} {html.escape(p['name'])}</td>"
        f"<td>{html.escape(PHASE_RULES.get(p['name'], ''))}</td><td>{where(p)}</td>"
        f"<td>{html.escape(p['evidence'])}</td></tr>"
        for i, p in enumerate(aggregates["phases"])
    )
    note = not_found_note(aggregates)
    note_html = f'<p class="notfound">{html.escape(note)}</p>' if note else ""
    if nonfinite := nonfinite_summary(aggregates):
        note_html = f'<p class="notfound" id="nonfinite">{html.escape(nonfinite)}</p>' + note_html
    return (
        f"<p>{aggregates['n_items']} items, {aggregates['n_layers']} language-model layers (L = "
        f"{aggregates['n_layers']}). {with_code(LAYER_CONVENTION)}</p>"
        "<table><tr><th>phase</th><th>rule</th><th>where</th><th>evidence</th></tr>"
        f"{rows}</table>{note_html}"
    )


def verdict(correct: bool | None) -> str:
    """An answer's mark against its label, as HTML ("" without a label)."""
    if correct is None:
        return ""
    return '<span class="right">right</span>' if correct else '<span class="wrong">wrong</span>'


def _explorer(views: Sequence[ItemView], rows: Sequence[dict], tokenizer) -> str:
    data = payload(views, tokenizer)
    predictions = {r["item_id"]: r for r in rows}
    links = []
    for k, item in enumerate(data["items"]):
        row = predictions.get(item["id"], {})
        if item["answer"] is not None:  # the model's own answer (explorer.answers)
            answer = f"<br>answer {html.escape(repr(item['answer']))} {verdict(item['correct'])}"
        elif "lens_final_token" in row:  # views made without answers: the run's top-1 next token
            answer = f"<br>next token {html.escape(repr(tokenizer.decode([row['lens_final_token']])))}"
        else:
            answer = ""
        links.append(
            f'<a href="#item-{k}" data-item="{k}"><img src="{item["thumbnail"]}" alt="">'
            f"{html.escape(item['id'])}{answer}</a>"
        )
    script = files("hooked_vllm.report").joinpath("explorer.js").read_text()
    # NaN is not JSON: a stray one would blank the whole explorer (payload writes null instead)
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f"""<h2 id="explorer-heading">Items, one by one</h2>
<p class="how">{len(views)} items, spread over the run's item ids (<code>--report-items</code>). Pick one:</p>
<nav id="item-index">{"".join(links)}</nav>
<h3 id="item-title"></h3><div id="item-head"><div id="picture"></div><div id="item-answer"></div></div>
<p class="how">The prompt as the model reads it (green: instruction, orange: image patches, grey: special
tokens and chat template):</p><div id="prompt"></div>
<h3>Where the model looks: norm-based saliency of each image patch</h3>
<p class="how">For the chosen layer and head, the norm of the part of the attention output that comes
from each image patch: for all heads together, ||sum_h alpha_h f_h(x)|| (the quantity averaged in the
figures above); for one head, alpha_h ||f_h(x)||. Received from the instruction (summed over its tokens)
or from the last position (where the answer is produced). {with_code(LAYER_CONVENTION)} So layer l here
is <code>cache["pattern", l]</code>. By default the picture is drawn untouched, the top cells outlined
on it and the heat map beside it: blending the colour scale into the picture changes its colours (a
yellow object would read as salient). Hover a cell for its value.</p>
<div class="controls">
<label>from <select id="source"><option value="text">the instruction</option>
<option value="last">the last position</option></select></label>
<label>head <select id="head"></select></label>
<label>layer <input type="range" id="layer" min="0" max="0" value="0" step="1">
<span id="layer-label"></span></label>
<label><input type="checkbox" id="shared"> one scale for all layers</label></div>
<div class="controls">
<label>on the picture <select id="overlay">
<option value="outline">outline the top cells, heat map beside</option>
<option value="side">nothing (picture and heat map side by side)</option>
<option value="blend">the heat map blended in (changes the picture's colours)</option></select></label>
<label>outline <select id="top"><option value="1">the top cell</option>
<option value="0.1" selected>the top 10% of cells</option><option value="0.25">the top 25% of cells</option>
</select></label>
<label>opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="0.6" disabled>
</label></div>
<p id="sal-title"></p><div class="tiles" id="saliency-tiles"></div>
<p><span id="bar-low"></span> <canvas id="bar" width="256" height="12"></canvas> <span id="bar-high"></span>
(colour scale of the heat maps above)</p><p class="hover" id="sal-hover"></p>
<h3>What each image patch reads as: the logit lens on the image grid</h3>
<p class="how">Each image patch's residual stream decoded into the vocabulary (top-1 token), per layer:
layer 0 is the embedding, layer l the stream block l reads (Hugging Face's hidden_states[l], block
l - 1's output; layer L the final stream; Qwen3-VL adds its DeepStack features to the image positions
after that). The words are written over the untouched picture.</p>
<div class="controls"><label>layer <input type="range" id="lens-layer" min="0" max="1" value="0" step="1">
<span id="lens-label"></span></label></div>
<div class="tiles" id="lens-tiles"></div><p class="hover" id="lens-hover"></p>
<h3>The logit lens at the last position</h3>
<p class="how">The top tokens (with probabilities) the last position's residual stream decodes to,
per layer (0: the embedding, L: the final stream, the model's own next-token distribution).</p>
<table id="lens-last"></table>
<script type="application/json" id="explorer-data">{blob}</script>
<script>{script}</script>"""


def write_report(
    out_dir: str | Path,
    aggregates: dict,
    rows: Sequence[dict],
    tokenizer,
    *,
    title: str,
    warning: str | None = None,
    explorer: Sequence[ItemView] = (),
) -> Path:
    """Write ``report.html`` and ``phase_diagram.png``/``attention.png`` into ``out_dir``.

    ``rows``: the run's per-item rows (for explored items without an answer of their own, the run's
    top-1 next token is shown instead); ``explorer``: the items to show one by one
    (:func:`~hooked_vllm.report.explorer.explore_items`).
    """
    out_dir = Path(out_dir)
    sections = [
        (figures.phase_diagram(aggregates, title), "phase"),
        (figures.attention_by_pair(aggregates), "attention"),
        (figures.saliency_maps(aggregates, "saliency_text"), "saliency"),
        (figures.saliency_maps(aggregates, "saliency_last"), "saliency"),
        (figures.lens_convergence(aggregates), "lens"),
    ]
    parts, first = [], True
    for fig, how in sections:
        if fig is None:
            continue
        parts.append(f'<p class="how">{html.escape(HOW_TO_READ[how])}</p>')
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
        first = False
    banner = f'<div class="warn">{html.escape(warning)}</div>' if warning else ""
    skipped = aggregates.get("skipped") or []
    skipped_html = (
        "<p>Skipped images: " + ", ".join(html.escape(path) for path, _ in skipped) + "</p>"
        if skipped
        else ""
    )
    items_html = _explorer(explorer, rows, tokenizer) if explorer else ""
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>{banner}
<h2>Overview</h2>{_overview(aggregates)}{skipped_html}
{"".join(parts)}
{items_html}
<p class="how">Every item's numbers: <a href="items/">items/</a> (Parquet parts; read them with
<code>hooked_vllm.runs.store.ResultStore(folder).read()</code> or pandas), and
<code>aggregates.json</code>.</p>
</body></html>"""
    path = out_dir / "report.html"
    write_text_atomically(path, page)
    write_pngs(out_dir, aggregates, title, warning)
    return path


def write_pngs(out_dir: Path, aggregates: dict, title: str, warning: str | None = None) -> list[Path]:
    """The phase diagram and attention-by-pair figures as PNG (matplotlib, headless: figures made
    without pyplot, which is slow to import and would switch a notebook's backend)."""
    from matplotlib.figure import Figure

    ctx = aggregates["contextualization"]
    adjusted = aggregates.get("phases_from") == "adjusted_mean"
    key, ci_key = ("adjusted_mean", "adjusted_ci95") if adjusted else ("mean", "ci95")
    x = np.arange(aggregates["n_layers"] + 1)
    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
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
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp)

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
    layers = np.arange(aggregates["n_layers"])  # block l's attention is layer l
    for pair, stats in aggregates["norm_attention"].items():
        ax.plot(layers, stats["mean"], marker="o", ms=3, label=pair)
    ax.set_xlabel("layer (block l's attention)")
    ax.set_ylabel("norm-based attention (block mean)")
    note = figures.no_attention_note(aggregates)
    ax.set_title("Norm-based attention by modality pair (query <- key)" + (f"\n{note}" if note else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "attention.png")
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp)
    return paths
