"""Norm-based attention from q and k (no pattern): PyTorch path against the definition, the Triton
kernel against the PyTorch path (Triton's CPU interpreter here, compiled wherever a GPU is), and the
observed-sdpa forward that feeds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hooked_vllm.analysis import collect
from hooked_vllm.analysis.attention_lenses import attend_with_group_sums, attention_group_sums
from hooked_vllm.analysis.norm_attention import head_gram
from hooked_vllm.model.observed_attention import observed_sdpa_attention
from tests.conftest import INSTRUCTIONS

REPO = Path(__file__).resolve().parents[1]


def random_case(
    *, device="cpu", dtype=torch.float32, batch=3, heads=4, kv_heads=2, queries=45, keys=45, seed=0
):
    """q, k, head Gram, query groups and a key mask with left padding (item 1's first queries see
    no key at all) and a padded key in the middle of item 2."""
    gen = torch.Generator().manual_seed(seed)
    d_head, d_model = 16, 24
    q = torch.randn(batch, heads, queries, d_head, generator=gen)
    k = torch.randn(batch, kv_heads, keys, d_head, generator=gen)
    v = torch.randn(batch, keys, kv_heads, d_head, generator=gen)
    w_o = torch.randn(heads, d_head, d_model, generator=gen) / 4
    groups = (torch.rand(batch, 3, queries, generator=gen) > 0.5).float()
    key_mask = torch.ones(batch, keys, dtype=torch.bool)
    key_mask[1, :7] = False
    key_mask[2, keys // 2] = False
    gram = head_gram(v, w_o)
    to = dict(device=device)
    return q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), gram.to(**to), groups.to(**to), key_mask.to(**to)


def reference(q, k, gram, groups, key_mask, *, scaling, causal):
    """The definition, in float64: the full pattern, then sqrt(alpha^T G alpha) per (query, key)."""
    q, k, gram, groups = q.double(), k.double(), gram.double(), groups.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    queries, keys = q.shape[2], k.shape[2]
    allowed = key_mask[:, None, None, :].expand(-1, 1, queries, -1)
    if causal:
        positions = torch.arange(keys - queries, keys)
        allowed = allowed & (torch.arange(keys)[None, :] <= positions[:, None])
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    alpha = torch.softmax(scores, -1).nan_to_num(0.0)  # [batch, head, query, key]
    summed = torch.einsum("bhqk,bkhg,bgqk->bqk", alpha, gram, alpha).clamp_min(0).sqrt()
    return torch.einsum("bgq,bqk->bgk", groups, summed), torch.einsum("bgq,bhqk->bhgk", groups, alpha)


def relative_error(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [dict(), dict(queries=20, keys=45), dict(kv_heads=4)])
def test_group_sums_match_the_definition(causal, shape):
    q, k, gram, groups, key_mask = random_case(**shape)
    expected = reference(q, k, gram, groups, key_mask, scaling=0.25, causal=causal)
    assert expected[1][1, :, :, :7].abs().max() == 0  # masked keys receive nothing
    for block in (7, 64):
        got = attention_group_sums(
            q, k, gram, groups, key_mask, scaling=0.25, causal=causal, query_block=block, backend="torch"
        )
        assert relative_error(got[0], expected[0]) <= 1e-5
        assert relative_error(got[1], expected[1]) <= 1e-5
    # A different mask gives different numbers (the mask is used, not assumed).
    unmasked = attention_group_sums(q, k, gram, groups, scaling=0.25, causal=causal, backend="torch")
    assert relative_error(unmasked[1], expected[1]) > 1e-3


@pytest.mark.parametrize("shape", [dict(), dict(kv_heads=4), dict(queries=70, keys=70, kv_heads=1)])
def test_attention_output_from_the_lenses_softmax_matches_sdpa_and_the_definition(shape):
    """The collector's CPU path computes each layer's attention output from the lenses' own alpha:
    equal to torch's sdpa with the same mask (GQA, left padding, a padded key in the middle) on
    every query that sees a key, zero on those that see none, and the same two reductions."""
    q, k, gram, groups, key_mask = random_case(**shape)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(1))
    expected = reference(q, k, gram, groups, key_mask, scaling=0.25, causal=True)
    queries = q.shape[2]
    allowed = key_mask[:, None, None, :] & torch.ones(queries, queries, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed, scale=0.25
    ).transpose(1, 2)  # [batch, query, head, d_head]
    sees_a_key = allowed.any(-1)[:, 0]  # [batch, query]
    for block in (7, 64):
        out, norm_rows, alpha_rows = attend_with_group_sums(
            q, k, v, gram, groups, key_mask, scaling=0.25, padded=True, query_block=block
        )
        assert out.dtype == v.dtype and out.shape == sdpa.shape
        assert (out - sdpa)[sees_a_key].abs().max() <= 1e-5
        assert out[~sees_a_key].abs().max() == 0 and (~sees_a_key).any()
        assert relative_error(norm_rows, expected[0]) <= 1e-5
        assert relative_error(alpha_rows, expected[1]) <= 1e-5


def compare_backends(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Largest relative difference between the Triton kernel and the PyTorch path over a few cases."""
    worst = 0.0
    for shape in (dict(), dict(queries=20, keys=45), dict(kv_heads=4, keys=70, queries=70)):
        for causal in (True, False):
            case = random_case(device=device, dtype=dtype, **shape)
            kwargs = dict(scaling=0.25, causal=causal)
            fused = attention_group_sums(*case, backend="triton", **kwargs)
            plain = attention_group_sums(*case, backend="torch", **kwargs)
            worst = max(worst, *(relative_error(a, b) for a, b in zip(fused, plain, strict=True)))
    return worst


