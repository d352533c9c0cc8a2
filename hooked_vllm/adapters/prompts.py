"""Prompts in a family's chat template, with the instruction's character span.

A checkpoint whose processor carries a chat template gets its prompt from that template (one user
turn: the images, then the instruction; the generation prompt added), as the model card's
``processor.apply_chat_template`` gives it. A processor without one (tiny test models) falls back to
the adapter's fixed template.
"""

from __future__ import annotations

from typing import Any

_SENTINEL = "\x00hooked-vllm-instruction\x00"


def chat_prompt(
    processor: Any,
    instruction: str,
    n_images: int,
    fallback: str,
    image_placeholder: str,
    image_text: str | None = None,
) -> tuple[str, tuple[int, int]]:
    """``(prompt, (start, end))``: the templated prompt and the instruction's span in it.

    ``fallback`` has ``{images}`` (``image_text``, default the placeholder, once per image,
    newline-separated) and ``{instruction}``. An instruction that holds placeholders itself keeps
    them where they are.
    """
    placed_by_user = image_placeholder in instruction
    n_images = 0 if placed_by_user else n_images
    rendered = _render_chat_template(processor, n_images)
    if rendered is None or rendered.count(_SENTINEL) != 1:
        images = "\n".join([image_text or image_placeholder] * n_images)
        rendered = fallback.replace("{images}", images).replace("{instruction}", _SENTINEL)
    before, after = rendered.split(_SENTINEL)
    before = _without_added_bos(processor, before)
    return before + instruction + after, (len(before), len(before) + len(instruction))


def _render_chat_template(processor: Any, n_images: int) -> str | None:
    if not getattr(processor, "chat_template", None):
        return None
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": _SENTINEL}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _without_added_bos(processor: Any, text: str) -> str:
    """Chat templates that write BOS themselves (Gemma's) would get a second one from the tokenizer,
    which the processor calls with its special tokens added: keep the tokenizer's."""
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text
