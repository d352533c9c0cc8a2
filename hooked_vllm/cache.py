"""The activation cache :meth:`HookedVLM.run_with_cache` returns: TransformerLens's
``ActivationCache``, exact on models whose weights were not processed.

TransformerLens's residual-stack tools (``accumulated_resid(apply_ln=True)``,
``decompose_resid(apply_ln=True)``, ``stack_head_results(apply_ln=True)``, ``logit_attrs``) divide
each component by the final norm's scale and leave its weight to ``W_U``: right once
``enable_compatibility_mode()`` has folded the weight into ``W_U``, off by that weight (0.7% of the
logit difference on the demo model) on the HF weights HookedVLM runs by default. Here the final
norm's weight is applied too when the stack targets the unembedding, so ``stack @ W_U`` is the exact
contribution to the logits in both modes (after folding the weight is all ones: nothing changes).

Example:
    >>> logits, cache = vlm.run_with_cache(batch)  # doctest: +SKIP
    >>> stack = cache.decompose_resid(layer=-1)[:, :, -1]  # doctest: +SKIP
    >>> attrs = cache.logit_attrs(stack, tokens, incorrect_tokens, pos_slice=-1)  # doctest: +SKIP
    >>> attrs.sum(0)  # the logit difference, exactly  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from transformer_lens import ActivationCache

NORMALIZED = ("LN", "LNPre", "RMS", "RMSPre")


def final_norm_weight(bridge: Any) -> Float[torch.Tensor, " d_model"] | None:
    """The elementwise scale the final norm applies after normalising, or None if it has none.

    Gemma-style RMSNorms scale by ``1 + weight`` (their weight is stored as an offset from one).
    """
    norm = getattr(bridge, "ln_final", None)
    module = getattr(norm, "original_component", norm)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if "gemma" in type(module).__name__.lower():
        return 1.0 + weight
    return weight


class VLMActivationCache(ActivationCache):
    """``ActivationCache`` whose stacks aimed at the unembedding include the final norm's weight."""

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        scaled = super().apply_ln_to_stack(
            residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )
        to_unembed = layer is None or layer == -1 or layer == self.model.cfg.n_layers
        if not to_unembed or recompute_ln or self.model.cfg.normalization_type not in NORMALIZED:
            return scaled  # recompute_ln runs the norm module itself, weight included
        weight = final_norm_weight(self.model)
        return scaled if weight is None else scaled * weight.to(scaled.device, scaled.dtype)
