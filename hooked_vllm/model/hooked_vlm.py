"""HookedVLM: a vision LLM whose language backbone runs inside transformer-lens's TransformerBridge.

The adapter builds exactly the input embeddings HF builds (text token embeddings with the visual
prefix scattered into the image positions); the bridge runs the HF decoder itself on them, so every
activation is HF's. Hook names are TransformerLens's (``blocks.{l}.hook_resid_post``,
``blocks.{l}.attn.hook_pattern``, ``hook_embed``, ...) plus ours in the same grammar:

- ``hook_visual_prefix``: ``[n_slots, d_model]``, the vectors placed at the image placeholder
  positions, in their order (``cache["hook_embed"][vlm.adapter.placeholder_mask(batch.input_ids)]``);
  in a family that adds them to the placeholder tokens' embeddings instead (Molmo 2,
  ``vlm.adapter.visual_prefix_added``), the vectors added: ``hook_embed`` there is the token's
  embedding plus them, and zeroing the hook leaves the token's embedding, as in HF;
- ``vision.blocks.{l}.hook_resid_post``: the vision tower's layer outputs;
- ``qformer.blocks.{l}.hook_resid_post``: InstructBLIP's Q-Former layer outputs;
- ``blocks.{l}.mlp.experts.{e}.hook_out``: a mixture-of-experts layer's expert e, its weighted output
  (:mod:`hooked_vllm.model.experts`);
- the adapter's ``language_hook_sites``: language-model modules transformer-lens leaves without a hook
  point (GLM-4.5V's ``blocks.{l}.mlp.shared_experts.hook_out`` and ``blocks.{l}.mlp.experts.hook_out``).

Example:
    >>> from hooked_vllm import HookedVLM
    >>> vlm = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16,
    ...                                 device="cuda")  # doctest: +SKIP
    >>> batch = vlm.prepare(images=[image], prompts=["Describe the image."])  # doctest: +SKIP
    >>> logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: "resid_post" in n)  # doctest: +SKIP
    >>> cache["resid_post", 10][batch.image_mask].shape  # doctest: +SKIP
    torch.Size([576, 4096])
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import transformers
from jaxtyping import Float, Int
from safetensors import SafetensorError

from hooked_vllm.adapters import VLMAdapter, adapter_class_for
from hooked_vllm.errors import (
    BatchFormatError,
    CheckpointError,
    HookOutputError,
    ImageCountError,
    MissingImageError,
    ModelNotFoundError,
    SequenceTooLongError,
)
from hooked_vllm.model import observed_attention
from hooked_vllm.model import sae as sae_lib
from hooked_vllm.model.batch import BatchLike, ModelInput, NamesFilter, VLMBatch, build_batch
from hooked_vllm.model.cache import VLMActivationCache
from hooked_vllm.model.experts import install_expert_hooks
from hooked_vllm.model.experts import unwrap as unwrap_experts
from hooked_vllm.model.generation import GenerationMixin
from hooked_vllm.model.images import ImageLike, item_images, to_rgb
from hooked_vllm.model.loading import resolve_source
from hooked_vllm.model.loss import check_return_type, lm_labels, lm_loss
from hooked_vllm.model.text_tokens import TokensMixin
from hooked_vllm.model.tl import ActivationCache, HookPoint, TransformerBridge, boot
from hooked_vllm.model.tl import utilities as utils


class HookedVLM(TokensMixin, GenerationMixin):
    """A hooked vision LLM: any family of ``hooked_vllm.adapters`` (LLaVA-1.5, InstructBLIP with a
    decoder-only backbone, LLaVA-NeXT, LLaVA-OneVision, Qwen2/2.5/3-VL, Gemma 3, Idefics3, SmolVLM,
    InternVL, PaliGemma).

    Build one with :meth:`from_pretrained` (hub id or local directory) or :meth:`from_hf`
    (an in-memory HF model and its processor). The HF model's language modules are wrapped in
    place by transformer-lens; keep a copy first if you need the untouched model.
    """

    def __init__(self, hf_model: transformers.PreTrainedModel, processor: Any) -> None:
        adapter_cls = adapter_class_for(hf_model.config)
        self.hf_model = hf_model.eval()
        self.processor = processor
        self.adapter: VLMAdapter = adapter_cls(hf_model, processor)
        language_model = self.adapter.language_model()
        first_param = next(language_model.parameters())
        # transformer-lens may reconfigure the tokenizer it is given: hand it a copy, so the
        # processor's own tokenizer (padding side, special tokens) stays as loaded.
        self.bridge: TransformerBridge = boot(
            getattr(hf_model.config, "_name_or_path", "") or self.adapter.family,
            hf_model=language_model,
            tokenizer=copy.deepcopy(self.adapter.tokenizer),
            dtype=first_param.dtype,
            device=first_param.device,
        )
        _apply_bridge_settings(self.bridge, self.adapter.bridge_settings())
        self.hook_visual_prefix = HookPoint()
        self._extra_hook_points: dict[str, HookPoint] = {"hook_visual_prefix": self.hook_visual_prefix}
        #: ``blocks.{l}.hook_deepstack``: ``[batch, pos, d_model]`` added to the residual stream after
        #: block l (zero outside the image positions): Qwen3-VL's DeepStack features
        self._injection_points = {
            layer: self._extra_hook_points.setdefault(f"blocks.{layer}.hook_deepstack", HookPoint())
            for layer in self.adapter.injection_layers
        }
        for name, module in self.adapter.vision_hook_sites().items():
            point = HookPoint()
            self._extra_hook_points[name] = point
            module.register_forward_hook(_route_output_through(point), prepend=True)
        for name, module in self.adapter.language_hook_sites().items():
            point = self._extra_hook_points.setdefault(name, HookPoint())
            unwrap_experts(module).register_forward_hook(_route_output_through(point), prepend=True)
        #: ``blocks.{l}.hook_per_layer_input``: what layer l gets besides the stream (Gemma 4's
        #: per-layer embeddings)
        for layer, module in self.adapter.per_layer_input_sites().items():
            point = self._extra_hook_points.setdefault(f"blocks.{layer}.hook_per_layer_input", HookPoint())
            layer_module = unwrap_experts(module)
            # its position among the arguments: Gemma 4's layers take it second, Gemma 3n's third
            index = list(inspect.signature(layer_module.forward).parameters).index("per_layer_input")
            layer_module.register_forward_pre_hook(
                _route_argument_through(point, "per_layer_input", index), with_kwargs=True, prepend=True
            )
        #: ``blocks.{l}.mlp.experts.{e}.hook_out``: each routed expert's weighted output (MoE layers)
        for layer, experts in self.adapter.routed_experts().items():
            n_experts = int(unwrap_experts(experts).num_experts)
            names = [f"blocks.{layer}.mlp.experts.{e}.hook_out" for e in range(n_experts)]
            install_expert_hooks(experts, [self._extra_hook_points.setdefault(n, HookPoint()) for n in names])
        #: the family's step-by-step attention where transformer-lens keeps HF's whole (Llama 4); set on
        #: the bridge instance, so observed_attention's sdpa switch still swaps and restores it
        attention_forward = self.adapter.attention_forward()
        if attention_forward is not None:
            for layer in self.adapter.attention_layers:
                bridge = self.bridge.blocks[layer].attn
                object.__setattr__(bridge, "forward", types.MethodType(attention_forward, bridge))
                # its hook_attn_scores and hook_pattern are live now (knockout and pruning edit them)
                object.__setattr__(bridge, "maintain_native_attention", False)
        self._register_hook_points()
        #: run attention as HF sdpa where no step-by-step-only hook needs the bridge's path (opt-in:
        #: see :meth:`forward`)
        self.use_sdpa = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        use_safetensors: bool = True,
        strict: bool = True,
        **model_kwargs: Any,
    ) -> HookedVLM:
        """Load model and processor from a hub id, a local directory, or ``"demo"`` (the demo model
        shipped with the package), as HF does.

        A hub id is read from the local Hugging Face cache when it is there; when it is not and the hub
        cannot be reached, a one-line :class:`~hooked_vllm.errors.ModelNotFoundError` says so within
        seconds (HF's own loaders retry for half a minute), as it does for a folder without a checkpoint.

        The architecture is checked from the config before any weight is read. Weights load with
        eager attention (patterns are observable) and from safetensors unless ``use_safetensors=False``.
        Every tensor the model expects must come from the checkpoint with its shape: missing,
        unexpected or mis-shaped tensors raise :class:`~hooked_vllm.errors.CheckpointError` naming
        them (HF would leave missing ones at random initialisation). ``strict=False`` loads anyway
        and only warns.

        Example:
            >>> vlm = HookedVLM.from_pretrained("Salesforce/instructblip-vicuna-7b",
            ...                                 dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        """
        source = resolve_source(name_or_path)
        where, hub = source.location, source.hf_kwargs
        with _one_line_load_errors(name_or_path):
            config = transformers.AutoConfig.from_pretrained(
                where, trust_remote_code=trust_remote_code, **hub
            )
        adapter_class_for(config)  # refuse unsupported models before loading weights
        model_class = getattr(transformers, config.architectures[0])
        try:
            with _one_line_load_errors(name_or_path):
                hf_model, loading_info = model_class.from_pretrained(
                    where,
                    dtype=dtype,
                    attn_implementation="eager",
                    device_map=device_map,
                    use_safetensors=use_safetensors,
                    trust_remote_code=trust_remote_code,
                    ignore_mismatched_sizes=True,  # reported below, by name, with the shapes
                    output_loading_info=True,
                    **hub,
                    **model_kwargs,
                )
        except (RuntimeError, SafetensorError) as exc:  # HF's state-dict errors, unreadable weight files
            raise CheckpointError(f"Could not load the weights of {name_or_path}: {exc}") from exc
        check_loading_info(loading_info, name_or_path, strict=strict)
        if device is not None and device_map is None:
            hf_model = hf_model.to(device)
        with _one_line_load_errors(name_or_path):
            processor = transformers.AutoProcessor.from_pretrained(
                where, trust_remote_code=trust_remote_code, **hub
            )
        return cls(hf_model, processor)

    @classmethod
    def from_hf(cls, hf_model: transformers.PreTrainedModel, processor: Any) -> HookedVLM:
        """Wrap an in-memory HF model and its processor."""
        return cls(hf_model, processor)

    # ------------------------------------------------------------------ config and weights
    @property
    def cfg(self) -> Any:
        """The bridge's TransformerLens config of the language model (``n_layers``, ``d_model``...)."""
        return self.bridge.cfg

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    @property
    def n_ctx(self) -> int:
        return int(self.adapter.text_config.max_position_embeddings)

    def __getattr__(self, name: str) -> Any:
        # W_Q, W_K, W_V, W_O, W_U, blocks, ln_final, ... come from the bridge, as on HookedTransformer.
        if name.startswith("_") or name in ("bridge", "adapter", "hf_model", "processor"):
            raise AttributeError(name)
        return getattr(self.bridge, name)

    # ------------------------------------------------------------------ inputs
    def prepare(
        self,
        images: Sequence[ImageLike | Sequence[ImageLike]] | ImageLike,
        prompts: Sequence[str] | str,
        *,
        apply_template: bool = True,
        padding_side: str = "left",
    ) -> VLMBatch:
        """Template the prompts, run the processor, and return a :class:`VLMBatch` with modality masks.

        ``images`` has one entry per prompt: an image (PIL, array or file path) or a list of images
        for prompts with several. Images are converted to 8-bit RGB (see :mod:`hooked_vllm.model.images`).
        With ``apply_template=False`` prompts are used as given and must contain the placeholders.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(prompts) == 0:
            raise BatchFormatError(
                "No prompts were given (an empty batch). Pass at least one prompt and its image(s)."
            )
        if len(images) != len(prompts):
            raise ImageCountError(
                f"Got {len(images)} image entries for {len(prompts)} prompts. Pass one entry per "
                "prompt (a list of images for a prompt that takes several)."
            )
        per_item = [item_images(item) for item in images]
        texts, spans = [], []
        for instruction, prompt_images in zip(prompts, per_item):
            if apply_template:
                text, span = self.adapter.format_prompt(instruction, len(prompt_images))
            else:
                text, span = instruction, (0, len(instruction))
            slots = self.adapter.count_image_slots(text)
            if slots != len(prompt_images):
                raise ImageCountError(
                    f"Prompt {text!r} has {slots} image placeholder(s) but {len(prompt_images)} "
                    "image(s) were given for it. Give one image per placeholder."
                )
            texts.append(text)
            spans.append(span)
        flat_images = [to_rgb(image) for item in per_item for image in item]
        inputs = self.adapter.process(flat_images, texts, padding_side)
        batch = build_batch(self.adapter, inputs, texts, spans, instructions=list(prompts))
        self._check_length(batch)
        return batch

    def to_batch(
        self,
        input: ModelInput,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> VLMBatch:
        """A :class:`VLMBatch` from any input the model takes.

        - a :class:`VLMBatch` (from :meth:`prepare`): image + text, returned as is;
        - a processor output (``BatchFeature``/dict of tensors);
        - text only, as TransformerLens takes it: a string, a list of strings (tokenized as
          :meth:`to_tokens` does, ``prepend_bos`` and ``padding_side`` as there) or a token tensor
          ``[batch, pos]`` / ``[pos]`` (every position real unless ``attention_mask`` says otherwise).

        Text holding an image placeholder is refused: images come only through :meth:`prepare`.
        """
        if isinstance(input, VLMBatch):
            return input
        if isinstance(input, Mapping):
            return build_batch(self.adapter, dict(input))
        if isinstance(input, str) or (
            isinstance(input, (list, tuple)) and input and all(isinstance(x, str) for x in input)
        ):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None:
                attention_mask = utils.get_attention_mask(
                    self.bridge.tokenizer,
                    tokens,
                    self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos,
                    padding_side,
                )
            input = tokens
        if isinstance(input, torch.Tensor) and not input.is_floating_point() and input.dim() in (1, 2):
            tokens = input.unsqueeze(0) if input.dim() == 1 else input
            mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.reshape(tokens.shape)
            return build_batch(self.adapter, {"input_ids": tokens.cpu(), "attention_mask": mask.long().cpu()})
        got = type(input).__name__
        if isinstance(input, torch.Tensor):
            got += f" of shape {tuple(input.shape)} and dtype {input.dtype}"
        raise BatchFormatError(
            "Expected a VLMBatch, a processor output, a string, a list of strings or a [batch, pos] "
            f"token tensor; got {got}. For image + text use vlm.prepare(images=..., prompts=...)."
        )

    def _check_length(self, batch: VLMBatch, extra_tokens: int = 0) -> None:
        longest = int(batch.attention_mask.sum(-1).max()) + extra_tokens
        if longest > self.n_ctx:
            raise SequenceTooLongError(
                f"A sequence needs {longest} positions (image tokens included"
                f"{', plus generated tokens' if extra_tokens else ''}) but the language model's context "
                f"is {self.n_ctx}. Shorten the prompt, use fewer images per prompt, or lower max_new_tokens."
            )

    # ------------------------------------------------------------------ forward
    def embed(self, batch: BatchLike) -> Float[torch.Tensor, "batch pos d_model"]:
        """The language model's input embeddings, built as HF builds them.

        Text tokens go through the language model's embedding; the vision side runs through HF's
        own functions (``vision.*`` hooks), its output through ``hook_visual_prefix``, and is
        scattered into the image-placeholder positions (added to their token embeddings where the
        family does that: Molmo 2). ``hook_embed`` sees the result: what the
        residual stream starts from, the visual prefix at image positions (so residual
        decompositions and direct logit attribution are exact there too).
        """
        return self._embed_with_injections(self.to_batch(batch))[0]

    def _embed_with_injections(
        self, batch: VLMBatch
    ) -> tuple[Float[torch.Tensor, "batch pos d_model"], list[Float[torch.Tensor, "batch pos d_model"]]]:
        """:meth:`embed`, and the features to add after the injection layers (through their hooks)."""
        device = self.bridge.cfg.device
        embedding = self.bridge.embed
        input_ids = embedding.hook_in(batch.input_ids.to(device))
        placeholders = self.adapter.placeholder_mask(input_ids)
        added = self.adapter.visual_prefix_added
        # Placeholder ids may lie outside the text vocabulary (HF embeds them as id 0); their
        # embeddings are replaced by the visual prefix below (or kept, where it is added to them).
        embeds = embedding.original_component(input_ids if added else input_ids.masked_fill(placeholders, 0))
        n_slots = int(placeholders.sum())
        if batch.pixel_values is None:
            if n_slots:
                raise MissingImageError(
                    f"The batch has {n_slots} image placeholder positions but no 'pixel_values'. "
                    "Pass the images through vlm.prepare(images=..., prompts=...) or the processor."
                )
            return embedding.hook_out(embeds), []
        if n_slots == 0:
            raise MissingImageError(
                "The batch has 'pixel_values' but no image placeholder tokens in 'input_ids', so the "
                "image would be silently ignored. Build the batch with vlm.prepare or the model's "
                "processor, which insert the placeholders."
            )
        vision_param = next(self.adapter.hf_model.parameters())
        vision_inputs = {
            k: v.to(vision_param.device)
            for k, v in batch.inputs.items()
            if k in self.adapter.vision_input_names
        }
        vision_inputs["pixel_values"] = batch.pixel_values.to(vision_param.device, vision_param.dtype)
        features = self.adapter.visual_features(vision_inputs)
        prefix = self.hook_visual_prefix(features.prefix)
        if prefix.shape[0] != n_slots:
            raise ImageCountError(
                f"The images give {prefix.shape[0]} visual tokens but 'input_ids' has {n_slots} image "
                "placeholder positions. Give one image per placeholder (vlm.prepare checks this for you)."
            )
        slots = placeholders.unsqueeze(-1)
        prefix = prefix.to(embeds.device, embeds.dtype)
        if added:  # as HF's Molmo 2: the placeholders' own embeddings plus the features
            at = slots.expand_as(embeds)
            placed = embeds.masked_scatter(at, embeds[at] + prefix.reshape(-1))
        else:
            placed = embeds.masked_scatter(slots, prefix)
        injections = [
            self._injection_points[layer](
                torch.zeros_like(embeds).masked_scatter(slots, added.to(embeds.device, embeds.dtype))
            )
            for layer, added in zip(self.adapter.injection_layers, features.injections, strict=True)
        ]
        return embedding.hook_out(placed), injections

    def lm_inputs(
        self, batch: VLMBatch, embeds: torch.Tensor, injections: Sequence[torch.Tensor] = ()
    ) -> dict[str, Any]:
        """The language model's keyword inputs for the prompt pass of ``batch``: the family's
        attention mask (2-D, or its own: Gemma 3's bidirectional image blocks), positions, and the
        features added after early layers where the family has them (Qwen3-VL's DeepStack)."""
        device = embeds.device
        inputs = {k: v.to(device) for k, v in batch.inputs.items() if k in batch.token_inputs}
        position_ids = batch.position_ids.to(device)
        extra = self.adapter.injection_inputs(list(injections)) if injections else {}
        return {
            "attention_mask": self.adapter.lm_attention_mask(inputs, embeds, position_ids),
            "position_ids": position_ids,
            **extra,
            **self.adapter.lm_extra_inputs(inputs),
        }

    def forward(
        self,
        batch: ModelInput,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: Int[torch.Tensor, "batch pos"] | None = None,
    ) -> Any:
        """Run the model; returns what ``HookedTransformer.forward`` returns for ``return_type``.

        ``batch`` is anything :meth:`to_batch` takes: a :class:`VLMBatch` for image + text, or, as in
        TransformerLens, a string, a list of strings or a token tensor for text alone.

        ``return_type``: ``"logits"`` ``[batch, pos, d_vocab]``; ``"loss"``: the mean next-token loss
        over the batch's text (padding and image placeholders are never targets, nor an item's first
        text token: see :mod:`hooked_vllm.model.loss`), equal to HF's ``loss`` given those ``labels``;
        ``"both"``: ``(logits, loss)``; ``None``: nothing (for hooks). ``loss_per_token=True`` gives the
        loss ``[batch, pos - 1]`` of predicting each next token, 0 where it is no target. ``labels``
        (``[batch, pos]``, -100 for no target, as HF's) replaces the default targets.

        Example:
            >>> loss = vlm(batch, return_type="loss")  # doctest: +SKIP
            >>> logits, per_token = vlm("a red circle", "both", loss_per_token=True)  # doctest: +SKIP

        By default every layer runs transformer-lens' step-by-step attention, so a run with hooks
        and one without compute the same numbers bit for bit. With ``vlm.use_sdpa = True`` (faster:
        1.5x at batch 4 on CPU), a layer whose attention carries no hook on a point that only the
        step-by-step path fires (``hook_pattern``, ``hook_attn_scores``, ``hook_rot_q``,
        ``hook_attn_out``...) runs HF's fused sdpa instead; ``hook_q/k/v/z`` and block-level hooks
        fire either way. Logits then differ from the step-by-step path by float rounding (~1e-6 in
        float32): compare clean and patched runs made with the same setting.
        """
        check_return_type(return_type)
        batch = self.to_batch(
            batch, prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask
        )
        self._check_length(batch)
        embeds, injections = self._embed_with_injections(batch)
        wants_loss = return_type in ("loss", "both")
        with self._fused_attention(batch):
            logits = self.bridge(
                embeds,
                **self.lm_inputs(batch, embeds, injections),
                return_type="logits" if wants_loss else return_type,
                # no KV cache: HF would build one, and with it transformer-lens runs linear-attention
                # layers (Qwen3.5) natively, where only their hook_in/hook_out fire
                use_cache=False,
            )
        if not wants_loss:
            return logits
        if labels is None:
            labels = self.loss_labels(batch)
        loss = lm_loss(logits, labels, per_token=loss_per_token)
        return (logits, loss) if return_type == "both" else loss

    def loss_labels(self, batch: ModelInput) -> Int[torch.Tensor, "batch pos"]:
        """The targets of ``return_type="loss"`` as HF's ``labels=``: ``input_ids``, -100 at padding,
        image placeholders and each item's first text token (see :func:`hooked_vllm.model.loss.lm_labels`).

        Example:
            >>> hf_loss = hf_model(**batch.inputs, labels=vlm.loss_labels(batch)).loss  # doctest: +SKIP
        """
        batch = self.to_batch(batch)
        ids = batch.input_ids
        return lm_labels(ids, batch.attention_mask, self.adapter.placeholder_mask(ids))

    def _fused_attention(self, batch: VLMBatch) -> AbstractContextManager:
        if not self.use_sdpa or not observed_attention.supported(self):
            return contextlib.nullcontext()
        layers = [
            layer
            for layer in self.adapter.attention_layers
            if not observed_attention.needs_step_by_step(self.blocks[layer].attn)
        ]
        causal_only = (
            self.adapter.plain_causal
            and self.adapter.sliding_window is None
            and bool(batch.attention_mask.bool().all())
        )
        return observed_attention.observed_sdpa_attention(self, causal_only=causal_only, layers=layers)

    __call__ = forward

    # ------------------------------------------------------------------ hooks
    def add_hook_point(self, name: str, point: HookPoint | None = None) -> HookPoint:
        """Register a hook point of your own (e.g. an SAE's features) under ``name``, so that
        ``run_with_cache``, ``run_with_hooks``, ``hooks`` and ``hook_dict`` know it. Returns it."""
        if name in self.hook_dict and self._extra_hook_points.get(name) is not point:
            raise KeyError(f"A hook point named {name!r} exists already; remove it or pick another name.")
        point = point if point is not None else HookPoint()
        self._extra_hook_points[name] = point
        self._register_hook_points()
        return point

    def remove_hook_point(self, name: str) -> None:
        """Unregister a hook point added with :meth:`add_hook_point` (its hooks are removed)."""
        point = self._extra_hook_points.pop(name)
        point.remove_hooks("both", including_permanent=True)
        if self.bridge._hook_registry.get(name) is point:
            del self.bridge._hook_registry[name]

    # ------------------------------------------------------------------ SAEs (see hooked_vllm.model.sae)
    def saes(
        self, saes: Any, use_error_term: bool | None = None, positions: Any = None
    ) -> AbstractContextManager:
        """SAEs spliced in for the duration of the context, as SAELens's ``model.saes([...])``."""
        return sae_lib.vlm_saes(self, saes, use_error_term=use_error_term, positions=positions)

    def run_with_saes(self, batch: ModelInput, saes: Any = (), **kwargs: Any) -> Any:
        """One forward with SAEs spliced in (see :func:`hooked_vllm.model.sae.run_with_saes`)."""
        return sae_lib.run_with_saes(self, batch, saes=saes, **kwargs)

    def run_with_cache_with_saes(self, batch: ModelInput, saes: Any = (), **kwargs: Any) -> Any:
        """``run_with_cache`` with SAEs spliced in (see :func:`.sae.run_with_cache_with_saes`)."""
        return sae_lib.run_with_cache_with_saes(self, batch, saes=saes, **kwargs)

    def _register_hook_points(self) -> None:
        registry = self.bridge._hook_registry
        for name, point in self._extra_hook_points.items():
            if registry.get(name) is not point or point.name != name:
                point.name = name
                registry[name] = point

    def _names_predicate(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        """``names_filter`` as a predicate over hook names (TransformerLens aliases included),
        excluding hook points the bridge has switched off (e.g. ``hook_result`` until enabled)."""
        hook_dict = self.hook_dict
        if names_filter is None:
            wanted: Callable[[str], bool] = lambda name: True  # noqa: E731
        elif callable(names_filter):
            wanted = names_filter
        else:
            names = {names_filter} if isinstance(names_filter, str) else set(names_filter)
            unknown = sorted(names - hook_dict.keys())
            if unknown:
                raise KeyError(
                    f"names_filter names no hook point: {unknown}. See vlm.hook_dict for the names "
                    "(e.g. 'blocks.0.hook_resid_post', 'hook_visual_prefix')."
                )
            wanted = names.__contains__

        def predicate(name: str) -> bool:
            point = hook_dict.get(name)
            gated = point is not None and self.bridge._gated_hook_reason(point.name or name) is not None
            return wanted(name) and not gated

        return predicate

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by name, the vision side's included."""
        self._register_hook_points()
        return self.bridge.hook_dict

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> AbstractContextManager:
        """Context manager adding hooks for its duration; they are removed on exit, errors included.
        A forward hook returns None or a tensor of its activation's shape and dtype (anything else is a
        :class:`~hooked_vllm.errors.HookOutputError` naming the hook).

        Example:
            >>> with vlm.hooks(fwd_hooks=[("hook_visual_prefix", lambda x, hook: 0 * x)]):  # doctest: +SKIP
            ...     logits = vlm(batch)
        """
        self._register_hook_points()
        return self.bridge.hooks(
            fwd_hooks=[(name, _checked_hook(fn, name, self)) for name, fn in fwd_hooks],
            bwd_hooks=list(bwd_hooks),
            reset_hooks_end=reset_hooks_end,
            clear_contexts=clear_contexts,
        )

    def run_with_hooks(
        self,
        batch: BatchLike,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        **forward_kwargs: Any,
    ) -> Any:
        """Forward with temporary hooks, as ``HookedTransformer.run_with_hooks``; ``return_type``,
        ``loss_per_token`` and ``forward_kwargs`` (``labels``, ``prepend_bos``...) go to :meth:`forward`."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self.forward(batch, return_type, loss_per_token, **forward_kwargs)

    def run_with_cache(
        self,
        batch: BatchLike,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        pos_slice: Any = None,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        **forward_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward and cache activations: ``(logits, ActivationCache)``, as on HookedTransformer.

        ``names_filter`` is a name, a list of names or a predicate; ``device`` moves cached tensors.
        ``return_type``, ``loss_per_token`` and ``forward_kwargs`` go to :meth:`forward`
        (``return_type="loss"`` gives ``(loss, cache)``).
        """
        check_return_type(return_type)
        cache, fwd_hooks, _ = self.bridge.get_caching_hooks(
            self._names_predicate(names_filter),
            device=device,
            remove_batch_dim=remove_batch_dim,
            pos_slice=pos_slice,
        )
        with self.hooks(fwd_hooks):
            output = self.forward(batch, return_type, loss_per_token, **forward_kwargs)
        return output, VLMActivationCache(
            cache,
            self.bridge,
            has_batch_dim=not remove_batch_dim,
            injection_layers=self.adapter.injection_layers,
            mixer=self.adapter.mixer_without_pattern,
            stream_terms=self.adapter.stream_terms(),
            stream_scales=self.adapter.stream_scales(),
            additive_stream=self.adapter.additive_stream,
        )


@contextlib.contextmanager
def _one_line_load_errors(name_or_path: str) -> Iterator[None]:
    """HF's ``OSError`` (no weights, no processor files, no such hub id) as one ModelNotFoundError."""
    try:
        yield
    except OSError as exc:
        raise ModelNotFoundError(f"Could not load {name_or_path}: {' '.join(str(exc).split())}") from exc


def check_loading_info(loading_info: Mapping[str, Any], source: str, *, strict: bool = True) -> None:
    """Raise :class:`CheckpointError` (or warn, with ``strict=False``) when HF's loading info lists
    missing, unexpected or mis-shaped tensors, naming them."""
    problems = []
    listed = {
        "missing (left at random initialisation)": sorted(loading_info.get("missing_keys", ())),
        "unexpected (in the checkpoint, not in the model)": sorted(loading_info.get("unexpected_keys", ())),
        "of the wrong shape (checkpoint vs model)": sorted(
            f"{key} {tuple(ckpt)} vs {tuple(model)}"
            for key, ckpt, model in loading_info.get("mismatched_keys", ())
        ),
    }
    for what, keys in listed.items():
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} tensor(s) {what}: {shown}")
    problems += [str(message) for message in loading_info.get("error_msgs", ())]
    if not problems:
        return
    message = f"The checkpoint at {source} does not match its config: " + "; ".join(problems)
    if strict:
        raise CheckpointError(
            f"{message}. Fix or re-download the checkpoint, or pass strict=False to load it anyway."
        )
    warnings.warn(f"{message} (loaded anyway: strict=False)", stacklevel=3)


def _checked_hook(fn: Callable, name: str | Callable, vlm: HookedVLM) -> Callable:
    """``fn`` as a forward hook whose result must be None or a tensor of the activation's shape and dtype
    (:class:`HookOutputError` naming the hook otherwise, as ``name`` or, for a predicate, by the names
    of its hook point: torch would fail later, far from the cause)."""

    def hook(activation: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(activation, *args, **kwargs)
        if result is None or not isinstance(activation, torch.Tensor):
            return result
        same = isinstance(result, torch.Tensor) and result.shape == activation.shape
        if same and result.dtype == activation.dtype:
            return result

        def describe(value: Any) -> str:
            if not isinstance(value, torch.Tensor):
                return f"a {type(value).__name__}"
            return f"shape {tuple(value.shape)}, {str(value.dtype).removeprefix('torch.')}"

        point = kwargs.get("hook", args[0] if args else None)
        aliases = " / ".join(n for n, p in vlm.hook_dict.items() if p is point) or getattr(point, "name", "")
        where = name if isinstance(name, str) else aliases
        raise HookOutputError(
            f"The hook function on {where} returned "
            f"{describe(result)}; expected None or a tensor like its activation ({describe(activation)}). "
            "Return the activation modified in place of its shape and dtype (e.g. .to(activation.dtype)), "
            "or None."
        )

    return hook


def _route_argument_through(point: HookPoint, name: str, index: int) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) passing a module's argument ``name`` (keyword, or
    positional at ``index``) through ``point``."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if isinstance(kwargs.get(name), torch.Tensor):
            return args, {**kwargs, name: point(kwargs[name])}
        if len(args) > index and isinstance(args[index], torch.Tensor):
            return (*args[:index], point(args[index]), *args[index + 1 :]), kwargs
        return None

    return hook


def _apply_bridge_settings(bridge: TransformerBridge, settings: dict[str, Any]) -> None:
    """Set ``settings`` on the bridge's config and on each component's own copy of it."""
    if not settings:
        return
    kind = type(bridge.cfg)
    configs = [bridge.cfg]
    configs += [m.config for m in bridge.modules() if isinstance(getattr(m, "config", None), kind)]
    for config in configs:
        for field, value in settings.items():
            setattr(config, field, value)


def _route_output_through(point: HookPoint) -> Callable:
    """A forward hook passing a module's output (its first element, if a tuple) through ``point``."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return point(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (point(output[0]), *output[1:])
        return output

    return hook
