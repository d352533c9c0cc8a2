"""Writing an activation store: the plan (hooks checked, widths, bytes per row), the size estimate and
the disk budget, and the run (DataLoader workers decode and prepare, the model runs, one shard per
batch). :meth:`hooked_vllm.activations.store.ActivationStore.write` is the entry point.

Batch ``b`` is ``items[b * batch_size:(b + 1) * batch_size]``; under torchrun rank ``r`` computes
batches ``b % world == r``, so every shard is the one a single run writes, and the merge (rank 0,
after a barrier: every shard verified, ``state.json`` listing them in batch order) is exact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hooked_vllm.activations.constants import STORAGE_DTYPES
from hooked_vllm.activations.layout import (
    HookSelectionError,
    ImageLayout,
    capture,
    check_hooks,
    image_layout,
    row_metadata,
    rows_per_prompt,
    select_rows,
)
from hooked_vllm.activations.shards import (
    ActivationStoreError,
    ShardWriter,
    features,
    publish,
)
from hooked_vllm.model.batch import PREPARE_ERRORS
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.datasets import BadItemError, DatasetItem, DatasetSample, refused

FORMAT = "hooked-vllm activations 1"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
#: bytes of a row's metadata besides its item id: 8 ints, modality, token (~12 characters), offsets
METADATA_BYTES = 8 + 7 * 4 + 8 + 4 + 12 + 4


class DiskBudgetError(ActivationStoreError):
    """The disk cannot hold the activations the run would write."""


@dataclass
class StorePlan:
    """What a store of ``hooks`` at ``positions`` holds for one model: layout, widths, dtype."""

    hooks: list[str]
    positions: str
    dtype: str
    layout: ImageLayout
    widths: dict[str, int]

    @property
    def features(self) -> datasets.Features:
        return features(self.widths, self.dtype)

    def bytes_per_row(self, item_id: str) -> int:
        return sum(self.widths.values()) * np.dtype(self.dtype).itemsize + METADATA_BYTES + len(item_id)

    @classmethod
    def for_model(cls, vlm, hooks: Sequence[str], positions: str, dtype: str | None, instruction: str):
        """Check the hooks by name, then on a one-item forward (a blank image): each must give one
        vector per row. ``dtype=None``: the model's (float32 for bfloat16)."""
        layout = image_layout(vlm)
        hooks = check_hooks(vlm, hooks, positions, layout)
        model_dtype = str(next(vlm.hf_model.parameters()).dtype).removeprefix("torch.")
        dtype = dtype or (model_dtype if model_dtype in STORAGE_DTYPES else "float32")
        if dtype not in STORAGE_DTYPES:
            raise HookSelectionError(
                f"dtype {dtype!r} cannot be stored (Arrow has no bfloat16); choose "
                f"{', '.join(STORAGE_DTYPES)}."
            )
        batch = vlm.prepare([Image.new("RGB", (32, 32), (128, 128, 128))], [instruction])
        rows = select_rows(batch, positions, layout)
        with torch.inference_mode():
            captured = capture(vlm, batch, hooks, rows, layout)
        widths = {}
        for hook in hooks:
            if hook not in captured or captured[hook].shape[0] != len(rows):
                raise HookSelectionError(
                    f"{hook} did not give one vector per position on a test forward. Store hooks of the "
                    "residual stream, attention or MLP (blocks.{l}.*), hook_embed or the per-image hooks."
                )
            widths[hook] = int(captured[hook].shape[1])
        return cls(hooks, positions, dtype, layout, widths)

    def estimate(
        self, vlm, items: Sequence[DatasetItem], batch_size: int, settings: Mapping[str, Any]
    ) -> tuple[list[int], list[int]]:
        """Rows and bytes per item, from the items' tokens (no image is read); each batch's first item
        also carries its shard's header (schema, settings, item ids)."""
        header = len(self.features.arrow_schema.serialize()) + len(json.dumps(settings)) + 256
        counts: dict[str, int] = {}
        rows, sizes = [], []
        for index, item in enumerate(items):
            if item.instruction not in counts:
                counts[item.instruction] = rows_per_prompt(vlm, item.instruction, self.positions, self.layout)
            rows.append(counts[item.instruction])
            sizes.append(rows[-1] * self.bytes_per_row(item.item_id) + len(item.item_id) + 8)
            sizes[-1] += header if index % batch_size == 0 else 0
        return rows, sizes


