"""Study 2, visual-token pruning after layer K (FastV) with FEATHER's row diagnostic, against an
independent reference: the untouched HF model, block K-1's attention weights read from its eager
attention by a forward hook, FastV's selection by hand (heads averaged, the last real position's
row, the top round(n (1 - R)) image tokens), and the pruned tokens physically dropped from the
sequence at block K by forward pre-hooks on the decoder layers (hidden states, masks, rotary
embeddings and positions gathered), as FastV's non-inplace variant does. The answer's probability at
the last real position and the FLOPs counted from the token count each layer sees. Two mask kinds
(LLaVA causal; Gemma 3's bidirectional image blocks and sliding windows; PaliGemma's prefix-LM),
both padding sides. Then the grid rows by hand, the aggregation, the store and the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_vllm.cli import main
from hooked_vllm.errors import LayerError
from hooked_vllm.runs.datasets import DatasetSample
from hooked_vllm.studies import PruningParams, PruningStudy, get_study, run_study
from hooked_vllm.studies.pruning import kept_count, layer_flops
from tests.conftest import Family, family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["llava", "gemma3", "paligemma"])
def masked_family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(f"pruning-{request.param}"))


def image_and_last(family: Family, batch, side: str):
    config = family.reference.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    real = batch.attention_mask.bool()
    n = real.shape[1]
    last = real.sum(1) - 1 if side == "right" else torch.full((len(real),), n - 1)
    return (batch.input_ids == image_id) & real, last


def fastv_keep_by_hand(family: Family, batch, image, last, layer: int, ratio: float) -> torch.Tensor:
    """Block ``layer - 1``'s attention weights from HF's eager attention; FastV's top tokens."""
    decoder = family.reference.model.language_model
    got = {}

    def read(module, args, output) -> None:
        got["weights"] = output[1]

    handle = decoder.layers[layer - 1].self_attn.register_forward_hook(read)
    try:
        family.reference(**hf_forward_inputs(family, batch), use_cache=False)
    finally:
        handle.remove()
    weights = got["weights"].mean(1)  # [batch, query, key]
    keep = torch.zeros_like(image)
    for b in range(len(image)):
        where = image[b].nonzero().flatten()
        scores = weights[b, last[b], where]
        keep[b, where[scores.topk(round(len(where) * (1 - ratio))).indices]] = True
    return keep


