"""Files written whole or not at all.

Every output of a run goes to a temporary file beside its final name and is renamed into place once
complete, so a failed write (a full disk, a read-only folder, an interrupted run) never leaves a
truncated file that looks finished: the old file stays, or there is none.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_text_atomically(folder / "aggregates.json", "{}")
    >>> (folder / "aggregates.json").read_text(), sorted(p.name for p in folder.iterdir())
    ('{}', ['aggregates.json'])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (same folder, same suffix, so that writers that
    infer the format from the name still can); renamed to ``path`` when the block ends without error,
    removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)``, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
