"""Metrics of a model output, for patching and knockout studies. Each maps logits ``[batch, pos,
vocab]`` (read at each item's last real position) to one number per item.

Example:
    >>> metric = logit_diff(batch, answer=red_id, alternative=blue_id)  # doctest: +SKIP
    >>> metric(vlm(batch))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


def last_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """``[batch, vocab]`` logits at each item's last real position."""
    return logits[torch.arange(logits.shape[0]), batch.last_positions.to(logits.device)].float()


def logit_diff(batch, answer: int, alternative: int) -> Metric:
    """logit(answer) - logit(alternative) at the last position."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = last_logits(logits, batch)
        return last[:, answer] - last[:, alternative]

    return metric


def target_prob(batch, token: int) -> Metric:
    """Probability of ``token`` at the last position."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return last_logits(logits, batch).softmax(-1)[:, token]

    return metric


def kl_from(batch, reference_logits: torch.Tensor) -> Metric:
    """KL(reference || output) of the next-token distributions at the last position."""
    reference = last_logits(reference_logits, batch).log_softmax(-1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        output = last_logits(logits, batch).log_softmax(-1)
        return (reference.exp() * (reference - output)).sum(-1)

    return metric
