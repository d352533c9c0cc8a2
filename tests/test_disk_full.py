"""Write failures (issue 26, class 7): a full disk is one line with exit code 2, never a truncated
output that looks complete, and the run resumes exactly once space is freed. Run on a small tmpfs
(mounting needs root, as CI has; skipped elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from hooked_vllm.runs.files import atomic_path, write_text_atomically
from tests.conftest import ROOT


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "aggregates.json"
    write_text_atomically(target, '{"old": 1}')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"new": ')  # half written when the writer fails
        raise RuntimeError("the disk filled up")
    assert target.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


#: the 6-layer demo on its 16 items: outputs small enough for the 8 MB disk
SMALL = ["--model", "demo"]


def _main_job(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hooked_vllm.cli",
            "phase-diagram",
            "--no-progress",
            *SMALL,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _complete(path: Path) -> bool:
    """Whether an output that exists is whole (each kind read back by its own reader)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".png":
        Image.open(path).load()
    elif path.suffix == ".html":
        return path.read_text().rstrip().endswith("</html>")
    elif path.suffix == ".csv":
        return path.read_text().endswith("\n")
    return True


@pytest.mark.skipif(not (ROOT / "hooked_vllm/demo/model/model.safetensors").is_file(), reason="no demo model")
def test_a_full_disk_is_one_line_leaves_no_truncated_output_and_resumes_exactly(tmp_path, small_disk):
    clean = _main_job(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    # leave about 1 MB: the items and images fit, the 5 MB report does not
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (7 * 2**20 - 64 * 1024))
    out = small_disk / "out"
    full = _main_job(out)
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.strip().count("\n") == 0 and "No space left on device" in full.stderr
    assert "run the same command again to resume" in full.stderr
    for path in out.rglob("*"):
        if path.is_file() and not path.name.startswith((".lock", "tmp-")):
            assert not path.name.startswith(".tmp-"), f"a temporary file was left: {path}"
            assert _complete(path), f"{path} is truncated"
    filler.unlink()
    resumed = _main_job(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((out / "aggregates.json").read_text())
    want = json.loads((tmp_path / "clean" / "aggregates.json").read_text())
    assert got == want
    assert _complete(out / "report.html") and _complete(out / "phase_diagram.png")
