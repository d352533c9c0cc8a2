"""The lenses in bfloat16/float16 agree with a float32 run of the same model.

The lenses accumulate in float32 (tests/test_analyses.py checks that on given activations); what
remains here is the model's own half-precision activations. Measured on this tiny model (CPU):
float16 contextualization 6.6e-5 abs, norm aggregates 2.6e-4 rel; bfloat16 1.6e-3 abs and 1.5e-3
rel (bfloat16 keeps 8 bits of mantissa). Bounds: the targets 1e-3 / 1e-2, except bfloat16's
contextualization (3e-3)."""

from __future__ import annotations

import copy

import pytest
import torch

from hooked_vllm import HookedVLM
from hooked_vllm.analysis import collect
from hooked_vllm.testing import tiny_llava
from tests.conftest import INSTRUCTIONS, random_images

BOUNDS = {torch.float16: (1e-3, 1e-2), torch.bfloat16: (3e-3, 1e-2)}  # (context abs, norm rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lenses_track_float32(dtype, tmp_path):
    context_bound, norm_bound = BOUNDS[dtype]
    hf_model, processor = tiny_llava(seed=4, directory=tmp_path)
    # Moderate weights, as in trained models, so half precision is the only difference.
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.mul_(0.1)
    full = HookedVLM.from_hf(copy.deepcopy(hf_model), processor)
    half = HookedVLM.from_hf(hf_model.to(dtype), processor)
    batch = full.prepare(random_images(3), INSTRUCTIONS)
    reference, result = collect(full, batch), collect(half, batch)
    for group, values in reference.contextualization.per_item().items():
        got = result.contextualization.per_item()[group]
        assert (got - values).abs().max() <= context_bound, group
    for pair, values in reference.attention.norm.items():
        got = result.attention.norm[pair]
        finite = torch.isfinite(values)
        rel = ((got - values).abs() / values.abs().clamp_min(1e-6))[finite]
        assert rel.max() <= norm_bound, pair
