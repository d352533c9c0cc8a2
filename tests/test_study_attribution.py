"""Attribution patching (study 4) against independent references on the untouched HF model.

The core: equal to the gradient product computed by hand (a leaf put in at each decoder layer's input
by a forward pre-hook, one backward per layer; 1e-5), both padding sides. The study's per-item
function on tiny LLaVA (causal mask) and Gemma 3 (bidirectional image blocks, sliding windows, sandwich
norms), both padding sides, every hook kind (resid_pre, attn_out, mlp_out, z per head): its partners,
its block x group estimates and drawn cells against the hand gradient products, its real patching
(per block and group, per cell) against the HF model with the clean activation put in by hand. On the
demo model: correlated with real activation patching (the number is printed and asserted above a
floor), the aggregation by hand, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.studies.attribution import activation_patching, attribution_patching
from tests.conftest import INSTRUCTIONS, Family, family_images, hf_forward_inputs, random_images

TOL = 1e-5


def last_logit_diff(batch, side, answer, other):
    """logit(answer) - logit(other) at each item's last real position (found by hand), summed."""
    last = batch.attention_mask.sum(1) - 1 if side == "right" else None

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = last if last is not None else torch.full((len(logits),), logits.shape[1] - 1)
        final = logits[torch.arange(len(logits)), at]
        return (final[:, answer] - final[:, other]).sum()

    return metric


def hand_gradient_products(family, clean, corrupt, metric) -> torch.Tensor:
    """``[layer, batch, pos]``: (clean - corrupt) . d metric / d corrupt at each decoder layer's input,
    on the untouched HF model, one backward per layer."""
    hf = family.reference
    decoder = hf.model.language_model
    with torch.no_grad():
        clean_states = hf(**hf_forward_inputs(family, clean), output_hidden_states=True).hidden_states
    products = []
    for layer in range(len(decoder.layers)):
        leaf = {}

        def pre_hook(module, args, kwargs, leaf=leaf):
            states = args[0] if args else kwargs["hidden_states"]
            leaf["x"] = states.detach().requires_grad_(True)
            if args:
                return (leaf["x"], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf["x"]}

        handle = decoder.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(
                    metric(hf(**hf_forward_inputs(family, corrupt)).logits), leaf["x"]
                )
        finally:
            handle.remove()
        products.append(((clean_states[layer] - leaf["x"].detach()) * gradient).sum(-1))
    return torch.stack(products)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attribution_patching_equals_the_gradient_product_by_hand(llava, side):
    vlm = llava.vlm
    clean = vlm.prepare(random_images(3, seed=1), INSTRUCTIONS, padding_side=side)
    corrupt = vlm.prepare(random_images(3, seed=2), INSTRUCTIONS, padding_side=side)
    metric = last_logit_diff(corrupt, side, answer=5, other=7)
    ours = attribution_patching(vlm, clean, corrupt, metric)
    expected = hand_gradient_products(llava, clean, corrupt, metric)
    real = corrupt.attention_mask.bool()
    assert ours.shape == (vlm.cfg.n_layers, 3, corrupt.input_ids.shape[1])
    assert (ours - expected)[:, real].abs().max() <= TOL
    assert ours[:, real].abs().max() > 1e-3, "the estimate must be non-trivial"
    assert all(p.requires_grad for p in vlm.hf_model.parameters())  # the weights are left as they were


def test_on_the_demo_the_estimate_correlates_with_real_activation_patching():
    from hooked_vllm import HookedVLM
    from hooked_vllm.demo import shapes

    vlm = HookedVLM.from_pretrained("demo")
    pool = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 31, n=40, kinds=("count",))
    two = next(ex for ex in pool if ex.answer == "two")
    one = next(ex for ex in pool if ex.answer == "one")
    clean = vlm.prepare([two.image], [two.question])
    corrupt = vlm.prepare([one.image], [one.question])
    answer, other = vlm.tokenizer.convert_tokens_to_ids("two"), vlm.tokenizer.convert_tokens_to_ids("one")

    def metric(logits):
        final = logits[:, -1]
        return (final[:, answer] - final[:, other]).sum()

    estimate = attribution_patching(vlm, clean, corrupt, metric)[:, 0]  # [layer, pos]
    effect = activation_patching(vlm, clean, corrupt, metric)
    correlation = float(np.corrcoef(estimate.flatten().numpy(), effect.flatten().numpy())[0, 1])
    print(f"demo, count question (clean 'two', corrupt 'one'): Pearson r = {correlation:.3f}")
    assert correlation > 0.5


