"""Cached generation against greedy decoding without a cache, 40 tokens, both families.

``vlm.generate`` reuses the KV cache; the reference here reruns the full forward on the prompt plus
the tokens so far at every step and takes the argmax at each item's last real position. A KV cache
that is empty or ignored (transformers 5.24 with transformer-lens 4.3, see docs/DEPENDENCIES.md)
still gets the first few tokens right, since they depend mostly on the last prompt token, and goes
wrong after about six: hence 40 tokens, and a check that the reference does depend on the context.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hooked_vllm.errors import GenerationArgumentError, ReturnTypeError
from hooked_vllm.model.batch import positions_from_mask
from tests.conftest import INSTRUCTIONS

NEW_TOKENS = 40
NEVER = -1  # an eos id that no token has, so that every item generates all NEW_TOKENS
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit of the reference: no argmax is a float-rounding tie


def greedy_without_cache(vlm, batch, n):
    """Greedy tokens [batch, n], each from a full forward over the prompt and the tokens so far, and
    each step's top-2 logit margin.

    The prompt is left-padded, so every item's last real position is the last column. It is
    embedded once as ``vlm.forward`` embeds it; generated tokens are embedded as text, as the
    decoding steps of ``generate`` (and of HF) embed them: a tiny random model can emit the image
    placeholder id, which in ``input_ids`` would ask for another image.
    """
    batch = batch.left_padded()
    prompt = vlm.embed(batch)
    prompt_mask = batch.attention_mask.to(prompt.device)
    tokens = prompt_mask.new_empty(len(batch), 0)
    margins = []
    for _ in range(n):
        mask = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
        logits = vlm.bridge(
            torch.cat([prompt, vlm.bridge.embed(tokens)], dim=1),
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
        )
        last = logits[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        margins.append(top2[:, 0] - top2[:, 1])
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(margins, dim=1)


@pytest.fixture(scope="module")
def reference(family, images):
    """The no-cache greedy tokens of the 3-item padded batch (the same for either padding side)."""
    batch = family.vlm.prepare(images, INSTRUCTIONS)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    tokens, margins = greedy_without_cache(family.vlm, batch, NEW_TOKENS)
    assert margins.min() > MIN_MARGIN, "a near-tie in the reference: pick other prompts or images"
    return tokens


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_cached_generate_equals_greedy_without_cache(family, images, reference, padding_side):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    ours = vlm.generate(batch, max_new_tokens=NEW_TOKENS, eos_token_id=NEVER)
    assert ours.shape == (len(batch), NEW_TOKENS)
    for item, (mine, expected) in enumerate(zip(ours.tolist(), reference.tolist())):
        step = next((i for i, (a, b) in enumerate(zip(mine, expected)) if a != b), None)
        assert step is None, f"item {item} ({padding_side} padded) diverges at new token {step}"


def test_cached_generate_equals_hf_generate(family, images, reference):
    batch = family.vlm.prepare(images, INSTRUCTIONS)
    theirs = family.reference.generate(
        **batch.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=NEVER
    )
    assert torch.equal(theirs[:, batch.input_ids.shape[1] :], reference)


def test_reference_depends_on_the_context(family, images, reference):
    """Decoding that ignores the cache (each new token attends only to itself) must differ from
    the reference within NEW_TOKENS, or this file could not catch an empty cache."""
    vlm = family.vlm
    tokens = [reference[:, 0]]
    for _ in range(NEW_TOKENS - 1):
        tokens.append(vlm.bridge(tokens[-1][:, None])[:, -1].argmax(-1))
    context_free = torch.stack(tokens, dim=1)
    assert not torch.equal(context_free, reference)


def test_cached_generate_when_attention_gets_the_cache_as_transformers_5_24_passes_it(
    family, images, reference
):
    """From transformers 5.24 a decoder layer hands its attention the KV cache as ``cache=`` (before:
    ``past_key_values=``), and transformer-lens 4.3's attention bridges read only the old name, so
    ``generate`` renames it for them. The pinned release (constraints.txt) may pass the old name, where
    the rename never acts: here every attention bridge is handed the cache as 5.24 hands it, on
    whatever release is installed, and cached generation must still equal the greedy reference."""
    vlm = family.vlm
    handed = []

    def as_transformers_5_24(module, args, kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        handed.append(kwargs.get("cache") is not None)
        return args, kwargs

    # Registered before generate registers its own: PyTorch runs forward pre-hooks in that order.
    handles = [
        block.attn.register_forward_pre_hook(as_transformers_5_24, with_kwargs=True) for block in vlm.blocks
    ]
    try:
        batch = vlm.prepare(images, INSTRUCTIONS, padding_side="left")
        ours = vlm.generate(batch, max_new_tokens=NEW_TOKENS, eos_token_id=NEVER)
    finally:
        for handle in handles:
            handle.remove()
    assert any(handed), "no attention bridge was handed a KV cache: the simulation did not act"
    for item, (mine, expected) in enumerate(zip(ours.tolist(), reference.tolist())):
        step = next((i for i, (a, b) in enumerate(zip(mine, expected)) if a != b), None)
        assert step is None, f"item {item} diverges at new token {step} with the cache passed as cache="


# ---------------------------------------------------------------- TransformerLens's return_type
TEXT_PROMPTS = ["what colour is the", "a red circle on a big square"]


def hf_text_lm(family):
    """HF's model that generates from text alone (InstructBLIP's wants images: its language model)."""
    return family.reference.language_model if family.name == "instructblip" else family.reference


def test_text_in_text_out_as_hf_greedy_decodes_it(family):
    """A string gives a string: the prompt and its continuation, as HF's greedy output decodes."""
    vlm, tokenizer = family.vlm, family.vlm.tokenizer
    expected = []
    for prompt in TEXT_PROMPTS:
        tokens = vlm.to_tokens(prompt)
        out = hf_text_lm(family).generate(
            input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=6, do_sample=False
        )
        expected.append(tokenizer.decode(out[0], skip_special_tokens=True))
        assert len(out[0]) > len(tokens[0])
    text = vlm.generate(TEXT_PROMPTS[0], max_new_tokens=6)
    assert isinstance(text, str) and text == expected[0] and text.startswith(TEXT_PROMPTS[0])
    assert vlm.generate(TEXT_PROMPTS, max_new_tokens=6) == expected  # a padded list: one text per prompt
    assert vlm.generate(TEXT_PROMPTS[0], max_new_tokens=6, return_type="str") == expected[0]

    tokens = vlm.to_tokens(TEXT_PROMPTS[0])
    new = vlm.generate(TEXT_PROMPTS[0], max_new_tokens=6, return_type="tokens")
    assert tokenizer.decode(torch.cat([tokens[0], new[0]]), skip_special_tokens=True) == expected[0]
    assert torch.equal(vlm.generate(tokens, max_new_tokens=6), new)  # tokens in: the new tokens, as before
    assert vlm.generate(tokens, max_new_tokens=6, return_type="str") == tokenizer.batch_decode(
        new, skip_special_tokens=True
    )


