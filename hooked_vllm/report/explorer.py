"""Per-item data for the report's explorer: every layer, every head, on the item's own image.

For a few chosen items (``--report-items``) the report shows what the dataset aggregates average
away: the image, the prompt as tokens, the model's own answer (greedy, ``vlm.generate``, until EOS
or ``answer_tokens``) and, where the item has a label, whether it is right; norm-based saliency of
each image patch (from the instruction and from the last position) for every layer and every head,
the logit lens's top-1 token of every image patch per layer, and the logit lens at the last
position.

Saliency of image key j at layer l:

- ``head = "all"``: ``||sum_h alpha_h(q, j) f_h(x_j)||`` (Kobayashi et al.'s norm of the attention
  output's part coming from j), the quantity :func:`~hooked_vllm.analysis.collect.collect` stores
  for the dataset (from the last position; from the instruction: summed over its tokens);
- ``head = h``: ``alpha_h(q, j) ||f_h(x_j)||``, that head's share (the heads' shares do not add up
  to the whole: it is the norm of a sum).

Layers are numbered as everywhere in the report: layer numbers are TransformerLens's block indices.
The residual stream at layer l is what block l reads (``blocks.{l}.hook_resid_pre``, HF's
``hidden_states[l]``): layer 0 is the embedding and layer L the final stream after the last block.
Attention at layer l is block l's attention (0 to L-1). So ``saliency[source][l]`` is block ``l``'s
attention (``cache["pattern", l]``) and ``lens_grid[l]`` the stream block ``l`` reads (read at
block ``l - 1``'s ``hook_resid_post``, as Hugging Face's ``hidden_states``: for Qwen3-VL, before
the DeepStack features are added, as in :func:`~hooked_vllm.analysis.collect.collect`).

Example:
    >>> views = explore(vlm, batch, images, ["cat"], ["What is this?"])  # doctest: +SKIP
    >>> views[0].saliency["last"].shape  # [layer, 1 + head, image patch]  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from jaxtyping import Float, Int

from hooked_vllm.analysis.logit_lens import LogitLens
from hooked_vllm.analysis.norm_attention import head_gram, summed_norms_key_major
from hooked_vllm.model.images import ImageLike, item_images, load_image, to_rgb
from hooked_vllm.model.layers import attention_w_o
from hooked_vllm.model.observed_attention import observed_sdpa_attention, supported
from hooked_vllm.report.viz import seen_part

SOURCES = ("text", "last")


@dataclass
class ItemView:
    """One item's explorer data (``n``: the image tokens of the item's first image, in sequence
    order; only the first image of a multi-image item is shown)."""

    item_id: str
    instruction: str
    #: the image, downscaled, as a ``data:image/jpeg`` URI
    thumbnail: str
    #: the prompt as tokens (real positions only), with each one's modality
    tokens: list[str]
    modalities: list[str]
    #: per tile (tile 0: the whole image): ``{"tile", "rows", "cols", "index"}``, ``index`` row-major,
    #: the patch drawn in each cell (-1: none)
    tiles: list[dict]
    #: ``{"text" | "last": [layer, 1 + head, n]}``: index 0 all heads, 1 + h head h
    saliency: dict[str, Float[np.ndarray, "layer head_and_all n"]]
    #: logit-lens top-1 token id of every patch, per lens layer (0 = embedding)
    lens_grid: Int[np.ndarray, "lens_layer n"]
    #: logit lens at the last position: top-k token ids and probabilities per lens layer
    lens_last_tokens: Int[np.ndarray, "lens_layer k"]
    lens_last_probs: Float[np.ndarray, "lens_layer k"]
    #: False where the image tokens are not patches (InstructBLIP's Q-Former queries): they are then
    #: drawn as a row of tokens beside the image, not over it
    spatial: bool = True
    #: True where the thumbnail is the part of the image the model saw, not all of it (LLaVA-1.5's
    #: centre crop of a non-square image: ``adapter.image_region``)
    cropped: bool = False
    #: the model's answer: its greedy continuation of the prompt until EOS, decoded without special
    #: tokens (None: not computed)
    answer: str | None = None
    #: True where the answer stopped at ``answer_tokens`` tokens, before EOS
    answer_cut: bool = False
    #: the item's expected answer (the shapes dataset's ``meta["answer"]``), None where it has none
    label: str | None = None
    #: whether ``answer`` is ``label`` (:func:`same_answer`); None without a label or an answer
    correct: bool | None = None


def thumbnail(image: ImageLike, max_side: int = 256, quality: int = 85) -> str:
    """``image`` downscaled to at most ``max_side`` pixels a side, as a data URI: PNG (its exact
    colours) where that is no larger than the JPEG, as for drawings and synthetic scenes such as
    the demo's shapes; JPEG otherwise (photographs: a PNG is about 6 times larger)."""
    picture = to_rgb(image)
    picture.thumbnail((max_side, max_side))
    encoded = {}
    for kind, options in (("jpeg", {"quality": quality}), ("png", {"optimize": True})):
        buffer = io.BytesIO()
        picture.save(buffer, format=kind.upper(), **options)
        encoded[kind] = buffer.getvalue()
    kind = "png" if len(encoded["png"]) <= len(encoded["jpeg"]) else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(encoded[kind]).decode("ascii")


