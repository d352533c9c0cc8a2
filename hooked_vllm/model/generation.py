"""Cached generation for :class:`~hooked_vllm.model.HookedVLM`: greedy or sampled, hooks active at
every step, any padding side, and the activations of every step on request.

Decoding is pure greedy unless asked otherwise: ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``repetition_penalty`` and ``no_repeat_ngram_size`` act as in HF (through HF's own logits processors,
in HF's order), and ``use_generation_config=True`` takes them from the checkpoint's
``generation_config``, as HF's ``generate`` does.

Example:
    >>> tokens = vlm.generate(batch, max_new_tokens=20)  # doctest: +SKIP
    >>> tokens, cache = vlm.generate(batch, 10, return_cache=True,
    ...                              names_filter="blocks.3.hook_resid_post")  # doctest: +SKIP
    >>> vlm.generate("what colour is the", max_new_tokens=3)  # doctest: +SKIP
    'what colour is the sky?'
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from jaxtyping import Int
from packaging.version import Version
from transformers import GenerationConfig
from transformers import GenerationMixin as HFGenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hooked_vllm.errors import GenerationArgumentError, ReturnTypeError
from hooked_vllm.model.batch import ModelInput, NamesFilter, VLMBatch
from hooked_vllm.model.cache import GenerationRecorder

#: ``generate``'s ``return_type``, as TransformerLens's
GENERATE_RETURN_TYPES = ("input", "str", "tokens")
#: HF's values for generation settings neither the checkpoint nor the call sets
#: (``GenerationConfig._get_default_generation_params``, transformers 5)
HF_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}
#: ``generation_config`` fields that change HF's decoding and that ``generate`` does not implement,
#: with the values that leave decoding unchanged (``None`` always does)
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "penalty_alpha": (),
    "num_return_sequences": (1,),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "bad_words_ids": (),
    "sequence_bias": (),
    "suppress_tokens": ([],),
    "begin_suppress_tokens": ([],),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "guidance_scale": (1, 1.0),
    "watermarking_config": (),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "stop_strings": (),
    "max_time": (),
    "prompt_lookup_num_tokens": (),
    "assistant_early_exit": (),
}
#: the same for settings that act only when sampling
UNSUPPORTED_SAMPLING_SETTINGS: dict[str, tuple[Any, ...]] = {
    "typical_p": (1.0,),
    "min_p": (),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "top_h": (),
}


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen from the logits (the settings HF's ``generate`` takes)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def processors(self, prompt_mask: torch.Tensor) -> LogitsProcessorList:
        """HF's logits processors for these settings, in the order HF's ``generate`` applies them
        (``prompt_mask``: the prompt's attention mask, whose left padding the repetition penalty skips)."""
        processors = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(_repetition_penalty(float(self.repetition_penalty), prompt_mask))
        if self.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(self.temperature)))
            if self.top_k:
                processors.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=float(self.top_p)))
        return processors


