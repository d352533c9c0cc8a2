"""The logit lens (nostalgebraist 2020): decode each layer's residual stream with the final norm and
the unembedding.

At the last layer it reproduces the model's logits exactly. Per layer and chosen position it reports
the top-k tokens with probabilities, the rank and probability of the model's final prediction, and
KL(final || layer).

Example:
    >>> lens = LogitLens.from_vlm(vlm)  # doctest: +SKIP
    >>> result = lens.summarize(resid_stack, k=5)  # doctest: +SKIP
    >>> result.final_rank[:, 0, 0]  # rank of the final answer at each layer  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from hooked_vllm.adapters.base import VLMAdapter


@dataclass
class LensResult:
    """Per layer, item and chosen position (all ``[layer, batch, n_positions, ...]``)."""

    top_tokens: Int[torch.Tensor, "layer batch n k"]
    top_probs: Float[torch.Tensor, "layer batch n k"]
    final_token: Int[torch.Tensor, "batch n"]
    final_prob: Float[torch.Tensor, "layer batch n"]
    final_rank: Int[torch.Tensor, "layer batch n"]
    kl_to_final: Float[torch.Tensor, "layer batch n"]


@dataclass
class LogitLens:
    """The final norm and unembedding of a language model, applied to any residual stream."""

    norm: torch.nn.Module
    W_U: Float[torch.Tensor, "d_model d_vocab"]
    b_U: Float[torch.Tensor, " d_vocab"] | None = None
    #: the head's final soft cap, ``cap * tanh(logits / cap)`` (Gemma 2 backbones: PaliGemma 2)
    softcap: float | None = None
    #: the hook points it decodes, the embedding's first, then each layer's output (the adapter's
    #: ``lens_hooks``: ``resid_pre`` 0 and each ``resid_post``; Gemma 3n: its four streams)
    hook_names: tuple[str, ...] = ()
    #: what the final norm reads, from one of those activations (the adapter's ``lens_input``;
    #: None: the activation itself)
    read: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_vlm(cls, vlm) -> LogitLens:
        """The lens of a :class:`~hooked_vllm.HookedVLM` (the HF norm module itself, un-hooked,
        the text config's ``final_logit_softcapping``, and the hook points the final norm reads)."""
        ln_final = vlm.bridge.ln_final
        norm = getattr(ln_final, "original_component", ln_final)
        b_U = getattr(vlm.bridge.unembed, "b_U", None)
        softcap = getattr(vlm.adapter.text_config, "final_logit_softcapping", None)
        names = tuple(vlm.adapter.lens_hooks())
        default = type(vlm.adapter).lens_input is VLMAdapter.lens_input
        read = None if default else vlm.adapter.lens_input
        return cls(norm=norm, W_U=vlm.W_U, b_U=b_U, softcap=softcap, hook_names=names, read=read)

    def lens_input(self, activation: torch.Tensor) -> Float[torch.Tensor, "... d_model"]:
        """What the final norm reads, from an activation of one of :attr:`hook_names`."""
        return activation if self.read is None else self.read(activation)

    def logits(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """Decode residual vectors to logits (in the model's dtype, as its own head does)."""
        out = self.norm(resid.to(self.W_U.dtype)) @ self.W_U
        out = out + self.b_U if self.b_U is not None else out
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def summarize(
        self,
        resid_stack: Float[torch.Tensor, "layer batch n d_model"],
        k: int = 5,
    ) -> LensResult:
        """Top-k, final-prediction rank/probability and KL to the last layer, per layer.

        The final prediction is the last layer's argmax (pass residuals up to and including the
        last layer's ``resid_post``).
        """
        log_probs = torch.stack([self.logits(layer).float().log_softmax(-1) for layer in resid_stack])
        final_log_probs = log_probs[-1]
        final_token = final_log_probs.argmax(-1)
        top_log_probs, top_tokens = log_probs.topk(k, dim=-1)
        final_lp = log_probs.gather(-1, final_token.expand(log_probs.shape[0], *final_token.shape)[..., None])
        final_rank = (log_probs > final_lp).sum(-1)
        kl = (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1)
        return LensResult(
            top_tokens=top_tokens,
            top_probs=top_log_probs.exp(),
            final_token=final_token,
            final_prob=final_lp.squeeze(-1).exp(),
            final_rank=final_rank,
            kl_to_final=kl.clamp_min(0),
        )


def verbalize(
    result: LensResult, tokenizer, item: int = 0, positions: list[int] | None = None
) -> list[list[str]]:
    """The "verbalization" table: ``table[layer][i]`` is the top-1 word of position ``i`` at ``layer``."""
    tops = result.top_tokens[:, item, :, 0]
    cols = range(tops.shape[1]) if positions is None else positions
    return [[tokenizer.decode([int(tops[layer, c])]) for c in cols] for layer in range(tops.shape[0])]


def resid_stack_from_cache(
    cache, positions: Int[torch.Tensor, "batch n"], *, include_embedding: bool = True
) -> Float[torch.Tensor, "layer batch n d_model"]:
    """Residual stream at ``positions`` (per item) for every layer, from an ``ActivationCache``.
    Refused where the final norm does not read it (Gemma 3n's AltUp streams): use
    :func:`lens_stack_from_cache` for the lens."""
    if not getattr(cache, "additive_stream", True):
        raise ValueError(
            "This model carries several residual streams (Gemma 3n's AltUp) and its final norm reads "
            "their average, not resid_post: use lens_stack_from_cache(LogitLens.from_vlm(vlm), cache, "
            "positions) for the logit lens."
        )
    n_layers = cache.model.cfg.n_layers
    names = (["blocks.0.hook_resid_pre"] if include_embedding else []) + [
        f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)
    ]
    return torch.stack([gather_positions(cache[name], positions) for name in names])


def lens_stack_from_cache(
    lens: LogitLens, cache, positions: Int[torch.Tensor, "batch n"], *, include_embedding: bool = True
) -> Float[torch.Tensor, "layer batch n d_model"]:
    """What the final norm would read at ``positions`` (per item) after the embedding and every layer,
    from an ``ActivationCache`` holding ``lens.hook_names``: the residual stream, or Gemma 3n's
    readout of its four streams. ``lens.summarize`` decodes it; its last layer gives the logits.

    Example:
        >>> lens = LogitLens.from_vlm(vlm)  # doctest: +SKIP
        >>> _, cache = vlm.run_with_cache(batch, names_filter=list(lens.hook_names))  # doctest: +SKIP
        >>> stack = lens_stack_from_cache(lens, cache, batch.last_positions[:, None])  # doctest: +SKIP
        >>> result = lens.summarize(stack)  # doctest: +SKIP
    """
    names = lens.hook_names if include_embedding else lens.hook_names[1:]
    return torch.stack([gather_positions(lens.lens_input(cache[name]), positions) for name in names])


def gather_positions(
    hidden: Float[torch.Tensor, "batch pos d_model"], positions: Int[torch.Tensor, "batch n"]
) -> Float[torch.Tensor, "batch n d_model"]:
    """``hidden[b, positions[b]]`` for every item."""
    index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)
