"""Study 3: object-token ablation and the logit lens at the object's tokens (Neo, Ong, Torr, Geva,
Krueger, Barez 2024, "Towards interpreting visual information processing in vision-language models",
arXiv 2410.07149).

An item's objects come with boxes (``meta["objects"]``: ``{"name", "box": [x0, y0, x1, y1]}`` as
fractions of the image; ``meta["asked"]``: the indices of those the question is about; the shapes
dataset gives both). The object's tokens are the image tokens whose grid cell overlaps its box
(plus ``buffer`` cells around, as Neo et al.'s buffer). Their embeddings at the language model's input
(``hook_embed``) are replaced by the mean image token (one vector: the mean of every image token of
the run's items, as Neo et al. use one mean vector) or zero, and the answer is read at the last
position; then as many image tokens drawn at random are ablated the same way. The finding is the
share of the answers the clean model gets right that the ablation turns wrong.

The logit lens (the final norm and unembedding on each layer's residual stream, embeddings and every
block's ``hook_resid_post``) at the object's own tokens: per layer, how often the object's name is
among the top-k tokens, against the same rate at the background's image tokens (those of no object).

Only the image's whole view (grid tile 0) is mapped to the box: the high-resolution crops of tiled
families are not ablated. On DeepStack families (Qwen3-VL, Qwen3-VL-MoE) the vision tower's
intermediate features are added again at the image positions inside the first blocks; the ablation at
the language model's input leaves those in.

Cost: one prepared pass of the vision side over the run's items (the mean, ``mean`` ablation only),
then per batch one forward (the lens read on the way) and two ablated forwards.

Example:
    >>> study = ObjectAblationStudy(buffer=1)  # doctest: +SKIP
    >>> result = run_study(study, vlm, load_shapes("shapes/"), "out/")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float

from hooked_vllm.analysis.logit_lens import LogitLens
from hooked_vllm.errors import HookedVLMError
from hooked_vllm.interventions.metrics import last_logits
from hooked_vllm.runs.datasets import DatasetSample
from hooked_vllm.studies.base import Study, _prepared_batches, answer_token
from hooked_vllm.studies.params import ObjectAblationParams
from hooked_vllm.studies.pruning import item_seed
from hooked_vllm.studies.report import (
    figure,
    paragraph,
    parameters_table,
    save_png,
    section,
    table,
    write_page,
)

#: what Neo et al. report (LLaVA-1.5-7B on COCO objects), in words: beside ours, never a pass/fail
THEIRS = {
    "ablation": "ablating the object's image tokens (with a buffer of neighbouring patches) turns over "
    "70% of the object identifications the model got right into wrong ones, while ablating as many "
    "random image tokens changes few of them: the object's information is localized in the tokens at "
    "its position.",
    "lens": "the logit lens decodes visual tokens into words about the image content at the object's "
    "positions (its name or related words), rarely in the early layers and increasingly in the middle "
    "and late layers: the visual tokens come to align with the vocabulary.",
}
OBJECTS = {"asked": "objects the question asks about", "all": "image's objects"}
THEIRS_NOTE = (
    "Their findings as their text states them, for their model and data; the numbers of their figures "
    "are not copied here. Ours come from another model on other data: compare shapes, not values, "
    "and never read a difference as a failure."
)


class ObjectAblationError(HookedVLMError, ValueError):
    """Items without the objects the study needs, or a model whose image tokens have no grid."""


def cells_of_box(box: Sequence[float], n_rows: int, n_cols: int, buffer: int = 0) -> set[tuple[int, int]]:
    """The grid cells ``(row, col)`` a box ``[x0, y0, x1, y1]`` (fractions of the image) overlaps with
    a positive area, and every cell within ``buffer`` cells of one of them (rows, columns, diagonals)."""
    x0, y0, x1, y1 = box
    rows = [r for r in range(n_rows) if r / n_rows < y1 and (r + 1) / n_rows > y0]
    cols = [c for c in range(n_cols) if c / n_cols < x1 and (c + 1) / n_cols > x0]
    return {
        (r + dr, c + dc)
        for r in rows
        for c in cols
        for dr in range(-buffer, buffer + 1)
        for dc in range(-buffer, buffer + 1)
        if 0 <= r + dr < n_rows and 0 <= c + dc < n_cols
    }


def token_cells(batch, b: int) -> tuple[list[tuple[int, int] | None], int, int]:
    """Item ``b``'s image positions (in sequence order) as cells of its image's whole-view grid
    (``None`` on other tiles), with that grid's rows and columns."""
    images = batch.image_slots[b] if batch.image_slots else []
    if len(images) != 1 or not images[0].spatial:
        raise ObjectAblationError(
            f"object-ablation study: item {b} has {len(images)} images"
            + ("" if len(images) != 1 else " whose tokens have no grid (Q-Former queries)")
            + "; the study maps one image's grid to the object's box. Give one image per item, on a "
            "family whose image tokens are patches."
        )
    grid = images[0].grid[images[0].is_patch]
    whole = grid[grid[:, 0] == 0]
    n_rows, n_cols = int(whole[:, 1].max()) + 1, int(whole[:, 2].max()) + 1
    return [(r, c) if t == 0 else None for t, r, c in grid.tolist()], n_rows, n_cols


