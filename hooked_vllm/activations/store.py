"""Activations at dataset scale, as a Hugging Face ``datasets`` folder: for probes, SAEs and layer
comparisons over thousands of images.

One row per (item, position) with the vector of every stored hook (language model, vision tower,
Q-Former, visual prefix: see :mod:`hooked_vllm.activations.layout` for what maps to which row) and
the row's metadata: ``item_id``, ``item_index`` (in the dataset), ``position`` (the token's position
id: padding-independent), ``modality`` (``ClassLabel``: image, text, special), ``image_index``,
``patch`` (index among its image's tokens), ``grid_row``/``grid_col``/``tile`` (-1 where none),
``token_id`` and ``token`` (as :meth:`HookedVLM.to_str_tokens` reads it). Vectors are stored in
``dtype`` (default: the model's; bfloat16 models store float32, exactly, as Arrow has no bfloat16).

Example:
    >>> store = ActivationStore.write(vlm, sample, "store/", hooks=["blocks.12.hook_resid_post",
    ...     "vision.blocks.23.hook_resid_post"], positions="image")  # doctest: +SKIP
    >>> ds = datasets.load_from_disk("store/").with_format("torch")  # doctest: +SKIP
    >>> store = ActivationStore.open("store/")  # doctest: +SKIP
    >>> store[[0, 5, 9]]["blocks.12.hook_resid_post"].shape  # doctest: +SKIP
    >>> store.item("coco-42")["grid_row"]  # doctest: +SKIP

The folder follows the phase-diagram store's rules (:mod:`hooked_vllm.activations.shards`): settings
stored, one writer per rank, every shard verified on resume, a killed run resumed with nothing lost or
doubled; under torchrun each rank computes batches ``rank::world`` and the result equals a single run
row for row. Before writing, the size is estimated and printed, and a run the disk cannot hold is
refused. The forward stops after the deepest stored hook.

Gotchas:

- ``with_format("torch")`` hands float16 columns over as float32 (``datasets``' default); the values
  are the stored ones. ``ActivationStore.rows`` keeps the stored dtype.
- ``dtype="float16"`` refuses activations above 65504 (they would read back as inf), naming the hook.
  Values the model itself gives as NaN or inf are stored as they are and counted per hook and item
  (:attr:`ActivationStore.nonfinite`; the CLI names them).
- With ``positions="all"``, per-image hooks (vision tower, Q-Former, visual prefix) are NaN at the rows
  that are not image positions; with ``text`` or ``last`` they are refused.
- LLaVA's CLS token reaches no position (``vision_feature_select_strategy="default"``) and is not
  stored; InstructBLIP's vision patches have no position and are refused (store the Q-Former).
- ``state.json`` lists the shards verified when a writer opened the folder, then every 30 s and at
  the end: while a run goes on, or after it was killed, ``load_from_disk`` sees the shards listed by
  then (up to 30 s behind the run); the next run verifies and lists the rest.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from hooked_vllm.activations.layout import HookSelectionError
from hooked_vllm.activations.run import (
    DiskBudgetError,
    StorePlan,
    checked_sample,
    stored_settings,
    write_store,
)
from hooked_vllm.activations.shards import ActivationStoreError, read_shard, shard_checksum_problem
from hooked_vllm.runs.checksums import NoChecksum
from hooked_vllm.runs.datasets import DatasetItem, DatasetSample, screen_items
from hooked_vllm.runs.store import ACTIVATIONS_KIND, KINDS, folder_kind

__all__ = [
    "ActivationStore",
    "ActivationStoreError",
    "DiskBudgetError",
    "HookSelectionError",
    "StorePlan",
    "UnverifiedStoreWarning",
]


# ---------------------------------------------------------------- the store
def _damaged(path: Path, why: Any) -> ActivationStoreError:
    """A damaged store's error naming the file, and how a resume mends it."""
    if isinstance(why, FileNotFoundError):
        why = "it is missing"
    elif isinstance(why, Exception):
        why = f"{type(why).__name__}: {' '.join(str(why).split())[:160]}"
    mend = (
        "Restore it, or (without it) run the same write again with --repair (repair=True): it rewrites "
        "run.json when every shard agrees"
        if path.name == "run.json"
        else "Run the same write (cache-activations) on this folder again: it verifies the shards and "
        "rewrites state.json and dataset_info.json (--repair sets bad shards aside and recomputes them)"
    )
    return ActivationStoreError(f"{path} cannot be read: {why}. {mend}.")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if not isinstance(value, dict):
        raise _damaged(path, f"it holds a {type(value).__name__}, not a JSON object")
    return value


class UnverifiedStoreWarning(UserWarning):
    """A store was read without checking its shards' bytes against their checksums."""


