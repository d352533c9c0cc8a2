"""Issue 26, class 3: NaN and inf are found per item and layer, counted and named (the CLI, the
aggregates, the report), left out of every mean, and never located as a phase; every count says what
it counts, and an undefined value is never printed as 0.0."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from hooked_vllm import HookedVLM
from hooked_vllm.analysis.phases import detect_phases
from hooked_vllm.cli import main as cli_main
from hooked_vllm.runs.datasets import DatasetItem, DatasetSample
from hooked_vllm.runs.phase_diagram import aggregate, run_phase_diagram
from tests.conftest import make_coco, random_images

CLEAN = ["a red square on the left", "two circles near a line", "the picture is dark", "a small blue dot"]
POISON = "zzqx"  # a word no clean caption shares a token with; its embedding is set to NaN or inf


def _poisoned_model(model_dir: Path, out: Path, value: float) -> tuple[Path, list[int]]:
    """``model_dir``'s model with the embedding rows of POISON's own tokens set to ``value``."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    clean = {t for text in CLEAN for t in tokenizer(text, add_special_tokens=False).input_ids}
    own = [t for t in tokenizer(POISON, add_special_tokens=False).input_ids if t not in clean]
    assert own, "the poison word shares every token with the clean captions"
    with torch.no_grad():
        model.get_input_embeddings().weight[own] = value
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, own


def _items(directory: Path, captions: list[str]) -> list[DatasetItem]:
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (image, caption) in enumerate(zip(random_images(len(captions), seed=7), captions)):
        image.save(directory / f"img-{i}.png")
        items.append(DatasetItem(f"item-{i}", directory / f"img-{i}.png", f"Is this {caption}?"))
    return items


