"""Every study on every family (issue 29): each study's per-item function (the code ``run_study``
runs, on a batch its own batching prepares) on every tiny family, with invariants that could fail:

- the clean probability equals the untouched HF model's at the last real position (1e-5);
- knockout: an edge no query can read anyway (``last->image``: the image precedes the last position)
  changes nothing on a causal family (1e-5), and changes the answer on a prefix-LM family (its image
  reads the prompt); a real knockout (``question->last`` at the first block with attention) changes it,
  one in a hybrid's block without attention changes nothing;
- pruning: a ratio that keeps every image token equals the unpruned run (1e-5) at exactly the dense
  FLOPs; a real ratio counts fewer FLOPs and changes the answer, and equals the HF model with those
  tokens dropped (1e-5, FLOPs 1e-12) on the attention-only families that reference can drive;
- object ablation: an object whose box covers no grid cell ablates zero tokens and equals the clean run
  (1e-5); one covering the whole image ablates every whole-view patch token, equals the HF model with
  those embeddings zeroed at its text decoder's input (1e-5) and changes the answer; families whose
  image tokens have no grid (:data:`NO_GRID`) refuse in one line;
- attribution: clean == corrupt (no partner) gives an estimate and real patching of exactly 0; under
  pixel noise, every block x group estimate equals (clean - corrupt) . d metric / d resid_pre taken by
  hand with ``torch.autograd.grad`` (a leaf per block; 1e-5), block 0's is exactly 0 where the inputs
  agree (text, special, last), and patching block 0's image positions for real restores the clean
  metric (1e-4) on every family whose image enters the language model at its input only (and does
  not on the others, :data:`LATE_IMAGE`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hooked_vllm.runs.datasets import DatasetItem, DatasetSample
from hooked_vllm.studies import AttributionStudy, KnockoutStudy, ObjectAblationStudy, PruningStudy
from hooked_vllm.studies.base import _prepared_batches
from hooked_vllm.studies.object_ablation import ObjectAblationError
from tests.conftest import family_images, hf_forward_inputs, hf_text_parts
from tests.test_study_pruning import PROMPTS as THREE
from tests.test_study_pruning import dropped_run

pytestmark = pytest.mark.slow

TOL = 1e-5
PROMPTS = ["Describe the image.", "What colour is the square in the picture?"]
#: families whose image tokens read the prompt's keys (a bidirectional prefix)
PREFIX_LM = {"paligemma", "paligemma2"}


def on_every_family(check):
    """Two tests of ``check(family, tmp_path)``: on the ``family`` fixture's families and on
    ``new_family``'s (conftest's two session fixtures, which together hold every tiny family)."""

    def on_family(family, tmp_path):
        check(family, tmp_path)

    def on_new_family(new_family, tmp_path):
        check(new_family, tmp_path)

    return on_family, on_new_family


def sample_of(tmp_path, meta=None) -> DatasetSample:
    items = []
    for i, (image, prompt) in enumerate(zip(family_images(), PROMPTS)):
        path = tmp_path / f"item{i}.png"
        image.save(path)
        items.append(DatasetItem(f"item{i}", path, prompt, dict(meta or {})))
    return DatasetSample("every-family", items)


def prepared(vlm, sample):
    """The one batch ``run_study`` would prepare for the sample (its own batching code)."""
    ((items, batch),) = list(_prepared_batches(vlm, sample.items, len(sample.items), sample))
    return items, vlm.to_batch(batch)


def hf_last_probabilities(family, batch) -> torch.Tensor:
    """``[batch, vocab]`` the untouched HF model's probabilities at each item's last real position."""
    with torch.no_grad():
        logits = family.reference(**hf_forward_inputs(family, batch)).logits
    mask = batch.attention_mask.cpu()
    last = (mask * torch.arange(mask.shape[1])).argmax(1)
    return logits[torch.arange(len(logits)), last].float().softmax(-1)


def relative(p: float, p_clean: float) -> float:
    return abs(p - p_clean) / p_clean


def check_clean(rows, family, batch) -> None:
    expected = hf_last_probabilities(family, batch)
    for b, row in enumerate(rows):
        assert abs(row["p_clean"] - float(expected[b, row["answer_token"]])) <= TOL, (family.name, b)


# ---------------------------------------------------------------- knockout
def knockout_check(fam, tmp_path):
    vlm = fam.vlm
    items, batch = prepared(vlm, sample_of(tmp_path))
    first = min(vlm.adapter.attention_layers)
    study = KnockoutStudy(window=1, edges=("last->image", "question->last"), answer="prediction")
    rows = study.item_rows(vlm, items, batch)
    check_clean(rows, fam, batch)
    noop = max(abs(p - row["p_clean"]) for row in rows for p in row["p:last->image"])
    if fam.name in PREFIX_LM:
        moved = max(relative(p, row["p_clean"]) for row in rows for p in row["p:last->image"])
        assert moved > 1e-4, "the image reads the prompt's last position in a prefix-LM"
    else:
        assert noop <= TOL, (fam.name, noop)
    changed = max(relative(row["p:question->last"][first], row["p_clean"]) for row in rows)
    assert changed > 1e-4, (fam.name, first, changed)
    assert rows[0]["window_starts"] == list(range(vlm.cfg.n_layers))
    for block in set(range(vlm.cfg.n_layers)) - set(vlm.adapter.attention_layers):  # hybrids: no edge
        assert all(row["p:question->last"][block] == row["p_clean"] for row in rows), (fam.name, block)


# ---------------------------------------------------------------- pruning
def pruning_check(fam, tmp_path):
    vlm = fam.vlm
    items, batch = prepared(vlm, sample_of(tmp_path))
    k = min(vlm.adapter.attention_layers) + 1
    if k >= vlm.cfg.n_layers:
        pytest.fail(f"{fam.name}: no block after its first attention block to prune from")
    n_image = int(batch.image_mask.sum(-1).max())
    keep_all = 0.4 / n_image  # round(n * (1 - r)) == n for every item
    study = PruningStudy(layers=(k,), ratios=(keep_all, 0.5), baseline="stride", answer="prediction")
    rows = study.item_rows(vlm, items, batch)
    check_clean(rows, fam, batch)
    changed = 0.0
    for row in rows:
        assert row["n_image"] > 0
        assert row["flops"][0] == row["flops_dense"]
        assert row["flops"][1] < row["flops_dense"]
        for criterion in ("fastv", "stride"):
            assert abs(row[f"p:{criterion}"][0] - row["p_clean"]) <= TOL, (fam.name, criterion)
            changed = max(changed, relative(row[f"p:{criterion}"][1], row["p_clean"]))
    assert changed > 1e-4, (fam.name, changed)


#: attention-only families the token-dropping reference of tests/test_study_pruning.py can drive
#: (gemma3, llava and paligemma are tested there, on both padding sides)
DROPPABLE = {
    "aya_vision", "gemma4_moe", "glm46v", "glm4v", "internvl", "llava_next", "llava_onevision",
    "mistral3", "molmo2", "paligemma2", "qwen2_5_vl", "qwen2_vl",
}  # fmt: skip


def test_pruning_equals_hf_with_the_tokens_dropped(new_family):
    """The pruned probability equals the untouched HF model's with the pruned tokens physically
    dropped from block K on (1e-5), on :data:`DROPPABLE`; three images of one size (the reference
    drops as many tokens from every item)."""
    if new_family.name not in DROPPABLE:
        pytest.skip("the token-dropping reference cannot drive this family's decoder (see DROPPABLE)")
    vlm = new_family.vlm
    batch = vlm.to_batch(vlm.prepare([family_images(seed)[2] for seed in range(3)], THREE))
    mask = batch.attention_mask.cpu()
    last = (mask * torch.arange(mask.shape[1])).argmax(1)
    items = [SimpleNamespace(item_id=f"item{b}", meta={}) for b in range(len(THREE))]
    k = min(vlm.adapter.attention_layers) + 1
    study = PruningStudy(layers=(k,), ratios=(0.5,), baseline="stride", answer="prediction")
    rows = study.item_rows(vlm, items, batch)
    image = batch.image_mask.cpu()
    keep = torch.zeros_like(image)
    for b in range(len(image)):  # stride: floor(i * n / count) of the image positions in order
        positions = image[b].nonzero().flatten()
        count = round(len(positions) * 0.5)
        keep[b, positions[torch.arange(count) * len(positions) // count]] = True
    answer = torch.tensor([row["answer_token"] for row in rows])
    expected, flops = dropped_run(new_family, batch, image & ~keep, k, last, answer)
    ours = torch.tensor([row["p:stride"][0] for row in rows])
    assert (ours - expected).abs().max() <= TOL, new_family.name
    assert torch.allclose(
        torch.tensor([row["flops"][0] for row in rows], dtype=flops.dtype), flops, rtol=1e-12
    )


# ---------------------------------------------------------------- object ablation
NOWHERE = [1.0, 1.0, 1.0, 1.0]  # a box of no area at the image's corner: no grid cell overlaps it
EVERYWHERE = [0.0, 0.0, 1.0, 1.0]


def objects_meta(box) -> dict:
    return {"objects": [{"name": "picture", "box": box}], "asked": [0]}


#: families whose image tokens have no grid (Q-Former queries): the study refuses them in one line
NO_GRID = {"instructblip", "blip2"}


def whole_view(batch) -> torch.Tensor:
    """``[batch, pos]`` each item's image positions on its whole view (tile 0), from its layout."""
    where = torch.zeros(batch.attention_mask.shape, dtype=torch.bool)
    for b, (image,) in enumerate(batch.image_slots):
        positions = batch.image_mask[b].nonzero().flatten().cpu()
        where[b, positions[image.grid[image.is_patch][:, 0] == 0]] = True
    return where


