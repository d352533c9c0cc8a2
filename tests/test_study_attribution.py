"""Attribution patching (the core of study 4): equal to the gradient product computed by hand on the
untouched HF model (a leaf put in at each decoder layer's input by a forward pre-hook, one backward
per layer; 1e-5), both padding sides; and on the demo model, correlated with real activation
patching (the number is printed and asserted above a floor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vllm.studies.attribution import activation_patching, attribution_patching
from tests.conftest import INSTRUCTIONS, hf_forward_inputs, random_images

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
