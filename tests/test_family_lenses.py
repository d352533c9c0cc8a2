"""The lenses and interventions on LLaVA-NeXT, Qwen2-VL/2.5-VL and Gemma 3 against naive references:
images of different sizes (different image-token counts per item), M-RoPE, and Gemma 3's
bidirectional image blocks and sliding windows (a non-causal mask)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)
from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model as gemma4_masks
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask as gemma4_blocks

from hooked_vllm.adapters.base import no_kv_cache
from hooked_vllm.analysis import collect, contextualization_from_cache, modality_pairs
from hooked_vllm.interventions import blocked_edges, knockout, patch_hook, prune, select_image_tokens
from hooked_vllm.model.layers import attention_w_o
from tests.conftest import family_images, hf_text_parts
from tests.test_analyses import close, naive_norms, naive_pair_mean

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5
#: families whose every image fills the same number of slots (a fixed grid or pooled tokens)
FIXED_IMAGE_TOKENS = ("gemma3", "gemma3n", "paligemma", "paligemma2", "blip2")


def allowed_pairs_naive(family, batch, layer: int | None = None) -> torch.Tensor:
    """``[batch, query, key]``: causal attention to real keys, for Gemma 3 also every pair inside one
    image's run of soft tokens, for PaliGemma every pair of the prefix, for Molmo 2 every pair of an
    item's image tokens; in a sliding-window ``layer``
    only keys within the window of columns (Gemma 3: on top of everything; PaliGemma 2: the causal
    part only). Written out by hand, not with HF's mask functions."""
    n = batch.input_ids.shape[1]
    real = batch.attention_mask.bool()
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None] & real[:, None, :]
    config = family.vlm.adapter.text_config
    kinds = getattr(config, "layer_types", None) or []
    sliding = layer is not None and kinds and kinds[layer] == "sliding_attention"
    if layer is not None and kinds and kinds[layer] == "chunked_attention":  # Llama 4's RoPE layers
        chunk = batch.position_ids // config.attention_chunk_size  # chunks of positions, from the first
        causal = causal & (chunk[:, :, None] == chunk[:, None, :])
    columns = torch.arange(n)
    in_window = (columns[None, :] > columns[:, None] - (getattr(config, "sliding_window", None) or n))[None]
    extra = torch.zeros_like(causal)
    if family.name.startswith("gemma4"):  # image blocks both ways in the sliding layers only
        soft = batch.inputs["mm_token_type_ids"] == 1
        run = torch.cumsum(soft & ~torch.nn.functional.pad(soft, (1, 0))[:, :-1], dim=1)
        extra = soft[:, :, None] & soft[:, None, :] & (run[:, :, None] == run[:, None, :])
        return ((causal | extra) & in_window) if sliding else causal
    if family.name == "gemma3":
        soft = batch.inputs["token_type_ids"] == 1
        run = torch.cumsum(soft & ~torch.nn.functional.pad(soft, (1, 0))[:, :-1], dim=1)
        extra = soft[:, :, None] & soft[:, None, :] & (run[:, :, None] == run[:, None, :])
        allowed = causal | extra
        return allowed & in_window if sliding else allowed
    if family.name.startswith("paligemma"):  # prefix LM: the prefix (token type 0) both ways
        prefix = (batch.inputs["token_type_ids"] == 0) & real
        extra = prefix[:, :, None] & prefix[:, None, :]
    if family.name == "molmo2":  # one block: all of an item's image tokens (structure too) both ways
        image = (batch.inputs["mm_token_type_ids"] == 1) & real
        extra = image[:, :, None] & image[:, None, :]
    return ((causal & in_window) if sliding else causal) | extra


