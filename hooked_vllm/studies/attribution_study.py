"""Study 4: attribution patching beside real activation patching (Nanda 2023, "Attribution patching:
activation patching at industrial scale"; Syed, Rager, Conmy 2023, arXiv 2310.10348; Kramár,
Lieberum, Shah, Nanda 2024, "AtP*", arXiv 2403.00745).

Per pair (a dataset item, clean, and its corrupted counterpart: the same question on another image of
the dataset whose answer differs, ``pairs="swap"``, or the item's own image under Gaussian pixel noise,
``pairs="noise"``), with the metric ``logit(clean answer) - logit(corrupt answer)`` at the last
position:

- the gradient estimate (:mod:`hooked_vllm.studies.attribution`) of patching each clean activation
  into the corrupted run, at every block's hook of each kind asked for and every position, from one
  clean forward and one corrupted forward and backward (all kinds together), summed per position
  group (image, text, special, last) into a layer x group map;
- real activation patching of each (layer, group) (one forward each), and of ``cells`` single
  (layer, position[, head]) cells drawn per item, stratified by group (one forward per drawn cell,
  every item of the batch patched at its own cell at once);
- their agreement: Pearson's and Spearman's correlation per hook kind, over the drawn cells and over
  the layer x group cells, pooled over the items.

Cost per batch: 1 clean forward, 1 corrupted forward + backward, then per kind ``n_layers x
n_groups + cells`` patched forwards (``z``: also ``n_layers x n_heads``, each head patched at every
real position, for the block x head map) (the estimate alone replaces ``n_layers x n_positions`` forwards
of exhaustive patching per kind).

Example:
    >>> study = AttributionStudy(kinds=("resid_pre", "z"))  # doctest: +SKIP
    >>> result = run_study(study, vlm, load_shapes("shapes/", n=64), "out/")  # doctest: +SKIP
    >>> result.aggregates["kinds"]["resid_pre"]["cells"]["pearson"]  # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.interventions.metrics import last_logits
from hooked_vllm.model.images import load_image
from hooked_vllm.studies.attribution import (
    KINDS,
    clean_run,
    correlations,
    estimates,
    gradient_run,
    hook_names,
    patch_effects,
)
from hooked_vllm.studies.base import Study, answer_token
from hooked_vllm.studies.params import AttributionParams
from hooked_vllm.studies.report import (
    figure,
    paragraph,
    parameters_table,
    save_png,
    section,
    table,
    write_page,
)

#: what the literature reports about the estimate's agreement with real patching, in words: shown
#: beside ours, never a pass/fail
THEIRS = [
    (
        "Nanda (2023), Attribution patching: activation patching at industrial scale",
        "GPT-2 small and other language models (indirect object identification...)",
        "a decent approximation when patching 'small' activations such as attention heads' outputs; a "
        "bad one for 'big' activations such as the residual stream, where the patch moves the run far "
        "from where the gradient was taken",
    ),
    (
        "Syed, Rager, Conmy (2023), Attribution patching outperforms automated circuit discovery",
        "GPT-2 small and small transformers (IOI, Greater-Than, Docstring)",
        "attribution patching on edges recovers the known circuits better (ROC AUC) than ACDC, which "
        "patches for real, at the cost of two forwards and one backward",
    ),
    (
        "Kramár, Lieberum, Shah, Nanda (2024), AtP*",
        "Pythia models up to 12B, many prompt pairs",
        "AtP is the best of the fast methods they test, but it has false negatives of two kinds: "
        "attention saturation (a softmax in a saturated region, where the gradient says little about a "
        "large change of the pattern) and cancellation of direct and indirect effects; AtP* (the "
        "softmax recomputed for queries and keys, GradDrop) reduces both",
    ),
]
THEIRS_NOTE = (
    "Their findings as their text states them, for their models, components and prompt pairs; their "
    "figures' numbers are not copied here. Ours are one small vision-language model on its own task: "
    "compare where the estimate agrees and where it fails, and never read a difference as a failure."
)


# ---------------------------------------------------------------- pairs
def label_of(item) -> str | None:
    label = (getattr(item, "meta", None) or {}).get("answer")
    return str(label) if label else None


def find_partners(items, token_of) -> dict[str, object | None]:
    """Each item's partner for ``swap`` pairs: the next item of the sample (cyclically) with the same
    instruction and an answer whose token differs (any other item with that instruction when either
    has no answer); ``None`` if there is none."""
    by_instruction = defaultdict(list)
    for item in items:
        by_instruction[item.instruction].append(item)
    partners = {}
    for group in by_instruction.values():
        tokens = [token_of(item) for item in group]
        for i, item in enumerate(group):
            partners[item.item_id] = next(
                (
                    group[(i + step) % len(group)]
                    for step in range(1, len(group))
                    if tokens[i] is None
                    or tokens[(i + step) % len(group)] is None
                    or tokens[(i + step) % len(group)] != tokens[i]
                ),
                None,
            )
    return partners


def noisy(image: Image.Image, std: int, key: str) -> Image.Image:
    """``image`` with Gaussian pixel noise of standard deviation ``std`` (of 255), seeded by ``key``."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    pixels = np.asarray(image, dtype=np.float64)
    return Image.fromarray(
        np.clip(pixels + rng.normal(0.0, std, pixels.shape), 0, 255).round().astype(np.uint8)
    )


