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

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int


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

    @classmethod
    def from_vlm(cls, vlm) -> LogitLens:
        """The lens of a :class:`~hooked_vllm.HookedVLM` (the HF norm module itself, un-hooked,
        and the text config's ``final_logit_softcapping``)."""
        ln_final = vlm.bridge.ln_final
        norm = getattr(ln_final, "original_component", ln_final)
        b_U = getattr(vlm.bridge.unembed, "b_U", None)
        softcap = getattr(vlm.adapter.text_config, "final_logit_softcapping", None)
        return cls(norm=norm, W_U=vlm.W_U, b_U=b_U, softcap=softcap)

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
    """Residual stream at ``positions`` (per item) for every layer, from an ``ActivationCache``."""
    n_layers = cache.model.cfg.n_layers
    names = (["blocks.0.hook_resid_pre"] if include_embedding else []) + [
        f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)
    ]
    return torch.stack([gather_positions(cache[name], positions) for name in names])


def gather_positions(
    hidden: Float[torch.Tensor, "batch pos d_model"], positions: Int[torch.Tensor, "batch n"]
) -> Float[torch.Tensor, "batch n d_model"]:
    """``hidden[b, positions[b]]`` for every item."""
    index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)
