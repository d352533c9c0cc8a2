"""A tiny Aya Vision (``AyaVisionForConditionalGeneration``: SigLIP tower on dynamic tiles, pixel shuffle,
SwiGLU projector, Cohere 2 language model) built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    AyaVisionProcessor,
    Cohere2Config,
    SiglipVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    tile_image_processor,
    train_tokenizer,
)

START_TOKEN, END_TOKEN, PATCH_TOKEN = "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>"
#: Aya Vision's image tokens and the turn markers of its (Command R) chat format
SPECIAL_TOKENS = (
    START_TOKEN,
    END_TOKEN,
    PATCH_TOKEN,
    "<|IMG_LINE_BREAK|>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
)
#: layer kinds of the tiny text model: Cohere 2's sliding-window RoPE layers around one global layer
#: without positions (real checkpoints: three sliding layers, then a global one)
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")


def tiny_aya_vision(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    tile_size: int = 16,
    patch_size: int = 2,
    max_patches: int = 4,
    sliding_window: int = 8,
    logit_scale: float = 0.25,
) -> tuple[AyaVisionForConditionalGeneration, AyaVisionProcessor]:
    """A random Aya Vision-architecture model and its processor.

    SigLIP tower on 16x16 tiles with patch 2 (an 8x8 patch grid, no CLS), pixel shuffle 2 to a 4x4
    grid: 16 ``<|IMG_PATCH|>`` slots per tile. The image processor (GotOCR2's, as Aya Vision's) crops
    each image to the canvas of 1 to 4 tiles closest to its aspect and appends a thumbnail when that
    is more than one tile: the test images 48x24, 24x48 and 40x40 get 3, 3 and 5 tiles. The processor
    writes ``<|START_OF_IMG|>``, per crop ``TILE_{i}`` and its slots, ``TILE_GLOBAL`` and the
    thumbnail's slots, ``<|END_OF_IMG|>`` (``TILE_*`` plain text here). Cohere 2 text model: one
    LayerNorm feeding attention and MLP in parallel, layers ``LAYER_TYPES`` (sliding window 8 with
    interleaved RoPE; the global layer has no positions at all), ``logit_scale`` 0.25 in the text
    config (which HF's Aya Vision head does not apply). BOS ``<s>``; all-zero parameters re-drawn.
    Prompt: ``"<|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{text}<|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"``.
    """
    directory = Path(directory) if directory is not None else default_dir("aya-vision")
    tokenizer = train_tokenizer(
        directory / "tokenizer", extra_special_tokens=SPECIAL_TOKENS, padding_side=padding_side
    )
    downsample = 2
    torch.manual_seed(seed)
    text_config = Cohere2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        logit_scale=logit_scale,
        sliding_window=sliding_window,
        layer_types=list(LAYER_TYPES[: text.n_layers]),
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        **text._sizes(),
    )
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION, image_size=tile_size, patch_size=patch_size),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(PATCH_TOKEN),
        downsample_factor=downsample,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    config.architectures = ["AyaVisionForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(AyaVisionForConditionalGeneration(config), seed, redraw_zeros=True)
    processor = AyaVisionProcessor(
        image_processor=tile_image_processor(tile_size, max_patches),
        tokenizer=tokenizer,
        patch_size=patch_size,
        img_size=tile_size,
        downsample_factor=downsample,
    )
    return model, processor
