"""Qwen3.5-MoE (``Qwen3_5MoeForConditionalGeneration``): Qwen3.5 (:mod:`hooked_vllm.adapters.qwen3_5`:
the same vision side, prompts, positions and hybrid Gated DeltaNet / gated-attention layers) with
every MLP a sparse mixture of experts, ``Qwen3_5MoeSparseMoeBlock``:

- a softmax router (``mlp.gate``: logits over the experts, the top ``num_experts_per_tok`` kept and
  renormalised);
- the routed experts, SwiGLU MLPs stored as 3-D tensors and run in one loop (``mlp.experts``);
- a shared expert every token goes through, scaled by ``sigmoid(shared_expert_gate(x))``.

transformer-lens 4.3 boots the view with its ``qwen3_5_moe`` adapter: ``blocks.{l}.mlp.gate.hook_out``
(router logits, ``[batch * pos, n_experts]``), ``blocks.{l}.mlp.hook_expert_weights`` /
``hook_expert_indices`` (the routing), ``blocks.{l}.mlp.experts.hook_out`` (the routed experts' sum),
``blocks.{l}.mlp.shared_expert.hook_out`` and ``shared_expert_gate.hook_out``. :meth:`routed_experts`
adds ``blocks.{l}.mlp.experts.{e}.hook_out``, each expert's weighted output. The experts run HF's
eager loop (``experts_implementation="eager"``, set on load), as attention runs eager: the hooked
loop is that loop.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from hooked_vllm.adapters.qwen3_5 import Qwen3_5Adapter


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen3_5MoeForConditionalGeneration",)

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        super().__init__(hf_model, processor)
        # HF's default picks grouped_mm where it can: other sums than the loop the hooks reproduce
        hf_model.set_experts_implementation("eager")

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        layers = self.hf_model.model.get_decoder().layers
        return {layer: block.mlp.experts for layer, block in enumerate(layers)}