def hf_zeroed_probabilities(fam, batch, where) -> torch.Tensor:
    """The untouched HF model's probabilities at the last real position with the embeddings its
    language model receives zeroed at ``where`` (a forward pre-hook on its text decoder)."""
    decoder, _ = hf_text_parts(fam.reference)

    def zero(module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].masked_fill(where[..., None], 0.0)
        return args, kwargs

    handle = decoder.register_forward_pre_hook(zero, with_kwargs=True)
    try:
        return hf_last_probabilities(fam, batch)
    finally:
        handle.remove()


def object_ablation_check(fam, tmp_path):
    vlm = fam.vlm
    study = ObjectAblationStudy(ablation="zero", answer="prediction")
    items, batch = prepared(vlm, sample_of(tmp_path, objects_meta(NOWHERE)))
    if fam.name in NO_GRID:
        with pytest.raises(ObjectAblationError) as refused:
            study.item_rows(vlm, items, batch)
        assert "\n" not in str(refused.value) and "no grid" in str(refused.value)
        return
    rows = study.item_rows(vlm, items, batch)
    check_clean(rows, fam, batch)
    for row in rows:
        assert row["n_ablated"] == row["n_random"] == 0
        assert abs(row["p:object"] - row["p_clean"]) <= TOL and abs(row["p:random"] - row["p_clean"]) <= TOL
    items, batch = prepared(vlm, sample_of(tmp_path, objects_meta(EVERYWHERE)))
    rows = study.item_rows(vlm, items, batch)
    where = whole_view(batch)
    expected = hf_zeroed_probabilities(fam, batch, where)
    changed = 0.0
    for b, row in enumerate(rows):
        assert row["n_ablated"] == row["n_random"] == int(where[b].sum()) > 0
        assert abs(row["p:object"] - float(expected[b, row["answer_token"]])) <= TOL, fam.name
        changed = max(changed, relative(row["p:object"], row["p_clean"]))
    assert changed > 1e-4, (fam.name, changed)


