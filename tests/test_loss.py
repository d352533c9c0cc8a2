"""TransformerLens's ``return_type`` ("logits", "loss", "both", None) and ``loss_per_token`` against HF's
own loss given the same ``labels=``, on LLaVA, InstructBLIP, Qwen2-VL and Gemma 3, batches of three
items of different lengths padded on either side, and on text alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooked_vllm.errors import HookedVLMError, ReturnTypeError
from tests.conftest import INSTRUCTIONS, Family, hf_forward_inputs, random_images

TOL = 1e-5
FAMILIES = ["llava", "instructblip", "qwen2_vl", "gemma3"]
PROMPTS = ["a red circle", "what colour is the big square in the picture"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def expected_labels(fam: Family, batch) -> torch.Tensor:
    """HF's labels, written here from HF's config: input_ids, -100 at padding, at the image token and
    at each item's first text token (and wherever the previous column is padding)."""
    ids, real = batch.input_ids, batch.attention_mask.bool()
    text = real & (ids != fam.reference.config.image_token_id)
    targets = text & F.pad(real[:, :-1], (1, 0), value=False)
    for row in range(len(ids)):
        targets[row, text[row].nonzero()[0, 0]] = False
    return ids.masked_fill(~targets, -100)


def hf_loss(fam: Family, batch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's mean loss with ``labels=``, its logits, and its per-token losses ``[batch, pos - 1]``."""
    out = fam.reference(**hf_forward_inputs(fam, batch), labels=labels)
    per_token = F.cross_entropy(
        out.logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    return out.loss, out.logits, per_token


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loss_equals_hf_loss_with_the_same_labels(fam, padding_side):
    vlm = fam.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS, padding_side=padding_side)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    labels = expected_labels(fam, batch)
    assert torch.equal(vlm.loss_labels(batch), labels)
    assert (labels != -100).sum() > 10 and (labels[batch.image_mask] == -100).all()
    theirs, hf_logits, hf_per_token = hf_loss(fam, batch, labels)

    loss = vlm(batch, return_type="loss")
    assert loss.shape == () and (loss - theirs).abs() <= TOL
    logits, both_loss = vlm(batch, return_type="both")
    assert torch.equal(both_loss, loss) and torch.equal(logits, vlm(batch))
    real = batch.attention_mask.bool()
    assert (logits - hf_logits)[real].abs().max() <= TOL
    per_token = vlm(batch, return_type="loss", loss_per_token=True)
    assert per_token.shape == (len(batch), batch.input_ids.shape[1] - 1)
    assert (per_token - hf_per_token).abs().max() <= TOL
    assert (per_token[labels[:, 1:] == -100] == 0).all()
    assert (per_token.sum() / (labels[:, 1:] != -100).sum() - loss).abs() <= 1e-6
    assert vlm(batch, return_type=None) is None


def test_the_loss_does_not_depend_on_the_padding_side(fam):
    vlm = fam.vlm
    losses = {
        side: vlm(vlm.prepare(random_images(3), INSTRUCTIONS, padding_side=side), "loss", True)
        for side in ("left", "right")
    }
    for left, right in zip(losses["left"], losses["right"]):  # each item's targets, in order
        assert left.count_nonzero() == right.count_nonzero() > 0
        assert (left[left != 0] - right[right != 0]).abs().max() <= TOL


def test_explicit_labels_score_only_them_as_hf_does(fam):
    """``labels=`` as HF takes them: here every other text token."""
    vlm = fam.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS, padding_side="right")
    labels = expected_labels(fam, batch)
    labels[:, ::2] = -100
    theirs, _, _ = hf_loss(fam, batch, labels)
    ours = vlm(batch, return_type="loss", labels=labels)
    assert (ours - theirs).abs() <= TOL
    assert (ours - vlm(batch, return_type="loss")).abs() > 1e-3, "the labels must change the loss"


def test_text_loss_equals_hf_on_the_same_tokens(fam):
    """Strings, as TransformerLens takes them: one (HF's labels=input_ids) and a padded list."""
    vlm = fam.vlm
    one = vlm.to_tokens(PROMPTS[1])
    theirs = fam.reference(input_ids=one, labels=one) if fam.name != "instructblip" else None
    if theirs is None:  # InstructBLIP's HF model wants images: its language model alone
        theirs = fam.reference.language_model(input_ids=one, labels=one)
    assert (vlm(PROMPTS[1], return_type="loss") - theirs.loss).abs() <= TOL

    batch = vlm.to_batch(PROMPTS)
    assert batch.attention_mask.min() == 0, "the two prompts must pad"
    labels = expected_labels(fam, batch)
    inputs = hf_forward_inputs(fam, batch)
    lm = fam.reference.language_model if fam.name == "instructblip" else fam.reference
    theirs = lm(**inputs, labels=labels).loss
    assert (vlm(PROMPTS, return_type="loss") - theirs).abs() <= TOL


def test_run_with_cache_and_run_with_hooks_pass_return_type_through(fam):
    vlm = fam.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS)
    theirs, _, hf_per_token = hf_loss(fam, batch, expected_labels(fam, batch))
    loss, cache = vlm.run_with_cache(batch, names_filter="blocks.0.hook_resid_post", return_type="loss")
    assert (loss - theirs).abs() <= TOL and "blocks.0.hook_resid_post" in cache
    per_token = vlm.run_with_hooks(batch, return_type="loss", loss_per_token=True)
    assert (per_token - hf_per_token).abs().max() <= TOL
    zeroed = vlm.run_with_hooks(
        batch, fwd_hooks=[("hook_visual_prefix", lambda x, hook: 0 * x)], return_type="loss"
    )
    assert (zeroed - theirs).abs() > 1e-4, "a hook changes the loss"


def test_an_unknown_return_type_is_refused_in_one_line(fam):
    vlm = fam.vlm
    for call in (
        lambda: vlm("a red circle", return_type="logit"),
        lambda: vlm.run_with_cache("a red circle", return_type="losses"),
        lambda: vlm.run_with_hooks("a red circle", return_type="predictions"),
    ):
        with pytest.raises(ReturnTypeError, match="'logits', 'loss', 'both' or None") as error:
            call()
        assert isinstance(error.value, HookedVLMError) and "\n" not in str(error.value)
