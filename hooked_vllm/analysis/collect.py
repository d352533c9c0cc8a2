"""One forward pass, three lenses, O(one layer) of activations kept.

:func:`collect` hooks the residual stream of every layer and taps each layer's queries, keys and
values (attention runs as HF sdpa, see :mod:`hooked_vllm.model.observed_attention`), and reduces each as
it goes (contextualization sums, norm-based attention aggregates from alpha recomputed block by
block, logit lens at the chosen positions); nothing of a layer outlives its reduction, and no
attention pattern is ever stored. ``attention="pattern"`` hooks the bridge's ``hook_pattern``
instead. Layers with no attention pattern (Qwen3.5's linear attention:
``vlm.adapter.attention_layers`` leaves them out) have no attention lens: their rows of
:class:`AttentionSummary` are NaN and :attr:`AttentionSummary.attention_layers` names the others;
the stream lenses (contextualization, the logit lens) cover every layer. :func:`reduce_cache`
applies the same :class:`BatchReducer` to a full ``ActivationCache``: it agrees exactly with the
pattern path and to float rounding with the fused one.

Example:
    >>> result = collect(vlm, batch)  # doctest: +SKIP
    >>> result.contextualization.per_item()["inter"].shape  # [layer + 1, batch]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from jaxtyping import Bool, Float, Int

from hooked_vllm.analysis.attention_lenses import attend_with_group_sums, attention_group_sums
from hooked_vllm.analysis.contextualization import ContextualizationSums, layer_sums, stack_layer_sums
from hooked_vllm.analysis.logit_lens import LensResult, LogitLens, gather_positions
from hooked_vllm.analysis.norm_attention import (
    causal_pair_count,
    grouped_query_sums,
    head_gram,
    head_summed_norms_from_gram,
    modality_pairs,
)
from hooked_vllm.kernels import attention_lenses as kernel
from hooked_vllm.model.layers import attention_w_o
from hooked_vllm.model.observed_attention import observed_sdpa_attention, supported

ANALYSES = ("contextualization", "norm_attention", "logit_lens")


@dataclass
class AttentionSummary:
    """Per layer: block means by modality pair and saliency received by image tokens.

    ``norm[pair]``/``weight[pair]``: ``[layer, batch]`` (head-summed norm; head-mean alpha).
    ``head_norm[pair]``: ``[layer, head, batch]``.
    ``image_saliency_from_text``/``image_saliency_from_last``: ``[layer, batch, n_image_tokens]``,
    head-summed norm received by each image token from the instruction / the last position (items
    with fewer image tokens than the batch's most are NaN-padded at the end).
    Rows of layers with no attention pattern are NaN; ``attention_layers`` names the layers that
    have one (all, except in hybrid models such as Qwen3.5).
    """

    norm: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: dict[str, torch.Tensor] = field(default_factory=dict)
    head_norm: dict[str, torch.Tensor] = field(default_factory=dict)
    image_saliency_from_text: torch.Tensor | None = None
    image_saliency_from_last: torch.Tensor | None = None
    attention_layers: tuple[int, ...] = ()


@dataclass
class BatchAnalysis:
    """Everything the three lenses give for one batch."""

    contextualization: ContextualizationSums | None = None
    attention: AttentionSummary | None = None
    lens: LensResult | None = None
    #: top-1 logit-lens token of every image position, ``[layer, batch, n_image_tokens]`` (-1 past
    #: an item's own image tokens)
    image_verbalization: Int[torch.Tensor, "layer batch n_image"] | None = None
    #: image tokens per item: where each item's saliency and verbalization rows end
    n_image_tokens: list[int] = field(default_factory=list)
    #: True where stream layer l of item b holds a NaN or inf at one of its (unpadded) positions: a
    #: NaN weight, or an overflow of the model's dtype. Every lens of that item and layer is unusable.
    nonfinite: Bool[torch.Tensor, "layer batch"] | None = None


class BatchReducer:
    """Reduces one layer at a time; ``finish()`` stacks the layers into a :class:`BatchAnalysis`."""

    def __init__(
        self,
        vlm,
        batch,
        analyses: tuple[str, ...] = ANALYSES,
        lens_positions: Int[torch.Tensor, "batch n"] | None = None,
        top_k: int = 5,
        verbalize_images: bool = False,
    ) -> None:
        unknown = set(analyses) - set(ANALYSES)
        if unknown:
            raise ValueError(f"Unknown analyses {sorted(unknown)}; choose from {ANALYSES}.")
        self.analyses = analyses
        self.image, self.text = batch.image_mask, batch.text_mask
        self.key_mask = batch.attention_mask.bool()
        self.padded = not bool(self.key_mask.all())  # once a batch: a device sync
        #: on the fused path without a GPU kernel, compute each layer's attention output from the
        #: lenses' own softmax (eager attention; not in training mode, where HF applies dropout)
        self.attend_here = not any(block.training for block in vlm.blocks)
        #: alpha is zero above the diagonal (the family's mask is causal plus padding)
        self.causal = vlm.adapter.plain_causal
        # Each block's query mask is one of a few groups ("text<-image" reads text queries): keep
        # the groups once as a [batch, group, query] matrix, and each pair's keys and group index.
        pairs = modality_pairs(batch)
        query_groups: dict[str, torch.Tensor] = {}
        for name, (queries, _) in pairs.items():
            query_groups.setdefault(name.split("<-")[0], queries)
        self.group_names = list(query_groups)
        self.pair_names = list(pairs)
        self.query_matrix = torch.stack([query_groups[n].float() for n in self.group_names], 1)
        self.key_matrix = torch.stack([pairs[n][1].float() for n in self.pair_names], 1)
        self.pair_query_index = torch.tensor(
            [self.group_names.index(n.split("<-")[0]) for n in self.pair_names]
        )
        # Block means divide by the pairs a layer lets attend: causal pairs, or those its mask allows
        # (Gemma 3's image blocks, PaliGemma's prefix, sliding windows), per kind of layer.
        kinds = layer_kinds(vlm)
        self.kind_names = sorted(set(kinds))
        self.layer_kind = [self.kind_names.index(kind) for kind in kinds]
        exact_causal = self.causal and vlm.adapter.sliding_window is None
        per_kind = []
        for kind in self.kind_names:
            allowed = None if exact_causal else allowed_pairs(vlm, batch, kind)  # once per kind
            per_kind.append(torch.stack([pair_count(*pairs[n], allowed) for n in self.pair_names], 1))
        self.pair_counts = torch.stack(per_kind)  # [kind, batch, pair]
        counts = self.image.sum(-1)
        self.n_image_tokens = counts.tolist()
        self.has_images = int(counts.max()) > 0
        self.lens = LogitLens.from_vlm(vlm) if "logit_lens" in analyses else None
        #: whether the lens decodes the residual stream hooks as they come (all but Gemma 3n)
        resid_names = tuple(hook_names(vlm.cfg.n_layers, ()))
        self.lens_reads_resid = self.lens is None or (
            self.lens.read is None and self.lens.hook_names == resid_names
        )
        #: the lens's own hook points where it reads others than the residual stream's
        self.lens_hooks = () if self.lens_reads_resid else self.lens.hook_names
        self.lens_positions = lens_positions if lens_positions is not None else batch.last_positions[:, None]
        self.top_k = top_k
        self.verbalize_images = verbalize_images and self.has_images
        if self.has_images:  # [batch, most image tokens]: gathered, not boolean-indexed (no device sync)
            self.image_positions, self.image_valid = _padded_positions(self.image)
        self._blocks = vlm.blocks  # W_O read per layer: vlm.W_O would stack all (1 GiB at 7B)
        self.n_layers = vlm.cfg.n_layers
        self.attention_layers = tuple(vlm.adapter.attention_layers)
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._resid: list[tuple] = []
        self._lens_resid: list[torch.Tensor] = []
        self._image_top1: list[torch.Tensor] = []
        self._attention: dict[int, dict] = {}
        self._nonfinite: list[torch.Tensor] = []

    def _at(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's masks and indices on ``device``, copied once: a host-to-device copy per
        layer would make every layer wait for the GPU to finish the previous one."""
        if device not in self._on_device:
            names = ("image", "text", "key_mask", "query_matrix", "key_matrix", "pair_query_index")
            names += ("pair_counts", "lens_positions") + (
                ("image_positions", "image_valid") if self.has_images else ()
            )
            self._on_device[device] = {name: getattr(self, name).to(device) for name in names}
        return self._on_device[device]

    # -- per layer
    def on_resid(self, hidden: Float[torch.Tensor, "batch pos d_model"]) -> None:
        """Residual stream of the next layer (the embedding first)."""
        here = self._at(hidden.device)
        # a NaN or inf anywhere in a position's vector makes its float32 sum non-finite (15x cheaper
        # than isfinite over every value; finite activations never sum past float32's 3.4e38)
        position_sum = hidden.sum(-1, dtype=torch.float32)
        self._nonfinite.append((~torch.isfinite(position_sum) & here["key_mask"]).any(-1))
        if "contextualization" in self.analyses:
            sums = layer_sums(hidden, here["image"], here["text"])
            self._resid.append(tuple(_detached(part) for part in sums))
        if self.lens is not None and self.lens_reads_resid:
            self.on_lens(hidden)

    def on_lens(self, activation: torch.Tensor) -> None:
        """The next of the lens's hook points (the residual stream, the embedding first; Gemma 3n: its
        four streams), decoded from what the final norm would read there."""
        hidden = self.lens.lens_input(activation)
        here = self._at(hidden.device)
        self._lens_resid.append(gather_positions(hidden, here["lens_positions"]).detach())
        if self.verbalize_images:
            image_hidden = gather_positions(hidden, here["image_positions"])
            top1 = self.lens.logits(image_hidden).argmax(-1)
            self._image_top1.append(top1.masked_fill(~here["image_valid"], -1))

    def on_attention(
        self,
        layer: int,
        pattern: Float[torch.Tensor, "batch head query key"],
        v: Float[torch.Tensor, "batch key kv_head d_head"],
    ) -> None:
        """Attention pattern and values of ``layer`` (the pattern-hook path)."""
        if "norm_attention" not in self.analyses:
            return
        device = pattern.device
        gram = head_gram(v, self._w_o(layer, device))  # [batch, key, head, head]
        summed = head_summed_norms_from_gram(pattern, gram, causal=self.causal)  # [batch, query, key]
        queries = self._at(device)["query_matrix"]  # [batch, group, query]
        norm_rows = torch.einsum("bgq,bqk->bgk", queries, summed)
        alpha_rows = grouped_query_sums(queries, pattern, causal=self.causal)
        self._summarise(layer, norm_rows, alpha_rows, gram)

    def on_qkv(
        self,
        layer: int,
        q: Float[torch.Tensor, "batch head query d_head"],
        k: Float[torch.Tensor, "batch kv_head key d_head"],
        v: Float[torch.Tensor, "batch kv_head key d_head"],
        scaling: float,
    ) -> Float[torch.Tensor, "batch query head d_head"] | None:
        """Post-RoPE queries and keys and the values of ``layer`` (the fused path): the same
        reductions, with alpha computed block by block and never stored whole. Without a GPU kernel
        the layer's attention output comes from the same softmax (returned, so the model skips its
        own sdpa call); on CUDA the model keeps sdpa and the Triton kernel recomputes alpha."""
        if "norm_attention" not in self.analyses:
            return None
        device = q.device
        gram = head_gram(v.transpose(1, 2), self._w_o(layer, device))
        here = self._at(device)
        if self.attend_here and not kernel.can_run(q):
            output, norm_rows, alpha_rows = attend_with_group_sums(
                q, k, v, gram, here["query_matrix"], here["key_mask"], scaling=scaling, padded=self.padded
            )
            self._summarise(layer, norm_rows, alpha_rows, gram)
            return output
        norm_rows, alpha_rows = attention_group_sums(
            q,
            k,
            gram,
            here["query_matrix"],
            here["key_mask"],
            scaling=scaling,
            causal=True,
            padded=self.padded,
        )
        self._summarise(layer, norm_rows, alpha_rows, gram)
        return None

    def _summarise(
        self,
        layer: int,
        norm_rows: Float[torch.Tensor, "batch group key"],
        alpha_rows: Float[torch.Tensor, "batch head group key"],
        gram: Float[torch.Tensor, "batch key head head"],
    ) -> None:
        """Block means by modality pair from the query-group sums of one layer."""
        here = self._at(norm_rows.device)
        f_norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().transpose(1, 2)  # ||f_h(x_j)||
        keys = here["key_matrix"]  # [batch, pair, key]
        g = here["pair_query_index"]  # [pair]
        alpha_rows = alpha_rows[:, :, g]  # [batch, head, pair, key]
        count = here["pair_counts"][self.layer_kind[layer]]  # [batch, pair]: pairs this layer allows
        norm_blocks = (norm_rows[:, g] * keys).sum(-1) / count
        head_blocks = (alpha_rows * f_norm[:, :, None, :] * keys[:, None]).sum(-1) / count[:, None]
        weight_blocks = (alpha_rows * keys[:, None]).sum(-1).mean(1) / count
        out: dict = {
            "norm": {name: norm_blocks[:, i] for i, name in enumerate(self.pair_names)},
            "weight": {name: weight_blocks[:, i] for i, name in enumerate(self.pair_names)},
            "head_norm": {name: head_blocks[:, :, i].T for i, name in enumerate(self.pair_names)},
        }
        if self.has_images:
            for key, query_name in (("from_text", "text"), ("from_last", "last")):
                received = norm_rows[:, self.group_names.index(query_name)]
                received = received.gather(1, here["image_positions"])
                out[key] = received.masked_fill(~here["image_valid"], float("nan"))
        self._attention[layer] = out

    def _w_o(self, layer: int, device: torch.device) -> Float[torch.Tensor, "head d_head d_model"]:
        return attention_w_o(self._blocks[layer].attn).to(device)

    # -- all layers
    def finish(self) -> BatchAnalysis:
        """Stack the layers and bring them to the CPU: per-layer results stay on the model's device
        until here, so that no layer waits for the GPU (a .cpu() per layer would)."""
        result = BatchAnalysis(n_image_tokens=self.n_image_tokens)
        if self._nonfinite:
            result.nonfinite = _stacked(self._nonfinite)
        if self._resid:
            result.contextualization = stack_layer_sums(
                [tuple(_to_cpu(part) for part in parts) for parts in self._resid]
            )
        if self._attention:
            # every block a row: NaN where the layer has no attention pattern (linear attention)
            any_layer = next(iter(self._attention.values()))
            nan = _nan_like(any_layer)
            layers = [self._attention.get(layer, nan) for layer in range(self.n_layers)]
            summary = AttentionSummary(attention_layers=self.attention_layers)
            for kind in ("norm", "weight", "head_norm"):
                for name in any_layer[kind]:
                    getattr(summary, kind)[name] = _stacked(layer[kind][name] for layer in layers)
            if "from_text" in any_layer:
                summary.image_saliency_from_text = _stacked(layer["from_text"] for layer in layers)
                summary.image_saliency_from_last = _stacked(layer["from_last"] for layer in layers)
            result.attention = summary
        if self._lens_resid:
            result.lens = self.lens.summarize(torch.stack(self._lens_resid), k=self.top_k)
            if self._image_top1:
                result.image_verbalization = _stacked(self._image_top1)
        return result


def _padded_positions(
    image: Bool[torch.Tensor, "batch pos"],
) -> tuple[Int[torch.Tensor, "batch n"], Bool[torch.Tensor, "batch n"]]:
    """Each item's image positions in order, padded (with position 0) to the batch's most, and
    which entries are real."""
    counts = image.sum(-1)
    valid = torch.arange(int(counts.max()))[None, :] < counts[:, None]
    positions = torch.zeros(valid.shape, dtype=torch.long)
    positions[valid] = image.nonzero()[:, 1]
    return positions, valid


def layer_kinds(vlm) -> list[str]:
    """Each language-model layer's attention kind, as HF names them (``"full_attention"``,
    ``"sliding_attention"``): the text config's ``layer_types``, else every layer sliding where the
    config has a window (Mistral-style), else full."""
    config = vlm.adapter.text_config
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    kind = "sliding_attention" if vlm.adapter.sliding_window is not None else "full_attention"
    return [kind] * vlm.cfg.n_layers


def allowed_pairs(vlm, batch, kind: str = "full_attention") -> Bool[torch.Tensor, "batch query key"]:
    """Which (query, key) pairs a layer of ``kind`` lets attend, from the mask the language model
    gets (Gemma 3: causal or both in one image's block; PaliGemma: the prefix both ways; a sliding
    layer: within its window of columns, as HF counts it)."""
    embeds = torch.zeros(*batch.input_ids.shape, 1)
    inputs = {k: v for k, v in batch.inputs.items() if k in batch.token_inputs}
    mask = vlm.adapter.lm_attention_mask(inputs, embeds, batch.position_ids)
    if isinstance(mask, dict):
        mask = mask.get(kind, mask["full_attention"])
    if mask.dim() == 2:  # the padding mask: causal attention to real keys (within the window)
        n = mask.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        window = vlm.adapter.sliding_window
        if kind == "sliding_attention" and window is not None:
            columns = torch.arange(n)
            allowed = allowed & (columns[None, :] > columns[:, None] - window)[None]
        return allowed
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return allowed[:, 0].expand(len(batch), -1, -1).cpu()


def pair_count(
    query_mask: Bool[torch.Tensor, "batch query"],
    key_mask: Bool[torch.Tensor, "batch key"],
    allowed: Bool[torch.Tensor, "batch query key"] | None = None,
) -> Float[torch.Tensor, " batch"]:
    """Number of (query in Q, key in K) pairs that may attend: causal pairs, or those ``allowed``."""
    if allowed is None:
        return causal_pair_count(query_mask, key_mask)
    return torch.einsum("bq,bqk,bk->b", query_mask.float(), allowed.float(), key_mask.float())


def _nan_like(layer: dict) -> dict:
    """One layer's attention summary with every value NaN (a layer with no attention pattern)."""
    return {
        key: {name: torch.full_like(v, float("nan")) for name, v in value.items()}
        if isinstance(value, dict)
        else torch.full_like(value, float("nan"))
        for key, value in layer.items()
    }


def _stacked(tensors) -> torch.Tensor:
    return torch.stack(list(tensors)).cpu()


def _detached(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in part.items()}


def _to_cpu(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in part.items()}


def hook_names(
    n_layers: int,
    analyses: tuple[str, ...],
    attention_layers: tuple[int, ...] | None = None,
    value_hooks: dict[int, str] | None = None,
) -> list[str]:
    """The hook points :func:`collect` reads (attention: in ``attention_layers``, default all; each
    layer's values at ``value_hooks[layer]``, default ``blocks.{l}.attn.hook_v``, a hook shared by
    several layers listed once)."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    if "norm_attention" in analyses:
        for layer in range(n_layers) if attention_layers is None else attention_layers:
            values = (value_hooks or {}).get(layer, f"blocks.{layer}.attn.hook_v")
            names += [values] * (values not in names) + [f"blocks.{layer}.attn.hook_pattern"]
    return names


ATTENTION_PATHS = ("auto", "fused", "pattern")


@torch.no_grad()
def collect(
    vlm,
    batch,
    analyses: tuple[str, ...] = ANALYSES,
    *,
    lens_positions: Int[torch.Tensor, "batch n"] | None = None,
    top_k: int = 5,
    verbalize_images: bool = False,
    attention: str = "auto",
) -> BatchAnalysis:
    """Run ``batch`` once and reduce every layer on the fly (see the module docstring).

    ``attention``: "fused" runs each layer's attention as HF sdpa and recomputes alpha from q and k
    block by block for the norm-based lens (:mod:`~hooked_vllm.model.observed_attention`,
    :func:`~hooked_vllm.analysis.attention_lenses.attention_group_sums`; a Triton kernel on CUDA);
    "pattern" hooks ``hook_pattern`` of the bridge's step-by-step attention; "auto" is "fused"
    where the backbone supports it. Both give the same numbers (to float rounding). Families whose
    attention mask is not causal plus padding (Gemma 3) always take the pattern path.
    """
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_PATHS}.")
    batch = vlm.to_batch(batch)
    reducer = BatchReducer(vlm, batch, analyses, lens_positions, top_k, verbalize_images)
    feed = _feeder(reducer, vlm.adapter.value_hooks(), reducer.lens_hooks)

    def hook_fn(tensor, hook, name):
        feed(name, tensor)

    # Recomputing alpha from q and k assumes causal attention plus padding, no window; other masks
    # (Gemma 3's bidirectional image blocks, PaliGemma's prefix, sliding windows) read the model's own
    # pattern instead.
    fused = (
        vlm.adapter.plain_causal
        and vlm.adapter.sliding_window is None
        and (attention == "fused" or (attention == "auto" and supported(vlm)))
    )
    names = hook_names(
        vlm.cfg.n_layers, () if fused else analyses, vlm.adapter.attention_layers, vlm.adapter.value_hooks()
    )
    names += list(reducer.lens_hooks)
    hooks = [(name, partial(hook_fn, name=name)) for name in names]
    if not fused:
        vlm.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
        return reducer.finish()
    causal_only = bool(batch.attention_mask.bool().all())  # the mask is plain causal here
    with observed_sdpa_attention(vlm, reducer.on_qkv, causal_only=causal_only):
        vlm.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
    return reducer.finish()


def reduce_cache(
    vlm,
    batch,
    cache,
    analyses: tuple[str, ...] = ANALYSES,
    *,
    lens_positions: Int[torch.Tensor, "batch n"] | None = None,
    top_k: int = 5,
    verbalize_images: bool = False,
) -> BatchAnalysis:
    """The same analysis from a full ``ActivationCache`` of ``batch``."""
    batch = vlm.to_batch(batch)
    reducer = BatchReducer(vlm, batch, analyses, lens_positions, top_k, verbalize_images)
    value_hooks = vlm.adapter.value_hooks()
    feed = _feeder(reducer, value_hooks, reducer.lens_hooks)
    # Residual streams come in layer order, and each layer's values before its pattern.
    names = hook_names(vlm.cfg.n_layers, analyses, vlm.adapter.attention_layers, value_hooks)
    for name in names + list(reducer.lens_hooks):
        feed(name, cache[name])
    return reducer.finish()


def _feeder(reducer: BatchReducer, value_hooks: dict[int, str], lens_hooks: tuple[str, ...] = ()):
    """Routes ``(hook name, activation)`` to the reducer: values (``value_hooks``: the hook of each
    layer's values, one hook possibly serving several layers) wait for their layer's pattern,
    residual streams go straight in (in layer order), as do the lens's own hooks (``lens_hooks``,
    where it reads others: Gemma 3n's four streams)."""
    values: dict[int, torch.Tensor] = {}
    readers: dict[str, list[int]] = {}
    for layer, name in value_hooks.items():
        readers.setdefault(name, []).append(layer)

    def feed(name: str, tensor: torch.Tensor) -> None:
        if name in lens_hooks:
            reducer.on_lens(tensor)
        elif name in readers:
            values.update(dict.fromkeys(readers[name], tensor))
        elif name.endswith("attn.hook_pattern"):
            layer = _layer_of(name)
            reducer.on_attention(layer, tensor, values.pop(layer))
        else:
            reducer.on_resid(tensor)

    return feed


def _layer_of(hook_name: str) -> int:
    return int(hook_name.split(".")[1])