def hf_logits_with_blocked(
    family, batch, blocked: torch.Tensor, removed: torch.Tensor | None = None
) -> torch.Tensor:
    """HF's language model on our input embeddings with the family's own masks, ``blocked`` removed;
    in layers with no attention pattern (Qwen3.5's linear attention) the positions ``removed``
    (``[batch, pos]``) are treated as HF treats padding there."""
    vlm, reference = family.vlm, family.reference
    embeds, injections = vlm._embed_with_injections(batch)  # Qwen3-VL: its DeepStack features too
    extra = vlm.adapter.injection_inputs(injections) if injections else {}
    extra.update(vlm.adapter.lm_extra_inputs(batch.inputs))  # Gemma 4: the per-layer embeddings' ids
    minimum = torch.finfo(torch.float32).min
    if family.name.startswith("gemma4"):
        masks = gemma4_masks(
            config=reference.config.get_text_config(),
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            **no_kv_cache(gemma4_masks),
            position_ids=batch.position_ids,
            block_sequence_ids=gemma4_blocks(batch.inputs["mm_token_type_ids"], device=embeds.device),
        )
        mask = {name: m.masked_fill(blocked[:, None], minimum) for name, m in masks.items()}
    elif family.name == "gemma3":
        masks = create_masks_for_vision_model(
            config=reference.config.get_text_config(),
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            **no_kv_cache(create_masks_for_vision_model),  # its name changed in transformers 5.24
            position_ids=batch.position_ids,
            block_sequence_ids=get_block_sequence_ids_for_mask(batch.inputs["token_type_ids"]),
        )
        mask = {name: m.masked_fill(blocked[:, None], minimum) for name, m in masks.items()}
    elif family.name.startswith("paligemma"):  # HF's prefix-LM masks (PaliGemma 2: full and sliding)
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = reference.config.get_text_config()
        kwargs = dict(
            config=config,
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            **no_kv_cache(create_masks_for_vision_model),  # its name changed in transformers 5.24
            position_ids=batch.position_ids,
            block_sequence_ids=torch.where(batch.inputs["token_type_ids"] == 0, 0, -1),
        )
        mask = create_causal_mask(**kwargs).masked_fill(blocked[:, None], minimum)
        if getattr(config, "sliding_window", None) is not None:
            sliding = create_sliding_window_causal_mask(**kwargs).masked_fill(blocked[:, None], minimum)
            mask = {"full_attention": mask, "sliding_attention": sliding}
    else:
        allowed = allowed_pairs_naive(family, batch) & ~blocked
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, minimum)[:, None]
        kinds = getattr(reference.config.get_text_config(), "layer_types", None) or ()
        mixers = [kind for kind in ("linear_attention", "conv") if kind in kinds]
        if mixers:  # Qwen3.5, LFM2: HF zeroes the masked positions before these layers
            kept = batch.attention_mask.bool() & (~removed if removed is not None else True)
            mask = {"full_attention": mask, **{kind: kept.long() for kind in mixers}}
        if "chunked_attention" in kinds:  # Llama 4: its RoPE layers read their own chunk only
            chunked = allowed_pairs_naive(family, batch, kinds.index("chunked_attention")) & ~blocked
            chunked = torch.zeros(chunked.shape).masked_fill(~chunked, minimum)[:, None]
            mask = {"full_attention": mask, "chunked_attention": chunked}
        if "sliding_attention" in kinds:  # Cohere 2 (Aya Vision): its RoPE layers see a window of keys
            window = allowed_pairs_naive(family, batch, kinds.index("sliding_attention")) & ~blocked
            window = torch.zeros(window.shape).masked_fill(~window, minimum)[:, None]
            mask = {"full_attention": mask, "sliding_attention": window}
    decoder, lm_head = hf_text_parts(reference)
    hidden = decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, **extra
    ).last_hidden_state
    logits = lm_head(hidden)
    cap = getattr(reference.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap  # as HF's forward (Gemma 2)


# ---------------------------------------------------------------- lenses
def test_contextualization_matches_naive(new_family):
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    assert len(set(batch.image_mask.sum(-1).tolist())) > 1 or new_family.name in FIXED_IMAGE_TOKENS
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: "resid" in n)
    per_item = contextualization_from_cache(cache, batch.image_mask, batch.text_mask).per_item()
    streamed = collect(vlm, batch, analyses=("contextualization",)).contextualization.per_item()
    for layer, name in [(0, "blocks.0.hook_resid_pre"), (2, "blocks.1.hook_resid_post")]:
        h = cache[name]
        for group, (a, b) in {
            "intra_image": (batch.image_mask, batch.image_mask),
            "intra_text": (batch.text_mask, batch.text_mask),
            "inter": (batch.image_mask, batch.text_mask),
        }.items():
            expected = naive_pair_mean(h, a, b)
            assert close(per_item[group][layer], expected, rel=1e-4), group
            assert close(streamed[group][layer], expected, rel=1e-4), group


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_norm_based_attention_matches_naive(new_family, padding_side):
    """Block means over the pairs the family's mask allows (Gemma 3: image blocks both ways),
    saliency of each item's own image tokens, and verbalization per item."""
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    streamed = collect(vlm, batch, verbalize_images=True)
    logits, cache = vlm.run_with_cache(batch)
    counts = batch.image_mask.sum(-1).tolist()
    for layer in range(vlm.cfg.n_layers):
        if layer not in vlm.adapter.attention_layers:  # Qwen3.5's linear attention: no pattern, no lens
            assert f"blocks.{layer}.attn.hook_pattern" not in cache
            for pair in modality_pairs(batch):
                assert torch.isnan(streamed.attention.norm[pair][layer]).all()
                assert torch.isnan(streamed.attention.weight[pair][layer]).all()
            assert torch.isnan(streamed.attention.image_saliency_from_last[layer]).all()
            continue
        allowed = allowed_pairs_naive(new_family, batch, layer)
        naive_head, naive_summed = naive_norms(  # values: Gemma 4's normed, shared ones
            cache["pattern", layer],
            cache[vlm.adapter.value_hooks()[layer]],
            attention_w_o(vlm.blocks[layer].attn),
        )
        weights = cache["pattern", layer].double().mean(1)
        for pair, (queries, keys) in modality_pairs(batch).items():
            block = queries[:, :, None] & keys[:, None, :] & allowed
            expected = torch.stack([naive_summed[b][block[b]].mean() for b in range(len(batch))])
            assert close(streamed.attention.norm[pair][layer], expected, rel=1e-4), (layer, pair)
            expected_weight = torch.stack([weights[b][block[b]].mean() for b in range(len(batch))])
            assert close(streamed.attention.weight[pair][layer], expected_weight, rel=1e-4), (layer, pair)
        from_last = naive_summed[torch.arange(len(batch)), batch.last_positions]  # [batch, key]
        for b, n in enumerate(counts):
            saliency = streamed.attention.image_saliency_from_last[layer, b]
            assert close(saliency[:n], from_last[b][batch.image_mask[b]], rel=1e-4)
            assert torch.isnan(saliency[n:]).all()
    # The top logit-lens token of each of an item's image positions; -1 past its own. At the last
    # layer the lens decodes what the final norm reads: the model's own logits (Gemma 3n: the
    # average of its four streams, not resid_post)
    top1 = logits.argmax(-1)
    for b, n in enumerate(counts):
        assert torch.equal(streamed.image_verbalization[-1, b, :n], top1[b][batch.image_mask[b]])
        assert (streamed.image_verbalization[-1, b, n:] == -1).all()


