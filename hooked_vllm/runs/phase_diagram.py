"""The phase-diagram experiment at dataset scale: dataset -> batches -> one-pass collector -> a
resumable results store -> aggregates -> phases.

Results go to a :class:`~hooked_vllm.runs.store.ResultStore` (per-batch Parquet parts, written
atomically, verified on resume, one writer per folder, settings stored with the results): a killed
run leaves only whole parts and a restarted run skips the items they hold. Nothing is lost, counted
twice or mixed with results of other settings.

Data parallel: under ``torchrun``/``accelerate launch`` (``RANK``/``WORLD_SIZE``) each rank takes
``items[rank::world]`` and writes its own parts; rank 0 aggregates once all ranks are done (gloo or
NCCL barrier). Aggregation reads all parts sorted by item id, in float64, so the result does not
depend on how items were sharded or batched.

Example:
    >>> result = run_phase_diagram(vlm, sample, out_dir="out", batch_size=4)  # doctest: +SKIP
    >>> result.aggregates["contextualization"]["inter"]["adjusted_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hooked_vllm.analysis.collect import collect
from hooked_vllm.analysis.phases import detect_phases
from hooked_vllm.model.batch import PREPARE_ERRORS
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.datasets import DatasetSample, bad_item, refused, screen_items
from hooked_vllm.runs.files import write_text_atomically
from hooked_vllm.runs.store import ResultStore, RunStoreError

__all__ = ["ResultStore", "RunResult", "aggregate", "batch_rows", "run_phase_diagram"]

GROUPS = ("intra_image", "intra_text", "inter", "all")


@dataclass
class RunResult:
    out_dir: Path
    aggregates: dict
    n_items: int
    #: items found already done in the store when the run started
    n_resumed: int = 0
    #: every item's row (sorted by item id), as aggregated
    rows: list[dict] = field(default_factory=list)


def shard_of_environment() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun/accelerate variables; ``(0, 1)`` when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------- one batch -> rows
def batch_rows(vlm, items, analysis, batch) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per-item rows and the batch's unit-vector sums from a :class:`BatchAnalysis`."""
    ctx = analysis.contextualization
    per_item = ctx.per_item()
    s_img, s_txt = ctx.modality_sum["image"].double(), ctx.modality_sum["text"].double()  # [layer, b, d]
    rows = []
    for b, item in enumerate(items):
        row = {
            "item_id": item.item_id,
            "image": str(item.image_path),
            "instruction": item.instruction,
            "meta": json.dumps(item.meta, default=str),
            "n_image": float(ctx.modality_count["image"][b]),
            "n_text": float(ctx.modality_count["text"][b]),
            "selfdot_image": (s_img[:, b] * s_img[:, b]).sum(-1).tolist(),
            "selfdot_text": (s_txt[:, b] * s_txt[:, b]).sum(-1).tolist(),
            "crossdot": (s_img[:, b] * s_txt[:, b]).sum(-1).tolist(),
        }
        if analysis.nonfinite is not None:
            row["nonfinite_layers"] = analysis.nonfinite[:, b].nonzero().flatten().tolist()
        for group in GROUPS:
            row[f"ctx_{group}"] = per_item[group][:, b].tolist()
        if analysis.attention is not None:
            for pair, values in analysis.attention.norm.items():
                row[f"norm_{pair}"] = values[:, b].tolist()
                row[f"weight_{pair}"] = analysis.attention.weight[pair][:, b].tolist()
            if analysis.attention.image_saliency_from_last is not None:
                n = analysis.n_image_tokens[b]  # the item's own image tokens (the batch pads to its most)
                row["saliency_last"] = (
                    analysis.attention.image_saliency_from_last[:, b, :n].flatten().tolist()
                )
                row["saliency_text"] = (
                    analysis.attention.image_saliency_from_text[:, b, :n].flatten().tolist()
                )
                if batch.image_slots and all(slots.spatial for slots in batch.image_slots[b]):
                    row["image_grid"] = patch_grid(batch.image_slots[b])
        if analysis.lens is not None:
            lens = analysis.lens
            row["lens_final_token"] = int(lens.final_token[b, 0])
            row["lens_final_prob"] = lens.final_prob[:, b, 0].tolist()
            row["lens_final_rank"] = lens.final_rank[:, b, 0].tolist()
            row["lens_kl"] = lens.kl_to_final[:, b, 0].tolist()
            row["lens_top1"] = lens.top_tokens[:, b, 0, 0].tolist()
        if analysis.image_verbalization is not None:
            n = analysis.n_image_tokens[b]
            row["image_verbalization"] = analysis.image_verbalization[:, b, :n].flatten().tolist()
        rows.append(row)
    # the cross-input baseline's sums: over the items aggregate() keeps (finite at every layer)
    finite = torch.tensor([not nonfinite_layers(row) for row in rows])
    vectors = {"sum_image": s_img[:, finite].sum(1).numpy(), "sum_text": s_txt[:, finite].sum(1).numpy()}
    return rows, vectors


