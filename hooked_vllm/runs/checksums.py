"""Content checksums of the files a store commits: SHA-256 in a sidecar file, ``sha256sum`` format.

Every Parquet part of a phase-diagram run (with its ``.npz``) and every Arrow shard of an activation
store is written with a sidecar ``<name>.sha256`` listing the SHA-256 of each of its files, written
before the part is committed (renamed into place). A store checks the sidecar on open, on resume and
under ``--repair``; a file whose bytes changed after it was written (a flipped bit on disk, a partial
copy, an edit) no longer matches and is reported, never read as good. The sidecars are what
``sha256sum -c`` reads, so a store can also be checked without Python::

    cd out/items && sha256sum -c *.sha256

Parts written before checksums existed have no sidecar: they are read back (as before) and reported
as not checksummed, never silently counted as verified.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.bin").write_bytes(b"data")
    >>> write_checksums(folder / "a.sha256", [folder / "a.bin"])
    >>> checksum_problem(folder / "a.sha256", [folder / "a.bin"]) is None
    True
    >>> _ = (folder / "a.bin").write_bytes(b"dbta")
    >>> checksum_problem(folder / "a.sha256", [folder / "a.bin"])
    'a.bin does not match its checksum in a.sha256 (its bytes changed after it was written)'
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

from hooked_vllm.runs.files import write_text_atomically

SUFFIX = ".sha256"
_CHUNK = 1 << 20


class NoChecksum(Exception):
    """The sidecar is missing: the part was written before checksums (or its sidecar was removed)."""


def sidecar_of(path: Path) -> Path:
    """The checksum file of a part or shard: ``part-r0-000000.parquet`` -> ``part-r0-000000.sha256``."""
    return path.with_suffix(SUFFIX)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(sidecar: Path, files: Sequence[Path], names: Sequence[str] | None = None) -> None:
    """Write ``sidecar`` (atomically) with the SHA-256 of each file, one ``<hex>  <name>`` line each.

    ``names`` are the names the files will have once committed (default: their own names), for files
    hashed under a temporary name before being renamed into place.
    """
    names = [f.name for f in files] if names is None else list(names)
    lines = [f"{file_sha256(f)}  {name}\n" for f, name in zip(files, names, strict=True)]
    write_text_atomically(sidecar, "".join(lines))


def read_checksums(sidecar: Path) -> dict[str, str]:
    """The checksums a sidecar lists, by file name. :class:`NoChecksum` if it is missing; ValueError
    if it is not a checksum file."""
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise NoChecksum(str(sidecar)) from exc
    except (UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{sidecar.name} is unreadable ({type(exc).__name__})") from exc
    listed: dict[str, str] = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise ValueError(f"{sidecar.name} is damaged (a line is not '<sha256>  <name>')")
        listed[name] = digest
    return listed


def checksum_problem(sidecar: Path, files: Sequence[Path]) -> str | None:
    """Why ``files`` do not match ``sidecar`` (None when every file does). :class:`NoChecksum` when
    there is no sidecar: the caller decides what an unchecksummed part means."""
    try:
        listed = read_checksums(sidecar)
    except ValueError as exc:
        return str(exc)
    for path in files:
        if path.name not in listed:
            return f"{sidecar.name} lists no checksum for {path.name}"
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            return f"{path.name} is missing ({sidecar.name} lists it)"
        except OSError as exc:
            return f"{path.name} is unreadable ({type(exc).__name__})"
        if actual != listed[path.name]:
            return (
                f"{path.name} does not match its checksum in {sidecar.name} "
                "(its bytes changed after it was written)"
            )
    return None


def warn_unchecksummed(found: Sequence[Path], known: Sequence[Path], what: str, folder: Path) -> None:
    """Say on stderr that ``found`` (verified parts or shards, ``what``) have no checksums, unless
    ``known`` (what the last verification found) already said so."""
    if found and len(found) != len(known):
        print(
            f"warning: {len(found)} {what}(s) in {folder} have no checksums (written by an earlier "
            f"version, e.g. {found[0].name}): they were read back, but their bytes cannot be checked.",
            file=sys.stderr,
        )