def test_bidirectional_image_blocks_are_counted(new_family):
    """Gemma 3's image tokens read later image tokens of their image: image<-image averages over more
    pairs than the causal half, and the pattern puts weight there."""
    if new_family.name != "gemma3":
        pytest.skip("only Gemma 3's image blocks are bidirectional")
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    _, cache = vlm.run_with_cache(batch, names_filter="blocks.1.attn.hook_pattern")
    image = batch.image_mask
    later = (
        image[:, :, None]
        & image[:, None, :]
        & ~torch.ones_like(cache["pattern", 1][0, 0], dtype=torch.bool).tril()
    )
    assert cache["pattern", 1].sum(1)[later].min() > 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_fused_and_pattern_paths_agree(new_family, padding_side):
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    fused = collect(vlm, batch, attention="fused")
    pattern = collect(vlm, batch, attention="pattern")
    for pair, value in pattern.attention.norm.items():
        assert close(fused.attention.norm[pair], value, rel=1e-5), pair
        assert close(fused.attention.weight[pair], pattern.attention.weight[pair], rel=1e-5), pair


def test_use_sdpa_keeps_the_logits(new_family):
    """HF sdpa with the family's own mask (the causal shortcut only where it is causal)."""
    vlm = new_family.vlm
    for side in ("left", "right"):
        batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
        single = vlm.prepare(family_images()[:1], PROMPTS[:1])  # no padding: the shortcut's case
        for b in (batch, single):
            reference = vlm(b)
            vlm.use_sdpa = True
            try:
                fused = vlm(b)
            finally:
                vlm.use_sdpa = False
            real = b.attention_mask.bool()
            assert (fused - reference)[real].abs().max() <= 1e-4


