"""Next-token loss of a batch, as TransformerLens returns it and as HF computes it from ``labels=``.

The targets of a batch are its text: every real token but the image placeholders (whose input is the
visual prefix, not a token to predict) and each item's first text token (its BOS: no text precedes
it; InstructBLIP's query tokens come before it, and under left padding the padding too, where HF would
score it from a padding position). So an item's targets are the same whatever the padding side.
:func:`lm_labels` writes them as HF's ``labels`` (``input_ids`` with -100 elsewhere), so
``hf_model(**batch.inputs, labels=vlm.loss_labels(batch)).loss`` equals ``vlm(batch, return_type="loss")``.

Example:
    >>> loss = vlm(batch, return_type="loss")  # doctest: +SKIP
    >>> per_token = vlm(batch, return_type="loss", loss_per_token=True)  # [batch, pos - 1]  # doctest: +SKIP
    >>> labels = vlm.loss_labels(batch)  # HF's labels: input_ids, -100 where no target  # doctest: +SKIP
    >>> torch.testing.assert_close(loss, hf_model(**batch.inputs, labels=labels).loss)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from hooked_vllm.errors import BatchFormatError, ReturnTypeError

#: HF's ``ignore_index``: a label that is no target
IGNORE_INDEX = -100
#: what ``vlm(...)`` / ``vlm.forward`` return, as TransformerLens's ``return_type``
FORWARD_RETURN_TYPES = ("logits", "loss", "both", None)


def check_return_type(return_type: object) -> None:
    """Refuse a ``return_type`` that :meth:`HookedVLM.forward` does not know, in one line."""
    if return_type not in FORWARD_RETURN_TYPES:
        raise ReturnTypeError(
            f"return_type must be one of 'logits', 'loss', 'both' or None; got {return_type!r}. "
            "Use 'loss' for the mean next-token loss, 'both' for (logits, loss)."
        )


def lm_labels(
    input_ids: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    placeholders: Bool[torch.Tensor, "batch pos"],
) -> Int[torch.Tensor, "batch pos"]:
    """HF's ``labels=`` for next-token loss over the text: ``input_ids``, with -100 at padding, at
    image placeholders, at each item's first text token and after a padding gap."""
    real = attention_mask.bool()
    text = real & ~placeholders.to(real.device)
    after_real = torch.zeros_like(real)
    after_real[:, 1:] = real[:, :-1]
    first_text = torch.zeros_like(real)
    first_text[torch.arange(len(text), device=text.device), text.int().argmax(-1)] = True
    targets = text & after_real & ~first_text
    return input_ids.masked_fill(~targets, IGNORE_INDEX)


def lm_loss(
    logits: Float[torch.Tensor, "batch pos d_vocab"],
    labels: Int[torch.Tensor, "batch pos"],
    per_token: bool = False,
) -> Float[torch.Tensor, ""] | Float[torch.Tensor, "batch pos_minus_1"]:
    """Cross-entropy of each position's logits against the next position's label (in float32, as HF).

    The mean is over every target of the batch (HF's ``loss``, TransformerLens's). ``per_token=True``
    gives TransformerLens's ``[batch, pos - 1]``: entry ``p`` is the loss of predicting token ``p + 1``,
    0 where that token is no target, so ``per_token.sum() / (labels[:, 1:] != -100).sum()`` is the mean.
    """
    if labels.shape != logits.shape[:2]:
        raise BatchFormatError(
            f"labels have shape {tuple(labels.shape)} but the logits cover {tuple(logits.shape[:2])} "
            "positions. Pass labels shaped as input_ids ([batch, pos]), -100 where no token is a target."
        )
    targets = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        targets.flatten(),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view_as(targets)
    if per_token:
        return losses
    return losses.sum() / (targets != IGNORE_INDEX).sum()