def position_groups(batch, names) -> torch.Tensor:
    """``[group, batch, pos]`` disjoint masks of real positions: ``last`` (each item's last real
    position), and ``image``, ``text``, ``special`` without it."""
    real = batch.attention_mask.bool()
    last = torch.zeros_like(real)
    last[torch.arange(len(batch)), batch.last_positions] = True
    masks = {name: batch.mask(name).bool() & real & ~last for name in ("image", "text", "special")}
    masks["last"] = last
    return torch.stack([masks[name].cpu() for name in names])


class LogitDifference:
    """``logit(answer) - logit(other)`` at each item's last position; an ``other`` of -1 is fixed at
    the first call as that run's top token other than the answer (the corrupted run's prediction)."""

    def __init__(self, batch, answer: torch.Tensor, other: torch.Tensor) -> None:
        self.batch, self.answer, self.other = batch, answer, other.clone()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        last = last_logits(logits, self.batch)
        rows = torch.arange(len(last))
        if (self.other < 0).any():
            ranked = last.detach().clone()
            ranked[rows, self.answer.to(last.device)] = -torch.inf
            self.other = torch.where(self.other < 0, ranked.argmax(-1).cpu(), self.other)
        return last[rows, self.answer.to(last.device)] - last[rows, self.other.to(last.device)]


