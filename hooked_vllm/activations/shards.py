"""The activation store's folder, kept by the rules of the phase-diagram store
(:mod:`hooked_vllm.runs.store`), in the format ``datasets.save_to_disk`` writes.

- **Shards.** One Arrow IPC stream file per batch, ``data-b{batch:07d}.arrow`` (the batch is
  ``items[batch * batch_size:(batch + 1) * batch_size]``, whichever rank computed it), written under
  ``tmp-r{rank}-...`` and renamed when complete. Every shard carries the run's settings and its own
  facts (batch, items, rows per item, rank) in its schema metadata, and the ``datasets`` features.
  Its SHA-256 is written beside it (``data-b{batch:07d}.sha256``, :mod:`hooked_vllm.runs.checksums`)
  before the rename.
- **What ``datasets`` sees.** ``state.json`` lists exactly the verified shards, in batch order (so
  the rows are in item order, then position order, however the run was split or interrupted);
  ``dataset_info.json`` holds the features. ``datasets.load_from_disk`` reads the folder
  memory-mapped. ``state.json`` is rewritten when a rank opens, every ``PUBLISH_EVERY_S`` seconds
  and when it finishes, under a lock shared by the ranks (``.state-lock``).
- **Settings** live in ``run.json`` (with ``kind``: an activation store; a folder holding the
  phase-diagram's results is refused) and in every shard; a resume with other settings is refused, as is
  a folder whose ``run.json`` is gone (``repair`` rewrites it when every shard agrees).
- **One writer per rank**: ``.lock-r{rank}``, the run store's :class:`~hooked_vllm.runs.store.FolderLock`.
- **Verified on open**: every shard's bytes are checked against its checksum, then it is read back
  (memory-mapped: headers, row counts, item ids). Shards whose bytes changed, unreadable or truncated
  shards, shards whose items are not their batch's, or that repeat another's items are reported;
  ``repair`` moves them (with their checksums) to ``quarantine/`` and their batches are computed
  again. Shards of earlier versions, without checksums, are read back and reported as not checksummed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from hooked_vllm.activations.layout import MODALITIES, is_per_image
from hooked_vllm.runs.checksums import (
    NoChecksum,
    checksum_problem,
    sidecar_of,
    warn_unchecksummed,
    write_checksums,
)
from hooked_vllm.runs.files import write_text_atomically
from hooked_vllm.runs.store import (
    ACTIVATIONS_KIND,
    FolderLock,
    RunStoreError,
    SettingsMismatchError,
    check_kind,
    prepare_folder,
    set_aside,
    settings_differences,
)

SHARD_NAME = re.compile(r"^data-b(\d{7})\.arrow$")
SETTINGS_KEY = b"hooked_vllm.settings"
SHARD_KEY = b"hooked_vllm.shard"
PUBLISH_EVERY_S = 30.0


class ActivationStoreError(RunStoreError):
    """An activation store folder cannot be written or read as it is."""


def shard_name(batch: int) -> str:
    return f"data-b{batch:07d}.arrow"


def features(widths: Mapping[str, int], dtype: str) -> datasets.Features:
    """The ``datasets`` features: metadata columns, then one fixed-length vector column per hook."""
    vector = getattr(datasets, "List", None) or datasets.Sequence
    columns: dict[str, Any] = {
        "item_id": datasets.Value("string"),
        "item_index": datasets.Value("int64"),
        "position": datasets.Value("int32"),
        "modality": datasets.ClassLabel(names=list(MODALITIES)),
        "image_index": datasets.Value("int32"),
        "patch": datasets.Value("int32"),
        "grid_row": datasets.Value("int32"),
        "grid_col": datasets.Value("int32"),
        "tile": datasets.Value("int32"),
        "token_id": datasets.Value("int32"),
        "token": datasets.Value("string"),
    }
    for hook, width in widths.items():
        columns[hook] = vector(datasets.Value(dtype), length=int(width))
    return datasets.Features(columns)


@dataclass
class Shard:
    path: Path
    batch: int
    items: list[str]
    item_rows: list[int]
    rank: int
    #: per hook, the items with rows holding NaN or inf, and how many such rows each ({} for shards
    #: of earlier versions, which did not count)
    nonfinite: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(self.item_rows)


def shard_checksum_problem(path: Path) -> str | None:
    """Why the shard's bytes do not match its checksum (None when they do); :class:`NoChecksum` when
    it has none (a shard of an earlier version)."""
    return checksum_problem(sidecar_of(path), [path])


def read_shard(path: Path, schema: pa.Schema | None = None, *, check: bool = True) -> tuple[Shard, dict]:
    """The shard's facts and settings, after reading it back (memory-mapped; ``check=False``: its
    header only); ValueError says why it cannot be used."""
    match = SHARD_NAME.match(path.name)
    n_rows, ids = 0, []
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            metadata = reader.schema.metadata or {}
            if SHARD_KEY not in metadata:
                raise ValueError("no hooked_vllm shard metadata")
            facts = json.loads(metadata[SHARD_KEY])
            settings = json.loads(metadata.get(SETTINGS_KEY, b"{}"))
            shard = Shard(
                path,
                int(match.group(1)),
                facts["items"],
                facts["item_rows"],
                int(facts["rank"]),
                facts.get("nonfinite", {}),
            )
            if not check:
                return shard, settings
            if schema is not None and not reader.schema.remove_metadata().equals(schema.remove_metadata()):
                raise ValueError("its columns are not this store's")
            for record_batch in reader:
                record_batch.validate()
                n_rows += record_batch.num_rows
                ids.extend(record_batch.column("item_id").to_pylist())
    except (OSError, pa.ArrowException, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable Arrow stream ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if n_rows != shard.n_rows:
        raise ValueError(f"holds {n_rows} rows, its metadata says {shard.n_rows} (truncated?)")
    if ids != [i for i, n in zip(shard.items, shard.item_rows) for _ in range(n)]:
        raise ValueError("its item_id column disagrees with its metadata")
    return shard, settings


def nonfinite_rows(schema: pa.Schema, columns: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per stored hook, the items whose rows hold NaN or inf and how many rows each: values the model
    gave (a NaN weight, an overflow of its dtype). A per-image hook's rows at positions that are not
    image positions are NaN by design (``positions="all"``) and not counted."""
    image = np.asarray(columns["modality"]) == MODALITIES.index("image")
    item_ids = np.asarray(columns["item_id"], dtype=object)
    found: dict[str, dict[str, int]] = {}
    for column in schema:
        if not pa.types.is_fixed_size_list(column.type):
            continue
        values = np.asarray(columns[column.name])
        bad = ~np.isfinite(values.sum(-1, dtype=np.float64))  # any NaN or inf in the row's vector
        if is_per_image(column.name):
            bad &= image
        if bad.any():
            ids, counts = np.unique(item_ids[bad], return_counts=True)
            found[column.name] = dict(zip(ids.tolist(), counts.tolist()))
    return found


