"""Gemma 3n (``Gemma3nForConditionalGeneration``): a timm MobileNetV5 (its last two stages fused to a
16 x 16 grid) -> RMS norm + projection (``embed_vision``) -> the Gemma 3n language model. Needs timm
(``pip install "hooked-vllm[timm]"``).

- **Prompt.** A prompt writes ``<image_soft_token>``; the processor expands it to
  ``\\n\\n<start_of_image>``, ``vision_soft_tokens_per_image`` soft tokens and ``<end_of_image>\\n\\n``.
  The soft tokens are the image positions (a square grid, row-major); the rest is structure.
- **Token embeddings.** Ids past the text vocabulary are embedded by the vision or audio embedder
  (``embed_vision(input_ids=...)``: a table, norm, projection, norm), not by the text table: HF does
  it in its outer forward, so ``<end_of_image>`` (the first id of the vision range) never meets the
  text table. :meth:`Gemma3nAdapter.language_model` makes the text embedding module embed them so
  (:class:`MultimodalTokenEmbedding`: same parameters, same module), which keeps ``hook_embed`` and
  generated tokens HF's.
- **Mask and positions.** Causal attention plus padding, a sliding window in the sliding layers; no
  bidirectional image block. HF's outer forward passes no positions (``arange``, padding counted):
  we pass ``cumsum(mask) - 1``, as HF's ``generate`` does.
- **Four residual streams (AltUp).** The language model carries ``altup_num_inputs`` (4) streams
  ``[4, batch, pos, d_model]``. Each layer *predicts* every stream from all four (a per-token 4 x 4
  mix routed by the active stream), runs attention, LAuReL and the MLP on the **active** stream's
  prediction (``altup_active_idx``, 0), *corrects* every stream by the active stream's innovation,
  and adds its per-layer input to streams 1-3 only. ``blocks.{l}.hook_resid_pre``/``hook_resid_post``
  are the active stream as the layer takes and gives it (editable: written back into the stack);
  ``blocks.{l}.hook_in``/``hook_out`` are all four, ``[4, batch, pos, d_model]`` (streams first, as
  HF holds them; editable). At the end HF projects streams 1-3 back (``altup_unembed_projections``),
  rescales each to stream 0's RMS, **averages the four**, then applies the final norm: the logit lens
  reads that average (:func:`altup_readout`), not stream 0.
- **Per-layer inputs** (as Gemma 4's): ``blocks.{l}.hook_per_layer_input``, ``[batch, pos,
  d_per_layer]``, the token-identity half from the ids (ids past ``vocab_size_per_layer_input``, the
  image tokens included, read row 0 as HF reads them) plus a projection of the input embeddings.
- **KV sharing.** The last ``num_kv_shared_layers`` layers compute no keys or values and attend with
  those of the last earlier layer of their type; the values a layer weighs are ``v_norm``'s output
  (RMS-normalised, no scale): :meth:`Gemma3nAdapter.value_hooks`. Queries and keys are RMS-normed
  too, and the scores are not scaled (``scaling = 1``).
- **Attention hooks.** transformer-lens 4.3's ``gemma3n`` adapter keeps HF's attention whole and fires
  ``hook_pattern`` after the fact (an edit there changes nothing). :func:`gemma3n_attention_forward`
  is HF's attention step by step with ``hook_rot_q``/``hook_rot_k`` (after norm and RoPE),
  ``hook_attn_scores`` (masked, before the softmax) and ``hook_pattern`` live.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.gemma3n.modeling_gemma3n import apply_rotary_pos_emb, repeat_kv

from hooked_vllm.adapters.base import causal_lm_view, kv_shared_value_hooks
from hooked_vllm.adapters.gemma3 import Gemma3Adapter
from hooked_vllm.errors import UnsupportedModelError

#: the architecture name the language-model view is booted under (see :func:`register_gemma3n_text`)
GEMMA3N_TEXT = "HookedVllmGemma3nForCausalLM"
TIMM_MISSING = "Gemma 3n's vision tower is a timm MobileNetV5, and timm is not installed: "
TIMM_MISSING += 'pip install "hooked-vllm[timm]".'


def require_timm() -> None:
    """Refuse, in one line, where timm (Gemma 3n's vision tower) is not installed."""
    if importlib.util.find_spec("timm") is None:
        raise UnsupportedModelError(TIMM_MISSING)


def register_gemma3n_text() -> None:
    """Register, once, transformer-lens's ``gemma3n`` adapter re-rooted on a ``Gemma3nForCausalLM``
    (``model.*`` for ``model.language_model.*``), its attention named ``attn`` as in every other
    family, as :data:`GEMMA3N_TEXT`. Imported here, not at module level: transformer-lens loads with
    the model (:mod:`hooked_vllm.model.tl`)."""
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.model_bridge.supported_architectures.gemma3n import Gemma3nArchitectureAdapter

    if GEMMA3N_TEXT in factory.SUPPORTED_ARCHITECTURES:
        return

    class Gemma3nTextArchitectureAdapter(Gemma3nArchitectureAdapter):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            for component in self.component_mapping.values():
                component.name = component.name.replace("model.language_model.", "model.")
            blocks = self.component_mapping["blocks"]
            blocks.submodules["attn"] = blocks.submodules.pop("self_attn")

    factory.ArchitectureAdapterFactory.register_adapter(GEMMA3N_TEXT, Gemma3nTextArchitectureAdapter)
    factory.SUPPORTED_ARCHITECTURES[GEMMA3N_TEXT] = Gemma3nTextArchitectureAdapter


class MultimodalTokenEmbedding(torch.nn.Module):
    """Mixin class for Gemma 3n's text embedding module: ids of the vision and audio ranges are
    embedded by those embedders, as ``Gemma3nModel.forward`` embeds them (the text table's rows there
    are never read). Set on the module's instance (``__class__``), so its parameters and state-dict
    keys stay as they are; the embedders are referenced, not registered as submodules."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(input_ids)
        for embedder in self._hooked_vllm_embedders:
            start = embedder.vocab_offset
            inside = (input_ids >= start) & (input_ids < start + embedder.vocab_size)
            if bool(inside.any()):
                ids = torch.where(inside, input_ids, start + embedder.vocab_size - 1)
                embeds = torch.where(inside[..., None], embedder(input_ids=ids).to(embeds.dtype), embeds)
        return embeds


class Gemma3nAdapter(Gemma3Adapter):
    family = "gemma3n"
    architectures = ("Gemma3nForConditionalGeneration",)
    images_per_prompt = True
    token_input_names = ("input_ids", "attention_mask", "token_type_ids")
    plain_causal = True
    additive_stream = False  # AltUp mixes four streams: no decomposition sums to the active one

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        require_timm()
        if getattr(config, "vision_config", None) is None:
            raise UnsupportedModelError(
                "This Gemma3nForConditionalGeneration has no vision_config: there is no visual prefix to "
                "study. Load a checkpoint with a vision tower."
            )

    # -- the language model
    def language_model(self) -> PreTrainedModel:
        """A ``Gemma3nForCausalLM`` view of the text model and head, booted on transformer-lens's
        ``gemma3n`` adapter (:func:`register_gemma3n_text`); its token embedding embeds the vision
        and audio ranges as HF's outer forward does (:class:`MultimodalTokenEmbedding`)."""
        register_gemma3n_text()
        decoder = self.hf_model.model.language_model
        embed = decoder.embed_tokens
        if not isinstance(embed, MultimodalTokenEmbedding):
            embed.__class__ = type(
                f"Multimodal{type(embed).__name__}", (MultimodalTokenEmbedding, type(embed)), {}
            )
        model = self.hf_model.model
        object.__setattr__(embed, "_hooked_vllm_embedders", (model.embed_vision, model.embed_audio))
        view = causal_lm_view(self.text_config, decoder, self.hf_model.lm_head)
        view.config.original_architecture = GEMMA3N_TEXT  # read first by transformer-lens's boot
        return view

    def attention_forward(self):
        return gemma3n_attention_forward

    # -- prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: ``<image_soft_token>``."""
        return self.processor.image_token

    def image_bound_ids(self) -> tuple[int, int]:
        """The ids of ``<start_of_image>`` and ``<end_of_image>`` (``*_token_id`` in Gemma 3n's config)."""
        config = self.hf_model.config
        return config.boi_token_id, config.eoi_token_id

    # -- the vision side
    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        """``vision.blocks.{s}.hook_resid_post``: each MobileNetV5 stage's output (``[images, channels,
        height, width]``), and ``vision.hook_msfa``: the fused grid before the embedder."""
        encoder = self.hf_model.model.vision_tower.timm_model
        sites = {f"vision.blocks.{i}.hook_resid_post": stage for i, stage in enumerate(encoder.blocks)}
        sites["vision.hook_msfa"] = encoder.msfa
        return sites

    # -- the language model's view of the sequence
    def lm_attention_mask(self, inputs, inputs_embeds, position_ids):
        """The 2-D padding mask: HF builds causal and sliding-window masks from it."""
        return inputs["attention_mask"].to(inputs_embeds.device)

    def lm_extra_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``per_layer_inputs``: the token-identity half of the per-layer embeddings, of the token ids
        as HF's forward embeds them (ids past the per-layer table read its row 0)."""
        language_model = self.hf_model.model.language_model
        return {"per_layer_inputs": language_model.get_per_layer_inputs(inputs["input_ids"])}

    def per_layer_input_sites(self) -> dict[int, torch.nn.Module]:
        return dict(enumerate(self.hf_model.model.language_model.layers))

    def lens_hooks(self) -> list[str]:
        """All four streams at each layer boundary: ``blocks.0.hook_in``, then ``blocks.{l}.hook_out``."""
        n_layers = int(self.text_config.num_hidden_layers)
        return ["blocks.0.hook_in", *(f"blocks.{layer}.hook_out" for layer in range(n_layers))]

    def lens_input(
        self, activation: Float[torch.Tensor, "n_streams *batch d_model"]
    ) -> Float[torch.Tensor, "*batch d_model"]:
        """HF's readout of a stack of the four streams (:func:`altup_readout`)."""
        n_streams = int(self.text_config.altup_num_inputs)
        if activation.dim() < 2 or activation.shape[0] != n_streams:
            raise ValueError(
                f"Gemma 3n's logit lens reads all {n_streams} AltUp streams, [{n_streams}, ..., d_model] "
                f"(blocks.{{l}}.hook_out); got shape {tuple(activation.shape)}. Pass the stack, not "
                "resid_post."
            )
        return altup_readout(self.hf_model.model.language_model, activation)

    def value_hooks(self) -> dict[int, str]:
        """The values each layer weighs: ``v_norm``'s output, that of the layer it shares them with
        for the KV-shared layers."""
        return kv_shared_value_hooks(self.text_config)


def altup_readout(
    text_model: torch.nn.Module, streams: Float[torch.Tensor, "n_streams *batch d_model"]
) -> Float[torch.Tensor, "*batch d_model"]:
    """What ``Gemma3nTextModel.forward`` hands its final norm, from a stack of AltUp streams: streams
    1.. through ``altup_unembed_projections``, each rescaled to stream 0's RMS, averaged with stream 0
    (transformers 5.23, line for line)."""
    target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
    parts = [streams[0]]
    for i in range(1, text_model.config.altup_num_inputs):
        projected = text_model.altup_unembed_projections[i - 1](streams[i]).to(streams.dtype)
        magnitude = torch.sqrt(torch.mean(projected**2, dim=-1, keepdim=True).clamp(min=1e-5))
        parts.append(projected * target / magnitude)
    return torch.mean(torch.stack(parts), dim=0)


def gemma3n_attention_forward(
    bridge: torch.nn.Module,
    hidden_states: Float[torch.Tensor, "batch pos d_model"],
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    shared_kv_states: Any = None,
    **kwargs: Any,
) -> tuple[Float[torch.Tensor, "batch pos d_model"], Float[torch.Tensor, "batch head query key"]]:
    """HF's ``Gemma3nTextAttention.forward`` with its eager attention (transformers 5.23), line for
    line, as the forward of transformer-lens's attention bridge around it, with the bridge's hook
    points fired in TransformerLens's places (see the module docstring)."""
    hf = bridge.original_component
    for setting in ("use_split_qkv_input", "use_attn_in", "use_attn_result"):
        if getattr(bridge.config, setting, False):
            raise NotImplementedError(f"Gemma 3n's attention hooks do not implement {setting}; leave it off.")
    hidden_states = bridge.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, hf.config.head_dim)
    cos, sin = position_embeddings
    query_states = hf.q_norm(hf.q_proj(hidden_states).view(hidden_shape))
    query_states = apply_rotary_pos_emb(query_states, cos, sin, unsqueeze_dim=2)
    query_states = bridge.hook_rot_q(query_states.transpose(1, 2))
    if hf.is_kv_shared_layer:
        key_states, value_states = shared_kv_states[hf.layer_type]
    else:
        key_states = hf.k_norm(hf.k_proj(hidden_states).view(hidden_shape))
        key_states = apply_rotary_pos_emb(key_states, cos, sin, unsqueeze_dim=2)
        key_states = bridge.hook_rot_k(key_states.transpose(1, 2))
        value_states = hf.v_norm(hf.v_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    if past_key_values is not None and not hf.is_kv_shared_layer:
        key_states, value_states = past_key_values.update(key_states, value_states, hf.layer_idx)
    if hf.store_full_length_kv:
        shared_kv_states[hf.layer_type] = key_states, value_states

    key_states = repeat_kv(key_states, hf.num_key_value_groups)
    value_states = repeat_kv(value_states, hf.num_key_value_groups)
    scores = torch.matmul(query_states, key_states.transpose(2, 3)) * hf.scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    scores = bridge.hook_attn_scores(scores)
    pattern = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
    pattern = bridge.hook_pattern(pattern)
    output = torch.matmul(pattern, value_states).transpose(1, 2).contiguous()
    output = hf.o_proj(output.reshape(*input_shape, -1).contiguous())
    return bridge.hook_out(output), pattern
