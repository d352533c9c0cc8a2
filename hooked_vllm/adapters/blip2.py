"""BLIP-2 (``Blip2ForConditionalGeneration``) with a decoder-only (OPT) backbone:
EVA ViT -> Q-Former (learned queries only: unlike InstructBLIP's, it reads no instruction) ->
linear projection -> OPT.

- **Prompt.** The processor tokenizes the text (BOS first), pads it, then prepends
  ``num_query_tokens`` ``<image>`` slots to every row: under left padding the padding sits *between*
  the slots and the text. The projected query outputs replace the slots (HF's
  ``get_image_features(...).pooler_output``); they are not patches, so their layout is not spatial.
- **Positions.** OPT has learned absolute position embeddings (``embed_positions``, ids offset by 2).
  HF's ``OPTDecoder`` counts them over real tokens (``cumsum(mask) * mask - 1``) when given no
  ``position_ids``: our ``cumsum(mask) - 1`` is the same on every real token, for both padding sides
  (padding rows differ: HF gives them -1, we 1; nothing real attends to them). So an item alone equals
  its batched self, and HF's own forward agrees without being handed positions.
- **Hooks.** transformer-lens's ``opt`` adapter, with one change: its attention hands the whole
  computation to HF's ``OPTAttention`` and fires ``hook_pattern``/``hook_attn_scores`` afterwards,
  read-only (an edit there is discarded with a warning; its ``hook_attn_scores`` even holds the
  pattern), so knockout and pattern patching would do nothing. The view is booted on
  :func:`register_stepped_opt`'s adapter, whose attention is transformer-lens's step-by-step one
  (``hook_attn_scores`` before the softmax, ``hook_pattern`` after, both editable; no rotary
  embedding to apply). ``hook_embed`` is the token embedding (the visual prefix scattered in),
  ``hook_pos_embed`` the learned positions; the stream starts at their sum (``blocks.0.hook_resid_pre``).
- Flan-T5 backbones (encoder-decoder) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from transformers import PretrainedConfig, PreTrainedModel

from hooked_vllm.adapters.base import causal_lm_view
from hooked_vllm.adapters.instructblip import InstructBlipAdapter
from hooked_vllm.errors import UnsupportedModelError

#: the architecture name the language-model view is booted under (see :func:`register_stepped_opt`)
STEPPED_OPT = "HookedVllmSteppedOPTForCausalLM"


def register_stepped_opt() -> None:
    """Register, once, transformer-lens's OPT adapter with step-by-step attention (editable
    ``hook_attn_scores`` and ``hook_pattern``) in place of its delegating one, as :data:`STEPPED_OPT`.

    ``PositionEmbeddingsAttentionBridge`` recomputes HF's eager attention from the same ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj`` modules and the 4-D mask the decoder builds; given no rotary
    embedding (OPT's positions are added to the stream) it rotates nothing (``hook_rot_q``/``hook_rot_k``
    hold q and k as they are). HF scales the query before the product, the bridge the product (the same
    numbers up to rounding; bit for bit where ``d_head`` is a power of 4). Imported here, not at module
    level: transformer-lens loads with the model (:mod:`hooked_vllm.model.tl`), not with the registry.
    """
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.model_bridge.generalized_components import (
        LinearBridge,
        PositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.supported_architectures.opt import (
        OptArchitectureAdapter,
        _OptBlockBridge,
    )

    if STEPPED_OPT in factory.SUPPORTED_ARCHITECTURES:
        return

    class SteppedOptArchitectureAdapter(OptArchitectureAdapter):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            old = self.component_mapping["blocks"]
            attn = PositionEmbeddingsAttentionBridge(
                name="self_attn",
                config=self.cfg,
                submodules={
                    "q": LinearBridge(name="q_proj"),
                    "k": LinearBridge(name="k_proj"),
                    "v": LinearBridge(name="v_proj"),
                    "o": LinearBridge(name="out_proj"),
                },
            )
            self.component_mapping["blocks"] = _OptBlockBridge(
                name=old.name,
                hook_alias_overrides={"hook_mlp_out": "mlp.out.hook_out"},
                submodules={**old.submodules, "attn": attn},
            )

    # register_adapter alone is not enough in transformer-lens 4.3: boot looks the config's
    # architecture up in SUPPORTED_ARCHITECTURES (of which the factory keeps a copy) first.
    factory.ArchitectureAdapterFactory.register_adapter(STEPPED_OPT, SteppedOptArchitectureAdapter)
    factory.SUPPORTED_ARCHITECTURES[STEPPED_OPT] = SteppedOptArchitectureAdapter


class Blip2Adapter(InstructBlipAdapter):
    family = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    vision_input_names = ()  # the Q-Former reads no text

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        if not getattr(config, "use_decoder_only_language_model", True):
            raise UnsupportedModelError(
                f"BLIP-2 with a {config.text_config.model_type!r} (encoder-decoder) backbone is not "
                "supported: its image reaches the decoder through the encoder, not as a visual prefix of "
                "a decoder-only language model. Use an OPT variant such as Salesforce/blip2-opt-2.7b."
            )

    def language_model(self) -> PreTrainedModel:
        """A view of the HF model's ``OPTForCausalLM`` (its decoder and head shared), booted on
        transformer-lens's OPT adapter with step-by-step attention (:func:`register_stepped_opt`)."""
        register_stepped_opt()
        lm = self.hf_model.language_model
        view = causal_lm_view(self.text_config, lm.model, lm.lm_head)
        view.config.original_architecture = STEPPED_OPT  # read first by transformer-lens's boot
        return view

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        return self.hf_model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(
            0, 1
        )