@pytest.fixture(scope="module")
def poisoned(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    nan_dir, _ = _poisoned_model(model_dir, root / "nan-model", float("nan"))
    inf_dir, _ = _poisoned_model(model_dir, root / "inf-model", float("inf"))
    return root, nan_dir, inf_dir


def test_items_with_nan_or_inf_are_named_and_left_out_of_every_mean(poisoned, tmp_path):
    root, nan_dir, inf_dir = poisoned
    captions = [*CLEAN, f"a {POISON} here", *CLEAN[:2], f"{POISON} again"]  # items 4 and 7 poisoned
    items = _items(tmp_path / "images", captions)
    finite = [item for item in items if POISON not in item.instruction]
    for model in (nan_dir, inf_dir):
        vlm = HookedVLM.from_pretrained(str(model))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no numpy warnings in place of a report
            got = run_phase_diagram(
                vlm,
                DatasetSample("mixed", items),
                tmp_path / f"run-{model.name}",
                batch_size=1,
                progress=False,
            )
            want = run_phase_diagram(
                vlm,
                DatasetSample("finite", finite),
                tmp_path / f"finite-{model.name}",
                batch_size=1,
                progress=False,
            )
        agg = got.aggregates
        assert (agg["n_items"], agg["n_items_run"], agg["n_items_nonfinite"]) == (6, 8, 2)
        assert sorted(agg["nonfinite_items"]) == ["item-4", "item-7"]
        assert all(layers == list(range(agg["n_layers"] + 1)) for layers in agg["nonfinite_items"].values())
        assert set(agg["counts"]) >= {"n_items", "n_items_run", "n_items_nonfinite", "n"}
        # the means, intervals, baselines and phases are those of the six finite items alone
        for group, stats in want.aggregates["contextualization"].items():
            for key in ("mean", "ci95", "baseline", "adjusted_mean", "n"):
                np.testing.assert_allclose(agg["contextualization"][group][key], stats[key], rtol=1e-9)
            assert np.isfinite(agg["contextualization"][group]["adjusted_mean"]).all()
        for pair, stats in want.aggregates["norm_attention"].items():
            np.testing.assert_allclose(agg["norm_attention"][pair]["mean"], stats["mean"], rtol=1e-9)
        np.testing.assert_allclose(
            agg["logit_lens"]["kl_to_final"]["mean"],
            want.aggregates["logit_lens"]["kl_to_final"]["mean"],
            rtol=1e-9,
        )
        assert agg["phases"] == want.aggregates["phases"]
        text = (got.out_dir / "aggregates.json").read_text()
        json.loads(text, parse_constant=lambda name: pytest.fail(f"aggregates.json holds {name}"))


def test_a_model_with_a_nan_weight_is_one_line_and_keeps_the_stored_items(model_dir, tmp_path, capsys):
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():  # one NaN in block 2's MLP: every item's stream is NaN from layer 3 on
        model.model.language_model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    processor.save_pretrained(tmp_path / "broken")
    capsys.readouterr()
    code = cli_main(
        ["phase-diagram", "--no-progress", "--model", str(tmp_path / "broken"), "--dataset", "coco"]
        + ["--data-dir", str(make_coco(tmp_path / "coco", n_images=4)), "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "NaN or inf (from stream layer 3 on" in err and "--dtype float32" in err, err
    assert "items are stored" in err, err
    assert len(list((tmp_path / "run" / "items").glob("part-*.parquet"))) >= 1


def test_the_cli_and_the_report_name_the_items_left_out(poisoned, tmp_path, capsys):
    root, nan_dir, _ = poisoned
    examples, images = [], tmp_path / "wino" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        for j, image in enumerate(random_images(2, seed=20 + i)):
            image.save(images / f"ex_{i}_img_{j}.png")
        poison = f"a {POISON} scene" if i == 2 else CLEAN[3]
        examples.append(
            {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": CLEAN[i]}
            | {"caption_1": poison, "tag": "Object", "secondary_tag": "", "num_main_preds": 1}
            | {"collapsed_tag": "Object"}
        )
    (tmp_path / "wino" / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    code = cli_main(
        ["phase-diagram", "--no-progress", "--model", str(nan_dir), "--dataset", "winoground"]
        + ["--data-dir", str(tmp_path / "wino"), "--out", str(tmp_path / "run"), "--report-items", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if "NaN/inf" in line)
    assert "2 of 12 items" in line and "winoground-2-i0-c1" in line and "other 10 items" in line, line
    report = (tmp_path / "run" / "report.html").read_text()
    assert 'id="nonfinite"' in report and "winoground-2-i1-c1" in report
    csv_rows = (tmp_path / "run" / "aggregates.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",n_items") and all(row.endswith(",10") for row in csv_rows[1:])


def test_phases_are_never_located_on_non_finite_curves():
    inter = np.array([0.1, 0.3, 0.2, 0.15, 0.2, 0.3, 0.4, 0.5, 0.3, 0.2])
    intra = np.array([0.2, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.4, 0.3])
    assert detect_phases(intra, intra, inter, window=1).clear
    kl = np.linspace(5, 0, 10)
    for bad in (np.nan, np.inf, -np.inf):
        for curve in ("inter", "intra", "kl"):
            args = {"inter": inter.copy(), "intra": intra.copy(), "kl": kl.copy()}
            args[curve][[3, 4]] = bad  # KL: NaN layers never count as converged
            report = detect_phases(args["intra"], args["intra"], args["inter"], args["kl"], window=1)
            assert not any(p.found for p in report.phases), (bad, curve)
            assert all("NaN or inf at layer(s) 3, 4" in p.evidence for p in report.phases)


def test_an_undefined_value_is_never_a_zero():
    """A group no item has (text-only items: no image tokens) has mean, std and interval undefined,
    and the baseline too: null in JSON, not 0.0; one item has no interval."""
    n_layers, rng = 3, np.random.default_rng(0)

    def row(i: int) -> dict:
        curve = rng.random(n_layers + 1).tolist()
        nan = [float("nan")] * (n_layers + 1)
        return {
            "item_id": f"t{i}",
            "n_image": 0.0,
            "n_text": 5.0,
            "selfdot_image": [0.0] * (n_layers + 1),
            "selfdot_text": curve,
            "crossdot": [0.0] * (n_layers + 1),
            "ctx_intra_image": nan,
            "ctx_intra_text": curve,
            "ctx_inter": nan,
            "ctx_all": curve,
        }

    sums = {"sum_image": np.zeros((n_layers + 1, 4)), "sum_text": rng.random((n_layers + 1, 4))}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        agg = aggregate([row(0), row(1), row(2)], sums)
        single = aggregate([row(3)], sums)
    image = agg["contextualization"]["intra_image"]
    assert all(np.isnan(image[key]).all() for key in ("mean", "std", "ci95", "baseline"))
    assert image["n"] == [0] * (n_layers + 1) and agg["contextualization"]["intra_text"]["n"] == [3] * 4
    assert np.isfinite(agg["contextualization"]["intra_text"]["ci95"]).all()
    assert np.isnan(single["contextualization"]["intra_text"]["ci95"]).all()  # one item: no interval
    assert not any(p["found"] for p in agg["phases"])


def test_the_activation_store_counts_nan_and_inf_rows_per_hook_and_item(llava, tmp_path):
    from collections import Counter

    from hooked_vllm.activations.store import ActivationStore

    vlm, hook = llava.vlm, "blocks.0.hook_resid_post"

    def poison(x, hook):  # the first item of every batch: NaN at its last position
        x = x.clone()
        x[0, -1, 0] = float("nan")
        return x

    items = _items(tmp_path / "images", CLEAN)
    with vlm.hooks([(hook, poison)]):
        store = ActivationStore.write(
            vlm, items, tmp_path / "store", hooks=[hook, "hook_visual_prefix"], positions="all", batch_size=2
        )
    rows = store[:]
    bad = (~torch.isfinite(rows[hook].float()).all(-1)).tolist()
    want = Counter(item for item, is_bad in zip(rows["item_id"], bad) if is_bad)
    assert sorted(want) == ["item-0", "item-2"]
    # the visual prefix's rows outside the image are NaN by design: not counted
    assert bool(torch.isnan(rows["hook_visual_prefix"].float()).any())
    assert store.nonfinite == {hook: dict(want)}
    assert ActivationStore.open(tmp_path / "store").nonfinite == {hook: dict(want)}
