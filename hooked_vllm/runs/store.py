"""The results store of a dataset run, kept as a database keeps its tables.

A run's folder holds ``run.json`` (its settings, types kept) and ``items/``: one Parquet part per
finished batch (``part-r{rank}-{n:06d}.parquet``, one row per item) beside the batch's unit-vector
sums (``.npz``, for the cross-input baseline). The rules:

- **Atomic parts.** A part is written under a ``tmp-`` name and renamed when complete (the ``.npz``
  first, the ``.parquet`` last: the Parquet file's appearance commits the part). Temp files are never
  read as parts; a rank removes only its own leftovers.
- **Settings are part of the store.** Every part carries the run's settings in its Parquet metadata
  and ``run.json`` holds them too. Resuming with other settings is refused, as is resuming a store
  whose ``run.json`` is gone while parts remain (``repair=True`` rewrites it when every part agrees
  with the settings given). Settings compare as values: paths resolved, devices resolved.
- **One kind of store a folder.** ``run.json`` names what the folder holds (``kind``: results here,
  the activation store's in :mod:`hooked_vllm.activations.shards`); a folder holding the other kind
  is refused before anything is written into it (:func:`check_kind`; folders of earlier versions,
  without ``kind``, are recognised by their files).
- **One writer.** Each rank of a run holds an exclusive lock on ``.lock-r{rank}`` in the run folder
  (``fcntl.flock``: released by the OS when the process dies, even by ``kill -9``). A second run on the
  same folder is refused and told who holds it.
- **Checksummed.** Each part's ``.sha256`` sidecar (:mod:`hooked_vllm.runs.checksums`) holds the
  SHA-256 of its Parquet and ``.npz`` files, written before the part is committed.
- **Verified on open, on resume and on read.** Every part's bytes are checked against its checksums,
  then read back (Parquet and ``.npz``) and its item ids checked against the others before anything is
  computed or aggregated. A part whose bytes changed, a corrupt part or one repeating another's items
  is reported; with ``repair=True`` it is moved to ``items/quarantine/`` (never deleted) and its items
  are computed again. Nothing corrupt or doubled is ever aggregated. Parts of earlier versions, which
  have no checksums, are read back as before and reported as not checksummed.

Example:
    >>> with ResultStore("out", settings={"model": "demo"}) as store:  # doctest: +SKIP
    ...     done = store.done_ids()
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.runs.checksums import (
    NoChecksum,
    checksum_problem,
    sidecar_of,
    warn_unchecksummed,
    write_checksums,
)
from hooked_vllm.runs.files import write_text_atomically

PART_NAME = re.compile(r"^part-r(\d+)-(\d{6})\.parquet$")
SETTINGS_KEY = b"hooked_vllm.settings"
VECTOR_KEYS = ("sum_image", "sum_text")
#: keys an older run.json held that are not settings of the results (where the store was, ...)
NOT_SETTINGS = frozenset({"out", "workers", "no_progress", "command", "debug", "repair", "kind"})
#: the kinds of store a run folder holds, as ``run.json``'s ``kind`` says, and how to tell them apart
RESULTS_KIND, ACTIVATIONS_KIND, STUDY_KIND = "phase-diagram results", "activation store", "study results"
KINDS = {
    RESULTS_KIND: "a phase-diagram results store (hooked-vllm phase-diagram)",
    ACTIVATIONS_KIND: "an activation store (hooked-vllm cache-activations)",
    STUDY_KIND: "a study's results store (hooked-vllm study)",
}


class RunStoreError(HookedVLMError):
    """A run folder cannot be resumed as it is: corrupt or doubled parts, missing settings."""


class RunLockedError(RunStoreError):
    """Another process is writing the same run folder."""


class SettingsMismatchError(RunStoreError):
    """A run folder holds results made with other settings."""


class StoreKindError(RunStoreError):
    """A run folder holds another kind of store (phase-diagram results, activations)."""


@dataclass
class PartProblem:
    part: Path
    reason: str


def settings_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of the settings whose values differ (keys in :data:`NOT_SETTINGS` ignored).

    A ``run.json`` written by an older version holds every value as a string (``"16"``, ``"None"``):
    such a value equals the current value whose ``str`` it is.
    """

    def same(old: Any, new: Any) -> bool:
        return old == new or (isinstance(old, str) and not isinstance(new, str) and old == str(new))

    keys = (set(previous) | set(current)) - NOT_SETTINGS
    return sorted(key for key in keys if not same(previous.get(key), current.get(key)))