# ---------------------------------------------------------------- interventions
def test_knockout_matches_hf_with_the_family_mask(new_family):
    """Knockout composes with the family's mask: Gemma 3's bidirectional image blocks and sliding
    windows stay, minus the blocked edges (image -> image included)."""
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    real = batch.attention_mask.bool()
    for edges in ([("image", "text"), ("image", "last")], [("image", "image")]):
        with knockout(vlm, batch, edges=edges):
            ours = vlm(batch)
        expected = hf_logits_with_blocked(new_family, batch, blocked_edges(batch, edges))
        assert (ours - expected)[real].abs().max() <= TOL, edges
        assert (ours - vlm(batch))[real].abs().max() > 1e-4, "the knockout must change something"


def test_pruning_every_image_token_matches_hf(new_family):
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    keep_none = select_image_tokens(vlm, batch, 0, "first", layer=0)
    with prune(vlm, batch, keep_none, from_layer=0):
        pruned = vlm(batch)
    blocked = batch.image_mask[:, None, :].expand(-1, batch.input_ids.shape[1], -1)
    real = batch.attention_mask.bool()
    expected = hf_logits_with_blocked(new_family, batch, blocked, removed=batch.image_mask)
    assert (pruned - expected)[real].abs().max() <= TOL
    # saliency read at the layer before the pruning starts, which must have an attention pattern
    keep = select_image_tokens(vlm, batch, 5, "norm", layer=1 + min(vlm.adapter.attention_layers))
    assert (keep.sum(-1) == 5).all() and not (keep & ~batch.image_mask).any()


def test_patching_everything_reproduces_the_source(new_family):
    vlm = new_family.vlm
    source = vlm.prepare(family_images(seed=1), PROMPTS)
    target = vlm.prepare(family_images(seed=2), PROMPTS)
    assert torch.equal(source.image_mask, target.image_mask)
    everything = source.attention_mask.bool()
    source_logits, source_cache = vlm.run_with_cache(source)
    # the whole stream, once every visual input has entered it (Qwen3-VL adds DeepStack features
    # after its first layers: a patch before them is partly overwritten by the target's own image)
    name = f"blocks.{max(vlm.adapter.injection_layers, default=0) + 1}.hook_resid_pre"
    # Gemma 4: the image also enters every layer through its per-layer input (a projection of the
    # input embeddings): patched too
    names = [name, *(n for n in source_cache.keys() if n.endswith("hook_per_layer_input"))]
    hooks = [(n, patch_hook(source_cache[n], everything)) for n in names]
    if getattr(vlm.adapter.text_config, "altup_num_inputs", None):  # Gemma 3n: all four AltUp streams
        stack = source_cache[name.replace("hook_resid_pre", "hook_in")]  # [streams, batch, pos, d_model]
        hooks[0] = (
            name.replace("hook_resid_pre", "hook_in"),
            lambda x, hook: torch.where(everything[..., None], stack, x),
        )
    with vlm.hooks(fwd_hooks=hooks):
        patched = vlm(target)
    assert (patched - source_logits)[everything].abs().max() <= TOL
    assert (vlm(target) - source_logits)[everything].abs().max() > 1e-3
