"""Token ids with character spans, and the image expansions a processor writes between two markers,
shared by the adapters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from jaxtyping import Bool, Int


def token_ids_with_spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``tokenizer(text)`` ids (special tokens added as the model adds them) and each token's
    ``(start, end)`` character span; added tokens such as BOS have an empty span.

    Needs a fast (Rust) tokenizer, which every supported checkpoint ships.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer; modality masks need character offsets. "
            "Load the processor with use_fast=True (the default for llava-hf and Salesforce checkpoints)."
        )
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]


def marker_blocks(tokens: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """``[first, last)`` of each ``start ... end`` run (both markers included) in one row of token ids."""
    blocks, first = [], None
    for pos, token in enumerate(tokens):
        if token == start:
            first = pos
        elif token == end and first is not None:
            blocks.append((first, pos + 1))
            first = None
    return blocks


def marked_runs(block: list[int], slot: int) -> list[tuple[int | None, int]]:
    """``(marker, length)`` of each run of ``slot`` tokens in ``block``, in order: the token before the
    run (``None`` at the start) and how many slots it holds (a tile each in LFM2-VL, IDEFICS3, Aya Vision)."""
    runs: list[tuple[int | None, int]] = []
    for previous, token in zip([None, *block], block):
        if token == slot:
            if previous == slot:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((previous, 1))
    return runs


def real_token_rows(inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each item's ``input_ids`` as a list, padding (``attention_mask`` 0) written as -1."""
    ids = inputs["input_ids"]
    ids = ids if ids.dim() == 2 else ids[None]
    mask = inputs.get("attention_mask")
    real = mask.reshape(ids.shape).bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return [
        [t if k else -1 for t, k in zip(tokens, keep)] for tokens, keep in zip(ids.tolist(), real.tolist())
    ]


def expansion_mask(
    input_ids: Int[torch.Tensor, "*batch pos"],
    base: Callable[[torch.Tensor], torch.Tensor],
    blocks: Callable[[list[int]], list[tuple[int, int]]],
) -> Bool[torch.Tensor, "*batch pos"]:
    """``base(ids)`` (``[batch, pos]``) with every ``[first, last)`` of ``blocks(row)`` set in each row:
    what the processor wrote for each image. ``input_ids`` with or without its batch dimension."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = base(ids)
    for row, tokens in enumerate(ids.tolist()):
        for first, last in blocks(tokens):
            mask[row, first:last] = True
    return mask if input_ids.dim() == 2 else mask[0]
