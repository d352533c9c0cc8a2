"""Contextualization as interaction magnitude: mean cosine similarity between token groups, per layer.

For groups A and B of hidden states (unit vectors u_i), over pairs i in A, j in B, i != j:

    s(A, B) = (S_A . S_B - |A n B|) / (|A| |B| - |A n B|),   S_X = sum_{i in X} u_i

which is the naive pairwise mean, computed in O(n d) (never an n x n matrix). Intra-image is
s(image, image), intra-text s(text, text), inter s(image, text), all-token s(image u text, same).
Accumulation is in float32 whatever the activations' dtype; zero vectors have no direction and are
left out of every group.

The anisotropy baseline (Ethayarajh 2019) is the mean cosine between tokens of *different* inputs,
exact over all cross-input pairs: (||sum_a S_a||^2 - sum_a ||S_a||^2) / (N^2 - sum_a n_a^2).

Example:
    >>> h = torch.randn(2, 10, 16)
    >>> image = torch.zeros(2, 10, dtype=torch.bool); image[:, :6] = True
    >>> pair_mean_cosine(h, image, image).shape
    torch.Size([2])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float

GROUPS = ("intra_image", "intra_text", "inter", "all")


def unit_vectors(hidden: Float[torch.Tensor, "... d_model"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 unit vectors and a mask of the non-zero vectors."""
    hidden = hidden.float()
    norms = hidden.norm(dim=-1, keepdim=True)
    nonzero = norms.squeeze(-1) > 0
    return hidden / norms.clamp_min(torch.finfo(torch.float32).tiny), nonzero


def pair_mean_cosine(
    hidden: Float[torch.Tensor, "batch pos d_model"],
    group_a: Bool[torch.Tensor, "batch pos"],
    group_b: Bool[torch.Tensor, "batch pos"],
) -> Float[torch.Tensor, " batch"]:
    """Mean cosine over pairs (i in A, j in B, i != j), per item; NaN where there is no pair."""
    units, nonzero = unit_vectors(hidden)
    sums, counts = group_sums(units, nonzero, group_a, group_b)
    return sums / counts


def group_sums(
    units: Float[torch.Tensor, "batch pos d_model"],
    nonzero: Bool[torch.Tensor, "batch pos"],
    group_a: Bool[torch.Tensor, "batch pos"],
    group_b: Bool[torch.Tensor, "batch pos"],
) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"]]:
    """Sum of cosines over pairs (i in A, j in B, i != j) and the number of pairs, per item."""
    a = (group_a & nonzero).float()
    b = (group_b & nonzero).float()
    sum_a = torch.einsum("bp,bpd->bd", a, units)
    sum_b = torch.einsum("bp,bpd->bd", b, units)
    both = (a * b).sum(-1)  # each shared token pairs with itself once, with cosine 1
    total = (sum_a * sum_b).sum(-1) - both
    count = a.sum(-1) * b.sum(-1) - both
    return total, count


@dataclass
class ContextualizationSums:
    """Per-layer sufficient statistics of one batch: everything the dataset aggregates need.

    ``pair_sum[g]``/``pair_count[g]``: ``[layer, batch]`` cosine sums and pair counts of group ``g``.
    ``modality_sum[m]``: ``[layer, batch, d_model]`` sums of unit vectors of modality ``m`` per item
    (for the cross-input baseline); ``modality_count[m]``: ``[batch]``.
    """

    pair_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    pair_count: dict[str, torch.Tensor] = field(default_factory=dict)
    modality_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    modality_count: dict[str, torch.Tensor] = field(default_factory=dict)

    def per_item(self) -> dict[str, Float[torch.Tensor, "layer batch"]]:
        """Mean cosine per group, layer and item (NaN where a group has no pair)."""
        # A group with no pair is NaN, not the rounding of |S|^2 - n divided by zero (-inf, +inf).
        return {
            g: torch.where(self.pair_count[g] > 0, self.pair_sum[g] / self.pair_count[g], float("nan"))
            for g in self.pair_sum
        }


