"""Study 2: visual-token pruning after layer K (Chen et al. 2024, "An image is worth 1/2 tokens after
layer 2", FastV, arXiv 2403.06764), with the position-bias diagnostic of Endo et al. 2024 ("Feather
the throttle", FEATHER, arXiv 2412.13180).

FastV: block K-1's attention ranks the image tokens (the attention each receives from the last
position, averaged over heads, as FastV's released code; or, with ``received_from="all"``, from every
real position, as its paper's text writes it); from block K on only the ``round(n_image * (1 - R))``
highest-ranked remain readable (:func:`hooked_vllm.interventions.prune`: the pruned tokens are removed
as keys, so every kept position computes what it would if they were dropped from the sequence; in a
hybrid model's layers without attention their input is zeroed instead, which is close to a drop but
not one: measured against HF with the tokens dropped, 3e-6 on tiny LFM2-VL and 1.4e-3 on tiny
Qwen3.5 in the answer's probability, where its recurrent state decays at their steps). For
each K and R of the grid: the answer's probability and whether the top-1 token is the answer, and the
FLOPs a drop would cost by FastV's formula, per block ``4 n d^2 + 2 n^2 d + 2 n d m`` (n tokens, d the
hidden size, m the MLP's; the language model's blocks only):

    FLOPs(K, R) = K * f(n) + (T - K) * f(n - n_pruned)        (T blocks, n the item's real tokens)

FEATHER's diagnostic: where on the image grid the kept tokens lie (the kept fraction of each grid
row), beside a position-free selection of as many tokens (``random``, or a uniform ``stride``), whose
accuracy is measured at every K and R too.

Cost: one forward (the selection's attention read on the way) and, per K and R, one pruned forward
per criterion (FastV's, and the baseline's unless ``none``).

Example:
    >>> study = PruningStudy(layers=(2,), ratios=(0.5,))  # doctest: +SKIP
    >>> result = run_study(study, vlm, load_shapes("shapes/"), "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float

from hooked_vllm.errors import LayerError
from hooked_vllm.interventions.metrics import last_logits
from hooked_vllm.interventions.pruning import prune
from hooked_vllm.studies.base import Study
from hooked_vllm.studies.params import FASTV_LAYER, FASTV_RATIO, PruningParams
from hooked_vllm.studies.report import (
    figure,
    paragraph,
    parameters_table,
    save_png,
    section,
    table,
    write_page,
)

#: what the papers report, in words (their models and data): shown beside ours, never a pass/fail
THEIRS = {
    "fastv": "K = 2, R = 50% on LLaVA-1.5-13B: about 45% fewer theoretical FLOPs with performance on "
    "their image and video benchmarks close to the unpruned model's; larger R or smaller K costs "
    "more accuracy, trading along a Pareto curve (Chen et al. 2024).",
    "feather": "FastV's criterion at an early layer keeps mostly the image's bottom rows (the last "
    "position attends most to the image tokens nearest to it in the sequence), which fails tasks that "
    "need the whole image, such as localization; a position-free selection (uniform sampling) at the "
    "same layer keeps tokens everywhere and does better there (Endo et al. 2024).",
}
RECEIVED_FROM = {"last": "the last position", "all": "every real position"}
THEIRS_NOTE = (
    "Their findings as their text states them, for their models and data; the numbers of their tables "
    "are not copied here. Ours come from another model on other data: compare shapes, not values, "
    "and never read a difference as a failure."
)


def kept_count(n_image: int, ratio: float) -> int:
    """Image tokens FastV keeps: ``round(n_image * (1 - ratio))`` (Python's rounding, as its code)."""
    return round(n_image * (1 - ratio))


def layer_flops(n: float, d_model: int, d_mlp: int) -> float:
    """FastV's FLOPs of one block over ``n`` tokens: ``4 n d^2 + 2 n^2 d + 2 n d m``."""
    return 4 * n * d_model**2 + 2 * n**2 * d_model + 2 * n * d_model * d_mlp


def pruned_flops(n: int, n_pruned: int, layer: int, n_layers: int, d_model: int, d_mlp: int) -> float:
    """FLOPs of the language model's blocks with ``n_pruned`` tokens dropped from block ``layer`` on."""
    return layer * layer_flops(n, d_model, d_mlp) + (n_layers - layer) * layer_flops(
        n - n_pruned, d_model, d_mlp
    )


def item_seed(item, row: int, seed: int) -> int:
    """A seed of the study's seed and the item's id (not of its batch-mates): runs resume equal."""
    name = str(getattr(item, "item_id", row))
    return seed * 1_000_003 + zlib.crc32(name.encode())


def select(
    saliency: Float[torch.Tensor, "batch pos"], image: Bool[torch.Tensor, "batch pos"], ratio: float
) -> Bool[torch.Tensor, "batch pos"]:
    """Per item, its ``kept_count`` most salient image positions."""
    keep = torch.zeros_like(image)
    for b in range(len(image)):
        positions = image[b].nonzero().flatten()
        count = kept_count(len(positions), ratio)
        if count:
            chosen = saliency[b, positions].topk(count).indices
            keep[b, positions[chosen]] = True
    return keep


def position_free(image: Bool[torch.Tensor, "batch pos"], ratio: float, how: str, seeds: list[int]):
    """As many image positions as FastV keeps, chosen without their content: ``random`` (seeded per
    item) or ``stride`` (``floor(i * n / count)``: evenly spaced in sequence order, so over the grid)."""
    keep = torch.zeros_like(image)
    for b in range(len(image)):
        positions = image[b].nonzero().flatten().cpu()
        n, count = len(positions), kept_count(len(positions), ratio)
        if how == "random":
            chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seeds[b]))[:count]
        else:
            chosen = torch.div(torch.arange(count) * n, count, rounding_mode="floor")
        keep[b, positions[chosen].to(image.device)] = True
    return keep


