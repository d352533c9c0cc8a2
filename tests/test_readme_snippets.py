"""Every Python block of README.md and docs/*.md runs as written on the shipped demo model.

A file's blocks run top to bottom in one namespace (as a reader pastes them into one session), in a
fresh working folder. A block whose info string says ``python excerpt`` is a fragment of a longer
program (docs/FAMILIES.md quotes Hugging Face's internals) and is only compiled.
"""

from __future__ import annotations

import os
import re

import matplotlib
import pytest

from tests.conftest import ROOT

matplotlib.use("Agg")
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.S | re.M)
HAS_DEMO = (ROOT / "hooked_vllm/demo/model/model.safetensors").is_file()


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block whose language is Python."""
    blocks = []
    for match in FENCE.finditer(text):
        info = match["info"].strip()
        if info.split(" ")[0] in ("python", "py"):
            blocks.append((text[: match.start()].count("\n") + 1, info, match["code"]))
    return blocks


def test_the_extractor_finds_blocks_and_excerpts():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python excerpt\ny(\n```\n"
    assert python_blocks(text) == [(2, "python", "x = 1\n"), (8, "python excerpt", "y(\n")]


@pytest.mark.skipif(not HAS_DEMO, reason="no demo model")
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_python_block_runs_as_written(document, tmp_path, monkeypatch):
    blocks = python_blocks(document.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    namespace: dict = {"__name__": "__readme__"}
    for line, info, code in blocks:
        compiled = compile(code, f"{document.name}:{line}", "exec")
        if "excerpt" in info.split(" ")[1:]:
            continue
        try:
            exec(compiled, namespace)
        except Exception as error:  # name the block a reader would paste
            raise AssertionError(
                f"{document.name}, the block at line {line} fails: {type(error).__name__}: {error}"
            ) from error