class GenerationMixin:
    """``generate``; mixed into HookedVLM (which provides ``bridge``, ``blocks``, ``embed``,
    ``to_batch``, ``hooks`` and the hook-name helpers)."""

    @torch.no_grad()
    def generate(
        self,
        batch: ModelInput,
        max_new_tokens: int = 20,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        use_generation_config: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        return_type: str = "input",
        return_str: bool = False,
        return_cache: bool = False,
        names_filter: NamesFilter = None,
        cache_device: str | torch.device | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Any:
        """Greedy (or sampled) continuation with the KV cache; hooks in effect fire at every step.

        ``batch`` is anything :meth:`to_batch` takes (a string generates from text alone;
        ``prepend_bos`` and ``padding_side`` tokenize it as :meth:`to_tokens` does). The prompt runs as
        the batch is laid out, whatever its padding side, so hooks and interventions keyed to the
        batch's positions (``knockout``, ``prune``, patching, your own) act on the prompt exactly as in
        :meth:`forward`; decoding steps then see one new position per item. Finished items are padded
        with the pad token, as HF's ``generate`` does.

        ``return_type`` as TransformerLens's: ``"input"`` (default) gives text for text (a string, or a
        list of strings) and tokens otherwise; ``"str"``: for text input, each prompt followed by its
        continuation, decoded without special tokens as TransformerLens does (a ``str`` for a ``str``);
        for a batch or tokens, the continuations' text (a list); ``"tokens"``: the new tokens
        ``[batch, new]`` (``[batch, 0]`` for ``max_new_tokens=0``: nothing runs), without the prompt
        (TransformerLens prepends it; the prompt is ``vlm.to_batch(batch).input_ids``).
        ``return_str=True`` returns the continuations' text, as ``"str"`` does for a batch.

        Decoding is pure greedy by default. HF's ``generate`` is not: it decodes with the checkpoint's
        ``generation_config`` (e.g. Qwen2.5-VL's ``repetition_penalty=1.05``, applied even with
        ``do_sample=False``), its arguments overriding it. ``use_generation_config=True`` does the same
        (repetition penalty, no-repeat n-grams, sampling with temperature, top-k and top-p, end and pad
        tokens; the explicit arguments here override them) and refuses, in one line, a setting it does
        not implement (beams, minimum lengths, ...); ``max_new_tokens`` is always the one passed here.
        Without it, each setting defaults to off (greedy, no penalty, no top-k).

        ``return_cache=True`` returns ``(output, cache)``: the activations of every step
        (``names_filter`` as in :meth:`run_with_cache`) joined along the positions, equal to one
        forward over the prompt and the new tokens but the last (see
        :class:`~hooked_vllm.model.cache.GenerationRecorder`).

        Example:
            >>> vlm.generate("what colour is the", max_new_tokens=3)  # doctest: +SKIP
            'what colour is the sky?'
            >>> # decodes as hf_model.generate(**batch.inputs, max_new_tokens=20, do_sample=False):
            >>> tokens = vlm.generate(batch, 20, use_generation_config=True,
            ...                       do_sample=False)  # doctest: +SKIP
            >>> tokens, cache = vlm.generate(batch, 10, return_cache=True,
            ...                              names_filter=lambda n: "resid_post" in n)  # doctest: +SKIP
            >>> cache["resid_post", 3].shape  # [batch, prompt + 9, d_model]  # doctest: +SKIP
        """
        output = _output_kind(return_type, return_str, _is_text(batch))
        decoding = self._decoding(
            use_generation_config,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=eos_token_id,
        )
        prompt = self.to_batch(batch, prepend_bos=prepend_bos, padding_side=padding_side)
        laid_out = self._laid_out_for_decoding(prompt, recording=return_cache)
        if not return_cache:
            with _kv_cache_kwarg_for_bridge(self.blocks):
                tokens = self._generate(laid_out, max_new_tokens, decoding, prompt)
            return self._generated_output(output, tokens, prompt, single=isinstance(batch, str))
        predicate = self._names_predicate(names_filter)
        points = {name: point for name, point in self.hook_dict.items() if predicate(name)}
        recorder = GenerationRecorder(
            points,
            cache_device,
            self.adapter.injection_layers,
            stream_terms=self.adapter.stream_terms(),
            stream_scales=self.adapter.stream_scales(),
            additive_stream=self.adapter.additive_stream,
            mixer=self.adapter.mixer_without_pattern,
        )
        with self.hooks(fwd_hooks=recorder.hooks()), _kv_cache_kwarg_for_bridge(self.blocks):
            tokens = self._generate(laid_out, max_new_tokens, decoding, prompt)
        result = self._generated_output(output, tokens, prompt, single=isinstance(batch, str))
        return result, recorder.cache(self.bridge)

    @property
    def generation_config(self) -> GenerationConfig:
        """The ``generation_config`` HF's ``generate`` decodes with (and ``use_generation_config=True``
        reads): the model's own, or its language model's where HF's ``generate`` hands over to it
        (InstructBLIP)."""
        hf_model = self.hf_model
        language_model = getattr(hf_model, "language_model", None)
        if type(hf_model).generate is not HFGenerationMixin.generate and isinstance(
            getattr(language_model, "generation_config", None), GenerationConfig
        ):
            return language_model.generation_config
        return hf_model.generation_config

    def _decoding(self, use_generation_config: bool, **given: Any) -> Decoding:
        """The decoding settings: the arguments given, over the checkpoint's ``generation_config``
        and HF's defaults where ``use_generation_config``, over "off" otherwise."""
        tokenizer = self.tokenizer
        config = self.generation_config if use_generation_config else None
        settings = {name: value for name, value in given.items() if value is not None}
        if config is not None:
            from_config = {name: getattr(config, name, None) for name in (*HF_DEFAULTS, "eos_token_id")}
            settings = {
                **HF_DEFAULTS,
                **{name: value for name, value in from_config.items() if value is not None},
                **settings,
            }
            _refuse_unsupported_settings(config, do_sample=bool(settings["do_sample"]))
        do_sample = bool(settings.get("do_sample", False))
        temperature = settings.get("temperature", 1.0)
        _check_generation_arguments(0, do_sample, temperature)
        _check_processor_arguments(settings)
        eos = settings.get("eos_token_id", tokenizer.eos_token_id)
        eos_ids = (
            tuple(int(i) for i in eos)
            if isinstance(eos, (list, tuple))
            else (() if eos is None else (int(eos),))
        )
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or (None,))[0]
        return Decoding(
            do_sample=do_sample,
            temperature=temperature,
            top_k=settings.get("top_k"),
            top_p=settings.get("top_p"),
            repetition_penalty=settings.get("repetition_penalty"),
            no_repeat_ngram_size=settings.get("no_repeat_ngram_size"),
            eos_token_ids=eos_ids,
            pad_token_id=pad,
        )

    def _generated_output(
        self, output: str, tokens: Int[torch.Tensor, "batch new"], prompt: VLMBatch, single: bool
    ) -> Any:
        """``tokens`` as ``generate`` returns them (see :func:`_output_kind`)."""
        if output == "tokens":
            return tokens
        if output == "continuations":
            return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        texts = [
            self.tokenizer.decode(torch.cat([ids[mask.bool()], new.to(ids.device)]), skip_special_tokens=True)
            for ids, mask, new in zip(prompt.input_ids, prompt.attention_mask, tokens)
        ]
        return texts[0] if single else texts

    @torch.no_grad()
    def _laid_out_for_decoding(self, batch: VLMBatch, recording: bool = False) -> VLMBatch:
        """The batch as decoding can take it: left-padded where the language model has sliding-window
        layers (the window counts cache slots, so a right-padded item's padding would eat into it)
        or layers that keep a state (Qwen3.5's linear attention: the padding would run into it).

        Re-padding moves every token to another column, so it is refused where something keyed to
        the batch's columns would see it: hooks in effect, or a cache to return in the batch's layout."""
        if not self.adapter.decodes_left_padded:
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
            layer_types = getattr(self.adapter.text_config, "layer_types", None) or ()
            if self.adapter.sliding_window is not None:
                kind = "sliding-window attention layers"
            elif "chunked_attention" in layer_types:  # Llama 4: chunks count cache slots too
                kind = "chunked attention layers"
            else:
                kind = "layers that keep a recurrent state"
            raise GenerationArgumentError(
                f"This model has {kind}, so generation needs a left-padded "
                f"batch, and re-padding this right-padded one here is refused: {why}. Build the batch "
                "with vlm.prepare(..., padding_side='left')."
            )
        return left

    def _generate(
        self, batch: VLMBatch, max_new_tokens: int, decoding: Decoding, prompt: VLMBatch
    ) -> Int[torch.Tensor, "batch new"]:
        """The new tokens of ``batch`` (laid out for decoding); ``prompt`` is the batch as given,
        whose tokens the repetition penalty and n-gram ban see, as HF's do."""
        _check_generation_arguments(max_new_tokens, decoding.do_sample, decoding.temperature)
        self._check_length(batch, extra_tokens=max_new_tokens)
        if max_new_tokens == 0:
            return torch.zeros(len(batch), 0, dtype=torch.long)
        pad = decoding.pad_token_id
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
        eos = torch.tensor(decoding.eos_token_ids, dtype=torch.long, device=device)
        processors = decoding.processors(prompt.attention_mask.to(device))
        history = prompt.input_ids.to(device)
        new_tokens = []
        for _ in range(max_new_tokens):
            scores = next_logits.float()
            if processors:
                scores = processors(history, scores)
            if decoding.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
            else:
                token = scores.argmax(-1)
            if pad is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            if processors:
                history = torch.cat([history, token.unsqueeze(-1)], dim=1)
            finished |= torch.isin(token, eos)
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
        return torch.stack(new_tokens, dim=1)