def patch_grid(images) -> list[int]:
    """An item's image-patch positions on their images, flattened: (image, tile, row, col) each, in
    sequence order (structure slots such as LLaVA-NeXT's newlines left out)."""
    cells = []
    for image_index, slots in enumerate(images):
        patches = slots.grid[slots.is_patch]
        cells += [[image_index, *cell] for cell in patches.tolist()]
    return [value for cell in cells for value in cell]


# ---------------------------------------------------------------- aggregates
def _cross_input_baselines(total_img, total_txt, self_img, self_txt, cross, n_img, n_txt) -> dict:
    """Mean cosine over all token pairs from different items, per group and layer (the anisotropy
    baseline), from the dataset's unit-vector sums and each item's own."""
    total_all = total_img + total_txt
    self_all = self_img + self_txt + 2 * cross
    n_all = n_img + n_txt
    return {
        "intra_image": ((total_img**2).sum(-1) - self_img.sum(0)) / (n_img.sum() ** 2 - (n_img**2).sum()),
        "intra_text": ((total_txt**2).sum(-1) - self_txt.sum(0)) / (n_txt.sum() ** 2 - (n_txt**2).sum()),
        "inter": ((total_img * total_txt).sum(-1) - cross.sum(0))
        / (n_img.sum() * n_txt.sum() - (n_img * n_txt).sum()),
        "all": ((total_all**2).sum(-1) - self_all.sum(0)) / (n_all.sum() ** 2 - (n_all**2).sum()),
    }


