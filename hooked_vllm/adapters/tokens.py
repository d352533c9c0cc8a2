"""Token ids with character spans, shared by the adapters."""

from __future__ import annotations

from typing import Any


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