def same_answer(answer: str, label: str) -> bool:
    """Whether a model's answer is the label: equal once case, surrounding spaces, repeated spaces
    and a final full stop are set aside ("Red." is "red"; "a red one" is not "red")."""

    def plain(text: str) -> str:
        return " ".join(text.split()).lower().removesuffix(".").strip()

    return plain(answer) == plain(label)


@torch.no_grad()
def answers(vlm, batch, max_new_tokens: int = 24) -> list[tuple[str, bool]]:
    """Each item's greedy answer (:meth:`~hooked_vllm.model.generation.GenerationMixin.generate`,
    pure greedy: the same answer at every run, whatever sampling the checkpoint's generation config
    asks for) until EOS or ``max_new_tokens``: ``(text, cut)``, the text decoded without special
    tokens, ``cut`` True where it stopped at ``max_new_tokens`` before EOS."""
    tokenizer = vlm.tokenizer
    tokens = vlm.generate(batch, max_new_tokens, do_sample=False, return_type="tokens").cpu()
    eos = tokenizer.eos_token_id
    out = []
    for row in tokens.tolist():
        ended = eos is not None and eos in row
        row = row[: row.index(eos)] if ended else row
        out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), not ended))
    return out


def tile_layout(slots) -> list[dict]:
    """Where each patch of one image lies: per tile, its grid and the patch index in each cell
    (:meth:`~hooked_vllm.adapters.base.ImageSlots.patch_index`), as JSON-ready values."""
    return [
        {
            "tile": tile,
            "rows": int(index.shape[0]),
            "cols": int(index.shape[1]),
            "index": index.flatten().tolist(),
        }
        for tile, index in slots.patch_index().items()
    ]


@dataclass
class _Pass:
    """What one forward pass gathers for the explorer (``n``: the batch's most image patches)."""

    #: ``{"text" | "last": [layer, batch, 1 + head, n]}``, NaN past an item's patches
    saliency: dict[str, torch.Tensor]
    #: logit-lens top-1 of every image patch, ``[lens_layer, batch, n]`` (-1 past an item's patches)
    lens_grid: torch.Tensor
    #: logit lens at the last position, ``[lens_layer, batch, k]``
    lens_last_tokens: torch.Tensor
    lens_last_probs: torch.Tensor