def test_an_image_batch_still_gives_tokens_and_refuses_unknown_return_types(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images[:2], INSTRUCTIONS[:2])
    tokens = vlm.generate(batch, max_new_tokens=4, eos_token_id=NEVER)
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (2, 4)
    texts = vlm.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert vlm.generate(batch, max_new_tokens=4, eos_token_id=NEVER, return_str=True) == texts
    assert vlm.generate(batch, max_new_tokens=4, eos_token_id=NEVER, return_type="str") == texts
    with pytest.raises(ReturnTypeError, match="'input', 'str' or 'tokens'"):
        vlm.generate(batch, max_new_tokens=4, return_type="text")


# ---------------------------------------------------------------- the checkpoint's generation_config
def generating_model(family, model):
    """The module whose generation_config HF's ``generate`` reads: InstructBLIP's hands over to its
    language model's ``generate``."""
    return model.language_model if family.name == "instructblip" else model


@contextlib.contextmanager
def generation_config(family, **settings):
    """``settings`` on the generation_config of both the wrapped model and the untouched reference."""
    models = [generating_model(family, family.vlm.hf_model), generating_model(family, family.reference)]
    saved = [copy.deepcopy(model.generation_config) for model in models]
    assert family.vlm.generation_config is models[0].generation_config
    for model in models:
        for name, value in settings.items():
            setattr(model.generation_config, name, value)
    try:
        yield
    finally:
        for model, config in zip(models, saved):
            model.generation_config = config


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_use_generation_config_decodes_as_hf_generate_with_its_repetition_penalty(
    family, images, reference, padding_side
):
    """HF's generate(do_sample=False) applies the checkpoint's repetition penalty; so does
    use_generation_config=True, and the default stays pure greedy."""
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    with generation_config(family, repetition_penalty=1.5):
        theirs = family.reference.generate(
            **vlm.prepare(images, INSTRUCTIONS).inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=NEVER,
        )[:, -NEW_TOKENS:]
        ours = vlm.generate(
            batch, NEW_TOKENS, use_generation_config=True, do_sample=False, eos_token_id=NEVER
        )
        greedy = vlm.generate(batch, NEW_TOKENS, eos_token_id=NEVER)
    assert torch.equal(ours, theirs)
    assert torch.equal(greedy, reference), "the default decoding stays pure greedy"
    assert not torch.equal(ours, reference), "the penalty must change the tokens"
    explicit = vlm.generate(batch, NEW_TOKENS, repetition_penalty=1.5, eos_token_id=NEVER)
    assert torch.equal(explicit, theirs)


def test_use_generation_config_samples_as_hf_generate(family, images):
    """Sampling with the checkpoint's temperature, top-k, top-p and n-gram ban: HF's tokens under the
    same seed (both draw one multinomial sample per step)."""
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, no_repeat_ngram_size=2)
    with generation_config(family, **settings):
        torch.manual_seed(0)
        theirs = family.reference.generate(**batch.inputs, max_new_tokens=NEW_TOKENS, eos_token_id=NEVER)
        torch.manual_seed(0)
        ours = vlm.generate(batch, NEW_TOKENS, use_generation_config=True, eos_token_id=NEVER)
    assert torch.equal(ours, theirs[:, -NEW_TOKENS:])
    for row in ours.tolist():  # the n-gram ban holds: no pair of new tokens repeats
        pairs = list(zip(row, row[1:]))
        assert len(pairs) == len(set(pairs))


def test_generation_config_settings_not_implemented_are_refused(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images[:1], INSTRUCTIONS[:1])
    with generation_config(family, num_beams=4), pytest.raises(GenerationArgumentError, match="num_beams=4"):
        vlm.generate(batch, 3, use_generation_config=True)
    with generation_config(family, num_beams=4):
        assert vlm.generate(batch, 3).shape == (1, 3)  # without the option the config is not read
    with pytest.raises(GenerationArgumentError, match="top_p must be"):
        vlm.generate(batch, 3, do_sample=True, top_p=1.5)
