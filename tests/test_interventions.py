"""Interventions are exact: checked against HF runs with custom 4D attention masks and against the
source/target runs themselves."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.interventions import (
    PatchingError,
    blocked_edges,
    knockout,
    knockout_sweep,
    logit_diff,
    patch_by_modality,
    patch_hook,
    prune,
    pruning_curve,
    select_image_tokens,
    target_prob,
)
from tests.conftest import INSTRUCTIONS, random_images

TOL = 1e-5


def hf_with_blocked_keys(family, batch, blocked: torch.Tensor) -> torch.Tensor:
    """HF logits with a custom 4D additive mask: causal, padding, and ``blocked[b, q, k]`` removed."""
    n = batch.input_ids.shape[1]
    allowed = (
        torch.ones(n, n, dtype=torch.bool).tril()[None] & batch.attention_mask.bool()[:, None, :] & ~blocked
    )
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )
    embeds = family.vlm.embed(batch)
    lm = family.reference.language_model if family.name == "instructblip" else family.reference
    return lm(inputs_embeds=embeds, attention_mask=mask[:, None], position_ids=batch.position_ids).logits


def pair_batches(vlm):
    """Same prompts, different images: identical layouts."""
    prompts = ["Describe the image.", "What colour?"]
    return vlm.prepare(random_images(2, seed=1), prompts), vlm.prepare(random_images(2, seed=2), prompts)


def test_knocking_out_image_to_text_matches_hf_with_a_4d_mask(family):
    vlm = family.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS)
    with knockout(vlm, batch, edges=[("image", "text"), ("image", "last")]):
        ours = vlm(batch)
    blocked = blocked_edges(batch, [("image", "text"), ("image", "last")])
    real = batch.attention_mask.bool()
    assert (ours - hf_with_blocked_keys(family, batch, blocked))[real].abs().max() <= TOL
    assert (ours - vlm(batch))[real].abs().max() > 1e-3, "the knockout must change something"
    # Image positions themselves are untouched by blocking their outgoing edges.
    assert (ours - vlm(batch))[batch.image_mask].abs().max() <= TOL


def test_patching_everything_reproduces_the_source(family):
    vlm = family.vlm
    source, target = pair_batches(vlm)
    everything = source.attention_mask.bool()
    source_logits, source_cache = vlm.run_with_cache(source)
    name = "blocks.1.hook_resid_post"
    logits, cache = None, None
    with vlm.hooks(fwd_hooks=[(name, patch_hook(source_cache[name], everything))]):
        logits, cache = vlm.run_with_cache(target)
    assert (logits - source_logits)[everything].abs().max() <= TOL
    downstream = f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"
    assert (cache[downstream] - source_cache[downstream])[everything].abs().max() <= TOL
    nothing = torch.zeros_like(everything)
    unpatched = vlm.run_with_hooks(target, fwd_hooks=[(name, patch_hook(source_cache[name], nothing))])
    assert torch.equal(unpatched, vlm(target))


def test_patch_by_modality_effects(llava):
    vlm = llava.vlm
    source, target = pair_batches(vlm)
    clean = vlm(source)
    token = int(clean[0, source.last_positions[0]].argmax())
    metric = target_prob(target, token)
    result = patch_by_modality(vlm, source, target, metric, groups=("image", "text", "last"))
    assert result.effects.shape == (vlm.cfg.n_layers, 3)
    # Patching the last position's residual after the last layer gives the source's output there.
    assert result.effects[-1, 2].item() == pytest.approx(result.clean, abs=1e-5)
    # Image positions after the last layer cannot reach the last position any more.
    assert result.effects[-1, 0].item() == pytest.approx(result.corrupt, abs=1e-6)
    prefix = patch_by_modality(vlm, source, target, metric, hook="visual_prefix", groups=("image",))
    assert prefix.effects.item() == pytest.approx(result.clean, abs=1e-5)  # the image is all that differs
    assert result.figure().data


def test_patching_refuses_mismatched_runs(llava):
    vlm = llava.vlm
    one = vlm.prepare(random_images(1), ["Describe the image."])
    two = vlm.prepare([random_images(2)], ["Describe the image."])
    with pytest.raises(PatchingError, match="image"):
        patch_by_modality(vlm, one, two, lambda logits: logits.sum())
    other_text = vlm.prepare(random_images(1), ["What is this?"])
    with pytest.raises(PatchingError):
        patch_by_modality(vlm, one, other_text, lambda logits: logits.sum(), groups=("text",))


def test_pruning_extremes(family):
    vlm = family.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS)
    real = batch.attention_mask.bool()
    n_image = int(batch.image_mask[0].sum())
    keep_all = select_image_tokens(vlm, batch, n_image, "norm", layer=1)
    assert torch.equal(keep_all, batch.image_mask)
    with prune(vlm, batch, keep_all, from_layer=1):
        assert torch.equal(vlm(batch), vlm.run_with_hooks(batch))
    keep_none = select_image_tokens(vlm, batch, 0, "first", layer=0)
    with prune(vlm, batch, keep_none, from_layer=0):
        pruned = vlm(batch)
    blocked = batch.image_mask[:, None, :].expand(-1, batch.input_ids.shape[1], -1)
    assert (pruned - hf_with_blocked_keys(family, batch, blocked))[real].abs().max() <= TOL


def test_token_selection_methods(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    for method in ("norm", "attention", "first", "random"):
        keep = select_image_tokens(vlm, batch, 5, method, layer=2)
        assert (keep.sum(-1) == 5).all() and not (keep & ~batch.image_mask).any()
    first = select_image_tokens(vlm, batch, 3, "first")
    start = batch.ranges("image")[0][0][0]
    assert first[0].nonzero().flatten().tolist() == [start, start + 1, start + 2]
    # "norm" keeps the tokens with the largest norm-based attention from the last position.
    _, cache = vlm.run_with_cache(batch)
    from hooked_vllm.analysis import head_summed_norms

    scores = head_summed_norms(cache["pattern", 1], cache["v", 1], vlm.W_O[1])[0, batch.last_positions[0]]
    best = scores.masked_fill(~batch.image_mask[0], -1).topk(5).indices.sort().values
    assert (
        select_image_tokens(vlm, batch, 5, "norm", layer=2)[0].nonzero().flatten().tolist() == best.tolist()
    )


def test_pruning_curve(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    points = pruning_curve(vlm, batch, ks=[25, 5, 0], from_layers=[1], max_new_tokens=3)
    full = points[0]
    assert (
        full.top1_agreement == 1.0 and full.kl == pytest.approx(0, abs=1e-6) and full.caption_agreement == 1.0
    )
    assert full.compute_saved == 0
    assert points[2].compute_saved > points[1].compute_saved > 0


def test_hooks_are_gone_after_an_exception_in_a_context(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    clean = vlm(batch)
    with pytest.raises(RuntimeError):
        with knockout(vlm, batch, edges=[("image", "text")]):
            raise RuntimeError("user code failed")
    with pytest.raises(RuntimeError):
        with prune(vlm, batch, torch.zeros_like(batch.image_mask), from_layer=0):
            raise RuntimeError("user code failed")
    assert torch.equal(vlm(batch), clean)
    assert all(not point.fwd_hooks for point in vlm.hook_dict.values())


def test_knockout_sweep_and_composition_with_user_hooks(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    token = int(vlm(batch)[0, batch.last_positions[0]].argmax())
    metric = logit_diff(batch, token, (token + 1) % 100)
    sweep = knockout_sweep(vlm, batch, [("image", "last")], metric, window=2)
    assert sweep.shape == (vlm.cfg.n_layers - 1, len(batch))
    seen = []
    with vlm.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: seen.append(x) or x)]):
        with knockout(vlm, batch, [("image", "text")], layers=[0]):
            vlm(batch)
    text_rows = seen[0][
        batch.text_mask[:, None, :, None].expand_as(seen[0]) & batch.image_mask[:, None, None, :]
    ]
    assert text_rows.abs().max() == 0, "the user's hook sees the knocked-out pattern"
