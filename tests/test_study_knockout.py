"""Study 1, attention knockout windows, against an independent reference: the untouched HF model with
forward pre-hooks on its decoder layers' attention that remove the blocked edges from the mask each
layer receives (in the knocked-out window only), the answer's probability read at the last real
position found by hand. Mask kinds: LLaVA causal; Gemma 3's bidirectional image blocks and sliding
windows; PaliGemma's prefix-LM; Qwen2-VL's M-RoPE (3-D positions); Qwen3.5's hybrid stack (knockout
on its attention layers only, the linear-attention layers run unchanged); both padding sides. Then
the run store (resume, settings, shards), the aggregation by hand, and the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_vllm.cli import main
from hooked_vllm.errors import LayerError
from hooked_vllm.runs.datasets import DatasetSample
from hooked_vllm.runs.store import RunStoreError, SettingsMismatchError, StoreKindError
from hooked_vllm.studies import KnockoutParams, KnockoutStudy, get_study, run_study
from hooked_vllm.studies.base import default_settings, open_study_store
from hooked_vllm.studies.knockout import knockout_windows, window_size
from tests.conftest import Family, family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["llava", "gemma3", "paligemma", "qwen2_vl", "qwen3_5"])
def masked_family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(f"study-{request.param}"))


def by_hand_groups(family: Family, batch, side: str) -> dict[str, torch.Tensor]:
    """``[batch, pos]`` masks of the groups, from the token ids and the attention mask (the question
    span is the batch's instruction span: where the user's words are is the prompt template's fact)."""
    config = family.reference.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    ids, real = batch.input_ids, batch.attention_mask.bool()
    n = ids.shape[1]
    last = torch.zeros_like(real)
    last_index = real.sum(1) - 1 if side == "right" else torch.full((len(ids),), n - 1)
    last[torch.arange(len(ids)), last_index] = True
    return {"image": (ids == image_id) & real, "question": batch.mask("text"), "last": last, "at": last_index}


def reference_probabilities(family: Family, batch, groups, edge: str | None, layers, answer=None):
    """The untouched HF model's probability of ``answer`` (default: its own top-1) at the last real
    position, with ``edge`` removed from the attention mask of the decoder layers in ``layers`` that
    have one (a hybrid model's linear-attention layers, ``linear_attn``, have no edges to remove)."""
    hf = family.reference
    decoder = hf.model.language_model
    hooks = []
    if edge is not None:
        source, target = edge.split("->")
        blocked = groups[target][:, :, None] & groups[source][:, None, :]

        def pre_hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = mask.masked_fill(blocked[:, None], torch.finfo(mask.dtype).min)
            return args, kwargs

        hooks = [
            decoder.layers[i].self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
            for i in layers
            if hasattr(decoder.layers[i], "self_attn")
        ]
    try:
        logits = hf(**hf_forward_inputs(family, batch)).logits
    finally:
        for hook in hooks:
            hook.remove()
    last = logits[torch.arange(len(logits)), groups["at"]].float()
    answer = last.argmax(-1) if answer is None else answer
    return last.softmax(-1)[torch.arange(len(last)), answer], answer


@pytest.mark.parametrize("side", ["left", "right"])
def test_knockout_windows_equal_the_hf_reference(masked_family, side):
    vlm = masked_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
    groups = by_hand_groups(masked_family, batch, side)
    assert groups["question"].any(1).all() and not (groups["question"] & groups["image"]).any()
    items = [SimpleNamespace(meta={}) for _ in PROMPTS]  # no labels: the answer is the prediction
    study = KnockoutStudy(window=2, answer="prediction")
    rows = study.item_rows(vlm, items, batch)
    p_clean, answer = reference_probabilities(masked_family, batch, groups, None, [])
    assert [row["answer_token"] for row in rows] == answer.tolist()
    assert np.allclose([row["p_clean"] for row in rows], p_clean, atol=TOL, rtol=0)
    windows = knockout_windows(vlm.cfg.n_layers, 2)
    assert rows[0]["window_starts"] == [w.start for w in windows] and len(windows) == vlm.cfg.n_layers - 1
    changed = 0.0
    for edge in KnockoutParams().edges:
        for w, layers in enumerate(windows):
            expected, _ = reference_probabilities(masked_family, batch, groups, edge, layers, answer)
            ours = torch.tensor([row[f"p:{edge}"][w] for row in rows])
            assert (ours - expected).abs().max() <= TOL, (edge, list(layers))
            changed = max(changed, float(((ours - p_clean) / p_clean).abs().max()))
    assert changed > 1e-3, "some knockout must change the answer's probability (relative change)"


def test_the_default_window_is_the_papers_clipped_to_a_third_of_the_depth():
    assert window_size(32) == 9 and window_size(40) == 9 and window_size(6) == 2 and window_size(2) == 1
    assert window_size(6, 6) == 6 and [w.start for w in knockout_windows(6)] == [0, 1, 2, 3, 4]
    with pytest.raises(LayerError, match="window of 7 layers does not fit this model's 6 blocks"):
        window_size(6, 7)
    with pytest.raises(ValueError, match="source->target"):
        KnockoutParams(edges=("image->answer",))


# ---------------------------------------------------------------- on the demo model: labels, the store
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


def test_the_answer_is_the_labels_token_and_the_aggregate_is_the_mean_relative_change(demo, sample, tmp_path):
    result = run_study(KnockoutStudy(), demo, fresh(sample), tmp_path / "run", batch_size=4, progress=False)
    rows = result.rows
    assert all(row["answer_from"] == "label" for row in rows)
    labels = {item.item_id: item.meta["answer"] for item in sample.items}
    assert all(row["answer"] == labels[row["item_id"]] for row in rows)
    counted = [row for row in rows if row["correct"]]
    aggregates = result.aggregates
    assert aggregates["n_items"] == len(counted) and aggregates["window"] == 2
    for edge, curve in aggregates["edges"].items():
        by_hand = np.mean(
            [[100 * (p - row["p_clean"]) / row["p_clean"] for p in row[f"p:{edge}"]] for row in counted],
            axis=0,
        )
        assert np.allclose(curve["mean"], by_hand, atol=1e-9)
    assert json.loads((tmp_path / "run" / "aggregates.json").read_text())["n_items"] == len(counted)
    report = KnockoutStudy().write_report(tmp_path / "run", aggregates, "demo")
    assert "Zhang" in report.read_text() and (tmp_path / "run" / "knockout.png").is_file()


def test_a_study_resumes_refuses_other_settings_and_shards_like_a_single_run(demo, sample, tmp_path):
    study = KnockoutStudy()
    whole = run_study(study, demo, fresh(sample), tmp_path / "whole", batch_size=2, progress=False)
    # interrupted after one batch, then resumed
    assert run_study(
        study, demo, fresh(sample), tmp_path / "resumed", batch_size=2, progress=False, max_batches=1
    )
    resumed = run_study(study, demo, fresh(sample), tmp_path / "resumed", batch_size=2, progress=False)
    assert resumed.n_resumed == 2 and resumed.aggregates == whole.aggregates
    # two ranks writing the same folder (as torchrun's would: rank 0 opens it first, then every rank
    # runs its share, rank 0 aggregating once the others are done)
    settings = {**default_settings(demo, fresh(sample)), **study.settings()}
    open_study_store(tmp_path / "sharded", 0, 1, settings).close()
    assert (
        run_study(study, demo, fresh(sample), tmp_path / "sharded", rank=1, world_size=2, progress=False)
        is None
    )
    sharded = run_study(
        study, demo, fresh(sample), tmp_path / "sharded", rank=0, world_size=2, progress=False
    )
    assert sharded.n_items == len(sample.items)
    assert json.dumps(sharded.aggregates, sort_keys=True) == json.dumps(whole.aggregates, sort_keys=True)
    with pytest.raises(SettingsMismatchError, match="window differ"):
        run_study(KnockoutStudy(window=3), demo, fresh(sample), tmp_path / "whole", progress=False)
    (tmp_path / "phases" / "items").mkdir(parents=True)
    (tmp_path / "phases" / "run.json").write_text(json.dumps({"kind": "phase-diagram results"}))
    with pytest.raises(StoreKindError, match="phase-diagram results store"):
        run_study(study, demo, fresh(sample), tmp_path / "phases", progress=False)


def test_the_store_refuses_doubled_item_ids(demo, sample, tmp_path):
    doubled = DatasetSample("shapes", [sample.items[0], sample.items[0]])
    with pytest.raises(RunStoreError, match="repeats item id"):
        run_study(KnockoutStudy(), demo, doubled, tmp_path / "run", progress=False)


def test_get_study_and_an_unknown_name():
    assert get_study("knockout") is KnockoutStudy
    with pytest.raises(KeyError, match="the studies are knockout"):
        get_study("nope")


# ---------------------------------------------------------------- the command line
def test_the_command_runs_resumes_and_says_bad_flags_in_one_line(tmp_path, capsys):
    out = tmp_path / "knockout"
    args = ["study", "knockout", "--out", str(out), "--num-items", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "question->last" in printed and "largest drop" in printed
    assert {"report.html", "aggregates.json", "knockout.png", "run.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "run.json").read_text())["kind"] == "study results"
    assert main(args) == 0 and "resumed: 4 of 4" in capsys.readouterr().out
    assert main([*args, "--window", "3"]) == 2
    assert "other settings (window differ)" in capsys.readouterr().err
    assert main(["study", "knockout", "--out", str(tmp_path / "x"), "--edges", "image->nowhere"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "source->target" in error
    assert main(["study", "knockout", "--out", str(tmp_path / "y"), "--window", "7", "--num-items", "2"]) == 2
    assert "does not fit this model's 6 blocks" in capsys.readouterr().err


def test_every_study_flag_has_a_meaning_and_its_default():
    import argparse

    from hooked_vllm.cli import build_parser

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = next(a for a in top.choices["study"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in names.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"study {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                assert "default" in action.help, f"study {name} {action.option_strings[0]} names no default"
