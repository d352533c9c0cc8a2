"""Layer numbers: one convention everywhere a user reads or gives one.

Layer numbers are TransformerLens's block indices. The residual stream at layer ``l`` is what block
``l`` reads (``blocks.{l}.hook_resid_pre``, HF's ``hidden_states[l]``, TransformerLens's
``accumulated_resid()[l]``): layer 0 is the embedding and layer ``L`` the final stream after the last
block, so stream curves (contextualization, the logit lens) run over ``L + 1`` layers. Attention at
layer ``l`` is block ``l``'s attention (``blocks.{l}.attn``, ``cache["pattern", l]``), 0 to ``L - 1``.

Example:
    >>> check_blocks(6, range(2, 4), "knockout")
    [2, 3]
    >>> try:
    ...     check_blocks(6, range(10, 20), "knockout")
    ... except LayerError as error:
    ...     print(str(error)[:60])
    knockout: this model has no layers 10-19: its 6 blocks are l
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float

from hooked_vllm.errors import LayerError


def _spans(numbers: list[int]) -> str:
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans)


def check_blocks(n_layers: int, layers: Iterable[int], what: str) -> list[int]:
    """``layers`` as a list, each a block of a model with ``n_layers`` blocks (0 to n_layers - 1), or a
    one-line :class:`~hooked_vllm.errors.LayerError` naming the missing ones and what ``what`` may use."""
    chosen = [int(layer) for layer in layers]
    missing = sorted({layer for layer in chosen if not 0 <= layer < n_layers})
    if missing:
        word = "layer" if len(missing) == 1 else "layers"
        raise LayerError(
            f"{what}: this model has no {word} {_spans(missing)}: its {n_layers} blocks are layers "
            f"0-{n_layers - 1} (TransformerLens's block indices)."
        )
    return chosen


def check_stream_layer(n_layers: int, layer: int, what: str) -> int:
    """``layer`` as a residual-stream layer of a model with ``n_layers`` blocks (0 = the embedding to
    ``n_layers`` = the final stream), or a one-line :class:`~hooked_vllm.errors.LayerError`."""
    if not 0 <= int(layer) <= n_layers:
        raise LayerError(
            f"{what}: this model has no stream layer {layer}: the residual stream has layers 0 (the "
            f"embedding) to {n_layers} (after the last of its {n_layers} blocks)."
        )
    return int(layer)


def attention_w_o(attn: Any) -> Float[torch.Tensor, "head d_head d_model"]:
    """``W_O`` of one block's attention bridge, ``[head, d_head, d_model]``, with that layer's own head
    size: transformer-lens 4.3 splits the output projection by the config's ``d_head`` and refuses a
    layer whose heads are wider (Gemma 4's full-attention layers); there the projection's weight
    (``nn.Linear``, ``[d_model, head * d_head]``) is split into the config's number of heads."""
    weight = attn.o.weight
    n_heads = int(attn.config.n_heads)
    if weight.shape[-1] == n_heads * int(attn.config.d_head):
        return attn.W_O
    return weight.T.reshape(n_heads, weight.shape[-1] // n_heads, weight.shape[0])
