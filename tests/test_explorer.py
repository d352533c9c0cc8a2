"""The report explorer's per-item data: per-head and head-summed saliency against naive references
computed from the model's own cached pattern and values, on families with different masks (causal,
Gemma 3's bidirectional image blocks, Qwen's GQA); each item's answer against Hugging Face's own
greedy generate, and right/wrong against the label; its quantized encoding; the CLI's
--report-items."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vllm.analysis import collect
from hooked_vllm.cli import main
from hooked_vllm.report.explorer import (
    _encoded,
    explore,
    explore_items,
    explorer_pass,
    same_answer,
    spread,
    tile_layout,
)
from hooked_vllm.report.html import not_found_note
from tests.conftest import INSTRUCTIONS, Family, family_images


@pytest.fixture(scope="module", params=["llava", "gemma3", "qwen2_vl"])
def explored(request, tmp_path_factory):
    family = Family(request.param, tmp_path_factory.mktemp(f"explore-{request.param}"))
    vlm = family.vlm
    images = family_images()
    batch = vlm.prepare(images, INSTRUCTIONS)
    views = explore(vlm, batch, images, ["a", "b", "c"], INSTRUCTIONS)
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: "hook_pattern" in name or "hook_v" in name)
    return vlm, batch, views, cache


def naive_saliency(vlm, batch, cache, item: int, layer: int) -> dict[str, np.ndarray]:
    """[1 + head, n_image] from the cache, head by head, key by key: index 0 ||sum_h alpha f_h||."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][item].double()  # [head, query, key]
    v = cache[f"blocks.{layer}.attn.hook_v"][item].double()  # [key, kv_head, d_head]
    w_o = vlm.blocks[layer].attn.W_O.double()  # [head, d_head, d_model]
    n_heads, n_kv = w_o.shape[0], v.shape[1]
    positions = batch.image_mask[item].nonzero()[:, 0].tolist()
    text = batch.text_mask[item].nonzero()[:, 0].tolist()
    last = int(batch.last_positions[item])
    out = {source: np.zeros((n_heads + 1, len(positions))) for source in ("text", "last")}
    for j, key in enumerate(positions):
        f = torch.stack([v[key, h // (n_heads // n_kv)] @ w_o[h] for h in range(n_heads)])  # [head, d]
        for h in range(n_heads):
            out["last"][1 + h, j] = pattern[h, last, key] * f[h].norm()
            out["text"][1 + h, j] = sum(pattern[h, q, key] for q in text) * f[h].norm()
        out["last"][0, j] = (pattern[:, last, key, None] * f).sum(0).norm()
        out["text"][0, j] = sum((pattern[:, q, key, None] * f).sum(0).norm() for q in text)
    return out


def test_every_head_and_the_head_sum_match_a_naive_reference(explored):
    vlm, batch, views, cache = explored
    for item in range(len(batch)):
        slots = batch.image_slots[item][0]
        n = int(slots.is_patch.sum())
        for layer in (0, vlm.cfg.n_layers - 1):
            expected = naive_saliency(vlm, batch, cache, item, layer)
            for source in ("text", "last"):
                got = views[item].saliency[source][layer]
                assert got.shape == (vlm.cfg.n_heads + 1, n)
                np.testing.assert_allclose(got, expected[source][:, :n], rtol=1e-4, atol=1e-5)


def test_the_last_layers_lens_is_the_models_own_prediction(explored):
    """At the last layer the logit lens is the model's head: its top tokens at every image patch and
    at the last position are those of the model's logits."""
    vlm, batch, views, _ = explored
    logits = vlm(batch).float()
    capped = getattr(vlm.adapter.text_config, "final_logit_softcapping", None)
    for item, view in enumerate(views):
        positions = batch.image_mask[item].nonzero()[:, 0][: view.lens_grid.shape[1]]
        assert view.lens_grid[-1].tolist() == logits[item, positions].argmax(-1).tolist()
        last = logits[item, int(batch.last_positions[item])].softmax(-1)
        top = last.topk(view.lens_last_tokens.shape[1])
        assert view.lens_last_tokens[-1].tolist() == top.indices.tolist()
        if not capped:
            np.testing.assert_allclose(view.lens_last_probs[-1], top.values.numpy(), rtol=1e-4)


def test_the_layout_puts_each_patch_on_its_own_cell(explored):
    _, batch, views, _ = explored
    for item, view in enumerate(views):
        cells = batch.image_slots[item][0].grid[batch.image_slots[item][0].is_patch].tolist()
        for k, (tile, row, col) in enumerate(cells):
            entry = next(t for t in view.tiles if t["tile"] == tile)
            assert entry["index"][row * entry["cols"] + col] == k
        assert sum(i >= 0 for t in view.tiles for i in t["index"]) == len(cells)


def test_a_tiled_layout_keeps_its_tiles_apart(tmp_path):
    family = Family("llava_next", tmp_path)
    batch = family.vlm.prepare(family_images()[2:], ["Describe the image."])
    tiles = tile_layout(batch.image_slots[0][0])
    assert [t["tile"] for t in tiles] == [0, 1, 2, 3, 4]  # the base view and 2 x 2 crops
    indices = [i for t in tiles for i in t["index"] if i >= 0]
    assert sorted(indices) == list(range(int(batch.image_slots[0][0].is_patch.sum())))


def test_encoded_maps_keep_small_values_to_5e_4_relative():
    """Per-head frames span orders of magnitude: a value 1e-4 of its frame's largest still reads
    right in the hover (relative error < 5e-4), and NaN stays NaN."""
    rng = np.random.default_rng(0)
    maps = 10.0 ** rng.uniform(-4, 2, (4, 3, 50))  # six orders of magnitude per frame
    maps[1, 2] = 7.0  # a flat frame
    maps[2, 0, 5] = np.nan
    encoded = _encoded(maps)
    halves = np.frombuffer(base64.b64decode(encoded["data"]), dtype="<f2").astype(np.float64)
    decoded = (halves.reshape(12, 50) * np.array(encoded["scale"])[:, None]).reshape(maps.shape)
    assert np.isnan(decoded[2, 0, 5]) and np.isnan(decoded).sum() == 1
    scale = np.array(encoded["scale"]).reshape(4, 3, 1)
    normal = maps >= 6.2e-5 * scale  # float16's normal range
    assert 0.5 < normal.mean() < 1  # both ranges are exercised
    np.testing.assert_allclose(decoded[normal], maps[normal], rtol=5e-4)
    assert (np.abs(np.nan_to_num(decoded - maps)) <= 6e-8 * scale + 5e-4 * np.nan_to_num(maps)).all()
    assert encoded["low"][5] == encoded["high"][5] == 7.0


def test_spread_picks_evenly_and_never_more_than_there_are():
    ids = [f"{k:03d}" for k in range(10)]
    assert spread(ids, 3) == ["000", "004", "009"]  # linspace 0, 4.5, 9 (4.5 rounds to even)
    assert spread(ids, 20) == ids and spread(ids, 0) == []


def explorer_data(report: str) -> dict | None:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', report, re.S)
    return json.loads(match.group(1)) if match else None


def test_the_cli_explores_the_chosen_number_of_items(tmp_path, capsys):
    run = ["phase-diagram", "--model", "demo", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*run, "--report-items", "3"]) == 0
    report = (tmp_path / "run" / "report.html").read_text()
    data = explorer_data(report)
    ids = [item["id"] for item in data["items"]]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    # the demo's synthetic scenes: PNG, their exact colours, smaller than a JPEG
    assert all(item["thumbnail"].startswith("data:image/png") for item in data["items"])
    assert all(item["answer"] and item["label"] and item["correct"] is not None for item in data["items"])
    aggregates = json.loads((tmp_path / "run" / "aggregates.json").read_text())
    if not all(phase["found"] for phase in aggregates["phases"]):
        assert "Not found" in report and "To try:" in report
    # again without the explorer (the results are reused: --report-items is not a result setting)
    assert main([*run, "--report-items", "0"]) == 0
    assert explorer_data((tmp_path / "run" / "report.html").read_text()) is None


def test_not_found_says_what_to_try_for_this_run():
    phases = [{"name": "alignment", "found": False}, {"name": "output preparation", "found": True}]
    note = not_found_note({"phases": phases, "n_items": 16, "n_layers": 6})
    assert "alignment" in note and "16" in note and "6 layers" in note and "output preparation" not in note
    assert "below" in note and "above" not in note  # the note stands above the phase diagram
    deep = not_found_note({"phases": phases, "n_items": 5000, "n_layers": 32})
    assert "more items" not in deep and "deeper model" not in deep
    assert not_found_note({"phases": phases[1:], "n_items": 16, "n_layers": 6}) is None


def test_all_heads_is_the_saliency_the_dataset_rows_average(explored):
    """The explorer's "all heads" frame is the collector's per-item saliency (the run's rows)."""
    vlm, batch, views, _ = explored
    result = collect(vlm, batch)
    for item, view in enumerate(views):
        n = view.saliency["last"].shape[-1]
        for source, stored in (
            ("last", result.attention.image_saliency_from_last),
            ("text", result.attention.image_saliency_from_text),
        ):
            np.testing.assert_allclose(
                view.saliency[source][:, 0], stored[:, item, :n].numpy(), rtol=1e-4, atol=1e-5
            )


def test_query_tokens_are_marked_as_not_spatial(tmp_path):
    family = Family("instructblip", tmp_path)
    images = family_images()[:1]
    views = explore(family.vlm, family.vlm.prepare(images, INSTRUCTIONS[:1]), images, ["q"], INSTRUCTIONS[:1])
    assert views[0].spatial is False
    assert views[0].saliency["last"].shape[-1] == family.vlm.adapter.n_query_tokens


def test_a_multi_image_item_shows_its_first_image(tmp_path):
    family = Family("qwen2_vl", tmp_path)
    vlm, pictures = family.vlm, family_images()
    batch = vlm.prepare([[pictures[0], pictures[1]]], ["Compare the two images."])
    views = explore(vlm, batch, [[pictures[0], pictures[1]]], ["two"], ["Compare the two images."])
    first = int(batch.image_slots[0][0].is_patch.sum())
    assert first < int(batch.image_mask[0].sum())  # the second image's patches exist, and are not shown
    assert views[0].saliency["text"].shape[-1] == first
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: "hook_pattern" in name or "hook_v" in name)
    expected = naive_saliency(vlm, batch, cache, 0, vlm.cfg.n_layers - 1)
    for source in ("text", "last"):
        np.testing.assert_allclose(
            views[0].saliency[source][-1], expected[source][:, :first], rtol=1e-4, atol=1e-5
        )


def test_the_thumbnail_is_the_part_of_the_image_the_model_saw(tmp_path):
    """LLaVA-1.5 centre-crops a 48 x 24 image to its middle 24 x 24: the thumbnail under the grid is
    that square; Gemma 3 resizes the whole image onto its grid: the thumbnail keeps 2:1."""
    wide = family_images()[0]  # 48 x 24
    for name, cropped in (("llava", True), ("gemma3", False)):
        vlm = Family(name, tmp_path / name).vlm
        view = explore(vlm, vlm.prepare([wide], ["Describe."]), [wide], ["w"], ["Describe."])[0]
        shown = Image.open(io.BytesIO(base64.b64decode(view.thumbnail.split(",", 1)[1])))
        assert view.cropped is cropped
        assert shown.size[0] / shown.size[1] == pytest.approx(1.0 if cropped else 2.0, abs=0.05)


def test_a_soft_capped_heads_lens_is_capped_as_the_model_is(tmp_path):
    """PaliGemma 2 caps its logits (cap * tanh(x / cap)); with a cap small enough to bite, the last
    layer's lens (the explorer's and the collector's) gives the model's own probabilities."""
    family = Family("paligemma2", tmp_path)
    vlm = family.vlm
    vlm.adapter.text_config.final_logit_softcapping = 0.5  # the model reads the same config object
    images = family_images()[:2]
    batch = vlm.prepare(images, INSTRUCTIONS[:2])
    probs = vlm(batch).float().softmax(-1)
    views = explore(vlm, batch, images, ["a", "b"], INSTRUCTIONS[:2])
    result = collect(vlm, batch)
    for item, view in enumerate(views):
        last = probs[item, int(batch.last_positions[item])]
        top = last.topk(view.lens_last_tokens.shape[1])
        assert view.lens_last_tokens[-1].tolist() == top.indices.tolist()
        np.testing.assert_allclose(view.lens_last_probs[-1], top.values.numpy(), rtol=1e-4)
        np.testing.assert_allclose(
            float(result.lens.final_prob[-1, item, 0]), float(top.values[0]), rtol=1e-4
        )


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "internvl"])
def test_the_fused_path_equals_the_pattern_path(name, tmp_path):
    """The fused path recomputes alpha for the kept queries from q and k (no full pattern); on
    padded batches of causal families it gives the pattern path's numbers."""
    vlm = Family(name, tmp_path).vlm
    images = family_images()
    batch = vlm.prepare(images, INSTRUCTIONS)
    fused = explorer_pass(vlm, batch, attention="fused")
    pattern = explorer_pass(vlm, batch, attention="pattern")
    for source in ("text", "last"):
        np.testing.assert_allclose(fused.saliency[source], pattern.saliency[source], rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.lens_grid, pattern.lens_grid)