# ---------------------------------------------------------------- the study against the untouched HF model
STUDY_KINDS = ("resid_pre", "attn_out", "mlp_out", "z")


def site_hook(layer, kind: str, change):
    """A hook on the untouched HF decoder layer ``layer`` whose activation at ``kind`` (as
    ``blocks.{l}.hook_{kind}`` names it: the layer's input; what its attention and its MLP add to the
    residual stream, after Gemma's post-norms; the attention's per-head mix before ``o_proj``) is
    replaced by ``change(activation)``."""
    if kind == "resid_pre":

        def pre_hook(module, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}

        return layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if kind == "z":
        return layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma's sandwich norms: what the stream adds
        norm = layer.post_attention_layernorm if kind == "attn_out" else layer.post_feedforward_layernorm
        return norm.register_forward_hook(lambda m, a, out: change(out))
    if kind == "attn_out":
        return layer.self_attn.register_forward_hook(lambda m, a, out: (change(out[0]), *out[1:]))
    return layer.mlp.register_forward_hook(lambda m, a, out: change(out))


def run_hf(family, batch, hooks):
    handles = [site_hook(*hook) for hook in hooks]
    try:
        return family.reference(**hf_forward_inputs(family, batch)).logits
    finally:
        for handle in handles:
            handle.remove()


def per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:2], n_heads, -1)


def hand_study(family, clean, corrupt, kind, answer, other, last, n_heads):
    """By hand on the untouched HF model: the clean activations, the corrupted ones and the metric's
    gradient at ``kind`` of each layer (one backward per layer), and ``patch(layer, where)``: the
    metric with the clean activation put in where ``where`` says (``[batch, pos(, head)]``)."""
    layers = family.reference.model.language_model.layers
    rows = torch.arange(len(last))

    def metric(logits):
        final = logits[rows, last].float()
        return final[rows, answer] - final[rows, other]

    clean_acts, corrupt_acts, grads = [], [], []
    for layer in layers:
        keep = {}
        run_hf(family, clean, [(layer, kind, lambda x, keep=keep: keep.setdefault("x", x))])
        clean_acts.append(keep["x"])
        leaf = {}

        def as_leaf(x, leaf=leaf):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(
                metric(run_hf(family, corrupt, [(layer, kind, as_leaf)])).sum(), leaf["x"]
            )
        corrupt_acts.append(leaf["x"].detach())
        grads.append(gradient)
    products = []
    for c, x, g in zip(clean_acts, corrupt_acts, grads):
        product = (c - x) * g
        products.append(per_head(product, n_heads).sum(-1) if kind == "z" else product.sum(-1))
    base = metric(run_hf(family, corrupt, []))

    def patch(layer: int, where: torch.Tensor) -> torch.Tensor:
        source = clean_acts[layer]

        def put(x):
            if kind == "z":
                shaped = per_head(x, n_heads)
                mask = where if where.dim() == 3 else where[:, :, None].expand(shaped.shape[:3])
                return torch.where(mask[..., None], per_head(source, n_heads), shaped).reshape(x.shape)
            return torch.where(where[..., None], source, x)

        return metric(run_hf(family, corrupt, [(layers[layer], kind, put)])) - base

    return torch.stack(products), patch