@torch.no_grad()
def explorer_pass(vlm, batch, top_k: int = 5, attention: str = "auto") -> _Pass:
    """One forward pass reading each layer's attention, values and residual stream: the saliency of
    every image patch (all heads, and each head) from the last position and from the instruction,
    and the logit lens at every image patch and at the last position.

    Only the queries the explorer reads (the instruction's and each item's last position) are kept.
    ``attention``: "fused" runs HF sdpa and recomputes alpha for those queries alone from q and k
    (no ``[batch, head, query, key]`` pattern: long sequences fit); "pattern" reads the bridge's
    ``hook_pattern``; "auto": "fused" where the mask is causal plus padding with no window (as
    :func:`~hooked_vllm.analysis.collect.collect` decides), else "pattern". Both give the same
    numbers to float rounding."""
    if attention not in ("auto", "fused", "pattern"):
        raise ValueError(f"attention={attention!r} is not one of auto, fused, pattern.")
    batch = vlm.to_batch(batch)
    counts = batch.image_mask.sum(-1)
    valid = torch.arange(int(counts.max()))[None, :] < counts[:, None]
    positions = torch.zeros(valid.shape, dtype=torch.long)
    positions[valid] = batch.image_mask.nonzero()[:, 1]
    rows, last = torch.arange(len(batch)), batch.last_positions
    is_last = torch.zeros_like(batch.text_mask)
    is_last[rows, last] = True
    queries = (batch.text_mask | is_last).any(0).nonzero().flatten()  # columns, ascending
    text = batch.text_mask[:, queries].float()  # [b, n_queries]
    last_query = torch.searchsorted(queries, last)  # each item's last position among them
    # the fused path's own mask for those queries: causal, and no padding key
    allowed = (torch.arange(batch.input_ids.shape[1])[None, :] <= queries[:, None])[
        None
    ] & batch.attention_mask.bool()[:, None, :]  # [b, n_queries, key]
    lens = LogitLens.from_vlm(vlm)
    values: dict[int, torch.Tensor] = {}
    saliency: dict[str, dict[int, torch.Tensor]] = {source: {} for source in SOURCES}
    grid, last_tokens, last_probs = [], [], []

    def reduce(layer, alpha, v):
        """``alpha``: [b, h, n_queries, key] for the kept queries; ``v``: [b, key, kv_head, d_head]."""
        device = alpha.device
        at, b = positions.to(device), rows.to(device)
        v = v[b[:, None], at]  # [b, n, kv_head, d_head]: the image keys only
        gram = head_gram(v, attention_w_o(vlm.blocks[layer].attn).to(device))  # [b, n, h, h]
        alpha = alpha.float().gather(3, at[:, None, None, :].expand(*alpha.shape[:3], -1))  # [b, h, nq, n]
        f_norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().transpose(1, 2)  # [b, h, n]
        summed = summed_norms_key_major(alpha, gram)  # [b, n, n_queries]: ||sum_h alpha f_h||
        j = last_query.to(device)
        pieces = {
            "text": (
                torch.einsum("bnq,bq->bn", summed, text.to(device)),
                torch.einsum("bhqn,bq->bhn", alpha, text.to(device)),
            ),
            "last": (summed[b, :, j], alpha[b, :, j]),
        }
        hidden = ~valid.to(device)[:, None, :]
        for source, (all_heads, per_head) in pieces.items():
            both = torch.cat([all_heads[:, None], per_head * f_norm], dim=1)  # [b, 1 + h, n]
            saliency[source][layer] = both.masked_fill(hidden, float("nan")).cpu()

    def keep_values(v, hook, layer):
        values[layer] = v

    def reduce_pattern(pattern, hook, layer):
        reduce(layer, pattern[:, :, queries.to(pattern.device)], values.pop(layer))

    def observe(layer, q, k, v, scaling):
        """Post-RoPE q [b, h, query, d], k and v [b, kv_head, key, d]: alpha of the kept queries."""
        n_heads = q.shape[1]
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        scores = q[:, :, queries.to(q.device)].float() @ k.float().transpose(-1, -2) * scaling
        scores = scores.masked_fill(~allowed.to(q.device)[:, None], float("-inf"))
        reduce(layer, scores.softmax(-1).nan_to_num(0.0), v.transpose(1, 2))

    def read_lens(activation, hook):
        resid = lens.lens_input(activation)  # what the final norm would read (Gemma 3n: its 4 streams')
        device = resid.device
        patches = resid[rows.to(device)[:, None], positions.to(device)]  # [b, n, d]
        grid.append(lens.logits(patches).argmax(-1).masked_fill(~valid.to(device), -1).cpu())
        probs = lens.logits(resid[rows.to(device), last.to(device)]).float().softmax(-1)  # [b, vocab]
        top = probs.topk(top_k, dim=-1)
        last_tokens.append(top.indices.cpu())
        last_probs.append(top.values.cpu())

    fused = attention == "fused" or (
        attention == "auto"
        and vlm.adapter.plain_causal
        and vlm.adapter.sliding_window is None
        and supported(vlm)
    )
    hooks = [(name, read_lens) for name in lens.hook_names]  # the embedding, then every layer
    if fused:
        with observed_sdpa_attention(vlm, observe):
            vlm.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
    else:
        value_hooks = vlm.adapter.value_hooks()  # a hook may hold several layers' values (Gemma 4)
        for layer in vlm.adapter.attention_layers:
            hooks.append((value_hooks[layer], partial(keep_values, layer=layer)))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", partial(reduce_pattern, layer=layer)))
        vlm.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
    # every block a row: NaN at layers with no attention pattern (Qwen3.5's linear attention)
    shown = next(iter(saliency["last"].values()))
    nan = torch.full_like(shown, float("nan"))
    return _Pass(
        saliency={
            source: torch.stack([layers.get(layer, nan) for layer in range(vlm.cfg.n_layers)])
            for source, layers in saliency.items()
        },
        lens_grid=torch.stack(grid),
        lens_last_tokens=torch.stack(last_tokens),
        lens_last_probs=torch.stack(last_probs),
    )