def checked_sample(dataset: DatasetSample | Sequence[DatasetItem]) -> DatasetSample:
    sample = dataset if isinstance(dataset, DatasetSample) else DatasetSample("items", list(dataset))
    if not sample.items:
        raise ActivationStoreError("The dataset has no items: nothing to store.")
    ids = [item.item_id for item in sample.items]
    if len(set(ids)) != len(ids):
        doubled = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise ActivationStoreError(f"Item id(s) {', '.join(doubled)} repeat: each item needs its own id.")
    return sample


def _free_bytes(path: Path) -> int:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[DatasetItem], max_pixels: int | None) -> None:
        self.items, self.max_pixels = items, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return index, load_image(self.items[index].image_path, max_pixels=self.max_pixels)


class _Prepare:
    """``collate_fn``: the processor runs in the DataLoader workers, as in the phase-diagram run."""

    def __init__(self, vlm, items: list[DatasetItem], padding_side: str) -> None:
        self.prepare, self.items, self.padding_side = vlm.prepare, items, padding_side

    def _batch(self, pairs):
        instructions = [self.items[i].instruction for i, _ in pairs]
        return self.prepare([image for _, image in pairs], instructions, padding_side=self.padding_side)

    def __call__(self, pairs):
        """The batch, or where the processor refuses it the first item it refuses alone, named (the
        batches are fixed: ``screen_items(vlm, sample, processor=True)`` finds them first)."""
        try:
            return [index for index, _ in pairs], self._batch(pairs)
        except PREPARE_ERRORS:
            for index, image in pairs:
                try:
                    self._batch([(index, image)])
                except PREPARE_ERRORS as exc:
                    return [index], refused(exc)
            raise


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _open(writer: ShardWriter, world_size: int) -> None:
    """Rank 0 opens (checks, repairs, publishes) first; the others after it, or raise its error."""
    writer.repair = writer.repair and writer.rank == 0  # one rank sets bad shards aside
    if not _distributed(world_size):
        writer.open()
        return
    outcome: list[Any] = [None]
    if writer.rank == 0:
        try:
            writer.open()
        except ActivationStoreError as exc:
            outcome[0] = exc
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    if writer.rank != 0:
        writer.open()


def stored_settings(vlm, sample: DatasetSample, plan: StorePlan, batch_size: int, padding_side: str) -> dict:
    """What identifies a store's rows when the caller adds nothing: model, data, hooks, layout."""
    first = next(vlm.hf_model.parameters())
    ids = "\n".join(item.item_id for item in sample.items)
    return {
        "format": FORMAT,
        "model": getattr(vlm.hf_model.config, "_name_or_path", "") or type(vlm.hf_model).__name__,
        "model_dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "dataset": sample.name,
        "n_items": len(sample.items),
        "items": hashlib.sha256(ids.encode()).hexdigest()[:16],
        "hooks": plan.hooks,
        "positions": plan.positions,
        "dtype": plan.dtype,
        "batch_size": batch_size,
        "padding_side": padding_side,
    }


