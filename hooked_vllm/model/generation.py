"""Cached generation for :class:`~hooked_vllm.model.HookedVLM`: greedy or sampled, hooks active at
every step, any padding side, and the activations of every step on request.

Example:
    >>> tokens = vlm.generate(batch, max_new_tokens=20)  # doctest: +SKIP
    >>> tokens, cache = vlm.generate(batch, 10, return_cache=True,
    ...                              names_filter="blocks.3.hook_resid_post")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from hooked_vllm.errors import GenerationArgumentError
from hooked_vllm.model.batch import BatchLike, NamesFilter, VLMBatch
from hooked_vllm.model.cache import GenerationRecorder


class GenerationMixin:
    """``generate``; mixed into HookedVLM (which provides ``bridge``, ``blocks``, ``embed``,
    ``to_batch``, ``hooks`` and the hook-name helpers)."""

    @torch.no_grad()
    def generate(
        self,
        batch: BatchLike,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        return_str: bool = False,
        return_cache: bool = False,
        names_filter: NamesFilter = None,
        cache_device: str | torch.device | None = None,
    ) -> Any:
        """Greedy (or sampled) continuation with the KV cache; hooks in effect fire at every step.

        ``batch`` is anything :meth:`to_batch` takes (a string generates from text alone). The
        prompt runs as the batch is laid out, whatever its padding side, so hooks and interventions
        keyed to the batch's positions (``knockout``, ``prune``, patching, your own) act on the
        prompt exactly as in :meth:`forward`; decoding steps then see one new position per item.
        Finished items are padded with the pad token, as HF's ``generate`` does. Returns the new
        tokens ``[batch, new]`` (``[batch, 0]`` for ``max_new_tokens=0``: nothing runs), or their
        decoded strings with ``return_str=True``.

        ``return_cache=True`` returns ``(tokens, cache)``: the activations of every step
        (``names_filter`` as in :meth:`run_with_cache`) joined along the positions, equal to one
        forward over the prompt and the new tokens but the last (see
        :class:`~hooked_vllm.model.cache.GenerationRecorder`).

        Example:
            >>> tokens, cache = vlm.generate(batch, 10, return_cache=True,
            ...                              names_filter=lambda n: "resid_post" in n)  # doctest: +SKIP
            >>> cache["resid_post", 3].shape  # [batch, prompt + 9, d_model]  # doctest: +SKIP
        """
        batch = self._laid_out_for_decoding(self.to_batch(batch), recording=return_cache)
        if not return_cache:
            with _kv_cache_kwarg_for_bridge(self.blocks):
                return self._generate(batch, max_new_tokens, do_sample, temperature, eos_token_id, return_str)
        predicate = self._names_predicate(names_filter)
        points = {name: point for name, point in self.hook_dict.items() if predicate(name)}
        recorder = GenerationRecorder(points, cache_device, self.adapter.injection_layers)
        with self.hooks(fwd_hooks=recorder.hooks()), _kv_cache_kwarg_for_bridge(self.blocks):
            tokens = self._generate(batch, max_new_tokens, do_sample, temperature, eos_token_id, return_str)
        return tokens, recorder.cache(self.bridge)

    @torch.no_grad()
    def _laid_out_for_decoding(self, batch: VLMBatch, recording: bool = False) -> VLMBatch:
        """The batch as decoding can take it: left-padded where the language model has sliding-window
        layers (the window counts cache slots, so a right-padded item's padding would eat into it).

        Re-padding moves every token to another column, so it is refused where something keyed to
        the batch's columns would see it: hooks in effect, or a cache to return in the batch's layout."""
        if self.adapter.sliding_window is None:
            return batch
        left = batch.left_padded()
        if left is batch:
            return batch
        hooked = any(point.has_hooks() for point in self.hook_dict.values())
        if hooked or recording:
            why = (
                "hooks in effect would then act on other tokens"
                if hooked
                else ("the cache would come back in another layout than the batch's")
            )
            raise GenerationArgumentError(
                "This model has sliding-window attention layers, so generation needs a left-padded "
                f"batch, and re-padding this right-padded one here is refused: {why}. Build the batch "
                "with vlm.prepare(..., padding_side='left')."
            )
        return left

    def _generate(self, batch, max_new_tokens, do_sample, temperature, eos_token_id, return_str) -> Any:
        _check_generation_arguments(max_new_tokens, do_sample, temperature)
        batch = self.to_batch(batch)
        self._check_length(batch, extra_tokens=max_new_tokens)
        tokenizer = self.tokenizer
        if max_new_tokens == 0:
            empty = torch.zeros(len(batch), 0, dtype=torch.long)
            return tokenizer.batch_decode(empty) if return_str else empty
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        embeds, injections = self._embed_with_injections(batch)
        device = embeds.device
        rows = torch.arange(len(batch), device=device)
        last = batch.last_positions.to(device)
        mask = batch.attention_mask.to(device)
        logits, past = self.bridge(
            embeds,
            **self.lm_inputs(batch, embeds, injections),
            return_type="logits_and_cache",
            use_cache=True,
        )
        next_logits = logits[rows, last]
        positions = next_position_ids(batch.position_ids.to(device), mask) - 1
        finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
        new_tokens = []
        for _ in range(max_new_tokens):
            next_logits = next_logits.float()
            if do_sample:
                probs = torch.softmax(next_logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1).squeeze(-1)
            else:
                token = next_logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            if eos is not None:
                finished |= token == eos
            if len(new_tokens) == max_new_tokens or bool(finished.all()):
                break
            # Appended after the batch's last column: a right-padded item's padding stays a masked
            # hole in the cache, and its positions continue after its largest one.
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            logits, past = self.bridge(
                token.unsqueeze(-1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                return_type="logits_and_cache",
            )
            next_logits = logits[:, -1]
        tokens = torch.stack(new_tokens, dim=1)
        if return_str:
            return tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return tokens


def next_position_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of each item's first new token: one after the largest position of its real
    tokens, in every axis (M-RoPE's ``[3, batch, pos]`` included, where an image's rows and
    columns may reach past the last token's position). ``[batch, 1]`` or ``[3, batch, 1]``."""
    real = attention_mask.bool()
    largest = position_ids.masked_fill(~real, torch.iinfo(position_ids.dtype).min).amax(-1)
    if position_ids.dim() == 3:
        return largest.amax(0).view(1, -1, 1).expand(position_ids.shape[0], -1, 1) + 1
    return largest.unsqueeze(-1) + 1


def _check_generation_arguments(max_new_tokens: Any, do_sample: bool, temperature: Any) -> None:
    """Refuse generation settings HF's ``GenerationConfig`` refuses (and ones it would turn into NaN)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationArgumentError(
            f"max_new_tokens must be a non-negative integer; got {max_new_tokens!r}."
        )
    if do_sample and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
        or temperature == float("inf")
    ):
        raise GenerationArgumentError(
            f"temperature (={temperature!r}) has to be a strictly positive finite float when "
            "do_sample=True. For greedy decoding set do_sample=False."
        )


@contextlib.contextmanager
def _kv_cache_kwarg_for_bridge(blocks: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Hand transformer-lens' attention bridges the KV cache under the name they read.

    transformers >= 5.24 passes it to the attention layers as ``cache=``; transformer-lens 4.3's
    attention bridges read only ``past_key_values``, so the cache would stay empty and every decoding
    step would attend to itself alone (tests/test_generation.py catches that). A no-op before 5.24.
    """

    def rename(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "cache" in kwargs and "past_key_values" not in kwargs:
            kwargs["past_key_values"] = kwargs.pop("cache")
        return args, kwargs

    handles = [block.attn.register_forward_pre_hook(rename, with_kwargs=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
