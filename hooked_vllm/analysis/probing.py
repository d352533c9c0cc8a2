"""Linear probes on stored activations: multinomial logistic regression, trained full-batch in torch.

Example:
    >>> store = ActivationStore.open("store/")  # doctest: +SKIP
    >>> x = store["blocks.3.hook_resid_post"].float()  # doctest: +SKIP
    >>> result = linear_probe(x[train], labels[train], x[test], labels[test])  # doctest: +SKIP
    >>> result.accuracy, result.chance  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int


@dataclass(frozen=True)
class ProbeResult:
    #: accuracy on the held-out rows
    accuracy: float
    #: held-out accuracy of always answering the training rows' most frequent class
    chance: float
    n_train: int
    n_test: int


def linear_probe(
    x_train: Float[torch.Tensor, "n d"],
    y_train: Int[torch.Tensor, " n"],
    x_test: Float[torch.Tensor, "m d"],
    y_test: Int[torch.Tensor, " m"],
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
) -> ProbeResult:
    """Fit ``softmax(x W + b)`` on the training rows (features standardised with the training rows'
    mean and standard deviation; Adam, ``steps`` full-batch steps, L2 ``weight_decay``) and score it on
    the held-out rows. Deterministic: the weights start at zero. Small problems run on one CPU thread
    (thread start-up would cost more than the arithmetic; the setting is restored after)."""
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("A probe needs training and held-out rows; got an empty split.")
    threads = torch.get_num_threads()
    if x_train.numel() < 2**22:
        torch.set_num_threads(1)
    try:
        return _fit(x_train, y_train, x_test, y_test, steps, lr, weight_decay)
    finally:
        torch.set_num_threads(threads)


def _fit(x_train, y_train, x_test, y_test, steps, lr, weight_decay) -> ProbeResult:
    with torch.inference_mode(False), torch.enable_grad():
        x_train, x_test = x_train.detach().double().clone(), x_test.detach().double().clone()
        y_train, y_test = y_train.detach().long().clone(), y_test.detach().long().clone()
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        n_classes = int(max(y_train.max(), y_test.max())) + 1
        weight = torch.zeros(x_train.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train)
            (loss + weight_decay * weight.square().sum()).backward()
            optimizer.step()
        predicted = (x_test @ weight + bias).argmax(-1)
    majority = torch.bincount(y_train, minlength=n_classes).argmax()
    return ProbeResult(
        accuracy=float((predicted == y_test).double().mean()),
        chance=float((y_test == majority).double().mean()),
        n_train=len(y_train),
        n_test=len(y_test),
    )