def stride_keep_by_hand(image, ratio: float) -> torch.Tensor:
    keep = torch.zeros_like(image)
    for b in range(len(image)):
        where = image[b].nonzero().flatten().tolist()
        count = round(len(where) * (1 - ratio))
        for i in range(count):
            keep[b, where[i * len(where) // count]] = True
    return keep


def dropped_run(family: Family, batch, pruned: torch.Tensor, layer: int, last, answer):
    """HF with the ``pruned`` positions removed from the sequence at block ``layer``: the answer's
    probability at the last real position, and FastV's FLOPs from the tokens each block sees."""
    hf = family.reference
    decoder = hf.model.language_model
    n = pruned.shape[1]
    kept = [(~pruned[b]).nonzero().flatten() for b in range(len(pruned))]
    assert len({len(k) for k in kept}) == 1, "the reference drops as many tokens from every item"
    index = torch.stack(kept)  # [batch, kept]
    real = batch.attention_mask.bool()
    seen: list[torch.Tensor] = []
    number = {id(block): i for i, block in enumerate(decoder.layers)}

    def take(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [len(index)] + [1] * (tensor.dim() - 1)
        shape[dim] = index.shape[1]
        gather = index.view(shape).expand(
            *[s if i != dim else index.shape[1] for i, s in enumerate(tensor.shape)]
        )
        return tensor.gather(dim, gather.to(tensor.device))

    def pre_hook(module, args, kwargs):
        i = number[id(module)]
        hidden = args[0] if args else kwargs["hidden_states"]
        if i < layer:
            seen.append(real.sum(1))
            return args, kwargs
        if hidden.shape[1] == n:
            hidden = take(hidden, 1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] == n:
            kwargs["attention_mask"] = take(take(mask, 2), 3)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (take(cos, 1), take(sin, 1))
        if kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] == n:
            kwargs["position_ids"] = take(kwargs["position_ids"], 1)
        seen.append(take(real, 1).sum(1))
        args = (hidden, *args[1:]) if args else args
        if not args:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    hooks = [block.register_forward_pre_hook(pre_hook, with_kwargs=True) for block in decoder.layers]
    try:
        logits = hf(**hf_forward_inputs(family, batch), use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    at = torch.tensor([int((index[b] == last[b]).nonzero()) for b in range(len(index))])
    probs = logits[torch.arange(len(at)), at].float().softmax(-1)
    text = getattr(hf.config, "text_config", hf.config)
    d, m = text.hidden_size, text.intermediate_size
    flops = sum(4 * s.double() * d**2 + 2 * s.double() ** 2 * d + 2 * s.double() * d * m for s in seen)
    return probs[torch.arange(len(at)), answer], flops


@pytest.mark.parametrize("side", ["left", "right"])
def test_pruned_probabilities_and_flops_equal_the_hf_reference_with_tokens_dropped(masked_family, side):
    vlm = masked_family.vlm
    n_layers = vlm.cfg.n_layers
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
    image, last = image_and_last(masked_family, batch, side)
    assert (image == batch.image_mask).all()
    items = [SimpleNamespace(item_id=f"item-{b}", meta={}) for b in range(len(PROMPTS))]
    layers, ratios = (1, n_layers - 1), (0.5, 0.75)
    study = PruningStudy(layers=layers, ratios=ratios, baseline="stride", answer="prediction")
    rows = study.item_rows(vlm, items, batch)
    clean = masked_family.reference(**hf_forward_inputs(masked_family, batch), use_cache=False).logits
    clean = clean[torch.arange(len(last)), last].float()
    answer = clean.argmax(-1)
    assert [row["answer_token"] for row in rows] == answer.tolist()
    assert np.allclose([r["p_clean"] for r in rows], clean.softmax(-1)[torch.arange(3), answer], atol=TOL)
    changed = 0.0
    for i, (layer, ratio) in enumerate(study.settings_grid()):
        for criterion, keep in (
            ("fastv", fastv_keep_by_hand(masked_family, batch, image, last, layer, ratio)),
            ("stride", stride_keep_by_hand(image, ratio)),
        ):
            expected, flops = dropped_run(masked_family, batch, image & ~keep, layer, last, answer)
            ours = torch.tensor([row[f"p:{criterion}"][i] for row in rows])
            assert (ours - expected).abs().max() <= TOL, (criterion, layer, ratio)
            assert np.allclose([row["flops"][i] for row in rows], flops, rtol=1e-12, atol=0)
            kept_rows = [row[f"kept_rows:{criterion}"] for row in rows]
            side_len = int(round(image[0].sum().item() ** 0.5))
            for b in range(3):
                cells = keep[b, image[b]].view(side_len, side_len).sum(1).tolist()
                n_bins = rows[b]["row_bins"]
                assert kept_rows[b][i * n_bins : (i + 1) * n_bins] == cells
            p_clean = torch.tensor([r["p_clean"] for r in rows])
            changed = max(changed, float(((ours - p_clean) / p_clean).abs().max()))
    assert changed > 1e-4, "some pruning must change the answer's probability (relative change)"
    dense = [row["flops_dense"] for row in rows]
    assert np.allclose(
        dense,
        [
            n_layers * layer_flops(n, vlm.cfg.d_model, vlm.cfg.d_mlp)
            for n in batch.attention_mask.sum(1).tolist()
        ],
        rtol=1e-12,
    )


def test_fastv_defaults_the_kept_count_and_bad_parameters():
    assert 2 in PruningParams().layers and 0.5 in PruningParams().ratios
    assert PruningParams().received_from == "last" and PruningParams().baseline == "random"
    assert kept_count(576, 0.5) == 288 and kept_count(25, 0.5) == 12 and kept_count(16, 0.75) == 4
    with pytest.raises(ValueError, match="at least 1"):
        PruningParams(layers=(0, 2))
    with pytest.raises(ValueError, match="between 0 and 1"):
        PruningParams(ratios=(0.5, 1.0))
    assert get_study("pruning") is PruningStudy


# ---------------------------------------------------------------- on the demo model
@pytest.fixture(scope="module")
def demo():
    from hooked_vllm import HookedVLM

    return HookedVLM.from_pretrained("demo")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from hooked_vllm.runs.shapes_dataset import load_shapes

    return load_shapes(tmp_path_factory.mktemp("shapes"), n=6)


def fresh(sample) -> DatasetSample:
    return DatasetSample(sample.name, list(sample.items))


def test_the_aggregates_are_the_rows_by_hand_and_the_run_resumes(demo, sample, tmp_path):
    study = PruningStudy(layers=(1, 2), ratios=(0.5, 0.75))
    whole = run_study(study, demo, fresh(sample), tmp_path / "whole", batch_size=4, progress=False)
    rows, aggregates = whole.rows, whole.aggregates
    assert all(row["answer_from"] == "label" for row in rows)
    for i, setting in enumerate(aggregates["settings"]):
        for criterion in ("fastv", "random"):
            assert setting[criterion]["accuracy"] == np.mean([r[f"correct:{criterion}"][i] for r in rows])
            kept = np.sum([r[f"kept_rows:{criterion}"][4 * i : 4 * i + 4] for r in rows], 0)
            assert np.allclose(setting[criterion]["kept_per_row"], kept / (4 * len(rows)))  # 4 x 4 grid
        dense = sum(r["flops_dense"] for r in rows)
        assert setting["flops_reduction"] == pytest.approx(1 - sum(r["flops"][i] for r in rows) / dense)
    assert aggregates["settings"][2]["paper_setting"] and aggregates["row_bins"] == 4
    assert run_study(
        study, demo, fresh(sample), tmp_path / "resumed", batch_size=4, progress=False, max_batches=1
    )
    resumed = run_study(study, demo, fresh(sample), tmp_path / "resumed", batch_size=4, progress=False)
    assert resumed.n_resumed == 4 and resumed.aggregates == aggregates
    report = study.write_report(tmp_path / "whole", aggregates, "demo")
    assert "FastV" in report.read_text() and (tmp_path / "whole" / "pruning-rows.png").is_file()
    with pytest.raises(LayerError, match="not a block of this model's 6"):
        PruningStudy(layers=(6,)).check_layers(demo)


def test_the_command_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "pruning"
    args = [
        "study",
        "pruning",
        "--out",
        str(out),
        "--num-items",
        "4",
        "--no-progress",
        "--layers",
        "2",
        "--ratios",
        "0.5",
        "0.9",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "K=2 R=0.5" in printed and "FLOPs" in printed
    assert {"report.html", "aggregates.json", "pruning.png", "pruning-rows.png"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "aggregates.json").read_text())["params"]["ratios"] == [0.5, 0.9]
    assert main(args) == 0 and "resumed: 4 of 4" in capsys.readouterr().out
    assert main(["study", "pruning", "--out", str(tmp_path / "x"), "--ratios", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_papers_text_criterion_ranks_by_the_attention_every_real_position_gives(llava, side):
    """``received_from="all"``: the mean over real query rows of HF's head-averaged weights."""
    vlm, hf = llava.vlm, llava.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
    image, last = image_and_last(llava, batch, side)
    got = {}

    def read(module, args, output) -> None:
        got["weights"] = output[1]

    handle = hf.model.language_model.layers[0].self_attn.register_forward_hook(read)
    try:
        hf(**hf_forward_inputs(llava, batch), use_cache=False)
    finally:
        handle.remove()
    real = batch.attention_mask.float()
    received = (got["weights"].mean(1) * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)
    keep = torch.zeros_like(image)
    for b in range(3):
        where = image[b].nonzero().flatten()
        keep[b, where[received[b, where].topk(kept_count(len(where), 0.5)).indices]] = True
    items = [SimpleNamespace(item_id=f"item-{b}", meta={}) for b in range(3)]
    study = PruningStudy(
        layers=(1,), ratios=(0.5,), received_from="all", baseline="none", answer="prediction"
    )
    rows = study.item_rows(vlm, items, batch)
    answer = torch.tensor([row["answer_token"] for row in rows])
    expected, _ = dropped_run(llava, batch, image & ~keep, 1, last, answer)
    assert (torch.tensor([row["p:fastv"][0] for row in rows]) - expected).abs().max() <= TOL
    assert "p:none" not in rows[0] and study.criteria() == ["fastv"]


def test_an_items_random_draw_is_its_own_and_row_bins_bin_relative_heights(demo, sample):
    from hooked_vllm.model.images import load_image
    from hooked_vllm.studies.pruning import grid_bins

    items = sample.items[:3]
    batch = demo.prepare([load_image(i.image_path) for i in items], [i.instruction for i in items])
    alone = demo.prepare([load_image(items[1].image_path)], [items[1].instruction])
    study = PruningStudy(layers=(2,), ratios=(0.75,))
    together, single = study.item_rows(demo, items, batch), study.item_rows(demo, items[1:2], alone)
    assert together[1]["kept_rows:random"] == single[0]["kept_rows:random"]
    assert together[1]["p:random"] == pytest.approx(single[0]["p:random"], abs=1e-6)
    assert (
        together[0]["kept_rows:random"] != together[1]["kept_rows:random"]
        or together[0]["kept_rows:random"] != together[2]["kept_rows:random"]
    ), "items draw their own tokens"
    # the demo's 4 x 4 grid: rows 0-1 in bin 0, rows 2-3 in bin 1 (relative heights 1/8 .. 7/8)
    assert grid_bins(demo.to_batch(alone), 2)[0] == [2] + [0] * 8 + [1] * 8
    assert grid_bins(demo.to_batch(alone), None)[0] == [4] + [r for r in range(4) for _ in range(4)]