def write_store(
    vlm,
    sample: DatasetSample,
    path: Path,
    plan: StorePlan,
    settings: Mapping[str, Any],
    *,
    batch_size: int,
    padding_side: str,
    workers: int,
    rank: int,
    world_size: int,
    repair: bool,
    progress: bool,
    max_batches: int | None,
) -> None:
    items = sample.items
    ids = [item.item_id for item in items]
    n_batches = -(-len(items) // batch_size)

    def expected(batch: int) -> list[str] | None:
        return ids[batch * batch_size : (batch + 1) * batch_size] if 0 <= batch < n_batches else None

    description = (
        f"hooked-vllm activations of {settings['model']} on {sample.name}: {', '.join(plan.hooks)} at "
        f"{plan.positions} positions, {plan.dtype}"
    )
    writer = ShardWriter(
        path, rank, settings, plan.features, expected, repair=repair, description=description
    )
    _open(writer, world_size)
    try:
        done = set(writer.verified)
        todo = [b for b in range(n_batches) if b % world_size == rank and b not in done][:max_batches]
        rows, sizes = plan.estimate(vlm, items, batch_size, settings)
        total, left = sum(sizes), sum(s for i, s in enumerate(sizes) if i // batch_size not in done)
        free = _free_bytes(path)
        if rank == 0:
            per_row = total / max(sum(rows), 1)
            print(
                f"activations: {len(items)} items, {sum(rows):,} rows x ~{per_row:,.0f} B = {human(total)} "
                f"estimated ({human(left)} still to write; {len(done)} of {n_batches} batches done); "
                f"{human(free)} free at {path}",
                file=sys.stderr,
            )
        if left > free:
            raise DiskBudgetError(
                f"The store needs about {human(left)} more but {path} has {human(free)} free. Free space, "
                "store fewer hooks or positions or --store-dtype float16, or use another --out."
            )
        loader = torch.utils.data.DataLoader(
            _Items(items, sample.max_pixels),
            batch_sampler=[list(range(b * batch_size, min(len(items), (b + 1) * batch_size))) for b in todo],
            num_workers=workers,
            collate_fn=_Prepare(vlm, items, padding_side),
            prefetch_factor=2 if workers > 0 else None,
        )
        bar = tqdm(
            total=len(todo), disable=not progress, desc=f"rank {rank}" if world_size > 1 else "batches"
        )
        with torch.inference_mode():
            for batch_index, (indices, batch) in zip(todo, loader):
                if isinstance(batch, str):
                    item = items[indices[0]]
                    raise BadItemError(
                        f"Item {item.item_id} ({item.image_path}): {batch}. Remove it from the dataset, or "
                        "screen the items first (screen_items(vlm, sample, processor=True), as "
                        "ActivationStore.write does)."
                    )
                writer.write(batch_index, *_batch_columns(vlm, batch, indices, ids, plan))
                bar.update(1)
        bar.close()
        writer.publish()
        if _distributed(world_size):
            torch.distributed.barrier()
        if rank == 0:  # the merge: every rank's shards verified, listed in batch order
            writer.repair = False
            writer.verify()
            publish(writer.folder, names=[s.path.name for s in writer.verified.values()])
    finally:
        writer.close()


def _batch_columns(vlm, batch, indices: list[int], ids: list[str], plan: StorePlan):
    """One batch's columns (metadata and vectors, as numpy), its item ids and rows per item."""
    rows = select_rows(batch, plan.positions, plan.layout)
    vectors = capture(vlm, batch, plan.hooks, rows, plan.layout)
    columns: dict[str, Any] = row_metadata(vlm, batch, rows, plan.layout)
    item_rows = torch.bincount(rows.item, minlength=len(indices)).tolist()
    columns["item_id"] = [ids[i] for i, n in zip(indices, item_rows) for _ in range(n)]
    columns["item_index"] = np.repeat(np.asarray(indices, dtype=np.int64), item_rows)
    dtype = TORCH_DTYPES[plan.dtype]
    for hook in plan.hooks:
        columns[hook] = _in_storage_dtype(vectors[hook], dtype, hook, columns["item_id"]).cpu().numpy()
    return columns, [ids[i] for i in indices], item_rows


def _in_storage_dtype(values: torch.Tensor, dtype: torch.dtype, hook: str, row_items: list[str]):
    """``values`` in the storage dtype, or ActivationStoreError where a finite value overflows it (stored,
    it would read back as inf). Values already inf or NaN in the model are stored as they are."""
    stored = values.to(dtype)
    if stored.dtype == values.dtype or not bool(torch.isinf(stored).any()):
        return stored
    overflow = torch.isinf(stored) & torch.isfinite(values)
    if not bool(overflow.any()):
        return stored
    largest = float(values[torch.isfinite(values)].abs().max())
    item = row_items[int(overflow.any(dim=-1).nonzero()[0, 0])]
    raise ActivationStoreError(
        f"{hook} reaches |x| = {largest:.4g} (item {item}), beyond {str(dtype).removeprefix('torch.')}'s "
        f"largest value {torch.finfo(dtype).max:.6g}: stored, it would read back as inf. Store it as float32 "
        "(--store-dtype float32, dtype='float32') into another --out."
    )