@torch.no_grad()
def explore(
    vlm,
    batch,
    images: Sequence[ImageLike],
    item_ids: Sequence[str],
    instructions: Sequence[str],
    *,
    top_k: int = 5,
    thumbnail_side: int = 256,
    attention: str = "auto",
    labels: Sequence[str | None] | None = None,
    answer_tokens: int = 24,
) -> list[ItemView]:
    """Explorer data of every item of ``batch`` (one image each; ``images`` as given to
    ``vlm.prepare``), from one forward pass (:func:`explorer_pass`), and each item's answer
    (:func:`answers`, ``answer_tokens`` at most; 0: not computed) checked against ``labels``
    (each item's expected answer, or None) where given."""
    batch = vlm.to_batch(batch)
    found = explorer_pass(vlm, batch, top_k, attention)
    replies = answers(vlm, batch, answer_tokens) if answer_tokens > 0 else [(None, False)] * len(batch)
    labels = list(labels) if labels is not None else [None] * len(batch)
    views = []
    for b, item_id in enumerate(item_ids):
        if not batch.image_slots or not batch.image_slots[b]:
            raise ValueError(f"Item {item_id!r} has no image: the explorer shows items with one.")
        slots = batch.image_slots[b][0]
        n = int(slots.is_patch.sum())
        picture = to_rgb(item_images(images[b])[0])
        seen = seen_part(vlm, picture)
        real = batch.attention_mask[b].bool()
        modality = np.where(batch.image_mask[b], "image", np.where(batch.text_mask[b], "text", "special"))
        views.append(
            ItemView(
                item_id=str(item_id),
                instruction=instructions[b],
                thumbnail=thumbnail(seen, thumbnail_side),
                tokens=_real_tokens(vlm, batch, b),
                modalities=modality[real.numpy()].tolist(),
                tiles=tile_layout(slots),
                saliency={source: found.saliency[source][:, b, :, :n].numpy() for source in SOURCES},
                lens_grid=found.lens_grid[:, b, :n].numpy(),
                lens_last_tokens=found.lens_last_tokens[:, b].numpy(),
                lens_last_probs=found.lens_last_probs[:, b].numpy(),
                spatial=bool(slots.spatial),
                cropped=seen.size != picture.size,
                answer=replies[b][0],
                answer_cut=replies[b][1],
                label=labels[b],
                correct=(
                    same_answer(replies[b][0], labels[b])
                    if replies[b][0] is not None and labels[b] is not None
                    else None
                ),
            )
        )
    return views


