"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL (:mod:`hooked_vllm.adapters.qwen3_vl`:
the same vision side, DeepStack injections, prompts and M-RoPE positions) with sparse
mixture-of-experts MLPs, ``Qwen3VLMoeTextSparseMoeBlock``:

- a softmax router (``mlp.gate``: logits over the experts, the top ``num_experts_per_tok`` kept and
  renormalised);
- the routed experts, SwiGLU MLPs stored as 3-D tensors and run in one loop (``mlp.experts``,
  Qwen3.5-MoE's layout);
- no shared expert: the block's output is the routed experts' sum.

Layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) keep a dense SwiGLU MLP.

The bridge is booted on a ``Qwen3MoeForCausalLM`` view (the same module names as Qwen3-VL-MoE's text
layers) with transformer-lens 4.3's ``qwen3_moe`` adapter: ``blocks.{l}.mlp.gate.hook_out`` (router
logits, ``[batch * pos, n_experts]``), ``blocks.{l}.mlp.hook_expert_weights`` /
``hook_expert_indices`` (the routing), ``blocks.{l}.hook_mlp_out`` (the block). :meth:`routed_experts`
adds ``blocks.{l}.mlp.experts.{e}.hook_out``, each expert's weighted output, on the MoE layers. The
experts run HF's eager loop (``experts_implementation="eager"``, set on load), as attention runs
eager: the hooked loop is that loop.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, Qwen3MoeForCausalLM

from hooked_vllm.adapters.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLMoeForConditionalGeneration",)
    view_class = Qwen3MoeForCausalLM

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        super().__init__(hf_model, processor)
        # HF's default picks grouped_mm where it can: other sums than the loop the hooks reproduce
        hf_model.set_experts_implementation("eager")

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        layers = self.hf_model.model.get_decoder().layers
        return {
            layer: block.mlp.experts for layer, block in enumerate(layers) if hasattr(block.mlp, "experts")
        }