def test_triton_kernel_matches_pytorch_in_the_interpreter():
    """The kernel's code, run by Triton's CPU interpreter (the env var must be set before Triton is
    imported, hence a fresh process)."""
    pytest.importorskip("triton")
    script = "from tests.test_attention_lenses import compare_backends; print(compare_backends('cpu'))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_matches_pytorch_on_the_gpu(dtype):
    pytest.importorskip("triton")
    assert compare_backends("cuda", dtype) <= 1e-3


# ---------------------------------------------------------------- the observed sdpa forward
def test_observed_sdpa_forward_keeps_the_logits_and_restores_the_bridge(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)  # padded: the mask is passed to sdpa
    expected = vlm(batch)
    seen = {}

    def observer(layer, q, k, v, scaling):
        seen[layer] = (q.shape, k.shape, v.shape, scaling)

    with observed_sdpa_attention(vlm, observer):
        logits = vlm(batch)
    assert (logits - expected).abs().max() <= 1e-5
    assert sorted(seen) == list(range(vlm.cfg.n_layers))
    n_pos = batch.input_ids.shape[1]
    assert seen[0][0] == (len(batch), vlm.cfg.n_heads, n_pos, vlm.cfg.d_head)
    # Without padding sdpa runs its causal kernel (no mask): the same logits.
    single = vlm.prepare(images[:1], INSTRUCTIONS[:1])
    assert bool(single.attention_mask.bool().all())
    expected_single = vlm(single)
    with observed_sdpa_attention(vlm, observer, causal_only=True):
        assert (vlm(single) - expected_single).abs().max() <= 1e-5
    # After the block, and after an error inside one, the pattern hook fires again.
    with pytest.raises(RuntimeError, match="inside"):
        with observed_sdpa_attention(vlm, observer):
            raise RuntimeError("inside")
    _, cache = vlm.run_with_cache(batch, names_filter="blocks.0.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"].shape[-1] == n_pos
    assert (vlm(batch) - expected).abs().max() == 0


def test_collector_forward_from_the_lenses_softmax_keeps_model_and_lenses(family, images, monkeypatch):
    """On CPU the fused collector runs each layer's attention itself (no sdpa call): its logit lens
    at the last layer reads the model's own next-token distribution, and every lens equals the
    pattern path's (the bridge's step-by-step eager attention), both padding sides."""
    from hooked_vllm.model import observed_attention

    vlm = family.vlm
    sdpa_calls = []
    original = observed_attention.sdpa_attention_forward

    def counted(*args, **kwargs):
        sdpa_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(observed_attention, "sdpa_attention_forward", counted)
    for side in ("left", "right"):
        batch = vlm.prepare(images, INSTRUCTIONS, padding_side=side)
        probs = vlm(batch)[torch.arange(len(batch)), batch.last_positions].softmax(-1)
        fused = collect(vlm, batch, attention="fused")
        assert sdpa_calls == []
        pattern = collect(vlm, batch, attention="pattern")
        top_prob, top_token = probs.max(-1)
        assert torch.equal(fused.lens.top_tokens[-1][:, 0, 0], top_token)
        assert (fused.lens.top_probs[-1][:, 0, 0] - top_prob).abs().max() <= 1e-5
        for got, want in ((fused.lens.kl_to_final, pattern.lens.kl_to_final),):
            assert (got - want).abs().max() <= 1e-4
        for name, value in fused.contextualization.pair_sum.items():
            assert relative_error(value, pattern.contextualization.pair_sum[name]) <= 1e-5
        for pair, value in fused.attention.norm.items():
            assert relative_error(value.nan_to_num(), pattern.attention.norm[pair].nan_to_num()) <= 1e-5


def test_collector_refuses_an_unknown_attention_path(llava, images):
    with pytest.raises(ValueError, match="attention="):
        collect(llava.vlm, llava.vlm.prepare(images[:1], INSTRUCTIONS[:1]), attention="flash")