def _real_tokens(vlm, batch, b: int) -> list[str]:
    tokens = vlm.to_str_tokens(batch, b)
    real = batch.attention_mask[b].bool().tolist()
    return [token for token, keep in zip(tokens, real) if keep]


def label_of(item) -> str | None:
    """A dataset item's expected answer: ``meta["answer"]`` (the shapes dataset's), else None."""
    answer = (getattr(item, "meta", None) or {}).get("answer")
    return str(answer) if answer is not None else None


def explore_items(
    vlm, items: Sequence, *, batch_size: int = 4, max_pixels: int | None = None, top_k: int = 5
) -> list[ItemView]:
    """:func:`explore` for dataset items (``item_id``, ``image_path``, ``instruction``, and the
    label :func:`label_of` finds), in batches."""
    views: list[ItemView] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        images = [load_image(item.image_path, max_pixels=max_pixels) for item in chunk]
        instructions = [item.instruction for item in chunk]
        batch = vlm.prepare(images, instructions)
        ids = [item.item_id for item in chunk]
        labels = [label_of(item) for item in chunk]
        views += explore(vlm, batch, images, ids, instructions, top_k=top_k, labels=labels)
    return views


def spread(ids: Sequence[str], k: int) -> list[str]:
    """``k`` of ``ids`` spread evenly over them (all of them when ``k >= len(ids)``), in order."""
    if k <= 0 or not ids:
        return []
    if k >= len(ids):
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, k).round().astype(int)]


def _encoded(maps: np.ndarray) -> dict:
    """``[layer, head, n]`` maps as float16 of each value over its (layer, head) frame's largest
    magnitude ``scale`` (NaN: no value), base64: 2 bytes a value, relative error below 5e-4 for
    values above 6e-5 of the frame's largest (float16's normal range), absolute error below 6e-8 of
    it under that. ``low``/``high``: each frame's finite min and max, exact (the colour scale)."""
    frames = maps.reshape(-1, maps.shape[-1]).astype(np.float64)
    finite = np.isfinite(frames)
    low = np.where(finite, frames, np.inf).min(-1)
    high = np.where(finite, frames, -np.inf).max(-1)
    low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
    scale = np.maximum(np.abs(low), np.abs(high))
    scale = np.where(scale > 0, scale, 1.0)
    codes = np.where(finite, frames / scale[:, None], np.nan).astype("<f2")
    return {
        "data": base64.b64encode(codes.tobytes()).decode("ascii"),
        "scale": scale.tolist(),
        "low": low.tolist(),
        "high": high.tolist(),
    }


def payload(views: Sequence[ItemView], tokenizer) -> dict:
    """The explorer's data as JSON-ready values: token ids become indices into one shared
    ``vocab`` of decoded strings; saliency maps are float16 (:func:`_encoded`)."""
    vocab: dict[int, int] = {}
    words: list[str] = []

    def word(token: int) -> int:
        if token not in vocab:
            vocab[token] = len(words)
            words.append(tokenizer.decode([token]) if token >= 0 else "")
        return vocab[token]

    items = []
    for view in views:
        n_layers, n_heads_and_all, n = view.saliency["last"].shape
        items.append(
            {
                "id": view.item_id,
                "instruction": view.instruction,
                "thumbnail": view.thumbnail,
                "tokens": [[token, modality] for token, modality in zip(view.tokens, view.modalities)],
                "tiles": view.tiles,
                "spatial": view.spatial,
                "cropped": view.cropped,
                "answer": view.answer,
                "answer_cut": view.answer_cut,
                "label": view.label,
                "correct": view.correct,
                "n_layers": n_layers,
                "n_heads": n_heads_and_all - 1,
                "n_patches": n,
                "saliency": {source: _encoded(view.saliency[source]) for source in SOURCES},
                "lens_grid": [[word(int(t)) for t in layer] for layer in view.lens_grid],
                "lens_last": [
                    [
                        [word(int(t)), round(float(p), 4) if np.isfinite(p) else None]
                        for t, p in zip(tokens, probs)
                    ]
                    for tokens, probs in zip(view.lens_last_tokens, view.lens_last_probs)
                ],
            }
        )
    return {"vocab": words, "items": items}