# ---------------------------------------------------------------- the study
class AttributionStudy(Study):
    """Attribution patching beside real activation patching; see the module docstring."""

    name = "attribution"
    params_type = AttributionParams
    paper = (
        "Nanda (2023), Attribution patching: activation patching at industrial scale; Syed, Rager, Conmy "
        "(2023), arXiv 2310.10348; Kramár, Lieberum, Shah, Nanda (2024), AtP*, arXiv 2403.00745"
    )
    needs_grad = True

    def plan(self, vlm, sample) -> None:
        """Find the ``swap`` partners over the whole sample (the same on every rank and resume)."""
        self.max_pixels = sample.max_pixels
        self.partners = {}
        if self.params.pairs == "swap":
            self.partners = find_partners(sample.items, lambda item: self.label_token(vlm, item))

    def label_token(self, vlm, item) -> int | None:
        label = label_of(item)
        return answer_token(vlm.tokenizer, label) if label and self.params.answer == "label" else None

    def corrupt_batch(self, vlm, items, clean):
        """The corrupted batch (the same instructions; each partner's image resized to its item's, or
        the item's image with noise) and each item's partner (``None``: unpaired, its own image)."""
        if not hasattr(self, "partners"):
            raise HookedVLMError(
                "attribution study: call study.plan(vlm, sample) before item_rows (run_study does): "
                "the pairs are found over the whole sample."
            )
        images, partners = [], []
        for item in items:
            image = load_image(item.image_path, max_pixels=self.max_pixels)
            partner = self.partners.get(item.item_id) if self.params.pairs == "swap" else None
            if self.params.pairs == "noise":
                image = noisy(image, self.params.noise, item.item_id)
            elif partner is not None:
                other = load_image(partner.image_path, max_pixels=self.max_pixels)
                image = other if other.size == image.size else other.resize(image.size, Image.BICUBIC)
            images.append(image)
            partners.append(partner)
        # left padding puts every item's last real token at the end (a family may put its pad
        # elsewhere than position 0: InstructBLIP's queries come before it)
        side = "left" if bool((clean.last_positions == clean.input_ids.shape[1] - 1).all()) else "right"
        corrupt = vlm.prepare(images, [item.instruction for item in items], padding_side=side)
        for key in ("input_ids", "attention_mask"):
            if not torch.equal(corrupt.inputs[key].cpu(), clean.inputs[key].cpu()):
                raise HookedVLMError(
                    f"attribution study: the corrupted prompts of {', '.join(i.item_id for i in items)} "
                    f"differ from the clean ones in {key}: patching needs the same layout. Use images "
                    "whose token counts match, or --pairs noise."
                )
        return corrupt.to(clean.device), partners

    def item_rows(self, vlm, items, batch) -> list[dict]:
        clean = vlm.to_batch(batch)
        corrupt, partners = self.corrupt_batch(vlm, items, clean)
        kinds = self.params.kinds
        names = {kind: hook_names(vlm, kind) for kind in kinds}
        every = [name for kind in kinds for name in names[kind]]
        clean_logits, clean_acts = clean_run(vlm, clean, every)
        clean_last = last_logits(clean_logits, clean)
        answer, other, answer_from = [], [], []
        for b, (item, partner) in enumerate(zip(items, partners)):
            token = self.label_token(vlm, item)
            answer.append(int(clean_last[b].argmax()) if token is None else token)
            answer_from.append("prediction" if token is None else "label")
            partner_token = self.label_token(vlm, partner) if partner is not None else None
            other.append(-1 if partner_token is None else partner_token)
        metric = LogitDifference(clean, torch.tensor(answer), torch.tensor(other))
        run = gradient_run(vlm, corrupt, every, metric)
        base = metric(run.logits).float().cpu()
        clean_metric = metric(clean_logits).float().cpu()
        corrupt_last = last_logits(run.logits, corrupt)
        groups = position_groups(clean, self.params.groups)
        n_layers, n_groups = vlm.cfg.n_layers, len(self.params.groups)
        rows = [
            {
                "paired": partner is not None or self.params.pairs == "noise",
                "partner": None if partner is None else partner.item_id,
                "answer_token": answer[b],
                "other_token": int(metric.other[b]),
                "answer": vlm.tokenizer.decode([answer[b]]),
                "other": vlm.tokenizer.decode([int(metric.other[b])]),
                "answer_from": answer_from[b],
                "clean_correct": bool(clean_last[b].argmax() == answer[b]),
                "corrupt_correct": bool(corrupt_last[b].argmax() == metric.other[b]),
                "metric_clean": float(clean_metric[b]),
                "metric_corrupt": float(base[b]),
                "n_layers": n_layers,
                "groups": list(self.params.groups),
            }
            for b, partner in enumerate(partners)
        ]
        for kind in kinds:
            estimate = estimates(clean_acts, run, names[kind]).float().cpu()  # [layer, batch, pos, *head]
            per_position = estimate.sum(-1) if kind == "z" else estimate
            group_estimate = torch.einsum("lbp,gbp->blg", per_position, groups.float())
            patches = [{names[kind][layer]: groups[g]} for layer in range(n_layers) for g in range(n_groups)]
            group_real = patch_effects(
                vlm, clean_acts, corrupt, metric, patches, base
            )  # [layer*group, batch]
            cells = self.draw_cells(items, groups, estimate, kind)
            cell_patches = []
            for j in range(max((len(c) for c in cells), default=0)):
                patch: dict[str, torch.Tensor] = {}
                for b, item_cells in enumerate(cells):
                    if j < len(item_cells):
                        layer, position, head = item_cells[j][:3]
                        where = patch.setdefault(
                            names[kind][layer], torch.zeros(estimate.shape[1:], dtype=torch.bool)
                        )
                        where[(b, position, head) if kind == "z" else (b, position)] = True
                cell_patches.append(patch)
            cell_real = patch_effects(vlm, clean_acts, corrupt, metric, cell_patches, base)
            for b, row in enumerate(rows):
                row[f"est:{kind}"] = group_estimate[b].flatten().tolist()
                row[f"real:{kind}"] = group_real[:, b].tolist()
                row[f"cell_layer:{kind}"] = [c[0] for c in cells[b]]
                row[f"cell_pos:{kind}"] = [c[1] for c in cells[b]]
                row[f"cell_head:{kind}"] = [c[2] for c in cells[b]]
                row[f"cell_group:{kind}"] = [c[3] for c in cells[b]]
                row[f"cell_est:{kind}"] = [c[4] for c in cells[b]]
                row[f"cell_real:{kind}"] = [float(cell_real[j, b]) for j in range(len(cells[b]))]
            if kind == "z":
                self.head_rows(vlm, rows, clean, corrupt, clean_acts, metric, base, estimate, names[kind])
        return rows

    def head_rows(self, vlm, rows, clean, corrupt, clean_acts, metric, base, estimate, names) -> None:
        """``z`` per head: the estimate summed over every real position, and real patching of one
        head at every real position (one forward per block and head), as ``[layer x head]`` lists."""
        real = clean.attention_mask.bool().cpu()
        n_heads = estimate.shape[-1]
        head_estimate = torch.einsum("lbph,bp->blh", estimate, real.float())
        patches = []
        for name in names:
            for head in range(n_heads):
                where = torch.zeros(estimate.shape[1:], dtype=torch.bool)
                where[:, :, head] = real
                patches.append({name: where})
        head_real = patch_effects(vlm, clean_acts, corrupt, metric, patches, base)  # [layer*head, batch]
        for b, row in enumerate(rows):
            row["est_head:z"] = head_estimate[b].flatten().tolist()
            row["real_head:z"] = head_real[:, b].tolist()

    def draw_cells(self, items, groups: torch.Tensor, estimate: torch.Tensor, kind: str) -> list[list]:
        """Per item, ``(layer, position, head, group, estimate)`` of the cells patched for real:
        ``cells // n_groups`` per group (all of a group's cells when it has fewer), drawn without
        replacement, seeded by the item's id and the kind (the same draw on every rank and resume)."""
        n_layers = estimate.shape[0]
        n_heads = estimate.shape[3] if kind == "z" else 1
        per_group = max(1, self.params.cells // groups.shape[0])
        out = []
        for b, item in enumerate(items):
            rng = np.random.default_rng([zlib.crc32(item.item_id.encode()), KINDS.index(kind)])
            item_cells = []
            for g in range(groups.shape[0]):
                positions = torch.nonzero(groups[g, b]).flatten().tolist()
                total = n_layers * len(positions) * n_heads
                for pick in sorted(rng.choice(total, size=min(per_group, total), replace=False).tolist()):
                    layer, p, head = np.unravel_index(pick, (n_layers, len(positions), n_heads))
                    position = positions[p]
                    value = (
                        estimate[layer, b, position, head] if kind == "z" else estimate[layer, b, position]
                    )
                    item_cells.append(
                        (int(layer), position, int(head) if kind == "z" else -1, g, float(value))
                    )
            out.append(item_cells)
        return out

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, rows: list[dict]) -> dict:
        paired = [row for row in rows if row["paired"]]
        counted = [
            row
            for row in paired
            if (row["clean_correct"] and row["corrupt_correct"]) or not self.params.only_correct
        ]
        groups = list(self.params.groups)
        n_layers = rows[0]["n_layers"]
        out: dict = {
            "study": self.name,
            "paper": self.paper,
            "params": self.settings(),
            "n_layers": n_layers,
            "groups": groups,
            "n_items_run": len(rows),
            "n_paired": len(paired),
            "n_items": len(counted),
            "clean_accuracy": float(np.mean([row["clean_correct"] for row in paired])) if paired else None,
            "corrupt_accuracy": float(np.mean([row["corrupt_correct"] for row in paired]))
            if paired
            else None,
            "counts": {
                "n_items": "pairs every number is over"
                + (
                    " (the model answers both the clean and the corrupted item)"
                    if self.params.only_correct
                    else ""
                ),
                "n_paired": "items with a corrupted counterpart",
                "n_items_run": "items run",
            },
            "kinds": {},
            "theirs": [list(entry) for entry in THEIRS],
        }
        if not counted:
            return out
        out["metric_clean_mean"] = float(np.mean([row["metric_clean"] for row in counted]))
        out["metric_corrupt_mean"] = float(np.mean([row["metric_corrupt"] for row in counted]))
        for kind in self.params.kinds:
            est = np.array([row[f"est:{kind}"] for row in counted]).reshape(
                len(counted), n_layers, len(groups)
            )
            real = np.array([row[f"real:{kind}"] for row in counted]).reshape(
                len(counted), n_layers, len(groups)
            )
            cells = {
                key: np.concatenate([row[f"cell_{key}:{kind}"] for row in counted]).astype(float)
                for key in ("est", "real", "layer", "group", "pos", "head")
            }
            item_of = np.concatenate(
                [[row["item_id"]] * len(row[f"cell_est:{kind}"]) for row in counted]
            ).tolist()
            gap = np.abs(cells["est"] - cells["real"])
            worst = [
                {
                    "item_id": item_of[i],
                    "layer": int(cells["layer"][i]),
                    "group": groups[int(cells["group"][i])],
                    "position": int(cells["pos"][i]),
                    "head": int(cells["head"][i]),
                    "estimate": float(cells["est"][i]),
                    "real": float(cells["real"][i]),
                }
                for i in np.argsort(-gap, kind="stable")[:5]
            ]
            out["kinds"][kind] = {
                "estimate": est.mean(0).tolist(),  # [layer][group], mean over the pairs
                "real": real.mean(0).tolist(),
                "cells": correlations(cells["est"], cells["real"]),
                # how much of the real change the estimate's size reaches (1: the same size on average)
                "size_ratio": float(np.abs(cells["est"]).mean() / max(np.abs(cells["real"]).mean(), 1e-30)),
                "layer_group": correlations(est, real),
                "cells_by_group": {
                    group: correlations(cells["est"][cells["group"] == g], cells["real"][cells["group"] == g])
                    for g, group in enumerate(groups)
                },
                "worst_cells": worst,
                "scatter": {
                    "estimate": cells["est"].tolist(),
                    "real": cells["real"].tolist(),
                    "group": cells["group"].astype(int).tolist(),
                },
            }
            if kind == "z":  # per head, every real position patched
                est_head = np.array([row["est_head:z"] for row in counted]).reshape(
                    len(counted), n_layers, -1
                )
                real_head = np.array([row["real_head:z"] for row in counted]).reshape(est_head.shape)
                out["kinds"][kind]["heads"] = {
                    "estimate": est_head.mean(0).tolist(),  # [layer][head]
                    "real": real_head.mean(0).tolist(),
                    "correlation": correlations(est_head, real_head),
                }
        return out

    # ------------------------------------------------------------------ report
    def heatmaps(self, aggregates: dict, kind: str, heads: bool = False):
        """The estimate's and real patching's maps side by side: block x position group, or (``z``,
        ``heads``) block x head with every real position patched."""
        from matplotlib.figure import Figure

        result = aggregates["kinds"][kind]["heads"] if heads else aggregates["kinds"][kind]
        maps = [np.array(result[key], dtype=float) for key in ("estimate", "real")]
        columns = [str(h) for h in range(maps[0].shape[1])] if heads else aggregates["groups"]
        limit = max(float(np.nanmax(np.abs(m))) for m in maps) or 1.0
        fig = Figure(figsize=(7.5, 0.45 * aggregates["n_layers"] + 1.8))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, values, title in zip(axes, maps, ("attribution estimate", "real activation patching")):
            image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
            ax.set_xticks(range(len(columns)), columns)
            ax.set_title(f"{title}\n(hook_{kind}, mean over {aggregates['n_items']} pairs)", fontsize=9)
            ax.set_xlabel("head (every real position patched)" if heads else "positions patched")
        axes[0].set_ylabel("block")
        axes[0].set_yticks(range(aggregates["n_layers"]))
        fig.colorbar(image, ax=list(axes), label="change of the logit difference")
        return fig

    def scatter(self, aggregates: dict):
        from matplotlib.figure import Figure

        kinds = list(aggregates["kinds"])
        fig = Figure(figsize=(4.0 * len(kinds) + 0.5, 4.0))
        axes = np.atleast_1d(fig.subplots(1, len(kinds), squeeze=False)[0])
        colours = ["#1f77b4", "#2ca02c", "#9467bd", "#d62728"]
        for ax, kind in zip(axes, kinds):
            points = aggregates["kinds"][kind]["scatter"]
            x, y, g = (np.array(points[key], dtype=float) for key in ("estimate", "real", "group"))
            for index, group in enumerate(aggregates["groups"]):
                chosen = g == index
                ax.scatter(x[chosen], y[chosen], s=9, alpha=0.6, color=colours[index % 4], label=group)
            low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([low, high], [low, high], color="#888", lw=0.8, ls="--")
            corr = aggregates["kinds"][kind]["cells"]
            ax.set_title(
                f"hook_{kind}: Pearson {fmt(corr['pearson'])}, Spearman {fmt(corr['spearman'])}", fontsize=9
            )
            ax.set_xlabel("attribution estimate")
        axes[0].set_ylabel("real activation patching")
        axes[0].legend(title="cell's positions", fontsize=8)
        fig.tight_layout()
        return fig

    def write_report(self, out_dir: Path, aggregates: dict, title: str) -> Path:
        out_dir = Path(out_dir)
        params = aggregates["params"]
        sections = [
            section(
                "What this is",
                paragraph(
                    f"{self.paper}. Per pair (clean item, corrupted counterpart: "
                    + (
                        "the same question on another image of the dataset whose answer differs"
                        if params["pairs"] == "swap"
                        else f"the item's image under Gaussian pixel noise of std {params['noise']}"
                    )
                    + "), the metric is logit(clean answer) - logit(corrupted answer) at the last "
                    "position. The attribution estimate (clean - corrupt) . gradient of every block's hook "
                    "at every position comes from one clean forward and one corrupted forward and backward; "
                    "real activation patching puts the clean activation into the corrupted run, one "
                    "forward per (block, position group) and per drawn cell."
                ),
                parameters_table(params, aggregates["n_layers"]),
                paragraph(
                    f"{aggregates['n_items']} of {aggregates['n_paired']} pairs counted "
                    f"({aggregates['counts']['n_items'].removeprefix('pairs ')}); "
                    f"{aggregates['n_items_run']} items run. Accuracy on the clean items: "
                    f"{fmt_pct(aggregates['clean_accuracy'])}, on "
                    f"the corrupted ones: {fmt_pct(aggregates['corrupt_accuracy'])}"
                    + (
                        f"; mean metric clean {aggregates['metric_clean_mean']:.3g}, corrupted "
                        f"{aggregates['metric_corrupt_mean']:.3g}."
                        if "metric_clean_mean" in aggregates
                        else "."
                    ),
                    css="note",
                ),
            )
        ]
        if not aggregates["kinds"]:
            sections.append(
                paragraph(
                    "No pair is counted: the model answers none of them (try --no-only-correct).", "warning"
                )
            )
        for kind in aggregates["kinds"]:
            fig = self.heatmaps(aggregates, kind)
            save_png(fig, out_dir / f"attribution-{kind}.png")
            sections.append(
                section(
                    f"hook_{kind}: block x position group",
                    figure(
                        fig,
                        "Mean over the pairs of the change of the metric when the group's clean activations "
                        "are patched into the corrupted run: estimated (left) and real (right).",
                        f"attribution-heatmap-{kind}",
                    ),
                    id=f"heatmap-{kind}",
                )
            )
            if "heads" in aggregates["kinds"][kind]:
                fig = self.heatmaps(aggregates, kind, heads=True)
                save_png(fig, out_dir / f"attribution-{kind}-heads.png")
                corr = aggregates["kinds"][kind]["heads"]["correlation"]
                sections.append(
                    section(
                        f"hook_{kind}: block x head",
                        figure(
                            fig,
                            "Mean over the pairs of the change of the metric when one head's clean output "
                            "(at every real position) is patched into the corrupted run: estimated (left) "
                            f"and real (right); over every pair's block x head cells, Pearson "
                            f"{fmt(corr['pearson'])}, Spearman {fmt(corr['spearman'])} ({corr['n']}).",
                            f"attribution-heads-{kind}",
                        ),
                        id=f"heads-{kind}",
                    )
                )
        if aggregates["kinds"]:
            fig = self.scatter(aggregates)
            save_png(fig, out_dir / "attribution-scatter.png")
            rows = []
            for kind, result in aggregates["kinds"].items():
                cells, coarse = result["cells"], result["layer_group"]
                by_group = "; ".join(f"{g}: {fmt(c['pearson'])}" for g, c in result["cells_by_group"].items())
                rows.append(
                    [
                        f"hook_{kind}",
                        cells["pearson"],
                        cells["spearman"],
                        cells["n"],
                        coarse["pearson"],
                        coarse["spearman"],
                        by_group,
                        result["size_ratio"],
                    ]
                )
            worst = [
                [
                    f"hook_{kind}",
                    w["item_id"],
                    w["layer"],
                    w["group"],
                    w["position"],
                    w["head"],
                    w["estimate"],
                    w["real"],
                ]
                for kind, result in aggregates["kinds"].items()
                for w in result["worst_cells"]
            ]
            sections += [
                section(
                    "Estimate against real patching",
                    figure(
                        fig,
                        "Each drawn cell of each pair: estimated and real change of the metric.",
                        "attribution-scatter",
                    ),
                    table(
                        [
                            "hook",
                            "cells: Pearson",
                            "cells: Spearman",
                            "cells",
                            "block x group: Pearson",
                            "block x group: Spearman",
                            "cells' Pearson per group",
                            "mean |estimate| / mean |real|",
                        ],
                        rows,
                    ),
                    id="agreement",
                ),
                section(
                    "Where they differ most",
                    table(["hook", "item", "block", "group", "position", "head", "estimate", "real"], worst),
                    id="worst",
                ),
            ]
        sections.append(
            section(
                "Theirs: what the literature reports",
                table(
                    ["paper", "their models and tasks", "theirs (in words)"],
                    aggregates["theirs"],
                    css="theirs",
                ),
                paragraph(THEIRS_NOTE, css="note"),
                id="theirs",
            )
        )
        if aggregates.get("skipped"):
            sections.append(section("Skipped items", table(["item", "reason"], aggregates["skipped"])))
        return write_page(out_dir / "report.html", title, sections)


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def fmt_pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
