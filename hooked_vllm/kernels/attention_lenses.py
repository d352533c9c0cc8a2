"""Triton kernels for :func:`hooked_vllm.analysis.attention_lenses.attention_group_sums`.

Two passes over q and k, neither writing the attention pattern:

1. ``_row_logsumexp``: per (item, head, block of queries), the softmax normaliser of every query
   row, streamed over key blocks (online max and sum, as flash attention does).
2. ``_group_sums``: per (item, block of keys, share of the query blocks), loop over the query
   blocks and heads (the shares are added atomically: at batch 1 there are too few key blocks to
   fill a GPU); recompute each head's alpha block from q, k and the normaliser, add it to that
   head's query-group sums, and accumulate y[i, j, :] = sum_h alpha_hij L_j[h, :] (L_j the
   head-Gram factor of key j); then ||y[i, j]|| is the head-summed norm, summed into the query groups.

Scores are computed from the inputs' dtype with float32 accumulation (IEEE float32 products for
float32 inputs, no TF32); everything after is float32. In a process started with TRITON_INTERPRET=1
the same kernels run in Triton's interpreter on CPU tensors: that is how CI checks them on a machine
without a GPU.

Launch configuration (block sizes, warps, programs per multiprocessor): :data:`DEFAULT_LAUNCH`, updated
by ``tuned.json`` beside this file when it exists (written by the block-size sweep of
``benchmarks/gpu_run.py`` on a GPU; the environment variable ``HOOKED_VLLM_KERNEL_TUNING`` names
another file). Read once, at import.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch on Linux
    triton = tl = None

# Untuned defaults: the group-sums kernel keeps a [query_block, key_block, rank] float32 accumulator
# per program (rank 32 at 7B), hence eight warps. ``num_warps`` is the group-sums kernel's (the
# normaliser pass keeps Triton's default); ``programs_per_sm`` sets how many programs share a key
# block's query blocks (see _query_splits).
DEFAULT_LAUNCH = {"query_block": 16, "key_block": 32, "num_warps": 8, "programs_per_sm": 4}
TUNING_ENV = "HOOKED_VLLM_KERNEL_TUNING"
_ALLOWED = {
    "query_block": (16, 32, 64, 128),  # tl.dot needs every side >= 16
    "key_block": (16, 32, 64, 128),
    "num_warps": (1, 2, 4, 8, 16),
    "programs_per_sm": (1, 2, 4, 8, 16),
}


def tuning_path() -> Path:
    """The tuned launch configuration's file: $HOOKED_VLLM_KERNEL_TUNING, else tuned.json here."""
    return Path(os.environ.get(TUNING_ENV) or Path(__file__).with_name("tuned.json"))


def load_launch(path: Path | None = None) -> dict[str, int]:
    """:data:`DEFAULT_LAUNCH` updated by the JSON object in ``path`` (default :func:`tuning_path`),
    if that file exists. Keys other than DEFAULT_LAUNCH's (the sweep's measurements) are ignored."""
    path = tuning_path() if path is None else Path(path)
    launch = dict(DEFAULT_LAUNCH)
    if not path.is_file():
        return launch
    try:
        tuned = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        tuned = error
    if not isinstance(tuned, dict):
        raise ValueError(
            f"{path}: expected a JSON object like {json.dumps(DEFAULT_LAUNCH)}, got {tuned!r:.200}; "
            "fix or delete the file (benchmarks/gpu_run.py writes it)."
        )
    for key in DEFAULT_LAUNCH:
        if key in tuned:
            if type(tuned[key]) is not int or tuned[key] not in _ALLOWED[key]:
                raise ValueError(
                    f"{path}: {key}={tuned[key]!r}, expected one of {_ALLOWED[key]}; "
                    "fix or delete the file (benchmarks/gpu_run.py writes it)."
                )
            launch[key] = tuned[key]
    return launch


LAUNCH = load_launch()


def available() -> bool:
    """Whether Triton can be imported here."""
    return triton is not None


