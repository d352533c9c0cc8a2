"""The contract a VLM family fulfils. Adding a family means adding one module that subclasses
:class:`VLMAdapter` and registering it in ``hooked_vllm.adapters``.

An adapter knows one HF model family and nothing else. It answers five questions:

1. **Which HF classes and configs does it take?** ``architectures`` and :meth:`check_config`
   (refuse sub-variants it cannot serve, e.g. InstructBLIP with a Flan-T5 backbone).
2. **What is the language model?** :meth:`language_model` returns a ``*ForCausalLM`` that *shares*
   the HF model's decoder and unembedding (no copy). transformer-lens boots its bridge on it, so
   every block, norm and head is the HF module itself (:func:`causal_lm_view` builds one; a text
   config with no ``*ForCausalLM`` of its own, such as Qwen2-VL's, borrows a sibling's class).
   :meth:`bridge_settings` adjusts transformer-lens's config where the family computes a step
   differently from the model its adapter was written for; :meth:`language_hook_sites` gives hook
   points to modules transformer-lens leaves bare (GLM-4.5V's shared expert).
3. **How do prompts and images become model inputs?** :meth:`format_prompt` (the prompt template,
   returning where the user's instruction sits in it), :meth:`count_image_slots` and :meth:`process`
   (the HF processor call).
4. **What does HF feed the language model at the image positions, and where?** :meth:`visual_prefix`
   runs the vision side with HF's own functions and returns the vectors of every placeholder slot,
   ``[n_slots, d_model]`` in scatter order (images may differ in token count);
   :meth:`placeholder_mask` says where they go, :meth:`image_layouts` which slots are image patches
   (and where on the image) and which are structure (LLaVA-NeXT's row newlines);
   :meth:`vision_hook_sites` names the vision-side modules whose outputs get hook points.
   Where HF adds the vectors to the placeholder tokens' embeddings rather than replacing them
   (Molmo 2), :attr:`visual_prefix_added` says so. Families that also add visual features to the
   residual stream after early layers (Qwen3-VL's DeepStack) return them from
   :meth:`visual_features` and hand them to the language model with :meth:`injection_inputs`.
5. **How does the language model see the sequence?** :meth:`position_ids` (``[batch, pos]``, or
   ``[3, batch, pos]`` for M-RoPE) and :meth:`lm_attention_mask` (the 2-D padding mask, or the
   family's own: Gemma 3's bidirectional image blocks) for the prompt pass, as HF's outer
   ``forward`` computes them; :attr:`plain_causal` says whether that mask is causal plus padding.
   Decoding steps always use the 2-D mask and continue after the largest position.
   :attr:`attention_layers` names the layers that have an attention pattern (all, except in
   hybrid models: Qwen3.5's linear-attention layers have none); :attr:`decodes_left_padded` says
   whether generation must left-pad (sliding windows, layers that keep a recurrent state).
   :meth:`routed_experts` names the layers whose MLP is a sparse mixture of experts, and the HF
   module that loops over their experts (each expert's output gets a hook point; none elsewhere).
   :meth:`attention_forward` gives the attention bridges a step-by-step forward where
   transformer-lens keeps HF's attention whole (Llama 4), so that ``hook_pattern`` edits take effect.
   Where a layer adds more to the residual stream than its attention and MLP outputs, or scales the
   whole stream at its end (Gemma 4's per-layer inputs and ``layer_scalar``), :meth:`stream_terms`
   and :meth:`stream_scales` say so, and the residual decompositions count them.

Everything else (the bridge, hooks, caching, generation) is family-independent and lives in
:mod:`hooked_vllm.model`, :mod:`hooked_vllm.model.batch` and :mod:`hooked_vllm.model.generation`.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hooked_vllm.adapters.prompts import chat_prompt
from hooked_vllm.adapters.tokens import token_ids_with_spans
from hooked_vllm.errors import UnsupportedModelError


@dataclass(frozen=True)
class ImageSlots:
    """The placeholder slots one image fills, in sequence order.

    ``grid[k] = (tile, row, col)`` of slot k's patch: tile 0 is the whole image (LLaVA-NeXT's base
    view; the only tile elsewhere), tiles 1.. LLaVA-NeXT's high-resolution crops, row and col on that
    tile's patch grid (after any merge). Where the family resamples the crops into one canvas
    (LLaVA-OneVision's ``anyres_max`` downscale) no slot is one crop's patch: that canvas is tile 1,
    row and col on its resampled grid. A row of ``-1`` marks a structure slot that holds no patch
    (LLaVA-NeXT's ``image_newline``). ``spatial`` is False where slots are not patches at all
    (InstructBLIP's Q-Former queries: ``(0, 0, k)``).
    """

    grid: Int[torch.Tensor, "n_slots 3"]
    spatial: bool = True

    def __len__(self) -> int:
        return int(self.grid.shape[0])

    @property
    def is_patch(self) -> Bool[torch.Tensor, " n_slots"]:
        return self.grid[:, 1] >= 0

    def patch_index(self) -> dict[int, Int[torch.Tensor, "rows cols"]]:
        """``{tile: [rows, cols]}``: which patch (counting patch slots only, in sequence order) lies
        in each cell of each tile's grid; -1 where none does.

        Example:
            >>> ImageSlots.rows_by_cols(2, 3).patch_index()[0].tolist()
            [[0, 1, 2], [3, 4, 5]]
        """
        cells = self.grid[self.is_patch]
        index = {}
        for tile in sorted(set(cells[:, 0].tolist())):
            here = (cells[:, 0] == tile).nonzero().flatten()
            rows, cols = int(cells[here, 1].max()) + 1, int(cells[here, 2].max()) + 1
            grid = torch.full((rows, cols), -1, dtype=torch.long)
            grid[cells[here, 1], cells[here, 2]] = here
            index[tile] = grid
        return index

    @classmethod
    def square(cls, n_slots: int) -> ImageSlots:
        """Row-major slots of one square grid (LLaVA-1.5, Gemma 3); a non-square count is one row."""
        side = int(round(n_slots**0.5))
        if side * side != n_slots:
            return cls(_grid(0, torch.zeros(n_slots, dtype=torch.long), torch.arange(n_slots)), False)
        return cls.rows_by_cols(side, side)

    @classmethod
    def rows_by_cols(cls, rows: int, cols: int, tile: int = 0) -> ImageSlots:
        k = torch.arange(rows * cols)
        return cls(_grid(tile, k // cols, k % cols))


@dataclass(frozen=True)
class VisualFeatures:
    """What the vision side gives the language model: the prefix scattered into the placeholder
    slots, and features added to the residual stream at the image positions after layer
    ``injection_layers[i]`` (Qwen3-VL's DeepStack; none elsewhere). All ``[n_slots, d_model]``."""

    prefix: Float[torch.Tensor, "n_slots d_model"]
    injections: tuple[Float[torch.Tensor, "n_slots d_model"], ...] = ()


def _grid(tile: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.full_like(rows, tile), rows, cols], dim=-1)


def pixel_shuffled_grid(
    side: int, shuffle: Callable[[torch.Tensor], torch.Tensor], factor: int
) -> Int[torch.Tensor, "slots 2"]:
    """(row, col) of each slot of a tile of ``side`` x ``side`` patches, in the order of the model's own
    pixel shuffle: ``shuffle`` run on the patches' coordinates (``[side, side, 2]``, float64), each
    slot's row and col those of the first patch it merges, divided by the merge ``factor``."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    shuffled = shuffle(torch.stack([rows, cols], dim=-1).to(torch.float64))
    merged = shuffled.reshape(-1, shuffled.shape[-1] // 2, 2)  # [slots, patches per slot, (row, col)]
    return merged.amin(dim=1).long() // factor


def selected_image_features(hf_model: PreTrainedModel, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """HF's ``model.get_image_features(...).pooler_output`` with the config's ``vision_feature_layer``
    and ``vision_feature_select_strategy`` (LLaVA, InternVL, Aya Vision): ``[images or tiles, slots,
    d_model]`` or one tensor per image. ``kwargs`` go to ``get_image_features`` as they are."""
    config = hf_model.config
    return hf_model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        **kwargs,
    ).pooler_output


def thumbnail_last_layouts(
    tiles_per_image: list[int], grid: Int[torch.Tensor, "slots 2"]
) -> list[ImageSlots]:
    """Per image of ``tiles`` tiles, each of ``grid``'s slots: (tile, row, col) of each slot. **Tile 0 is
    the thumbnail** (the whole image on one tile), which comes *last* in the sequence; the crops come
    first, tiles 1, 2, ... in the processor's order. An image of one tile is tile 0 alone (InternVL,
    Aya Vision, Llama 4)."""
    layouts = []
    for tiles in tiles_per_image:
        labels = [0] if tiles == 1 else [*range(1, tiles), 0]
        cells = [torch.cat([torch.full((len(grid), 1), t), grid], dim=-1) for t in labels]
        layouts.append(ImageSlots(torch.cat(cells)))
    return layouts


class VLMAdapter(ABC):
    """One VLM family: see the module docstring for the contract."""

    #: Short family name, e.g. ``"llava"``.
    family: ClassVar[str]
    #: HF class names (``config.architectures[0]``) this adapter serves.
    architectures: ClassVar[tuple[str, ...]]
    #: Keys of a processor output that the vision side needs besides ``pixel_values``.
    vision_input_names: ClassVar[tuple[str, ...]] = ()
    #: Processor outputs with one entry per token (``[batch, pos]``): moved with the padding.
    token_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    #: Processor outputs with one entry per image along dim 0, in prompt order.
    image_input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: The oldest transformers release this family was measured exact against (None: the
    #: package's floor). Older releases compute the family differently; the model is then refused.
    min_transformers: ClassVar[str | None] = None
    #: Whether :meth:`lm_attention_mask` is causal attention plus padding (fused kernels may then
    #: use their causal shortcut, and the norm-based lens's pairs are key <= query).
    plain_causal: ClassVar[bool] = True
    #: Whether HF *adds* :meth:`visual_prefix`'s vectors to the placeholder tokens' own embeddings
    #: (Molmo 2) instead of putting them in their place (every other family: False). Either way
    #: ``hook_visual_prefix`` is the vision side's vectors, and zeroing it removes the image's
    #: contribution as zeroing HF's image features does: the slots then hold zeros (in place) or
    #: their token's embedding (added).
    visual_prefix_added: ClassVar[bool] = False
    #: ``{per-image input: per-image input it indexes}``: inputs that hold indices (-1: none) into
    #: another input flattened over all but its last dimension, offset over the batch's earlier
    #: images (Molmo 2's ``image_token_pooling`` into the ``pixel_values`` patches). Selecting
    #: items re-bases them onto the selected images. Default: none.
    image_index_inputs: ClassVar[dict[str, str]] = {}
    #: ``{per-image input: dimension}`` for per-image inputs whose images lie along another dimension
    #: than 0 (MiniCPM-V 4.6's NaViT-packed ``pixel_values``, ``[1, channels, patch, columns]``: each
    #: image's columns along dim -1). :meth:`image_input_rows` counts along it, and selecting items
    #: slices along it. Default: none (every per-image input along dim 0).
    image_input_dims: ClassVar[dict[str, int]] = {}

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        self.check_config(hf_model.config)
        self.hf_model = hf_model
        self.processor = processor

    # 1. Which models
    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        """Raise :class:`~hooked_vllm.errors.UnsupportedModelError` for variants this family can't serve."""

    @classmethod
    def check_transformers(cls) -> None:
        """Refuse a transformers release older than :attr:`min_transformers`."""
        if cls.min_transformers is None:
            return
        installed = installed_transformers()
        if Version(installed) < Version(cls.min_transformers):
            upgrade = upgrade_range(cls.min_transformers)
            raise UnsupportedModelError(
                f"{'/'.join(cls.architectures)} needs transformers >= {cls.min_transformers} (installed: "
                f"{installed}): older releases compute this family differently from the release our "
                f"parity tests pass on. Upgrade: pip install 'transformers{upgrade}'."
            )

    # 2. The language model
    #: The ``*ForCausalLM`` class of the language-model view (None: ``AutoModelForCausalLM``'s pick for
    #: the text config; Qwen*-VL name a sibling, their text configs having none of their own).
    view_class: ClassVar[type[PreTrainedModel] | None] = None

    def language_model(self) -> PreTrainedModel:
        """A causal LM sharing the HF model's decoder layers, final norm and unembedding (default: a
        :func:`causal_lm_view` of ``hf_model.model.get_decoder()`` and ``hf_model.lm_head``)."""
        return causal_lm_view(
            self.text_config, self.hf_model.model.get_decoder(), self.hf_model.lm_head, self.view_class
        )

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config."""
        return self.hf_model.config.get_text_config()

    # 3. Prompts and processing
    #: What a prompt writes for one image (the processor expands it into the image's slots).
    image_placeholder: ClassVar[str] = "<image>"
    #: The prompt where the processor has no chat template: ``{images}`` (the images' text,
    #: newline-separated) and ``{instruction}``.
    template: ClassVar[str] = "{images}{instruction}"
    #: The text of one image in :attr:`template` (default: the placeholder alone).
    image_text: ClassVar[str | None] = None
    #: Whether the processor takes each prompt's images as a list of their own (Gemma 3, Idefics3,
    #: LLaVA-OneVision, whose several images in one prompt are then laid out as such).
    images_per_prompt: ClassVar[bool] = False

    @property
    def image_token_id(self) -> int:
        """Token id of the image placeholder positions in ``input_ids``."""
        return int(self.hf_model.config.image_token_id)

    @property
    def tokenizer(self) -> Any:
        """The language model's tokenizer."""
        return self.processor.tokenizer

    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        """The prompt for ``instruction`` in this family's template, and the instruction's
        ``(start, end)`` character span in it (default: the processor's chat template, else
        :attr:`template`)."""
        return chat_prompt(
            self.processor, instruction, n_images, self.template, self.image_placeholder, self.image_text
        )

    @property
    def prompt_markers(self) -> tuple[str, ...]:
        """Texts the processor reads as an image or a video wherever they stand in a prompt: the
        placeholder, the image and video tokens, and the processor's ``image_token``/``video_token``
        (InternVL's ``<video>``). Dataset text holding one is refused."""
        tokens = self.tokenizer.convert_ids_to_tokens([self.image_token_id, *self.video_token_ids])
        named = [getattr(self.processor, name, None) for name in ("image_token", "video_token")]
        texts = (self.image_placeholder, *tokens, *(str(token) for token in named if token))  # AddedToken
        return tuple(dict.fromkeys(text for text in texts if text))

    def count_image_slots(self, prompt: str) -> int:
        """How many images a (templated) prompt takes."""
        return prompt.count(self.image_placeholder)

    def process(
        self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str
    ) -> Mapping[str, torch.Tensor]:
        """The HF processor call: ``input_ids``, ``attention_mask``, ``pixel_values`` and any
        :attr:`vision_input_names` (the images one flat list, or one list per prompt where
        :attr:`images_per_prompt`)."""
        if self.images_per_prompt:
            per_prompt, start = [], 0
            for prompt in prompts:
                n = self.count_image_slots(prompt)
                per_prompt.append(list(images[start : start + n]))
                start += n
            images = per_prompt if start else []
        return self.processor(
            images=list(images) or None,
            text=list(prompts),
            return_tensors="pt",
            padding=True,
            padding_side=padding_side,
        )

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fix up processor outputs so results do not depend on batch-mates (default: unchanged).

        Called once, by :func:`hooked_vllm.model.batch.build_batch`, on every batch (prepared or raw)."""
        return inputs

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``prompt`` with each image slot as one placeholder token, and each token's
        character span (placeholders and added special tokens included)."""
        return token_ids_with_spans(self.tokenizer, prompt)

    # 4. The vision side and where it goes
    @abstractmethod
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        """The vectors HF places at the placeholder slots (or adds to their embeddings, where
        :attr:`visual_prefix_added`), in scatter order (all images, one after another), computed by
        HF's own functions."""

    @abstractmethod
    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        """``{hook name: module}``: modules whose output (first element if a tuple) gets a hook point."""

    def visual_features(self, inputs: Mapping[str, torch.Tensor]) -> VisualFeatures:
        """The prefix and any residual-stream injections, from one run of the vision side
        (default: :meth:`visual_prefix`, no injection)."""
        return VisualFeatures(self.visual_prefix(inputs))

    @property
    def injection_layers(self) -> tuple[int, ...]:
        """The layers after which :meth:`visual_features`' injections are added (default: none)."""
        return ()

    def injection_inputs(
        self, injections: Sequence[Float[torch.Tensor, "batch pos d_model"]]
    ) -> dict[str, Any]:
        """The language model's keyword inputs that add ``injections`` (one per injection layer,
        zero outside the image positions) to the residual stream."""
        if injections:
            raise NotImplementedError(f"{type(self).__name__} adds no features to the residual stream.")
        return {}

    @property
    def video_token_ids(self) -> list[int]:
        """Token ids of video placeholders in this family's vocabulary (videos are not supported)."""
        config = self.hf_model.config
        ids = [getattr(config, name, None) for name in ("video_token_id", "video_token_index")]
        return [int(i) for i in ids if i is not None]

    def placeholder_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The positions :meth:`visual_prefix` fills (default: the image token)."""
        return input_ids == self.image_token_id

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The positions of the text the processor writes in place of each image placeholder: the
        slots :meth:`placeholder_mask` names and any structure tokens around them that the prompt does
        not hold (Idefics3's ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>`` and row
        newlines). Never instruction text (default: the placeholders)."""
        return self.placeholder_mask(input_ids)

    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """How many images the batch holds (default: ``pixel_values``' first dimension)."""
        pixels = inputs.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[0])

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image, in prompt order, the slots it fills (default: every image the same number of
        slots, row-major on a square grid)."""
        n_images = self.n_images(inputs)
        if n_images == 0:
            return []
        n_slots = int(
            self.placeholder_mask(inputs["input_ids"]).logical_and(inputs["attention_mask"].bool()).sum()
        )
        return [ImageSlots.square(n_slots // n_images)] * n_images

    def image_region(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The box ``(left, top, right, bottom)``, in pixels of an original image of ``size``
        (width, height), that tile 0's patch grid covers: what a figure lays that grid over.
        Default: the whole image (processors that resize the whole image onto the grid, or keep its
        aspect ratio); LLaVA-1.5's centre crop overrides it."""
        width, height = size
        return (0.0, 0.0, float(width), float(height))

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """For each per-image input, how many rows along dim 0 (or its :attr:`image_input_dims`
        dimension) each image has (default: one row per image in :attr:`image_input_names`); selecting
        items slices these by image."""
        n_images = self.n_images(inputs)
        return {name: [1] * n_images for name in self.image_input_names if name in inputs}

    # 5. How the language model sees the sequence
    def position_ids(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, "3 batch pos"]:
        """Position ids of the prompt, counted over real tokens (default: ``cumsum(mask) - 1``)."""
        return positions_from_mask(inputs["attention_mask"])

    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The attention mask the language model gets for the prompt pass (default: the 2-D padding
        mask, from which HF builds the causal one)."""
        return inputs["attention_mask"].to(inputs_embeds.device)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The language-model layers that have an attention pattern (``blocks.{l}.attn``): every
        layer but those whose ``layer_types`` entry in the text config is one of
        :data:`NO_PATTERN_LAYER_TYPES` (Qwen3.5's Gated DeltaNet layers). The attention lenses,
        knockout and attention-based token selection read these layers only; the other layers mix
        positions too (a recurrence, a convolution), but through no pattern to read or edit."""
        config = self.text_config
        kinds = list(getattr(config, "layer_types", None) or ())
        n_layers = int(config.num_hidden_layers)
        if not kinds:
            return tuple(range(n_layers))
        return tuple(layer for layer in range(n_layers) if kinds[layer] not in NO_PATTERN_LAYER_TYPES)

    #: The bridge's name of the token mixer of the layers with no attention pattern
    #: (``blocks.{l}.<name>``, whose ``hook_in`` pruning zeroes and whose ``hook_out`` is the layer's
    #: term in ``decompose_resid``): Qwen3.5's Gated DeltaNet ``linear_attn``, LFM2's ``conv``.
    mixer_without_pattern: ClassVar[str] = "linear_attn"

    @property
    def decodes_left_padded(self) -> bool:
        """Whether generation must run on a left-padded batch: sliding windows count cache slots,
        and layers with no attention pattern keep a state (convolution, recurrence) that a
        right-padded item's padding would run into."""
        n_layers = int(self.text_config.num_hidden_layers)
        return self.sliding_window is not None or len(self.attention_layers) < n_layers

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        """``{layer: module}``: the language-model layers whose MLP is a sparse mixture of experts,
        each with the HF module that runs its routed experts in one loop (Qwen3.5-MoE's
        ``mlp.experts``). Each expert's weighted output there becomes the hook point
        ``blocks.{l}.mlp.experts.{e}.hook_out`` (:mod:`hooked_vllm.model.experts`). Default: none (a
        dense MLP, or an MoE whose experts keep transformer-lens's block-level hooks only)."""
        return {}

    def attention_forward(self) -> Callable[..., Any] | None:
        """A forward for transformer-lens's attention bridges (``blocks.{l}.attn``, the layers of
        :attr:`attention_layers`), ``forward(bridge, *args, **kwargs)`` called as the HF attention module
        is, where transformer-lens keeps HF's attention whole and fires ``hook_pattern`` only after the
        fact (an edit there would change nothing): the family's attention step by step with the
        bridge's hook points in TransformerLens's places (Llama 4). Default: None (the bridge's own)."""
        return None

    def language_hook_sites(self) -> dict[str, torch.nn.Module]:
        """``{hook name: module}``: language-model modules that transformer-lens's adapter gives no
        hook point, whose output (first element if a tuple) gets one, named in its grammar
        (GLM-4.5V's shared expert: ``blocks.{l}.mlp.shared_experts.hook_out``). Default: none."""
        return {}

    def bridge_settings(self) -> dict[str, Any]:
        """transformer-lens config fields set on the booted bridge, where the family computes a
        step differently from the text model transformer-lens's adapter was written for (GLM-4.1V's
        rotary embedding hands over (cos, sin) already interleaved: ``rotary_interleaved_cos_sin``).
        Default: none."""
        return {}

    def lm_extra_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Keyword inputs of the language model's prompt pass computed from the batch's token inputs,
        besides the embeddings, mask, positions and injections: Gemma 4's ``per_layer_inputs`` (the
        token-identity half of its per-layer embeddings, which HF computes from the token ids, not
        from the embeddings the language model gets). Decoding steps pass token ids, from which the
        language model computes them itself. Default: none."""
        return {}

    def per_layer_input_sites(self) -> dict[int, torch.nn.Module]:
        """``{layer: HF decoder layer}``: layers that take an input of their own besides the residual
        stream, as the argument ``per_layer_input`` (Gemma 4's per-layer embeddings). It becomes the
        hook point ``blocks.{l}.hook_per_layer_input``; an edit there is what the layer gets.
        Default: none."""
        return {}

    def stream_terms(self) -> dict[int, dict[str, str]]:
        """``{layer: {label: hook name}}``: vectors a layer adds to the residual stream besides its
        attention and MLP outputs (before any :meth:`stream_scales` scale), each the output of a hook
        point: Gemma 4's per-layer-input branch, ``{"per_layer_input":
        "blocks.{l}.post_per_layer_input_norm.hook_out"}``. The residual decompositions count each as
        the term ``"{layer}_{label}"`` (after ``"{layer}_mlp_out"``). Default: none."""
        return {}

    #: Whether each layer's output stream is the stream it read plus its terms (times its
    #: :meth:`stream_scales` scale). False where layers mix several streams (Gemma 3n's AltUp): the
    #: residual decompositions are then refused, their terms could not sum to the stream.
    additive_stream: ClassVar[bool] = True

    def lens_hooks(self) -> list[str]:
        """The hook points the logit lens decodes, ``n_layers + 1`` of them: the embedding's, then each
        layer's output, each read through :meth:`lens_input`. Default: ``blocks.0.hook_resid_pre`` and
        ``blocks.{l}.hook_resid_post`` (the final norm reads the residual stream). Gemma 3n's final
        norm reads the average of its four AltUp streams: ``blocks.0.hook_in``, ``blocks.{l}.hook_out``."""
        n_layers = int(self.text_config.num_hidden_layers)
        return ["blocks.0.hook_resid_pre", *(f"blocks.{layer}.hook_resid_post" for layer in range(n_layers))]

    def lens_input(self, activation: torch.Tensor) -> Float[torch.Tensor, "... d_model"]:
        """What the final norm would read, from an activation of one of :meth:`lens_hooks` (default:
        the activation itself; Gemma 3n: HF's readout of the four streams, ``[4, ..., d]`` in)."""
        return activation

    def stream_scales(self) -> dict[int, Float[torch.Tensor, "*d_model"]]:
        """``{layer: scale}``: layers whose last step multiplies the whole residual stream by ``scale``
        (a scalar or ``[d_model]``), after every term they add: Gemma 4's ``layer_scalar``. The
        residual decompositions multiply each term by the scales of the layers it passes through, so
        the terms still sum to the stream. Default: none."""
        return {}

    def value_hooks(self) -> dict[int, str]:
        """``{layer: hook name}`` for each layer of :attr:`attention_layers`: the hook point holding the
        value vectors its pattern weighs, ``[batch, key, kv_head, d_head]`` (default
        ``blocks.{l}.attn.hook_v``). The norm-based lens and pruning's saliency read them. Gemma 4
        normalises values after ``v_proj`` (``attn.v_norm.hook_out``), and its KV-shared layers weigh
        the values of an earlier layer."""
        return {layer: f"blocks.{layer}.attn.hook_v" for layer in self.attention_layers}

    @property
    def sliding_window(self) -> int | None:
        """The window of the language model's sliding-window layers, if it has any."""
        config = self.text_config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ()
        if window is None or (layer_types and "sliding_attention" not in layer_types):
            return None
        if not layer_types and not getattr(config, "use_sliding_window", True):
            return None
        return int(window)


#: ``layer_types`` entries (HF's names) of layers that mix positions without an attention pattern
NO_PATTERN_LAYER_TYPES = ("linear_attention", "conv", "mamba", "recurrent")


def kv_shared_value_hooks(text_config: PretrainedConfig) -> dict[int, str]:
    """``{layer: hook}`` of the values each layer weighs where later layers reuse an earlier layer's
    keys and values (Gemma 3n, Gemma 4: ``kv_sharing_modes``): ``v_norm``'s output of the last earlier
    layer of the same type that computes its own."""
    source: dict[str, int] = {}
    hooks = {}
    modes = zip(text_config.layer_types, text_config.kv_sharing_modes, strict=True)
    for layer, (kind, mode) in enumerate(modes):
        if mode != "reuse":
            source[kind] = layer
        hooks[layer] = f"blocks.{source[kind]}.attn.v_norm.hook_out"
    return hooks


def installed_transformers() -> str:
    """The installed transformers release (its distribution's metadata)."""
    return importlib.metadata.version("transformers")


def no_kv_cache(function: Any) -> dict[str, None]:
    """``{name: None}``: "no KV cache" for one of transformers' mask builders, under the name it takes.

    transformers 5.24 renamed their ``past_key_values`` parameter to ``cache``: Gemma 3's
    ``create_masks_for_vision_model`` takes only the new name from 5.24 on (the old one is a TypeError),
    ``create_causal_mask`` and ``create_sliding_window_causal_mask`` take both until 5.40. Releases up
    to 5.23 take only ``past_key_values``."""
    parameters = inspect.signature(function).parameters
    return {"cache" if "cache" in parameters else "past_key_values": None}


def upgrade_range(minimum: str) -> str:
    """``>=minimum`` with the ceiling hooked-vllm declares for transformers (its installed metadata,
    i.e. pyproject.toml's range), so that an upgrade hint never names a release the package excludes."""
    try:
        requires = importlib.metadata.requires("hooked-vllm") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requires = []
    for requirement in map(Requirement, requires):
        if requirement.name == "transformers" and requirement.marker is None:
            ceilings = sorted(str(s) for s in requirement.specifier if s.operator in ("<", "<="))
            return ",".join([f">={minimum}", *ceilings])
    return f">={minimum}"


def positions_from_mask(
    attention_mask: Int[torch.Tensor, "batch pos"],
) -> Int[torch.Tensor, "batch pos"]:
    """Position ids counted over real tokens only (padding gets 1, as in HF's ``generate``)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def causal_lm_view(
    text_config: PretrainedConfig,
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module,
    view_class: type[PreTrainedModel] | None = None,
) -> PreTrainedModel:
    """A ``*ForCausalLM`` whose decoder and head are the given modules (shared, not copied).

    ``view_class`` (default: ``AutoModelForCausalLM``'s pick for ``text_config``) names the class
    whose module layout transformer-lens reads; a text config with no ``*ForCausalLM`` of its own
    (Qwen2-VL's) borrows a sibling with the same decoder-layer names, its config converted to the
    sibling's config class (``rope_parameters`` kept as they are: the math stays in ``decoder``).
    Built on the meta device, so no memory is allocated for the placeholder weights it replaces.
    """
    if view_class is not None:
        fields = {
            k: v
            for k, v in text_config.to_dict().items()
            if k not in ("model_type", "architectures", "rope_parameters", "transformers_version")
        }
        config = view_class.config_class(**fields)
        if getattr(text_config, "rope_parameters", None) is not None:
            config.rope_parameters = dict(text_config.rope_parameters)
        with torch.device("meta"):
            view = view_class._from_config(config, attn_implementation="eager")
    else:
        with torch.device("meta"):
            view = AutoModelForCausalLM.from_config(text_config, attn_implementation="eager")
    view.model = decoder
    view.lm_head = lm_head
    view.config.architectures = [type(view).__name__]
    return view.eval()
