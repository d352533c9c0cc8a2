"""A tiny InternVL (``InternVLForConditionalGeneration``, transformers-native): InternViT on dynamic
tiles with a thumbnail, pixel shuffle, MLP projector, Qwen2 language model (as InternVL3)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
)

from hooked_vllm.tiny_models.common import (
    TINY_VISION,
    TinyTextConfig,
    default_dir,
    finish_init,
    tile_image_processor,
    train_tokenizer,
)

#: the tokenizer attributes InternVLProcessor reads (a real checkpoint's ``extra_special_tokens``)
_INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
#: the ChatML turn markers of InternVL3's (Qwen2's) chat template
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def tiny_internvl(
    *,
    seed: int = 0,
    directory: str | Path | None = None,
    text: TinyTextConfig = TinyTextConfig(),
    padding_side: str = "left",
    tile_size: int = 16,
    patch_size: int = 2,
    max_patches: int = 4,
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A random InternVL3-architecture model (InternViT, pixel shuffle 0.5, MLP projector, Qwen2 LM)
    and its processor.

    Geometry with the defaults: tiles of 16x16 pixels, patch 2 (an 8x8 patch grid per tile; the CLS
    token dropped), pixel shuffle with ``downsample_ratio`` 0.5 to a 4x4 grid, so 16
    ``<IMG_CONTEXT>`` slots per tile (``image_seq_length``). The image processor crops each image
    to the canvas of 1 to ``max_patches`` (4) tiles whose aspect is closest to the image's (HF's
    ``get_optimal_tiled_canvas``) and, when that is more than one tile, appends a thumbnail (the
    whole image resized to one tile) after the crops. The test images get: 48x24 -> 2x1 canvas +
    thumbnail = 3 tiles (48 slots), 24x48 -> 1x2 + thumbnail = 3 tiles (48 slots; the canvas choice is
    symmetric, so a transposed image always gets the same count), 40x40 -> 2x2 + thumbnail = 5
    tiles (80 slots); a square image of at most 22x22 pixels (e.g. 20x20: area at most half the
    2x2 canvas, so HF keeps 1x1) gets one tile and no thumbnail. An image in a prompt is
    ``<IMG_CONTEXT>``; the processor expands it to ``<img>``, 16 x tiles ``<IMG_CONTEXT>`` and
    ``</img>``. No BOS (Qwen2), left padding by default (as
    InternVLProcessor's). Untied head; every all-zero parameter re-drawn (biases, CLS token,
    position embeddings). No chat template: prompts are
    ``"<|im_start|>user\\n<IMG_CONTEXT>\\n{text}<|im_end|>\\n<|im_start|>assistant\\n"``.
    """
    directory = Path(directory) if directory is not None else default_dir("internvl")
    tokenizer = train_tokenizer(
        directory / "tokenizer",
        add_bos=False,
        extra_special_tokens=_CHATML_TOKENS,
        named_special_tokens=_INTERNVL_TOKENS,
        padding_side=padding_side,
    )
    downsample_ratio = 0.5
    per_tile = int((tile_size // patch_size * downsample_ratio) ** 2)
    torch.manual_seed(seed)
    text_config = text.qwen2_config(tokenizer, use_sliding_window=False)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            **TINY_VISION,
            image_size=tile_size,
            patch_size=patch_size,
        ),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(_INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=per_tile,
        downsample_ratio=downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config._attn_implementation = "eager"
    model = finish_init(InternVLForConditionalGeneration(config), seed, redraw_zeros=True)
    processor = InternVLProcessor(
        image_processor=tile_image_processor(tile_size, max_patches),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": tile_size, "width": tile_size}),
        image_seq_length=per_tile,
    )
    return model, processor