def can_run(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernels can run on ``tensor``'s device (CUDA and Triton)."""
    return available() and (tensor.is_cuda or interpreting())


def _load_tile(base, rows, n_rows, cols, n_cols, stride_row, stride_col):
    """base[rows, cols] as a [len(rows), len(cols)] tile, zero outside n_rows x n_cols."""
    return tl.load(
        base + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


if triton is not None:  # a helper the kernels call must be jitted before they compile
    _load_tile = triton.jit(_load_tile)


def _row_logsumexp(
    q_ptr, k_ptr, key_mask_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    n_heads, group_size, n_queries, n_keys, offset, d_head, scaling,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    rq = pid_q * BQ + tl.arange(0, BQ)
    rd = tl.arange(0, D)
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, rq, n_queries, rd, d_head, stride_qn, stride_qd)
    running_max = tl.full([BQ], float("-inf"), tl.float32)
    running_sum = tl.full([BQ], 0.0, tl.float32)
    key_end = n_keys
    if CAUSAL:
        key_end = tl.minimum(n_keys, offset + (pid_q + 1) * BQ)
    for k0 in range(0, key_end, BK):
        rk = k0 + tl.arange(0, BK)
        k_head = k_ptr + b * stride_kb + (h // group_size) * stride_kh
        k = _load_tile(k_head, rk, n_keys, rd, d_head, stride_kn, stride_kd)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        seen = tl.load(key_mask_ptr + b * stride_mb + rk * stride_mn, mask=rk < n_keys, other=0) != 0
        allowed = seen[None, :] & (rq[:, None] < n_queries)
        if CAUSAL:
            allowed = allowed & (rk[None, :] <= offset + rq[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
            tl.exp(scores - safe_max[:, None]), 1
        )
        running_max = new_max
    # A row that sees no key gets +inf, so that exp(score - lse) = 0 in the second pass.
    lse = tl.where(
        running_sum > 0, running_max + tl.log(tl.where(running_sum > 0, running_sum, 1.0)), float("inf")
    )
    tl.store(lse_ptr + pid_bh * n_queries + rq, lse, mask=rq < n_queries)


def _group_sums(
    q_ptr, k_ptr, factor_ptr, groups_ptr, key_mask_ptr, lse_ptr, norm_ptr, alpha_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_fb, stride_fn, stride_fh, stride_fr,
    stride_gb, stride_gg, stride_gn,
    stride_mb, stride_mn,
    n_heads, group_size, n_groups, rank, n_queries, n_keys, offset, d_head, scaling,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
    HP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)  # this program takes every n_splits-th query block
    n_splits = tl.num_programs(2)
    rk = pid_k * BK + tl.arange(0, BK)
    rd = tl.arange(0, D)
    rr = tl.arange(0, R)
    rg = tl.arange(0, G)
    rh = tl.arange(0, HP)
    key_valid = rk < n_keys
    seen = tl.load(key_mask_ptr + b * stride_mb + rk * stride_mn, mask=key_valid, other=0) != 0
    norm_acc = tl.zeros([G, BK], tl.float32)
    alpha_acc = tl.zeros([HP, G, BK], tl.float32)
    query_start = 0
    if CAUSAL:  # queries before the block's first key see none of it
        query_start = (tl.maximum(pid_k * BK - offset, 0) // BQ) * BQ
    for q0 in range(query_start + split * BQ, n_queries, n_splits * BQ):
        rq = q0 + tl.arange(0, BQ)
        allowed = seen[None, :] & (rq[:, None] < n_queries)
        if CAUSAL:
            allowed = allowed & (rk[None, :] <= offset + rq[:, None])
        groups = _load_tile(groups_ptr + b * stride_gb, rg, n_groups, rq, n_queries, stride_gg, stride_gn)
        projected = tl.zeros([BQ, BK, R], tl.float32)
        for h in range(0, n_heads):
            q_head = q_ptr + b * stride_qb + h * stride_qh
            q = _load_tile(q_head, rq, n_queries, rd, d_head, stride_qn, stride_qd)
            k_head = k_ptr + b * stride_kb + (h // group_size) * stride_kh
            k = _load_tile(k_head, rk, n_keys, rd, d_head, stride_kn, stride_kd)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            lse = tl.load(lse_ptr + (b * n_heads + h) * n_queries + rq, mask=rq < n_queries, other=0.0)
            alpha = tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)
            head_rows = tl.sum(groups[:, :, None] * alpha[None, :, :], axis=1)  # [G, BK]
            alpha_acc += tl.where(rh[:, None, None] == h, head_rows[None, :, :], 0.0)
            factor_head = factor_ptr + b * stride_fb + h * stride_fh
            factor = _load_tile(factor_head, rk, n_keys, rr, rank, stride_fn, stride_fr)
            projected += alpha[:, :, None] * factor[None, :, :]
        norms = tl.sqrt(tl.sum(projected * projected, axis=2))  # [BQ, BK]
        norm_acc += tl.sum(groups[:, :, None] * norms[None, :, :], axis=1)
    # Programs of the same key block (other query splits) add into the same outputs.
    out_mask = (rg[:, None] < n_groups) & key_valid[None, :]
    tl.atomic_add(norm_ptr + (b * n_groups + rg[:, None]) * n_keys + rk[None, :], norm_acc, mask=out_mask)
    alpha_rows = (b * n_heads + rh[:, None, None]) * n_groups + rg[None, :, None]
    alpha_offsets = alpha_rows * n_keys + rk[None, None, :]
    tl.atomic_add(alpha_ptr + alpha_offsets, alpha_acc, mask=(rh[:, None, None] < n_heads) & out_mask[None])


@functools.cache
def _compiled():
    """The two kernels, jitted on first use (for the GPU, or for Triton's CPU interpreter when the
    process started with TRITON_INTERPRET=1)."""
    return triton.jit(_row_logsumexp), triton.jit(_group_sums)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    return available() and bool(triton.knobs.runtime.interpret)


def _query_splits(q: torch.Tensor, programs: int, query_blocks: int, per_sm: int) -> int:
    """How many programs share one key block's query blocks: enough for ``per_sm`` programs per
    multiprocessor (batch 1 has only n / key_block key blocks: 19 at 607 positions, on 132 SMs).
    Two in the interpreter, so that CI runs the split path."""
    if q.is_cuda:
        wanted = -(-per_sm * torch.cuda.get_device_properties(q.device).multi_processor_count // programs)
    else:
        wanted = 2
    return max(1, min(wanted, query_blocks))


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def attention_group_sums(q, k, factor, query_groups, key_mask, *, scaling, causal=True, launch=None):
    """Same inputs and results as :func:`hooked_vllm.analysis.attention_lenses.attention_group_sums`.

    ``launch``: a launch configuration (keys of :data:`DEFAULT_LAUNCH`) instead of :data:`LAUNCH`,
    for the block-size sweep."""
    if not available():
        raise RuntimeError("Triton is not installed; use backend='torch'.")
    launch = LAUNCH if launch is None else {**LAUNCH, **launch}
    block_q, block_k = launch["query_block"], launch["key_block"]
    row_logsumexp, group_sums = _compiled()
    batch, n_heads, n_queries, d_head = q.shape
    n_keys = k.shape[2]
    n_groups, rank = query_groups.shape[1], factor.shape[-1]
    factor = factor.float()
    query_groups = query_groups.float()
    key_mask = key_mask.to(torch.int8)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # half inputs: plain products
    if q.dtype != k.dtype:
        k = k.to(q.dtype)
    lse = torch.empty(batch, n_heads, n_queries, device=q.device, dtype=torch.float32)
    norm_rows = torch.zeros(batch, n_groups, n_keys, device=q.device, dtype=torch.float32)
    alpha_rows = torch.zeros(batch, n_heads, n_groups, n_keys, device=q.device, dtype=torch.float32)
    common = dict(CAUSAL=causal, PRECISION=precision, BQ=block_q, BK=block_k, D=_pow2(d_head, 16))
    row_logsumexp[(batch * n_heads, triton.cdiv(n_queries, block_q))](
        q, k, key_mask, lse, *q.stride(), *k.stride(), *key_mask.stride(),
        n_heads, n_heads // k.shape[1], n_queries, n_keys, n_keys - n_queries, d_head, scaling,
        **common,
    )  # fmt: skip
    key_blocks = triton.cdiv(n_keys, block_k)
    splits = _query_splits(q, batch * key_blocks, triton.cdiv(n_queries, block_q), launch["programs_per_sm"])
    group_sums[(batch, key_blocks, splits)](
        q, k, factor, query_groups, key_mask, lse, norm_rows, alpha_rows,
        *q.stride(), *k.stride(), *factor.stride(), *query_groups.stride(), *key_mask.stride(),
        n_heads, n_heads // k.shape[1], n_groups, rank, n_queries, n_keys, n_keys - n_queries, d_head,
        scaling, R=_pow2(rank), G=_pow2(n_groups), HP=_pow2(n_heads), num_warps=launch["num_warps"],
        **common,
    )  # fmt: skip
    return norm_rows, alpha_rows
