"""Tiny PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``), built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    train_tokenizer,
)

IMAGE_TOKEN = "<image>"


def tiny_paligemma(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A random PaliGemma-architecture model (SigLIP tower, linear projector, Gemma LM) and its processor.

    Every image is resized to 24x24 pixels and cut into 6px patches: 16 ``<image>`` slots per image,
    a 4x4 grid row-major, whatever the image's size (the test images 48x24, 24x48 and 40x40 all give
    16). The processor writes the prompt ``<image>`` x 16, then ``<s>`` (BOS comes *after* the image
    tokens), the text and a newline; ``token_type_ids`` is 0 on that whole prefix, which the language
    model attends to bidirectionally (only a suffix, e.g. generated tokens, is causal). Positions are
    1-indexed (``cumsum(mask)``). Gemma backbone: 3 layers, d_model 64, 4 query / 2 key-value heads,
    embedding scaled by sqrt(d_model) inside the embedding module, the image features scattered
    after it unscaled. The embedding and head are untied and re-drawn with std 0.1, every all-zero
    parameter is re-drawn. The processor adds PaliGemma's 1024 ``<locNNNN>`` and 128 ``<segNNN>``
    tokens to the tokenizer (vocabulary 1552). Prompt: ``"<image>{text}"``.
    """
    return _tiny_paligemma("paligemma", seed, directory, text, padding_side, sliding_window=None)


def tiny_paligemma2(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    sliding_window: int = 6,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A random PaliGemma-2-architecture model: :func:`tiny_paligemma` with a Gemma 2 backbone.

    Gemma 2's layers alternate sliding (window ``sliding_window``) and full attention starting with
    sliding (S, F, S with 3 layers); attention logits are soft-capped at 50 and the final logits at
    30 (Gemma 2's defaults; ``unembed.hook_out`` holds the logits before that cap); each layer has
    post-attention and post-MLP norms. HF then builds two masks (full and sliding), both with the
    bidirectional prefix; the window (6) is smaller than the 16-slot image block, so in the prompt
    pass the prefix overrides the window (HF's sliding mask is OR(window AND causal, prefix block)).
    Same geometry and prompt as :func:`tiny_paligemma`.
    """
    return _tiny_paligemma("paligemma2", seed, directory, text, padding_side, sliding_window=sliding_window)


def _tiny_paligemma(kind, seed, directory, text, padding_side, *, sliding_window):
    directory = Path(directory) if directory is not None else default_dir(kind)
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        extra_special_tokens=(),
        named_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side=padding_side,
    )
    image_size, patch_size = 24, 6
    image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(  # adds the <loc>/<seg> tokens: the vocabulary is counted after it
        image_processor=SiglipImageProcessor(
            size={"height": image_size, "width": image_size}, image_seq_length=image_seq_length
        ),
        tokenizer=tokenizer,
    )
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        head_dim=text.head_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **text._sizes(),
    )
    if sliding_window is None:
        text_config = GemmaConfig(**common)
    else:
        text_config = Gemma2Config(
            query_pre_attn_scalar=text.head_dim,
            sliding_window=sliding_window,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(text.n_layers)],
            **common,
        )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            **TINY_VISION,
            image_size=image_size,
            patch_size=patch_size,
            vision_use_head=False,
        ),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vocab_size=len(tokenizer),
        projection_dim=text.d_model,
        hidden_size=text.d_model,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(PaliGemmaForConditionalGeneration(config), seed, embed_std=0.1, redraw_zeros=True)
    return model, processor
