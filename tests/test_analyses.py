"""The three lenses against straightforward references, planted structure, and the one-pass collector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vllm.analysis import (
    LogitLens,
    collect,
    contextualization_from_cache,
    cross_input_baseline,
    detect_phases,
    head_norms,
    head_summed_norms,
    modality_pairs,
    pair_mean_cosine,
    reduce_cache,
    resid_stack_from_cache,
    transformed_values,
    verbalize,
)
from tests.conftest import INSTRUCTIONS


# ---------------------------------------------------------------- references
def naive_pair_mean(hidden, group_a, group_b):
    """Mean cosine over (i in A, j in B, i != j), non-zero vectors only, by explicit loops."""
    out = []
    for b in range(hidden.shape[0]):
        h = hidden[b].double()
        keep = h.norm(dim=-1) > 0
        a_idx = torch.nonzero(group_a[b] & keep).flatten().tolist()
        b_idx = torch.nonzero(group_b[b] & keep).flatten().tolist()
        values = [
            torch.nn.functional.cosine_similarity(h[i], h[j], dim=0) for i in a_idx for j in b_idx if i != j
        ]
        out.append(torch.stack(values).mean() if values else torch.tensor(float("nan"), dtype=torch.float64))
    return torch.stack(out)


def naive_norms(pattern, v, w_o):
    """Materialise alpha_hij f_h(x_j) as [batch, head, query, key, d_model] and take norms."""
    repeat = w_o.shape[0] // v.shape[2]
    v = v.double().repeat_interleave(repeat, dim=2)
    f = torch.einsum("bkhd,hde->bhke", v, w_o.double())
    vectors = pattern.double()[..., None] * f[:, :, None, :, :]
    return vectors.norm(dim=-1), vectors.sum(1).norm(dim=-1)


def close(a, b, rel=1e-5):
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0)
    return bool((diff <= rel * b.abs().nan_to_num().max().clamp_min(1e-12)).all()) and torch.equal(
        torch.isnan(a), torch.isnan(b)
    )


# ---------------------------------------------------------------- contextualization
def test_pair_mean_matches_naive_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 8, generator=gen)
    hidden[0, 4] = 0.0  # a zero vector has no direction: excluded from every group
    a = torch.rand(3, 17, generator=gen) > 0.4
    b = torch.rand(3, 17, generator=gen) > 0.5  # overlapping with a
    for ga, gb in ((a, a), (b, b), (a, b), (a, ~a)):
        assert close(pair_mean_cosine(hidden, ga, gb), naive_pair_mean(hidden, ga, gb))


def test_planted_directions_are_recovered():
    d = 16
    image_dir, text_dir = torch.zeros(d), torch.zeros(d)
    image_dir[0], text_dir[0], text_dir[1] = 1.0, 0.6, 0.8  # cos(image, text) = 0.6
    n_img, n_txt = 7, 5
    hidden = torch.cat([image_dir.repeat(n_img, 1) * 3.0, text_dir.repeat(n_txt, 1) * 0.5])[None]
    image = torch.tensor([[True] * n_img + [False] * n_txt])
    text = ~image
    assert pair_mean_cosine(hidden, image, image).item() == pytest.approx(1.0, abs=1e-6)
    assert pair_mean_cosine(hidden, text, text).item() == pytest.approx(1.0, abs=1e-6)
    assert pair_mean_cosine(hidden, image, text).item() == pytest.approx(0.6, abs=1e-6)
    # Orthogonal noise lowers intra-image exactly as predicted: cos = 1 / (1 + s^2) for equal-norm noise.
    noise = torch.zeros(n_img, d)
    for i in range(n_img):
        noise[i, 2 + i] = 0.5  # mutually orthogonal, orthogonal to the planted direction
    noisy = hidden.clone()
    noisy[0, :n_img] = image_dir + noise
    assert pair_mean_cosine(noisy, image, image).item() == pytest.approx(1 / 1.25, abs=1e-6)


def test_half_precision_is_accumulated_in_float32():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, 64, generator=gen) * 300.0  # squared norms overflow float16
    mask = torch.ones(2, 40, dtype=torch.bool)
    reference = pair_mean_cosine(hidden, mask, mask)
    for dtype in (torch.float16, torch.bfloat16):
        value = pair_mean_cosine(hidden.to(dtype), mask, mask)
        assert torch.isfinite(value).all()
        assert (value - reference).abs().max() <= 1e-3


def test_cross_input_baseline_matches_all_cross_pairs():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 9, 6, generator=gen)
    image = torch.rand(4, 9, generator=gen) > 0.3
    text = ~image
    units = hidden / hidden.norm(dim=-1, keepdim=True)
    sums = {
        m: torch.einsum("bp,bpd->bd", mask.float(), units)[None] for m, mask in (("i", image), ("t", text))
    }
    counts = {"i": image.sum(-1).float(), "t": text.sum(-1).float()}
    expected_ii, expected_it = [], []
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            sim = units[a] @ units[b].T
            expected_ii.append(sim[image[a]][:, image[b]].flatten())
            expected_it.append(sim[image[a]][:, text[b]].flatten())
    assert cross_input_baseline(sums["i"], counts["i"]).item() == pytest.approx(
        torch.cat(expected_ii).mean().item(), abs=1e-6
    )
    value = cross_input_baseline(sums["i"], counts["i"], sums["t"], counts["t"]).item()
    assert value == pytest.approx(torch.cat(expected_it).mean().item(), abs=1e-6)


def test_contextualization_on_a_model_matches_naive(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side="right")
    _, cache = vlm.run_with_cache(batch)
    per_item = contextualization_from_cache(cache, batch.image_mask, batch.text_mask).per_item()
    assert per_item["inter"].shape == (vlm.cfg.n_layers + 1, len(batch))
    for layer, name in [(0, "blocks.0.hook_resid_pre"), (2, "blocks.1.hook_resid_post")]:
        h = cache[name]
        assert close(per_item["intra_image"][layer], naive_pair_mean(h, batch.image_mask, batch.image_mask))
        assert close(per_item["intra_text"][layer], naive_pair_mean(h, batch.text_mask, batch.text_mask))
        assert close(per_item["inter"][layer], naive_pair_mean(h, batch.image_mask, batch.text_mask))


# ---------------------------------------------------------------- norm-based attention
def test_norm_attention_matches_naive_and_rebuilds_the_attention_output(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    _, cache = vlm.run_with_cache(batch)
    for layer in range(vlm.cfg.n_layers):
        pattern, v = cache["pattern", layer], cache["v", layer]
        w_o = vlm.W_O[layer]
        naive_head, naive_summed = naive_norms(pattern, v, w_o)
        assert close(head_norms(pattern, v, w_o), naive_head)
        assert close(head_summed_norms(pattern, v, w_o), naive_summed)
        # f_h is the model's: sum_j sum_h alpha_hij f_h(x_j) is the attention output.
        f = transformed_values(v, w_o)
        rebuilt = torch.einsum("bhqk,bkhe->bqe", pattern.float(), f)
        assert (rebuilt - cache[f"blocks.{layer}.hook_attn_out"]).abs().max() <= 1e-4


def test_blockwise_causal_head_summed_norm_matches_naive(family, images):
    """The collector's fast path (key blocks, causal half skipped) on real decoder patterns, with
    blocks smaller than the sequence; a bidirectional pattern needs causal=False (the default)."""
    from hooked_vllm.analysis.norm_attention import head_gram, head_summed_norms_from_gram

    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    _, cache = vlm.run_with_cache(batch)
    pattern, v, w_o = cache["pattern", 1], cache["v", 1], vlm.W_O[1]
    gram = head_gram(v, w_o)
    _, naive_summed = naive_norms(pattern, v, w_o)
    # Padding queries attend anywhere (a fully masked row); they belong to no modality group.
    real = batch.attention_mask.bool()[:, :, None]
    for key_block in (7, 64, 10_000):
        fast = head_summed_norms_from_gram(pattern, gram, causal=True, key_block=key_block)
        assert close(fast * real, naive_summed * real)
    full = torch.softmax(torch.randn_like(pattern), -1)
    _, naive_full = naive_norms(full, v, w_o)
    assert close(head_summed_norms_from_gram(full, gram, key_block=7), naive_full)
    assert not close(head_summed_norms_from_gram(full, gram, causal=True, key_block=7), naive_full)


def test_zero_value_vector_gets_zero_norm_attention():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(1, 6, 2, 4, generator=gen)
    v[0, 2] = 0.0
    w_o = torch.randn(4, 4, 8, generator=gen)
    pattern = torch.softmax(torch.randn(1, 4, 6, 6, generator=gen), -1)
    assert pattern[0, :, :, 2].min() > 0
    assert head_norms(pattern, v, w_o)[0, :, :, 2].abs().max() == 0
    assert head_summed_norms(pattern, v, w_o)[0, :, 2].abs().max() == 0
    assert head_summed_norms(pattern, v, w_o)[0, :, 3].min() > 0


# ---------------------------------------------------------------- logit lens
def test_logit_lens_reproduces_the_logits_at_the_last_layer(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    logits, cache = vlm.run_with_cache(batch)
    lens = LogitLens.from_vlm(vlm)
    assert (lens.logits(cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"]) - logits).abs().max() <= 1e-5
    positions = torch.stack([batch.last_positions, batch.last_positions - 1], dim=1)
    result = lens.summarize(resid_stack_from_cache(cache, positions), k=3)
    final = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
    assert torch.equal(result.final_token, final)
    assert (result.final_rank[-1] == 0).all() and result.kl_to_final[-1].abs().max() <= 1e-5
    assert torch.equal(result.top_tokens[:, :, :, 0] == final, result.final_rank == 0)
    table = verbalize(result, vlm.tokenizer)
    assert table[-1][0] == vlm.tokenizer.decode([int(final[0, 0])])


# ---------------------------------------------------------------- collector
@pytest.mark.parametrize("attention", ["fused", "pattern"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_one_pass_collector_equals_cache_based_analysis(family, images, padding_side, attention):
    """Both attention paths of the collector (sdpa + alpha recomputed from q and k; the bridge's
    pattern hook) against the analysis of a full cache and the naive definitions."""
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    streamed = collect(vlm, batch, verbalize_images=True, attention=attention)
    _, cache = vlm.run_with_cache(batch)
    cached = reduce_cache(vlm, batch, cache, verbalize_images=True)
    for name, value in streamed.contextualization.per_item().items():
        assert close(value, cached.contextualization.per_item()[name], rel=1e-6), name
    for pair, value in streamed.attention.norm.items():
        assert close(value, cached.attention.norm[pair], rel=1e-6), pair
        assert close(streamed.attention.weight[pair], cached.attention.weight[pair], rel=1e-6)
    assert close(streamed.attention.image_saliency_from_last, cached.attention.image_saliency_from_last)
    assert torch.equal(streamed.lens.final_token, cached.lens.final_token)
    assert torch.equal(streamed.image_verbalization, cached.image_verbalization)
    # And the streamed numbers are the naive definitions.
    naive = naive_pair_mean(cache["blocks.2.hook_resid_post"], batch.image_mask, batch.text_mask)
    assert close(streamed.contextualization.per_item()["inter"][3], naive)
    weight_text_image = [
        cache["pattern", 1][b].mean(0)[batch.text_mask[b]][:, batch.image_mask[b]].mean()
        for b in range(len(batch))
    ]
    assert close(streamed.attention.weight["text<-image"][1], torch.stack(weight_text_image))
    naive_head, naive_summed = naive_norms(cache["pattern", 2], cache["v", 2], vlm.W_O[2])
    causal = torch.ones(naive_summed.shape[-1], naive_summed.shape[-1], dtype=torch.bool).tril()
    for pair, (queries, keys) in modality_pairs(batch).items():
        block = queries[:, :, None] & keys[:, None, :] & causal
        expected = torch.stack([naive_summed[b][block[b]].mean() for b in range(len(batch))])
        assert close(streamed.attention.norm[pair][2], expected), pair
        per_head = torch.stack([naive_head[b][:, block[b]].mean(-1) for b in range(len(batch))], 1)
        assert close(streamed.attention.head_norm[pair][2], per_head), pair
    from_last = naive_summed[torch.arange(len(batch)), batch.last_positions]  # [batch, key]
    expected_saliency = from_last[batch.image_mask].reshape(len(batch), -1)
    assert close(streamed.attention.image_saliency_from_last[2], expected_saliency)


# ---------------------------------------------------------------- phases
def planted_curves(n=33, boundaries=(3, 10, 26), noise=0.0, seed=0):
    a, b, c = boundaries
    layers = np.arange(n)
    inter = np.interp(layers, [0, a, b, c, n - 1], [0.05, 0.30, 0.12, 0.45, 0.15])
    intra = np.interp(layers, [0, a, b, c, n - 1], [0.10, 0.45, 0.60, 0.62, 0.30])
    rng = np.random.default_rng(seed)
    return intra + rng.normal(0, noise, n), intra + rng.normal(0, noise, n), inter + rng.normal(0, noise, n)


def test_planted_phase_boundaries_are_recovered():
    report = detect_phases(*planted_curves(), window=1)
    assert report.clear
    assert [(p.start, p.end) for p in report.phases] == [(0, 3), (3, 10), (10, 26), (26, 32)]


def test_noisy_planted_boundaries_are_recovered_within_a_layer():
    for seed in range(5):
        report = detect_phases(*planted_curves(noise=0.01, seed=seed), window=3)
        assert report.clear, report.summary()
        got = [p.end for p in report.phases[:3]]
        assert all(abs(g - e) <= 1 for g, e in zip(got, (3, 10, 26))), (seed, got)


def test_curves_without_phases_are_reported_as_such():
    rng = np.random.default_rng(0)
    flat = 0.3 + rng.normal(0, 1e-4, 33)
    report = detect_phases(flat, flat, flat)
    assert not any(p.found for p in report.phases[1:3])
    rising = np.linspace(0.1, 0.9, 33)
    report = detect_phases(rising, rising, rising)
    assert not report.clear and not report.phases[3].found


def test_logit_lens_must_converge_in_the_last_phase():
    curves = planted_curves()
    early_kl = np.r_[np.full(5, 5.0), np.zeros(28)]  # "converged" at layer 5: contradicts phase IV
    assert not detect_phases(*curves, kl_to_final=early_kl, window=1).phases[3].found
    late_kl = np.r_[np.full(27, 5.0), np.zeros(6)]
    assert detect_phases(*curves, kl_to_final=late_kl, window=1).phases[3].found