def write_shard(
    folder: Path,
    rank: int,
    batch: int,
    schema: pa.Schema,
    columns: Mapping[str, Any],
    items: list[str],
    item_rows: list[int],
    settings: Mapping[str, Any],
) -> Path:
    """Write one batch's rows as a shard, atomically (temp name, then rename)."""
    facts = {"batch": batch, "items": items, "item_rows": item_rows, "rank": rank}
    facts["nonfinite"] = nonfinite_rows(schema, columns)
    meta = {**(schema.metadata or {}), SETTINGS_KEY: json.dumps(settings), SHARD_KEY: json.dumps(facts)}
    schema = schema.with_metadata(meta)
    arrays = []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
        else:
            arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    tmp = folder / f"tmp-r{rank}-{shard_name(batch)}"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    write_checksums(sidecar_of(folder / shard_name(batch)), [tmp], [shard_name(batch)])
    os.replace(tmp, folder / shard_name(batch))  # the shard exists only once complete
    return folder / shard_name(batch)


# ---------------------------------------------------------------- state.json / dataset_info.json
def publish(folder: Path, *, names: list[str] | None = None, add: list[str] = ()) -> None:
    """Rewrite ``state.json``: ``names`` (the verified shards), or the listed ones plus ``add``."""
    with open(folder / ".state-lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state_path = folder / "state.json"
        if names is None:
            listed = []
            if state_path.is_file():
                listed = [f["filename"] for f in json.loads(state_path.read_text())["_data_files"]]
            names = [*listed, *add]
        names = sorted({n for n in names if (folder / n).is_file()})
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": hashlib.sha256(json.dumps([str(folder), names]).encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        _write_json(state_path, state)


def write_info(folder: Path, feats: datasets.Features, description: str) -> None:
    with tempfile.TemporaryDirectory(dir=folder, prefix="tmp-info-") as tmp:
        datasets.DatasetInfo(description=description, features=feats).write_to_directory(tmp)
        os.replace(Path(tmp) / "dataset_info.json", folder / "dataset_info.json")


def _write_json(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value, indent=1))


