"""Nothing silent: broken checkpoints are refused by name, the transformers log level is the user's,
and generation under interventions computes what a forward computes, whatever the padding side."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_vllm import BatchFormatError, CheckpointError, GenerationArgumentError, HookedVLM
from hooked_vllm.interventions import knockout, patch_hook, prune, select_image_tokens
from hooked_vllm.testing import tiny_llava
from tests.conftest import INSTRUCTIONS, ROOT, random_images


# ---------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    hf_model, processor = tiny_llava(seed=4, directory=directory / "build")
    hf_model.save_pretrained(directory / "model")
    processor.save_pretrained(directory / "model")
    weights = directory / "model" / "model.safetensors"
    # cloned: load_file's tensors map the file, which the tests rewrite (SIGBUS before safetensors 0.8)
    return directory / "model", weights, {k: v.clone() for k, v in load_file(weights).items()}


WORDS = {"missing": "missing", "unexpected": "unexpected", "mis-shaped": "wrong shape"}


def _save(weights, tensors):
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["missing", "unexpected", "mis-shaped"])
def test_a_damaged_checkpoint_is_refused_naming_the_tensor(saved_llava, damage):
    directory, weights, good = saved_llava
    key = next(k for k in good if "layers.1.mlp.up_proj.weight" in k)
    named = r"layers\.1\.mlp\.up_proj\.weight"  # HF names it as the model does, not as saved
    damaged = dict(good)
    if damage == "missing":
        del damaged[key]
    elif damage == "unexpected":
        damaged["language_model.model.layers.1.mlp.extra.weight"] = torch.zeros(3)
        named = r"layers\.1\.mlp\.extra\.weight"
    else:
        damaged[key] = good[key][:, :-1].clone()
        named += r" \(128, 63\) vs \(128, 64\)"
    _save(weights, damaged)
    try:
        with pytest.raises(CheckpointError, match=f"{WORDS[damage]}.*{named}"):
            HookedVLM.from_pretrained(str(directory))
        with pytest.warns(UserWarning, match="strict=False"):
            vlm = HookedVLM.from_pretrained(str(directory), strict=False)
        assert vlm.cfg.n_layers == 3
    finally:
        _save(weights, good)
    HookedVLM.from_pretrained(str(directory))  # the intact checkpoint loads without a word


@pytest.mark.parametrize("level", ["INFO", "WARNING", "DEBUG"])
def test_importing_hooked_vllm_keeps_the_transformers_log_level(level):
    script = (
        "import logging, transformers\n"
        f"transformers.logging.set_verbosity(logging.{level})\n"
        "import hooked_vllm\n"
        "from hooked_vllm import HookedVLM\n"  # the lazy import that brings transformer-lens in
        "import transformer_lens\n"
        "print(logging.getLevelName(logging.getLogger('transformers').level))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == level


# ---------------------------------------------------------------- generate under interventions
def _prompt_pass_equals_forward(vlm, batch, context_factory, layer=2):
    """Under an intervention, the residual of generate's prompt pass equals a forward's."""
    seen = []

    def record(resid, hook):
        seen.append(resid.clone())

    with context_factory(), vlm.hooks([(f"blocks.{layer}.hook_resid_post", record)]):
        vlm(batch)
        vlm.generate(batch, max_new_tokens=2)
    real = batch.attention_mask.bool()
    return (seen[0] - seen[1])[real].abs().max().item()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("intervention", ["knockout", "prune", "patch", "user hook"])
def test_generate_under_interventions_equals_a_forward_on_both_padding_sides(family, intervention, side):
    vlm = family.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS, padding_side=side)
    if intervention == "knockout":
        context = lambda: knockout(vlm, batch, [("image", "last"), ("image", "text")])  # noqa: E731
    elif intervention == "prune":
        keep = select_image_tokens(vlm, batch, k=3, method="first", layer=1)
        context = lambda: prune(vlm, batch, keep, from_layer=1)  # noqa: E731
    elif intervention == "patch":
        source = vlm.prepare(random_images(3, seed=9), INSTRUCTIONS, padding_side=side)
        _, source_cache = vlm.run_with_cache(source, names_filter="blocks.1.hook_resid_post")
        image_patch = patch_hook(source_cache["blocks.1.hook_resid_post"], batch.image_mask)
        context = lambda: vlm.hooks([("blocks.1.hook_resid_post", image_patch)])  # noqa: E731
    else:
        shift = torch.randn(vlm.cfg.d_model, generator=torch.Generator().manual_seed(0))

        def text_shift(resid, hook):
            if resid.shape[1] != batch.text_mask.shape[1]:
                return resid  # a decoding step: this hook is keyed to the prompt's positions
            return resid + batch.text_mask[..., None].to(resid.dtype) * shift

        context = lambda: vlm.hooks([("blocks.0.hook_resid_post", text_shift)])  # noqa: E731
    assert _prompt_pass_equals_forward(vlm, batch, context) == 0.0


def test_generate_under_knockout_does_not_depend_on_the_padding_side(family):
    vlm = family.vlm
    images = random_images(3)
    tokens = {}
    for side in ("left", "right"):
        batch = vlm.prepare(images, INSTRUCTIONS, padding_side=side)
        with knockout(vlm, batch, [("image", "last"), ("text", "last"), ("special", "last")]):
            tokens[side] = vlm.generate(batch, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(tokens["left"], tokens["right"])


def test_generation_arguments_are_checked_as_hf_checks_them(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    nothing = vlm.generate(batch, max_new_tokens=0)
    assert nothing.shape == (2, 0) and nothing.dtype == torch.long
    assert vlm.generate(batch, max_new_tokens=0, return_str=True) == ["", ""]
    with pytest.raises(GenerationArgumentError, match="strictly positive"):
        vlm.generate(batch, max_new_tokens=3, do_sample=True, temperature=0)
    with pytest.raises(GenerationArgumentError, match="strictly positive"):
        vlm.generate(batch, max_new_tokens=3, do_sample=True, temperature=-1.0)
    with pytest.raises(GenerationArgumentError, match="non-negative integer"):
        vlm.generate(batch, max_new_tokens=-1)
    with pytest.raises(GenerationArgumentError, match="non-negative integer"):
        vlm.generate(batch, max_new_tokens=2.5)
    sampled = vlm.generate(batch, max_new_tokens=4, do_sample=True, temperature=1e-4, eos_token_id=-1)
    greedy = vlm.generate(batch, max_new_tokens=4, eos_token_id=-1)
    assert torch.equal(sampled, greedy)  # a tiny temperature samples the argmax, never NaN


def test_an_empty_batch_is_refused(llava):
    with pytest.raises(BatchFormatError, match="No prompts"):
        llava.vlm.prepare([], [])