def layer_sums(
    hidden: Float[torch.Tensor, "batch pos d_model"],
    image: Bool[torch.Tensor, "batch pos"],
    text: Bool[torch.Tensor, "batch pos"],
) -> tuple[dict[str, torch.Tensor], ...]:
    """One layer's pair sums/counts per group and unit-vector sums/counts per modality (float32).

    Three weighted sums of unit vectors (image, text, their overlap) give every group:
    S_all = S_image + S_text - S_both, and pairs as in :func:`group_sums`.
    """
    units, nonzero = unit_vectors(hidden)
    masks = torch.stack([image & nonzero, text & nonzero, image & text & nonzero], 1).float()  # [b, 3, p]
    sums = torch.einsum("bmp,bpd->bmd", masks, units)
    counts = masks.sum(-1)
    s_img, s_txt, s_both = sums.unbind(1)
    n_img, n_txt, n_both = counts.unbind(1)
    s_all, n_all = s_img + s_txt - s_both, n_img + n_txt - n_both

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(-1)

    pair_sum = {
        "intra_image": dot(s_img, s_img) - n_img,
        "intra_text": dot(s_txt, s_txt) - n_txt,
        "inter": dot(s_img, s_txt) - n_both,
        "all": dot(s_all, s_all) - n_all,
    }
    pair_count = {
        "intra_image": n_img * n_img - n_img,
        "intra_text": n_txt * n_txt - n_txt,
        "inter": n_img * n_txt - n_both,
        "all": n_all * n_all - n_all,
    }
    return pair_sum, pair_count, {"image": s_img, "text": s_txt}, {"image": n_img, "text": n_txt}


def contextualization_sums(
    layers: list[Float[torch.Tensor, "batch pos d_model"]],
    image: Bool[torch.Tensor, "batch pos"],
    text: Bool[torch.Tensor, "batch pos"],
) -> ContextualizationSums:
    """Sufficient statistics over a list of per-layer hidden states (layer 0 = embeddings)."""
    return stack_layer_sums([layer_sums(h, image.to(h.device), text.to(h.device)) for h in layers])


def stack_layer_sums(per_layer: list[tuple[dict[str, torch.Tensor], ...]]) -> ContextualizationSums:
    """Stack :func:`layer_sums` results, one per layer, into ``[layer, ...]`` statistics (on CPU)."""
    out = ContextualizationSums()
    for slot, target in enumerate((out.pair_sum, out.pair_count, out.modality_sum)):
        for key in per_layer[0][slot]:
            target[key] = torch.stack([entry[slot][key].cpu() for entry in per_layer])
    out.modality_count = {k: v.cpu() for k, v in per_layer[0][3].items()}
    return out


def cross_input_baseline(
    modality_sum_a: Float[torch.Tensor, "layer item d_model"],
    count_a: Float[torch.Tensor, " item"],
    modality_sum_b: Float[torch.Tensor, "layer item d_model"] | None = None,
    count_b: Float[torch.Tensor, " item"] | None = None,
) -> Float[torch.Tensor, " layer"]:
    """Mean cosine between tokens of group A and group B of *different* items, exact over all pairs.

    With B omitted, B = A (e.g. image tokens of one input against image tokens of another).
    """
    if modality_sum_b is None:
        modality_sum_b, count_b = modality_sum_a, count_a
    total_a, total_b = modality_sum_a.sum(1), modality_sum_b.sum(1)
    same_item = (modality_sum_a * modality_sum_b).sum(-1).sum(-1)
    cross = (total_a * total_b).sum(-1) - same_item
    pairs = count_a.sum() * count_b.sum() - (count_a * count_b).sum()
    return cross / pairs


BASELINE_OF = {"intra_image": ("image", "image"), "intra_text": ("text", "text"), "inter": ("image", "text")}


def contextualization_from_cache(
    cache,
    image: Bool[torch.Tensor, "batch pos"],
    text: Bool[torch.Tensor, "batch pos"],
    *,
    hook: str = "resid_post",
    include_embedding: bool = True,
) -> ContextualizationSums:
    """Contextualization statistics from an ``ActivationCache``.

    ``hook`` is ``"resid_post"`` (default), ``"resid_mid"`` or ``"resid_pre"``; with
    ``include_embedding`` the embedding (``blocks.0.hook_resid_pre``) is layer 0.
    """
    n_layers = cache.model.cfg.n_layers
    names = [f"blocks.{layer}.hook_{hook}" for layer in range(n_layers)]
    available = set(cache.keys())
    missing = [name for name in names if name not in available]
    if missing:
        why = (
            " (this model's blocks run attention and the MLP in parallel: there is no resid_mid)"
            if hook == "resid_mid" and getattr(cache.model.cfg, "parallel_attn_mlp", False)
            else ""
        )
        raise ValueError(
            f"The cache has no {missing[0]}{why}: cache the stream with names_filter covering "
            f"hook_{hook}, or pass hook='resid_post' or 'resid_pre'."
        )
    layers = [cache[name] for name in names]
    if include_embedding:
        layers = [cache["blocks.0.hook_resid_pre"], *layers]
    return contextualization_sums(layers, image, text)