class ActivationStore:
    """A store folder opened for reading (memory-mapped); :meth:`write` makes one, :meth:`open` opens
    one (verifying every shard's checksum unless ``verify=False``)."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        kind = folder_kind(self.path) if self.path.is_dir() else None
        if kind != ACTIVATIONS_KIND:
            raise ActivationStoreError(
                f"{self.path} is not an activation store{f' but {KINDS[kind]}' if kind else ''}. Write one "
                "with ActivationStore.write or hooked-vllm cache-activations."
            )
        self.settings: dict[str, Any] = _read_json(self.path / "run.json")
        state, _ = _read_json(self.path / "state.json"), _read_json(self.path / "dataset_info.json")
        files = state.get("_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise _damaged(self.path / "state.json", "it lists no _data_files")
        if not files:
            raise ActivationStoreError(f"{self.path} holds no shards yet. Run the write (again) to fill it.")
        for entry in files:
            if not (self.path / entry["filename"]).is_file():
                raise _damaged(self.path / entry["filename"], "it is missing (state.json lists it)")
        #: whether every listed shard's bytes were checked against its checksum when the store opened
        self.verified = verify and self._verify_checksums([self.path / entry["filename"] for entry in files])
        try:
            self.dataset: datasets.Dataset = datasets.load_from_disk(str(self.path), keep_in_memory=False)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            for entry in files:  # which shard: read each back
                try:
                    read_shard(self.path / entry["filename"])
                except ValueError as why:
                    raise _damaged(self.path / entry["filename"], str(why)) from exc
            raise _damaged(self.path, exc) from exc
        self._table: pa.Table = self.dataset.data.table
        self._offsets = np.cumsum([0] + [len(chunk) for chunk in self._table.column(0).chunks])
        self._views: dict[str, list] = {}
        self._items: dict[str, tuple[int, int]] | None = None
        self._shard_facts: list | None = None

    def _verify_checksums(self, shards: list[Path]) -> bool:
        """Check each shard's bytes against its checksum; raise naming the first that changed. False
        (with a warning) when some shards have no checksum."""
        unchecksummed = []
        for shard in shards:
            try:
                changed = shard_checksum_problem(shard)
            except NoChecksum:
                unchecksummed.append(shard.name)
                continue
            if changed is not None:
                raise _damaged(shard, changed)
        if unchecksummed:
            warnings.warn(
                f"{len(unchecksummed)} shard(s) of {self.path} have no checksums (written by an earlier "
                f"version, e.g. {unchecksummed[0]}): their bytes were not checked.",
                UnverifiedStoreWarning,
                stacklevel=3,
            )
        return not unchecksummed

    # ---------------------------------------------------------------- writing
    @staticmethod
    def write(
        vlm,
        dataset: DatasetSample | Sequence[DatasetItem],
        path: str | Path,
        *,
        hooks: Sequence[str],
        positions: str = "image",
        dtype: str | None = None,
        batch_size: int = 8,
        padding_side: str = "left",
        workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        repair: bool = False,
        progress: bool = True,
        max_batches: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ActivationStore | None:
        """Store ``hooks`` at ``positions`` for every item of ``dataset`` not yet in ``path``.

        Returns the store opened for reading on rank 0 (``None`` on other ranks; ranks and world size
        come from RANK/WORLD_SIZE unless given). ``max_batches`` stops early (a later call resumes);
        ``settings`` adds what else identifies the run (the CLI's flags); ``repair`` sets bad shards
        aside and recomputes them. Items the model cannot take are refused in one line naming them,
        or skipped and listed in ``sample.skipped`` when the sample was loaded with ``skip_bad``.
        A finite activation too large for ``dtype`` (float16: above 65504)
        is refused before its shard is written, naming the hook and its largest absolute value (store
        float32 instead): no overflow is stored as inf. Values the model itself gives as inf or NaN
        are stored as they are.
        """
        from hooked_vllm.runs.phase_diagram import shard_of_environment

        sample = checked_sample(dataset)
        # the batches are fixed before the run: items the model cannot take (placeholder text, text
        # that does not encode, images the processor refuses) are refused, or skipped under skip_bad
        screen_items(vlm, sample, processor=True)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ActivationStoreError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if padding_side not in ("left", "right"):
            raise ActivationStoreError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
        plan = StorePlan.for_model(vlm, hooks, positions, dtype, sample.items[0].instruction)
        env_rank, env_world = shard_of_environment()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
        settings = {**stored_settings(vlm, sample, plan, batch_size, padding_side), **(settings or {})}
        write_store(
            vlm,
            sample,
            Path(path),
            plan,
            settings,
            batch_size=batch_size,
            padding_side=padding_side,
            workers=workers,
            rank=rank,
            world_size=world_size,
            repair=repair,
            progress=progress,
            max_batches=max_batches,
        )
        if rank != 0:
            return None
        store = ActivationStore(path, verify=False)  # write_store verified every shard as it finished
        store.verified = True
        return store

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> ActivationStore:
        """Open a store for reading: the rows of the shards ``state.json`` lists, memory-mapped. A damaged
        store (``run.json``, ``state.json``, ``dataset_info.json`` or a listed shard missing, unreadable,
        or with bytes that no longer match its checksum) is an :class:`ActivationStoreError` naming the
        file and how a resume mends it.

        ``verify=False`` skips the checksums (about 1 s a GB: BENCHMARKS.md) and warns
        (:class:`UnverifiedStoreWarning`) that the values read are unchecked.
        """
        store = cls(path, verify=verify)
        if not verify:
            warnings.warn(
                f"{store.path} was opened with verify=False: its shards' bytes were not checked against "
                "their checksums, so a damaged shard would be read as good.",
                UnverifiedStoreWarning,
                stacklevel=2,
            )
        return store

    # ---------------------------------------------------------------- reading
    @property
    def hooks(self) -> list[str]:
        return list(self.settings["hooks"])

    @property
    def positions(self) -> str:
        return self.settings["positions"]

    def __len__(self) -> int:
        return self._table.num_rows

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}: {len(self):,} rows, hooks {self.hooks}, {self.positions})"
        )

    def _columns(self, name: str) -> list:
        """The column's chunks: numpy views of the mapped file for numbers, Arrow arrays for strings."""
        if name not in self._views:
            chunks = []
            for chunk in self._table.column(name).chunks:
                if pa.types.is_fixed_size_list(chunk.type):
                    flat = chunk.flatten().to_numpy(zero_copy_only=True)
                    chunks.append(flat.reshape(len(chunk), chunk.type.list_size))
                elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
                    chunks.append(chunk)
                else:
                    chunks.append(chunk.to_numpy(zero_copy_only=True))
            self._views[name] = chunks
        return self._views[name]

    def __getitem__(self, index: str | int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> Any:
        """Rows by index: vectors as tensors in the stored dtype, numbers as int64 tensors, strings as
        lists (one row: scalars and 1-D tensors). A column name gives the whole column."""
        if isinstance(index, str):
            return self.rows(slice(None), columns=[index])[index]
        return self.rows(index)

    def rows(self, index, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """Rows by index (an int, a slice, indices or a boolean mask over the rows), as ``store[index]``;
        ``columns`` picks the columns to read (default: all)."""
        single = isinstance(index, (int, np.integer))
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"A boolean mask needs one entry per row ({len(self)}); got {index.shape}.")
            index = np.flatnonzero(index)
        idx = np.atleast_1d(index.astype(np.int64))
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"Row index out of range for a store of {len(self)} rows.")
        idx = np.where(idx < 0, idx + len(self), idx)
        chunk = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[chunk]
        order = np.argsort(chunk, kind="stable")
        starts = np.flatnonzero(np.diff(chunk[order], prepend=-1))
        groups = np.split(order, starts[1:])
        out: dict[str, Any] = {}
        for name in columns or self._table.column_names:
            views = self._columns(name)
            if isinstance(views[0], pa.Array):
                values: list = [None] * len(idx)
                for group in groups:
                    taken = views[chunk[group[0]]].take(pa.array(local[group])).to_pylist()
                    for position, value in zip(group.tolist(), taken):
                        values[position] = value
                out[name] = values[0] if single else values
                continue
            first = views[0]
            result = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
            for group in groups:
                result[group] = views[chunk[group[0]]][local[group]]
            tensor = torch.from_numpy(result if result.ndim > 1 else result.astype(np.int64))
            out[name] = tensor[0] if single else tensor
        return out

    @property
    def item_ids(self) -> list[str]:
        return list(self._item_index())

    def _shards(self) -> list:
        """The listed shards' facts, from their headers."""
        if self._shard_facts is None:
            state = json.loads((self.path / "state.json").read_text())
            self._shard_facts = [
                read_shard(self.path / entry["filename"], check=False)[0] for entry in state["_data_files"]
            ]
        return self._shard_facts

    def _item_index(self) -> dict[str, tuple[int, int]]:
        if self._items is None:
            self._items, start = {}, 0
            for shard in self._shards():
                for item, n in zip(shard.items, shard.item_rows):
                    self._items[item] = (start, start + n)
                    start += n
        return self._items

    @property
    def nonfinite(self) -> dict[str, dict[str, int]]:
        """Per hook, the items whose stored rows hold NaN or inf (as the model gave them), with how
        many rows each; empty when every value is finite. A per-image hook's rows outside the image
        positions (NaN by design under ``positions="all"``) are not counted. Counted as the shards
        were written (shards of earlier versions did not count)."""
        found: dict[str, dict[str, int]] = {}
        for shard in self._shards():
            for hook, items in shard.nonfinite.items():
                found.setdefault(hook, {}).update(items)
        return found

    def rows_of(self, item_id: str) -> range:
        """The row indices of an item (contiguous)."""
        if item_id not in self._item_index():
            raise KeyError(f"No item {item_id!r} in {self.path}.")
        return range(*self._item_index()[item_id])

    def item(self, item_id: str, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """Every row of one item."""
        return self.rows(self.rows_of(item_id), columns)
