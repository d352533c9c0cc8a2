"""Norm-based attention straight from queries and keys, without the [batch, head, query, key] pattern.

The collector needs two things of each layer's attention, both summed over the queries of a few
groups (image, instruction, last position): the weight each key receives per head, and the
head-summed norm ||sum_h alpha_hij f_h(x_j)|| each key receives. Both are sums over queries, so the
pattern can be recomputed block by block from q and k (softmax of one block of rows at a time) and
reduced on the spot: peak memory O(block x keys) instead of O(queries x keys) per head, and the
model's own forward is free to use a fused attention kernel (sdpa, flash) that never writes alpha.

:func:`attention_group_sums` does that in PyTorch on any device; on CUDA it calls a Triton kernel
(:mod:`hooked_vllm.kernels.attention_lenses`) with the same inputs and results when Triton is
importable, and falls back to PyTorch otherwise.

Example:
    >>> q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    >>> gram = torch.eye(4).expand(1, 6, 4, 4)  # head Gram of each key (head_gram(v, W_O))
    >>> groups = torch.ones(1, 1, 6)
    >>> norm_rows, alpha_rows = attention_group_sums(q, k, gram, groups, scaling=8**-0.5)
    >>> alpha_rows.sum(-1).round()  # every query row of alpha sums to 1; six queries in the group
    tensor([[[6.],
             [6.],
             [6.],
             [6.]]])
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Bool, Float

from hooked_vllm.analysis.norm_attention import gram_factor, summed_norms_key_major
from hooked_vllm.kernels import attention_lenses as kernel

BACKENDS = ("auto", "torch", "triton")


def attention_group_sums(
    q: Float[torch.Tensor, "batch head query d_head"],
    k: Float[torch.Tensor, "batch kv_head key d_head"],
    gram: Float[torch.Tensor, "batch key head head"],
    query_groups: Float[torch.Tensor, "batch group query"],
    key_mask: Bool[torch.Tensor, "batch key"] | None = None,
    *,
    scaling: float,
    causal: bool = True,
    query_block: int = 64,
    backend: str = "auto",
    padded: bool | None = None,
) -> tuple[Float[torch.Tensor, "batch group key"], Float[torch.Tensor, "batch head group key"]]:
    """Per query group: the head-summed norm each key receives and the attention weight per head.

    alpha_h = softmax(scaling * q_h k_h^T) over the keys a query may see (key <= query when
    ``causal``, and ``key_mask`` True), with query head h reading key head h // (H / H_kv). Returns
    ``norm_rows[b, g, j] = sum_i group[b, g, i] * sqrt(alpha_:ij^T G_j alpha_:ij)`` (the head-summed
    norm ||sum_h alpha_hij f_h(x_j)||, G_j the head Gram of key j) and
    ``alpha_rows[b, h, g, j] = sum_i group[b, g, i] * alpha_hij``, in float32. A query that may see
    no key at all (a left-padding row) has alpha = 0. Queries are the last ``query`` of the ``key``
    positions (equal counts in a plain forward).

    ``backend``: "torch", "triton" (CUDA tensors, Triton installed) or "auto" (Triton where it can run).
    ``padded``: whether ``key_mask`` masks any key (None: look, which waits for the device; callers
    that know it per batch say so, and an unpadded batch skips the masking).
    The PyTorch path evaluates the quadratic form with G directly (as the pattern path does,
    :func:`~hooked_vllm.analysis.norm_attention.summed_norms_key_major`); the kernel with a factor
    G_j = L_j L_j^T, as ||L_j^T alpha_:ij|| (it accumulates over heads one at a time).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key heads evenly.")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"{q.shape[2]} queries but {k.shape[2]} keys: queries must be the last key positions."
        )
    if key_mask is None:
        key_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    kwargs = dict(scaling=scaling, causal=causal)
    if backend == "triton" or (backend == "auto" and kernel.can_run(q) and not _triton_failed):
        try:
            return kernel.attention_group_sums(q, k, gram_factor(gram), query_groups, key_mask, **kwargs)
        except Exception as error:  # noqa: BLE001 - "auto" must keep a run going on any GPU
            if backend == "triton":
                raise
            _give_up_on_triton(error)
    if padded is None:
        padded = not bool(key_mask.all())
    return _attention_group_sums_torch(
        q, k, gram, query_groups, key_mask, query_block=query_block, padded=padded, **kwargs
    )


_triton_failed = False


def _give_up_on_triton(error: Exception) -> None:
    """The kernel failed to compile or run here: say so once, and use PyTorch from now on."""
    global _triton_failed
    _triton_failed = True
    warnings.warn(
        f"The Triton kernel for norm-based attention failed ({type(error).__name__}: {error}); "
        "using the PyTorch path (same results, slower) for the rest of this session. "
        "Please report it with `python benchmarks/kernel.py` output.",
        RuntimeWarning,
        stacklevel=3,
    )


