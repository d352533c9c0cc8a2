"""GLM-4.1V, GLM-4.5V and GLM-4.6V (``Glm4vForConditionalGeneration``,
``Glm4vMoeForConditionalGeneration``, ``Glm46VForConditionalGeneration``): Qwen2-VL's recipe
(:mod:`hooked_vllm.adapters.qwen2_vl`: a ViT at dynamic resolution, 2x2 merge, 3-D positions from HF's
``get_rope_index``) with GLM's vision tower (learned position embeddings interpolated to each image's
grid, a conv downsample and a patch merger) and a GLM language model. One outer forward serves all
three; the text model is what differs:

- **GLM-4.1V** (``glm4v_text``): GLM-4-0414's layer with **sandwich norms**: the attention and MLP
  outputs are each RMS-normed (``post_self_attn_layernorm``, ``post_mlp_layernorm``) before their
  residual add. transformer-lens's ``glm4`` adapter (a ``Glm4ForCausalLM`` view, the same module
  names) makes ``blocks.{l}.hook_attn_out``/``hook_mlp_out`` the *normed* outputs (``ln1_post``,
  ``ln2_post``), i.e. what is added to the stream, so residual decompositions sum to it;
  ``blocks.{l}.attn.hook_out``/``mlp.hook_out`` are the sublayers' outputs before those norms.
  3-D RoPE on the first half of each head (``partial_rotary_factor`` 0.5), adjacent pairs, with
  HF's rotary embedding handing (cos, sin) each frequency already repeated twice: the bridge is told
  so (:meth:`bridge_settings`), or it would expand them once more.
- **GLM-4.5V** (``glm4v_moe_text``): GLM-4.5's MoE layer, pre-norm only (no sandwich norms), RoPE on
  half of each head in the rotate-half layout. The first ``first_k_dense_replace`` layers keep a
  dense SwiGLU MLP; the others are ``Glm4vMoeTextMoE`` blocks: a **sigmoid router** with a score
  correction bias choosing the best ``topk_group`` of ``n_group`` expert groups, then the top
  ``num_experts_per_tok`` experts there (weights: the sigmoid scores, renormalised, times
  ``routed_scaling_factor``); the routed experts in one looped HF module; and a **shared expert**
  (``shared_experts``) every token goes through, ungated. Booted on a ``Glm4MoeForCausalLM`` view
  with transformer-lens's ``glm4_moe`` adapter: ``blocks.{l}.mlp.gate.hook_out`` (router logits,
  ``[batch * pos, n_experts]``, before the sigmoid), ``blocks.{l}.mlp.hook_expert_weights`` /
  ``hook_expert_indices`` (the routing), ``blocks.{l}.hook_mlp_out`` (the block); this adapter adds
  ``blocks.{l}.mlp.experts.{e}.hook_out`` (each routed expert's weighted output),
  ``blocks.{l}.mlp.experts.hook_out`` (their sum) and ``blocks.{l}.mlp.shared_experts.hook_out``
  (transformer-lens's name for HF's ``shared_experts``, as in its DeepSeek adapters).
- **GLM-4.6V**: GLM-4.1V's outer model with its language model built by ``AutoModel`` from the
  text config: either of the two above, served as such.

The processor writes ``<|begin_of_image|>``, one ``<|image|>`` per merged patch, ``<|end_of_image|>``;
the first and last are special tokens (no image mask), as Qwen's ``<|vision_start|>``/``<|vision_end|>``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import Glm4ForCausalLM, Glm4MoeForCausalLM, PreTrainedModel

from hooked_vllm.adapters.base import causal_lm_view
from hooked_vllm.adapters.qwen2_vl import Qwen2VLAdapter
from hooked_vllm.errors import UnsupportedModelError

#: the language-model view (whose module names transformer-lens reads) of each GLM-V text model
_VIEWS = {"glm4v_text": Glm4ForCausalLM, "glm4v_moe_text": Glm4MoeForCausalLM}


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    architectures: ClassVar[tuple[str, ...]] = (
        "Glm4vForConditionalGeneration",
        "Glm4vMoeForConditionalGeneration",
        "Glm46VForConditionalGeneration",
    )
    image_placeholder = "<|image|>"
    image_text = "<|begin_of_image|><|image|><|end_of_image|>"

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        super().__init__(hf_model, processor)
        if self.is_moe:
            # HF's default picks grouped_mm where it can: other sums than the loop the hooks reproduce
            hf_model.set_experts_implementation("eager")

    @classmethod
    def check_config(cls, config: Any) -> None:
        kind = config.get_text_config().model_type
        if kind not in _VIEWS:
            raise UnsupportedModelError(
                f"{config.architectures[0]} with a {kind!r} text model is not supported: hooked-vllm serves "
                f"GLM-V text models of type {' or '.join(map(repr, _VIEWS))}."
            )

    @property
    def is_moe(self) -> bool:
        """Whether the language model is GLM-4.5's mixture of experts (else GLM-4-0414's dense layers)."""
        return self.text_config.model_type == "glm4v_moe_text"

    def language_model(self) -> PreTrainedModel:
        config = self.text_config
        view = causal_lm_view(
            config, self.hf_model.model.get_decoder(), self.hf_model.lm_head, _VIEWS[config.model_type]
        )
        if not self.is_moe:
            # GLM-4.1V's attention splits d_model into its heads (its config names no head_dim);
            # Glm4Config's default head_dim (128) would give transformer-lens the wrong d_head
            view.config.head_dim = config.hidden_size // config.num_attention_heads
        return view

    def bridge_settings(self) -> dict[str, Any]:
        """GLM-4.1V's rotary embedding returns (cos, sin) in adjacent-pair layout, each frequency
        repeated twice (transformer-lens's Cohere convention); GLM-4.5V's in rotate-half layout,
        which the ``glm4_moe`` adapter's default already reads."""
        return {} if self.is_moe else {"rotary_interleaved_cos_sin": True}

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        layers = self.hf_model.model.get_decoder().layers
        return {
            layer: block.mlp.experts for layer, block in enumerate(layers) if hasattr(block.mlp, "experts")
        }

    def language_hook_sites(self) -> dict[str, torch.nn.Module]:
        """On GLM-4.5V's MoE layers: the routed experts' weighted sum and the shared expert's output."""
        sites = {}
        for layer, block in enumerate(self.hf_model.model.get_decoder().layers):
            if hasattr(block.mlp, "experts"):
                sites[f"blocks.{layer}.mlp.experts.hook_out"] = block.mlp.experts
                sites[f"blocks.{layer}.mlp.shared_experts.hook_out"] = block.mlp.shared_experts
        return sites