def hf_greedy_answer(model, tokenizer, inputs: dict, max_new_tokens: int = 24) -> tuple[str, bool]:
    """Hugging Face's own greedy ``generate`` on one item's processor inputs: the answer until EOS
    (decoded without special tokens) and whether it was cut at ``max_new_tokens``."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    ended = eos in new
    new = new[: new.index(eos)] if ended else new
    return tokenizer.decode(new, skip_special_tokens=True).strip(), not ended


def test_each_items_answer_is_the_demo_models_own_and_is_checked_against_its_label(tmp_path):
    """The shipped demo model on held-out shapes items: each explored item's answer is what Hugging
    Face's ``generate`` answers for the same image and question (the demo's training prompt, the
    model loaded by transformers alone), and right/wrong is that answer against the label. Half the
    items get another item's label, so both marks are exercised."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hooked_vllm import HookedVLM
    from hooked_vllm.demo import MODEL_DIR
    from hooked_vllm.demo.train import TEMPLATE
    from hooked_vllm.runs.datasets import DatasetItem
    from hooked_vllm.runs.shapes_dataset import load_shapes

    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("demo model not shipped")
    items = load_shapes(tmp_path, n=12).items
    swapped = [
        DatasetItem(item.item_id, item.image_path, item.instruction, {"answer": other.meta["answer"]})
        if k % 2
        else item
        for k, (item, other) in enumerate(zip(items, items[1:] + items[:1]))
    ]
    views = explore_items(HookedVLM.from_pretrained(str(MODEL_DIR)), swapped, batch_size=5)
    model = LlavaForConditionalGeneration.from_pretrained(str(MODEL_DIR)).eval()
    processor = AutoProcessor.from_pretrained(str(MODEL_DIR))
    marks = []
    for item, view in zip(swapped, views):
        inputs = processor(
            images=Image.open(item.image_path).convert("RGB"),
            text=TEMPLATE.format(question=item.instruction),
            return_tensors="pt",
        )
        expected, cut = hf_greedy_answer(model, processor.tokenizer, inputs)
        assert (view.answer, view.answer_cut) == (expected, cut), item.instruction
        assert view.label == item.meta["answer"]
        assert view.correct == (expected.lower() == item.meta["answer"].lower())
        marks.append(view.correct)
    assert True in marks and False in marks


def test_a_long_answer_is_the_reference_generate_and_says_when_it_was_cut(llava):
    """A tiny random LLaVA rambles: the explorer's answer is the untouched HF copy's greedy
    continuation, token for token up to the cap, marked as cut where no EOS came."""
    vlm, images = llava.vlm, family_images()
    batch = vlm.prepare(images, INSTRUCTIONS)
    views = explore(vlm, batch, images, ["a", "b", "c"], INSTRUCTIONS, labels=[None, "x", None])
    for k, view in enumerate(views):
        one = vlm.prepare(images[k : k + 1], INSTRUCTIONS[k : k + 1])
        expected, cut = hf_greedy_answer(llava.reference, vlm.tokenizer, dict(one.inputs))
        assert (view.answer, view.answer_cut) == (expected, cut)
        assert view.label == [None, "x", None][k]
        assert view.correct == ([None, expected == "x", None][k])
    assert any(view.answer_cut for view in views) and any(len(view.answer) > 10 for view in views)


def test_the_answer_equals_the_label_up_to_case_spaces_and_a_full_stop():
    assert same_answer(" Red.", "red") and same_answer("two  shapes", "Two shapes")
    assert not same_answer("a red one", "red") and not same_answer("redd", "red")
