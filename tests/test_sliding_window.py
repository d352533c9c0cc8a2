"""A causal language model with sliding-window layers (Mistral-style, or a Qwen2 config with
``use_sliding_window``): the fast paths must keep the window, and the lenses count only the pairs a
layer can attend."""

from __future__ import annotations

import copy

import pytest
import torch

from hooked_vllm import HookedVLM
from hooked_vllm.analysis import collect, modality_pairs
from hooked_vllm.tiny_models import family_builders
from tests.conftest import family_images
from tests.test_analyses import close

WINDOW = 8


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """Tiny LLaVA-OneVision (Qwen2 backbone) rebuilt with every text layer sliding, window 8."""
    model, processor = family_builders()["llava_onevision"](directory=tmp_path_factory.mktemp("sliding"))
    config = copy.deepcopy(model.config)
    text = config.text_config
    text.use_sliding_window, text.sliding_window = True, WINDOW
    text.max_window_layers = 0
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    rebuilt = type(model)(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.set_attn_implementation("eager")
    reference = copy.deepcopy(rebuilt)
    return HookedVLM.from_hf(rebuilt, processor), reference


def test_the_window_is_kept_by_every_path(windowed):
    vlm, reference = windowed
    assert vlm.adapter.sliding_window == WINDOW and vlm.adapter.plain_causal
    batch = vlm.prepare(family_images()[2:], ["Describe the image please, in many words."])
    assert batch.input_ids.shape[1] > 4 * WINDOW and bool(batch.attention_mask.all())
    theirs = reference(**batch.inputs, position_ids=batch.position_ids).logits
    assert (vlm(batch) - theirs).abs().max() <= 1e-5
    vlm.use_sdpa = True  # no padding: the causal shortcut would drop the window
    try:
        assert (vlm(batch) - theirs).abs().max() <= 1e-4
    finally:
        vlm.use_sdpa = False


def test_lenses_count_only_the_pairs_in_the_window(windowed):
    vlm, _ = windowed
    batch = vlm.prepare(family_images()[2:], ["Describe the image please, in many words."])
    auto = collect(vlm, batch, analyses=("norm_attention",))
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    n = batch.input_ids.shape[1]
    columns = torch.arange(n)
    allowed = (columns[None, :] <= columns[:, None]) & (columns[None, :] > columns[:, None] - WINDOW)
    for layer in range(vlm.cfg.n_layers):
        weights = cache["pattern", layer].double().mean(1)[0]
        for pair, (queries, keys) in modality_pairs(batch).items():
            block = queries[0][:, None] & keys[0][None, :] & allowed
            expected = weights[block].mean() if block.any() else torch.tensor(float("nan"))
            assert close(auto.attention.weight[pair][layer], expected[None], rel=1e-5), (layer, pair)
    assert torch.isnan(auto.attention.weight["last<-image"]).all()  # the image lies outside the window
