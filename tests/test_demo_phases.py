"""demo-phases, the 16-layer demo model trained in three stages (issue 27): shipped, found by name, the
main job's default, small, accurate; and (slow) the phases the unchanged rules find on it: the same
boundaries on two disjoint item sets, and (expected to fail while issue 27 is blocked) at least three
phases with the logit lens converging only in the last."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hooked_vllm import HookedVLM
from hooked_vllm.cli import build_parser
from hooked_vllm.cli.common import SHAPES_ITEMS
from hooked_vllm.demo import PHASES_MODEL_DIR
from hooked_vllm.runs.datasets import DatasetSample
from hooked_vllm.runs.phase_diagram import run_phase_diagram
from hooked_vllm.runs.shapes_dataset import load_shapes

HAS_MODEL = (PHASES_MODEL_DIR / "model.safetensors").is_file()
pytestmark = pytest.mark.skipif(not HAS_MODEL, reason="demo-phases is not shipped in this checkout")


def test_demo_phases_is_found_by_name_deep_and_small():
    vlm = HookedVLM.from_pretrained("demo-phases")
    assert vlm.cfg.n_layers >= 16
    assert type(vlm.hf_model).__name__ == "LlavaForConditionalGeneration"
    size = sum(path.stat().st_size for path in PHASES_MODEL_DIR.iterdir() if path.is_file())
    assert size < 20 * 2**20
    summary = json.loads((PHASES_MODEL_DIR / "training_summary.json").read_text())
    assert summary["held_out_accuracy"]["colour"] >= 0.95 and summary["held_out_accuracy"]["shape"] >= 0.95


def test_the_main_job_defaults_to_demo_phases_on_shapes():
    args = build_parser().parse_args(["phase-diagram"])
    assert args.model == "demo-phases" and args.n is None
    from hooked_vllm.cli.phase_diagram import settings_of

    assert settings_of(args)["dataset"] == "shapes"
    assert SHAPES_ITEMS["demo-phases"] >= 256


def _key(item) -> tuple[str, str]:
    return hashlib.sha256(item.image_path.read_bytes()).hexdigest(), item.instruction


def _phases(directory, sample: DatasetSample) -> dict:
    vlm = HookedVLM.from_pretrained("demo-phases")
    result = run_phase_diagram(vlm, sample, directory / f"run-{sample.name}", batch_size=32, progress=False)
    return {"phases": {p["name"]: p for p in result.aggregates["phases"]}, "agg": result.aggregates}


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[dict, dict]:
    """The main job's default sample (``--seed 0``) and a disjoint one (``--seed 1`` without any item,
    image and question, that is also in the first: a few of the small scene space's one-shape scenes)."""
    directory = tmp_path_factory.mktemp("demo-phases")
    n = SHAPES_ITEMS["demo-phases"]
    first = load_shapes(directory / "images-0", n=n, seed=0)
    second = load_shapes(directory / "images-1", n=n, seed=1)
    seen = {_key(item) for item in first.items}
    second = DatasetSample("shapes-1", [item for item in second.items if _key(item) not in seen])
    assert len(second.items) > 0.95 * n
    return _phases(directory, first), _phases(directory, second)


@pytest.mark.slow
def test_the_phase_boundaries_are_the_same_on_two_disjoint_item_sets(two_sets):
    first, second = two_sets
    for name, phase in first["phases"].items():
        other = second["phases"][name]
        assert phase["found"] == other["found"], name
        if phase["found"]:
            assert abs(phase["start"] - other["start"]) <= 1 and abs(phase["end"] - other["end"]) <= 1, name


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 27, blocked: the rules find 1 of 4 phases on demo-phases (MODEL_CARD.md has the curves)",
)
def test_the_rules_find_three_phases_and_the_lens_converges_only_in_the_last(two_sets):
    for run in two_sets:
        assert sum(p["found"] for p in run["phases"].values()) >= 3, run["phases"]
        # the logit lens converges only in the last phase: KL to the final distribution stays above
        # the rule's 1 nat until output preparation begins (its rule checks the same, within one layer)
        last = run["phases"]["output preparation"]
        assert last["found"], last
        kl = np.array(run["agg"]["logit_lens"]["kl_to_final"]["mean"])
        assert (kl[: last["start"] - 1] > 1.0).all()
