"""Which experts each modality's tokens are routed to, per mixture-of-experts layer.

A sparse MoE layer sends every token to its top-k experts (``blocks.{l}.mlp.hook_expert_indices``,
``[batch * pos, top_k]``; Llama 4: the top k of the router logits, ``blocks.{l}.mlp.hook_router_scores``).
Counting those choices over the image positions and over the text
positions of a batch gives, per layer, each modality's routing histogram over the experts: do image
tokens use experts text tokens do not?

``counts[layer, modality, expert]`` is how many of the modality's tokens chose the expert (each token
chooses top_k distinct experts, so a modality's row sums to ``top_k * tokens[modality]``);
:attr:`ExpertRouting.fractions` is that row divided by its sum (the modality's routing distribution,
summing to 1). Runs add up (:meth:`ExpertRouting.__add__`), so a dataset is counted batch by batch.

Example:
    >>> routing = expert_routing(vlm, batch)  # doctest: +SKIP
    >>> image_minus_text = routing.fractions[:, 0] - routing.fractions[:, 1]  # doctest: +SKIP
    >>> fig = show_expert_routing(routing)  # hooked_vllm.report.routing  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

#: the modalities counted by default: the batch's ``image_mask`` and ``text_mask``
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class ExpertRouting:
    """Routing counts of a set of tokens, by MoE layer, modality and expert."""

    #: ``[layer, modality, expert]``: how many of the modality's tokens chose the expert at the layer
    counts: Int[torch.Tensor, "layer modality expert"]
    #: ``[modality]``: how many tokens of each modality were counted
    tokens: Int[torch.Tensor, " modality"]
    #: the MoE layers (``counts[i]`` is layer ``layers[i]``)
    layers: tuple[int, ...]
    modalities: tuple[str, ...] = MODALITIES

    @property
    def fractions(self) -> Float[torch.Tensor, "layer modality expert"]:
        """Each modality's share of its routing choices per expert (rows sum to 1; NaN for a
        modality with no token)."""
        counts = self.counts.double()
        return counts / counts.sum(-1, keepdim=True)

    def __add__(self, other: ExpertRouting) -> ExpertRouting:
        if (self.layers, self.modalities) != (other.layers, other.modalities):
            raise ValueError(
                f"Cannot add routing counts over layers {other.layers} / {other.modalities} to counts "
                f"over {self.layers} / {self.modalities}."
            )
        return ExpertRouting(
            self.counts + other.counts, self.tokens + other.tokens, self.layers, self.modalities
        )


def count_routing(
    indices: Mapping[int, Int[torch.Tensor, "tokens top_k"]],
    masks: Mapping[str, Bool[torch.Tensor, "batch pos"]],
    n_experts: int,
) -> ExpertRouting:
    """Routing counts from each MoE layer's chosen experts (``{layer: [batch * pos, top_k]}``, rows
    flattened as ``masks``' ``[batch, pos]`` are) over the positions of each modality mask."""
    modalities = tuple(masks)
    flat = {name: mask.reshape(-1) for name, mask in masks.items()}
    layers = tuple(sorted(indices))
    counts = torch.zeros(len(layers), len(modalities), n_experts, dtype=torch.long)
    for i, layer in enumerate(layers):
        chosen = indices[layer].long().cpu()
        for j, name in enumerate(modalities):
            mask = flat[name].cpu()
            if chosen.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"Layer {layer}'s routing has {chosen.shape[0]} rows; the {name} mask flattens to "
                    f"{mask.shape[0]} positions."
                )
            counts[i, j] = torch.bincount(chosen[mask].reshape(-1), minlength=n_experts)[:n_experts]
    tokens = torch.tensor([int(flat[name].sum()) for name in modalities], dtype=torch.long)
    return ExpertRouting(counts, tokens, layers, modalities)


def moe_layers(vlm: Any) -> tuple[int, ...]:
    """The language-model layers with a router (a :func:`routing_hook`)."""
    return tuple(layer for layer in range(vlm.cfg.n_layers) if routing_hook(vlm, layer) is not None)


def routing_hook(vlm: Any, layer: int) -> str | None:
    """The hook point that says which experts a layer's tokens chose: ``blocks.{l}.mlp.hook_expert_indices``
    (``[batch * pos, top_k]``), or, where transformer-lens has only the router's logits
    (Llama 4: ``blocks.{l}.mlp.hook_router_scores``, ``[batch * pos, n_experts]``, of which HF takes the
    top ``num_experts_per_tok``), that one; None on a dense layer."""
    for name in (f"blocks.{layer}.mlp.hook_expert_indices", f"blocks.{layer}.mlp.hook_router_scores"):
        if name in vlm.hook_dict:
            return name
    return None


def expert_routing(vlm: Any, batch: Any, modalities: Sequence[str] = MODALITIES) -> ExpertRouting:
    """One forward of ``batch`` counting, per MoE layer, which experts the tokens of each modality
    (``batch.{modality}_mask``: ``"image"``, ``"text"``, ``"special"``) were routed to. Padding is in
    no mask, so it is never counted."""
    layers = moe_layers(vlm)
    if not layers:
        raise ValueError(f"{vlm.adapter.family} has no mixture-of-experts layer (no router hook).")
    names = [routing_hook(vlm, layer) for layer in layers]
    _, cache = vlm.run_with_cache(batch, names_filter=names)
    config = vlm.adapter.text_config  # Qwen's num_experts; GLM-4.5V's n_routed_experts, aliased
    n_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)
    indices = {}
    for layer, name in zip(layers, names, strict=True):
        if name not in cache:
            raise ValueError(f"{name} did not fire: this model's router gives no routing to count.")
        chosen = cache[name]
        if name.endswith("hook_router_scores"):  # the router's logits: HF's top-k of them
            chosen = chosen.topk(int(config.num_experts_per_tok), dim=-1).indices
        indices[layer] = chosen
    masks = {name: getattr(batch, f"{name}_mask") for name in modalities}
    return count_routing(indices, masks, n_experts)