def grid_bins(batch, row_bins: int | None) -> list[list[int] | None]:
    """Per item, the histogram row of each image position (in sequence order): its grid row, or with
    ``row_bins`` its relative height binned into that many rows; ``None`` where the image tokens have
    no grid (InstructBLIP's queries)."""
    out = []
    for images in batch.image_slots or [[] for _ in range(len(batch))]:
        if not images or not all(image.spatial for image in images):
            out.append(None)
            continue
        first = images[0].grid[images[0].is_patch]
        bins = row_bins or int(first[first[:, 0] == 0, 1].max()) + 1
        rows = []
        for image in images:
            grid = image.grid[image.is_patch]
            for tile, row in grid[:, :2].tolist():
                n_rows = int(grid[grid[:, 0] == tile, 1].max()) + 1
                rows.append(min(bins - 1, int((row + 0.5) / n_rows * bins)))
        out.append([bins, *rows])
    return out


def row_histogram(keep_row: torch.Tensor, image_row: torch.Tensor, bins: list[int] | None) -> list[int]:
    """Kept tokens per histogram row of one item (its image positions in sequence order)."""
    if bins is None:
        return []
    n_bins, rows = bins[0], bins[1:]
    kept = keep_row[image_row.nonzero().flatten()].cpu().tolist()
    counts = [0] * n_bins
    for row, is_kept in zip(rows, kept, strict=True):
        counts[row] += int(is_kept)
    return counts