def pair_sample(tmp_path, family) -> tuple:
    """Three clean items (three instructions of different lengths) and, for each, a partner with the
    same instruction, another image of another size, and another answer."""
    from hooked_vllm.runs.datasets import DatasetItem, DatasetSample

    images = family_images(seed=3) + random_images(3, seed=4)
    answers = ["red", "blue"]
    items = []
    for i, image in enumerate(images):
        path = tmp_path / f"pair-{i}.png"
        image.save(path)
        items.append(DatasetItem(f"pair-{i}", path, INSTRUCTIONS[i % 3], {"answer": answers[i // 3]}))
    return DatasetSample("pairs", items), images


@pytest.fixture(scope="module", params=["llava", "gemma3"])
def two_masks(request, tmp_path_factory):

    return Family(request.param, tmp_path_factory.mktemp(f"attribution-{request.param}"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_study_equals_the_gradient_product_and_real_patching_by_hand(two_masks, side, tmp_path):
    from hooked_vllm.studies import AttributionStudy
    from hooked_vllm.studies.attribution_study import position_groups

    vlm = two_masks.vlm
    sample, images = pair_sample(tmp_path, two_masks)
    study = AttributionStudy(kinds=STUDY_KINDS, cells=4)
    study.plan(vlm, sample)
    assert [study.partners[f"pair-{i}"].item_id for i in range(3)] == ["pair-3", "pair-4", "pair-5"]
    clean_items = sample.items[:3]
    clean = vlm.prepare(images[:3], INSTRUCTIONS, padding_side=side)
    with torch.enable_grad():
        rows = study.item_rows(vlm, clean_items, clean)
    # the corrupted batch, by hand: the partners' images resized to their items' sizes
    corrupt = vlm.prepare(
        [images[3 + i].resize(images[i].size) for i in range(3)], INSTRUCTIONS, padding_side=side
    )
    real = clean.attention_mask.bool()
    last = real.sum(1) - 1 if side == "right" else torch.full((3,), real.shape[1] - 1)
    assert all(row["paired"] and row["answer"] != row["other"] for row in rows)
    answer = torch.tensor([row["answer_token"] for row in rows])
    other = torch.tensor([row["other_token"] for row in rows])
    groups = position_groups(clean, study.params.groups)
    assert torch.equal(groups.sum(0), real.long())  # disjoint, every real position once
    n_layers, n_heads = vlm.cfg.n_layers, vlm.cfg.n_heads
    worst = {}
    for kind in STUDY_KINDS:
        products, patch = hand_study(two_masks, clean, corrupt, kind, answer, other, last, n_heads)
        per_position = products.sum(-1) if kind == "z" else products
        by_group = torch.einsum("lbp,gbp->blg", per_position, groups.float())
        ours = torch.tensor([row[f"est:{kind}"] for row in rows]).reshape(by_group.shape)
        worst[f"est:{kind}"] = float((ours - by_group).abs().max())
        real_groups = torch.stack(
            [patch(layer, groups[g]) for layer in range(n_layers) for g in range(len(groups))], 1
        )  # [batch, layer*group]
        worst[f"real:{kind}"] = float(
            (torch.tensor([row[f"real:{kind}"] for row in rows]) - real_groups).abs().max()
        )
        for b, row in enumerate(rows):
            for j, (layer, position, head) in enumerate(
                zip(row[f"cell_layer:{kind}"], row[f"cell_pos:{kind}"], row[f"cell_head:{kind}"])
            ):
                cell = (b, position, head) if kind == "z" else (b, position)
                worst[f"cell est:{kind}"] = max(
                    worst.get(f"cell est:{kind}", 0.0),
                    abs(row[f"cell_est:{kind}"][j] - float(products[layer][cell])),
                )
                where = torch.zeros(products.shape[1:], dtype=torch.bool)
                where[cell] = True
                worst[f"cell real:{kind}"] = max(
                    worst.get(f"cell real:{kind}", 0.0),
                    abs(row[f"cell_real:{kind}"][j] - float(patch(layer, where)[b])),
                )
        if kind == "z":  # per head, every real position
            by_head = torch.einsum("lbph,bp->blh", products, real.float())
            ours = torch.tensor([row["est_head:z"] for row in rows]).reshape(by_head.shape)
            worst["est_head:z"] = float((ours - by_head).abs().max())
            heads = []
            for layer in range(n_layers):
                for head in range(n_heads):
                    where = torch.zeros(products.shape[1:], dtype=torch.bool)
                    where[:, :, head] = real
                    heads.append(patch(layer, where))
            ours = torch.tensor([row["real_head:z"] for row in rows])
            worst["real_head:z"] = float((ours - torch.stack(heads, 1)).abs().max())
        assert len(rows[0][f"cell_est:{kind}"]) == 4  # 1 per group, 4 groups
        assert by_group.abs().max() > 1e-3 and real_groups.abs().max() > 1e-3, kind
    print(two_masks.name, side, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= TOL, worst


# ---------------------------------------------------------------- on the demo: aggregation, pairs, command
@pytest.fixture(scope="module")
def demo():
    from hooked_vllm import HookedVLM

    return HookedVLM.from_pretrained("demo")


@pytest.fixture(scope="module")
def shapes_sample(tmp_path_factory):
    from hooked_vllm.runs.shapes_dataset import load_shapes

    return load_shapes(tmp_path_factory.mktemp("shapes"), n=10)


def test_ranks_average_ties_and_the_correlations_are_pearson_and_spearman():
    from hooked_vllm.studies.attribution import correlations, ranks

    assert ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = x**3  # monotone, not linear: Spearman 1, Pearson below 1
    result = correlations(x, y)
    assert result["spearman"] == pytest.approx(1.0) and result["pearson"] < 0.99 and result["n"] == 5
    assert correlations(x, np.ones(5))["pearson"] is None  # a constant side has no correlation


def test_on_the_demo_the_aggregates_are_the_rows_pooled_and_z_summed_over_heads_is_attn_out(
    demo, shapes_sample, tmp_path
):
    from hooked_vllm.runs.datasets import DatasetSample
    from hooked_vllm.studies import AttributionStudy, run_study
    from hooked_vllm.studies.attribution import ranks

    study = AttributionStudy(kinds=("attn_out", "z"), cells=8)
    result = run_study(
        study, demo, DatasetSample("shapes", list(shapes_sample.items)), tmp_path / "run", progress=False
    )
    rows, aggregates = result.rows, result.aggregates
    labels = {item.item_id: item.meta["answer"] for item in shapes_sample.items}
    paired = [row for row in rows if row["paired"]]
    assert paired and all(row["answer"] == labels[row["item_id"]] for row in paired)
    assert all(row["other"] == labels[row["partner"]] != row["answer"] for row in paired)
    counted = [row for row in paired if row["clean_correct"] and row["corrupt_correct"]]
    assert aggregates["n_items"] == len(counted) > 0
    for (
        row
    ) in paired:  # the head mix through W_O is the attention's output: the same patch, the same estimate
        assert np.allclose(row["real:z"], row["real:attn_out"], atol=1e-5)
        assert np.allclose(row["est:z"], row["est:attn_out"], atol=1e-4, rtol=1e-4)
    for kind in ("attn_out", "z"):
        est = np.concatenate([row[f"cell_est:{kind}"] for row in counted])
        real = np.concatenate([row[f"cell_real:{kind}"] for row in counted])
        cells = aggregates["kinds"][kind]["cells"]
        assert cells["n"] == len(est) and cells["pearson"] == pytest.approx(np.corrcoef(est, real)[0, 1])
        assert cells["spearman"] == pytest.approx(np.corrcoef(ranks(est), ranks(real))[0, 1])
        mean = np.mean([row[f"est:{kind}"] for row in counted], axis=0)
        assert np.allclose(np.ravel(aggregates["kinds"][kind]["estimate"]), mean)
    report = study.write_report(tmp_path / "run", aggregates, "demo")
    assert "Kramár" in report.read_text() and (tmp_path / "run" / "attribution-z.png").is_file()


def test_noise_pairs_compare_the_answer_with_the_noisy_runs_own_prediction(demo, shapes_sample):
    from hooked_vllm.interventions.metrics import last_logits
    from hooked_vllm.model.images import load_image
    from hooked_vllm.studies import AttributionStudy
    from hooked_vllm.studies.attribution_study import noisy

    items = shapes_sample.items[:4]
    images = [load_image(item.image_path) for item in items]
    study = AttributionStudy(pairs="noise", cells=4)
    with pytest.raises(HookedVLMError, match=r"call study.plan\(vlm, sample\) before item_rows"):
        study.item_rows(demo, items, demo.prepare(images, [i.instruction for i in items]))
    study.plan(demo, shapes_sample)
    with torch.enable_grad():
        rows = study.item_rows(demo, items, demo.prepare(images, [i.instruction for i in items]))
    noisy_batch = demo.prepare(
        [noisy(image, 96, item.item_id) for image, item in zip(images, items)], [i.instruction for i in items]
    )
    ranked = last_logits(demo(noisy_batch), noisy_batch)
    for b, row in enumerate(rows):
        ranked[b, row["answer_token"]] = -torch.inf
        assert row["paired"] and row["other_token"] == int(ranked[b].argmax())
    assert np.array_equal(np.asarray(noisy(images[0], 96, "x")), np.asarray(noisy(images[0], 96, "x")))


def test_the_command_runs_resumes_and_refuses_an_unknown_kind(tmp_path, capsys):
    from hooked_vllm.cli import main

    out = tmp_path / "attribution"
    args = ["study", "attribution", "--out", str(out), "--num-items", "6", "--cells", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "hook_resid_pre" in printed and "Pearson" in printed and "Spearman" in printed
    written = {p.name for p in out.iterdir()}
    assert {
        "report.html",
        "aggregates.json",
        "attribution-resid_pre.png",
        "attribution-scatter.png",
    } <= written
    assert main(args) == 0 and "resumed: 6 of 6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # argparse's own choices
        main(["study", "attribution", "--out", str(tmp_path / "x"), "--kinds", "resid_post"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "resid_pre" in error