def item_objects(item) -> tuple[list[dict], list[int]]:
    """The item's objects and the indices of those the question asks about."""
    meta = getattr(item, "meta", None) or {}
    objects = meta.get("objects")
    if not objects or any("box" not in o for o in objects):
        raise ObjectAblationError(
            f"object-ablation study: item {getattr(item, 'item_id', '?')} gives no objects with boxes "
            "(meta['objects'] = [{'name': ..., 'box': [x0, y0, x1, y1]}], fractions of the image); run "
            "it on a dataset that does (--dataset shapes)."
        )
    return objects, list(meta.get("asked", range(len(objects))))


def positions_of(batch, b: int, boxes: Sequence[Sequence[float]], buffer: int) -> Bool[torch.Tensor, " pos"]:
    """Item ``b``'s image positions whose cell overlaps any of ``boxes`` (plus ``buffer`` cells)."""
    cells, n_rows, n_cols = token_cells(batch, b)
    chosen = set().union(*(cells_of_box(box, n_rows, n_cols, buffer) for box in boxes)) if boxes else set()
    mask = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
    positions = batch.image_mask[b].nonzero().flatten().cpu()
    for position, cell in zip(positions.tolist(), cells, strict=True):
        mask[position] = cell is not None and cell in chosen
    return mask


def random_positions(
    candidates: Bool[torch.Tensor, " pos"], count: int, seed: int
) -> Bool[torch.Tensor, " pos"]:
    """``count`` of the ``candidates`` positions drawn with ``seed`` (all of them if fewer)."""
    where = candidates.nonzero().flatten()
    chosen = torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))[:count]
    mask = torch.zeros_like(candidates)
    mask[where[chosen]] = True
    return mask


@torch.inference_mode()
def image_token_sum(vlm, batch) -> tuple[Float[torch.Tensor, " d_model"], int]:
    """The sum (float64) and count of every image token's embedding at the language model's input."""
    batch = vlm.to_batch(batch)
    embeds = vlm.embed(batch)
    image = batch.image_mask.to(embeds.device)
    return embeds[image].double().sum(0).cpu(), int(image.sum())


def ablation_hook(mask: Bool[torch.Tensor, "batch pos"], replacement: torch.Tensor | None):
    """A ``hook_embed`` hook putting ``replacement`` (zero where None) at ``mask``'s positions."""

    def hook(embeds: torch.Tensor, hook) -> torch.Tensor:
        value = torch.zeros(()) if replacement is None else replacement
        value = value.to(embeds.device, embeds.dtype)
        return torch.where(mask.to(embeds.device)[..., None], value, embeds)

    return hook