class PruningStudy(Study):
    """FastV's visual-token pruning over a grid of K and R, with FEATHER's diagnostic; see the module
    docstring."""

    name = "pruning"
    params_type = PruningParams
    paper = (
        "Chen, Zhao, Liu, Bai, Lin, Zhou, Chang (2024), An image is worth 1/2 tokens after layer 2 "
        "(FastV), arXiv 2403.06764; Endo, Wang, Chen, Levine, Darrell (2024), Feather the throttle "
        "(FEATHER), arXiv 2412.13180"
    )

    def settings_grid(self) -> list[tuple[int, float]]:
        return [(k, r) for k in self.params.layers for r in self.params.ratios]

    def criteria(self) -> list[str]:
        return ["fastv"] + ([self.params.baseline] if self.params.baseline != "none" else [])

    def check_layers(self, vlm) -> None:
        n_layers = vlm.cfg.n_layers
        with_pattern = vlm.adapter.attention_layers
        for k in self.params.layers:
            if k >= n_layers:
                raise LayerError(
                    f"pruning study: layer K = {k} is not a block of this model's {n_layers}; give "
                    f"--layers between 1 and {n_layers - 1}."
                )
            if k - 1 not in with_pattern:
                raise LayerError(
                    f"pruning study: FastV ranks the image tokens by block K-1's attention, and block "
                    f"{k - 1} has none (blocks with attention: {list(with_pattern)}); choose other --layers."
                )

    def saliency(self, vlm, batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The unpruned logits at the last position, and per source block K-1 the attention each
        position receives (heads averaged; from the last position, or the mean over real queries)."""
        sources = sorted({k - 1 for k in self.params.layers})
        received: dict[int, torch.Tensor] = {}
        rows = torch.arange(len(batch))

        def capture(source: int):
            def hook(pattern: torch.Tensor, hook) -> None:
                mean = pattern.float().mean(1)  # [batch, query, key]
                if self.params.received_from == "last":
                    got = mean[rows, batch.last_positions.to(mean.device)]
                else:
                    real = batch.attention_mask.to(mean.device).float()
                    got = (mean * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)
                received[source] = got.cpu()

            return hook

        hooks = [(f"blocks.{s}.attn.hook_pattern", capture(s)) for s in sources]
        return last_logits(vlm.run_with_hooks(batch, fwd_hooks=hooks), batch), received

    def item_rows(self, vlm, items, batch) -> list[dict]:
        batch = vlm.to_batch(batch)
        self.check_layers(vlm)
        cfg = vlm.cfg
        clean, received = self.saliency(vlm, batch)
        tokens, sources = self.answers(vlm, items, clean)
        rows_of = torch.arange(len(batch))
        answer = torch.tensor(tokens, device=clean.device)
        p_clean = clean.softmax(-1)[rows_of, answer]
        prediction = clean.argmax(-1)
        image = batch.image_mask
        seeds = [item_seed(item, b, self.params.random_seed) for b, item in enumerate(items)]
        bins = grid_bins(batch, self.params.row_bins)
        n_real = batch.attention_mask.sum(-1).tolist()
        n_image = image.sum(-1).tolist()
        out = {c: {"p": [], "top1": [], "rows": []} for c in self.criteria()}
        flops = []
        for k, ratio in self.settings_grid():
            for criterion in self.criteria():
                keep = (
                    select(received[k - 1].to(image.device), image, ratio)
                    if criterion == "fastv"
                    else position_free(image, ratio, criterion, seeds)
                )
                with prune(vlm, batch, keep, k):
                    logits = last_logits(vlm(batch), batch)
                out[criterion]["p"].append(logits.softmax(-1)[rows_of, answer].double().cpu())
                out[criterion]["top1"].append(logits.argmax(-1).cpu())
                out[criterion]["rows"].append(
                    [row_histogram(keep[b], image[b], bins[b]) for b in range(len(batch))]
                )
            flops.append(
                [
                    pruned_flops(n, n_img - kept_count(n_img, ratio), k, cfg.n_layers, cfg.d_model, cfg.d_mlp)
                    for n, n_img in zip(n_real, n_image)
                ]
            )
        rows = []
        for b in range(len(batch)):
            row = {
                "answer_token": tokens[b],
                "answer": vlm.tokenizer.decode([tokens[b]]),
                "answer_from": sources[b],
                "prediction": int(prediction[b]),
                "correct": bool(prediction[b] == answer[b]),
                "p_clean": float(p_clean[b]),
                "n_tokens": int(n_real[b]),
                "n_image": int(n_image[b]),
                "n_layers": cfg.n_layers,
                "flops_dense": pruned_flops(n_real[b], 0, 0, cfg.n_layers, cfg.d_model, cfg.d_mlp),
                "flops": [setting[b] for setting in flops],
                "row_bins": bins[b][0] if bins[b] else 0,
                "image_rows": row_histogram(image[b], image[b], bins[b]),
            }
            for criterion, got in out.items():
                row[f"p:{criterion}"] = [float(p[b]) for p in got["p"]]
                row[f"correct:{criterion}"] = [bool(t[b] == tokens[b]) for t in got["top1"]]
                row[f"agree:{criterion}"] = [bool(t[b] == prediction[b]) for t in got["top1"]]
                row[f"kept_rows:{criterion}"] = [count for setting in got["rows"] for count in setting[b]]
            rows.append(row)
        return rows

    def aggregate(self, rows: list[dict]) -> dict:
        grid = self.settings_grid()
        dense = np.array([row["flops_dense"] for row in rows])
        p_clean = np.array([row["p_clean"] for row in rows])
        out: dict = {
            "study": self.name,
            "paper": self.paper,
            "params": self.settings(),
            "n_layers": rows[0]["n_layers"],
            "n_items": len(rows),
            "accuracy_clean": float(np.mean([row["correct"] for row in rows])),
            "p_clean_mean": float(p_clean.mean()),
            "answer_from": {s: sum(r["answer_from"] == s for r in rows) for s in ("label", "prediction")},
            "mean_image_tokens": float(np.mean([row["n_image"] for row in rows])),
            "mean_tokens": float(np.mean([row["n_tokens"] for row in rows])),
            "flops_dense_mean": float(dense.mean()),
            "settings": [],
            "theirs": THEIRS,
        }
        bins = {row["row_bins"] for row in rows}
        has_grid = bins != {0}
        if has_grid and len(bins) > 1:
            raise ValueError(
                f"pruning study: the items' image grids have different numbers of rows ({sorted(bins)}); "
                "give --row-bins N to bin each kept token's relative height into N rows."
            )
        n_bins = bins.pop() if has_grid else 0
        image_rows = np.array([row["image_rows"] for row in rows]).sum(0) if has_grid else None
        out["row_bins"] = n_bins
        for i, (k, ratio) in enumerate(grid):
            pruned = np.array([row["flops"][i] for row in rows])
            setting = {
                "layer": k,
                "ratio": ratio,
                "kept_mean": float(np.mean([kept_count(row["n_image"], ratio) for row in rows])),
                "flops_mean": float(pruned.mean()),
                "flops_reduction": float(1 - pruned.sum() / dense.sum()),
                "paper_setting": k == FASTV_LAYER and ratio == FASTV_RATIO,
            }
            for criterion in self.criteria():
                p = np.array([row[f"p:{criterion}"][i] for row in rows])
                entry = {
                    "accuracy": float(np.mean([row[f"correct:{criterion}"][i] for row in rows])),
                    "agreement": float(np.mean([row[f"agree:{criterion}"][i] for row in rows])),
                    "p_mean": float(p.mean()),
                    "relative_change": float(np.mean(100 * (p - p_clean) / p_clean)),
                }
                if has_grid:
                    kept = np.array(
                        [row[f"kept_rows:{criterion}"][i * n_bins : (i + 1) * n_bins] for row in rows]
                    ).sum(0)
                    entry["kept_per_row"] = (kept / np.maximum(image_rows, 1)).tolist()
                    entry["kept_share_per_row"] = (kept / max(kept.sum(), 1)).tolist()
                setting[criterion] = entry
            out["settings"].append(setting)
        out["criteria"] = self.criteria()
        return out

    # ------------------------------------------------------------------ report
    def shown_ratio(self, aggregates: dict) -> float:
        ratios = sorted({s["ratio"] for s in aggregates["settings"]})
        return FASTV_RATIO if FASTV_RATIO in ratios else ratios[0]

    def accuracy_figure(self, aggregates: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 4.2))
        ax = fig.add_subplot()
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        layers = sorted({s["layer"] for s in aggregates["settings"]})
        for i, k in enumerate(layers):
            here = [s for s in aggregates["settings"] if s["layer"] == k]
            x = [100 * s["flops_reduction"] for s in here]
            for criterion in aggregates["criteria"]:
                ax.plot(
                    x,
                    [100 * s[criterion]["accuracy"] for s in here],
                    marker="o" if criterion == "fastv" else "x",
                    ls="-" if criterion == "fastv" else "--",
                    color=colours[i % len(colours)],
                    label=f"K = {k}, {'FastV' if criterion == 'fastv' else criterion}",
                )
        ax.axhline(100 * aggregates["accuracy_clean"], color="#888", lw=0.8, ls=":", label="unpruned")
        ax.set_xlabel("FLOPs saved by FastV's formula (%), R growing to the right")
        ax.set_ylabel("correct answers (%)")
        ax.legend(fontsize=8, ncol=2)
        ax.set_title(f"Accuracy against FLOPs saved ({aggregates['n_items']} items)")
        fig.tight_layout()
        return fig

    def rows_figure(self, aggregates: dict, ratio: float):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 3.8))
        ax = fig.add_subplot()
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        rows = np.arange(aggregates["row_bins"])
        here = [s for s in aggregates["settings"] if s["ratio"] == ratio]
        for i, setting in enumerate(here):
            for criterion in aggregates["criteria"]:
                ax.plot(
                    rows,
                    setting[criterion]["kept_per_row"],
                    marker="o" if criterion == "fastv" else "x",
                    ls="-" if criterion == "fastv" else "--",
                    color=colours[i % len(colours)],
                    label=f"K = {setting['layer']}, {'FastV' if criterion == 'fastv' else criterion}",
                )
        ax.axhline(1 - ratio, color="#888", lw=0.8, ls=":", label="no position bias")
        ax.set_xticks(rows)
        ax.set_xlabel("image grid row (0 = top)")
        ax.set_ylabel("fraction of the row's tokens kept")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=8, ncol=2)
        ax.set_title(f"Where the kept tokens lie (R = {ratio:g})")
        fig.tight_layout()
        return fig

    def write_report(self, out_dir: Path, aggregates: dict, title: str) -> Path:
        out_dir = Path(out_dir)
        criteria = aggregates["criteria"]
        baseline = next((c for c in criteria if c != "fastv"), None)
        params = aggregates["params"]
        sections = [
            section(
                "What this is",
                paragraph(
                    f"{self.paper}. From block K on, only the kept image tokens are readable (the "
                    "pruned ones are removed as keys: every kept position computes what it would if "
                    "they were dropped). FastV keeps the round(n_image (1 - R)) image tokens that "
                    "receive the most attention in block K-1 (from "
                    f"{RECEIVED_FROM[params['received_from']]}, "
                    "averaged over heads). FLOPs are FastV's count for the language model's blocks, "
                    "4nd^2 + 2n^2d + 2ndm per block, with n the item's real tokens (n minus the "
                    "pruned ones from block K on): the cost a drop would have; the masked run itself "
                    "costs as much as an unpruned one."
                ),
                parameters_table(params, aggregates["n_layers"]),
                paragraph(
                    f"{aggregates['n_items']} items; {aggregates['mean_tokens']:.1f} real tokens of which "
                    f"{aggregates['mean_image_tokens']:.1f} image tokens on average; unpruned accuracy "
                    f"{aggregates['accuracy_clean']:.1%} (answers from the labels: "
                    f"{aggregates['answer_from']['label']}, from the prediction: "
                    f"{aggregates['answer_from']['prediction']}).",
                    css="note",
                ),
            )
        ]
        fig = self.accuracy_figure(aggregates)
        save_png(fig, out_dir / "pruning.png")
        grid_rows = []
        for s in aggregates["settings"]:
            grid_rows.append(
                [
                    s["layer"],
                    s["ratio"],
                    s["kept_mean"],
                    100 * s["flops_reduction"],
                    100 * s["fastv"]["accuracy"],
                    100 * s["fastv"]["agreement"],
                    s["fastv"]["relative_change"],
                ]
                + ([100 * s[baseline]["accuracy"], s[baseline]["relative_change"]] if baseline else [])
                + ["FastV's setting" if s["paper_setting"] else ""]
            )
        headers = [
            "K",
            "R",
            "kept image tokens",
            "FLOPs saved (%)",
            "FastV: correct (%)",
            "FastV: same top-1 (%)",
            "FastV: p change (%)",
        ]
        if baseline:
            headers += [f"{baseline}: correct (%)", f"{baseline}: p change (%)"]
        sections += [
            section(
                "Accuracy and FLOPs over the grid",
                figure(fig, "Correct answers against the FLOPs saved, one line per K.", "pruning-accuracy"),
                table([*headers, ""], grid_rows),
                id="grid",
            )
        ]
        if aggregates["row_bins"]:
            ratio = self.shown_ratio(aggregates)
            fig = self.rows_figure(aggregates, ratio)
            save_png(fig, out_dir / "pruning-rows.png")
            per_row = []
            for s in aggregates["settings"]:
                if s["ratio"] != ratio:
                    continue
                for criterion in criteria:
                    per_row.append(
                        [f"K = {s['layer']}", "FastV" if criterion == "fastv" else criterion]
                        + list(s[criterion]["kept_per_row"])
                    )
            sections.append(
                section(
                    "Where the kept tokens lie (FEATHER's diagnostic)",
                    figure(
                        fig,
                        "Fraction of each image-grid row's tokens kept, FastV's selection against a "
                        "position-free one of the same size.",
                        "pruning-rows",
                    ),
                    table(
                        ["K", "selection"] + [f"row {r}" for r in range(aggregates["row_bins"])],
                        per_row,
                    ),
                    id="rows",
                )
            )
        else:
            sections.append(paragraph("The image tokens have no grid: no position diagnostic.", "note"))
        paper = next((s for s in aggregates["settings"] if s["paper_setting"]), None)
        ours_fastv = (
            f"K = 2, R = 0.5: {100 * paper['flops_reduction']:.1f}% fewer FLOPs, "
            f"{100 * paper['fastv']['accuracy']:.1f}% correct "
            f"(unpruned {100 * aggregates['accuracy_clean']:.1f}%)"
            if paper
            else "FastV's setting (K = 2, R = 0.5) is not in this grid"
        )
        ours_feather = "no grid"
        if aggregates["row_bins"]:
            shown = next(
                (s for s in aggregates["settings"] if s["ratio"] == self.shown_ratio(aggregates)), None
            )
            kept = shown["fastv"]["kept_per_row"]
            ours_feather = (
                f"K = {shown['layer']}, R = {shown['ratio']:g}: FastV keeps "
                + ", ".join(f"{v:.0%}" for v in kept)
                + " of rows 0 (top) to "
                + f"{len(kept) - 1}"
                + (
                    f"; {baseline}: " + ", ".join(f"{v:.0%}" for v in shown[baseline]["kept_per_row"])
                    if baseline
                    else ""
                )
            )
        sections.append(
            section(
                "Ours beside theirs",
                table(
                    ["finding", "ours", "theirs"],
                    [["FastV", ours_fastv, THEIRS["fastv"]], ["FEATHER", ours_feather, THEIRS["feather"]]],
                    css="theirs",
                ),
                paragraph(THEIRS_NOTE, css="note"),
                id="theirs",
            )
        )
        if aggregates.get("skipped"):
            sections.append(section("Skipped items", table(["item", "reason"], aggregates["skipped"])))
        return write_page(out_dir / "report.html", title, sections)

    @staticmethod
    def summary_lines(aggregates: dict) -> list[str]:
        lines = [f"{aggregates['n_items']} items, unpruned accuracy {aggregates['accuracy_clean']:.1%}"]
        for s in aggregates["settings"]:
            text = (
                f"K={s['layer']} R={s['ratio']:<4g} FLOPs -{100 * s['flops_reduction']:.1f}%  "
                f"FastV {100 * s['fastv']['accuracy']:.1f}% correct"
            )
            for criterion in aggregates["criteria"][1:]:
                text += f", {criterion} {100 * s[criterion]['accuracy']:.1f}%"
            lines.append(text)
        return lines
