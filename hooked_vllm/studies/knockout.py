"""Study 1: attention knockout windows (Zhang, Yadav, Han, Shutova 2024, "Cross-modal information flow
in multimodal large language models", arXiv 2411.18620).

For each edge type (``image->question``, ``image->last``, ``question->last``: the target's queries may
not read the source's keys) and each window of ``k`` consecutive blocks ``[l, l + k)``, the edge is
blocked in those blocks only (:func:`hooked_vllm.interventions.knockout`, on the attention scores
before the softmax) and the probability of the answer at the last position is read. The result per
window start ``l`` is the relative change ``100 * (p_knocked - p_clean) / p_clean`` (%), averaged over
items: one curve per edge type.

Their setting: k = 9 on LLaVA-1.5 (7B, 13B) and LLaVA-NeXT models (32 or 40 layers), the
probability of the correct answer's first token, questions the models answer. Here: k = 9 clipped to
a third of the model's blocks on shallower models (6-block demo: k = 2), every choice a parameter
(:class:`~hooked_vllm.studies.params.KnockoutParams`).

Cost: one clean forward and ``len(edges) x (n_layers - k + 1)`` knocked-out forwards per batch.

Example:
    >>> study = KnockoutStudy(window=2)  # doctest: +SKIP
    >>> result = run_study(study, vlm, load_shapes("shapes/"), "out/")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hooked_vllm.errors import LayerError
from hooked_vllm.interventions.knockout import knockout
from hooked_vllm.interventions.metrics import last_logits
from hooked_vllm.studies.base import Study, stats
from hooked_vllm.studies.params import PAPER_WINDOW, KnockoutParams
from hooked_vllm.studies.report import (
    figure,
    paragraph,
    parameters_table,
    save_png,
    section,
    table,
    write_page,
)

#: the package's group of each edge group name (Zhang et al.'s "question" is the instruction: ``text``)
GROUPS = {"image": "image", "question": "text", "special": "special", "last": "last"}

#: what Zhang et al. report for their models (LLaVA-1.5-7b/13b, LLaVA-v1.6-Vicuna-7b,
#: Llama3-LLaVA-NeXT-8b; GQA-derived question types), in words: shown beside ours, never a pass/fail
THEIRS = {
    "image->question": "a large drop when blocked in the lower layers (the whole image's general features "
    "flow into the question), and a second, smaller one in the middle layers (object-specific "
    "features); little change when blocked in the higher layers",
    "image->last": "little change at every layer: the last position does not read the image directly "
    "(the image reaches the answer through the question)",
    "question->last": "the largest drop of the three, when blocked in the middle layers (the question's "
    "fused representation moves to the last position there); little change in the lower and "
    "higher layers",
}
THEIRS_NOTE = (
    "Their findings as their text states them, for their models and data; the numbers of their figures "
    "are not copied here. Ours come from another model on other data: compare shapes, not values, "
    "and never read a difference as a failure."
)


def window_size(n_layers: int, window: int | None = None) -> int:
    """The knockout window: ``window`` as given (at most ``n_layers``), else Zhang et al.'s 9 clipped to
    a third of the model's blocks (at least 1), so that a shallow model still has several windows."""
    if window is None:
        return min(PAPER_WINDOW, max(1, n_layers // 3))
    if not 1 <= window <= n_layers:
        raise LayerError(
            f"knockout study: a window of {window} layers does not fit this model's {n_layers} blocks; "
            f"give --window 1 to {n_layers}."
        )
    return window


def knockout_windows(n_layers: int, window: int | None = None) -> list[range]:
    """Every window of consecutive blocks ``[l, l + k)``, by start ``l`` (block indices)."""
    k = window_size(n_layers, window)
    return [range(start, start + k) for start in range(n_layers - k + 1)]


def edge_pair(edge: str) -> tuple[str, str]:
    """``"image->question"`` as the knockout's ``(source, target)`` groups: ``("image", "text")``."""
    source, _, target = edge.partition("->")
    return GROUPS[source], GROUPS[target]


class KnockoutStudy(Study):
    """Attention knockout windows; see the module docstring."""

    name = "knockout"
    params_type = KnockoutParams
    paper = (
        "Zhang, Yadav, Han, Shutova (2024), Cross-modal information flow in multimodal large language "
        "models, arXiv 2411.18620"
    )

    def item_rows(self, vlm, items, batch) -> list[dict]:
        batch = vlm.to_batch(batch)
        windows = knockout_windows(vlm.cfg.n_layers, self.params.window)
        rows_of = torch.arange(len(batch))
        clean = last_logits(vlm(batch), batch)
        tokens, sources = self.answers(vlm, items, clean)
        answer = torch.tensor(tokens, device=clean.device)
        p_clean = clean.softmax(-1)[rows_of, answer]
        knocked = {}
        for edge in self.params.edges:
            per_window = []
            for layers in windows:
                with knockout(vlm, batch, [edge_pair(edge)], layers):
                    per_window.append(last_logits(vlm(batch), batch).softmax(-1)[rows_of, answer])
            knocked[edge] = torch.stack(per_window, 1).double().cpu()  # [batch, window]
        prediction = clean.argmax(-1)
        rows = []
        for b in range(len(batch)):
            row = {
                "answer_token": tokens[b],
                "answer": vlm.tokenizer.decode([tokens[b]]),
                "answer_from": sources[b],
                "prediction": int(prediction[b]),
                "correct": bool(prediction[b] == answer[b]),
                "p_clean": float(p_clean[b]),
                "n_layers": vlm.cfg.n_layers,
                "window": len(windows[0]),
                "window_starts": [layers.start for layers in windows],
            }
            for edge in self.params.edges:
                row[f"p:{edge}"] = knocked[edge][b].tolist()
            rows.append(row)
        return rows

    def aggregate(self, rows: list[dict]) -> dict:
        counted = [row for row in rows if row["correct"] or not self.params.only_correct]
        out: dict = {
            "study": self.name,
            "paper": self.paper,
            "params": {**self.settings(), "window": rows[0]["window"]},
            "n_layers": rows[0]["n_layers"],
            "window": rows[0]["window"],
            "window_starts": rows[0]["window_starts"],
            "n_items_run": len(rows),
            "n_items": len(counted),
            "accuracy": float(np.mean([row["correct"] for row in rows])),
            "answer_from": {s: sum(r["answer_from"] == s for r in rows) for s in ("label", "prediction")},
            "counts": {
                "n_items": "items every curve is averaged over"
                + (" (those the model answers correctly)" if self.params.only_correct else ""),
                "n_items_run": "items run",
            },
            "edges": {},
            "theirs": {edge: THEIRS.get(edge) for edge in self.params.edges},
        }
        if not counted:
            return out
        p_clean = np.array([row["p_clean"] for row in counted])[:, None]
        out["p_clean_mean"] = float(p_clean.mean())
        for edge in self.params.edges:
            knocked = np.array([row[f"p:{edge}"] for row in counted])
            relative = 100.0 * (knocked - p_clean) / p_clean
            curve = stats(relative)
            lowest = int(np.nanargmin(curve["mean"]))
            curve["largest_drop"] = {
                "window_start": out["window_starts"][lowest],
                "mean": curve["mean"][lowest],
            }
            out["edges"][edge] = curve
        return out

    # ------------------------------------------------------------------ report
    def figure(self, aggregates: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 4.2))
        ax = fig.add_subplot()
        starts = np.array(aggregates["window_starts"])
        colours = {"image->question": "#1f77b4", "image->last": "#2ca02c", "question->last": "#d62728"}
        for edge, curve in aggregates["edges"].items():
            mean, ci = np.array(curve["mean"], dtype=float), np.array(curve["ci95"], dtype=float)
            colour = colours.get(edge)
            ax.plot(starts, mean, marker="o", label=edge, color=colour)
            if np.isfinite(ci).any():
                ax.fill_between(starts, mean - ci, mean + ci, alpha=0.15, color=colour)
        ax.axhline(0, color="#888", lw=0.8, ls="--")
        ax.set_xlabel(f"first block of the knocked-out window (window of {aggregates['window']} blocks)")
        ax.set_ylabel("change of the answer's probability (%)")
        ax.set_xticks(starts)
        ax.legend(title="edge blocked")
        ax.set_title(f"Attention knockout windows ({aggregates['n_items']} items, mean and 95% interval)")
        fig.tight_layout()
        return fig

    def write_report(self, out_dir: Path, aggregates: dict, title: str) -> Path:
        out_dir = Path(out_dir)
        sections = [
            section(
                "What this is",
                paragraph(
                    f"{self.paper}. Each edge type is blocked (its target's queries may not read its "
                    f"source's keys, on the attention scores before the softmax) in one window of "
                    f"{aggregates['window']} consecutive blocks at a time; the curve gives, per window "
                    "start, the mean relative change of the answer's probability at the last position, "
                    "100 (p_knocked - p_clean) / p_clean, with its 95% interval."
                ),
                parameters_table(aggregates["params"], aggregates["n_layers"]),
                paragraph(
                    f"{aggregates['n_items']} of {aggregates['n_items_run']} items counted "
                    f"({aggregates['counts']['n_items'].removeprefix('items ')}); "
                    "the model's accuracy on the answers: "
                    f"{aggregates['accuracy']:.1%}; answers from the dataset's labels: "
                    f"{aggregates['answer_from']['label']}, from the model's prediction: "
                    f"{aggregates['answer_from']['prediction']}.",
                    css="note",
                ),
            )
        ]
        if aggregates["edges"]:
            fig = self.figure(aggregates)
            save_png(fig, out_dir / "knockout.png")
            rows = []
            for edge, curve in aggregates["edges"].items():
                drop = curve["largest_drop"]
                rows.append(
                    [
                        edge,
                        f"blocks {drop['window_start']}-{drop['window_start'] + aggregates['window'] - 1}",
                        drop["mean"],
                        THEIRS.get(edge, ""),
                    ]
                )
            per_window = [
                [f"{start}-{start + aggregates['window'] - 1}"]
                + [curve["mean"][i] for curve in aggregates["edges"].values()]
                for i, start in enumerate(aggregates["window_starts"])
            ]
            sections += [
                section(
                    "Curves per edge type",
                    figure(
                        fig,
                        "Relative change of the answer's probability per window start.",
                        "knockout-curves",
                    ),
                    id="curves",
                ),
                section(
                    "Ours beside theirs",
                    table(
                        [
                            "edge",
                            "ours: largest drop at",
                            "ours: mean change there (%)",
                            "theirs (Zhang et al.)",
                        ],
                        rows,
                        css="theirs",
                    ),
                    paragraph(THEIRS_NOTE, css="note"),
                    id="theirs",
                ),
                section(
                    "Every window (mean change, %)",
                    table(["blocks"] + list(aggregates["edges"]), per_window),
                    id="windows",
                ),
            ]
        else:
            sections.append(
                paragraph(
                    "No item is counted: the model answers none correctly (try --no-only-correct).", "warning"
                )
            )
        if aggregates.get("skipped"):
            sections.append(section("Skipped items", table(["item", "reason"], aggregates["skipped"])))
        return write_page(out_dir / "report.html", title, sections)