def prepare_folder(folder: Path, error: type[RunStoreError] = RunStoreError) -> None:
    """Create ``folder`` (an ``--out``) or raise ``error`` saying why it cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise error(f"--out {folder} is a file, not a folder. Name a folder to write into.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"Cannot create {folder}: {exc.strerror}. Choose an --out you can write to.") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{folder} is not writable. Choose an --out you can write to.")


def folder_kind(folder: Path) -> str | None:
    """Which of :data:`KINDS` ``folder`` holds: its ``run.json``'s ``kind``; for a folder of an earlier
    version (no ``kind``), what its files are: an activation store's ``format`` in ``run.json``, its
    ``state.json`` or shards; a results store's ``items/``. None for a folder holding neither."""
    try:
        marked = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        marked = None
    if isinstance(marked, dict) and marked.get("kind") in KINDS:
        return marked["kind"]
    if isinstance(marked, dict) and str(marked.get("format", "")).startswith("hooked-vllm activations"):
        return ACTIVATIONS_KIND
    if (folder / "state.json").is_file() or any(folder.glob("data-b*.arrow")):
        return ACTIVATIONS_KIND
    return RESULTS_KIND if (folder / "items").is_dir() else None


def check_kind(folder: Path, kind: str) -> None:
    """Raise :class:`StoreKindError` if ``folder`` holds another kind of store than ``kind``; writes
    nothing."""
    found = folder_kind(folder) if folder.is_dir() else None
    if found not in (None, kind):
        raise StoreKindError(
            f"--out {folder} holds {KINDS[found]}; writing {KINDS[kind]} there would overwrite its run.json. "
            "Use another --out (the folder was left as it is)."
        )


def set_aside(path: Path, quarantine: Path) -> None:
    """Move ``path`` into the ``quarantine`` folder (never deleted), under a free name."""
    quarantine.mkdir(exist_ok=True)
    target, n = quarantine / path.name, 1
    while target.exists():
        target, n = quarantine / f"{path.stem}.{n}{path.suffix}", n + 1
    shutil.move(str(path), target)