# ---------------------------------------------------------------- attribution
#: families whose image also enters the language model after block 0 (the corrupted run's image would
#: still reach it when block 0's image positions are patched)
LATE_IMAGE = {
    "qwen3_vl": "DeepStack: the vision tower's intermediate features are added at the image positions "
    "of the first blocks",
    "qwen3_vl_moe": "DeepStack, as Qwen3-VL",
    "gemma3n": "AltUp: block 0's hook_resid_pre is the active stream only; the other three are "
    "projections of the input embeddings, and every block adds per-layer inputs projected from them",
    "gemma4": "per-layer inputs: every block adds a projection of the input embeddings (image "
    "features included) that patching block 0's residual does not change",
}


GROUPS = ("image", "text", "special", "last")


def group_masks(batch) -> torch.Tensor:
    """``[group, batch, pos]``: each item's last real position (found by hand), and the image, text
    and special positions without it."""
    mask = batch.attention_mask.cpu()
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[torch.arange(len(mask)), (mask * torch.arange(mask.shape[1])).argmax(1)] = True
    real = mask.bool() & ~last
    return torch.stack([batch.mask(g).bool().cpu() & real for g in GROUPS[:3]] + [last])


def hand_estimates(vlm, clean, corrupt, rows) -> torch.Tensor:
    """``[batch, layer, pos]``: (clean - corrupt) . d metric / d blocks.{l}.hook_resid_pre, one
    ``torch.autograd.grad`` per block (a leaf put in at its hook) of the logit difference at the last
    real position."""
    last = group_masks(corrupt)[-1].float().argmax(1)
    answer = torch.tensor([row["answer_token"] for row in rows])
    other = torch.tensor([row["other_token"] for row in rows])
    per_layer = []
    for layer in range(vlm.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        with torch.no_grad():
            _, cache = vlm.run_with_cache(clean, names_filter=lambda n, name=name: n == name)
        kept = {}

        def leaf(act, hook, kept=kept):
            kept["x"] = act.detach().requires_grad_(True)
            return kept["x"]

        with torch.enable_grad():
            logits = vlm.run_with_hooks(corrupt, fwd_hooks=[(name, leaf)])
            final = logits[torch.arange(len(logits)), last.to(logits.device)].float()
            rows_of = torch.arange(len(final))
            (gradient,) = torch.autograd.grad(
                (final[rows_of, answer] - final[rows_of, other]).sum(), kept["x"]
            )
        product = ((cache[name] - kept["x"].detach()) * gradient).sum(-1).cpu().float()
        per_layer.append(product)
    return torch.stack(per_layer, 1)


def attribution_check(fam, tmp_path):
    vlm = fam.vlm
    sample = sample_of(tmp_path)
    items, batch = prepared(vlm, sample)
    with torch.enable_grad():
        same = AttributionStudy(pairs="swap", cells=4, answer="prediction")
        same.plan(vlm, sample)  # different instructions: no partner, each item its own corruption
        rows = same.item_rows(vlm, items, batch)
        for row in rows:
            assert not row["paired"] and row["metric_clean"] == row["metric_corrupt"]
            assert all(v == 0.0 for v in row["est:resid_pre"]), fam.name
            assert all(v == 0.0 for v in row["real:resid_pre"] + row["cell_real:resid_pre"]), fam.name
        noise = AttributionStudy(pairs="noise", cells=4, answer="prediction")
        noise.plan(vlm, sample)
        rows = noise.item_rows(vlm, items, batch)
        corrupt, _ = noise.corrupt_batch(vlm, items, batch)
        per_position = hand_estimates(vlm, batch, corrupt, rows)
    hand = torch.einsum("blp,gbp->blg", per_position, group_masks(corrupt).float())
    for b, row in enumerate(rows):
        est = torch.tensor(row["est:resid_pre"]).reshape(hand.shape[1:])  # [layer, group]
        assert (est - hand[b]).abs().max() <= TOL * max(1.0, float(hand[b].abs().max())), fam.name
        cells = per_position[b, row["cell_layer:resid_pre"], row["cell_pos:resid_pre"]]
        assert len(cells) >= 3  # a cell per group with positions (special may have none)
        assert (torch.tensor(row["cell_est:resid_pre"]) - cells).abs().max() <= TOL, fam.name
        for layer, group, real in zip(
            row["cell_layer:resid_pre"], row["cell_group:resid_pre"], row["cell_real:resid_pre"]
        ):
            if layer == 0 and GROUPS[group] != "image":  # the same input there: patching does nothing
                assert real == 0.0, fam.name
        block0 = dict(zip(GROUPS, est[0].tolist()))
        real = dict(zip(GROUPS, row["real:resid_pre"][: len(GROUPS)]))
        for group in ("text", "special", "last"):  # the same inputs there: nothing to patch
            assert block0[group] == 0.0 and real[group] == 0.0, (fam.name, group)
        assert abs(block0["image"]) > 1e-6, fam.name
        missed = abs(row["metric_corrupt"] + real["image"] - row["metric_clean"])
        if fam.name in LATE_IMAGE:  # the image reaches later blocks another way: not restored
            assert missed > 1e-5, (fam.name, missed)
        else:
            assert missed <= 1e-4, (fam.name, missed)


test_knockout_of_an_unreadable_edge_is_a_no_op, test_knockout_on_new_families = on_every_family(
    knockout_check
)
test_pruning_keeping_every_token_is_the_clean_run, test_pruning_on_new_families = on_every_family(
    pruning_check
)
test_object_ablation_of_no_token_is_the_clean_run, test_object_ablation_on_new_families = on_every_family(
    object_ablation_check
)
test_attribution_without_corruption_is_zero, test_attribution_on_new_families = on_every_family(
    attribution_check
)
