"""The tutorials are committed with their outputs, and those outputs are fresh: each notebook is what
tutorials/make_notebooks.py writes now, its outputs are clean (no errors, nothing on stderr, every
figure a PNG), and a run now on the shipped demo model (as in CI) prints what the committed one shows.

After editing a tutorial's cells, or code whose output a tutorial prints, regenerate them:
``python tutorials/make_notebooks.py --execute``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import tempfile
from pathlib import Path

import nbformat
import pytest

from hooked_vllm.demo import MODEL_DIR

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
REGENERATE = "regenerate with `python tutorials/make_notebooks.py --execute`"


def generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", TUTORIALS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_notebooks_are_what_the_generators_write():
    make = generator()
    assert [path.name for path in NOTEBOOKS] == make.names(), REGENERATE
    for name in make.names():
        committed = nbformat.read(TUTORIALS / name, as_version=4)
        written = make.build(name)
        cells = [(cell.cell_type, cell.source) for cell in committed.cells]
        assert cells == [(cell.cell_type, cell.source) for cell in written.cells], (
            f"{name} is stale: {REGENERATE}"
        )


# ---------------------------------------------------------------- outputs
def is_figure(output: dict) -> bool:
    data = output.get("data", {})
    plain = data.get("text/plain", "")
    return (
        any(kind.startswith("image/") or "plotly" in kind for kind in data)
        or plain.startswith(("<Figure", "<IPython.core.display.Image"))
        or "Figure" in plain.split("(")[0]  # a plotly go.Figure(...)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_committed_outputs_are_clean(path):
    """Every code cell ran and shows something; no error, nothing on stderr; every figure carries a
    PNG (what nbconvert and GitHub show)."""
    notebook = nbformat.read(path, as_version=4)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        assert outputs, f"{path.name}, cell {i} has no outputs: {REGENERATE}"
        for output in outputs:
            assert output["output_type"] != "error", f"{path.name}, cell {i}: {output.get('evalue')}"
            assert output.get("name") != "stderr", (
                f"{path.name}, cell {i} writes to stderr: {output['text']!r}"
            )
            if is_figure(output):
                assert "image/png" in output["data"], f"{path.name}, cell {i}: a figure without a PNG"


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
VOLATILE = [
    (re.compile(r"0x[0-9a-fA-F]+"), "<addr>"),  # memory addresses
    (re.compile(rf"(?:{re.escape(tempfile.gettempdir())}|/tmp|/var/folders)/[^\s'\",;)\]]*"), "<tmp>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:s|ms|µs|us|min)\b"), "<time>"),  # timings ("12.3 s")
    (re.compile(r"\b\d+(?:\.\d+)? ?[kKMGT]?i?B free\b"), "<disk> free"),  # the disk's free space
]


def normalised(text: str) -> tuple[list[str], list[float]]:
    """``text`` with addresses, temporary paths and timings masked, split into its words and its numbers."""
    for pattern, mask in VOLATILE:
        text = pattern.sub(mask, text)
    return NUMBER.split(text), [float(n) for n in NUMBER.findall(text)]


def same_to_3_digits(a: float, b: float) -> bool:
    """Equal when rounded to 3 significant digits, or within one unit of the third (a value on a
    rounding boundary may land on either side)."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    unit = 10 ** (math.floor(math.log10(max(abs(a), abs(b)))) - 2)
    return round(a / unit) == round(b / unit) or abs(a - b) <= unit * 1.0001


def signature(output: dict) -> tuple:
    kind = output["output_type"]
    return (kind, output.get("name")) if kind == "stream" else (kind, tuple(sorted(output.get("data", {}))))


def texts(output: dict) -> list[str]:
    if output["output_type"] == "stream":
        return [output["text"]]
    return [v for k, v in sorted(output.get("data", {}).items()) if k.startswith("text/")]


def coalesced(outputs: list[dict]) -> list[dict]:
    """Consecutive stream outputs of one name as one (how a print is split into chunks depends on
    when the kernel flushed)."""
    merged: list[dict] = []
    for output in outputs:
        last = merged[-1] if merged else None
        if last and output["output_type"] == "stream" and signature(last) == signature(output):
            merged[-1] = {**last, "text": last["text"] + output["text"]}
        else:
            merged.append(output)
    return merged


def assert_same_outputs(name: str, committed: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> None:
    for i, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if old.cell_type != "code":
            continue
        where = f"{name}, cell {i}"
        old_outputs, new_outputs = coalesced(old.get("outputs", [])), coalesced(new.get("outputs", []))
        assert [signature(o) for o in new_outputs] == [signature(o) for o in old_outputs], (
            f"{where}: the outputs' types changed: {REGENERATE}"
        )
        for old_output, new_output in zip(old_outputs, new_outputs):
            for was, now in zip(texts(old_output), texts(new_output)):
                (old_words, old_numbers), (new_words, new_numbers) = normalised(was), normalised(now)
                same = old_words == new_words and all(map(same_to_3_digits, old_numbers, new_numbers))
                assert same, (
                    f"{where} prints something else now: {REGENERATE}\n--- committed\n{was}\n--- now\n{now}"
                )


def test_the_comparison_rounds_to_3_digits_and_masks_what_varies():
    assert normalised("loss 0.12345 at 0x7f3a in 12.5 s") == (["loss ", " at <addr> in <time>"], [0.12345])
    assert normalised("13.3 GB free at /tmp/tmpab_1/store; 2 shapes")[0] == [
        "<disk> free at <tmp>; ",
        " shapes",
    ]
    assert same_to_3_digits(0.12345, 0.12349) and same_to_3_digits(0.12349, 0.12351)  # a boundary
    assert same_to_3_digits(11.6179, 11.62) and not same_to_3_digits(11.6, 11.8)
    assert not same_to_3_digits(0.5, -0.5) and not same_to_3_digits(1e-7, 2e-7)


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="demo model not shipped")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_and_prints_what_is_committed(path, tmp_path):
    committed = nbformat.read(path, as_version=4)
    # run in tmp_path: nothing lands in tutorials/
    fresh = generator().execute(copy.deepcopy(committed), tmp_path)
    errors = [out for cell in fresh.cells for out in cell.get("outputs", []) if out["output_type"] == "error"]
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]
    assert_same_outputs(path.name, committed, fresh)
