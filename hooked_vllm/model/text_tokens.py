"""TransformerLens's token methods on :class:`~hooked_vllm.model.HookedVLM`: ``to_tokens``,
``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``, with TL's signatures.

Text here is the language model's alone: an image placeholder in a string is refused (images come
through ``vlm.prepare``). ``to_str_tokens`` reads each token as it reads in context, leading space
included (``' is'``), and a :class:`~hooked_vllm.model.batch.VLMBatch`'s image positions as
``<img{i}:{k}>``.

Example:
    >>> vlm.to_str_tokens("what colour is the circle")  # doctest: +SKIP
    ['<s>', ' what', ' colour', ' is', ' the', ' circle']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Int

from hooked_vllm.errors import BatchFormatError, MissingImageError
from hooked_vllm.model.batch import ModelInput, VLMBatch


class TokensMixin:
    """The token methods; mixed into HookedVLM (which provides ``bridge``, ``adapter``,
    ``tokenizer`` and ``to_batch``)."""

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Text to tokens, as ``HookedTransformer.to_tokens`` (text only: an image placeholder in
        the text is an error; images go through :meth:`prepare`)."""
        tokens = self.bridge.to_tokens(
            input,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
            move_to_device=move_to_device,
            truncate=truncate,
        )
        self._refuse_placeholders(tokens, input)
        return tokens

    def _refuse_placeholders(self, tokens: torch.Tensor, text: Any) -> None:
        if bool((tokens == self.adapter.image_token_id).any()):
            placeholder = self.tokenizer.convert_ids_to_tokens(self.adapter.image_token_id)
            raise MissingImageError(
                f"The text {text!r} holds the image placeholder {placeholder!r} but no image was given, "
                "and the placeholder alone would be read as a word. Pass images with "
                "vlm.prepare(images=..., prompts=...), or remove the placeholder."
            )

    def to_string(self, tokens: torch.Tensor | list[int] | int) -> str | list[str]:
        """Tokens to text, as ``HookedTransformer.to_string`` (a list of strings for ``[batch, pos]``)."""
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return self.tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be exactly one token, as ``HookedTransformer.to_single_token``."""
        tokens = self.to_tokens(string, prepend_bos=False).squeeze(0)
        if tokens.numel() != 1:
            raise BatchFormatError(
                f"{string!r} is {tokens.numel()} tokens, not one: {self.to_str_tokens(tokens)}."
            )
        return int(tokens)

    def get_token_position(
        self,
        single_token: str | int,
        input: ModelInput,
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """The position of ``single_token`` in ``input`` (one item), as
        ``HookedTransformer.get_token_position``: ``mode="first"`` or ``"last"``."""
        if isinstance(input, VLMBatch) or isinstance(input, Mapping):
            batch = self.to_batch(input)
            if len(batch) != 1:
                raise BatchFormatError(f"get_token_position takes one item; the batch has {len(batch)}.")
            tokens = batch.input_ids[0][batch.attention_mask[0].bool()]
            offset = int(torch.nonzero(batch.attention_mask[0])[0])
        else:
            tokens = self.to_batch(input, prepend_bos=prepend_bos, padding_side=padding_side).input_ids
            if tokens.shape[0] != 1:
                raise BatchFormatError(f"get_token_position takes one item; got {tokens.shape[0]}.")
            tokens, offset = tokens[0], 0
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = torch.nonzero(tokens == token).flatten()
        if where.numel() == 0:
            raise BatchFormatError(f"Token {single_token!r} ({token}) does not occur in the input.")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        return int(where[0 if mode == "first" else -1]) + offset

    def to_str_tokens(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        *,
        index: int | None = None,
    ) -> list[str] | list[list[str]]:
        """Tokens as strings, as ``HookedTransformer.to_str_tokens``: each token's text as it reads
        in context, leading space included (``' is'``). A :class:`VLMBatch` item reads its image
        positions as ``<img{i}:{k}>`` (image i, patch k) and padding as ``<pad>``; a batch of
        several items (or a list of strings) gives a list per item unless ``index`` picks one
        (``to_str_tokens(batch, i)`` also picks item ``i``).
        """
        if isinstance(input, list) and all(isinstance(x, str) for x in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, VLMBatch) and isinstance(prepend_bos, int) and not isinstance(prepend_bos, bool):
            index, prepend_bos = prepend_bos, None  # to_str_tokens(batch, i): item i, as before
        batch = self.to_batch(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if index is None and len(batch) > 1:
            return [self._item_str_tokens(batch, i) for i in range(len(batch))]
        return self._item_str_tokens(batch, 0 if index is None else index)

    def _item_str_tokens(self, batch: VLMBatch, index: int) -> list[str]:
        ids = batch.input_ids[index].tolist()
        real = batch.attention_mask[index].tolist()
        placeholders = (
            self.adapter.placeholder_mask(batch.input_ids[index]) & batch.attention_mask[index].bool()
        )
        labels = _image_slot_labels(batch, index, placeholders)
        out: list[str] = []
        run: list[int] = []  # the text tokens since the last image or padding: decoded in context

        def flush() -> None:
            out.extend(_tokens_in_context(self.tokenizer, run))
            run.clear()

        for pos, (token, is_real) in enumerate(zip(ids, real)):
            if is_real and pos not in labels:
                run.append(token)
                continue
            flush()
            out.append(labels[pos] if is_real else "<pad>")
        flush()
        return out


def _image_slot_labels(batch: VLMBatch, index: int, placeholders: torch.Tensor) -> dict[int, str]:
    """``{position: label}`` of item ``index``'s image slots (``placeholders``: the positions the
    visual prefix fills): ``<img{i}:{k}>`` for patch k of image i, ``<img{i}:newline>`` for a
    structure slot (LLaVA-NeXT's row ends)."""
    image_row = batch.image_mask[index].tolist()
    if not batch.image_slots:  # no images: runs of image positions, one image each
        labels, image_no, patch, previous = {}, -1, 0, False
        for pos, is_image in enumerate(image_row):
            if is_image:
                if not previous:
                    image_no, patch = image_no + 1, 0
                labels[pos] = f"<img{image_no}:{patch}>"
                patch += 1
            previous = is_image
        return labels
    kinds = [
        (image_no, bool(is_patch))
        for image_no, slots in enumerate(batch.image_slots[index])
        for is_patch in slots.is_patch.tolist()
    ]
    labels, patches = {}, {}
    for pos, (image_no, is_patch) in zip(placeholders.nonzero().flatten().tolist(), kinds):
        if is_patch:
            labels[pos] = f"<img{image_no}:{patches.setdefault(image_no, 0)}>"
            patches[image_no] += 1
        else:
            labels[pos] = f"<img{image_no}:newline>"
    return labels


def _tokens_in_context(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it reads after the tokens before it (leading spaces kept)."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
        pieces.append(
            text[len(previous) :] if text.startswith(previous) else tokenizer.decode(ids[end - 1 : end])
        )
        previous = text
    return pieces