def attend_with_group_sums(
    q: Float[torch.Tensor, "batch head query d_head"],
    k: Float[torch.Tensor, "batch kv_head key d_head"],
    v: Float[torch.Tensor, "batch kv_head key d_head"],
    gram: Float[torch.Tensor, "batch key head head"],
    query_groups: Float[torch.Tensor, "batch group query"],
    key_mask: Bool[torch.Tensor, "batch key"],
    *,
    scaling: float,
    padded: bool,
    query_block: int = 64,
) -> tuple[
    Float[torch.Tensor, "batch query head d_head"],
    Float[torch.Tensor, "batch group key"],
    Float[torch.Tensor, "batch head group key"],
]:
    """The layer's causal attention output and :func:`attention_group_sums`'s two reductions from one
    softmax: each block of query rows is computed once, reduced for the lenses and multiplied by the
    values (eager attention by query blocks, so the model's own attention call is not needed).

    The output is ``softmax(scaling * q k^T + mask) v`` as HF's eager attention computes it (float32
    scores and softmax; the product in float32, returned in ``v``'s dtype), laid out as HF's attention
    functions return it: ``[batch, query, head, d_head]``. A query that sees no key (a left-padding
    row) gets zeros. PyTorch only: on CUDA the collector keeps the fused sdpa kernel and the Triton
    reductions instead.

    Example:
        >>> q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        >>> gram, groups = torch.eye(4).expand(1, 6, 4, 4), torch.ones(1, 1, 6)
        >>> out, norm_rows, alpha_rows = attend_with_group_sums(
        ...     q, k, v, gram, groups, torch.ones(1, 6, dtype=torch.bool), scaling=8**-0.5, padded=False)
        >>> sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        >>> torch.allclose(out, sdpa.transpose(1, 2), atol=1e-6)
        True
    """
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    norm_rows, alpha_rows = _attention_group_sums_torch(
        q, k, gram, query_groups, key_mask, scaling=scaling, causal=True, query_block=query_block,
        padded=padded, v=v, out=out,
    )  # fmt: skip
    return out.to(v.dtype), norm_rows, alpha_rows


def _attention_group_sums_torch(
    q, k, gram, query_groups, key_mask, *, scaling, causal, query_block, padded, v=None, out=None
):
    """The PyTorch path; with ``v`` and ``out`` it also writes alpha @ v into ``out`` [batch, query,
    head, d_head] (float32), block by block."""
    batch, n_heads, queries, _ = q.shape
    keys = k.shape[2]
    offset = keys - queries  # query i sits at key position offset + i
    q, k = q.float(), k.float()
    if k.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
    if v is not None:
        v = v.float()
        if v.shape[1] != n_heads:
            v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    k_t = k.transpose(-1, -2)
    groups_by_head = query_groups.float()[:, None]  # [batch, 1, group, query]
    gram = gram.float()
    norm_rows = q.new_zeros(batch, query_groups.shape[1], keys, dtype=torch.float32)
    alpha_rows = q.new_zeros(batch, n_heads, query_groups.shape[1], keys, dtype=torch.float32)
    not_key = ~key_mask[:, None, None, :]
    key_positions = torch.arange(keys, device=q.device)
    for q0 in range(0, queries, query_block):
        q1 = min(q0 + query_block, queries)
        seen = offset + q1 if causal else keys  # keys any query of the block may see
        scores = torch.matmul(q[:, :, q0:q1], k_t[..., :seen]).mul_(scaling)
        if padded:
            scores.masked_fill_(not_key[..., :seen], float("-inf"))
        if causal:  # keys before the block's first query are seen by all of its queries
            first = offset + q0
            later = key_positions[first:seen] > torch.arange(first, offset + q1, device=q.device)[:, None]
            scores[..., first:seen].masked_fill_(later, float("-inf"))
        alpha = torch.softmax(scores, dim=-1)
        if padded:  # (without padding every query sees at least itself)
            alpha.nan_to_num_(0.0)  # rows that see no key (left-padding queries)
        groups = groups_by_head[..., q0:q1]
        alpha_rows[..., :seen] += torch.matmul(groups, alpha)  # [batch, head, group, key]
        if v is not None:  # the layer's output rows, [batch, query, head, d_head] as HF lays them out
            out[:, q0:q1] = torch.matmul(alpha, v[:, :, :seen]).transpose(1, 2)
        norms = summed_norms_key_major(alpha, gram[:, :seen])  # [batch, key, query]
        norm_rows[..., :seen] += torch.matmul(groups[:, 0], norms.transpose(1, 2))
    return norm_rows, alpha_rows
