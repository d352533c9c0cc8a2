"""Qwen3.5's hybrid language model: Gated DeltaNet layers with no attention pattern between gated
softmax-attention layers. What only this family has: which layers have a pattern, what the lenses
and the collector say about the others, that the linear layers' padding is HF's (zeroed), and that
generation keeps their recurrent state (left-padded, as HF's)."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.analysis import collect
from hooked_vllm.errors import GenerationArgumentError, LayerError
from hooked_vllm.interventions import select_image_tokens
from tests.conftest import Family, family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
NEVER = -1


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory) -> Family:
    return Family("qwen3_5", tmp_path_factory.mktemp("qwen3-5"))


def test_layers_with_and_without_an_attention_pattern(qwen3_5):
    vlm = qwen3_5.vlm
    config = qwen3_5.reference.config.text_config
    assert config.layer_types == ["linear_attention", "full_attention"] * 2
    assert vlm.adapter.attention_layers == (1, 3)
    assert vlm.adapter.decodes_left_padded
    names = vlm.hook_dict
    for layer in range(vlm.cfg.n_layers):
        has_attention = layer in vlm.adapter.attention_layers
        assert (f"blocks.{layer}.attn.hook_pattern" in names) == has_attention
        assert (f"blocks.{layer}.linear_attn.hook_out" in names) == (not has_attention)
        # every layer has a residual stream, an MLP and its token mixer's output
        assert f"blocks.{layer}.hook_resid_mid" in names and f"blocks.{layer}.hook_mlp_out" in names


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_mask_is_the_image_pad_positions(qwen3_5, padding_side):
    vlm, config = qwen3_5.vlm, qwen3_5.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids = batch.input_ids
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    assert torch.equal(batch.image_mask, batch.inputs["mm_token_type_ids"] == 1)
    merge = config.vision_config.spatial_merge_size
    assert batch.image_mask.sum(-1).tolist() == (batch.inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert len(set(batch.image_mask.sum(-1).tolist())) > 1
    for token in (config.vision_start_token_id, config.vision_end_token_id):
        assert batch.special_mask[ids == token].all()
    assert batch.position_ids.dim() == 3  # M-RoPE


def test_linear_attention_sees_padding_as_zero_like_hf(qwen3_5):
    """HF multiplies the input of each linear-attention layer by the padding mask: the hooked
    layer does the same (so a left-padded item is its unpadded self), and without it the padding
    would run into the recurrence."""
    vlm = qwen3_5.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    padding = ~batch.attention_mask.bool()
    assert padding.any()
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("linear_attn.hook_in"))
    for layer in (0, 2):
        seen = cache[f"blocks.{layer}.linear_attn.hook_in"]
        assert (seen[padding] == 0).all() and (seen[~padding].abs().amax(-1) > 0).all()


def test_collector_names_the_layers_without_attention(qwen3_5):
    vlm = qwen3_5.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    result = collect(vlm, batch, verbalize_images=True)
    assert result.attention.attention_layers == (1, 3)
    for pair, norm in result.attention.norm.items():
        assert norm.shape[0] == vlm.cfg.n_layers
        assert torch.isnan(norm[[0, 2]]).all() and torch.isfinite(norm[[1, 3]]).all(), pair
    # the stream lenses cover every layer: the embedding and all 4 blocks
    inter = result.contextualization.per_item()["inter"]
    assert inter.shape[0] == vlm.cfg.n_layers + 1 and torch.isfinite(inter).all()
    assert result.image_verbalization.shape[0] == vlm.cfg.n_layers + 1


def test_token_selection_reads_the_last_layer_with_a_pattern(qwen3_5):
    vlm = qwen3_5.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    # pruning from layer 3 reads layer 2's pattern, which it has none of: layer 1's
    assert torch.equal(
        select_image_tokens(vlm, batch, 4, "norm", layer=3),
        select_image_tokens(vlm, batch, 4, "norm", layer=2),
    )
    with pytest.raises(LayerError, match="no layer before 1 has an attention pattern"):
        select_image_tokens(vlm, batch, 4, "norm", layer=1)


def test_right_padded_generation_is_left_padded_and_refused_with_hooks(qwen3_5):
    """The recurrent state runs over every position it is given: a right-padded item's padding would
    enter it. generate re-pads left (equal tokens), and refuses where hooks keyed to the batch's
    columns are in effect."""
    vlm = qwen3_5.vlm
    left = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    right = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    tokens = vlm.generate(left, 4, eos_token_id=NEVER)
    assert torch.equal(vlm.generate(right, 4, eos_token_id=NEVER), tokens)
    identity = [("blocks.0.hook_resid_post", lambda x, hook: x)]
    with vlm.hooks(fwd_hooks=identity):
        with pytest.raises(GenerationArgumentError, match="recurrent state"):
            vlm.generate(right, 2, eos_token_id=NEVER)


def test_report_names_the_layers_without_attention():
    from hooked_vllm.report import figures

    aggregates = {"n_layers": 4, "norm_attention": {"text<-image": {"mean": [None, 0.1, float("nan"), 0.2]}}}
    assert figures.layers_without_attention(aggregates) == [0, 2]
    assert (
        "no attention pattern at layers 0, 2"
        in figures.attention_by_pair(
            {**aggregates, "weight_attention": aggregates["norm_attention"]}
        ).layout.title.text
    )


def test_pruning_through_layers_without_attention_says_it_approximates_a_drop(qwen3_5, llava):
    """Zeroing pruned tokens before linear attention is close to dropping them, not equal (the state
    still decays at their steps): a warning says so where such layers follow ``from_layer``, and only
    there (none on LLaVA, none when nothing is pruned)."""
    import warnings

    from hooked_vllm.interventions import prune
    from hooked_vllm.interventions.pruning import PruningApproximationWarning

    vlm = qwen3_5.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    keep = select_image_tokens(vlm, batch, 4, "first")
    with pytest.warns(PruningApproximationWarning, match="linear_attn: blocks 2\\).*not equal"):
        with prune(vlm, batch, keep, from_layer=1):
            vlm(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningApproximationWarning)
        with prune(vlm, batch, batch.image_mask, from_layer=1):  # nothing pruned
            vlm(batch)
        other = llava.vlm
        llava_batch = other.prepare(family_images(), PROMPTS)
        with prune(other, llava_batch, select_image_tokens(other, llava_batch, 4, "first"), from_layer=1):
            other(llava_batch)
