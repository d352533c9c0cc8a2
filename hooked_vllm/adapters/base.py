"""The contract a VLM family fulfils. Adding a family means adding one module that subclasses
:class:`VLMAdapter` and registering it in ``hooked_vllm.adapters``.

An adapter knows one HF model family and nothing else. It answers four questions:

1. **Which HF classes and configs does it take?** ``architectures`` and :meth:`check_config`
   (refuse sub-variants it cannot serve, e.g. InstructBLIP with a Flan-T5 backbone).
2. **What is the language model?** :meth:`language_model` returns a ``*ForCausalLM`` that *shares*
   the HF model's decoder and unembedding (no copy). transformer-lens boots its bridge on it, so
   every block, norm and head is the HF module itself.
3. **How do prompts and images become model inputs?** :meth:`format_prompt` (the prompt template,
   returning where the user's instruction sits in it), :meth:`count_image_slots` and :meth:`process`
   (the HF processor call).
4. **What does HF feed the language model at the image positions?** :meth:`visual_prefix` runs the
   vision side with HF's own functions and returns ``[n_images, n_image_tokens, d_model]``;
   :meth:`vision_hook_sites` names the vision-side modules whose outputs get hook points.

Everything else (the bridge, hooks, caching, masks, positions, generation) is family-independent and
lives in :mod:`hooked_vllm.model` and :mod:`hooked_vllm.inputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from PIL import Image
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


class VLMAdapter(ABC):
    """One VLM family: see the module docstring for the contract."""

    #: Short family name, e.g. ``"llava"``.
    family: ClassVar[str]
    #: HF class names (``config.architectures[0]``) this adapter serves.
    architectures: ClassVar[tuple[str, ...]]
    #: Keys of a processor output that the vision side needs besides ``pixel_values``.
    vision_input_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        self.check_config(hf_model.config)
        self.hf_model = hf_model
        self.processor = processor

    # 1. Which models
    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        """Raise :class:`~hooked_vllm.errors.UnsupportedModelError` for variants this family can't serve."""

    # 2. The language model
    @abstractmethod
    def language_model(self) -> PreTrainedModel:
        """A causal LM sharing the HF model's decoder layers, final norm and unembedding."""

    @property
    @abstractmethod
    def text_config(self) -> PretrainedConfig:
        """The language model's config."""

    # 3. Prompts and processing
    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id of the image placeholder positions in ``input_ids``."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The language model's tokenizer."""

    @abstractmethod
    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        """The prompt for ``instruction`` in this family's template, and the instruction's
        ``(start, end)`` character span in it."""

    @abstractmethod
    def count_image_slots(self, prompt: str) -> int:
        """How many images a (templated) prompt takes."""

    @abstractmethod
    def process(
        self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str
    ) -> Mapping[str, torch.Tensor]:
        """The HF processor call: ``input_ids``, ``attention_mask``, ``pixel_values`` and any
        :attr:`vision_input_names`."""

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fix up processor outputs so results do not depend on batch-mates (default: unchanged).

        Called once, by :func:`hooked_vllm.inputs.build_batch`, on every batch (prepared or raw)."""
        return inputs

    @abstractmethod
    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``prompt`` with each image slot as one placeholder token, and each token's
        character span (placeholders and added special tokens included)."""

    # 4. The vision side
    @abstractmethod
    def visual_prefix(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> Float[torch.Tensor, "n_images n_image_tokens d_model"]:
        """The embeddings HF places at the image positions, computed by HF's own functions."""

    @abstractmethod
    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        """``{hook name: module}``: modules whose output (first element if a tuple) gets a hook point."""


def causal_lm_view(
    text_config: PretrainedConfig, decoder: torch.nn.Module, lm_head: torch.nn.Module
) -> PreTrainedModel:
    """A ``*ForCausalLM`` whose decoder and head are the given modules (shared, not copied).

    Built on the meta device, so no memory is allocated for the placeholder weights it replaces.
    """
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(text_config, attn_implementation="eager")
    view.model = decoder
    view.lm_head = lm_head
    view.config.architectures = [type(view).__name__]
    return view.eval()