class FolderLock:
    """One writer per rank of a run folder: an exclusive ``flock`` on ``.lock-r{rank}`` (released by
    the OS when the process dies, even by ``kill -9``), the file naming its holder for whoever is
    refused."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = Path(folder) / f".lock-r{rank}"
        self.rank = rank
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise self._refusal(holder) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, rank {self.rank}, since {started}".encode()
        os.pwrite(fd, holder, 0)  # overwrite in place, then cut: a reader never sees an empty file
        os.ftruncate(fd, len(holder))
        self._fd = fd

    def check_free(self) -> None:
        """Raise :class:`RunLockedError` if another process holds the lock; creates and writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(self._holder(fd)) from None
        finally:
            os.close(fd)  # closing drops a lock taken here

    @staticmethod
    def _holder(fd: int) -> str:
        holder = ""
        for _ in range(20):  # the holder writes its name right after taking the lock
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if holder:
                break
            time.sleep(0.01)
        return holder or "an unknown process"

    def _refusal(self, holder: str) -> RunLockedError:
        return RunLockedError(
            f"{self.path.parent} is being written by another run ({holder}). Wait for it to finish "
            "(then run again to resume), or use another --out."
        )

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ResultStore:
    """The store of one rank of a run in ``out_dir``; see the module docstring.

    Use it as a context manager (or call :meth:`open` / :meth:`close`) to hold the rank's lock while
    writing. ``ResultStore(out_dir).read()`` reads a finished store without locking.
    """

    def __init__(
        self,
        out_dir: str | Path,
        rank: int = 0,
        settings: Mapping[str, Any] | None = None,
        *,
        repair: bool = False,
        upgrade: Callable[[dict], dict] | None = None,
        kind: str = RESULTS_KIND,
        vector_keys: tuple[str, ...] = VECTOR_KEYS,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.kind = kind  # what run.json says the folder holds (KINDS)
        self.vector_keys = vector_keys  # the arrays each part's .npz must hold
        self.upgrade = upgrade  # maps a run.json of an earlier version to the settings it meant
        self.dir = self.out_dir / "items"
        self.rank = rank
        self.settings = dict(settings) if settings is not None else None
        self.repair = repair
        self._lock = FolderLock(self.out_dir, rank)
        self._verified: dict[Path, list[str]] | None = None  # part -> its item ids
        #: verified parts with no checksum (written by an earlier version): read back, bytes unchecked
        self.unchecksummed: list[Path] = []

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> ResultStore:
        """Take the rank's lock, check the settings, verify every part and remove own leftovers."""
        prepare_folder(self.out_dir)
        check_kind(self.out_dir, self.kind)
        self.dir.mkdir(exist_ok=True)
        self._lock.acquire()
        try:
            for leftover in self.dir.glob(f"tmp-part-r{self.rank}-*"):
                leftover.unlink()  # a part interrupted mid-write: ours, since we hold our lock
            if self.rank == 0:
                self._check_settings()
            self.verify()
        except BaseException:
            self.close()
            raise
        return self

    def precheck(self) -> None:
        """The checks of :meth:`open` that write nothing, made before an expensive step (loading the
        model): ``--out`` a file, another run writing the folder, a run of other settings there."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            prepare_folder(self.out_dir)  # raises, naming the file
        if not self.out_dir.is_dir():
            return
        check_kind(self.out_dir, self.kind)
        self._lock.check_free()
        if self.rank == 0:
            self._check_settings(write=False)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> ResultStore:
        return self if self._lock.held else self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ settings
    @property
    def settings_path(self) -> Path:
        return self.out_dir / "run.json"

    def _check_settings(self, write: bool = True) -> None:
        if self.settings is None:
            return
        parts = self.parts()
        if self.settings_path.is_file():
            try:
                previous = json.loads(self.settings_path.read_text())
            except json.JSONDecodeError as exc:
                raise RunStoreError(
                    f"{self.settings_path} is not valid JSON ({exc}). Restore it, or use another --out."
                ) from exc
            if not isinstance(previous, dict):
                raise RunStoreError(
                    f"{self.settings_path} does not hold settings. Restore it, or use another --out."
                )
            if self.upgrade is not None:
                previous = self.upgrade(previous)
            changed = settings_differences(previous, self.settings)
            if changed and parts:
                raise SettingsMismatchError(
                    f"{self.out_dir} holds a run with other settings ({', '.join(changed)} differ). "
                    "Use another --out, or the same settings to resume it."
                )
        elif parts:
            unknown_or_other = [
                p.name
                for p in parts
                if not (found := self._part_settings(p)) or settings_differences(found, self.settings)
            ]
            if not self.repair or unknown_or_other:
                found = (
                    f"; {len(unknown_or_other)} part(s) carry other or no settings"
                    if unknown_or_other
                    else ""
                )
                raise RunStoreError(
                    f"{self.out_dir} holds {len(parts)} result part(s) but no run.json, so their settings "
                    f"cannot be checked{found}. Use another --out"
                    + (
                        ""
                        if unknown_or_other
                        else ", or --repair to rewrite run.json from the parts' settings"
                    )
                    + "."
                )
        if write:
            self._write_json(self.settings_path, {"kind": self.kind, **self.settings})

    def _part_settings(self, part: Path) -> dict:
        """The settings a part was written with ({} for parts of older versions, or unreadable ones:
        :meth:`verify` reports those)."""
        try:
            metadata = pq.read_schema(part).metadata or {}
            return json.loads(metadata[SETTINGS_KEY]) if SETTINGS_KEY in metadata else {}
        except (OSError, pa.ArrowException, ValueError):
            return {}

    @staticmethod
    def _write_json(path: Path, value: Any) -> None:
        write_text_atomically(path, json.dumps(value, indent=1))

    # ------------------------------------------------------------------ parts
    def parts(self) -> list[Path]:
        """The committed parts, in name order (temp files and anything else excluded)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if PART_NAME.match(p.name))

    def verify(self) -> list[PartProblem]:
        """Read every part back; report (or, with ``repair``, quarantine) corrupt and doubled parts.

        Returns the problems found. Raises :class:`RunStoreError` listing them unless ``repair``.
        """
        problems: list[PartProblem] = []
        seen: dict[str, str] = {}
        good: dict[Path, list[str]] = {}
        unchecksummed: list[Path] = []
        for part in self.parts():
            ids, reason, checksummed = self._check_part(part)
            if reason is None:
                counts = Counter(ids)
                doubled = sorted(i for i in counts if i in seen or counts[i] > 1)
                if doubled:
                    where = seen.get(doubled[0], part.name)
                    reason = f"repeats item(s) {', '.join(doubled[:3])} (also in {where})"
            if reason is not None:
                problems.append(PartProblem(part, reason))
                continue
            seen.update({item: part.name for item in ids})
            good[part] = ids
            if not checksummed:
                unchecksummed.append(part)
        if problems and not self.repair:
            listed = "; ".join(f"{p.part.name}: {p.reason}" for p in problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise RunStoreError(
                f"{self.dir} has {len(problems)} bad part(s): {listed}{more}. Run again with --repair "
                "(repair=True) to set them aside in items/quarantine/ and recompute their items."
            )
        for problem in problems:
            self._quarantine(problem.part)
            print(f"repair: set aside {problem.part.name} ({problem.reason})", file=sys.stderr)
        warn_unchecksummed(unchecksummed, self.unchecksummed, "part", self.dir)
        self._verified, self.unchecksummed = good, unchecksummed
        return problems

    def _check_part(self, part: Path) -> tuple[list[str], str | None, bool]:
        """The part's item ids, why it cannot be used (None when it can), and whether its bytes were
        checked against a checksum."""
        vectors = part.with_suffix(".npz")
        try:
            changed = checksum_problem(sidecar_of(part), [part, vectors])
            checksummed = True
        except NoChecksum:
            changed, checksummed = None, False
        if changed is not None:
            return [], changed, checksummed
        try:
            table = pq.read_table(part)
        except (OSError, pa.ArrowException) as exc:
            return [], f"unreadable Parquet ({type(exc).__name__}: {str(exc)[:80]})", checksummed
        if "item_id" not in table.column_names:
            return [], "no item_id column", checksummed
        ids = table.column("item_id").to_pylist()
        if self.settings is not None:
            metadata = table.schema.metadata or {}
            part_settings = json.loads(metadata[SETTINGS_KEY]) if SETTINGS_KEY in metadata else {}
            changed = settings_differences(part_settings, self.settings) if part_settings else []
            if changed:
                raise SettingsMismatchError(
                    f"{part} was made with other settings ({', '.join(changed)} differ). Use another --out, "
                    "or the same settings to resume it."
                )
        try:
            with np.load(vectors) as data:
                missing = [key for key in self.vector_keys if key not in data.files]
                if missing:
                    return ids, f"{vectors.name} lacks {missing}", checksummed
                for key in self.vector_keys:
                    data[key]  # noqa: B018  (reads and checks the array's zip entry)
        except FileNotFoundError:
            return ids, f"no {vectors.name} beside it", checksummed
        except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError...
            return ids, f"unreadable {vectors.name} ({type(exc).__name__}: {str(exc)[:80]})", checksummed
        return ids, None, checksummed

    def _quarantine(self, part: Path) -> None:
        for path in (part, part.with_suffix(".npz"), sidecar_of(part)):
            if path.exists():
                set_aside(path, self.dir / "quarantine")

    def done_ids(self) -> set[str]:
        """Item ids of the verified parts."""
        if self._verified is None:
            self.verify()
        return {item for ids in self._verified.values() for item in ids}

    def write(self, rows: list[dict], vectors: dict[str, np.ndarray]) -> Path:
        """Write one batch's rows and vectors as a new part (atomically; see the module docstring)."""
        if not self._lock.held:
            raise RunStoreError("Open the store (ResultStore.open() or a with-block) before writing to it.")
        taken = [
            int(m.group(2))
            for p in self.dir.iterdir()
            if (m := PART_NAME.match(p.name)) and int(m.group(1)) == self.rank
        ]
        name = f"part-r{self.rank}-{max(taken, default=-1) + 1:06d}"  # after this rank's last part
        tmp_npz = self.dir / f"tmp-{name}.npz"
        tmp_parquet = self.dir / f"tmp-{name}.parquet"
        np.savez(tmp_npz, **vectors)
        table = pa.Table.from_pylist(rows)
        if self.settings is not None:
            table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(self.settings).encode()})
        pq.write_table(table, tmp_parquet)
        # the checksums first: a committed part always has them (an orphan sidecar of a part never
        # committed is overwritten by the next part of that name)
        write_checksums(
            sidecar_of(self.dir / name), [tmp_parquet, tmp_npz], [f"{name}.parquet", f"{name}.npz"]
        )
        os.replace(tmp_npz, self.dir / f"{name}.npz")
        os.replace(tmp_parquet, self.dir / f"{name}.parquet")  # the part exists only once complete
        if self._verified is not None:
            self._verified[self.dir / f"{name}.parquet"] = [row["item_id"] for row in rows]
        return self.dir / f"{name}.parquet"

    def read(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        """All rows (sorted by item id) and the summed vectors, from verified parts only (every part
        is verified again here: other ranks may have written parts since this store opened)."""
        self.verify()
        rows: list[dict] = []
        sums: dict[str, np.ndarray] = {}
        for part in sorted(self._verified or []):
            rows.extend(pq.read_table(part).to_pylist())
            with np.load(part.with_suffix(".npz")) as vectors:
                for key in vectors.files:
                    sums[key] = sums.get(key, 0) + vectors[key].astype(np.float64)
        rows.sort(key=lambda row: row["item_id"])
        return rows, sums
