"""One layer convention (TransformerLens's block indices), and layers the model lacks refused in one line
by every intervention and figure that takes a layer."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.analysis import collect
from hooked_vllm.errors import HookedVLMError, LayerError
from hooked_vllm.interventions import knockout, knockout_sweep, patch_by_modality, prune, select_image_tokens
from hooked_vllm.interventions.metrics import last_logits
from hooked_vllm.model.layers import check_blocks, check_stream_layer
from hooked_vllm.report import viz
from tests.conftest import INSTRUCTIONS, random_images


def _one_line(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, HookedVLMError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_check_blocks_names_the_missing_layers_and_the_ones_there_are():
    assert check_blocks(6, range(6), "x") == list(range(6))
    with pytest.raises(LayerError) as info:
        check_blocks(6, [*range(10, 20), 3, -1], "knockout")
    _one_line(info, "no layers -1, 10-19", "6 blocks are layers 0-5")
    assert check_stream_layer(6, 6, "lens") == 6  # the final stream
    with pytest.raises(LayerError, match="layers 0 .the embedding. to 6"):
        check_stream_layer(6, 7, "lens")


def test_the_convention_matches_transformer_lens_and_hf(llava):
    """Stream layer l is blocks.{l}.hook_resid_pre, TL's accumulated_resid()[l] and HF's hidden_states[l];
    the collector's stream curves count that way, its attention curves by block."""
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    _, cache = vlm.run_with_cache(batch)
    stream = cache.accumulated_resid()
    hidden = llava.reference(**batch.inputs, position_ids=batch.position_ids, output_hidden_states=True)
    for layer in range(vlm.cfg.n_layers):
        assert torch.equal(stream[layer], cache[f"blocks.{layer}.hook_resid_pre"])
        torch.testing.assert_close(stream[layer], hidden.hidden_states[layer], rtol=0, atol=1e-5)
    result = collect(vlm, batch)
    assert result.lens.final_rank.shape[0] == vlm.cfg.n_layers + 1
    assert result.attention.image_saliency_from_last.shape[0] == vlm.cfg.n_layers


def test_interventions_refuse_layers_the_model_lacks(llava):
    vlm = llava.vlm  # 3 blocks
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    with pytest.raises(LayerError) as info:
        with knockout(vlm, batch, edges=[("image", "last")], layers=range(10, 20)):
            vlm(batch)
    _one_line(info, "knockout", "no layers 10-19", "3 blocks are layers 0-2")
    with pytest.raises(LayerError, match="window=5"):
        knockout_sweep(vlm, batch, [("image", "last")], lambda logits: last_logits(logits, batch)[:, 0], 5)
    with pytest.raises(LayerError) as info:
        select_image_tokens(vlm, batch, k=2, layer=3)
    _one_line(info, "select_image_tokens", "no layer 3")
    keep = select_image_tokens(vlm, batch, k=2, layer=2)
    with pytest.raises(LayerError) as info:
        with prune(vlm, batch, keep, from_layer=7):
            vlm(batch)
    _one_line(info, "prune", "no layer 7")
    with pytest.raises(LayerError) as info:
        patch_by_modality(vlm, batch, batch, lambda logits: logits[:, -1, 0], layers=[0, 5])
    _one_line(info, "patch_by_modality", "no layer 5")


def test_figures_refuse_layers_the_model_lacks(llava):
    vlm = llava.vlm
    images = random_images(1)
    batch = vlm.prepare(images, INSTRUCTIONS[:1])
    result = collect(vlm, batch, verbalize_images=True)
    _, cache = vlm.run_with_cache(batch)
    with pytest.raises(LayerError) as info:
        viz.show_saliency(vlm, batch, result, item=0, layer=3, image=images[0])
    _one_line(info, "no layer 3", "layers 0-2")
    viz.lens_token_grids(vlm, batch, result, item=0, layer=3)  # the final stream exists
    with pytest.raises(LayerError) as info:
        viz.show_lens_grid(vlm, batch, result, item=0, layer=4)
    _one_line(info, "no stream layer 4")
    with pytest.raises(LayerError) as info:
        viz.show_attention(vlm, cache, batch, item=0, layer=3)
    _one_line(info, "show_attention", "no layer 3")
    with pytest.raises(LayerError):
        viz.show_attention(None, cache, batch, item=0, layer=3)  # the cache knows its model


def test_the_csv_rows_give_block_ls_attention_at_layer_l(tmp_path):
    """aggregates.csv: row l holds the stream at layer l and block l's attention (none at layer L)."""
    import csv

    from hooked_vllm.runs.phase_diagram import GROUPS, write_aggregates

    n_blocks = 3
    curve = {k: [0.5] * (n_blocks + 1) for k in ("mean", "ci95", "adjusted_mean")} | {
        "n": [4] * (n_blocks + 1)
    }
    aggregates = {
        "n_layers": n_blocks,
        "contextualization": {group: curve for group in GROUPS},
        "norm_attention": {"last<-image": {"mean": [0.1, 0.2, 0.3]}},
    }
    write_aggregates(tmp_path, aggregates)
    rows = list(csv.DictReader((tmp_path / "aggregates.csv").open()))
    assert [row["norm_last<-image"] for row in rows] == ["0.1", "0.2", "0.3", ""]