class ObjectAblationStudy(Study):
    """Object-token ablation and the logit lens at the object; see the module docstring."""

    name = "object-ablation"
    params_type = ObjectAblationParams
    paper = (
        "Neo, Ong, Torr, Geva, Krueger, Barez (2024), Towards interpreting visual information "
        "processing in vision-language models, arXiv 2410.07149"
    )

    def __init__(self, params=None, **overrides) -> None:
        super().__init__(params, **overrides)
        #: the mean image token (``mean`` ablation), and how many tokens it averages
        self.mean: torch.Tensor | None = None
        self.mean_count = 0

    def plan(self, vlm, sample: DatasetSample, batch_size: int = 8) -> None:
        """The mean image token of the sample's items (``mean`` ablation), once before a run."""
        if self.params.ablation != "mean":
            return
        total, count = None, 0
        scratch = DatasetSample(
            sample.name, list(sample.items), max_pixels=sample.max_pixels, skip_bad=sample.skip_bad
        )
        for _, batch in _prepared_batches(vlm, list(sample.items), batch_size, scratch):
            summed, n = image_token_sum(vlm, batch)
            total, count = (summed if total is None else total + summed), count + n
        if not count:
            raise ObjectAblationError("object-ablation study: no image token to average (no item ran).")
        self.set_mean(total / count, count)

    def set_mean(self, mean: torch.Tensor, count: int) -> None:
        """Set the mean image token the ``mean`` ablation puts in (what :meth:`plan` computes)."""
        self.mean, self.mean_count = mean, count

    def lens_forward(self, vlm, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The clean logits at the last position, and per layer (embeddings, then every block's
        output) the logit lens's top-k tokens at every image position ``[n_image_positions, k]``."""
        lens = LogitLens.from_vlm(vlm)
        image = batch.image_mask
        names = list(lens.hook_names)  # the embedding, then every block's output
        tops: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(activation: torch.Tensor, hook) -> None:
                resid = lens.lens_input(activation)  # what the final norm would read there
                vectors = resid[image.to(resid.device)]
                tops[name] = torch.cat(
                    [
                        lens.logits(chunk).topk(self.params.top_k, dim=-1).indices.cpu()
                        for chunk in vectors.split(1024)
                    ]
                )

            return hook

        logits = vlm.run_with_hooks(batch, fwd_hooks=[(name, capture(name)) for name in names])
        return last_logits(logits, batch), [tops[name] for name in names]

    def item_rows(self, vlm, items, batch) -> list[dict]:
        batch = vlm.to_batch(batch)
        if self.params.ablation == "mean" and self.mean is None:
            raise ObjectAblationError(
                "object-ablation study: the mean image token is not computed; run it with run_study "
                "(which calls plan) or call study.set_mean(...) first."
            )
        clean, tops = self.lens_forward(vlm, batch)
        tokens, sources = self.answers(vlm, items, clean)
        rows_of = torch.arange(len(batch))
        answer = torch.tensor(tokens, device=clean.device)
        n_pos = batch.input_ids.shape[1]
        ablated = torch.zeros(len(batch), n_pos, dtype=torch.bool)
        control = torch.zeros_like(ablated)
        lens_rows = []
        image_index = (batch.image_mask.cpu().long().cumsum(-1) - 1).clamp_min(0)  # rows in tops
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch.image_mask.sum(-1).cumsum(0).cpu()])
        for b, item in enumerate(items):
            objects, asked = item_objects(item)
            chosen = [objects[i]["box"] for i in asked] if self.params.objects == "asked" else None
            boxes = chosen if chosen is not None else [o["box"] for o in objects]
            ablated[b] = positions_of(batch, b, boxes, self.params.buffer)
            if self.params.random_excludes_objects:
                every = positions_of(batch, b, [o["box"] for o in objects], self.params.buffer)
                candidates = batch.image_mask[b].cpu() & ~every
            else:
                candidates = batch.image_mask[b].cpu()
            seed = item_seed(item, b, self.params.random_seed)
            control[b] = random_positions(candidates, int(ablated[b].sum()), seed)
            lens_rows.append(self.lens_row(vlm, batch, b, objects, asked, tops, image_index[b] + offsets[b]))
        replacement = self.mean if self.params.ablation == "mean" else None
        outcome = {}
        for name, mask in (("object", ablated), ("random", control)):
            with vlm.hooks(fwd_hooks=[("hook_embed", ablation_hook(mask, replacement))]):
                outcome[name] = last_logits(vlm(batch), batch)
        prediction = clean.argmax(-1)
        p_clean = clean.softmax(-1)[rows_of, answer]
        rows = []
        for b, item in enumerate(items):
            row = {
                "answer_token": tokens[b],
                "answer": vlm.tokenizer.decode([tokens[b]]),
                "answer_from": sources[b],
                "kind": str((getattr(item, "meta", None) or {}).get("kind", "")),
                "prediction": int(prediction[b]),
                "correct": bool(prediction[b] == answer[b]),
                "p_clean": float(p_clean[b]),
                "n_image": int(batch.image_mask[b].sum()),
                "n_ablated": int(ablated[b].sum()),
                "n_random": int(control[b].sum()),
                "n_layers": vlm.cfg.n_layers,
                "mean_count": self.mean_count,
                **lens_rows[b],
            }
            for name, logits in outcome.items():
                row[f"p:{name}"] = float(logits[b].softmax(-1)[tokens[b]])
                row[f"correct:{name}"] = bool(int(logits[b].argmax()) == tokens[b])
            rows.append(row)
        return rows

    def lens_row(self, vlm, batch, b, objects, asked, tops, index) -> dict:
        """Per lens word and layer: the share of (asked object, own token) pairs where the object's
        word is among the top-k, and the same share over the background's image tokens."""
        image = batch.image_mask[b].cpu()
        own = [positions_of(batch, b, [objects[i]["box"]], 0) for i in asked]
        background = image & ~positions_of(batch, b, [o["box"] for o in objects], 0)
        row = {}
        for field in self.params.lens_words:
            words = []
            for i in asked:
                if field not in objects[i]:
                    raise ObjectAblationError(
                        f"object-ablation study: an object of item {getattr(batch, 'item', b)} has no "
                        f"{field!r} (it has {', '.join(objects[i])}); give --lens-words among those."
                    )
                words.append(answer_token(vlm.tokenizer, str(objects[i][field])))
            hits, bg = [], []
            for layer_tops in tops:
                top = layer_tops[index]  # [pos, k] (rows at non-image positions are unused)
                pairs = [(top[mask] == word).any(-1) for mask, word in zip(own, words)]
                flat = torch.cat(pairs) if pairs else torch.zeros(0, dtype=torch.bool)
                hits.append(float(flat.float().mean()) if len(flat) else float("nan"))
                back = [(top[background] == word).any(-1) for word in words]
                flat = torch.cat(back) if back else torch.zeros(0, dtype=torch.bool)
                bg.append(float(flat.float().mean()) if len(flat) else float("nan"))
            row[f"lens:{field}"] = hits
            row[f"lens_background:{field}"] = bg
        return row

    def aggregate(self, rows: list[dict]) -> dict:
        def drops(subset: list[dict]) -> dict:
            right = [r for r in subset if r["correct"]]
            out = {"n_items": len(subset), "n_correct": len(right)}
            for name in ("object", "random"):
                out[f"accuracy:{name}"] = float(np.mean([r[f"correct:{name}"] for r in subset]))
                out[f"turned_wrong:{name}"] = (
                    float(np.mean([not r[f"correct:{name}"] for r in right])) if right else float("nan")
                )
                out[f"p_change:{name}"] = float(
                    np.mean([100 * (r[f"p:{name}"] - r["p_clean"]) / r["p_clean"] for r in subset])
                )
            out["accuracy_clean"] = float(np.mean([r["correct"] for r in subset]))
            return out

        out: dict = {
            "study": self.name,
            "paper": self.paper,
            "params": self.settings(),
            "n_layers": rows[0]["n_layers"],
            "n_items": len(rows),
            "mean_count": rows[0]["mean_count"],
            "answer_from": {s: sum(r["answer_from"] == s for r in rows) for s in ("label", "prediction")},
            "mean_image_tokens": float(np.mean([r["n_image"] for r in rows])),
            "mean_ablated_tokens": float(np.mean([r["n_ablated"] for r in rows])),
            "all": drops(rows),
            "by_kind": {
                kind: drops([r for r in rows if r["kind"] == kind])
                for kind in sorted({r["kind"] for r in rows})
                if kind
            },
            "lens": {},
            "theirs": THEIRS,
        }
        for field in self.params.lens_words:
            hits = np.array([r[f"lens:{field}"] for r in rows], dtype=float)
            background = np.array([r[f"lens_background:{field}"] for r in rows], dtype=float)
            with np.errstate(invalid="ignore"):
                out["lens"][field] = {
                    "object": np.nanmean(hits, 0).tolist(),
                    "background": np.nanmean(background, 0).tolist(),
                }
        return out

    # ------------------------------------------------------------------ report
    def ablation_figure(self, aggregates: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 3.8))
        ax = fig.add_subplot()
        groups = {"all": aggregates["all"], **aggregates["by_kind"]}
        x = np.arange(len(groups))
        for offset, (name, colour) in zip((-0.2, 0.2), (("object", "#d62728"), ("random", "#1f77b4"))):
            values = [100 * g[f"turned_wrong:{name}"] for g in groups.values()]
            ax.bar(x + offset, values, width=0.4, color=colour, label=f"{name} tokens ablated")
        ax.set_xticks(x, [f"{k} ({g['n_correct']})" for k, g in groups.items()])
        ax.set_ylabel("correct answers turned wrong (%)")
        ax.set_ylim(0, 105)
        ax.legend()
        ax.set_title("Object tokens against as many random tokens (items answered right, by kind)")
        fig.tight_layout()
        return fig

    def lens_figure(self, aggregates: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 3.8))
        ax = fig.add_subplot()
        labels = ["embed"] + [str(layer) for layer in range(aggregates["n_layers"])]
        x = np.arange(len(labels))
        colours = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
        for i, (field, curves) in enumerate(aggregates["lens"].items()):
            colour = colours[i % len(colours)]
            ax.plot(x, 100 * np.array(curves["object"]), marker="o", color=colour, label=f"{field}: object")
            ax.plot(
                x, 100 * np.array(curves["background"]), ls="--", color=colour, label=f"{field}: background"
            )
        ax.set_xticks(x, labels)
        ax.set_xlabel("residual stream after block (embed: the input)")
        ax.set_ylabel(f"word in the lens's top {aggregates['params']['top_k']} (%)")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=8)
        ax.set_title("The logit lens at the object's tokens")
        fig.tight_layout()
        return fig

    def write_report(self, out_dir: Path, aggregates: dict, title: str) -> Path:
        out_dir = Path(out_dir)
        params = aggregates["params"]
        every = aggregates["all"]
        sections = [
            section(
                "What this is",
                paragraph(
                    f"{self.paper}. The image tokens whose grid cell overlaps the box of the "
                    f"{OBJECTS[params['objects']]} (plus {params['buffer']} cells around) have their "
                    "input embedding replaced by "
                    + (
                        f"the mean image token (over the {aggregates['mean_count']} image tokens of the "
                        "run's items)"
                        if params["ablation"] == "mean"
                        else "zero"
                    )
                    + "; then as many random image tokens are. The finding is the share of the answers "
                    "the clean model gets right that each ablation turns wrong. The logit lens reads "
                    "the object's own tokens at every layer."
                ),
                parameters_table(params, aggregates["n_layers"]),
                paragraph(
                    f"{aggregates['n_items']} items, {every['n_correct']} answered right "
                    f"({every['accuracy_clean']:.1%}); {aggregates['mean_ablated_tokens']:.2f} of "
                    f"{aggregates['mean_image_tokens']:.1f} image tokens ablated on average.",
                    css="note",
                ),
            )
        ]
        fig = self.ablation_figure(aggregates)
        save_png(fig, out_dir / "object-ablation.png")
        groups = {"all": every, **aggregates["by_kind"]}
        sections.append(
            section(
                "Ablation: object tokens against random ones",
                figure(fig, "Correct answers turned wrong by each ablation.", "ablation-bars"),
                table(
                    [
                        "items",
                        "answered right",
                        "object: turned wrong (%)",
                        "random: turned wrong (%)",
                        "object: p change (%)",
                        "random: p change (%)",
                    ],
                    [
                        [
                            name,
                            g["n_correct"],
                            100 * g["turned_wrong:object"],
                            100 * g["turned_wrong:random"],
                            g["p_change:object"],
                            g["p_change:random"],
                        ]
                        for name, g in groups.items()
                    ],
                ),
                id="ablation",
            )
        )
        fig = self.lens_figure(aggregates)
        save_png(fig, out_dir / "object-lens.png")
        labels = ["embed"] + [str(layer) for layer in range(aggregates["n_layers"])]
        lens_rows = [
            [label]
            + [
                v
                for curves in aggregates["lens"].values()
                for v in (curves["object"][i], curves["background"][i])
            ]
            for i, label in enumerate(labels)
        ]
        sections.append(
            section(
                "The logit lens at the object's tokens",
                figure(
                    fig,
                    "How often the object's word is among the lens's top-k tokens at its own image "
                    "tokens (solid) and at the background's (dashed).",
                    "lens-curves",
                ),
                table(
                    ["layer"]
                    + [f"{f}: {where}" for f in aggregates["lens"] for where in ("object", "background")],
                    lens_rows,
                ),
                id="lens",
            )
        )
        lens_text = "; ".join(
            f"{field}: {max(curves['object']):.0%} at best (layer "
            f"{labels[int(np.nanargmax(curves['object']))]}), background {max(curves['background']):.0%}"
            for field, curves in aggregates["lens"].items()
        )
        sections.append(
            section(
                "Ours beside theirs",
                table(
                    ["finding", "ours", "theirs (Neo et al.)"],
                    [
                        [
                            "ablation",
                            f"object tokens: {every['turned_wrong:object']:.0%} of right answers turned "
                            f"wrong; random tokens: {every['turned_wrong:random']:.0%}",
                            THEIRS["ablation"],
                        ],
                        ["logit lens", lens_text, THEIRS["lens"]],
                    ],
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
        every = aggregates["all"]
        lines = [
            f"{aggregates['n_items']} items, {every['n_correct']} answered right; right answers turned "
            f"wrong: object tokens {every['turned_wrong:object']:.1%}, random tokens "
            f"{every['turned_wrong:random']:.1%}"
        ]
        for field, curves in aggregates["lens"].items():
            best = int(np.nanargmax(curves["object"]))
            lines.append(
                f"logit lens '{field}' at the object's tokens: best {curves['object'][best]:.1%} "
                f"(after block {best - 1 if best else 'embed'}), background {curves['background'][best]:.1%}"
            )
        return lines