def test_use_sdpa_switches_only_layers_without_step_by_step_hooks(family, images, monkeypatch):
    """``vlm.use_sdpa``: layers run HF sdpa unless a hook needs the bridge's step-by-step attention
    (counted by patching that forward); the numbers match the step-by-step run to float rounding."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge as StepByStep,
    )

    from hooked_vllm.interventions import knockout

    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    expected = vlm(batch)
    with knockout(vlm, batch, edges=[("image", "last")], layers=[1]):
        expected_knockout = vlm(batch)
    step_by_step = StepByStep.forward
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(self)
        return step_by_step(self, *args, **kwargs)

    monkeypatch.setattr(StepByStep, "forward", counted)
    vlm.use_sdpa = True
    try:
        assert (vlm(batch) - expected).abs().max() <= 1e-5
        assert calls == []
        patterns = []
        vlm.run_with_hooks(
            batch, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: patterns.append(x))]
        )
        assert calls == [vlm.blocks[1].attn] and len(patterns) == 1
        calls.clear()
        with knockout(vlm, batch, edges=[("image", "last")], layers=[1]):
            knocked_out = vlm(batch)
        assert calls == [vlm.blocks[1].attn]
        assert (knocked_out - expected_knockout).abs().max() <= 1e-5
        assert (knocked_out - expected).abs().max() > 1e-3  # the knockout did something
    finally:
        vlm.use_sdpa = False
    calls.clear()
    assert torch.equal(vlm(batch), expected) and len(calls) == vlm.cfg.n_layers


def test_bridge_settings_that_change_attention_keep_the_step_by_step_path(llava, images):
    """With ``use_attn_result`` the bridge computes per-head results itself: the collector's "auto"
    falls back to the pattern hooks (same numbers), and "fused" says why it cannot run."""
    vlm = llava.vlm
    batch = vlm.prepare(images[:2], INSTRUCTIONS[:2])
    fused = collect(vlm, batch, attention="fused")
    vlm.cfg.use_attn_result = True
    try:
        fallback = collect(vlm, batch)
        with pytest.raises(NotImplementedError, match="attention='pattern'"):
            collect(vlm, batch, attention="fused")
    finally:
        vlm.cfg.use_attn_result = False
    for pair, value in fused.attention.norm.items():
        assert relative_error(fallback.attention.norm[pair].nan_to_num(), value.nan_to_num()) <= 1e-5


def test_auto_backend_falls_back_to_pytorch_when_the_kernel_fails(monkeypatch):
    """A kernel that cannot compile on some GPU must not stop a dataset run under "auto": one
    warning, the PyTorch result, and PyTorch from then on. An explicit backend="triton" raises."""
    from hooked_vllm.analysis import attention_lenses
    from hooked_vllm.kernels import attention_lenses as kernel

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernel, "can_run", lambda tensor: True)
    monkeypatch.setattr(kernel, "attention_group_sums", broken)
    monkeypatch.setattr(attention_lenses, "_triton_failed", False)
    case = random_case()
    expected = attention_group_sums(*case, scaling=0.25, backend="torch")
    with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
        got = attention_group_sums(*case, scaling=0.25)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    attention_group_sums(*case, scaling=0.25)  # no second try
    assert calls == [1]
    with pytest.raises(RuntimeError, match="PassManager"):
        attention_group_sums(*case, scaling=0.25, backend="triton")


def test_collector_makes_no_host_sync_per_layer():
    """On a GPU, every .item(), .nonzero() or boolean index inside a layer makes the host wait for
    the device. Count such ops (CPU profiler) in the fused collector: the same with 2 and 5 layers."""
    from torch.profiler import profile

    from hooked_vllm import HookedVLM
    from hooked_vllm.testing import TinyTextConfig, tiny_llava
    from tests.conftest import random_images

    syncing = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::is_nonzero"}
    counts = []
    for n_layers in (2, 5):
        vlm = HookedVLM.from_hf(*tiny_llava(text=TinyTextConfig(n_layers=n_layers)))
        batch = vlm.prepare(random_images(3), INSTRUCTIONS)
        with profile() as prof:
            collect(vlm, batch, verbalize_images=True, attention="fused")
        counts.append(sum(event.name in syncing for event in prof.events()))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_collector_on_the_gpu_matches_the_cpu(images, monkeypatch):
    """End to end where a GPU is: the fused collector (Triton kernel, no warning) on a CUDA copy of
    a tiny model gives the CPU numbers (TF32 off, as on the CPU)."""
    import copy
    import warnings

    from hooked_vllm import HookedVLM
    from hooked_vllm.testing import tiny_llava

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hf_model, processor = tiny_llava(seed=0)
    on_cpu = HookedVLM.from_hf(copy.deepcopy(hf_model), processor)
    on_gpu = HookedVLM.from_hf(hf_model.to("cuda"), processor)
    batch = on_cpu.prepare(images, INSTRUCTIONS)
    expected = collect(on_cpu, batch, verbalize_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the kernel must not fall back
        got = collect(on_gpu, batch, verbalize_images=True)
    for pair, value in expected.attention.norm.items():
        assert relative_error(got.attention.norm[pair].nan_to_num(), value.nan_to_num()) <= 1e-4, pair
    for name, value in expected.contextualization.per_item().items():
        assert (got.contextualization.per_item()[name] - value).abs().max() <= 1e-4, name
    agree = (got.image_verbalization.cpu() == expected.image_verbalization).float().mean()
    assert agree >= 0.99  # top-1 words; a near-tie may flip
