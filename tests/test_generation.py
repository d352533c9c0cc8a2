"""Cached generation against greedy decoding without a cache, 40 tokens, both families.

``vlm.generate`` reuses the KV cache; the reference here reruns the full forward on the prompt plus
the tokens so far at every step and takes the argmax at each item's last real position. A KV cache
that is empty or ignored (transformers 5.24 with transformer-lens 4.3, see docs/DEPENDENCIES.md)
still gets the first few tokens right, since they depend mostly on the last prompt token, and goes
wrong after about six: hence 40 tokens, and a check that the reference does depend on the context.
"""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.model.batch import positions_from_mask
from tests.conftest import INSTRUCTIONS

NEW_TOKENS = 40
NEVER = -1  # an eos id that no token has, so that every item generates all NEW_TOKENS
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit of the reference: no argmax is a float-rounding tie


def greedy_without_cache(vlm, batch, n):
    """Greedy tokens [batch, n], each from a full forward over the prompt and the tokens so far, and
    each step's top-2 logit margin.

    The prompt is left-padded, so every item's last real position is the last column. It is
    embedded once as ``vlm.forward`` embeds it; generated tokens are embedded as text, as the
    decoding steps of ``generate`` (and of HF) embed them: a tiny random model can emit the image
    placeholder id, which in ``input_ids`` would ask for another image.
    """
    batch = batch.left_padded()
    prompt = vlm.embed(batch)
    prompt_mask = batch.attention_mask.to(prompt.device)
    tokens = prompt_mask.new_empty(len(batch), 0)
    margins = []
    for _ in range(n):
        mask = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
        logits = vlm.bridge(
            torch.cat([prompt, vlm.bridge.embed(tokens)], dim=1),
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
        )
        last = logits[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(margins, dim=1)


@pytest.fixture(scope="module")
def reference(family, images):
    """The no-cache greedy tokens of the 3-item padded batch (the same for either padding side)."""
    batch = family.vlm.prepare(images, INSTRUCTIONS)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    tokens, margins = greedy_without_cache(family.vlm, batch, NEW_TOKENS)
    assert margins.min() > MIN_MARGIN, "a near-tie in the reference: pick other prompts or images"
    return tokens


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_cached_generate_equals_greedy_without_cache(family, images, reference, padding_side):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    ours = vlm.generate(batch, max_new_tokens=NEW_TOKENS, eos_token_id=NEVER)
    assert ours.shape == (len(batch), NEW_TOKENS)
    for item, (mine, expected) in enumerate(zip(ours.tolist(), reference.tolist())):
        step = next((i for i, (a, b) in enumerate(zip(mine, expected)) if a != b), None)
        assert step is None, f"item {item} ({padding_side} padded) diverges at new token {step}"


def test_cached_generate_equals_hf_generate(family, images, reference):
    batch = family.vlm.prepare(images, INSTRUCTIONS)
    theirs = family.reference.generate(
        **batch.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=NEVER
    )
    assert torch.equal(theirs[:, batch.input_ids.shape[1] :], reference)


def test_reference_depends_on_the_context(family, images, reference):
    """Decoding that ignores the cache (each new token attends only to itself) must differ from
    the reference within NEW_TOKENS, or this file could not catch an empty cache."""
    vlm = family.vlm
    tokens = [reference[:, 0]]
    for _ in range(NEW_TOKENS - 1):
        tokens.append(vlm.bridge(tokens[-1][:, None])[:, -1].argmax(-1))
    context_free = torch.stack(tokens, dim=1)
    assert not torch.equal(context_free, reference)