def _repetition_penalty(penalty: float, prompt_mask: torch.Tensor) -> RepetitionPenaltyLogitsProcessor:
    """HF's repetition penalty as the installed release's ``generate`` builds it. From transformers
    5.23 it skips each item's left padding (``prompt_ignore_length`` per item, from the mask); 5.17 to
    5.22 take only an int there (a tensor is a ValueError) and their ``generate`` penalizes the whole
    prompt, padding included."""
    if Version(transformers.__version__) < Version("5.23"):
        return RepetitionPenaltyLogitsProcessor(penalty)
    ignore = (prompt_mask != 0).int().argmax(dim=1)
    return RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore)


def next_position_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of each item's first new token: one after the largest position of its real
    tokens, in every axis (M-RoPE's ``[3, batch, pos]`` included, where an image's rows and
    columns may reach past the last token's position). ``[batch, 1]`` or ``[3, batch, 1]``."""
    real = attention_mask.bool()
    largest = position_ids.masked_fill(~real, torch.iinfo(position_ids.dtype).min).amax(-1)
    if position_ids.dim() == 3:
        return largest.amax(0).view(1, -1, 1).expand(position_ids.shape[0], -1, 1) + 1
    return largest.unsqueeze(-1) + 1


def _is_text(input: Any) -> bool:
    """Whether ``input`` is text as TransformerLens takes it: a string or a list of strings."""
    return isinstance(input, str) or (
        isinstance(input, (list, tuple)) and bool(input) and all(isinstance(x, str) for x in input)
    )


def _output_kind(return_type: Any, return_str: bool, text_input: bool) -> str:
    """What ``generate`` returns: ``"tokens"`` (the new ones), ``"text"`` (each prompt and its
    continuation) or ``"continuations"`` (the new tokens' text)."""
    if return_type not in GENERATE_RETURN_TYPES:
        raise ReturnTypeError(
            f"generate's return_type must be one of 'input', 'str' or 'tokens'; got {return_type!r}. "
            "'input' returns text for text input and tokens otherwise."
        )
    if return_str:
        if return_type == "tokens":
            raise GenerationArgumentError(
                "return_str=True asks for text but return_type='tokens' for tokens; pass one of them."
            )
        return "continuations"
    if return_type == "input":
        return_type = "str" if text_input else "tokens"
    if return_type == "tokens":
        return "tokens"
    return "text" if text_input else "continuations"


def _refuse_unsupported_settings(config: GenerationConfig, do_sample: bool) -> None:
    """Refuse, in one line, a ``generation_config`` setting that changes HF's decoding here unmatched."""
    checked = {**UNSUPPORTED_SETTINGS, **(UNSUPPORTED_SAMPLING_SETTINGS if do_sample else {})}
    active = [
        f"{name}={value!r}"
        for name, neutral in checked.items()
        if (value := getattr(config, name, None)) is not None and value not in neutral
    ]
    if active:
        raise GenerationArgumentError(
            f"The checkpoint's generation_config sets {', '.join(active)}, which vlm.generate does not "
            "implement. Generate with hf_model.generate, or without use_generation_config=True."
        )


def _check_processor_arguments(settings: dict[str, Any]) -> None:
    """Refuse top-k, top-p, repetition-penalty and n-gram settings HF's processors refuse."""
    checks = {
        "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "top_p": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
        "repetition_penalty": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "no_repeat_ngram_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    }
    wanted = {
        "top_k": "a non-negative integer (0: off)",
        "top_p": "a float in [0, 1] (1: off)",
        "repetition_penalty": "a positive float (1.0: off)",
        "no_repeat_ngram_size": "a non-negative integer (0: off)",
    }
    for name, ok in checks.items():
        value = settings.get(name)
        if value is not None and not ok(value):
            raise GenerationArgumentError(f"{name} must be {wanted[name]}; got {value!r}.")


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
    """Hand transformer-lens' bridges the KV cache (or recurrent state) under the name they read.

    transformers >= 5.24 passes it to each layer's mixer as ``cache=``; up to 5.23 it was
    ``past_key_values=`` for attention and ``cache_params=`` for Qwen3.5's linear attention, and
    transformer-lens 4.3's bridges read only those: its attention bridges would leave the cache empty
    and its GatedDeltaNet bridge would run its no-cache prefill path at every step, so each decoding
    step would ignore the tokens before it (tests/test_generation.py and the Qwen3.5 generate tests of
    tests/test_families.py catch that). HF's 5.24 and 5.25 layers still take the old names (deprecated
    until 5.40). A no-op before 5.24.
    """
    old_names = {"attn": "past_key_values", "linear_attn": "cache_params"}
    # transformer-lens 4.3 takes the cache as `past_key_values` and reads it back from HF's output under
    # that name: 5.24 and 5.25 then print two deprecation warnings per process, about transformer-lens's
    # code, not the user's (and the CLI promises one line on stderr). Those two are silenced here.

    def renamer(old_name: str) -> Any:
        def rename(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if "cache" in kwargs and old_name not in kwargs:
                kwargs[old_name] = kwargs.pop("cache")
            return args, kwargs

        return rename

    handles = [
        block._modules[mixer].register_forward_pre_hook(renamer(old_name), with_kwargs=True)
        for block in blocks
        for mixer, old_name in old_names.items()
        if mixer in block._modules
    ]
    output_logger = logging.getLogger("transformers.utils.generic")  # ModelOutput.past_key_values
    output_logger.addFilter(_old_cache_name_warning)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"`(past_key_values|cache_params)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        output_logger.removeFilter(_old_cache_name_warning)
        for handle in handles:
            handle.remove()


def _old_cache_name_warning(record: logging.LogRecord) -> bool:
    """A logging filter: False for transformers' "`past_key_values`/`cache_params` are deprecated"."""
    return not record.getMessage().startswith("`past_key_values`/`cache_params` are deprecated")
