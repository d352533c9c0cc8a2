"""Study 3, object-token ablation and the logit lens at the object (Neo et al. 2024), against an
independent reference on the untouched HF model: the object's image positions found by hand (the
image-token ids in sequence order, row-major on the square grid, a cell an object token where its
rectangle overlaps the box, plus the buffer), the mean image token from the embeddings HF hands its
language model (a forward pre-hook), the ablation as a pre-hook replacing those embeddings, the answer
read at the last real position; the logit lens from HF's decoder-layer outputs through its final norm
and head. LLaVA (causal), Gemma 3 (bidirectional image blocks, sliding windows) and PaliGemma
(prefix-LM), both padding sides. Then the demo (the shapes dataset's boxes), the store, the command."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_vllm.cli import main
from hooked_vllm.runs.datasets import DatasetSample
from hooked_vllm.studies import ObjectAblationStudy, get_study, run_study
from hooked_vllm.studies.base import answer_token
from hooked_vllm.studies.object_ablation import ObjectAblationError, image_token_sum, random_positions
from hooked_vllm.studies.pruning import item_seed
from tests.conftest import Family, family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
OBJECTS = [
    {"name": "image", "colour": "square", "box": [0.1, 0.2, 0.45, 0.6]},
    {"name": "picture", "colour": "cat", "box": [0.62, 0.55, 0.95, 0.9]},
]
TOL = 1e-5


@pytest.fixture(scope="module", params=["llava", "gemma3", "paligemma"])
def masked_family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(f"objects-{request.param}"))


def by_hand_cells(box, side: int, buffer: int) -> set[int]:
    """Row-major grid cells whose rectangle overlaps ``box`` (fractions), dilated by ``buffer``."""
    x0, y0, x1, y1 = box
    hit = {
        r * side + c
        for r in range(side)
        for c in range(side)
        if max(x0, c / side) < min(x1, (c + 1) / side) and max(y0, r / side) < min(y1, (r + 1) / side)
    }
    for _ in range(buffer):
        hit |= {
            (r + dr) * side + c + dc
            for r, c in (divmod(k, side) for k in hit)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if 0 <= r + dr < side and 0 <= c + dc < side
        }
    return hit


def hf_run(family: Family, batch, replace: torch.Tensor | None = None, value=None, lens_k: int = 0):
    """HF's logits at every position, with the language model's input embeddings at ``replace``
    set to ``value``; with ``lens_k``, the logit lens's top-k per layer (embeddings, every block)."""
    hf = family.reference
    language = hf.model.language_model
    seen: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        seen.append(embeds)
        if replace is not None:
            kwargs["inputs_embeds"] = torch.where(replace[..., None], value.to(embeds.dtype), embeds)
        return args, kwargs

    def out_hook(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handles = [language.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if lens_k:
        handles += [layer.register_forward_hook(out_hook) for layer in language.layers]
    try:
        logits = hf(**hf_forward_inputs(family, batch), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    tops = [hf.lm_head(language.norm(h)).topk(lens_k, dim=-1).indices for h in seen] if lens_k else None
    return logits, seen[0], tops


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("ablation, buffer", [("mean", 0), ("zero", 1)])
def test_ablation_and_lens_equal_the_hf_reference(masked_family, side, ablation, buffer):
    vlm = masked_family.vlm
    tokenizer = vlm.tokenizer
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
    config = masked_family.reference.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    real = batch.attention_mask.bool()
    image = (batch.input_ids == image_id) & real
    last = real.sum(1) - 1 if side == "right" else torch.full((3,), real.shape[1] - 1)
    asked = [[0], [1], [0, 1]]
    items = [
        SimpleNamespace(item_id=f"item-{b}", meta={"objects": OBJECTS, "asked": asked[b]}) for b in range(3)
    ]
    # top-k a quarter of the vocabulary: the random tiny models' lens then hits the words often
    study = ObjectAblationStudy(
        ablation=ablation,
        buffer=buffer,
        answer="prediction",
        lens_words=("name", "colour"),
        top_k=vlm.cfg.d_vocab // 4,
    )
    # the mean image token, as plan computes it, against the embeddings HF hands its language model
    clean, embeds, tops = hf_run(masked_family, batch, lens_k=study.params.top_k)
    summed, count = image_token_sum(vlm, batch)
    by_hand = embeds[image].double().mean(0)
    assert count == int(image.sum()) and torch.allclose(summed / count, by_hand, atol=1e-6, rtol=0)
    study.set_mean(by_hand.float(), count)
    rows = study.item_rows(vlm, items, batch)

    answer = clean[torch.arange(3), last].argmax(-1)
    side_len = int(round(image[0].sum().item() ** 0.5))
    ablated = torch.zeros_like(image)
    control = torch.zeros_like(image)
    for b in range(3):
        where = image[b].nonzero().flatten()
        cells = set().union(*(by_hand_cells(OBJECTS[i]["box"], side_len, buffer) for i in asked[b]))
        ablated[b, where[sorted(cells)]] = True
        control[b] = random_positions(image[b], len(cells), item_seed(items[b], b, 0))
        assert rows[b]["n_ablated"] == len(cells) > 0 and rows[b]["n_random"] == len(cells)
    value = by_hand.float() if ablation == "mean" else torch.zeros(())
    changed = 0.0
    for name, mask in (("object", ablated), ("random", control)):
        logits, _, _ = hf_run(masked_family, batch, mask, value)
        probs = logits[torch.arange(3), last].float().softmax(-1)
        expected = probs[torch.arange(3), answer]
        ours = torch.tensor([row[f"p:{name}"] for row in rows])
        assert (ours - expected).abs().max() <= TOL, name
        assert [row[f"correct:{name}"] for row in rows] == (probs.argmax(-1) == answer).tolist()
        p_clean = torch.tensor([row["p_clean"] for row in rows])
        changed = max(changed, float(((ours - p_clean) / p_clean).abs().max()))
    assert changed > 1e-4, "the ablation must change the answer's probability"
    # the logit lens at the objects' own tokens (no buffer), and at the background's
    for field in ("name", "colour"):
        for b in range(3):
            where = image[b].nonzero().flatten()
            own = [where[sorted(by_hand_cells(OBJECTS[i]["box"], side_len, 0))] for i in asked[b]]
            every = set().union(*(by_hand_cells(o["box"], side_len, 0) for o in OBJECTS))
            background = where[[k for k in range(len(where)) if k not in every]]
            words = [answer_token(tokenizer, OBJECTS[i][field]) for i in asked[b]]
            for layer, top in enumerate(tops):
                hits = torch.cat([(top[b, pos] == word).any(-1) for pos, word in zip(own, words)])
                back = torch.cat([(top[b, background] == word).any(-1) for word in words])
                assert rows[b][f"lens:{field}"][layer] == pytest.approx(float(hits.float().mean()), abs=1e-12)
                assert rows[b][f"lens_background:{field}"][layer] == pytest.approx(
                    float(back.float().mean()), abs=1e-12
                )
    assert len(rows[0]["lens:name"]) == vlm.cfg.n_layers + 1
    assert any(0 < v < 1 for row in rows for v in row["lens:name"] + row["lens_background:colour"])


def test_items_without_boxes_are_refused_in_one_line(llava):
    batch = llava.vlm.prepare(family_images()[:1], ["cat"])
    study = ObjectAblationStudy(ablation="zero")
    with pytest.raises(ObjectAblationError, match="no objects with boxes"):
        study.item_rows(llava.vlm, [SimpleNamespace(item_id="x", meta={"answer": "cat"})], batch)
    assert get_study("object-ablation") is ObjectAblationStudy


# ---------------------------------------------------------------- on the demo model
@pytest.fixture(scope="module")
def demo():
    from hooked_vllm import HookedVLM

    return HookedVLM.from_pretrained("demo")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from hooked_vllm.runs.shapes_dataset import load_shapes

    return load_shapes(tmp_path_factory.mktemp("shapes"), n=8)


def fresh(sample) -> DatasetSample:
    return DatasetSample(sample.name, list(sample.items))


def test_on_the_demo_the_shapes_cells_are_ablated_and_the_run_resumes(demo, sample, tmp_path):
    from hooked_vllm.demo import shapes

    study = ObjectAblationStudy()
    whole = run_study(study, demo, fresh(sample), tmp_path / "whole", batch_size=4, progress=False)
    rows, aggregates = whole.rows, whole.aggregates
    # each shape lies in one grid cell: as many tokens ablated as objects asked about
    assert [r["n_ablated"] for r in rows] == [len(i.meta["asked"]) for i in sample.items]
    assert rows[0]["mean_count"] == shapes.GRID**2 * len(sample.items)
    right = [r for r in rows if r["correct"]]
    for name in ("object", "random"):
        assert aggregates["all"][f"turned_wrong:{name}"] == np.mean([not r[f"correct:{name}"] for r in right])
    assert aggregates["lens"]["name"]["object"] == pytest.approx(
        np.nanmean([r["lens:name"] for r in rows], 0).tolist()
    )
    assert run_study(
        study, demo, fresh(sample), tmp_path / "resumed", batch_size=4, progress=False, max_batches=1
    )
    resumed = run_study(study, demo, fresh(sample), tmp_path / "resumed", batch_size=4, progress=False)
    assert resumed.n_resumed == 4 and resumed.aggregates == aggregates
    report = study.write_report(tmp_path / "whole", aggregates, "demo")
    assert "Neo" in report.read_text() and (tmp_path / "whole" / "object-lens.png").is_file()


def test_the_command_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "objects"
    args = ["study", "object-ablation", "--out", str(out), "--num-items", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "turned wrong" in printed and "logit lens" in printed
    assert {"report.html", "aggregates.json", "object-ablation.png", "object-lens.png"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "aggregates.json").read_text())["params"]["ablation"] == "mean"
    assert main(args) == 0 and "resumed: 4 of 4" in capsys.readouterr().out
    assert main([*args, "--buffer", "1"]) == 2 and "buffer differ" in capsys.readouterr().err
    assert (
        main(
            [
                "study",
                "object-ablation",
                "--out",
                str(tmp_path / "x"),
                "--dataset",
                "samples",
                "--num-items",
                "1",
            ]
        )
        == 2
    )
    assert "no objects with boxes" in capsys.readouterr().err
