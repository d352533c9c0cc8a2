"""Qwen3-VL's DeepStack: visual features added to the residual stream after the first layers, each
through its own hook point, counted in residual decompositions and ablatable like HF's."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import Family, family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Family:
    return Family("qwen3_vl", tmp_path_factory.mktemp("qwen3-vl"))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_deepstack_is_added_between_blocks_at_image_positions(qwen3, padding_side):
    vlm = qwen3.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    _, cache = vlm.run_with_cache(batch)
    layers = vlm.adapter.injection_layers
    assert layers == (0, 1)
    for layer in range(vlm.cfg.n_layers - 1):
        after = cache[f"blocks.{layer + 1}.hook_resid_pre"]
        before = cache[f"blocks.{layer}.hook_resid_post"]
        if layer in layers:
            added = cache[f"blocks.{layer}.hook_deepstack"]
            assert added.shape == before.shape
            assert torch.equal(added[~batch.image_mask], torch.zeros_like(added[~batch.image_mask]))
            assert (added[batch.image_mask].abs().amax(-1) > 0).all()
            assert torch.equal(after, before + added)
        else:
            assert torch.equal(after, before)


def test_residual_decomposition_counts_the_injections(qwen3):
    vlm = qwen3.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    _, cache = vlm.run_with_cache(batch)
    real = batch.attention_mask.bool()
    for layer in (1, 2, vlm.cfg.n_layers):
        parts, labels = cache.decompose_resid(layer=layer, return_labels=True)
        assert [label for label in labels if "deepstack" in label] == [
            f"{n}_deepstack" for n in range(min(layer, 2))
        ]
        stream = (
            cache[f"blocks.{layer}.hook_resid_pre"]
            if layer < vlm.cfg.n_layers
            else (cache[f"blocks.{layer - 1}.hook_resid_post"])
        )
        assert (parts.sum(0) - stream)[real].abs().max() <= 1e-4
    attn_only, labels = cache.decompose_resid(mode="attn", return_labels=True)
    assert not any("deepstack" in label for label in labels)


def test_ablating_a_deepstack_injection_equals_hf(qwen3, monkeypatch):
    vlm, reference = qwen3.vlm, qwen3.reference
    batch = vlm.prepare(family_images(), PROMPTS)
    ours = vlm.run_with_hooks(
        batch, fwd_hooks=[("blocks.1.hook_deepstack", lambda x, hook: torch.zeros_like(x))]
    )
    original = reference.model.get_image_features

    def without_second_injection(*args, **kwargs):
        out = original(*args, **kwargs)
        out.deepstack_features[1] = tuple(torch.zeros_like(f) for f in out.deepstack_features[1])
        return out

    monkeypatch.setattr(reference.model, "get_image_features", without_second_injection)
    theirs = reference(**batch.inputs).logits
    real = batch.attention_mask.bool()
    assert (ours - theirs)[real].abs().max() <= 1e-5
    assert (ours - vlm(batch))[real].abs().max() > 1e-4, "the injection must matter"


def test_a_decomposition_that_would_miss_an_injection_is_refused(qwen3):
    """Without the DeepStack hooks in the cache the terms could not sum to the stream: refused in one
    line, as is TransformerLens's per-head decomposition (it has no term for them)."""
    vlm = qwen3.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    _, partial = vlm.run_with_cache(batch, names_filter=lambda n: "deepstack" not in n)
    with pytest.raises(ValueError, match="blocks.0.hook_deepstack is not in the cache"):
        partial.decompose_resid(layer=2)
    _, full = vlm.run_with_cache(batch)
    with pytest.raises(NotImplementedError, match="use decompose_resid"):
        full.get_full_resid_decomposition(layer=2)
    assert full.decompose_resid(layer=2).shape[0] == len(full.decompose_resid(layer=2, return_labels=True)[1])