# ---------------------------------------------------------------- one rank's writer
class ShardWriter:
    """One rank's hold on a store folder: lock, settings, verified shards, new shards."""

    def __init__(
        self,
        folder: str | Path,
        rank: int,
        settings: Mapping[str, Any],
        feats: datasets.Features,
        expected_items: Callable[[int], list[str] | None],
        *,
        repair: bool = False,
        description: str = "",
    ) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.settings = dict(settings)
        self.features = feats
        self.schema = feats.arrow_schema
        self.expected_items = expected_items  # batch -> its item ids (None: no such batch)
        self.repair = repair
        self.description = description
        self.verified: dict[int, Shard] = {}
        #: verified shards with no checksum (written by an earlier version): read back, bytes unchecked
        self.unchecksummed: list[Path] = []
        self._new: list[str] = []
        self._published = time.monotonic()
        self._lock = FolderLock(self.folder, rank)

    def open(self) -> ShardWriter:
        prepare_folder(self.folder, ActivationStoreError)
        check_kind(self.folder, ACTIVATIONS_KIND)
        self._lock.acquire()
        try:
            for leftover in self.folder.glob(f"tmp-r{self.rank}-*"):
                leftover.unlink()  # a shard interrupted mid-write: ours, since we hold our lock
            if self.rank == 0:
                self._check_settings()
            self.verify()
            if self.rank == 0:
                write_info(self.folder, self.features, self.description)
                publish(self.folder, names=[s.path.name for s in self.verified.values()])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._lock.release()

    def shards(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if SHARD_NAME.match(p.name))

    def _check_settings(self) -> None:
        path = self.folder / "run.json"
        shards = self.shards()
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ActivationStoreError(
                    f"{path} is not valid JSON ({exc}). Restore it, or use another --out."
                ) from exc
            changed = settings_differences(previous, self.settings)
            if changed and shards:
                raise SettingsMismatchError(
                    f"{self.folder} holds activations stored with other settings ({', '.join(changed)} "
                    "differ). Use another --out, or the same settings to resume it."
                )
        elif shards:
            other = []
            for shard in shards:
                try:
                    found = read_shard(shard)[1]
                except ValueError:
                    found = {}
                if not found or settings_differences(found, self.settings):
                    other.append(shard.name)
            if not self.repair or other:
                raise ActivationStoreError(
                    f"{self.folder} holds {len(shards)} shard(s) but no run.json, so their settings cannot "
                    f"be checked{f'; {len(other)} carry other or no settings' if other else ''}. Use another "
                    f"--out{'' if other else ', or --repair to rewrite run.json from the shards'}."
                )
        _write_json(path, {"kind": ACTIVATIONS_KIND, **self.settings})

    def verify(self) -> list[tuple[Path, str]]:
        """Read every shard back; report (or, with ``repair``, quarantine) the bad ones."""
        problems: list[tuple[Path, str]] = []
        seen: dict[str, str] = {}
        self.verified, unchecksummed = {}, []
        for path in self.shards():
            try:
                changed = shard_checksum_problem(path)
            except NoChecksum:
                changed = None
                unchecksummed.append(path)
            if changed is not None:
                problems.append((path, changed))
                continue
            try:
                shard, settings = read_shard(path, self.schema)
            except ValueError as exc:
                problems.append((path, str(exc)))
                continue
            changed = settings_differences(settings, self.settings) if settings else ["all"]
            if changed:
                raise SettingsMismatchError(
                    f"{path} was stored with other settings ({', '.join(changed)} differ). Use another "
                    "--out, or the same settings to resume it."
                )
            expected = self.expected_items(shard.batch)
            doubled = [i for i in shard.items if i in seen]
            if expected is None:
                problems.append((path, f"batch {shard.batch} is not in this dataset"))
            elif shard.items != expected:
                problems.append(
                    (path, f"holds items {', '.join(shard.items[:2])}..., not batch {shard.batch}'s")
                )
            elif doubled:
                problems.append(
                    (path, f"repeats item(s) {', '.join(doubled[:3])} (also in {seen[doubled[0]]})")
                )
            else:
                seen.update({item: path.name for item in shard.items})
                self.verified[shard.batch] = shard
        if problems and not self.repair:
            listed = "; ".join(f"{p.name}: {why}" for p, why in problems[:5])
            raise ActivationStoreError(
                f"{self.folder} has {len(problems)} bad shard(s): {listed}"
                f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Run again with --repair "
                "(repair=True) to set them aside in quarantine/ and recompute their batches."
            )
        for path, why in problems:
            set_aside(path, self.folder / "quarantine")
            if sidecar_of(path).exists():
                set_aside(sidecar_of(path), self.folder / "quarantine")
            print(f"repair: set aside {path.name} ({why})", file=sys.stderr)
        kept = {shard.path for shard in self.verified.values()}
        unchecksummed = [p for p in unchecksummed if p in kept]
        warn_unchecksummed(unchecksummed, self.unchecksummed, "shard", self.folder)
        self.unchecksummed = unchecksummed
        return problems

    def write(self, batch: int, columns: Mapping[str, Any], items: list[str], item_rows: list[int]) -> Path:
        if not self._lock.held:
            raise ActivationStoreError("Open the store before writing to it.")
        path = write_shard(
            self.folder, self.rank, batch, self.schema, columns, items, item_rows, self.settings
        )
        self._new.append(path.name)
        if time.monotonic() - self._published > PUBLISH_EVERY_S:
            self.publish()
        return path

    def publish(self) -> None:
        """List this rank's new shards in ``state.json`` (other ranks' entries kept)."""
        publish(self.folder, add=self._new)
        self._new, self._published = [], time.monotonic()