def _stats(matrix: np.ndarray) -> dict[str, list]:
    """Per layer: mean, standard deviation and normal-approximation 95% interval half-width over the
    items where the value is defined (``n``: how many). NaN marks a value undefined for an item (a
    group it lacks); a layer no item defines has mean NaN, and std and interval NaN below 2 items."""
    n = np.sum(~np.isnan(matrix), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers: NaN, counted in n
        mean = np.nanmean(matrix, axis=0)
        std = np.where(n > 1, np.nanstd(matrix, axis=0, ddof=1), np.nan)
    ci = 1.96 * std / np.sqrt(np.maximum(n, 1))
    return {"mean": mean.tolist(), "std": std.tolist(), "ci95": ci.tolist(), "n": n.tolist()}


def nonfinite_layers(row: dict) -> list[int]:
    """The stream layers where an item's activations are not finite: as the collector found them, and
    wherever its all-token contextualization is not (for rows of earlier versions, also its logit-lens
    KL, which a non-finite last layer makes NaN at every layer)."""
    layers = set(row.get("nonfinite_layers", ()))
    for key in ("ctx_all",) if "nonfinite_layers" in row else ("ctx_all", "lens_kl"):
        if key in row:
            layers |= set(np.nonzero(~np.isfinite(np.asarray(row[key], dtype=float)))[0].tolist())
    return sorted(layers)


class NonFiniteResultsError(RunStoreError):
    """No item of a run has finite activations at every layer: there is nothing to aggregate."""


#: what each count of the aggregates counts
COUNTS = {
    "n_items": "items every mean, interval and phase is computed over: those finite at every layer",
    "n_items_run": "items analysed and stored (n_items plus n_items_nonfinite)",
    "n_items_nonfinite": "items left out of every mean because their activations hold NaN or inf at "
    "some layer (listed with those layers in nonfinite_items)",
    "n": "per layer, the items where that value is defined (an item lacking a modality has no value "
    "for its groups)",
}


def aggregate(rows: list[dict], sums: dict[str, np.ndarray], *, window: int = 3) -> dict:
    """Dataset aggregates (JSON-ready): contextualization raw, baseline and adjusted per layer,
    norm/weight attention by modality pair, logit-lens convergence, and the phases."""
    if not rows:
        raise ValueError("No results to aggregate: the run processed no items.")
    nonfinite = {row["item_id"]: layers for row in rows if (layers := nonfinite_layers(row))}
    if len(nonfinite) == len(rows):
        first = min(min(layers) for layers in nonfinite.values())
        raise NonFiniteResultsError(
            f"Every item's activations hold NaN or inf (from stream layer {first} on, in "
            f"{next(iter(nonfinite))} and {len(rows) - 1} more): a NaN in the model's weights, or values "
            "beyond its dtype (try --dtype float32). The items are stored; nothing was aggregated."
        )
    n_run = len(rows)
    rows = [row for row in rows if row["item_id"] not in nonfinite]  # (and not in sums: batch_rows)
    n_img = np.array([r["n_image"] for r in rows])
    n_txt = np.array([r["n_text"] for r in rows])
    self_img = np.array([r["selfdot_image"] for r in rows])  # [item, layer]
    self_txt = np.array([r["selfdot_text"] for r in rows])
    cross = np.array([r["crossdot"] for r in rows])
    total_img, total_txt = sums["sum_image"], sums["sum_text"]  # [layer, d]
    with np.errstate(divide="ignore", invalid="ignore"):  # one item: no cross-input pair (NaN, unused)
        baseline = _cross_input_baselines(total_img, total_txt, self_img, self_txt, cross, n_img, n_txt)
    out: dict = {
        "n_items": len(rows),
        "n_items_run": n_run,
        "n_items_nonfinite": len(nonfinite),
        "nonfinite_items": nonfinite,
        "counts": COUNTS,
        "n_layers": int(self_img.shape[1]) - 1,
        "contextualization": {},
    }
    for group in GROUPS:
        raw = np.array([r[f"ctx_{group}"] for r in rows], dtype=float)
        stats = _stats(raw)
        stats["baseline"] = baseline[group].tolist() if len(rows) > 1 else None
        adjusted = _stats(raw - baseline[group]) if len(rows) > 1 else stats
        stats["adjusted_mean"] = adjusted["mean"]
        stats["adjusted_ci95"] = adjusted["ci95"]
        out["contextualization"][group] = stats
    pairs = sorted(key[len("norm_") :] for key in rows[0] if key.startswith("norm_"))
    out["norm_attention"] = {
        pair: _stats(np.array([r[f"norm_{pair}"] for r in rows], dtype=float)) for pair in pairs
    }
    out["weight_attention"] = {
        pair: _stats(np.array([r[f"weight_{pair}"] for r in rows], dtype=float)) for pair in pairs
    }
    if "saliency_last" in rows[0]:
        # A map is averaged over the items whose images lie on the same grid of image tokens (all of
        # them for fixed-size families; the most common layout under dynamic resolution or tiles).
        n_layers = out["n_layers"]
        with_image = [r for r in rows if r["saliency_last"]]  # text-only items have no map
        layouts = [(len(r["saliency_last"]), tuple(r.get("image_grid") or ())) for r in with_image]
        if layouts:
            common = max(set(layouts), key=lambda layout: (layouts.count(layout), layout))  # ties: fixed
            same = [r for r, layout in zip(with_image, layouts) if layout == common]
            for key in ("saliency_last", "saliency_text"):
                maps = np.array([r[key] for r in same], dtype=float).reshape(len(same), n_layers, -1)
                out[key] = maps.mean(0).tolist()
            out["saliency_items"] = len(same)
            if common[1]:
                out["saliency_grid"] = np.asarray(common[1]).reshape(-1, 4).tolist()
    if "lens_kl" in rows[0]:
        out["logit_lens"] = {
            "kl_to_final": _stats(np.array([r["lens_kl"] for r in rows], dtype=float)),
            "final_prob": _stats(np.array([r["lens_final_prob"] for r in rows], dtype=float)),
            "top1_is_final": np.mean([np.array(r["lens_final_rank"]) == 0 for r in rows], axis=0).tolist(),
        }
    ctx = out["contextualization"]
    which = "adjusted_mean" if len(rows) > 1 else "mean"
    kl = out.get("logit_lens", {}).get("kl_to_final", {}).get("mean")
    report = detect_phases(
        np.array(ctx["intra_image"][which]),
        np.array(ctx["intra_text"][which]),
        np.array(ctx["inter"][which]),
        np.array(kl[:]) if kl is not None else None,
        window=window,
    )
    out["phases"] = [phase.__dict__ for phase in report.phases]
    out["phases_from"] = which
    return out


def nonfinite_summary(aggregates: dict, show: int = 3) -> str | None:
    """One line naming the items left out for NaN or inf and what the means are over (None if none)."""
    left_out = aggregates.get("nonfinite_items") or {}
    if not left_out:
        return None
    named = "; ".join(f"{item} from layer {layers[0]}" for item, layers in list(left_out.items())[:show])
    more = f"; and {len(left_out) - show} more" if len(left_out) > show else ""
    return (
        f"{len(left_out)} of {aggregates['n_items_run']} items hold NaN or inf activations ({named}{more}): "
        f"they are left out of every mean, interval and phase, which are over the other "
        f"{aggregates['n_items']} items (aggregates.json lists them under nonfinite_items)."
    )


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or inf float as None (JSON's null): JSON has no NaN, and a reader that
    takes ``NaN`` for a number (or 0) would read an undefined value as data."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_aggregates(out_dir: Path, aggregates: dict) -> None:
    """``aggregates.json`` (undefined values as null) and ``aggregates.csv`` (one row per stream layer;
    ``n_items``: the items its means are over; undefined values empty)."""
    write_text_atomically(out_dir / "aggregates.json", json.dumps(json_ready(aggregates), indent=1))
    ctx = aggregates["contextualization"]
    header = ["layer"] + [f"{g}_{k}" for g in GROUPS for k in ("mean", "ci95", "adjusted_mean")]
    header += [f"norm_{p}" for p in aggregates["norm_attention"]] + ["n_items"]
    lines = [",".join(header)]
    n_blocks = aggregates["n_layers"]
    for layer in range(n_blocks + 1):
        values = [str(layer)]
        for g in GROUPS:
            values += [_csv_number(ctx[g][k][layer]) for k in ("mean", "ci95", "adjusted_mean")]
        for stats in aggregates["norm_attention"].values():
            # layer l's attention is block l's (README, "Layer numbers"): none at the final stream
            values.append(_csv_number(stats["mean"][layer]) if layer < n_blocks else "")
        values.append(str(ctx["all"]["n"][layer]))
        lines.append(",".join(values))
    write_text_atomically(out_dir / "aggregates.csv", "\n".join(lines) + "\n")


def _csv_number(value: float | None) -> str:
    return f"{value:.6g}" if value is not None and np.isfinite(value) else ""


# ---------------------------------------------------------------- the run
class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers, so the model never waits on JPEG decoding."""

    def __init__(self, items, max_pixels: int | None = None) -> None:
        self.items = items
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index], load_image(self.items[index].image_path, max_pixels=self.max_pixels)


class _Prepare:
    """``collate_fn``: the processor (resize, normalise, tokenise, modality masks) runs where the
    images were decoded, in the DataLoader workers, so the main process only feeds the model.

    Returns ``(items, batch, refused)``. Where the processor refuses the batch, each item is prepared
    alone: the ones it refuses are returned as ``(item, what the processor said)`` (named in the main
    process, where an error is one line) and the others prepared together (``batch`` is ``None`` if
    none is left)."""

    def __init__(self, vlm) -> None:
        self.prepare = vlm.prepare

    def _batch(self, pairs):
        return self.prepare([image for _, image in pairs], [item.instruction for item, _ in pairs])

    def __call__(self, pairs):
        try:
            return [item for item, _ in pairs], self._batch(pairs), []
        except PREPARE_ERRORS:
            good, bad = [], []
            for item, image in pairs:
                try:
                    self._batch([(item, image)])
                    good.append((item, image))
                except PREPARE_ERRORS as exc:
                    bad.append((item, refused(exc)))
            if not bad:
                raise
        return [item for item, _ in good], self._batch(good) if good else None, bad


def default_settings(vlm, sample: DatasetSample, verbalize_images: bool) -> dict[str, Any]:
    """What identifies a run's results when the caller gives no settings: the model, its dtype and
    device, the dataset and its items, and the analyses run."""
    first = next(vlm.hf_model.parameters())
    return {
        "model": getattr(vlm.hf_model.config, "_name_or_path", "") or type(vlm.hf_model).__name__,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "dataset": sample.name,
        "n_items": len(sample.items),
        "verbalize_images": verbalize_images,
    }


def open_run_store(
    out_dir: str | Path,
    rank: int,
    world_size: int,
    settings: Mapping[str, Any] | None,
    *,
    repair: bool = False,
    upgrade: Callable[[dict], dict] | None = None,
) -> ResultStore:
    """Open (lock, check, verify) rank ``rank``'s store. In a distributed run rank 0 goes first and
    alone repairs; the other ranks open once it has, or raise the error it met."""
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return ResultStore(out_dir, rank, settings, repair=repair, upgrade=upgrade).open()
    outcome: list[Any] = [None]
    store = None
    if rank == 0:
        try:
            store = ResultStore(out_dir, rank, settings, repair=repair, upgrade=upgrade).open()
        except RunStoreError as exc:
            outcome[0] = exc
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    return store if store is not None else ResultStore(out_dir, rank, settings).open()


def _check_unique_ids(sample: DatasetSample) -> None:
    doubled = sorted(item_id for item_id, n in Counter(i.item_id for i in sample.items).items() if n > 1)
    if doubled:
        raise RunStoreError(
            f"The {sample.name} sample repeats item id(s) {', '.join(doubled[:5])}"
            f"{' ...' if len(doubled) > 5 else ''}: each item must have its own id. Fix the dataset "
            "(e.g. a duplicated image entry in the annotation file)."
        )


def run_phase_diagram(
    vlm,
    sample: DatasetSample,
    out_dir: str | Path | ResultStore,
    *,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 0,
    verbalize_images: bool = True,
    progress: bool = True,
    max_batches: int | None = None,
    settings: Mapping[str, Any] | None = None,
    repair: bool = False,
) -> RunResult | None:
    """Analyse every item of ``sample`` not yet in ``out_dir`` and aggregate.

    Items the model cannot take (see :func:`~hooked_vllm.runs.datasets.screen_items`, and images or
    text the processor refuses) raise :class:`~hooked_vllm.runs.datasets.BadItemError` naming the
    item, or under ``sample.skip_bad`` are skipped and listed in ``sample.skipped``.

    Returns the aggregates on rank 0 (``None`` on other ranks). ``max_batches`` stops early (for
    tests and quick looks); a later call resumes. ``settings`` identify the run's results (default:
    :func:`default_settings`); a folder holding results of other settings is refused. ``repair``
    sets corrupt or doubled parts aside and recomputes their items (see :mod:`hooked_vllm.runs.store`).
    ``out_dir`` may be an open :class:`ResultStore` (the CLI opens it before loading the model).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RunStoreError(f"batch_size must be a positive integer; got {batch_size!r}.")
    _check_unique_ids(sample)
    screen_items(vlm, sample)
    env_rank, env_world = shard_of_environment()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if isinstance(out_dir, ResultStore):
        store, owned = out_dir, False
    else:
        if settings is None:
            settings = default_settings(vlm, sample, verbalize_images)
        store, owned = open_run_store(out_dir, rank, world_size, settings, repair=repair), True
    try:
        return _run(
            vlm, sample, store, batch_size, rank, world_size, workers, verbalize_images, progress, max_batches
        )
    finally:
        if owned:
            store.close()


def _run(vlm, sample, store, batch_size, rank, world_size, workers, verbalize_images, progress, max_batches):
    done = store.done_ids()
    mine = [item for item in sample.items[rank::world_size] if item.item_id not in done]
    n_resumed = sum(item.item_id in done for item in sample.items)
    if n_resumed and progress:
        print(
            f"resuming {store.out_dir}: {n_resumed} of {len(sample.items)} items already done",
            file=sys.stderr,
        )
    loader = torch.utils.data.DataLoader(
        _Images(mine, getattr(sample, "max_pixels", None)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_Prepare(vlm),
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
    )
    bar = tqdm(total=len(mine), disable=not progress, desc=f"rank {rank}" if world_size > 1 else "items")
    with torch.inference_mode():
        for n_batch, (items, batch, bad) in enumerate(loader):
            if max_batches is not None and n_batch >= max_batches:
                break
            sample.skipped.extend(bad_item(sample, item, problem) for item, problem in bad)
            bar.update(len(bad))
            if batch is None:
                continue
            analysis = collect(vlm, batch, verbalize_images=verbalize_images)
            store.write(*batch_rows(vlm, items, analysis, batch))
            bar.update(len(items))
    bar.close()
    skipped_here = [item_id for item_id, _ in sample.skipped]
    if world_size > 1 and rank != 0:  # rank 0 lists every rank's skipped items
        write_text_atomically(store.dir / f"skipped-r{rank}.json", json.dumps(sample.skipped))
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    for other in range(1, world_size):
        listed = store.dir / f"skipped-r{other}.json"
        if listed.is_file():
            sample.skipped.extend(
                (item_id, reason)
                for item_id, reason in json.loads(listed.read_text())
                if item_id not in skipped_here
            )
    rows, sums = store.read()
    aggregates = aggregate(rows, sums)
    aggregates["skipped"] = sample.skipped
    write_aggregates(store.out_dir, aggregates)
    return RunResult(store.out_dir, aggregates, len(rows), n_resumed, rows)
